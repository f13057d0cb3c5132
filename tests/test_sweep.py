"""End-to-end sweeps: `python sweep.py -m` as a subprocess, real Ray on loopback, real MLflow store."""

import math
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from saffu.tracking import METRICS

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from sweep_throughput import parse_launches  # noqa: E402
from sweep_helpers import (
    INTERRUPTED,
    REPO,
    SMALL_JOB,
    count_finished_jobs,
    count_job_runs,
    deleted_job_runs,
    job_runs,
    kill_processes,
    run_sweep,
    signal_after_start,
    start_sweep,
    stop_if_running,
    sweep_command,
    sweep_env,
    write_corpus_slice,
    wait_for,
    write_gated_job,
)

pytestmark = [pytest.mark.corpus, pytest.mark.slow]

BP_ONLY_METRICS = tuple(name.replace("finetune/", "bp_only/") for name in METRICS if name.startswith("finetune/"))

# Four jobs: block size x radius, one-hot experts, one layer.
FOUR_JOBS = ("model.block_size=1,2", "model.radius=0,4", "model/experts=onehot", "model.layers=1")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, gutenberg_dir: Path) -> Path:
    return write_corpus_slice(gutenberg_dir, tmp_path_factory.mktemp("corpus"))


def mlflow_client(tmp_path: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    return client, client.get_experiment_by_name("saffu").experiment_id


def test_smoke_sweep_tracks_every_job(tmp_path, corpus):
    assert not (tmp_path / "mlflow.db").exists()
    # Eight CPUs for Ray on a 2-core machine, so all eight jobs log to the store at once.
    result = run_sweep(tmp_path, corpus, "+sweep=smoke", "ray.num_cpus=8")
    assert result.returncode == 0, result.stdout[-6000:]
    assert "8 finished, 0 skipped (already finished), 0 failed" in result.stdout
    assert "sweep progress:" in result.stdout
    (launch,) = parse_launches(result.stdout.splitlines())
    assert launch.completed
    assert (launch.submitted, launch.finished, launch.failed) == (8, 8, 0)

    client, experiment_id = mlflow_client(tmp_path)
    parents = client.search_runs([experiment_id], "tags.`saffu.role` = 'sweep'")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["saffu.sweep_name"] == "smoke"

    runs = job_runs(client, experiment_id)
    assert len(runs) == 8
    assert len({run.data.tags["saffu.config_hash"] for run in runs}) == 8
    combos = {(run.data.params["model.block_size"], run.data.params["model.radius"], run.data.params["model.experts.kind"]) for run in runs}
    assert len(combos) == 8
    for run in runs:
        assert run.info.status == "FINISHED", run.info.run_name
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["saffu.sweep_id"] == parent.data.tags["saffu.sweep_id"]
        assert run.data.tags["saffu.git_commit"]
        assert run.data.params["data.max_train_tokens"] == "20000"
        assert run.data.params["train.epochs"] == "1"
        assert "sweep.grid" not in run.data.params
        assert not any(key.startswith(("hydra.", "ray.", "tracking.")) for key in run.data.params)
        for name in (*METRICS, *BP_ONLY_METRICS):
            assert name in run.data.metrics, f"{name} missing in {run.info.run_name}"
            assert math.isfinite(run.data.metrics[name]), f"{name} is not finite in {run.info.run_name}"
        assert any(name.startswith("n_params/") for name in run.data.metrics)
        curve = client.get_metric_history(run.info.run_id, "finetune/epoch_val_ppl")
        steps = [metric.step for metric in curve]
        assert steps, f"no per-epoch curve in {run.info.run_name}"
        assert len(steps) == len(set(steps)), steps
        artifacts = {item.path for item in client.list_artifacts(run.info.run_id)}
        assert "config.yaml" in artifacts
        assert "traceback.txt" not in artifacts


def test_sweep_isolates_failures(tmp_path, corpus):
    (tmp_path / "faulty_job.py").write_text(textwrap.dedent(
        """
        import os
        import signal
        from pathlib import Path

        from saffu.job import run_job as real_run_job


        def run_job(cfg, log_metric):
            if cfg.model.block_size == 2 and cfg.model.radius == 0:
                raise ValueError("injected failure for block_size=2 radius=0")
            if cfg.model.block_size == 1 and cfg.model.radius == 4:
                marker = Path(os.environ["FAULT_MARKER_DIR"]) / "worker-killed"
                if not marker.exists():
                    marker.touch()
                    os.kill(os.getpid(), signal.SIGKILL)
            return real_run_job(cfg, log_metric=log_metric)
        """
    ))
    result = run_sweep(
        tmp_path, corpus, *FOUR_JOBS, "train.bp_only=false", "ray.num_cpus=2",
        "hydra.launcher.job_function=faulty_job:run_job",
        pythonpath=tmp_path, env={"FAULT_MARKER_DIR": str(tmp_path)},
    )
    assert result.returncode == 1, result.stdout[-6000:]
    assert "3 finished, 0 skipped (already finished), 1 failed" in result.stdout
    assert "injected failure" in result.stdout
    assert (tmp_path / "worker-killed").exists()

    client, experiment_id = mlflow_client(tmp_path)
    runs = job_runs(client, experiment_id)
    by_config: dict[tuple[str, str], list] = {}
    for run in runs:
        by_config.setdefault((run.data.params["model.block_size"], run.data.params["model.radius"]), []).append(run)

    (raised,) = by_config[("2", "0")]
    assert raised.info.status == "FAILED"
    traceback_text = client.download_artifacts(raised.info.run_id, "traceback.txt", str(tmp_path))
    assert "injected failure" in Path(traceback_text).read_text()

    killed = sorted(by_config[("1", "4")], key=lambda run: int(run.data.tags["saffu.attempt"]))
    assert [run.info.status for run in killed] == ["FAILED", "FINISHED"]
    crash_text = Path(client.download_artifacts(killed[0].info.run_id, "traceback.txt", str(tmp_path / "crash"))).read_text()
    assert "worker process died" in crash_text

    for key in (("1", "0"), ("2", "4")):
        (run,) = by_config[key]
        assert run.info.status == "FINISHED"
    parent = client.search_runs([experiment_id], "tags.`saffu.role` = 'sweep'")[0]
    assert parent.info.status == "FAILED"


@pytest.fixture()
def ray_temp_dir():
    """A short folder for Ray's temp files (its socket paths must stay under 107 characters),
    removed afterwards because a SIGKILLed driver cannot remove its own."""
    folder = tempfile.mkdtemp(prefix="saffu-test-")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_resume_after_driver_sigkill(tmp_path, corpus, ray_temp_dir):
    command = sweep_command(
        tmp_path, corpus, *FOUR_JOBS, "train.bp_only=false", "ray.num_cpus=1", f"ray.temp_dir={ray_temp_dir}"
    )
    log_file = (tmp_path / "first.log").open("w")
    driver = subprocess.Popen(command, cwd=tmp_path, env=sweep_env(), stdout=log_file, stderr=subprocess.STDOUT)
    tree: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 300
        while count_finished_jobs(tmp_path / "mlflow.db") < 1:
            assert driver.poll() is None, (tmp_path / "first.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "no job finished within 300 s"
            time.sleep(1)
        tree = [psutil.Process(driver.pid), *psutil.Process(driver.pid).children(recursive=True)]
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            tree = [psutil.Process(driver.pid), *psutil.Process(driver.pid).children(recursive=True)]
            driver.kill()
        time.sleep(3)
        # Ray's agents outlive a SIGKILLed driver; stop the ones this test started.
        kill_processes(tree)
        log_file.close()
    finished_before = count_finished_jobs(tmp_path / "mlflow.db")
    assert 1 <= finished_before < 4

    second = subprocess.run(command, cwd=tmp_path, env=sweep_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=420)
    assert second.returncode == 0, second.stdout[-6000:]
    assert f"resuming: {finished_before} of 4 jobs already have a FINISHED run" in second.stdout

    # The driver's logs of both launches, read as benchmarks/sweep_throughput.py reads them.
    launches = parse_launches([*(tmp_path / "first.log").read_text().splitlines(), *second.stdout.splitlines()])
    assert len(launches) == 2
    assert not launches[0].completed
    assert launches[0].submitted == 4
    assert launches[0].finished <= finished_before
    assert launches[1].completed
    assert launches[1].skipped == finished_before
    assert launches[1].finished == 4 - finished_before
    assert launches[1].seconds > 0

    client, experiment_id = mlflow_client(tmp_path)
    runs = job_runs(client, experiment_id)
    finished = [run for run in runs if run.info.status == "FINISHED"]
    hashes = [run.data.tags["saffu.config_hash"] for run in finished]
    assert len(hashes) == 4
    assert len(set(hashes)) == 4
    assert all(run.info.status in ("FINISHED", "KILLED") for run in runs)
    # The relaunch closed the first launch's unfinished runs: KILLED where the job had
    # started in a worker, deleted where it had not.
    killed = [run for run in runs if run.info.status == "KILLED"]
    deleted = deleted_job_runs(client, experiment_id)
    assert len(killed) + len(deleted) == 4 - finished_before
    assert all("saffu.worker_pid" in run.data.tags for run in killed)
    assert all("saffu.worker_pid" not in run.data.tags for run in deleted)
    assert all(run.info.status == "KILLED" for run in deleted)
    parents = client.search_runs([experiment_id], "tags.`saffu.role` = 'sweep'")
    assert len(parents) == 1
    assert parents[0].info.status == "FINISHED"
    assert all(run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for run in runs)


def test_sigterm_stops_driver_cleanly(tmp_path, corpus, ray_temp_dir):
    command = sweep_command(
        tmp_path, corpus, *FOUR_JOBS, "train.bp_only=false", "ray.num_cpus=1", f"ray.temp_dir={ray_temp_dir}"
    )
    driver = subprocess.Popen(command, cwd=tmp_path, env=sweep_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while not list((tmp_path / "multirun").rglob("job.log")):
            assert driver.poll() is None, driver.stdout.read()[-4000:]
            assert time.monotonic() < deadline, "no job started within 300 s"
            time.sleep(1)
        driver.send_signal(signal.SIGTERM)
        output, _ = driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            kill_processes([psutil.Process(driver.pid), *psutil.Process(driver.pid).children(recursive=True)])
    assert driver.returncode in INTERRUPTED, output[-4000:]
    assert "interrupted; relaunch the same command" in output
    assert "SIGTERM received" not in output  # Ray's native handler, which aborts the process, did not run.
    leftovers = [p for p in psutil.process_iter(["cmdline"]) if ray_temp_dir in " ".join(p.info["cmdline"] or [])]
    assert leftovers == []

    client, experiment_id = mlflow_client(tmp_path)
    (parent,) = client.search_runs([experiment_id], "tags.`saffu.role` = 'sweep'")
    assert parent.info.status == "KILLED"
    runs = job_runs(client, experiment_id)
    assert runs
    assert all(run.info.status in ("FINISHED", "KILLED") for run in runs)
    # One job slot: the queued jobs never started, so their runs were deleted, not kept empty.
    deleted = deleted_job_runs(client, experiment_id)
    assert len(runs) + len(deleted) == 4
    assert len(deleted) >= 2
    assert all("saffu.worker_pid" in run.data.tags for run in runs)
    assert all("saffu.worker_pid" not in run.data.tags for run in deleted)
    assert all(run.info.status == "KILLED" for run in deleted)


def one_slot_command(tmp_path: Path, corpus: Path, ray_temp_dir: str) -> list[str]:
    """Return the command of a sweep of FOUR_JOBS without bp-only, one job at a time."""
    return sweep_command(
        tmp_path, corpus, *FOUR_JOBS, "train.bp_only=false", "ray.num_cpus=1", f"ray.temp_dir={ray_temp_dir}"
    )


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def test_signal_during_ray_start_stops_cleanly(tmp_path, corpus, ray_temp_dir, signum):
    """SIGTERM or Ctrl-C while the driver starts its local Ray stops the sweep with status
    130 and closes everything. Ray's start-up takes about ten seconds after the parent run
    line here, and a signal sent later must give the same result. Left to Ray's start-up
    code, SIGTERM exits with status 15, and a Ctrl-C is caught so the sweep goes on."""
    log_path = tmp_path / "driver.log"
    driver = start_sweep(one_slot_command(tmp_path, corpus, ray_temp_dir), tmp_path, log_path)
    try:
        wait_for(lambda: "): parent run " in log_path.read_text(), driver, log_path, "no parent run was created")
        time.sleep(2)
        driver.send_signal(signum)
        driver.wait(timeout=120)
    finally:
        stop_if_running(driver)
    output = log_path.read_text()
    assert driver.returncode in INTERRUPTED, output[-4000:]
    assert "interrupted; relaunch the same command" in output
    assert list(Path(ray_temp_dir).iterdir()) == []
    leftovers = [p for p in psutil.process_iter(["cmdline"]) if ray_temp_dir in " ".join(p.info["cmdline"] or [])]
    assert leftovers == []
    client, experiment_id = mlflow_client(tmp_path)
    (parent,) = client.search_runs([experiment_id], "tags.`saffu.role` = 'sweep'")
    assert parent.info.status == "KILLED"
    assert all(run.info.status != "RUNNING" for run in job_runs(client, experiment_id))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def test_signal_while_planning_stops_cleanly(tmp_path, corpus, signum):
    """SIGTERM or Ctrl-C while the driver composes and checks the job configs: status 130,
    one line and no traceback, and no job run."""
    command = sweep_command(tmp_path, corpus, *FOUR_JOBS, "train.bp_only=false", "ray.num_cpus=1")
    log_path = tmp_path / "driver.log"
    driver = start_sweep(command, tmp_path, log_path)
    try:
        wait_for(lambda: "sweep roadmap: 4 jobs" in log_path.read_text(), driver, log_path, "the sweep did not start")
        driver.send_signal(signum)
        driver.wait(timeout=120)
    finally:
        stop_if_running(driver)
    output = log_path.read_text()
    assert driver.returncode in INTERRUPTED, output[-4000:]
    assert "sweep interrupted; relaunch the same command to run what is missing" in output
    assert "Traceback" not in output
    assert count_job_runs(tmp_path / "mlflow.db") == 0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def test_signal_while_starting_stops_cleanly(tmp_path, corpus, signum):
    """SIGTERM or Ctrl-C while `python sweep.py -m` imports Hydra, Ray and MLflow and Hydra
    composes the config: status 130 and one line, no traceback, and no job run. With
    Python's defaults, SIGTERM ends such a driver with status 143 and Ctrl-C in a traceback."""
    command = sweep_command(tmp_path, corpus, *FOUR_JOBS, "+sweep.dry_run=true")
    for delay in (0.1, 0.2, 0.35):
        log_path = tmp_path / "driver.log"
        driver = start_sweep(command, tmp_path, log_path)
        try:
            signal_after_start(driver, signum, delay)
            driver.wait(timeout=120)
        finally:
            stop_if_running(driver)
        output = log_path.read_text()
        assert driver.returncode in INTERRUPTED, (delay, output[-4000:])
        assert "Traceback" not in output, delay
        assert output.strip().splitlines()[-1].endswith((
            "error: interrupted while starting; nothing was run",
            "error: interrupted; run the same command again to run what is missing",
            "sweep interrupted; relaunch the same command to run what is missing",
        )), (delay, output)
        store = tmp_path / "mlflow.db"
        assert not store.exists() or count_job_runs(store) == 0, delay


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1], ids=["sigterm", "ctrl-c", "drain"])
def test_signal_stops_single_job(tmp_path, corpus, signum):
    """SIGTERM or Ctrl-C while `python sweep.py` runs one job: status 130, one line, and
    the job's run KILLED, not left RUNNING. SIGUSR1 (drain) lets the job finish."""
    # Ten epochs that early stopping does not end, so that the job runs for several seconds
    # after it starts even with the token and count caches filled.
    command = [
        sys.executable, str(REPO / "sweep.py"), "data=folder", f"data.dir={corpus}", *SMALL_JOB,
        "train.epochs=10", "train.patience=10",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"hydra.run.dir={tmp_path / 'outputs'}",
    ]
    log_path = tmp_path / "job.log"
    job = start_sweep(command, tmp_path, log_path)
    try:
        wait_for(lambda: "running one job" in log_path.read_text(), job, log_path, "the job did not start")
        time.sleep(1)
        job.send_signal(signum)
        job.wait(timeout=300)
    finally:
        stop_if_running(job)
    output = log_path.read_text()
    run_id = re.search(r"running one job \(\d+ parameters\) in run (\w+)", output)[1]
    client, _ = mlflow_client(tmp_path)
    assert "Traceback" not in output
    if signum == signal.SIGUSR1:
        assert job.returncode == 0, output[-4000:]
        assert client.get_run(run_id).info.status == "FINISHED"
        return
    assert job.returncode in INTERRUPTED, output[-4000:]
    assert f"the job was interrupted; its run {run_id} is marked KILLED" in output
    assert client.get_run(run_id).info.status == "KILLED"


def test_interrupt_found_behind_composition_error():
    """A Ctrl-C inside OmegaConf reaches the sweeper as this chain: a ConfigCompositionException
    from a ConfigKeyError from an AttributeError, which the half-built config node caused
    while the KeyboardInterrupt was handled. The interrupt is found behind the chain, and
    none is found behind a plain composition error."""
    from hydra.errors import ConfigCompositionException
    from omegaconf.errors import ConfigKeyError

    from saffu.signals import interrupt_behind

    def composition_error_during(interrupt: BaseException | None) -> ConfigCompositionException:
        try:
            try:
                try:
                    if interrupt is not None:
                        raise interrupt
                    raise AttributeError("'NoneType' object has no attribute '_invalidate_flags_cache'")
                finally:
                    if interrupt is not None:
                        raise AttributeError("'NoneType' object has no attribute '_invalidate_flags_cache'")
            except AttributeError as error:
                raise ConfigKeyError(str(error)) from error
        except ConfigKeyError as error:
            try:
                raise ConfigCompositionException() from error
            except ConfigCompositionException as composed:
                return composed

    ctrl_c = KeyboardInterrupt()
    assert interrupt_behind(composition_error_during(ctrl_c)) is ctrl_c
    assert interrupt_behind(composition_error_during(None)) is None
    assert interrupt_behind(ctrl_c) is ctrl_c


def test_sigusr1_before_jobs_start_runs_none(tmp_path, corpus, ray_temp_dir):
    """SIGUSR1 while the driver still checks its configs: no job starts and no job run is
    created, and the driver exits with status 75."""
    log_path = tmp_path / "driver.log"
    driver = start_sweep(one_slot_command(tmp_path, corpus, ray_temp_dir), tmp_path, log_path)
    try:
        wait_for(lambda: "sweep roadmap: 4 jobs" in log_path.read_text(), driver, log_path, "the sweep did not start")
        driver.send_signal(signal.SIGUSR1)
        driver.wait(timeout=300)
    finally:
        stop_if_running(driver)
    output = log_path.read_text()
    assert driver.returncode == 75, output[-4000:]
    assert "draining on request before any job started: 4 jobs are left for the next launch" in output
    client, experiment_id = mlflow_client(tmp_path)
    assert job_runs(client, experiment_id) == []
    assert deleted_job_runs(client, experiment_id) == []


def test_drain_signal_before_sweep_is_kept():
    """A SIGUSR1 that arrives after handle_stop_signals and before the sweep's drain block
    neither ends the process nor gets lost."""
    import os

    from saffu import launch, signals

    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)}
    try:
        signals.handle_stop_signals(drain=True)
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.1)
        with launch.drain_on_signal() as drain:
            assert drain.is_set()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        signals.drain_requested.clear()


def test_sigusr1_drains_then_relaunch_completes(tmp_path, corpus, ray_temp_dir):
    """SIGUSR1 while the first of four jobs runs in the one job slot: that job finishes, the
    three queued ones never start and leave no run, the driver exits with status 75, and
    the relaunch runs exactly those three."""
    write_gated_job(tmp_path)
    command = sweep_command(
        tmp_path, corpus, *FOUR_JOBS, "train.bp_only=false", "ray.num_cpus=1", f"ray.temp_dir={ray_temp_dir}",
        "hydra.launcher.progress_interval_s=2",
    )
    first_log = tmp_path / "first.log"
    gated = [*command, "hydra.launcher.job_function=gated_job:run_job"]
    driver = start_sweep(gated, tmp_path, first_log, sweep_env(tmp_path, {"GATE_DIR": str(tmp_path)}))
    try:
        wait_for(lambda: list((tmp_path / "multirun").rglob("job.log")), driver, first_log, "no job started")
        assert f"send SIGUSR1 (kill -USR1 {driver.pid})" in first_log.read_text()
        driver.send_signal(signal.SIGUSR1)
        wait_for(lambda: "draining on request" in first_log.read_text(), driver, first_log, "the driver did not drain")
        (tmp_path / "gate").touch()
        driver.wait(timeout=300)
    finally:
        stop_if_running(driver)
    output = first_log.read_text()
    assert driver.returncode == 75, output[-4000:]
    assert "no job starts any more; running: 1, left for the next launch: 3" in output
    assert "drained: 1 finished, 0 skipped (already finished), 0 failed, 3 not started" in output
    assert "Traceback" not in output

    client, experiment_id = mlflow_client(tmp_path)
    (parent,) = client.search_runs([experiment_id], "tags.`saffu.role` = 'sweep'")
    assert parent.info.status == "KILLED"
    runs = job_runs(client, experiment_id)
    # Nothing was lost: the one job that started finished, and the runs of the others were deleted.
    assert [run.info.status for run in runs] == ["FINISHED"]
    assert len(deleted_job_runs(client, experiment_id)) == 3

    second = subprocess.run(command, cwd=tmp_path, env=sweep_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=420)
    assert second.returncode == 0, second.stdout[-6000:]
    assert "resuming: 1 of 4 jobs already have a FINISHED run" in second.stdout
    assert "3 finished, 1 skipped (already finished), 0 failed" in second.stdout
    runs = job_runs(client, experiment_id)
    hashes = [run.data.tags["saffu.config_hash"] for run in runs]
    assert all(run.info.status == "FINISHED" for run in runs)
    assert len(hashes) == len(set(hashes)) == 4
    # The relaunch resumed the drained launch's parent run and finished it.
    (parent,) = client.search_runs([experiment_id], "tags.`saffu.role` = 'sweep'")
    assert parent.info.status == "FINISHED"

    # benchmarks/sweep_throughput.py counts the drained launch as one that did not complete.
    launches = parse_launches([*output.splitlines(), *second.stdout.splitlines()])
    assert [(launch.finished, launch.completed) for launch in launches] == [(1, False), (3, True)]


def test_overlapping_sweeps_run_each_config_once(tmp_path, corpus, ray_temp_dir):
    """Sweep A runs four configs whose jobs wait for gate files. Sweep B, launched while A
    runs, shares two of them. B waits for those two: one finishes in A and B skips it, the
    other B runs itself after A's driver is SIGKILLed."""
    (tmp_path / "gated_job.py").write_text(textwrap.dedent(
        """
        import os
        import time
        from pathlib import Path

        from saffu.job import run_job as real_run_job


        def run_job(cfg, log_metric):
            gate = Path(os.environ["GATE_DIR"]) / f"gate-{cfg.model.block_size}-{cfg.model.radius}"
            while not gate.exists():
                time.sleep(0.5)
            return real_run_job(cfg, log_metric=log_metric)
        """
    ))
    first_command = sweep_command(
        tmp_path, corpus, *FOUR_JOBS, "train.bp_only=false", "ray.num_cpus=2", f"ray.temp_dir={ray_temp_dir}",
        "hydra.launcher.job_function=gated_job:run_job",
    )
    second_command = [
        f"hydra.sweep.dir={tmp_path / 'multirun-second'}" if part.startswith("hydra.sweep.dir=") else part
        for part in sweep_command(
            tmp_path, corpus, "model.block_size=2,3", "model.radius=0,4", "model/experts=onehot", "model.layers=1",
            "train.bp_only=false", "ray.num_cpus=1", "hydra.launcher.progress_interval_s=2",
        )
    ]
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    db = tmp_path / "mlflow.db"
    gates = {"GATE_DIR": str(tmp_path)}
    tree: list[psutil.Process] = []
    with first_log.open("w") as first_out, second_log.open("w") as second_out:
        first = subprocess.Popen(
            first_command, cwd=tmp_path, env=sweep_env(tmp_path, gates), stdout=first_out, stderr=subprocess.STDOUT
        )
        second = None
        try:
            wait_for(lambda: count_job_runs(db) == 4, first, first_log, "sweep A created no run for each of its 4 jobs")
            dry_run = subprocess.run(
                [*second_command, "+sweep.dry_run=true"], cwd=tmp_path, env=sweep_env(),
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300,
            )
            assert dry_run.returncode == 0, dry_run.stdout[-4000:]
            assert "4 jobs, 4 to run, 0 already finished, 2 running in another sweep" in dry_run.stdout
            assert len(re.findall(r"^\s+\d+  wait ", dry_run.stdout, flags=re.MULTILINE)) == 2
            second = subprocess.Popen(
                second_command, cwd=tmp_path, env=sweep_env(), stdout=second_out, stderr=subprocess.STDOUT
            )
            wait_for(
                lambda: "2 jobs are running in another sweep" in second_log.read_text(), second, second_log,
                "sweep B did not wait for the 2 jobs that sweep A runs",
            )
            for gate in ("1-0", "1-4", "2-0"):
                (tmp_path / f"gate-{gate}").touch()
            wait_for(
                lambda: "finished in another sweep; skipped" in second_log.read_text(), second, second_log,
                "sweep B did not see that sweep A finished block size 2, radius 0",
            )
            # A runs two jobs at a time, so block size 2 can finish before both of block size 1.
            wait_for(
                lambda: finished_configs(tmp_path) >= {("1", "0"), ("1", "4"), ("2", "0")},
                first, first_log, "sweep A did not finish its three released jobs",
            )
            tree = [psutil.Process(first.pid), *psutil.Process(first.pid).children(recursive=True)]
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=30)
            second.wait(timeout=420)
        finally:
            for process in (first, second):
                if process is not None and process.poll() is None:
                    tree += [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
            time.sleep(3)
            kill_processes(tree)  # Ray's agents outlive a SIGKILLed driver.
    output = second_log.read_text()
    assert second.returncode == 0, output[-6000:]
    assert "is no longer running in another sweep; running it here" in output
    assert "3 finished, 1 skipped (already finished), 0 failed" in output

    client, experiment_id = mlflow_client(tmp_path)
    finished: dict[tuple[str, str], list] = {}
    for run in job_runs(client, experiment_id):
        if run.info.status == "FINISHED":
            finished.setdefault((run.data.params["model.block_size"], run.data.params["model.radius"]), []).append(run)
    # Six configs in all, each finished exactly once.
    assert sorted(finished) == [("1", "0"), ("1", "4"), ("2", "0"), ("2", "4"), ("3", "0"), ("3", "4")]
    assert all(len(runs) == 1 for runs in finished.values())
    second_parent = finished[("3", "0")][0].data.tags["mlflow.parentRunId"]
    parents = {run.info.run_id for run in client.search_runs([experiment_id], "tags.`saffu.role` = 'sweep'")}
    assert len(parents) == 2
    assert second_parent in parents
    assert finished[("2", "0")][0].data.tags["mlflow.parentRunId"] != second_parent
    assert finished[("2", "4")][0].data.tags["mlflow.parentRunId"] == second_parent

def finished_configs(tmp_path: Path) -> set[tuple[str, str]]:
    """Return the (block size, radius) of the FINISHED job runs in the test's store."""
    client, experiment_id = mlflow_client(tmp_path)
    runs = job_runs(client, experiment_id)
    return {
        (run.data.params["model.block_size"], run.data.params["model.radius"]) for run in runs if run.info.status == "FINISHED"
    }
