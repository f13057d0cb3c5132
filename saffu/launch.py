"""Running tracked jobs: in-process for one job, as Ray tasks for a sweep.

The driver owns the MLflow runs: it creates each job attempt's run before it submits the
task and closes the run itself when the worker process dies (SIGKILL, out of memory), so
no attempt is left RUNNING. The task (:func:`execute_job`) logs metrics and artifacts and
closes its run when the job returns or raises.

Ray decides how many jobs run at once from each task's ``num_cpus`` and ``memory``
request. A local Ray instance started here listens on 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from saffu.signals import DRAIN_SIGNAL, drain_requested
from saffu.tracking import (
    TAG_ATTEMPT,
    TAG_CONFIG_HASH,
    TAG_DRIVER_HEARTBEAT,
    TAG_GIT_COMMIT,
    TAG_JOB_INDEX,
    TAG_PARENT,
    TAG_ROLE,
    TAG_SWEEP_ID,
    TAG_WORKER_HOST,
    TAG_WORKER_PID,
    RunRecorder,
    TrackingSpec,
    artifact_store_error,
    driver_is_alive,
    flatten_config,
    hide_run_links,
)

log = logging.getLogger(__name__)

DEFAULT_JOB_FUNCTION = "saffu.job:run_job"
# The status of a job that a draining sweep did not start (see JobTasks.drain).
NOT_STARTED = "NOT_STARTED"
# The exit status of a sweep that stopped starting jobs on request and left some for the
# next launch: EX_TEMPFAIL of sysexits.h, "try again later".
EXIT_DRAINED = 75
# How often a driver writes its heartbeat on the sweep's parent run.
HEARTBEAT_INTERVAL_S = 30.0

# Ray errors that mean the worker process or its node died, not that the job raised.
_WORKER_DEATH_ERRORS = (
    "WorkerCrashedError",
    "OutOfMemoryError",
    "NodeDiedError",
    "LocalRayletDiedError",
    "ObjectLostError",
    "OwnerDiedError",
    "TaskCancelledError",
)


@dataclass
class JobSpec:
    """One job of a sweep: its resolved config and what the driver derived from it."""

    index: int
    label: str
    overrides: list[str]
    config: dict[str, Any]
    config_hash: str
    output_dir: str
    n_params: int | None = None
    memory_bytes: int = 0
    train_tokens: int = 0


@dataclass
class JobOutcome:
    """Result of one job attempt, returned by the task to the driver."""

    status: str
    run_id: str
    metrics: dict[str, float] = field(default_factory=dict)
    error: str = ""
    seconds: float = 0.0


@dataclass
class RaySettings:
    """The ``ray`` config node: where to run and what each job requests."""

    address: str | None = None
    cpus_per_job: float = 1
    num_cpus: int | None = None
    memory_factor: float = 6.0
    memory_base_mb: int = 512
    max_job_memory_gb: float | None = None
    temp_dir: str | None = None
    log_to_driver: bool = False

    @classmethod
    def from_config(cls, node: Mapping[str, Any]) -> RaySettings:
        """Read the ``ray`` node; raises validation.ConfigError naming each bad value."""
        from saffu.validation import ConfigError, check_ray_settings

        problems = check_ray_settings(node)
        if problems:
            raise ConfigError(problems)
        known = {name: node[name] for name in cls.__dataclass_fields__ if name in node}
        return cls(**known)


@dataclass
class SweepSummary:
    """Counts and failures of one launch of a sweep."""

    finished: list[JobSpec] = field(default_factory=list)
    skipped: list[JobSpec] = field(default_factory=list)
    failed: list[tuple[JobSpec, str]] = field(default_factory=list)
    # Jobs of this launch that another sweep finished while this one waited; also in `skipped`.
    finished_elsewhere: int = 0
    # Jobs that a launch drained on request (SIGUSR1, see drain_on_signal) left for the next one.
    not_started: list[JobSpec] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        if self.failed:
            return 1
        return EXIT_DRAINED if self.not_started else 0


def estimate_memory_bytes(n_params: int | None, factor: float, base_mb: int) -> int:
    """Estimate a job's peak memory: 4 bytes per float32 parameter times `factor` (gradients,
    two Adam moments and activations on top of the weights), plus `base_mb` for the process.
    An estimate for Ray's scheduler, not a measurement."""
    params = n_params or 0
    return int(4 * params * factor + base_mb * 2**20)


def machine_memory_bytes() -> int | None:
    """Physical memory of this machine, or None where the OS does not report it."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def job_memory_limit(settings: RaySettings) -> int | None:
    """Return the maximum memory one job may need: ``ray.max_job_memory_gb``, or by default
    this machine's physical memory on a local Ray. A cluster's nodes may differ, so
    joining one checks nothing unless the limit is set."""
    if settings.max_job_memory_gb is not None:
        return int(float(settings.max_job_memory_gb) * 2**30)
    return machine_memory_bytes() if settings.address is None else None


def describe_overrides(overrides: list[str]) -> str:
    """Shorten overrides for run names and logs: ``model.block_size=4`` becomes ``block_size=4``."""
    short = []
    for override in overrides:
        text = override.lstrip("+~")
        for prefix in ("model/", "model."):
            if text.startswith(prefix):
                text = text[len(prefix):]
        short.append(text)
    return " ".join(short)


def import_function(path: str) -> Callable[..., Any]:
    """Import ``package.module:function`` (or ``package.module.function``)."""
    module_name, _, attribute = path.partition(":") if ":" in path else path.rpartition(".")
    if not module_name or not attribute:
        raise ValueError(f"job function {path!r} is not of the form package.module:function")
    return getattr(importlib.import_module(module_name), attribute)


# ---------------------------------------------------------------------------------------------
# One job attempt, in the worker process (or in-process for `python sweep.py`)


def create_job_run(
    recorder: RunRecorder,
    job: JobSpec,
    attempt: int,
    parent_run_id: str | None,
    sweep_id: str | None,
    commit: str,
    extra_tags: Mapping[str, str] | None = None,
) -> str:
    """Create the MLflow run of one job attempt, with tags, params and config.yaml."""
    tags = {
        **(extra_tags or {}),
        TAG_ROLE: "job",
        TAG_CONFIG_HASH: job.config_hash,
        TAG_GIT_COMMIT: commit,
        TAG_ATTEMPT: str(attempt),
        TAG_JOB_INDEX: str(job.index),
    }
    if parent_run_id:
        tags[TAG_PARENT] = parent_run_id
    if sweep_id:
        tags[TAG_SWEEP_ID] = sweep_id
    name = job.label or f"job-{job.index}"
    if attempt > 1:
        name += f" (attempt {attempt})"
    run_id = recorder.create_run(name, tags, flatten_config(job.config))
    try:
        recorder.log_text(run_id, yaml.safe_dump(job.config, sort_keys=False), "config.yaml")
    except Exception as error:
        # Leave no RUNNING run behind when the artifact store cannot be written.
        with contextlib.suppress(Exception):
            recorder.end_run(run_id, "FAILED")
        raise artifact_store_error(error, f"config.yaml of run {run_id}", recorder.secret_uris()) from None
    return run_id


def execute_job(
    job: JobSpec,
    tracking: TrackingSpec,
    run_id: str,
    job_function: str = DEFAULT_JOB_FUNCTION,
    cpus: float = 1,
    progress_board: Any = None,
) -> JobOutcome:
    """Run one job attempt and record it in its MLflow run, which the caller created.

    A job that raises leaves a FAILED run with ``traceback.txt`` and returns status FAILED;
    this function raises only when the store itself cannot be written. The job's log,
    stdout and stderr go to ``job.log`` in its output folder, also logged as an artifact.
    """
    started = time.monotonic()
    hide_run_links(tracking.uri)  # A worker on another node does not inherit the driver's setting.
    recorder = RunRecorder(tracking)
    recorder.set_tags(run_id, {TAG_WORKER_PID: os.getpid(), TAG_WORKER_HOST: socket.gethostname()})
    if progress_board is not None:
        # Not waited for: a task blocked in ray.get gives its CPUs back to Ray's scheduler,
        # which would start a queued job in the meantime.
        with contextlib.suppress(Exception):
            progress_board.start.remote(job.index)

    output_dir = Path(job.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    log_path = output_dir / "job.log"

    def log_metric(name: str, value: float, step: int | None = None) -> None:
        recorder.log_metric(run_id, name, value, step)

    with _job_log(log_path):
        log.info("job #%d (%s) starts, run %s, config hash %s", job.index, job.label, run_id, job.config_hash)
        try:
            _limit_threads(cpus)
            function = import_function(job_function)
            from omegaconf import OmegaConf

            metrics = function(OmegaConf.create(job.config), log_metric=log_metric)
            finals = _numeric_metrics(metrics)
        except Exception as error:
            text = traceback.format_exc()
            log.error("job #%d failed: %s: %s", job.index, type(error).__name__, error)
            outcome = JobOutcome("FAILED", run_id, error=f"{type(error).__name__}: {error}")
        else:
            text = ""
            log.info("job #%d finished in %.1f s", job.index, time.monotonic() - started)
            outcome = JobOutcome("FINISHED", run_id, metrics=finals)

    if outcome.status == "FINISHED":
        recorder.log_metrics(run_id, outcome.metrics)
    else:
        recorder.log_text(run_id, text, "traceback.txt")
    if log_path.is_file():
        recorder.log_artifact(run_id, log_path)
    recorder.end_run(run_id, outcome.status)
    outcome.seconds = time.monotonic() - started
    return outcome


@contextlib.contextmanager
def _job_log(path: Path) -> Iterator[None]:
    """Send logging records, stdout and stderr (progress bars) to `path` while the job runs."""
    with path.open("a", encoding="utf-8", buffering=1) as stream:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
        root = logging.getLogger()
        old_level = root.level
        root.addHandler(handler)
        if root.level > logging.INFO or root.level == logging.NOTSET:
            root.setLevel(logging.INFO)
        try:
            with contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
                yield
        finally:
            root.removeHandler(handler)
            root.setLevel(old_level)


def _limit_threads(cpus: float) -> None:
    import torch

    torch.set_num_threads(max(1, int(cpus)))


def _numeric_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    if not isinstance(metrics, Mapping):
        raise TypeError(f"the job function returned {type(metrics).__name__}, expected a dict of metric name -> number")
    finals = {}
    for name, value in metrics.items():
        try:
            finals[str(name)] = float(value)
        except (TypeError, ValueError):
            log.warning("metric %s=%r is not a number; it is not logged", name, value)
    return finals


# ---------------------------------------------------------------------------------------------
# Ray


class RayJoinError(RuntimeError):
    """The driver could not join the Ray cluster at ``ray.address``."""


# Number of attempts to join a cluster, and the wait in seconds before the second attempt.
# Each later wait grows by the same amount.
JOIN_ATTEMPTS = 3
JOIN_RETRY_S = 5.0


def ray_address_problem(address: str | None, timeout_s: float = 5.0) -> str | None:
    """Return a message when `address` (``HOST:PORT`` or ``ray://HOST:PORT``) accepts no TCP
    connection, else None. Without this check, ``ray.init`` waited more than three minutes
    on a GCS address that nothing listens on (Ray 2.60) before it failed with a traceback."""
    if address is None or address == "auto":
        return None
    fix = (
        "start the cluster first, or give the head node's GCS address (HOST:6379) or its Ray "
        "client address (ray://HOST:10001); leave ray.address unset to start a local Ray"
    )
    host, _, port = address.removeprefix("ray://").rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit():
        return (
            f"ray.address={address!r} is not HOST:PORT, ray://HOST:PORT or auto; give the head node's GCS "
            "address (HOST:6379) or its Ray client address (ray://HOST:10001), or leave ray.address unset"
        )
    if not 1 <= int(port) <= 65535:
        return f"ray.address={address!r}: port {port} is out of range; a port is 1 to 65535"
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return None
    except OSError as error:
        reason = error.strerror or str(error) or type(error).__name__
        return f"ray.address={address!r}: no connection to {host}:{port} ({reason}); {fix}"


class RaySession:
    """A connection to Ray for one sweep: starts a local instance on 127.0.0.1 when
    `settings.address` is None and stops it on exit (also on errors), or joins the cluster
    at `settings.address` ("auto", "ray://host:10001") and leaves it running."""

    def __init__(self, settings: RaySettings) -> None:
        self.settings = settings
        self.started_local = False
        self.temp_dir: str | None = None

    def __enter__(self) -> RaySession:
        # Usage statistics would go to an outside server.
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        handlers = _python_handlers()
        interrupted = threading.Event()
        try:
            with _note_ctrl_c(interrupted):
                if self.settings.address is None:
                    self._start_local()
                else:
                    self._join()
        except SystemExit as error:
            # While it starts, ray.init handles SIGTERM with sys.exit(15) (Ray 2.60).
            self._stop()
            if error.code == signal.SIGTERM:
                raise KeyboardInterrupt(f"signal {signal.SIGTERM} while Ray started") from None
            raise
        except BaseException:
            self._stop()
            raise
        finally:
            # ray.init also installs a native SIGTERM handler in front of Python's. It prints a
            # stack trace, and the process aborts soon after, before the cleanup that the Python
            # handler starts has marked every run (seen with Ray 2.60: a parent run left RUNNING
            # and Ray's agent processes orphaned). Putting the Python handlers back gives the
            # cleanup its time.
            _restore_handlers(handlers)
        if interrupted.is_set():
            # Ray's start-up code caught the KeyboardInterrupt of a Ctrl-C and went on.
            self._stop()
            raise KeyboardInterrupt("Ctrl-C while Ray started")
        return self

    def _join(self) -> None:
        """Join the cluster at `settings.address`, trying JOIN_ATTEMPTS times.

        A Ray client server starts one server process per connecting driver. On a loaded
        head node that start can fail with "Starting Ray client server failed", and the next
        connection starts a fresh server process.
        """
        import ray

        address = self.settings.address
        for attempt in range(1, JOIN_ATTEMPTS + 1):
            try:
                ray.init(address=address, log_to_driver=self.settings.log_to_driver)
                break
            except ConnectionError as error:
                if ray.is_initialized():
                    ray.shutdown()
                text = str(error).strip()
                reason = text.splitlines()[-1] if text else type(error).__name__
                if attempt == JOIN_ATTEMPTS:
                    raise RayJoinError(
                        f"failed to join the Ray cluster at ray.address={address!r} after {attempt} attempts "
                        f"({reason}). Check that the cluster is running and that its head node's logs show no "
                        f"error, or leave ray.address unset to start a local Ray"
                    ) from error
                log.warning(
                    "joining the Ray cluster at %s failed (%s); trying again in %.0f s (attempt %d of %d)",
                    address, reason, JOIN_RETRY_S * attempt, attempt + 1, JOIN_ATTEMPTS,
                )
                time.sleep(JOIN_RETRY_S * attempt)
        log.info("joined the Ray cluster at %s: %s", address, _format_resources(ray.cluster_resources()))

    def _start_local(self) -> None:
        # With RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, Ray 2.60 runs in its single-machine mode
        # and binds the GCS, the raylet and the workers to the node address, 127.0.0.1 here.
        # Without it they listen on all interfaces even with _node_ip_address="127.0.0.1"
        # (checked with `ss -ltnp`; tests/test_sweep_ray.py checks it on every run).
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        import ray
        from ray._private import ray_constants

        # Python reads the flag once, when ray is first imported; set it here too in case
        # ray was imported before this point.
        ray_constants.ENABLE_RAY_CLUSTER = False

        # A private temp folder keeps this instance apart from other Ray instances on the
        # machine. Its socket paths must stay under 107 characters, so it defaults to /tmp.
        self.temp_dir = tempfile.mkdtemp(prefix="saffu-ray-", dir=self.settings.temp_dir)
        ray.init(
            address="local",
            _node_ip_address="127.0.0.1",
            include_dashboard=False,
            _temp_dir=self.temp_dir,
            num_cpus=self.settings.num_cpus,
            log_to_driver=self.settings.log_to_driver,
        )
        self.started_local = True
        log.info(
            "started a local Ray on 127.0.0.1 (temp folder %s): %s", self.temp_dir, _format_resources(ray.cluster_resources())
        )

    def __exit__(self, *exc_info: object) -> None:
        self._stop()

    def _stop(self) -> None:
        """Disconnect from Ray, stop the local instance and remove its temp folder."""
        import ray

        # A SIGTERM during or after Ray's shutdown ended the process at once, with exit status
        # 143 (seen with Ray 2.60), so the Python handlers are put back after it.
        handlers = _python_handlers()
        try:
            with uninterrupted("Ray stops"):
                if ray.is_initialized():
                    ray.shutdown()
        finally:
            _restore_handlers(handlers)
        if self.started_local:
            log.info("stopped the local Ray")
            self.started_local = False
        if self.temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.temp_dir = None


def _python_handlers() -> dict[int, Any]:
    """Return the current handlers of SIGTERM, SIGINT and DRAIN_SIGNAL."""
    return {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT, DRAIN_SIGNAL)}


def _restore_handlers(handlers: Mapping[int, Any]) -> None:
    """Install `handlers` again (Python functions only), in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum, handler in handlers.items():
        if callable(handler):
            signal.signal(signum, handler)


@contextlib.contextmanager
def _note_ctrl_c(interrupted: threading.Event) -> Iterator[None]:
    """Set `interrupted` on SIGINT inside the block, then raise KeyboardInterrupt as Python
    does, so that a caller sees a Ctrl-C that the code in the block caught and went on."""
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or not callable(previous):
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        interrupted.set()
        previous(signum, frame)

    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _format_resources(resources: Mapping[str, float]) -> str:
    cpus = resources.get("CPU", 0)
    memory = resources.get("memory", 0) / 2**30
    return f"{cpus:g} CPUs, {memory:.1f} GiB memory for tasks"


def _progress_board() -> Any:
    """Start a small actor that records which jobs have started, for the progress line."""
    import ray

    @ray.remote(num_cpus=0)
    class ProgressBoard:
        def __init__(self) -> None:
            self.started: set[int] = set()

        def start(self, index: int) -> None:
            self.started.add(index)

        def started_jobs(self) -> list[int]:
            return sorted(self.started)

    return ProgressBoard.remote()


@dataclass
class _Attempt:
    job: JobSpec
    attempt: int
    run_id: str
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class JobResult:
    """Final result of a job after its retries: FINISHED with metrics, or FAILED with an error."""

    job: JobSpec
    run_id: str
    status: str
    metrics: dict[str, float] = field(default_factory=dict)
    error: str = ""


class Heartbeat:
    """Writes the time on a sweep's parent run when called, at most every HEARTBEAT_INTERVAL_S,
    so that a sweep on another host can tell that this driver is alive (see driver_is_alive)."""

    def __init__(self, recorder: RunRecorder, parent_run_id: str | None) -> None:
        self.recorder = recorder
        self.parent_run_id = parent_run_id
        # The parent run got its first beat with the driver's identity tags.
        self.last = time.monotonic()

    def __call__(self) -> None:
        now = time.monotonic()
        if self.parent_run_id is None or now - self.last < HEARTBEAT_INTERVAL_S:
            return
        self.last = now
        try:
            self.recorder.set_tags(self.parent_run_id, {TAG_DRIVER_HEARTBEAT: f"{time.time():.0f}"})
        except Exception as error:  # A missed beat only makes this driver look older.
            log.warning("could not write the heartbeat on run %s: %s: %s", self.parent_run_id, type(error).__name__, error)


class JobTasks:
    """Tracked job attempts as Ray tasks: :meth:`submit` creates the attempt's MLflow run and
    starts the task, :meth:`wait` collects finished tasks and submits a job whose worker
    died again as a new run, up to `max_retries` times. Ray must already be initialized.

    The grid (:func:`run_jobs`) and the Optuna search (:mod:`saffu.search`) both run their
    jobs through this class, so they share the run layout, the memory requests and the retries.
    """

    def __init__(
        self,
        tracking: TrackingSpec,
        ray_settings: RaySettings,
        *,
        parent_run_id: str | None,
        sweep_id: str | None,
        commit: str,
        max_retries: int = 1,
        job_function: str = DEFAULT_JOB_FUNCTION,
        summary: SweepSummary | None = None,
    ) -> None:
        import ray

        self.tracking = tracking
        self.ray_settings = ray_settings
        self.parent_run_id = parent_run_id
        self.sweep_id = sweep_id
        self.commit = commit
        self.max_retries = max_retries
        self.job_function = job_function
        self.summary = summary if summary is not None else SweepSummary()
        self.recorder = RunRecorder(tracking)
        self.memory_cap = ray.cluster_resources().get("memory")
        self.board = _progress_board()
        self.remote = ray.remote(max_calls=1, max_retries=0, retry_exceptions=False)(execute_job)
        self.pending: dict[Any, _Attempt] = {}
        # Runs created by claim() whose task has not been submitted yet.
        self.claimed: set[str] = set()
        self.heartbeat = Heartbeat(self.recorder, parent_run_id)
        # Set by drain(): no job starts any more, and a job whose worker died is not retried.
        self.draining = False
        # Tasks that drain() cancelled before their job started.
        self.drained: set[Any] = set()

    def claim(self, job: JobSpec, tags: Mapping[str, str] | None = None) -> str:
        """Create the RUNNING run of a job's first attempt without starting its task, so that
        other sweeps see the config as taken (see configs_running_elsewhere)."""
        run_id = create_job_run(
            self.recorder, job, 1, self.parent_run_id, self.sweep_id, self.commit, extra_tags=dict(tags or {})
        )
        self.claimed.add(run_id)
        return run_id

    def release(self, run_id: str) -> None:
        """Close a claimed run whose job will not run here: KILLED, then deleted."""
        self.claimed.discard(run_id)
        self.recorder.end_run(run_id, "KILLED")
        self.recorder.delete_run(run_id)

    def submit(
        self, job: JobSpec, attempt: int = 1, tags: Mapping[str, str] | None = None, run_id: str | None = None
    ) -> str:
        """Start the task of one attempt in `run_id` (a claimed run), or in a new run, and
        return the run id. `tags` go on the run, and on the runs of its retries."""
        tags = dict(tags or {})
        if run_id is None:
            run_id = create_job_run(
                self.recorder, job, attempt, self.parent_run_id, self.sweep_id, self.commit, extra_tags=tags
            )
        self.claimed.discard(run_id)
        memory = job.memory_bytes
        if self.memory_cap and memory > self.memory_cap:
            log.warning(
                "job #%d estimates %.1f GiB, more than the %.1f GiB Ray offers; it requests all of it and runs alone",
                job.index, memory / 2**30, self.memory_cap / 2**30,
            )
            memory = int(self.memory_cap)
        options: dict[str, Any] = {"num_cpus": self.ray_settings.cpus_per_job, "name": f"saffu-job-{job.index}"}
        if memory > 0:
            options["memory"] = memory
        ref = self.remote.options(**options).remote(
            job, self.tracking, run_id, self.job_function, self.ray_settings.cpus_per_job, self.board
        )
        self.pending[ref] = _Attempt(job, attempt, run_id, tags)
        return run_id

    def wait(self, timeout_s: float) -> list[JobResult]:
        """Wait up to `timeout_s` for a task to finish and return the jobs that are done,
        which is none when the only finished task's job was submitted again."""
        import ray

        if not self.pending:
            return []
        ready, _ = ray.wait(list(self.pending), num_returns=1, timeout=min(timeout_s, HEARTBEAT_INTERVAL_S))
        self.heartbeat()
        results = []
        for ref in ready:
            attempt = self.pending.pop(ref)
            if ref in self.drained:
                self.drained.discard(ref)
                if not _finished_task(ref):
                    results.append(self._not_started(attempt))
                    continue
            result = _collect(ref, attempt, self.recorder, self.summary, self.max_retries)
            if result is None and self.draining:
                self.summary.not_started.append(attempt.job)  # Its FAILED attempt is in the store.
                results.append(JobResult(attempt.job, attempt.run_id, NOT_STARTED))
            elif result is None:
                self.submit(attempt.job, attempt.attempt + 1, attempt.tags)
            else:
                results.append(result)
        return results

    def drain(self) -> tuple[int, int]:
        """Start no more jobs: the jobs running now go on, and the tasks whose job has not
        started are cancelled and their runs deleted as they come back. Return how many jobs
        are running and how many will not start."""
        import ray

        self.draining = True
        started = _started_jobs(self.board)
        if started is None:
            log.warning("could not read which jobs have started; every submitted job is left to run")
            return len(self.pending), 0
        for ref, attempt in self.pending.items():
            if attempt.job.index not in started:
                # A queued task is dropped. A task that started in the milliseconds before its
                # start reached the board gets KeyboardInterrupt, and its run is deleted in wait()
                # with those of the queued tasks: the job had done next to nothing.
                with contextlib.suppress(Exception):
                    ray.cancel(ref)
                self.drained.add(ref)
        return len(self.pending) - len(self.drained), len(self.drained)

    def _not_started(self, attempt: _Attempt) -> JobResult:
        """Record that a draining sweep did not start `attempt`, and delete its empty run."""
        self.summary.not_started.append(attempt.job)
        try:
            self.release(attempt.run_id)
        except Exception as error:
            log.error("could not close run %s: %s: %s", attempt.run_id, type(error).__name__, error)
        return JobResult(attempt.job, attempt.run_id, NOT_STARTED)

    def cancel(self) -> None:
        """Cancel the unfinished tasks: mark the runs of started jobs KILLED and delete the
        runs of jobs that never started, which hold nothing but their config."""
        _kill_pending(self.pending, self.recorder, _started_jobs(self.board))
        self.pending.clear()
        for run_id in list(self.claimed):
            try:
                self.release(run_id)
            except Exception as error:
                log.error("could not close run %s: %s: %s", run_id, type(error).__name__, error)

    def log_progress(self, total: int, elapsed_s: float, waiting: int = 0) -> None:
        _log_progress(self.summary, self.pending, self.board, total, elapsed_s, waiting)

    def running_job_indexes(self) -> set[int]:
        """Return the indexes of the pending jobs whose task has started in a worker."""
        started = _started_jobs(self.board) or set()
        return {attempt.job.index for attempt in self.pending.values() if attempt.job.index in started}


def run_jobs(
    jobs: list[JobSpec],
    tracking: TrackingSpec,
    ray_settings: RaySettings,
    *,
    parent_run_id: str | None,
    sweep_id: str | None,
    commit: str,
    max_retries: int = 1,
    job_function: str = DEFAULT_JOB_FUNCTION,
    progress_interval_s: float = 30.0,
    skipped: list[JobSpec] | None = None,
    drain: threading.Event | None = None,
) -> SweepSummary:
    """Run `jobs` as Ray tasks and return the summary; Ray must already be initialized.

    A job whose worker dies is recorded FAILED and submitted again as a new run, up to
    `max_retries` times. A job that raises is not retried, because the same config raises
    again. On KeyboardInterrupt (also raised for SIGTERM by the sweeper) the pending tasks
    are cancelled, the runs of started jobs marked KILLED, the runs of jobs that never
    started deleted, and the interrupt re-raised. Once `drain` is set (SIGUSR1, see
    drain_on_signal), no job starts any more and the call returns when the running jobs end.
    """
    summary = SweepSummary(skipped=list(skipped or []))
    if drain is not None and drain.is_set():
        summary.not_started.extend(jobs)
        log.warning("draining on request before any job started: %d jobs are left for the next launch", len(jobs))
        return summary
    tasks = JobTasks(
        tracking, ray_settings, parent_run_id=parent_run_id, sweep_id=sweep_id, commit=commit,
        max_retries=max_retries, job_function=job_function, summary=summary,
    )
    started_at = time.monotonic()
    log.info("submitting %d jobs (%d skipped as already finished)", len(jobs), len(summary.skipped))
    try:
        _, waiting = _start_or_wait(tasks, jobs, parent_run_id)
        if waiting:
            log.warning(
                "%d jobs are running in another sweep; this launch waits for them and runs those that do not "
                "finish there: %s", len(waiting), ", ".join(f"#{job.index} ({job.label})" for job in waiting),
            )

        last_report = last_check = 0.0
        while tasks.pending or waiting:
            if drain is not None and drain.is_set() and not tasks.draining:
                _drain(tasks, waiting)
                waiting = []
            done = tasks.wait(progress_interval_s) if tasks.pending else _idle(tasks, progress_interval_s)
            now = time.monotonic()
            if waiting and now - last_check >= progress_interval_s:
                waiting = _take_over(tasks, waiting, parent_run_id)
                last_check = now
            if any(result.status != NOT_STARTED for result in done) or now - last_report >= progress_interval_s:
                tasks.log_progress(len(jobs), now - started_at, waiting=len(waiting))
                last_report = now
    except BaseException:
        with uninterrupted("the runs of the unfinished jobs are closed"):
            tasks.cancel()
        raise
    return summary


def _drain(tasks: JobTasks, waiting: list[JobSpec]) -> None:
    """Stop starting jobs, and leave those that wait for another sweep to it or the next launch."""
    running, cancelled = tasks.drain()
    tasks.summary.not_started.extend(waiting)
    log.warning(
        "draining on request: no job starts any more; running: %d, left for the next launch: %d; "
        "SIGTERM stops the running jobs too", running, cancelled + len(waiting),
    )


def configs_running_elsewhere(
    recorder: RunRecorder,
    hashes: set[str],
    parent_run_id: str | None,
    claims: Mapping[str, str] | None = None,
) -> set[str]:
    """Return the config hashes among `hashes` that another sweep is running: those with a
    RUNNING job run under the parent run of a live driver. Runs whose driver is dead, or
    cannot be checked (another host, no heartbeat), do not count.

    `claims` maps config hashes to this sweep's own RUNNING runs of them. Another sweep's
    run then counts only when it was created first (start time, then run id), so when two
    sweeps claim one config at once, both see the same order and exactly one runs it.
    The order needs the hosts' clocks to agree.
    """
    runs = recorder.running_job_runs()
    claims = claims or {}
    claim_ids = set(claims.values())
    own_claims = {run.info.run_id: (run.info.start_time or 0, run.info.run_id) for run in runs if run.info.run_id in claim_ids}
    drivers: dict[str, bool] = {}
    running = set()
    for run in runs:
        config = run.data.tags.get(TAG_CONFIG_HASH)
        parent = run.data.tags.get(TAG_PARENT)
        if config not in hashes or parent is None or parent == parent_run_id:
            continue
        claim = own_claims.get(claims.get(config, ""))
        if claim is not None and (run.info.start_time or 0, run.info.run_id) > claim:
            continue  # The other sweep claimed later, so it yields to this one.
        if parent not in drivers:
            parent_run = recorder.get_run(parent)
            drivers[parent] = parent_run.info.status == "RUNNING" and bool(driver_is_alive(parent_run.data.tags))
        if drivers[parent]:
            running.add(config)
    return running


def _idle(tasks: JobTasks, seconds: float) -> list[JobResult]:
    """Wait while only jobs of another sweep are left, and keep the heartbeat going."""
    time.sleep(min(seconds, HEARTBEAT_INTERVAL_S))
    tasks.heartbeat()
    return []


def _start_or_wait(
    tasks: JobTasks, jobs: list[JobSpec], parent_run_id: str | None
) -> tuple[list[JobSpec], list[JobSpec]]:
    """Claim a run for each job, then submit the jobs that no other sweep has finished or
    claimed first. Return the jobs submitted and the jobs to wait for. A job finished
    elsewhere since the sweep was planned counts as skipped. The claims of jobs that do not
    run are released."""
    claims = {job.config_hash: tasks.claim(job) for job in jobs}
    finished = tasks.recorder.finished_config_hashes()
    elsewhere = configs_running_elsewhere(tasks.recorder, set(claims), parent_run_id, claims)
    started, waiting = [], []
    for job in jobs:
        run_id = claims[job.config_hash]
        if job.config_hash in finished:
            tasks.release(run_id)
            _skip_finished_elsewhere(tasks.summary, job)
        elif job.config_hash in elsewhere:
            tasks.release(run_id)
            waiting.append(job)
        else:
            tasks.submit(job, run_id=run_id)
            started.append(job)
    return started, waiting


def _skip_finished_elsewhere(summary: SweepSummary, job: JobSpec) -> None:
    log.info("job #%d (%s) finished in another sweep; skipped", job.index, job.label)
    summary.skipped.append(job)
    summary.finished_elsewhere += 1


def _take_over(tasks: JobTasks, waiting: list[JobSpec], parent_run_id: str | None) -> list[JobSpec]:
    """Check the jobs that another sweep runs: count those it finished as skipped, start those
    it no longer runs (it stopped, or the job failed there), and return the rest."""
    finished = tasks.recorder.finished_config_hashes()
    elsewhere = configs_running_elsewhere(tasks.recorder, {job.config_hash for job in waiting}, parent_run_id)
    still_waiting, free = [], []
    for job in waiting:
        if job.config_hash in finished:
            _skip_finished_elsewhere(tasks.summary, job)
        elif job.config_hash in elsewhere:
            still_waiting.append(job)
        else:
            free.append(job)
    if free:
        # Another waiting sweep may take the same jobs over at once; the claims decide which runs them.
        started, waiting_again = _start_or_wait(tasks, free, parent_run_id)
        for job in started:
            log.info("job #%d (%s) is no longer running in another sweep; running it here", job.index, job.label)
        still_waiting += waiting_again
    return still_waiting


def _finished_task(ref: Any) -> bool:
    """Return True when a finished task's job ended FINISHED; False when it was cancelled,
    failed or raised."""
    import ray

    try:
        return ray.get(ref).status == "FINISHED"
    except Exception:
        return False


def _collect(
    ref: Any, attempt: _Attempt, recorder: RunRecorder, summary: SweepSummary, max_retries: int
) -> JobResult | None:
    """Record the result of a finished task in `summary` and return it, or return None when
    the job should run again because its worker died."""
    import ray

    job = attempt.job
    try:
        outcome: JobOutcome = ray.get(ref)
    except ray.exceptions.RayError as error:
        died = type(error).__name__ in _WORKER_DEATH_ERRORS
        reason = "worker process died" if died else "task failed outside the job"
        message = f"{type(error).__name__}: {str(error).strip()}"
        log.error("job #%d attempt %d: %s (%s)", job.index, attempt.attempt, reason, message.splitlines()[0])
        _close_failed_run(recorder, attempt.run_id, f"{reason} during attempt {attempt.attempt}\n\n{message}\n")
        if died and attempt.attempt <= max_retries:
            log.info("job #%d: retrying (attempt %d of %d)", job.index, attempt.attempt + 1, max_retries + 1)
            return None
        error_line = f"{reason}: {message.splitlines()[0]}"
        summary.failed.append((job, error_line))
        return JobResult(job, attempt.run_id, "FAILED", error=error_line)

    if outcome.status == "FINISHED":
        summary.finished.append(job)
    else:
        summary.failed.append((job, outcome.error))
    return JobResult(job, attempt.run_id, outcome.status, dict(outcome.metrics), outcome.error)


def _close_failed_run(recorder: RunRecorder, run_id: str, text: str) -> None:
    try:
        recorder.log_text(run_id, text, "traceback.txt")
        recorder.end_run(run_id, "FAILED")
    except Exception as error:  # The sweep goes on; the run stays RUNNING in the store.
        log.error("could not mark run %s FAILED: %s: %s", run_id, type(error).__name__, error)


def _started_jobs(board: Any) -> set[int] | None:
    """Return the indexes of the jobs whose task has started, or None when the board does
    not reply within 10 seconds."""
    import ray

    try:
        return set(ray.get(board.started_jobs.remote(), timeout=10))
    except Exception:
        return None


def _kill_pending(pending: Mapping[Any, _Attempt], recorder: RunRecorder, started: set[int] | None) -> None:
    """Cancel the pending tasks and mark their runs KILLED. The run of a job that never
    started is also deleted, so an interrupted sweep leaves no empty runs behind. When
    `started` is None (unknown), every run is kept."""
    import ray

    if pending:
        log.warning("cancelling %d unfinished jobs", len(pending))
    for ref, attempt in pending.items():
        with contextlib.suppress(Exception):
            ray.cancel(ref, force=True)
        never_started = started is not None and attempt.job.index not in started
        try:
            recorder.end_run(attempt.run_id, "KILLED")
            if never_started:
                recorder.delete_run(attempt.run_id)
        except Exception as error:
            log.error("could not close run %s: %s: %s", attempt.run_id, type(error).__name__, error)


def _log_progress(
    summary: SweepSummary, pending: Mapping[Any, _Attempt], board: Any, total: int, elapsed_s: float, waiting: int = 0
) -> None:
    started = _started_jobs(board) or set()
    running = sum(1 for attempt in pending.values() if attempt.job.index in started)
    done = len(summary.finished) + len(summary.failed)
    total -= summary.finished_elsewhere
    left = total - done - len(summary.not_started)
    eta = "unknown"
    if done:
        # Throughput so far, so it already reflects how many jobs run at once.
        eta = format_seconds(elapsed_s / done * left)
    elsewhere = f", {waiting} running in another sweep" if waiting else ""
    if summary.not_started:
        elsewhere += f", {len(summary.not_started)} not started (drained)"
    log.info(
        "sweep progress: %d/%d done (%d finished, %d failed), %d running%s, %d left, elapsed %s, estimated time left %s",
        done, total, len(summary.finished), len(summary.failed), running, elsewhere, left, format_seconds(elapsed_s), eta,
    )


def format_seconds(seconds: float) -> str:
    """Format a duration as ``1h02m``, ``3m05s`` or ``12s``."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


@contextlib.contextmanager
def drain_on_signal() -> Iterator[threading.Event]:
    """Yield an event that DRAIN_SIGNAL sets inside the block, instead of ending the process
    (the signal's default action). A sweep given the event starts no more jobs once it is
    set and ends when the running ones end, so stopping it loses no work. The handler only
    sets the event; the sweep's loop reads it at least every HEARTBEAT_INTERVAL_S."""
    requested = threading.Event()
    if drain_requested.is_set():
        requested.set()

    def handler(signum: int, frame: object) -> None:
        requested.set()

    try:
        previous = signal.signal(DRAIN_SIGNAL, handler)
    except ValueError:  # Not the main thread: leave signals alone.
        yield requested
        return
    try:
        yield requested
    finally:
        signal.signal(DRAIN_SIGNAL, previous)


def log_stop_signals() -> None:
    """Tell how to stop this driver with and without losing the running jobs' work."""
    log.info(
        "to stop after the running jobs, send SIGUSR1 (kill -USR1 %d); SIGTERM or Ctrl-C stops at once",
        os.getpid(),
    )


@contextlib.contextmanager
def uninterrupted(cleanup: str) -> Iterator[None]:
    """Ignore SIGTERM and Ctrl-C inside the block, each with a log line, so that a second
    signal cannot cut short the cleanup that the first one started. SIGKILL still stops the
    driver, and a relaunch closes the runs that it leaves."""

    def handler(signum: int, frame: object) -> None:
        log.warning("signal %d ignored while %s; SIGKILL stops the driver at once", signum, cleanup)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, handler) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Raise KeyboardInterrupt on SIGTERM inside the block, so cleanup code runs."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # Not the main thread: leave signals alone.
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
