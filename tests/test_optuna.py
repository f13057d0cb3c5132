"""Optuna search (`python sweep.py -m +sweep=optuna`): hypervolume, the trial loop, and
end-to-end studies with real Ray on loopback, a real MLflow store and a real Optuna SQLite storage."""

import math
import textwrap
from pathlib import Path

import optuna
import psutil
import pytest
from optuna.trial import TrialState

from saffu.launch import JobResult, JobSpec
from saffu.search import (
    OptunaSettings,
    OptunaSettingsError,
    SearchSpace,
    StudyLoop,
    hypervolume_2d,
    objective_values,
    open_study,
    pareto_front,
    read_optuna_settings,
    reference_point,
    requeue_stale_trials,
)
from sweep_helpers import INTERRUPTED, job_runs, run_sweep, write_corpus_slice

# ---------------------------------------------------------------------------------------------
# Hypervolume and fronts

HYPERVOLUME_CASES = [
    # (points, reference, expected area)
    ([(1.0, 1.0)], (2.0, 2.0), 1.0),
    ([(0.0, 2.0), (1.0, 1.0), (2.0, 0.0)], (3.0, 3.0), 6.0),
    # A dominated point and a duplicate add nothing.
    ([(0.0, 2.0), (1.0, 1.0), (2.0, 0.0), (2.5, 2.5), (1.0, 1.0)], (3.0, 3.0), 6.0),
    # A point on or beyond the reference in either coordinate adds nothing.
    ([(1.0, 1.0), (3.0, 0.0), (0.0, 3.0)], (3.0, 3.0), 4.0),
    ([], (3.0, 3.0), 0.0),
    ([(0.5, 0.25)], (1.0, 1.0), 0.375),
]


@pytest.mark.parametrize(("points", "reference", "expected"), HYPERVOLUME_CASES)
def test_hypervolume_2d_known_fronts(points, reference, expected):
    assert hypervolume_2d(points, reference) == pytest.approx(expected)


def test_hypervolume_matches_optuna_private_helper():
    import numpy as np
    from optuna._hypervolume import compute_hypervolume

    rng = np.random.default_rng(0)
    points = rng.random((40, 2))
    reference = (1.1, 1.1)
    ours = hypervolume_2d([tuple(point) for point in points], reference)
    front = np.array(pareto_front(tuple(point) for point in points))
    assert ours == pytest.approx(compute_hypervolume(front, np.array(reference)))


def test_hypervolume_rejects_nan():
    with pytest.raises(ValueError, match="finite"):
        hypervolume_2d([(math.nan, 1.0)], (2.0, 2.0))


def test_pareto_front_keeps_nondominated():
    points = [(3.0, 1.0), (1.0, 3.0), (2.0, 2.0), (2.0, 2.5), (3.0, 3.0), (1.0, 3.0)]
    assert pareto_front(points) == [(1.0, 3.0), (2.0, 2.0), (3.0, 1.0)]


def test_reference_point_beyond_worst():
    assert reference_point([(5.0, 100.0), (6.0, 80.0)]) == pytest.approx((6.1, 102.0))
    assert reference_point([(5.0, 100.0)]) == pytest.approx((5.5, 110.0))


def test_objective_values_reject_nonfinite():
    assert objective_values({"val_ppl": 12.5, "n_params": 1000.0, "test_ppl": 13.0}) == [12.5, 1000.0]
    with pytest.raises(ValueError, match="not finite"):
        objective_values({"val_ppl": math.nan, "n_params": 1000.0})
    with pytest.raises(ValueError, match="no n_params"):
        objective_values({"val_ppl": 12.5})


# ---------------------------------------------------------------------------------------------
# Settings


def test_optuna_settings_defaults_valid():
    settings = read_optuna_settings({"sampler": "tpe", "n_trials": 3})
    assert settings.sampler == "tpe"
    assert settings.n_trials == 3
    assert settings.storage == "sqlite:///optuna.db"


@pytest.mark.parametrize(
    ("node", "message"),
    [
        ({"sampler": "cmaes"}, "sweep.optuna.sampler='cmaes' is invalid"),
        ({"n_trials": 0}, "sweep.optuna.n_trials=0 is invalid"),
        ({"parallel": True}, "sweep.optuna.parallel=True is invalid"),
        ({"ntrials": 4}, "sweep.optuna.ntrials is unknown"),
        ({"storage": "sqlite:///no/such/folder/optuna.db"}, "does not exist"),
        ({"storage": "not a url"}, "is not an SQLAlchemy URL"),
        (
            {"storage": "postgresql+nosuchdriver://alice:s3cret@127.0.0.1:1/optuna"},
            "sweep.optuna.storage=postgresql+nosuchdriver://alice:***@127.0.0.1:1/optuna: SQLAlchemy cannot load its database driver",
        ),
    ],
)
def test_optuna_settings_problems(node, message):
    with pytest.raises(OptunaSettingsError) as raised:
        read_optuna_settings(node)
    assert any(message in problem for problem in raised.value.problems), raised.value.problems


# ---------------------------------------------------------------------------------------------
# The trial loop, with jobs that finish at once instead of Ray tasks


def small_space() -> SearchSpace:
    jobs = {}
    for index, (size, radius) in enumerate([("1", "0"), ("1", "4"), ("2", "0"), ("2", "4")]):
        jobs[(size, radius)] = JobSpec(
            index, f"block_size={size} radius={radius}", [], {"size": size, "radius": radius}, f"hash-{size}-{radius}", "."
        )
    return SearchSpace({"model.block_size": ["1", "2"], "model.radius": ["0", "4"]}, jobs)


class InstantTasks:
    """Stands in for JobTasks: each submitted job finishes on the next wait with `metrics_of(job)`,
    or FAILED when that raises."""

    def __init__(self, metrics_of):
        self.metrics_of = metrics_of
        self.pending: list[tuple[JobSpec, str]] = []
        self.submitted: list[JobSpec] = []
        self.tags: list[dict[str, str]] = []

    def claim(self, job, tags=None):
        return None

    def release(self, run_id):
        raise AssertionError("no config is claimed by another sweep here")

    def submit(self, job, attempt=1, tags=None, run_id=None):
        run_id = f"run-{len(self.submitted)}"
        self.submitted.append(job)
        self.tags.append(dict(tags or {}))
        self.pending.append((job, run_id))
        return run_id

    def wait(self, timeout_s):
        job, run_id = self.pending.pop(0)
        try:
            return [JobResult(job, run_id, "FINISHED", self.metrics_of(job))]
        except RuntimeError as error:
            return [JobResult(job, run_id, "FAILED", error=str(error))]

    def cancel(self):
        self.pending.clear()

    def running_job_indexes(self):
        return set()


def sqlite_study(tmp_path: Path, space: SearchSpace, **settings) -> tuple:
    settings = OptunaSettings(storage=f"sqlite:///{tmp_path / 'optuna.db'}", **settings)
    return open_study(settings, "unit", space), settings


def test_loop_completes_without_rerunning_configs(tmp_path):
    space = small_space()
    study, settings = sqlite_study(tmp_path, space, n_trials=12, parallel=2, sampler="tpe")
    tasks = InstantTasks(lambda job: {"val_ppl": 100.0 - job.index, "n_params": 1000.0 * (job.index + 1)})
    outcome = StudyLoop(study, space, settings, lambda: tasks, {}).run()

    assert outcome.n_complete == 12
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 12
    hashes = [job.config_hash for job in tasks.submitted]
    assert len(hashes) == len(set(hashes)), "a config ran twice"
    assert outcome.ran + outcome.reused <= 12
    for trial in complete:
        job = space.job_for(trial.params)
        assert trial.values == [100.0 - job.index, 1000.0 * (job.index + 1)]
        assert trial.user_attrs["config_hash"] == job.config_hash
        assert trial.user_attrs["mlflow_run_id"].startswith("run-")
    for tags in tasks.tags:
        assert tags["saffu.optuna_study"] == "unit"


def test_loop_fails_raising_and_nonfinite_jobs(tmp_path):
    space = small_space()
    study, settings = sqlite_study(tmp_path, space, n_trials=6, parallel=1, sampler="tpe")

    def metrics_of(job):
        if job.config_hash == "hash-1-0":
            raise RuntimeError("ValueError: injected failure")
        if job.config_hash == "hash-2-4":
            return {"val_ppl": math.inf, "n_params": 10.0}
        return {"val_ppl": 50.0, "n_params": 10.0 * (job.index + 1)}

    study.enqueue_trial({"model.block_size": "1", "model.radius": "0"})
    study.enqueue_trial({"model.block_size": "2", "model.radius": "4"})
    outcome = StudyLoop(study, space, settings, lambda: InstantTasks(metrics_of), {}).run()

    assert outcome.n_complete == 6
    failed = study.get_trials(states=(TrialState.FAIL,))
    reasons = [trial.user_attrs["fail_reason"] for trial in failed]
    assert any("injected failure" in reason for reason in reasons), reasons
    assert any("not finite" in reason for reason in reasons), reasons
    for trial in study.get_trials(states=(TrialState.COMPLETE,)):
        assert trial.user_attrs["config_hash"] not in ("hash-1-0", "hash-2-4")


def test_loop_stops_when_every_config_fails(tmp_path):
    space = small_space()
    study, settings = sqlite_study(tmp_path, space, n_trials=4, parallel=2)

    def always_raise(job):
        raise RuntimeError("broken")

    outcome = StudyLoop(study, space, settings, lambda: InstantTasks(always_raise), {}).run()
    assert outcome.n_complete == 0
    assert not outcome.reached
    assert outcome.exit_code == 1


def test_loop_reuses_finished_runs_without_starting_tasks(tmp_path):
    space = small_space()
    study, settings = sqlite_study(tmp_path, space, n_trials=5)
    finished = {job.config_hash: (f"old-{job.index}", {"val_ppl": 20.0, "n_params": 5.0}) for job in space.jobs.values()}

    def no_tasks():
        raise AssertionError("Ray would start although every config has a FINISHED run")

    outcome = StudyLoop(study, space, settings, no_tasks, finished).run()
    assert outcome.n_complete == 5
    assert outcome.reused == 5
    for trial in study.get_trials(states=(TrialState.COMPLETE,)):
        assert trial.user_attrs["reused"] is True
        assert trial.user_attrs["mlflow_run_id"].startswith("old-")


class ScriptedOtherSweeps:
    """Stands in for OtherSweeps. Another sweep runs hash-2-0 and hash-2-4 at first. By the
    first check it has stopped without finishing hash-2-4. From the second check on, it has
    finished hash-2-0 in run other-2-0."""

    def __init__(self):
        self.checks = 0
        self.heartbeat = lambda: None

    def running(self, hashes, claims=None):
        running = {"hash-2-0"} if self.checks else {"hash-2-0", "hash-2-4"}
        return running & hashes

    def finished(self):
        self.checks += 1
        return {"hash-2-0": ("other-2-0", {"val_ppl": 50.0, "n_params": 7.0})} if self.checks >= 2 else {}


def test_loop_waits_for_configs_that_another_sweep_runs(tmp_path):
    space = small_space()
    study, settings = sqlite_study(tmp_path, space, n_trials=8, parallel=2, sampler="tpe")
    tasks = InstantTasks(lambda job: {"val_ppl": 100.0 - job.index, "n_params": 1000.0 * (job.index + 1)})
    study.enqueue_trial({"model.block_size": "2", "model.radius": "0"})
    study.enqueue_trial({"model.block_size": "2", "model.radius": "4"})
    loop = StudyLoop(study, space, settings, lambda: tasks, {}, progress_interval_s=0.0, other_sweeps=ScriptedOtherSweeps())
    outcome = loop.run()

    assert outcome.n_complete == 8
    submitted = [job.config_hash for job in tasks.submitted]
    # hash-2-4 ran here once, after the other sweep stopped; hash-2-0 never ran here.
    assert submitted.count("hash-2-4") == 1
    assert "hash-2-0" not in submitted
    assert len(submitted) == len(set(submitted))
    first, second = study.get_trials()[:2]
    assert first.state == TrialState.COMPLETE
    assert first.values == [50.0, 7.0]
    assert first.user_attrs["mlflow_run_id"] == "other-2-0"
    assert second.state == TrialState.COMPLETE
    assert second.values == [100.0 - space.job_for(second.params).index, 1000.0 * (space.job_for(second.params).index + 1)]
    assert second.user_attrs["mlflow_run_id"].startswith("run-")


def test_stale_running_trial_requeued(tmp_path):
    space = small_space()
    study, _ = sqlite_study(tmp_path, space)
    abandoned = study.ask(fixed_distributions=space.distributions)

    reopened = optuna.load_study(study_name="unit", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert requeue_stale_trials(reopened, space) == [abandoned.number]
    states = {trial.number: trial.state for trial in reopened.get_trials()}
    assert states[abandoned.number] == TrialState.FAIL
    (waiting,) = reopened.get_trials(states=(TrialState.WAITING,))
    assert waiting.user_attrs["requeued_from"] == abandoned.number
    assert reopened.ask(fixed_distributions=space.distributions).params == abandoned.params


def test_open_study_rejects_changed_space(tmp_path):
    from saffu.search import StudyMismatchError

    space = small_space()
    study, settings = sqlite_study(tmp_path, space)
    study.ask(fixed_distributions=space.distributions)
    narrower = SearchSpace({"model.block_size": ["1"], "model.radius": ["0", "4"]}, space.jobs)
    with pytest.raises(StudyMismatchError, match="study_name"):
        open_study(settings, "unit", narrower)


# ---------------------------------------------------------------------------------------------
# End to end: `python sweep.py -m +sweep=optuna` as a subprocess

# Four configs: block size x radius, one-hot experts, one layer; each job trains for at most 3 seconds.
STUDY_SPACE = ("model.block_size=1,2", "model.radius=0,4", "model/experts=onehot", "model.layers=1")
QUICK_JOB = ("train.bp_only=false", "train.max_seconds=3", "ray.num_cpus=2")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, gutenberg_dir: Path) -> Path:
    return write_corpus_slice(gutenberg_dir, tmp_path_factory.mktemp("corpus"))


def study_command(tmp_path: Path, n_trials: int, *extra: str) -> tuple[str, ...]:
    return (
        "+sweep=optuna", *STUDY_SPACE, *QUICK_JOB,
        f"sweep.optuna.n_trials={n_trials}", "sweep.optuna.parallel=2",
        f"sweep.optuna.storage=sqlite:///{tmp_path / 'optuna.db'}", "sweep.optuna.study_name=e2e", *extra,
    )


def mlflow_client(tmp_path: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    return client, client.get_experiment_by_name("saffu").experiment_id


@pytest.mark.corpus
@pytest.mark.slow
def test_study_completes_and_resumes(tmp_path, corpus):
    first = run_sweep(tmp_path, corpus, *study_command(tmp_path, 4))
    assert first.returncode == 0, first.stdout[-6000:]
    assert "4/4 trials COMPLETE" in first.stdout

    study = optuna.load_study(study_name="e2e", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    trials = study.get_trials()
    assert len(trials) == 4
    assert all(trial.state == TrialState.COMPLETE for trial in trials)

    client, experiment_id = mlflow_client(tmp_path)
    (parent,) = client.search_runs([experiment_id], "tags.`saffu.role` = 'sweep'")
    assert parent.data.tags["saffu.optuna_study"] == "e2e"
    assert parent.info.status == "FINISHED"
    artifacts = {item.path for item in client.list_artifacts(parent.info.run_id)}
    assert {"pareto_front.csv", "trials.csv"} <= artifacts

    for trial in trials:
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.info.status == "FINISHED"
        assert trial.values == [run.data.metrics["val_ppl"], run.data.metrics["n_params"]]
        assert run.data.tags["saffu.config_hash"] == trial.user_attrs["config_hash"]
        if not trial.user_attrs["reused"]:
            assert run.data.tags["saffu.optuna_study"] == "e2e"
            assert run.data.tags["saffu.optuna_trial"] == str(trial.number)
            assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id

    runs_before = job_runs(client, experiment_id)
    second = run_sweep(tmp_path, corpus, *study_command(tmp_path, 7))
    assert second.returncode == 0, second.stdout[-6000:]
    assert "7/7 trials COMPLETE" in second.stdout

    study = optuna.load_study(study_name="e2e", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 7
    runs_after = job_runs(client, experiment_id)
    assert {run.info.run_id for run in runs_before} <= {run.info.run_id for run in runs_after}
    hashes = [run.data.tags["saffu.config_hash"] for run in runs_after]
    assert len(hashes) == len(set(hashes)), "a config has more than one MLflow run"
    assert len(runs_after) <= 4
    parents = client.search_runs([experiment_id], "tags.`saffu.role` = 'sweep'")
    assert len(parents) == 1


@pytest.mark.corpus
@pytest.mark.slow
def test_study_goes_on_after_failed_trial(tmp_path, corpus):
    # The first job to start raises; jobs started after it run normally.
    (tmp_path / "first_job_fails.py").write_text(textwrap.dedent(
        """
        import os
        from pathlib import Path

        from saffu.job import run_job as real_run_job


        def run_job(cfg, log_metric):
            marker = Path(os.environ["FAULT_MARKER_DIR"]) / "first-job"
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                return real_run_job(cfg, log_metric=log_metric)
            raise ValueError("injected failure of the first job")
        """
    ))
    result = run_sweep(
        tmp_path, corpus, *study_command(tmp_path, 2), "hydra.launcher.job_function=first_job_fails:run_job",
        pythonpath=tmp_path, env={"FAULT_MARKER_DIR": str(tmp_path)},
    )
    assert result.returncode == 0, result.stdout[-6000:]
    assert "injected failure of the first job" in result.stdout

    study = optuna.load_study(study_name="e2e", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert failed, "no trial failed"
    assert "injected failure" in failed[0].user_attrs["fail_reason"]
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 2

    client, _ = mlflow_client(tmp_path)
    failed_run = client.get_run(failed[0].user_attrs["mlflow_run_id"])
    assert failed_run.info.status == "FAILED"
    artifacts = {item.path for item in client.list_artifacts(failed_run.info.run_id)}
    assert "traceback.txt" in artifacts


@pytest.mark.corpus
@pytest.mark.slow
def test_study_sigterm_stops_cleanly(tmp_path, corpus):
    """SIGTERM while the study's jobs run: exit status 130 and one line, no traceback, and
    the interrupted trials queued again."""
    import signal
    import subprocess
    import time

    from sweep_helpers import kill_processes, sweep_command, sweep_env

    (tmp_path / "stalled_job.py").write_text(textwrap.dedent(
        """
        import time


        def run_job(cfg, log_metric):
            time.sleep(600)
        """
    ))
    command = sweep_command(tmp_path, corpus, *study_command(tmp_path, 4), "hydra.launcher.job_function=stalled_job:run_job")
    log_path = tmp_path / "study.log"
    with log_path.open("w") as log_file:
        driver = subprocess.Popen(command, cwd=tmp_path, env=sweep_env(tmp_path), stdout=log_file, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while "job submitted" not in log_path.read_text():
                assert driver.poll() is None, log_path.read_text()[-4000:]
                assert time.monotonic() < deadline, "no trial job was submitted within 300 s"
                time.sleep(0.5)
            time.sleep(2)
            driver.send_signal(signal.SIGTERM)
            driver.wait(timeout=120)
        finally:
            if driver.poll() is None:
                kill_processes([psutil.Process(driver.pid), *psutil.Process(driver.pid).children(recursive=True)])
    output = log_path.read_text()
    assert driver.returncode in INTERRUPTED, output[-4000:]
    assert "study e2e interrupted; relaunch the same command to continue it" in output
    assert "Traceback" not in output
    study = optuna.load_study(study_name="e2e", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert study.get_trials(states=(TrialState.WAITING,))
    assert not study.get_trials(states=(TrialState.RUNNING,))


@pytest.mark.corpus
@pytest.mark.slow
def test_study_sigusr1_drains_then_relaunch_completes(tmp_path, corpus):
    """SIGUSR1 while two of three submitted trial jobs run (two job slots): those two finish,
    the queued one never starts and its trial is queued again, the driver exits with status
    75, and the relaunch completes the study."""
    import signal
    import subprocess

    from sweep_helpers import start_sweep, stop_if_running, sweep_command, sweep_env, wait_for, write_gated_job

    write_gated_job(tmp_path)
    study = (
        "+sweep=optuna", *STUDY_SPACE, *QUICK_JOB, "sweep.optuna.n_trials=4", "sweep.optuna.parallel=3",
        f"sweep.optuna.storage=sqlite:///{tmp_path / 'optuna.db'}", "sweep.optuna.study_name=e2e",
        "hydra.launcher.progress_interval_s=2",
    )
    command = sweep_command(tmp_path, corpus, *study)
    log_path = tmp_path / "study.log"
    gated = [*command, "hydra.launcher.job_function=gated_job:run_job"]
    driver = start_sweep(gated, tmp_path, log_path, sweep_env(tmp_path, {"GATE_DIR": str(tmp_path)}))
    try:
        wait_for(lambda: "2 jobs running, 1 waiting to start" in log_path.read_text(), driver, log_path,
                 "the study did not run two jobs and queue a third")
        driver.send_signal(signal.SIGUSR1)
        wait_for(lambda: "drains on request" in log_path.read_text(), driver, log_path, "the study did not drain")
        (tmp_path / "gate").touch()
        driver.wait(timeout=300)
    finally:
        stop_if_running(driver)
    output = log_path.read_text()
    assert driver.returncode == 75, output[-4000:]
    assert "no trial starts any more; running: 2, queued for the next launch: 1" in output
    assert "2/4 trials COMPLETE; this launch ran 2 jobs" in output
    assert "Traceback" not in output
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    stored = optuna.load_study(study_name="e2e", storage=storage)
    assert len(stored.get_trials(states=(TrialState.COMPLETE,))) == 2
    (drained,) = stored.get_trials(states=(TrialState.FAIL,))
    assert drained.user_attrs["fail_reason"] == "the sweep drained before the job could run"
    (queued,) = stored.get_trials(states=(TrialState.WAITING,))
    assert queued.user_attrs["requeued_from"] == drained.number

    client, experiment_id = mlflow_client(tmp_path)
    (parent,) = client.search_runs([experiment_id], "tags.`saffu.role` = 'sweep'")
    assert parent.info.status == "KILLED"
    assert sorted(run.info.status for run in job_runs(client, experiment_id)) == ["FINISHED", "FINISHED"]

    second = subprocess.run(command, cwd=tmp_path, env=sweep_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=420)
    assert second.returncode == 0, second.stdout[-6000:]
    stored = optuna.load_study(study_name="e2e", storage=storage)
    assert len(stored.get_trials(states=(TrialState.COMPLETE,))) >= 4
    # The relaunch ran the trial queued in place of the drained one.
    assert stored.trials[queued.number].state == TrialState.COMPLETE

