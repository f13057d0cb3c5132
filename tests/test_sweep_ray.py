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


def test_join_retries_then_raises(monkeypatch, caplog):
    """A ray:// address whose listener is no Ray client server: every attempt fails, and the
    session raises RayJoinError naming the address after JOIN_ATTEMPTS attempts."""
    import socket
    import threading

    import ray
    import ray.util.client.worker as client_worker

    from saffu import launch

    # Ray's client waits 5 s, then up to 30 s, for a channel. One second keeps the test short.
    monkeypatch.setattr(client_worker, "INITIAL_TIMEOUT_SEC", 1)
    monkeypatch.setattr(client_worker, "MAX_TIMEOUT_SEC", 1)
    monkeypatch.setattr(launch, "JOIN_RETRY_S", 0.1)
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        accepted = []

        def accept_and_close() -> None:
            while True:
                try:
                    connection, _ = listener.accept()
                except OSError:
                    return
                accepted.append(connection)
                connection.close()

        threading.Thread(target=accept_and_close, daemon=True).start()
        address = f"ray://127.0.0.1:{port}"
        with pytest.raises(launch.RayJoinError) as raised, caplog.at_level("WARNING", logger="saffu.launch"):
            launch.RaySession(launch.RaySettings(address=address)).__enter__()

    message = str(raised.value)
    assert message.startswith(f"failed to join the Ray cluster at ray.address={address!r} after {launch.JOIN_ATTEMPTS} attempts")
    assert "leave ray.address unset" in message
    retries = [record for record in caplog.records if "trying again" in record.getMessage()]
    assert len(retries) == launch.JOIN_ATTEMPTS - 1
    assert len(accepted) >= launch.JOIN_ATTEMPTS
    assert not ray.is_initialized()
