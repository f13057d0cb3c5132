"""Turning composed Hydra configs into checked, tracked jobs, before any job starts.

The driver calls :func:`plan_jobs` with every job's composed config: it resolves and
checks them (:mod:`saffu.validation`), prepares each distinct corpus once, counts each
model's parameters and hashes each job config. :func:`open_sweep_run` then creates or
reopens the sweep's parent run, and :func:`run_single` runs one job in-process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue, OmegaConfBaseException

from saffu import validation
from saffu.launch import (
    DEFAULT_JOB_FUNCTION,
    JobSpec,
    RayJoinError,
    RaySession,
    RaySettings,
    SweepSummary,
    create_job_run,
    describe_overrides,
    estimate_memory_bytes,
    execute_job,
    job_memory_limit,
    log_stop_signals,
    run_jobs,
    sigterm_as_interrupt,
)
from saffu.signals import interrupt_behind
from saffu.tracking import (
    HEARTBEAT_TIMEOUT_S,
    SWEEP_MACHINERY_KEYS,
    TAG_DRIVER_HEARTBEAT,
    TAG_DRIVER_HOST,
    TAG_DRIVER_PID,
    TAG_GIT_COMMIT,
    TAG_PARENT,
    TAG_ROLE,
    TAG_SWEEP_ID,
    TAG_SWEEP_NAME,
    TAG_WORKER_PID,
    ArtifactStoreError,
    RunRecorder,
    TrackingSpec,
    artifact_store_error,
    config_hash,
    driver_identity,
    driver_is_alive,
    git_commit,
    prepare_store,
    redact_override,
    redact_uri,
    validate_experiment_name,
    validate_tracking_uri,
)

log = logging.getLogger(__name__)

# Config groups under conf/ that hold sweep or Hydra settings rather than job settings.
NON_JOB_GROUPS = ("sweep", "hydra", "ray", "tracking")


class JobInterrupted(RuntimeError):
    """A single job stopped by Ctrl-C (SIGINT)."""


class SweepAlreadyRunning(RuntimeError):
    """The same sweep is running in another live driver process."""


@dataclass
class Plan:
    """Checked jobs of a sweep, or the problems that stop it."""

    jobs: list[JobSpec] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def resolve_job_config(cfg: DictConfig) -> dict[str, Any] | str:
    """Resolve a composed config and drop the sweep machinery keys. Returns the problem as
    a message when a value is missing (``???``) or an interpolation fails."""
    try:
        return _resolve(cfg)
    except OmegaConfBaseException as error:
        if interrupt_behind(error) is not None:
            raise  # The sweeper stops on it as on the interrupt itself.
        return describe_config_error(error)


def _resolve(cfg: DictConfig) -> dict[str, Any]:
    copy = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    with open_dict(copy):
        for key in SWEEP_MACHINERY_KEYS:
            if key in copy:
                del copy[key]
    # Interpolations such as ${oc.env:...} resolve against this copy, which keeps every job key.
    container = OmegaConf.to_container(copy, resolve=True, throw_on_missing=True)
    assert isinstance(container, dict)
    return container


def describe_config_error(error: OmegaConfBaseException) -> str:
    """Phrase an OmegaConf resolution error as one problem line with a fix."""
    key = getattr(error, "full_key", "") or "a config value"
    if isinstance(error, MissingMandatoryValue):
        hint = " (data.dir=PATH to a folder with train.txt, valid.txt and test.txt)" if key == "data.dir" else ""
        return f"{key} is required but not set (???); set it on the command line{hint}"
    if isinstance(error, InterpolationResolutionError):
        return f"{key} could not be resolved: {str(error).splitlines()[0]}; fix the interpolation or set the value"
    return f"{key} is invalid: {str(error).splitlines()[0]}"


def plan_jobs(
    composed: Sequence[tuple[list[str], dict[str, Any] | str, str]],
    conf_dir: Path | None,
    ray_settings: RaySettings,
) -> Plan:
    """Check every job and derive what the driver needs to run it.

    `composed` holds, per job, its overrides, its resolved job config (see
    :func:`resolve_job_config`) or the message of its composition error, and its output
    folder. Returns the jobs in input order with duplicates (same config hash) dropped, or,
    when any job has a problem, the problems merged across jobs.
    """
    allowed = validation.allowed_config_keys(conf_dir, NON_JOB_GROUPS) if conf_dir else None
    problems: dict[int, list[str]] = {}
    jobs: list[JobSpec] = []

    for index, (overrides, config, output_dir) in enumerate(composed):
        if isinstance(config, str):
            problems.setdefault(index, []).append(config)
            continue
        found = validation.check_job_config(config, allowed)
        if found:
            problems.setdefault(index, []).extend(found)
            continue
        label = describe_overrides(overrides)
        jobs.append(JobSpec(index, label, list(overrides), config, config_hash(config), output_dir))

    if not problems:
        _check_with_corpora(jobs, problems, ray_settings)
    if problems:
        return Plan(problems=validation.merge_problems(problems, len(composed)))
    return Plan(jobs=_drop_duplicates(jobs))


def _check_with_corpora(jobs: list[JobSpec], problems: dict[int, list[str]], ray_settings: RaySettings) -> None:
    """Prepare each distinct (data, tokenizer) config once, then check the settings that
    depend on the corpus and count parameters."""
    from saffu.data import prepare
    from saffu.model import count_parameters

    corpora: dict[str, Any] = {}
    memory_limit = job_memory_limit(ray_settings)
    for job in jobs:
        key = json.dumps({"data": job.config["data"], "tokenizer": job.config["tokenizer"]}, sort_keys=True, default=str)
        if key not in corpora:
            started = time.monotonic()
            try:
                corpora[key] = prepare(OmegaConf.create(job.config["data"]), OmegaConf.create(job.config["tokenizer"]))
            except (OSError, ValueError) as error:
                corpora[key] = f"the corpus could not be prepared: {type(error).__name__}: {error}"
            else:
                corpus = corpora[key]
                log.info(
                    "prepared corpus %s: vocabulary %d, %d training tokens (%.1f s)",
                    corpus.key, corpus.vocab_size, len(corpus.train), time.monotonic() - started,
                )
        corpus = corpora[key]
        if isinstance(corpus, str):
            problems.setdefault(job.index, []).append(corpus)
            continue

        found = validation.check_against_corpus(job.config, corpus.vocab_size, len(corpus.train))
        if found:
            problems.setdefault(job.index, []).extend(found)
            continue
        job.train_tokens = len(corpus.train)
        counts = None
        if job.config["model"].get("name", "saffu") == "saffu":
            try:
                counts = count_parameters(OmegaConf.create(job.config["model"]), corpus.vocab_size)
            except ValueError as error:
                problems.setdefault(job.index, []).append(str(error))
                continue
            job.n_params = int(counts["total"])
        # NOTE: anchor models (kneser_ney, gpt2) get no parameter count here, so Ray reserves
        # only memory_base_mb for them.
        job.memory_bytes = estimate_memory_bytes(job.n_params, ray_settings.memory_factor, ray_settings.memory_base_mb)
        if counts is not None:
            too_big = validation.check_memory(
                counts, job.memory_bytes, memory_limit, ray_settings.memory_factor, ray_settings.memory_base_mb,
                onehot=job.config["model"]["experts"]["kind"] == "onehot",
            )
            if too_big:
                problems.setdefault(job.index, []).append(too_big)


def _drop_duplicates(jobs: list[JobSpec]) -> list[JobSpec]:
    seen: dict[str, JobSpec] = {}
    unique = []
    for job in jobs:
        if job.config_hash in seen:
            log.warning(
                "job #%d (%s) has the same config as job #%d; it runs once",
                job.index, job.label, seen[job.config_hash].index,
            )
            continue
        seen[job.config_hash] = job
        unique.append(job)
    return unique


def sweep_id_of(jobs: Sequence[JobSpec]) -> str:
    """Derive a sweep id from its job configs, so relaunching the same sweep finds its parent run."""
    digest = hashlib.sha256("\n".join(sorted(job.config_hash for job in jobs)).encode()).hexdigest()
    return digest[:12]


def open_sweep_run(
    recorder: RunRecorder,
    sweep_id: str,
    sweep_name: str,
    params: Mapping[str, Any],
    commit: str,
) -> str:
    """Create the sweep's parent run, or reopen the one that an earlier launch of the same
    sweep left. Runs of that launch that are still marked RUNNING become KILLED when their
    job had started, and are deleted when it had not.

    Raises SweepAlreadyRunning when the earlier launch's driver is still alive: its process on
    this host, or its heartbeat on another (see driver_is_alive).
    """
    identity = driver_identity()
    found = recorder.search(f"tags.`{TAG_ROLE}` = 'sweep' and tags.`{TAG_SWEEP_ID}` = '{sweep_id}'")
    if not found:
        name = f"{sweep_name}-{time.strftime('%Y%m%d-%H%M%S')}"
        tags = {TAG_ROLE: "sweep", TAG_SWEEP_ID: sweep_id, TAG_SWEEP_NAME: sweep_name, TAG_GIT_COMMIT: commit, **identity}
        run_id = recorder.create_run(name, tags, params)
        log.info("sweep %s (%s): parent run %s", sweep_name, sweep_id, run_id)
        return run_id

    run = max(found, key=lambda r: r.info.start_time)
    run_id = run.info.run_id
    if run.info.status == "RUNNING":
        alive = driver_is_alive(run.data.tags)
        if alive:
            host = run.data.tags.get(TAG_DRIVER_HOST)
            remote = "" if host == socket.gethostname() else (
                f" (a driver on another host counts as stopped {HEARTBEAT_TIMEOUT_S / 60:.0f} minutes after its "
                f"last heartbeat, tag {TAG_DRIVER_HEARTBEAT})"
            )
            raise SweepAlreadyRunning(
                f"sweep {sweep_id} is already running in process {run.data.tags.get(TAG_DRIVER_PID)} on host "
                f"{host}; wait for it or stop it before relaunching{remote}"
            )
        if alive is None:
            log.warning(
                "sweep %s is marked RUNNING by a driver on host %s, which cannot be checked from here; resuming anyway",
                sweep_id, run.data.tags.get("saffu.driver_host"),
            )
    recorder.reopen_run(run_id, {**identity, TAG_GIT_COMMIT: commit})
    stale = recorder.search(f"tags.`{TAG_PARENT}` = '{run_id}' and attributes.status = 'RUNNING'")
    # A worker tags its run when the job starts, so a run without that tag holds only its config.
    started = {child.info.run_id for child in stale if TAG_WORKER_PID in child.data.tags}
    for child in stale:
        recorder.end_run(child.info.run_id, "KILLED")
        if child.info.run_id not in started:
            recorder.delete_run(child.info.run_id)
    log.info(
        "sweep %s (%s): resuming in parent run %s; %d runs of the interrupted launch marked KILLED, "
        "%d runs of jobs that never started deleted",
        sweep_name, sweep_id, run_id, len(started), len(stale) - len(started),
    )
    return run_id


def run_single(cfg: DictConfig, conf_dir: Path | None, job_function: str = DEFAULT_JOB_FUNCTION) -> dict[str, float]:
    """Check and run one job in this process, logged to MLflow as one run without a parent.

    Raises validation.ConfigError for invalid configs and RuntimeError when the job fails
    (its run is then FAILED with ``traceback.txt``).
    """
    from hydra.core.hydra_config import HydraConfig

    validate_tracking_uri(cfg.tracking.uri)
    validate_experiment_name(cfg.experiment)
    output_dir = HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else "."
    plan = plan_jobs([([], resolve_job_config(cfg), output_dir)], conf_dir, RaySettings.from_config(cfg.ray))
    if plan.problems:
        raise validation.ConfigError(plan.problems)
    job = plan.jobs[0]
    job.label = "single"

    tracking = prepare_store(cfg.tracking.uri, cfg.experiment, cfg.tracking.get("artifact_location"))
    recorder = RunRecorder(tracking)
    run_id = create_job_run(recorder, job, 1, None, None, git_commit())
    log.info("running one job (%d parameters) in run %s of %s", job.n_params or 0, run_id, redact_uri(tracking.uri))
    try:
        outcome = execute_job(job, tracking, run_id, job_function, cpus=_local_cpus())
    except KeyboardInterrupt:
        # Leave no RUNNING run behind: a relaunch then runs the job again in a new run.
        recorder.end_run(run_id, "KILLED")
        raise JobInterrupted(f"the job was interrupted; its run {run_id} is marked KILLED") from None
    if outcome.status != "FINISHED":
        raise RuntimeError(f"the job failed: {outcome.error}; see traceback.txt in run {run_id}")
    log.info("job finished in %.1f s: %s", outcome.seconds, _headline(outcome.metrics))
    return outcome.metrics


def _local_cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _headline(metrics: Mapping[str, float]) -> str:
    shown = [f"{name}={metrics[name]:.4g}" for name in ("val_ppl", "test_ppl", "n_params") if name in metrics]
    return ", ".join(shown) or "no metrics"


@dataclass
class PreparedSweep:
    """A checked sweep, ready to launch: the jobs to run, those skipped as already finished,
    and where to track and run them."""

    name: str
    jobs: list[JobSpec]
    skipped: list[JobSpec]
    tracking: TrackingSpec
    ray_settings: RaySettings
    max_retries: int = 1
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def sweep_id(self) -> str:
        return sweep_id_of(self.jobs + self.skipped)


def split_finished(jobs: list[JobSpec], tracking: TrackingSpec) -> tuple[list[JobSpec], list[JobSpec]]:
    """Split jobs into those to run and those whose config hash already has a FINISHED run."""
    finished = RunRecorder(tracking).finished_config_hashes()
    to_run = [job for job in jobs if job.config_hash not in finished]
    skipped = [job for job in jobs if job.config_hash in finished]
    return to_run, skipped


def run_sweep(
    prepared: PreparedSweep,
    job_function: str = DEFAULT_JOB_FUNCTION,
    progress_interval_s: float = 30.0,
    drain: threading.Event | None = None,
) -> SweepSummary:
    """Run a prepared sweep on Ray under its parent run, and log the summary. Once `drain`
    is set (by SIGUSR1, see saffu.launch.drain_on_signal), no job starts any more.

    The parent run ends FINISHED when every job finished, FAILED when any failed, and
    KILLED when the driver is interrupted (Ctrl-C or SIGTERM) or drained (SIGUSR1) before
    every job started. A local Ray started here is stopped on every path out.
    """
    recorder = RunRecorder(prepared.tracking)
    commit = git_commit()
    parent_run_id = open_sweep_run(recorder, prepared.sweep_id, prepared.name, prepared.params, commit)
    # The list of the sweep's jobs, also those skipped because a FINISHED run of their config
    # exists (benchmarks/optuna_vs_grid.py reads the grid's points from it). It is also the
    # sweep's first artifact, so an artifact store that cannot be written stops the sweep here.
    try:
        recorder.log_text(parent_run_id, jobs_csv(prepared.jobs + prepared.skipped), "jobs.csv")
    except Exception as error:
        recorder.end_run(parent_run_id, "FAILED")
        raise artifact_store_error(error, f"jobs.csv of run {parent_run_id}", recorder.secret_uris()) from None
    status = "KILLED"
    ended = False
    try:
        with sigterm_as_interrupt(), RaySession(prepared.ray_settings):
            if drain is not None:
                log_stop_signals()
            summary = run_jobs(
                prepared.jobs,
                prepared.tracking,
                prepared.ray_settings,
                parent_run_id=parent_run_id,
                sweep_id=prepared.sweep_id,
                commit=commit,
                max_retries=prepared.max_retries,
                job_function=job_function,
                progress_interval_s=progress_interval_s,
                skipped=prepared.skipped,
                drain=drain,
            )
            status = "FINISHED"
            if summary.failed:
                status = "FAILED"
            elif summary.not_started:
                status = "KILLED"
            # Closed before Ray stops, so a signal during Ray's shutdown cannot leave it RUNNING.
            recorder.end_run(parent_run_id, status)
            ended = True
    except (RayJoinError, ArtifactStoreError):
        status = "FAILED"
        raise
    finally:
        if not ended:
            recorder.end_run(parent_run_id, status)
    log_summary(prepared.name, summary)
    return summary


def close_stale_sweep_run(recorder: RunRecorder, sweep_id: str) -> None:
    """Mark FINISHED the parent run of a sweep whose jobs have all finished, when a driver
    that stopped before closing it left it RUNNING (killed while it stopped Ray)."""
    found = recorder.search(
        f"tags.`{TAG_ROLE}` = 'sweep' and tags.`{TAG_SWEEP_ID}` = '{sweep_id}' and attributes.status = 'RUNNING'"
    )
    for run in found:
        if driver_is_alive(run.data.tags) is False:
            recorder.end_run(run.info.run_id, "FINISHED")
            log.info("closed parent run %s, which a stopped driver left RUNNING", run.info.run_id)


def jobs_csv(jobs: Sequence[JobSpec]) -> str:
    """Return ``index,config_hash,overrides`` lines for `jobs`, sorted by index."""
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["index", "config_hash", "overrides"])
    for job in sorted(jobs, key=lambda job: job.index):
        writer.writerow([job.index, job.config_hash, " ".join(redact_override(argument) for argument in job.overrides)])
    return buffer.getvalue()


def log_summary(name: str, summary: SweepSummary) -> None:
    """Log the end-of-sweep counts and one line per failed job."""
    counts = (name, len(summary.finished), len(summary.skipped), len(summary.failed))
    if summary.not_started:
        log.warning(
            "sweep %s drained: %d finished, %d skipped (already finished), %d failed, %d not started; "
            "relaunch the same command to run them", *counts, len(summary.not_started),
        )
    else:
        log.info("sweep %s done: %d finished, %d skipped (already finished), %d failed", *counts)
    for job, error in summary.failed:
        log.error("failed job #%d (%s), config hash %s: %s", job.index, job.label, job.config_hash, error)
