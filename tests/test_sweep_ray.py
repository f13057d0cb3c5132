"""The local Ray that a sweep starts listens on loopback only and stops with the sweep."""

import json
import subprocess
import sys
import textwrap

import pytest

from sweep_helpers import REPO

# Runs in a fresh interpreter, because the loopback setting must be in place before ray is imported.
PROBE = textwrap.dedent(
    """
    import json, subprocess, psutil, ray
    from saffu.launch import RaySession, RaySettings

    with RaySession(RaySettings(num_cpus=1)) as session:
        pid = ray.get(ray.remote(lambda: __import__("os").getpid()).remote())
        tree = {p.pid for p in psutil.Process().children(recursive=True)} | {psutil.Process().pid}
        listening = subprocess.run(["ss", "-Hltnup"], capture_output=True, text=True, check=True).stdout
        temp_dir = session.temp_dir
    survivors = [p.pid for p in psutil.Process().children(recursive=True)]
    print(json.dumps({"tree": sorted(tree), "worker": pid, "ss": listening, "temp_dir": temp_dir, "survivors": survivors}))
    """
)


def test_local_ray_listens_on_loopback_only():
    result = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["worker"] in report["tree"]

    ray_sockets = []
    for line in report["ss"].splitlines():
        pids = {int(part.split("=")[1].rstrip(")").split(",")[0]) for part in line.split("pid=")[1:] for part in [f"pid={part}"]}
        if pids & set(report["tree"]):
            local_address = line.split()[4]
            ray_sockets.append(local_address)
    assert ray_sockets, report["ss"]
    for address in ray_sockets:
        host = address.rsplit(":", 1)[0].strip("[]")
        assert host in ("127.0.0.1", "::ffff:127.0.0.1", "::1"), f"Ray listens on {address}"
    assert report["survivors"] == []
