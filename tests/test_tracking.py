"""MLflow tracking: URIs, retries, config hashes, and many processes writing to one SQLite store."""

import importlib.util
import logging
import multiprocessing
import socket
import sqlite3
import subprocess
import sys
import time

import pytest
from omegaconf import OmegaConf

from saffu.tracking import (
    RunRecorder,
    TrackingURIError,
    config_hash,
    flatten_config,
    prepare_store,
    redact_override,
    redact_text,
    redact_uri,
    validate_experiment_name,
    validate_tracking_uri,
    with_retries,
)
from sweep_helpers import REPO, read_only

REDACTIONS = [
    ("sqlite:///mlflow.db", "sqlite:///mlflow.db"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("postgresql://alice:s3cret@db.local:5432/mlflow", "postgresql://alice:***@db.local:5432/mlflow"),
    ("https://token123@mlflow.local/", "https://***@mlflow.local/"),
    ("mysql://bob:pw@h/db?password=x&charset=utf8", "mysql://bob:***@h/db?password=***&charset=utf8"),
    # Unencoded "/", "?" and "#" in a password, as SQLAlchemy accepts them.
    ("postgresql://alice:S3cret/PW@127.0.0.1:1/db", "postgresql://alice:***@127.0.0.1:1/db"),
    ("postgresql://alice:a?b#c@db.local/mlflow?sslmode=require", "postgresql://alice:***@db.local/mlflow?sslmode=require"),
    # An "@" in the path after a host without a port is not a credential.
    ("http://mlflow.local/a@b", "http://mlflow.local/a@b"),
    ("s3://bucket/path?token=abc", "s3://bucket/path?token=***"),
    # A query after an SQLite path keeps the path's slashes.
    ("sqlite:///a.db?timeout=5", "sqlite:///a.db?timeout=5"),
    ("sqlite:////tmp/a.db?timeout=5", "sqlite:////tmp/a.db?timeout=5"),
]


@pytest.mark.parametrize(("uri", "expected"), REDACTIONS)
def test_redact_uri_hides_credentials(uri, expected):
    assert redact_uri(uri) == expected


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_validate_uri_rejects_bad_uris(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    text_file = tmp_path / "notes.txt"
    text_file.write_text("a text file, not a database\n")
    cases = [
        ("ftp://host/store", "unsupported scheme 'ftp'"),
        ("sqlite://", "has no database path"),
        ("sqlite:///:memory:", "in-memory database"),
        (f"sqlite:///{tmp_path}/missing/mlflow.db", f"the folder {tmp_path}/missing does not exist"),
        (f"http://127.0.0.1:{free_loopback_port()}", "no MLflow server responds"),
        ("http://user:hunter2@127.0.0.1:1", "user:***@"),
        (f"file://{tmp_path}/mlruns", "MLFLOW_ALLOW_FILE_STORE=true"),
        (f"sqlite:///{text_file}", "is not an SQLite database"),
        (str(tmp_path / "mlflow.db"), f"is a file path, not a URI; for an SQLite store write tracking.uri=sqlite:///{tmp_path}/mlflow.db"),
        ("mlflow.db", "is a file path, not a URI; for an SQLite store write tracking.uri=sqlite:///mlflow.db"),
    ]
    for uri, expected in cases:
        with pytest.raises(TrackingURIError) as caught:
            validate_tracking_uri(uri)
        assert expected in str(caught.value), uri
        assert "hunter2" not in str(caught.value)


def test_missing_database_driver_rejected():
    # A driver that no SQLAlchemy install has, and mysql:// whose default driver (MySQLdb)
    # the project does not install.
    cases = [("postgresql+nosuchdriver://alice:s3cret@127.0.0.1:1/mlflow", "NoSuchModuleError")]
    if importlib.util.find_spec("MySQLdb") is None:
        cases.append(("mysql://alice:s3cret@127.0.0.1:1/mlflow", "install mysqlclient for mysql://"))
    for uri, expected in cases:
        with pytest.raises(TrackingURIError) as caught:
            validate_tracking_uri(uri)
        assert "SQLAlchemy cannot load its database driver" in str(caught.value), uri
        assert expected in str(caught.value), uri
        assert "alice:***@" in str(caught.value), uri
        assert "s3cret" not in str(caught.value), uri


def test_server_that_is_not_mlflow_rejected(tmp_path):
    # A static file server on loopback responds to /health but not to MLflow's REST API.
    (tmp_path / "health").write_text("OK\n")
    port = free_loopback_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        with pytest.raises(TrackingURIError) as caught:
            prepare_store(f"http://127.0.0.1:{port}", "saffu")
    finally:
        server.terminate()
        server.wait(timeout=10)
    assert "MLflow could not open the store" in str(caught.value)
    assert "404" in str(caught.value)


def test_redact_override_hides_uri_password():
    assert redact_override("tracking.uri=postgresql://alice:s3cret@db.local/mlflow") == (
        "tracking.uri=postgresql://alice:***@db.local/mlflow"
    )
    assert redact_override("sweep.optuna.storage=mysql://bob:pw@h/db") == "sweep.optuna.storage=mysql://bob:***@h/db"
    assert redact_override('+tracking.artifact_location="ftp://alice:pw@127.0.0.1:9/art"') == (
        '+tracking.artifact_location="ftp://alice:***@127.0.0.1:9/art"'
    )
    assert redact_override("model.block_size=1,2") == "model.block_size=1,2"
    assert redact_override("-m") == "-m"


def test_redact_text_hides_uri_and_password():
    uri = "postgresql://alice:s3cret@db.local:5432/mlflow"
    text = f"could not connect to {uri}; password 's3cret' rejected"
    assert redact_text(text, uri) == "could not connect to postgresql://alice:***@db.local:5432/mlflow; password '***' rejected"
    assert redact_text(text, "") == text
    slashed = "postgresql://alice:S3cret/PW@db.local/mlflow"
    assert redact_text(f"failed: {slashed}, password S3cret/PW", slashed) == (
        "failed: postgresql://alice:***@db.local/mlflow, password ***"
    )


def test_job_failure_log_hides_password(caplog):
    sys.path.insert(0, str(REPO))
    import sweep

    cfg = OmegaConf.create({"tracking": {"uri": "postgresql://alice:s3cret@db.local:5432/mlflow"}})
    with caplog.at_level(logging.ERROR, logger="sweep"):
        try:
            raise OSError("connection to postgresql://alice:s3cret@db.local:5432/mlflow refused")
        except OSError:
            sweep.log_failure(cfg)
    assert "the job failed" in caplog.text
    assert "Traceback" in caplog.text
    assert "postgresql://alice:***@db.local:5432/mlflow refused" in caplog.text
    assert "s3cret" not in caplog.text


def test_retries_transient_errors_and_logs(caplog):
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise sqlite3.OperationalError("database is locked")
        return "done"

    with caplog.at_level(logging.WARNING, logger="saffu.tracking"):
        assert with_retries(flaky, "log_batch", base_delay_s=0.01) == "done"
    assert len(calls) == 3
    retries = [record for record in caplog.records if "retrying" in record.getMessage()]
    assert len(retries) == 2
    assert "database is locked" in retries[0].getMessage()


def test_retries_stop_on_other_errors():
    calls = []

    def broken():
        calls.append(1)
        raise ValueError("bad metric name")

    with pytest.raises(ValueError):
        with_retries(broken, "log_batch", base_delay_s=0.01)
    assert len(calls) == 1


def test_config_hash_covers_job_settings_only():
    config = {"seed": 0, "model": {"block_size": 4}, "data": {"dir": "/corpus", "cache_dir": "/home/a/.cache"}}
    same = {**config, "data": {"dir": "/corpus", "cache_dir": "/tmp/cache"}, "tracking": {"uri": "x"}, "experiment": "y"}
    assert config_hash(config) == config_hash(same)
    assert config_hash(config) != config_hash({**config, "seed": 1})
    assert config_hash(config) != config_hash({**config, "model": {"block_size": 8}})
    assert config_hash(config) != config_hash({**config, "data": {"dir": "/other", "cache_dir": "/tmp"}})


def test_flatten_config_uses_dotted_keys():
    flat = flatten_config({"model": {"experts": {"kind": "bitcode"}, "layers": 1}, "solver": {"bracket": [1, 2]}})
    assert flat == {"model.experts.kind": "bitcode", "model.layers": 1, "solver.bracket": [1, 2]}


N_WRITERS = 10
N_STEPS = 40
N_PARAMS = 30


def write_one_run(args: tuple) -> str:
    """Log params, a stepped curve and final metrics to one run, as a job process does."""
    spec, run_id, worker = args
    recorder = RunRecorder(spec)
    recorder.log_params(run_id, {f"p{i}": f"{worker}-{i}" for i in range(N_PARAMS)})
    for step in range(N_STEPS):
        recorder.log_metric(run_id, "curve/a", float(step), step)
        recorder.log_metric(run_id, "curve/b", float(worker), step)
    recorder.log_metrics(run_id, {f"final/{i}": float(i) for i in range(20)})
    recorder.log_text(run_id, f"worker {worker}\n", "note.txt")
    recorder.end_run(run_id, "FINISHED")
    return run_id


def test_parallel_writers_lose_nothing(tmp_path):
    db = tmp_path / "mlflow.db"
    spec = prepare_store(f"sqlite:///{db}", "concurrency")
    recorder = RunRecorder(spec)
    parent = recorder.create_run("parent", {"saffu.role": "sweep"})
    run_ids = [
        recorder.create_run(f"job-{i}", {"saffu.role": "job", "mlflow.parentRunId": parent}) for i in range(N_WRITERS)
    ]
    assert sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone()[0] == "wal"

    context = multiprocessing.get_context("spawn")
    with context.Pool(N_WRITERS) as pool:
        done = pool.map(write_one_run, [(spec, run_id, i) for i, run_id in enumerate(run_ids)])
    assert sorted(done) == sorted(run_ids)

    client = recorder.client
    runs = client.search_runs([spec.experiment_id], "tags.`saffu.role` = 'job'", max_results=100)
    assert len(runs) == N_WRITERS
    for run in runs:
        worker = int(run.info.run_name.split("-")[1])
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parent
        assert run.data.params == {f"p{i}": f"{worker}-{i}" for i in range(N_PARAMS)}
        assert len([k for k in run.data.metrics if k.startswith("final/")]) == 20
        for key in ("curve/a", "curve/b"):
            history = client.get_metric_history(run.info.run_id, key)
            assert sorted(metric.step for metric in history) == list(range(N_STEPS)), key
        assert [item.path for item in client.list_artifacts(run.info.run_id)] == ["note.txt"]


def test_prepare_store_is_idempotent(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = prepare_store(uri, "saffu")
    second = prepare_store(uri, "saffu")
    assert first.experiment_id == second.experiment_id
    assert (tmp_path / "mlflow.db").exists()


def test_config_hash_skips_neutral_new_settings():
    config = {"seed": 0, "train": {"epochs": 3, "lr": 0.001}}
    with_default = {"seed": 0, "train": {"epochs": 3, "lr": 0.001, "eval_interval_tokens": None}}
    with_value = {"seed": 0, "train": {"epochs": 3, "lr": 0.001, "eval_interval_tokens": 5000}}
    assert config_hash(with_default) == config_hash(config)
    assert config_hash(with_value) != config_hash(config)


@pytest.mark.parametrize("name", ["", "   ", None])
def test_empty_experiment_name_rejected(name):
    with pytest.raises(TrackingURIError, match="set experiment=NAME"):
        validate_experiment_name(name)


def test_remote_driver_alive_by_heartbeat():
    from saffu.tracking import HEARTBEAT_TIMEOUT_S, driver_is_alive

    elsewhere = {"saffu.driver_host": "not-" + socket.gethostname(), "saffu.driver_pid": "1"}
    now = 1_000_000.0
    assert driver_is_alive({**elsewhere, "saffu.driver_heartbeat": f"{now - 40:.0f}"}, now=now) is True
    assert driver_is_alive({**elsewhere, "saffu.driver_heartbeat": f"{now - HEARTBEAT_TIMEOUT_S - 1:.0f}"}, now=now) is False
    assert driver_is_alive(elsewhere, now=now) is None
    # On this host the process is checked, and the heartbeat tag is ignored.
    this_host = {"saffu.driver_host": socket.gethostname(), "saffu.driver_heartbeat": f"{now:.0f}"}
    assert driver_is_alive({**this_host, **_this_process()}, now=now) is True
    assert driver_is_alive({**this_host, "saffu.driver_pid": str(2**22 + 7), "saffu.driver_start_time": "0"}, now=now) is False


def _this_process() -> dict[str, str]:
    from saffu.tracking import driver_identity

    identity = driver_identity()
    return {key: identity[key] for key in ("saffu.driver_pid", "saffu.driver_start_time")}


def test_saved_configs_hide_uri_password(tmp_path):
    """A single job saves .hydra/*.yaml and a sweep multirun.yaml before either checks its
    config; both stop on the missing corpus after the files are written."""
    missing_corpus = ["data=folder", f"data.dir={tmp_path / 'missing'}"]
    single = subprocess.run(
        [
            sys.executable, str(REPO / "sweep.py"), "tracking.uri=http://alice:s3cret@127.0.0.1:9",
            *missing_corpus, f"hydra.run.dir={tmp_path / 'single'}",
        ],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    multi = subprocess.run(
        [
            sys.executable, str(REPO / "sweep.py"), "-m", "+sweep=smoke", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "+tracking.artifact_location=s3://alice:s3cret@127.0.0.1:9/artifacts",
            *missing_corpus, f"hydra.sweep.dir={tmp_path / 'multi'}",
        ],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert single.returncode == 2, single.stderr[-3000:]
    assert multi.returncode == 2, multi.stderr[-3000:]

    saved = sorted((tmp_path / "single" / ".hydra").glob("*.yaml")) + [tmp_path / "multi" / "multirun.yaml"]
    assert [path.name for path in saved] == ["config.yaml", "hydra.yaml", "overrides.yaml", "multirun.yaml"]
    for path in saved:
        assert "s3cret" not in path.read_text(), path
        assert "alice:***@127.0.0.1:9" in path.read_text(), path
    for result in (single, multi):
        assert "s3cret" not in result.stdout + result.stderr


def test_relaunch_refused_while_driver_alive(tmp_path):
    from saffu.planning import SweepAlreadyRunning, open_sweep_run
    from saffu.tracking import RunRecorder

    recorder = RunRecorder(prepare_store(f"sqlite:///{tmp_path / 'mlflow.db'}", "relaunch"))
    parent = open_sweep_run(recorder, "sweep-1", "grid", {}, "abc")
    started = recorder.create_run("job-0", {"saffu.role": "job", "mlflow.parentRunId": parent, "saffu.worker_pid": "1"})
    queued = recorder.create_run("job-1", {"saffu.role": "job", "mlflow.parentRunId": parent})

    # This process is the driver, so it is alive on this host.
    with pytest.raises(SweepAlreadyRunning) as local:
        open_sweep_run(recorder, "sweep-1", "grid", {}, "abc")
    assert f"on host {socket.gethostname()};" in str(local.value)
    assert "heartbeat" not in str(local.value)

    # A driver on another host counts as alive while its heartbeat is recent.
    other_host = {"saffu.driver_host": "not-" + socket.gethostname()}
    recorder.set_tags(parent, {**other_host, "saffu.driver_heartbeat": f"{time.time() - 60:.0f}"})
    with pytest.raises(SweepAlreadyRunning) as remote:
        open_sweep_run(recorder, "sweep-1", "grid", {}, "abc")
    assert "counts as stopped 5 minutes after its last heartbeat" in str(remote.value)

    # With an old heartbeat the relaunch resumes in the same parent run and closes the
    # earlier launch's runs: KILLED for the started job, deleted for the queued one.
    recorder.set_tags(parent, {**other_host, "saffu.driver_heartbeat": f"{time.time() - 400:.0f}"})
    assert open_sweep_run(recorder, "sweep-1", "grid", {}, "abc") == parent
    assert recorder.get_run(started).info.status == "KILLED"
    assert recorder.get_run(queued).info.lifecycle_stage == "deleted"
    assert recorder.get_run(parent).data.tags["saffu.driver_host"] == socket.gethostname()


class ClaimingTasks:
    """Stands in for JobTasks without Ray: claims and releases real runs in the store, and
    records the jobs it would start."""

    def __init__(self, recorder, parent_run_id):
        from saffu.launch import SweepSummary

        self.recorder = recorder
        self.parent_run_id = parent_run_id
        self.summary = SweepSummary()
        self.submitted = []

    def claim(self, job, tags=None):
        from saffu.launch import create_job_run

        return create_job_run(self.recorder, job, 1, self.parent_run_id, "sweep-b", "abc")

    def release(self, run_id):
        self.recorder.end_run(run_id, "KILLED")
        self.recorder.delete_run(run_id)

    def submit(self, job, run_id=None):
        self.submitted.append((job.config_hash, run_id))


def _sweep_parent(recorder, name):
    from saffu.tracking import driver_identity

    return recorder.create_run(name, {"saffu.role": "sweep", **driver_identity()})


def _job(index, config_hash):
    from saffu.launch import JobSpec

    return JobSpec(index, f"job {config_hash}", [], {"model": {"block_size": index}}, config_hash, ".")


def test_earlier_claim_wins_between_live_sweeps(tmp_path):
    from saffu.launch import configs_running_elsewhere, create_job_run
    from saffu.tracking import RunRecorder

    recorder = RunRecorder(prepare_store(f"sqlite:///{tmp_path / 'mlflow.db'}", "claims"))
    first, second = _sweep_parent(recorder, "a"), _sweep_parent(recorder, "b")
    first_claim = create_job_run(recorder, _job(0, "config-x"), 1, first, "sweep-a", "abc")
    time.sleep(0.01)
    second_claim = create_job_run(recorder, _job(0, "config-x"), 1, second, "sweep-b", "abc")

    # Without claims each sweep finds the other running the config.
    assert configs_running_elsewhere(recorder, {"config-x"}, first) == {"config-x"}
    assert configs_running_elsewhere(recorder, {"config-x"}, second) == {"config-x"}
    # With their claims both agree that the first claim wins.
    assert configs_running_elsewhere(recorder, {"config-x"}, first, {"config-x": first_claim}) == set()
    assert configs_running_elsewhere(recorder, {"config-x"}, second, {"config-x": second_claim}) == {"config-x"}


def test_start_skips_configs_finished_since_planning(tmp_path):
    from saffu.launch import _start_or_wait, create_job_run
    from saffu.tracking import RunRecorder

    recorder = RunRecorder(prepare_store(f"sqlite:///{tmp_path / 'mlflow.db'}", "claims"))
    other = _sweep_parent(recorder, "a")
    finished = create_job_run(recorder, _job(0, "config-x"), 1, other, "sweep-a", "abc")
    recorder.end_run(finished, "FINISHED")
    create_job_run(recorder, _job(1, "config-y"), 1, other, "sweep-a", "abc")
    tasks = ClaimingTasks(recorder, _sweep_parent(recorder, "b"))

    jobs = [_job(0, "config-x"), _job(1, "config-y"), _job(2, "config-z")]
    started, waiting = _start_or_wait(tasks, jobs, tasks.parent_run_id)
    assert [job.config_hash for job in started] == ["config-z"]
    assert [job.config_hash for job in waiting] == ["config-y"]
    assert [job.config_hash for job in tasks.summary.skipped] == ["config-x"]
    assert tasks.summary.finished_elsewhere == 1
    # The released claims are deleted, and the started job runs in its claimed run.
    (config, run_id), = tasks.submitted
    assert config == "config-z"
    assert recorder.get_run(run_id).info.status == "RUNNING"
    own = recorder.search(f"tags.`mlflow.parentRunId` = '{tasks.parent_run_id}'")
    assert [run.info.run_id for run in own] == [run_id]


def test_finished_sweep_parent_closed(tmp_path):
    """A parent run left RUNNING by a driver killed after its last job is closed FINISHED by
    the relaunch that finds nothing to do, and one whose driver is alive is left alone."""
    from saffu.planning import close_stale_sweep_run, open_sweep_run
    from saffu.tracking import RunRecorder

    recorder = RunRecorder(prepare_store(f"sqlite:///{tmp_path / 'mlflow.db'}", "stale"))
    parent = open_sweep_run(recorder, "sweep-1", "grid", {}, "abc")
    close_stale_sweep_run(recorder, "sweep-1")
    assert recorder.get_run(parent).info.status == "RUNNING"  # This process, its driver, is alive.

    dead = {"saffu.driver_host": "not-" + socket.gethostname(), "saffu.driver_heartbeat": f"{time.time() - 400:.0f}"}
    recorder.set_tags(parent, dead)
    close_stale_sweep_run(recorder, "sweep-1")
    assert recorder.get_run(parent).info.status == "FINISHED"


def test_killed_store_creation_leaves_no_broken_store(tmp_path):
    """A driver killed while MLflow creates a new SQLite store's tables leaves either no
    store or a whole one, so the next launch opens it."""
    from mlflow.tracking import MlflowClient

    script = (
        "import sys\n"
        "from saffu.tracking import prepare_store\n"
        "print('creating', flush=True)\n"
        "prepare_store(sys.argv[1], 'saffu')\n"
    )
    for attempt, delay in enumerate((0.3, 0.8, 1.3, 1.8, 2.5)):
        uri = f"sqlite:///{tmp_path / f'store{attempt}.db'}"
        child = subprocess.Popen([sys.executable, "-c", script, uri], stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "creating"
        time.sleep(delay)
        child.kill()
        child.wait(timeout=30)
        spec = prepare_store(uri, "saffu")
        assert MlflowClient(tracking_uri=uri).get_experiment(spec.experiment_id).name == "saffu"
    assert not list(tmp_path.glob(".*.creating"))


@pytest.mark.parametrize("suffix", ["", "-wal", ".lock"])
def test_read_only_store_file_rejected(tmp_path, suffix):
    """A store whose database, write-ahead log or lock file cannot be written is rejected
    before MLflow's first write, which would fail only after retries."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    prepare_store(uri, "saffu")
    part = tmp_path / f"mlflow.db{suffix}"
    part.touch()
    with read_only(part):
        with pytest.raises(TrackingURIError) as caught:
            validate_tracking_uri(uri)
    assert str(caught.value) == (
        f"tracking.uri={uri}: {part} is read-only; make it writable (chmod u+w {part}) "
        "or copy the store to a writable file"
    )
    validate_tracking_uri(uri)
