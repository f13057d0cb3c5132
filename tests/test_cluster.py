"""Sweeps on a real two-node Ray cluster and a real MLflow tracking server, all on loopback.

The cluster runs in a helper process: ``ray.cluster_utils.Cluster`` with a head and one
worker node, one CPU each, token authentication on. The MLflow server is ``mlflow server``
with a SQLite backend. The sweep is ``python sweep.py -m`` joining both by address, as the
compose setup in docker/ does. Every process the tests start is stopped by PID.

With Ray 2.60, ``ray start --head --node-ip-address=127.0.0.1`` still binds the GCS, the
raylet and the agents to all interfaces (``*`` in ``ss -ltnp``) unless
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``. The helper sets that flag, and each test checks
that nothing it started listens off loopback. The ``ray start`` CLI rejects adding a worker
node while the flag is 0, so the worker node is started through ``Cluster.add_node``.
"""

import json
import math
import os
import re
import secrets
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import requests

from saffu.tracking import METRICS
from sweep_helpers import REPO, job_runs, kill_processes, sweep_command, sweep_env, write_corpus_slice

pytestmark = [pytest.mark.cluster, pytest.mark.corpus, pytest.mark.slow]

SWEEP_TIMEOUT_S = 420
# The smoke grid with one radius: four jobs, two at a time on the two one-CPU nodes.
FOUR_JOBS = ("+sweep=smoke", "model.radius=0")
LOOPBACK_HOSTS = ("127.0.0.1", "::ffff:127.0.0.1", "::1")

# Started as `python -c CLUSTER_HOST ARGS_JSON`. It prints one JSON line with the addresses
# and raylet PIDs, then keeps the cluster running until its stdin closes.
CLUSTER_HOST = textwrap.dedent(
    """
    import json, sys
    from ray.cluster_utils import Cluster

    args = json.loads(sys.argv[1])
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "node_ip_address": "127.0.0.1",
            "include_dashboard": False,
            "ray_client_server_port": args["client_port"],
        },
    )
    worker = cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    cluster.wait_for_nodes(timeout=120)
    raylet = lambda node: node.all_processes["raylet"][0].process.pid
    print(json.dumps({
        "gcs_address": cluster.address,
        "head_raylet": raylet(cluster.head_node),
        "worker_raylet": raylet(worker),
    }), flush=True)
    sys.stdin.read()
    cluster.shutdown()
    """
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(condition, timeout_s: float, description: str, interval_s: float = 0.5):
    """Poll `condition` until it returns a true value, and return that value."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {description}")


# ---------------------------------------------------------------------------------------------
# What the tests start, and what it listens on


@dataclass
class ProcessWatch:
    """Records every descendant of the root processes and their listening sockets, sampled
    from a background thread, so that processes which exit early are checked too."""

    roots: list[psutil.Process] = field(default_factory=list)
    seen: dict[int, psutil.Process] = field(default_factory=dict)
    listeners: set[tuple[str, str]] = field(default_factory=set)
    ancestry: dict[int, set[int]] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def add_root(self, pid: int) -> None:
        self.roots.append(psutil.Process(pid))
        self.sample()

    def sample(self) -> None:
        for root in list(self.roots):
            try:
                family = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
            for process in family:
                self.seen.setdefault(process.pid, process)
                try:
                    self.ancestry.setdefault(process.pid, set()).update(parent.pid for parent in process.parents())
                except psutil.NoSuchProcess:
                    pass
        listening = subprocess.run(["ss", "-Hltnup"], capture_output=True, text=True, check=True).stdout
        for line in listening.splitlines():
            pids = {int(pid) for pid in re.findall(r"pid=(\d+)", line)}
            for pid in pids & set(self.seen):
                self.listeners.add((line.split()[4], self.seen[pid].name() if self.seen[pid].is_running() else "?"))

    def descends_from(self, pid: int, ancestor: int) -> bool:
        return ancestor in self.ancestry.get(pid, set())

    def start(self) -> None:
        def loop() -> None:
            while not self._stop.wait(0.5):
                try:
                    self.sample()
                except (psutil.Error, subprocess.SubprocessError):
                    pass

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def kill_all(self) -> None:
        """SIGKILL every recorded process that still runs; psutil skips reused PIDs."""
        kill_processes(list(self.seen.values()))


def non_loopback(listeners: set[tuple[str, str]]) -> list[tuple[str, str]]:
    return sorted(
        (address, name) for address, name in listeners if address.rsplit(":", 1)[0].strip("[]") not in LOOPBACK_HOSTS
    )


# ---------------------------------------------------------------------------------------------
# The Ray cluster and the MLflow server


@dataclass
class RayCluster:
    process: subprocess.Popen
    gcs_address: str
    client_address: str
    head_raylet: int
    worker_raylet: int
    token: str
    env: dict[str, str]


def ray_environment(temp_root: Path, token: str) -> dict[str, str]:
    """Environment of the cluster and of the sweep driver: token auth, loopback, private temp folder."""
    (temp_root / "ray").mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        # Ray's default temp folder and its ray_current_cluster file are shared by every Ray
        # on the machine, so the cluster gets a private one. Socket paths must stay under
        # 107 characters, so that folder sits directly in /tmp.
        RAY_TMPDIR=str(temp_root),
        RAY_USAGE_STATS_ENABLED="0",
        # MLflow's HTTP client retries a refused connection 7 times with exponential backoff
        # by default (MLflow 3.17), about two minutes in all. Two quick retries hand a server outage on
        # to saffu.tracking.with_retries, which logs each retry to job.log, where the test finds them.
        MLFLOW_HTTP_REQUEST_MAX_RETRIES="2",
        MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1",
        # The Ray workers import saffu from the checkout, as nodes of a real cluster
        # import it from the installed package.
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    )
    return env


def start_cluster(watch: ProcessWatch, log_path: Path) -> RayCluster:
    token = secrets.token_hex(32)
    temp_root = Path(tempfile.mkdtemp(prefix="saffu-cluster-", dir="/tmp"))
    env = ray_environment(temp_root, token)
    client_port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-c", CLUSTER_HOST, json.dumps({"client_port": client_port})],
        env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log_path.open("w"), text=True,
    )
    watch.add_root(process.pid)
    line = process.stdout.readline()
    if not line:
        process.wait(timeout=30)
        raise RuntimeError(f"the Ray cluster did not start (exit status {process.returncode}); see {log_path}")
    info = json.loads(line)
    watch.sample()
    return RayCluster(
        process=process,
        gcs_address=info["gcs_address"],
        client_address=f"ray://127.0.0.1:{client_port}",
        head_raylet=info["head_raylet"],
        worker_raylet=info["worker_raylet"],
        token=token,
        env=env,
    )


def stop_cluster(cluster: RayCluster) -> None:
    """Close the helper's stdin so it shuts the cluster down, then wait for it."""
    try:
        cluster.process.stdin.close()
        cluster.process.wait(timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        cluster.process.kill()
        cluster.process.wait(timeout=30)


@dataclass
class MlflowServer:
    port: int
    store: Path
    artifacts: Path
    log_path: Path
    watch: ProcessWatch
    process: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "mlflow", "server",
                "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
                "--backend-store-uri", f"sqlite:///{self.store}",
                "--artifacts-destination", str(self.artifacts),
            ],
            env=env, stdout=self.log_path.open("a"), stderr=subprocess.STDOUT,
        )
        self.watch.add_root(self.process.pid)
        wait_until(self.healthy, 120, f"the MLflow server on port {self.port}")

    def healthy(self) -> bool:
        try:
            return requests.get(f"{self.uri}/health", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def stop(self) -> None:
        """Stop the server and its worker processes by PID."""
        if self.process is None:
            return
        family = [psutil.Process(self.process.pid)]
        try:
            family += family[0].children(recursive=True)
        except psutil.NoSuchProcess:
            pass
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=20)
        kill_processes(family)
        self.process = None


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, gutenberg_dir: Path) -> Path:
    return write_corpus_slice(gutenberg_dir, tmp_path_factory.mktemp("corpus"))


@pytest.fixture
def watch() -> Iterator[ProcessWatch]:
    watch = ProcessWatch()
    watch.start()
    yield watch
    watch.stop()
    watch.kill_all()


@pytest.fixture
def cluster(watch: ProcessWatch, tmp_path: Path) -> Iterator[RayCluster]:
    cluster = start_cluster(watch, tmp_path / "cluster.log")
    yield cluster
    stop_cluster(cluster)
    ray_temp = cluster.env["RAY_TMPDIR"]
    subprocess.run(["rm", "-rf", ray_temp], check=False)


@pytest.fixture
def mlflow_server(watch: ProcessWatch, tmp_path: Path) -> Iterator[MlflowServer]:
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    server = MlflowServer(free_port(), tmp_path / "mlflow.db", artifacts, tmp_path / "mlflow-server.log", watch)
    server.start()
    yield server
    server.stop()


# ---------------------------------------------------------------------------------------------
# Running a sweep and reading its runs


def start_sweep(
    tmp_path: Path, corpus: Path, cluster: RayCluster, server: MlflowServer, address: str, *overrides: str,
    tracking_uri: str | None = None,
) -> subprocess.Popen:
    command = sweep_command(
        tmp_path, corpus, *FOUR_JOBS, f"ray.address={address}", f"tracking.uri={tracking_uri or server.uri}",
        "hydra.launcher.progress_interval_s=5", *overrides,
    )
    return subprocess.Popen(
        command, cwd=tmp_path, env=sweep_env(extra=cluster.env), stdout=(tmp_path / "sweep.log").open("w"),
        stderr=subprocess.STDOUT, text=True,
    )


def still_running(process: subprocess.Popen, tmp_path: Path) -> None:
    """Fail the test at once when the sweep exited while the test waits for it to reach a state."""
    if process.poll() is not None:
        output = (tmp_path / "sweep.log").read_text()
        pytest.fail(f"the sweep exited with status {process.returncode} too early:\n{output[-6000:]}")


def finish_sweep(process: subprocess.Popen, tmp_path: Path) -> str:
    try:
        process.wait(timeout=SWEEP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        kill_processes([psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)])
        raise
    return (tmp_path / "sweep.log").read_text()


def client_server_logs(cluster: RayCluster) -> str:
    """The Ray client servers' error logs, for the message of a sweep that could not connect."""
    # session_latest links to the session folder, so each log is found twice.
    logs = sorted({log.resolve() for log in Path(cluster.env["RAY_TMPDIR"]).glob("ray/session_*/logs/ray_client_server*.err")})
    return "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}" for log in logs)


def server_client(server: MlflowServer):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=server.uri)
    experiment = client.get_experiment_by_name("saffu")
    assert experiment is not None, "the sweep created no experiment 'saffu' on the server"
    return client, experiment.experiment_id


def running_jobs_with_metrics(server: MlflowServer) -> list:
    """Job runs that are RUNNING on the server and have logged at least one metric."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=server.uri)
    try:
        experiment = client.get_experiment_by_name("saffu")
        if experiment is None:
            return []
        runs = job_runs(client, experiment.experiment_id)
    except Exception:
        return []
    return [run for run in runs if run.info.status == "RUNNING" and run.data.metrics]


def assert_every_job_finished(server: MlflowServer, expected_jobs: int) -> list:
    """Check the server's runs: one FINISHED run with every final metric per job config."""
    client, experiment_id = server_client(server)
    runs = job_runs(client, experiment_id)
    finished = [run for run in runs if run.info.status == "FINISHED"]
    hashes = {run.data.tags["saffu.config_hash"] for run in finished}
    assert len(hashes) == expected_jobs, [(run.info.run_name, run.info.status) for run in runs]
    for run in finished:
        for name in METRICS:
            assert name in run.data.metrics, f"{name} missing in {run.info.run_name}"
            assert math.isfinite(run.data.metrics[name]), f"{name} is not finite in {run.info.run_name}"
        artifacts = {entry.path for entry in client.list_artifacts(run.info.run_id)}
        assert {"config.yaml", "job.log"} <= artifacts, f"artifacts of {run.info.run_name}: {artifacts}"
    parents = client.search_runs([experiment_id], "tags.`saffu.role` = 'sweep'")
    assert [parent.info.status for parent in parents] == ["FINISHED"]
    return runs


# ---------------------------------------------------------------------------------------------
# Tests


def test_sweep_runs_on_both_nodes(tmp_path, corpus, cluster, mlflow_server, watch):
    # The server does not check credentials; the password in the URI must not show anywhere.
    uri_with_password = mlflow_server.uri.replace("http://", "http://alice:s3cret@")
    sweep = start_sweep(tmp_path, corpus, cluster, mlflow_server, cluster.client_address, tracking_uri=uri_with_password)
    watch.add_root(sweep.pid)
    output = finish_sweep(sweep, tmp_path)
    assert sweep.returncode == 0, output[-6000:] + client_server_logs(cluster)
    assert "4 finished, 0 skipped (already finished), 0 failed" in output
    assert "s3cret" not in output
    assert "alice:***@" in output
    client, experiment_id = server_client(mlflow_server)
    (parent,) = client.search_runs([experiment_id], "tags.`saffu.role` = 'sweep'")
    jobs_csv = Path(client.download_artifacts(parent.info.run_id, "jobs.csv", str(tmp_path))).read_text()
    assert "tracking.uri=http://alice:***@" in jobs_csv
    assert "s3cret" not in jobs_csv
    assert "s3cret" not in parent.data.params["sweep.command_line"]

    runs = assert_every_job_finished(mlflow_server, 4)
    assert len(runs) == 4
    worker_pids = [int(run.data.tags["saffu.worker_pid"]) for run in runs]
    on_head = [pid for pid in worker_pids if watch.descends_from(pid, cluster.head_raylet)]
    on_worker = [pid for pid in worker_pids if watch.descends_from(pid, cluster.worker_raylet)]
    assert on_head, f"no job ran on the head node: worker PIDs {worker_pids}"
    assert on_worker, f"no job ran on the worker node: worker PIDs {worker_pids}"
    assert len(on_head) + len(on_worker) == 4

    watch.sample()
    assert watch.listeners, "the watcher saw no listening socket of the cluster or the server"
    assert non_loopback(watch.listeners) == []


def test_cluster_rejects_wrong_token(cluster):
    probe = "import ray; ray.init(address=__import__('sys').argv[1]); print(ray.cluster_resources())"
    env = {**cluster.env, "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    result = subprocess.run(
        [sys.executable, "-c", probe, cluster.gcs_address], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0, result.stdout
    assert "token" in result.stderr.lower(), result.stderr[-3000:]

    env_right = dict(cluster.env)
    result = subprocess.run(
        [sys.executable, "-c", probe, cluster.gcs_address], env=env_right, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "'CPU': 2.0" in result.stdout


def test_worker_node_lost_during_sweep(tmp_path, corpus, cluster, mlflow_server, watch):
    sweep = start_sweep(tmp_path, corpus, cluster, mlflow_server, cluster.gcs_address)
    watch.add_root(sweep.pid)

    def job_on_worker_node() -> list[psutil.Process]:
        still_running(sweep, tmp_path)
        watch.sample()
        try:
            children = psutil.Process(cluster.worker_raylet).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        return [process for process in children if "saffu-job" in " ".join(process.cmdline())]

    wait_until(job_on_worker_node, 240, "a job on the worker node")
    # SIGKILL the raylet and everything under it, as when the node's machine goes down.
    # Killing the raylet alone is not enough: a running task's worker process outlives it
    # long enough to finish the job and hand its result to the driver directly.
    raylet = psutil.Process(cluster.worker_raylet)
    kill_processes([raylet, *raylet.children(recursive=True)])

    output = finish_sweep(sweep, tmp_path)
    runs = assert_every_job_finished(mlflow_server, 4)
    failed = [run for run in runs if run.info.status == "FAILED"]
    assert failed, "no attempt failed, so the node was lost after its job ended"
    assert sweep.returncode == 0, output[-6000:]
    assert "4 finished" in output
    for run in failed:
        assert run.data.tags["saffu.attempt"] == "1"
    retried = {run.data.tags["saffu.config_hash"] for run in failed}
    second_attempts = [
        run for run in runs if run.data.tags["saffu.config_hash"] in retried and run.data.tags["saffu.attempt"] == "2"
    ]
    assert len(second_attempts) == len(retried)
    assert all(run.info.status == "FINISHED" for run in second_attempts)
    assert non_loopback(watch.listeners) == []


def test_tracking_server_restart_during_sweep(tmp_path, corpus, cluster, mlflow_server, watch):
    sweep = start_sweep(tmp_path, corpus, cluster, mlflow_server, cluster.gcs_address)
    watch.add_root(sweep.pid)

    def job_with_metrics() -> list:
        still_running(sweep, tmp_path)
        return running_jobs_with_metrics(mlflow_server)

    wait_until(job_with_metrics, 240, "a running job with metrics", interval_s=1)
    mlflow_server.stop()
    down_since = time.monotonic()
    time.sleep(5)
    assert sweep.poll() is None, "the sweep ended while the tracking server was down"
    mlflow_server.start()
    down_s = time.monotonic() - down_since

    output = finish_sweep(sweep, tmp_path)
    assert sweep.returncode == 0, output[-6000:]
    runs = assert_every_job_finished(mlflow_server, 4)
    assert [run.info.status for run in runs] == ["FINISHED"] * 4, f"server down for {down_s:.0f} s"
    logs = output + "".join(path.read_text() for path in (tmp_path / "multirun").rglob("job.log"))
    assert re.search(r"MLflow \S+ failed \(attempt 1 of \d+", logs), "no write was retried during the outage"
    assert non_loopback(watch.listeners) == []
