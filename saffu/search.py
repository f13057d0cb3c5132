"""Multi-objective Optuna search over a sweep's grid, run through the grid's job machinery.

``python sweep.py -m +sweep=optuna`` turns each factor of the grid into a categorical
parameter and runs an Optuna study that minimizes validation perplexity (``val_ppl``) and
parameter count (``n_params``) of the job's final model. The driver owns the study: it
creates it before Ray starts, asks for trials, runs each trial's job as a Ray task through
:class:`saffu.launch.JobTasks` (the same runs, memory requests and retries as the grid) and
tells each result as soon as its task finishes. Workers never open the study.

The maintained ``hydra-optuna-sweeper`` plugin (1.3.0) is not used: it requires
``optuna<3.0.0`` (pip would downgrade Optuna 5 to 2.10.1), it runs trials in batches
through ``Launcher.launch`` and tells them only when the whole batch is done, it reads the
objective values from ``JobReturn.return_value``, and on a relaunch it counts only the
trials of that launch and leaves trials of a killed driver RUNNING.

Hypervolume: Optuna 5.1 has no public hypervolume function (``optuna._hypervolume`` is
private), so :func:`hypervolume_2d` computes the 2-D one with a sweep over the sorted front.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from saffu.launch import (
    DEFAULT_JOB_FUNCTION,
    EXIT_DRAINED,
    HEARTBEAT_INTERVAL_S,
    NOT_STARTED,
    Heartbeat,
    JobResult,
    JobSpec,
    JobTasks,
    RayJoinError,
    RaySession,
    configs_running_elsewhere,
    format_seconds,
    log_stop_signals,
    sigterm_as_interrupt,
    uninterrupted,
)
from saffu.tracking import (
    TAG_OPTUNA_STUDY,
    TAG_OPTUNA_TRIAL,
    ArtifactStoreError,
    RunRecorder,
    database_driver_problem,
    git_commit,
    redact_uri,
    sqlite_path,
)

log = logging.getLogger(__name__)

SAMPLERS = ("nsga2", "tpe")
# Both are minimized: metric names as saffu.job.run_job returns them and MLflow stores them.
OBJECTIVES = ("val_ppl", "n_params")
# A relaunch stops asking when the sampler proposes this many configs in a row that failed
# earlier in the same launch, because samplers ignore failed trials and may keep proposing them.
MAX_REPEATED_FAILURES = 100


class OptunaSettingsError(ValueError):
    """Invalid ``sweep.optuna`` settings: `problems` contains one message per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class StudyMismatchError(RuntimeError):
    """An existing study in the storage does not match the search space or objectives."""


@dataclass
class OptunaSettings:
    """The ``sweep.optuna`` node. The defaults are those of sweeps/optuna.yaml, for a node
    given on the command line (``++sweep.optuna.n_trials=20``) without that file."""

    sampler: str = "nsga2"
    n_trials: int = 100
    parallel: int = 4
    seed: int | None = 0
    study_name: str | None = None
    storage: str = "sqlite:///optuna.db"
    population_size: int | None = None
    max_failed_trials: int | None = None


def read_optuna_settings(node: Mapping[str, Any]) -> OptunaSettings:
    """Check the ``sweep.optuna`` mapping and return its settings; raises OptunaSettingsError."""
    known = {item.name for item in dataclasses.fields(OptunaSettings)}
    problems = [
        f"sweep.optuna.{key} is unknown; the settings are {', '.join(sorted(known))}" for key in node if key not in known
    ]
    values = {key: value for key, value in node.items() if key in known}
    settings = OptunaSettings(**values)

    def is_int(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if settings.sampler not in SAMPLERS:
        problems.append(f"sweep.optuna.sampler={settings.sampler!r} is invalid: expected one of {', '.join(SAMPLERS)}")
    for key, minimum, nullable in (
        ("n_trials", 1, False), ("parallel", 1, False), ("seed", 0, True),
        ("population_size", 2, True), ("max_failed_trials", 1, True),
    ):
        value = getattr(settings, key)
        if value is None and nullable:
            continue
        if not is_int(value) or value < minimum:
            problems.append(f"sweep.optuna.{key}={value!r} is invalid: expected an integer >= {minimum}")
    if settings.study_name is not None and (not isinstance(settings.study_name, str) or not settings.study_name):
        problems.append(f"sweep.optuna.study_name={settings.study_name!r} is invalid: expected a name or null")
    problems.extend(check_storage_url(settings.storage))
    if problems:
        raise OptunaSettingsError(problems)
    return settings


def check_storage_url(url: Any) -> list[str]:
    """Return the problems of an Optuna RDB storage URL (an SQLAlchemy URL)."""
    if not isinstance(url, str) or not url:
        return [f"sweep.optuna.storage={url!r} is invalid: expected an SQLAlchemy URL such as sqlite:///optuna.db"]
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    shown = redact_uri(url)
    try:
        make_url(url)
    except ArgumentError as error:
        return [f"sweep.optuna.storage={shown} is not an SQLAlchemy URL ({error}); write e.g. sqlite:///optuna.db"]
    if url.startswith("sqlite"):
        path = sqlite_path(url)
        if path is None:
            return [
                f"sweep.optuna.storage={shown} is not a database file, which a relaunch could resume; "
                "write sqlite:///relative.db or sqlite:////absolute.db"
            ]
        if not path.parent.is_dir():
            return [f"sweep.optuna.storage={shown}: the folder {path.parent} does not exist; create it or change the URL"]
        return []
    problem = database_driver_problem(url, "sweep.optuna.storage")
    return [problem] if problem else []


# ---------------------------------------------------------------------------------------------
# Search space


@dataclass
class SearchSpace:
    """The grid as categorical parameters: each factor key (``model.block_size``,
    ``model/experts``) is a parameter whose choices are the override values as strings,
    and each combination maps to its planned, checked job."""

    choices: dict[str, list[str]]
    jobs: dict[tuple[str, ...], JobSpec]

    @classmethod
    def from_plan(
        cls,
        factors: Mapping[str, Sequence[str]],
        composed: Sequence[tuple[list[str], Any, str]],
        planned: Sequence[JobSpec],
    ) -> SearchSpace:
        """Build the space from the grid factors (key -> ``key=value`` overrides), the composed
        jobs of their Cartesian product (overrides start with one value per factor) and the
        checked jobs that :func:`saffu.planning.plan_jobs` returned for them."""
        from saffu.tracking import config_hash

        choices = {key: [override.split("=", 1)[1] for override in overrides] for key, overrides in factors.items()}
        by_hash = {job.config_hash: job for job in planned}
        jobs = {}
        n_factors = len(factors)
        for overrides, config, _ in composed:
            values = tuple(override.split("=", 1)[1] for override in overrides[:n_factors])
            # plan_jobs keeps one job per distinct config, so a combination may map to a job
            # that another combination produced.
            jobs[values] = by_hash[config_hash(config)]
        return cls(choices, jobs)

    @property
    def distributions(self) -> dict[str, Any]:
        from optuna.distributions import CategoricalDistribution

        return {key: CategoricalDistribution(values) for key, values in self.choices.items()}

    def job_for(self, params: Mapping[str, Any]) -> JobSpec:
        return self.jobs[tuple(str(params[key]) for key in self.choices)]

    def config_hashes(self) -> set[str]:
        return {job.config_hash for job in self.jobs.values()}


def default_study_name(sweep_name: str, jobs: Sequence[JobSpec]) -> str:
    """Name a study after the sweep and a hash of every job config of its space, so the
    same command resumes the same study and a changed space or setting starts a new one."""
    from saffu.planning import sweep_id_of

    return f"{sweep_name}-{sweep_id_of(jobs)}"


def study_sweep_id(storage: str, study_name: str) -> str:
    """Return the ``saffu.sweep_id`` of a study's MLflow parent run. It differs from the id
    of a grid sweep over the same jobs, so the two get separate parent runs."""
    text = f"optuna\n{redact_uri(storage)}\n{study_name}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------
# Objectives, Pareto fronts and hypervolume


def objective_values(metrics: Mapping[str, float]) -> list[float]:
    """Return ``[val_ppl, n_params]`` from a job's metrics; raises ValueError when one is
    missing or not finite, which makes the trial FAIL."""
    values = []
    for name in OBJECTIVES:
        if name not in metrics:
            raise ValueError(f"the job returned no {name} metric")
        value = float(metrics[name])
        if not math.isfinite(value):
            raise ValueError(f"the job returned {name}={value}, which is not finite")
        values.append(value)
    return values


def objective_point(val_ppl: float, n_params: float) -> tuple[float, float]:
    """Map a job's objectives to the plane used for hypervolume: (log10(n_params), val_ppl).
    Parameter counts span orders of magnitude, so a linear axis would let the largest
    models decide the hypervolume."""
    return (math.log10(n_params), float(val_ppl))


def pareto_front(points: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """Return the points that no other point dominates, both coordinates minimized, sorted
    by the first coordinate (the second then decreases). Duplicates appear once."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(set(points)):
        if not front or y < front[-1][1]:
            front.append((x, y))
    return front


def hypervolume_2d(points: Iterable[tuple[float, float]], reference: tuple[float, float]) -> float:
    """Return the area that the points dominate up to `reference`, both coordinates
    minimized. Points not strictly better than `reference` in both coordinates add nothing.
    Raises ValueError for a point or reference with a NaN or infinite coordinate."""
    points = list(points)
    for point in [*points, reference]:
        if not all(math.isfinite(value) for value in point):
            raise ValueError(f"hypervolume needs finite coordinates, got {point}")
    ref_x, ref_y = reference
    inside = [(x, y) for x, y in points if x < ref_x and y < ref_y]
    area = 0.0
    upper = ref_y
    # Along the front x increases and y decreases: each point adds the strip between its y
    # and the previous point's y, from its x to the reference.
    for x, y in pareto_front(inside):
        area += (ref_x - x) * (upper - y)
        upper = y
    return area


def reference_point(points: Iterable[tuple[float, float]], margin: float = 0.1) -> tuple[float, float]:
    """Return a reference point worse than every point: per coordinate, the maximum plus
    `margin` times the coordinate's range (times its magnitude, or 1, when the range is 0)."""
    points = list(points)
    if not points:
        raise ValueError("a reference point needs at least one point")
    reference = []
    for axis in (0, 1):
        values = [point[axis] for point in points]
        high, low = max(values), min(values)
        span = high - low or abs(high) or 1.0
        reference.append(high + margin * span)
    return (reference[0], reference[1])


# ---------------------------------------------------------------------------------------------
# The study


@dataclass
class StudyOutcome:
    """Counts and Pareto front of one launch of a study, and whether the study reached `n_trials` COMPLETE trials."""

    study_name: str
    n_complete: int
    n_trials: int
    ran: int = 0
    reused: int = 0
    failed: list[tuple[int, str]] = field(default_factory=list)
    pareto: list[dict[str, Any]] = field(default_factory=list)
    # True when the launch stopped asking for trials on request (SIGUSR1, see drain_on_signal).
    drained: bool = False

    @property
    def reached(self) -> bool:
        return self.n_complete >= self.n_trials

    @property
    def exit_code(self) -> int:
        if self.reached:
            return 0
        return EXIT_DRAINED if self.drained and not self.failed else 1


def create_sampler(settings: OptunaSettings, seed_offset: int = 0) -> Any:
    """Create the sampler. `seed_offset` (the number of trials already in the study) keeps a
    relaunch from repeating the first launch's proposals."""
    import optuna

    seed = None if settings.seed is None else settings.seed + seed_offset
    if settings.sampler == "tpe":
        # constant_liar: trials still running count as bad results, so parallel `ask` calls spread out.
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    return optuna.samplers.NSGAIISampler(seed=seed, population_size=settings.population_size or 50)


def open_study(settings: OptunaSettings, study_name: str, space: SearchSpace) -> Any:
    """Create the study, or load it when the storage has it, in this (the driver) process.

    Raises StudyMismatchError when the stored study has other objectives or another space,
    because Optuna rejects trials whose distributions differ from earlier ones."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        storage=settings.storage,
        study_name=study_name,
        directions=["minimize"] * len(OBJECTIVES),
        load_if_exists=True,
    )
    stored_objectives = study.user_attrs.get("objectives")
    stored_space = study.user_attrs.get("space")
    if stored_objectives is None and not study.trials:
        study.set_user_attr("objectives", list(OBJECTIVES))
        study.set_user_attr("space", space.choices)
    elif stored_objectives != list(OBJECTIVES) or stored_space != space.choices:
        raise StudyMismatchError(
            f"study {study_name!r} in {redact_uri(settings.storage)} has objectives {stored_objectives} and "
            f"space {stored_space}, not {list(OBJECTIVES)} and {space.choices}; set sweep.optuna.study_name to a new "
            "name (or null, which derives one from the space)"
        )
    study.sampler = create_sampler(settings, seed_offset=len(study.trials))
    return study


def requeue_stale_trials(study: Any, space: SearchSpace) -> list[int]:
    """Mark FAIL the trials that a killed driver left RUNNING and enqueue their params again,
    so the next `ask` calls return them (a config whose job finished meanwhile is not rerun).
    Call it only while no other driver runs the study. Returns the failed trial numbers."""
    from optuna.trial import TrialState

    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for trial in stale:
        study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
        if set(trial.params) == set(space.choices):
            study.enqueue_trial(dict(trial.params), user_attrs={"requeued_from": trial.number})
    if stale:
        log.warning(
            "study %s: %d trials left RUNNING by an earlier driver are marked FAIL and queued again: %s",
            study.study_name, len(stale), ", ".join(str(trial.number) for trial in stale),
        )
    return [trial.number for trial in stale]


class OtherSweeps:
    """Jobs of the other sweeps in the experiment: the configs they are running under a live
    driver, and their FINISHED runs."""

    def __init__(self, recorder: RunRecorder, parent_run_id: str | None) -> None:
        self.recorder = recorder
        self.parent_run_id = parent_run_id
        self.heartbeat = Heartbeat(recorder, parent_run_id)

    def running(self, hashes: set[str], claims: Mapping[str, str] | None = None) -> set[str]:
        return configs_running_elsewhere(self.recorder, hashes, self.parent_run_id, claims)

    def finished(self) -> dict[str, tuple[str, dict[str, float]]]:
        return finished_runs_by_hash(self.recorder)


class StudyLoop:
    """Asks for trials, runs their jobs through `tasks` and tells results as they come.

    At most `parallel` jobs run at once. A trial whose config already has a FINISHED run
    in the experiment is told that run's values and runs nothing. A trial whose config is
    already running waits for that job, also when another sweep runs it (`other_sweeps`):
    the trial then gets that sweep's result, or runs the job here when that sweep stops
    without finishing it. A trial whose job raises, dies past its retries or returns a
    missing or non-finite objective is marked FAIL, and so is a later trial of a config that
    failed earlier in this launch.

    Once `drain` is set (SIGUSR1), the loop asks for no more trials and ends when the running
    jobs end. The trials that wait for another sweep or whose job had not started are marked
    FAIL and queued again, so the next launch evaluates them first.
    """

    def __init__(
        self,
        study: Any,
        space: SearchSpace,
        settings: OptunaSettings,
        start_tasks: Callable[[], JobTasks],
        finished_runs: Mapping[str, tuple[str, Mapping[str, float]]],
        progress_interval_s: float = 30.0,
        other_sweeps: OtherSweeps | None = None,
        drain: threading.Event | None = None,
    ) -> None:
        from optuna.trial import TrialState

        self.study = study
        self.space = space
        self.settings = settings
        # Called when the first job is submitted, so a launch whose trials all reuse
        # FINISHED runs never starts Ray.
        self.start_tasks = start_tasks
        self._tasks: JobTasks | None = None
        self.finished_runs = dict(finished_runs)
        self.progress_interval_s = progress_interval_s
        self.outcome = StudyOutcome(study.study_name, len(study.get_trials(states=(TrialState.COMPLETE,))), settings.n_trials)
        self.trials: dict[int, Any] = {}
        # Config hash -> numbers of the trials that wait for its running job.
        self.in_flight: dict[str, list[int]] = {}
        self.in_flight_runs: dict[str, str] = {}
        # Config hash -> its job and the numbers of the trials that wait for another sweep to run it.
        self.elsewhere: dict[str, tuple[JobSpec, list[int]]] = {}
        self.other_sweeps = other_sweeps
        self.failed_hashes: dict[str, str] = {}
        self.repeated_failures = 0
        self.drain = drain

    @property
    def tasks(self) -> JobTasks:
        if self._tasks is None:
            self._tasks = self.start_tasks()
        return self._tasks

    def run(self) -> StudyOutcome:
        started = time.monotonic()
        last_report = last_check = 0.0
        try:
            while True:
                if self.drain is not None and self.drain.is_set() and not self.outcome.drained:
                    self._start_draining()
                if self.other_sweeps is not None:
                    # Other sweeps may have finished configs since the study started.
                    # NOTE: this reads every FINISHED run of the experiment once per loop. That
                    # is fast for hundreds of runs and not measured for tens of thousands.
                    self.finished_runs.update(self.other_sweeps.finished())
                if not self.outcome.drained:
                    self._ask_until_full()
                if not self.in_flight and not self.elsewhere:
                    break
                results = self.tasks.wait(self.progress_interval_s) if self.in_flight else self._idle()
                for result in results:
                    self._tell_result(result)
                now = time.monotonic()
                if self.elsewhere and now - last_check >= self.progress_interval_s:
                    self._check_elsewhere()
                    last_check = now
                if results or now - last_report >= self.progress_interval_s:
                    self._log_progress(now - started)
                    last_report = now
        except BaseException:
            self._abandon_in_flight()
            raise
        return self.outcome

    # -- asking

    def _n_waiting_trials(self) -> int:
        waiting_here = sum(len(numbers) for numbers in self.in_flight.values())
        return waiting_here + sum(len(numbers) for _, numbers in self.elsewhere.values())

    def _idle(self) -> list[JobResult]:
        """Wait while the only trials left wait for other sweeps, and keep the heartbeat going."""
        time.sleep(min(self.progress_interval_s, HEARTBEAT_INTERVAL_S))
        if self.other_sweeps is not None:
            self.other_sweeps.heartbeat()
        return []

    def _check_elsewhere(self) -> None:
        """Tell the trials whose config another sweep finished, and run here the configs that
        no other sweep runs any more."""
        assert self.other_sweeps is not None
        finished = self.other_sweeps.finished()
        running = self.other_sweeps.running(set(self.elsewhere))
        for config_hash, (job, numbers) in list(self.elsewhere.items()):
            if config_hash in finished:
                del self.elsewhere[config_hash]
                run_id, metrics = finished[config_hash]
                for number in numbers:
                    self.trials[number].set_user_attr("mlflow_run_id", run_id)
                    self.trials[number].set_user_attr("reused", True)
                self.outcome.reused += len(numbers)
                log.info("%s finished in another sweep, run %s; reusing it", job.label, run_id)
                self._tell_metrics(numbers, config_hash, metrics, run_id)
            elif config_hash not in running:
                del self.elsewhere[config_hash]
                log.info("%s is no longer running in another sweep; running it here", job.label)
                self._submit(job, numbers)

    def _stop_reason(self) -> str | None:
        limit = self.settings.max_failed_trials
        if limit is not None and len(self.outcome.failed) >= limit:
            return f"{len(self.outcome.failed)} trials failed in this launch (sweep.optuna.max_failed_trials={limit})"
        if set(self.failed_hashes) >= self.space.config_hashes():
            return "every config of the search space failed in this launch"
        if self.repeated_failures >= MAX_REPEATED_FAILURES:
            return f"the sampler proposed {self.repeated_failures} configs in a row that failed earlier in this launch"
        return None

    def _ask_until_full(self) -> None:
        while (
            self.outcome.n_complete + self._n_waiting_trials() < self.settings.n_trials
            and len(self.in_flight) < self.settings.parallel
        ):
            reason = self._stop_reason()
            if reason:
                if not self.in_flight:
                    log.error("study %s stops before %d complete trials: %s", self.study.study_name, self.settings.n_trials, reason)
                return
            self._ask_one()

    def _ask_one(self) -> None:
        trial = self.study.ask(fixed_distributions=self.space.distributions)
        job = self.space.job_for(trial.params)
        trial.set_user_attr("config_hash", job.config_hash)
        trial.set_user_attr("overrides", job.label)
        self.trials[trial.number] = trial

        if job.config_hash in self.failed_hashes:
            self.repeated_failures += 1
            self._fail(trial.number, f"the config failed earlier in this launch: {self.failed_hashes[job.config_hash]}")
            return
        self.repeated_failures = 0

        if job.config_hash in self.finished_runs:
            run_id, metrics = self.finished_runs[job.config_hash]
            trial.set_user_attr("mlflow_run_id", run_id)
            trial.set_user_attr("reused", True)
            self.outcome.reused += 1
            log.info("trial %d (%s): reusing FINISHED run %s", trial.number, job.label, run_id)
            self._tell_metrics([trial.number], job.config_hash, metrics)
            return

        if job.config_hash in self.in_flight:
            self.in_flight[job.config_hash].append(trial.number)
            trial.set_user_attr("mlflow_run_id", self.in_flight_runs[job.config_hash])
            trial.set_user_attr("reused", True)
            log.info("trial %d (%s): the same config is running; waiting for its result", trial.number, job.label)
            return

        if job.config_hash in self.elsewhere or (
            self.other_sweeps is not None and self.other_sweeps.running({job.config_hash})
        ):
            trial_job = dataclasses.replace(job, label=f"trial {trial.number}: {job.label}")
            self.elsewhere.setdefault(job.config_hash, (trial_job, []))[1].append(trial.number)
            log.info("trial %d (%s): the same config is running in another sweep; waiting for it", trial.number, job.label)
            return

        self._submit(dataclasses.replace(job, label=f"trial {trial.number}: {job.label}"), [trial.number])

    def _submit(self, job: JobSpec, numbers: list[int]) -> None:
        """Run `job` for the trials `numbers`, whose first trial owns the run, unless another
        sweep claimed the config first: then the trials wait for that sweep."""
        tags = {TAG_OPTUNA_STUDY: self.study.study_name, TAG_OPTUNA_TRIAL: str(numbers[0])}
        run_id = self.tasks.claim(job, tags=tags)
        if self.other_sweeps is not None and self.other_sweeps.running({job.config_hash}, {job.config_hash: run_id}):
            self.tasks.release(run_id)
            self.elsewhere[job.config_hash] = (job, list(numbers))
            log.info("%s: another sweep claimed the same config first; waiting for it", job.label)
            return
        run_id = self.tasks.submit(job, tags=tags, run_id=run_id)
        for number in numbers:
            self.trials[number].set_user_attr("mlflow_run_id", run_id)
            self.trials[number].set_user_attr("reused", number != numbers[0])
        self.in_flight[job.config_hash] = list(numbers)
        self.in_flight_runs[job.config_hash] = run_id
        self.outcome.ran += 1
        log.info("%s: job submitted, run %s", job.label, run_id)

    # -- telling

    def _tell_result(self, result: JobResult) -> None:
        numbers = self.in_flight.pop(result.job.config_hash, [])
        self.in_flight_runs.pop(result.job.config_hash, None)
        if result.status == NOT_STARTED:
            self.outcome.ran -= 1
            self._requeue(numbers, "the sweep drained before the job could run")
            return
        if result.status != "FINISHED":
            self.failed_hashes[result.job.config_hash] = result.error
            for number in numbers:
                self._fail(number, result.error)
            return
        self._tell_metrics(numbers, result.job.config_hash, result.metrics, result.run_id)

    def _tell_metrics(
        self, numbers: list[int], config_hash: str, metrics: Mapping[str, float], run_id: str | None = None
    ) -> None:
        try:
            values = objective_values(metrics)
        except ValueError as error:
            self.failed_hashes[config_hash] = str(error)
            for number in numbers:
                self._fail(number, str(error))
            return
        if run_id is not None:
            self.finished_runs[config_hash] = (run_id, dict(metrics))
        for number in numbers:
            self.study.tell(self.trials[number], values=values)
            self.outcome.n_complete += 1
            log.info(
                "trial %d COMPLETE: val_ppl=%.4g, n_params=%d", number, values[0], int(values[1])
            )

    def _fail(self, number: int, reason: str) -> None:
        from optuna.trial import TrialState

        trial = self.trials[number]
        trial.set_user_attr("fail_reason", reason[:1000])
        self.study.tell(trial, state=TrialState.FAIL)
        self.outcome.failed.append((number, reason))
        log.warning("trial %d FAIL: %s", number, reason)

    def _requeue(self, numbers: Iterable[int], reason: str) -> None:
        """Mark trials FAIL and queue their params again, so the next launch evaluates them
        first. They do not count as failed in this launch's outcome."""
        from optuna.trial import TrialState

        for number in numbers:
            trial = self.trials[number]
            with contextlib.suppress(Exception):
                trial.set_user_attr("fail_reason", reason)
                self.study.tell(trial, state=TrialState.FAIL)
                self.study.enqueue_trial(dict(trial.params), user_attrs={"requeued_from": number})

    def _start_draining(self) -> None:
        """Ask for no more trials, let the running jobs end, and queue the other waiting trials again."""
        self.outcome.drained = True
        running = cancelled = 0
        if self._tasks is not None:
            running, cancelled = self._tasks.drain()
        for _, numbers in self.elsewhere.values():
            self._requeue(numbers, "the sweep drained while another sweep ran the config")
        log.warning(
            "study %s drains on request: no trial starts any more; running: %d, queued for the next launch: %d; "
            "SIGTERM stops the running jobs too",
            self.study.study_name, running, cancelled + sum(len(numbers) for _, numbers in self.elsewhere.values()),
        )
        self.elsewhere.clear()

    def _abandon_in_flight(self) -> None:
        """On an interrupt: cancel the jobs, mark their trials FAIL and queue their params
        again, so a relaunch evaluates them first."""
        with uninterrupted("the unfinished trials are queued again"):
            if self._tasks is not None:
                self._tasks.cancel()
            for numbers in [*self.in_flight.values(), *(numbers for _, numbers in self.elsewhere.values())]:
                self._requeue(numbers, "the driver was interrupted")
        self.in_flight.clear()
        self.elsewhere.clear()

    def _log_progress(self, elapsed_s: float) -> None:
        outcome = self.outcome
        left = max(0, outcome.n_trials - outcome.n_complete)
        running = len(self._tasks.running_job_indexes()) if self._tasks is not None else 0
        done_jobs = outcome.ran - len(self.in_flight)
        eta = "unknown"
        if done_jobs > 0:
            # A rough estimate: the pace of this launch's jobs so far, assuming each trial left
            # runs a job (reused trials take no time).
            eta = format_seconds(elapsed_s / done_jobs * left)
        elsewhere = f", {len(self.elsewhere)} running in another sweep" if self.elsewhere else ""
        log.info(
            "study progress: %d/%d complete, %d failed and %d reused in this launch, %d jobs running, "
            "%d waiting to start%s, elapsed %s, estimated time left %s",
            outcome.n_complete, outcome.n_trials, len(outcome.failed), outcome.reused, running,
            len(self.in_flight) - running, elsewhere, format_seconds(elapsed_s), eta,
        )


def finished_runs_by_hash(recorder: RunRecorder) -> dict[str, tuple[str, dict[str, float]]]:
    """Return the run id and metrics of the FINISHED job run of each config hash in the experiment."""
    return {
        config_hash: (run.info.run_id, dict(run.data.metrics))
        for config_hash, run in recorder.finished_job_runs().items()
    }


def run_study(
    prepared: Any,
    space: SearchSpace,
    settings: OptunaSettings,
    study_name: str,
    job_function: str = DEFAULT_JOB_FUNCTION,
    progress_interval_s: float = 30.0,
    sweep_dir: Path | None = None,
    drain: threading.Event | None = None,
) -> StudyOutcome:
    """Run one launch of the study under its MLflow parent run and log its Pareto front.
    Once `drain` is set (by SIGUSR1, see saffu.launch.drain_on_signal), no trial starts any more.

    `prepared` is the :class:`saffu.planning.PreparedSweep` of the whole space; the
    tables are also written to `sweep_dir` when given. The parent
    run ends FINISHED when the study has `settings.n_trials` COMPLETE trials, FAILED when it
    stopped short, and KILLED when the driver is interrupted or drained (SIGUSR1) before
    reaching them. A local Ray started here is stopped on every path out.
    """
    from saffu.planning import open_sweep_run

    study = open_study(settings, study_name, space)
    recorder = RunRecorder(prepared.tracking)
    commit = git_commit()
    sweep_id = study_sweep_id(settings.storage, study_name)
    params = {
        **prepared.params,
        "optuna.sampler": settings.sampler,
        "optuna.seed": settings.seed,
        "optuna.population_size": settings.population_size,
        "optuna.storage": redact_uri(settings.storage),
        "optuna.study_name": study_name,
        "optuna.objectives": list(OBJECTIVES),
    }
    # open_sweep_run raises SweepAlreadyRunning while another live driver runs this study,
    # so the RUNNING trials that requeue_stale_trials fails below are really abandoned.
    parent_run_id = open_sweep_run(recorder, sweep_id, prepared.name, params, commit)
    recorder.set_tags(parent_run_id, {TAG_OPTUNA_STUDY: study_name})
    status = "KILLED"
    try:
        requeue_stale_trials(study, space)
        outcome = _run_trials(study, space, settings, prepared, recorder, parent_run_id, sweep_id, commit,
                              job_function, progress_interval_s, drain)
        outcome.pareto = pareto_rows(study)
        log_study_results(recorder, parent_run_id, study, outcome, sweep_dir)
        status = "FINISHED"
        if outcome.exit_code == EXIT_DRAINED:
            status = "KILLED"
        elif not outcome.reached:
            status = "FAILED"
    except (RayJoinError, ArtifactStoreError):
        status = "FAILED"
        raise
    finally:
        recorder.end_run(parent_run_id, status)
    return outcome


def _run_trials(
    study: Any,
    space: SearchSpace,
    settings: OptunaSettings,
    prepared: Any,
    recorder: RunRecorder,
    parent_run_id: str,
    sweep_id: str,
    commit: str,
    job_function: str,
    progress_interval_s: float,
    drain: threading.Event | None = None,
) -> StudyOutcome:
    from optuna.trial import TrialState

    n_complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    if n_complete >= settings.n_trials:
        log.info("study %s already has %d COMPLETE trials (n_trials=%d); nothing to run",
                 study.study_name, n_complete, settings.n_trials)
        return StudyOutcome(study.study_name, n_complete, settings.n_trials)
    log.info(
        "study %s (%s sampler, storage %s): %d of %d trials COMPLETE, up to %d jobs at once",
        study.study_name, settings.sampler, redact_uri(settings.storage), n_complete, settings.n_trials,
        settings.parallel,
    )
    finished = finished_runs_by_hash(recorder)
    with sigterm_as_interrupt(), contextlib.ExitStack() as stack:

        def start_tasks() -> JobTasks:
            stack.enter_context(RaySession(prepared.ray_settings))
            return JobTasks(
                prepared.tracking, prepared.ray_settings, parent_run_id=parent_run_id, sweep_id=sweep_id,
                commit=commit, max_retries=prepared.max_retries, job_function=job_function,
            )

        other_sweeps = OtherSweeps(recorder, parent_run_id)
        if drain is not None:
            log_stop_signals()
        return StudyLoop(study, space, settings, start_tasks, finished, progress_interval_s, other_sweeps, drain).run()


# ---------------------------------------------------------------------------------------------
# Results


def trial_rows(trials: Iterable[Any]) -> list[dict[str, Any]]:
    """Flatten trials into table rows: number, state, objectives, params, run and config."""
    rows = []
    for trial in trials:
        values = list(trial.values) if trial.values else [None] * len(OBJECTIVES)
        row: dict[str, Any] = {"trial": trial.number, "state": trial.state.name}
        row.update({name: value for name, value in zip(OBJECTIVES, values)})
        row.update({key: trial.params.get(key) for key in sorted(trial.params)})
        row["mlflow_run_id"] = trial.user_attrs.get("mlflow_run_id", "")
        row["reused"] = trial.user_attrs.get("reused", "")
        row["config_hash"] = trial.user_attrs.get("config_hash", "")
        row["fail_reason"] = trial.user_attrs.get("fail_reason", "")
        rows.append(row)
    return rows


def pareto_rows(study: Any) -> list[dict[str, Any]]:
    """Return the study's Pareto front (``best_trials``) as rows, lowest perplexity first.
    Trials of one config have the same values, so only the first such trial is listed."""
    front = sorted(study.best_trials, key=lambda trial: (trial.values[0], trial.values[1], trial.number))
    rows = []
    seen: set[str] = set()
    for row in trial_rows(front):
        key = row["config_hash"] or f"trial-{row['trial']}"
        if key in seen:
            continue
        seen.add(key)
        del row["state"], row["fail_reason"]
        rows.append(row)
    return rows


def rows_to_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        return ""
    columns = list(rows[0])
    for row in rows[1:]:
        columns.extend(key for key in row if key not in columns)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """Format rows as a fixed-width text table for the log."""
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.6g}"
        return "" if value is None else str(value)

    cells = [[cell(row.get(column)) for column in columns] for row in rows]
    widths = [max([len(column), *(len(line[i]) for line in cells)]) for i, column in enumerate(columns)]
    lines = ["  ".join(column.ljust(width) for column, width in zip(columns, widths))]
    lines.extend("  ".join(text.ljust(width) for text, width in zip(line, widths)) for line in cells)
    return "\n".join(lines)


def log_study_results(
    recorder: RunRecorder, parent_run_id: str, study: Any, outcome: StudyOutcome, sweep_dir: Path | None
) -> None:
    """Log the Pareto front as a table and write ``pareto_front.csv`` and ``trials.csv`` to
    the parent run (and to the sweep folder), with counts as the parent run's metrics."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    pareto_csv = rows_to_csv(outcome.pareto)
    trials_csv = rows_to_csv(trial_rows(trials))
    recorder.log_text(parent_run_id, pareto_csv, "pareto_front.csv")
    recorder.log_text(parent_run_id, trials_csv, "trials.csv")
    if sweep_dir is not None and sweep_dir.is_dir():
        (sweep_dir / "pareto_front.csv").write_text(pareto_csv, encoding="utf-8")
        (sweep_dir / "trials.csv").write_text(trials_csv, encoding="utf-8")
    n_failed = sum(1 for trial in trials if trial.state == TrialState.FAIL)
    recorder.log_metrics(parent_run_id, {
        "optuna/n_trials": float(len(trials)),
        "optuna/n_complete": float(outcome.n_complete),
        "optuna/n_failed": float(n_failed),
        "optuna/pareto_size": float(len(outcome.pareto)),
    })

    columns = [name for name in (outcome.pareto[0] if outcome.pareto else {}) if name not in ("config_hash", "reused")]
    log.info(
        "study %s: %d/%d trials COMPLETE; this launch ran %d jobs, reused %d FINISHED runs, %d trials failed. "
        "Pareto front (%d trials, pareto_front.csv on run %s):\n%s",
        outcome.study_name, outcome.n_complete, outcome.n_trials, outcome.ran, outcome.reused, len(outcome.failed),
        len(outcome.pareto), parent_run_id, format_table(outcome.pareto, columns) if columns else "(empty)",
    )
    for number, reason in outcome.failed:
        log.error("failed trial %d: %s", number, reason)


def describe_space(space: SearchSpace) -> str:
    return ", ".join(f"{key} in {{{', '.join(values)}}}" for key, values in space.choices.items())

