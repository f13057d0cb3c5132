"""Read SAFFU sweep runs from an MLflow tracking store into pandas DataFrames.

The store follows the schema that the sweep writes. An experiment contains one parent run
per sweep (tag ``saffu.role=sweep``) and one nested child run per job (tag
``saffu.role=job``). A job's params are its flattened config and its metrics are its
results. :func:`load_runs` returns the finished jobs as one typed row each, and
keeps the failed, unfinished and duplicate runs in their own frames so that a caller can
report them.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pandas as pd
from mlflow.entities import Run, ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from saffu.tracking import (
    DATABASE_SCHEMES,
    TrackingURIError,
    redact_text,
    redact_uri,
    sqlite_path,
    validate_tracking_uri,
)

log = logging.getLogger(__name__)

ROLE_TAG = "saffu.role"
SWEEP_ID_TAG = "saffu.sweep_id"
CONFIG_HASH_TAG = "saffu.config_hash"
GIT_COMMIT_TAG = "saffu.git_commit"
PARENT_RUN_TAG = "mlflow.parentRunId"
# A job's worker sets this tag when the job starts.
WORKER_PID_TAG = "saffu.worker_pid"

FINISHED = "FINISHED"
FAILED_STATUSES = ("FAILED", "KILLED")

ANCHOR_MODELS = ("kneser_ney", "gpt2")
PHASES = ("explicit", "finetune", "bp_only")
# Metrics whose sum is a job's wall-clock time, in seconds. A phase that did not run
# logs nothing and adds nothing.
PHASE_SECONDS = ("explicit/solve_seconds", "finetune/seconds", "bp_only/seconds")
# Phases that train by backpropagation under the train.max_seconds cap.
TRAINED_PHASES = ("finetune", "bp_only")
CURVE_METRICS = ("finetune/epoch_val_ppl", "bp_only/epoch_val_ppl")

# Columns that every frame returned by load_runs has, before the params and metrics.
RUN_COLUMNS = (
    "run_id",
    "run_name",
    "status",
    "role",
    "sweep_id",
    "parent_run_id",
    "config_hash",
    "git_commit",
    "start_time",
    "end_time",
    "started",
)

_INT_PATTERN = re.compile(r"[+-]?\d+")
_NONE_STRINGS = frozenset({"None", "null", "none", "~", ""})


class AnalysisError(Exception):
    """Base class of the errors that the analysis package raises on bad input."""


class TrackingStoreError(AnalysisError):
    """The tracking URI is invalid, or the store behind it cannot be read."""


class ExperimentNotFoundError(AnalysisError):
    """The tracking store has no experiment of the requested name."""


class NoRunsError(AnalysisError):
    """The experiment, or the requested sweep, has no runs."""


@dataclass
class SweepRuns:
    """The runs of one experiment or one sweep, split by what the analysis can use.

    Attributes:
        jobs: one row per finished job and distinct config hash (the latest finished run
            of each hash). The columns are RUN_COLUMNS, one column per param named by its
            config key (``model.block_size``, ...) and typed by :func:`parse_param_column`,
            and one float64 column per metric (``val_ppl``, ``explicit/val_ppl``, ...).
            The derived columns follow: ``model`` (``model.name``, or ``unknown``),
            ``experts`` (``onehot``, ``bitcode32``, ...), ``is_anchor`` (bool) and
            ``wall_seconds`` (sum of the logged PHASE_SECONDS, NaN when none is logged),
            and for each training phase that some job ran, ``finetune/capped`` and
            ``bp_only/capped`` (nullable boolean: True when the ``train.max_seconds``
            cap cut the phase short; see :func:`capped_phase`).
        failed: runs with status FAILED, or KILLED after their job started, same columns
            as ``jobs`` plus ``retried_ok`` (True when a later finished run has the same
            config hash).
        unfinished: runs with any other status (RUNNING, SCHEDULED), same columns.
        never_started: KILLED runs whose job never started (no ``saffu.worker_pid`` tag):
            queued jobs of an interrupted launch. They hold only their config.
        duplicates: finished runs that a later finished run of the same config hash
            replaced, same columns plus ``kept_run_id``.
        sweeps: the parent runs (tag ``saffu.role=sweep``): RUN_COLUMNS only.
        untagged: runs with neither role tag, which the analysis leaves out.
        tracking_uri, experiment_name, experiment_id, sweep_id: what was read.
    """

    jobs: pd.DataFrame
    failed: pd.DataFrame
    unfinished: pd.DataFrame
    never_started: pd.DataFrame
    duplicates: pd.DataFrame
    sweeps: pd.DataFrame
    untagged: pd.DataFrame
    tracking_uri: str
    experiment_name: str
    experiment_id: str
    sweep_id: str | None = None

    def summary(self) -> dict[str, int]:
        """Return the run counts by category, for logs and reports."""
        retried = int(self.failed["retried_ok"].sum()) if len(self.failed) else 0
        return {
            "sweeps": len(self.sweeps),
            "finished_jobs": len(self.jobs),
            "anchors": int(self.jobs["is_anchor"].sum()) if len(self.jobs) else 0,
            "failed": len(self.failed),
            "failed_then_finished": retried,
            "unfinished": len(self.unfinished),
            "never_started": len(self.never_started),
            "duplicates_dropped": len(self.duplicates),
            "untagged": len(self.untagged),
        }


def open_client(tracking_uri: str) -> MlflowClient:
    """Return an MlflowClient for an existing tracking store.

    Raises TrackingStoreError for a URI that MLflow cannot parse, and for a local store
    (``sqlite:///PATH``, ``file:PATH`` or a bare path) whose file or folder is missing,
    because MLflow would otherwise create an empty store there.

    For an http(s) URI, the server's ``/health`` must answer within 10 seconds, so a dead
    server fails at once instead of after MLflow's retries. For a database URI, its driver
    must be installed. Messages show the URI with its password replaced by ``***``.
    """
    if not tracking_uri or not tracking_uri.strip():
        raise TrackingStoreError("the tracking URI is empty; pass one such as sqlite:///mlflow.db")
    _check_local_store_exists(tracking_uri)
    if urlparse(tracking_uri).scheme.split("+", 1)[0] in ("http", "https", *DATABASE_SCHEMES):
        try:
            validate_tracking_uri(tracking_uri)
        except TrackingURIError as error:
            raise TrackingStoreError(str(error)) from error
    try:
        client = MlflowClient(tracking_uri=tracking_uri)
        # The client opens its store on first use. One small read here makes a malformed
        # database URL or a file that is not a database raise a TrackingStoreError.
        client.search_experiments(max_results=1)
        return client
    except Exception as error:  # MLflow's and SQLAlchemy's errors, for example rejected credentials
        raise _open_error(tracking_uri, error) from error


def _open_error(tracking_uri: str, error: Exception) -> TrackingStoreError:
    """Return the error to raise when the store at `tracking_uri` cannot be opened."""
    redacted = redact_uri(tracking_uri)
    text = (error.message if isinstance(error, MlflowException) else str(error)).strip()
    folder = sqlite_path(tracking_uri).parent if sqlite_path(tracking_uri) else None
    if folder is not None and "unable to open database file" in text and not os.access(folder, os.W_OK):
        return TrackingStoreError(
            f"failed to open the tracking store {redacted!r}: the folder {str(folder)!r} is not writable, and SQLite "
            "writes its -wal and -shm files there even to read; copy the store to a writable folder"
        )
    reason = redact_text(text.splitlines()[0], tracking_uri) if text else type(error).__name__
    return TrackingStoreError(f"failed to open the tracking store {redacted!r}: {reason}; pass the URI of an MLflow store")


def _check_local_store_exists(tracking_uri: str) -> None:
    parsed = urlparse(tracking_uri)
    if parsed.scheme == "sqlite":
        # sqlite:///relative.db and sqlite:////abs/path.db: the path follows the third slash.
        path_text = tracking_uri[len("sqlite:///") :] if tracking_uri.startswith("sqlite:///") else ""
        if path_text in ("", ":memory:"):
            return
        path = Path(path_text.split("?", 1)[0])
        if not path.is_file():
            raise TrackingStoreError(
                f"tracking store not found: {redact_uri(tracking_uri)!r} names the SQLite file {str(path)!r}, "
                "which does not exist; run a sweep first or pass the URI of an existing store"
            )
    elif parsed.scheme in ("", "file"):
        path = Path(parsed.path if parsed.scheme == "file" else tracking_uri)
        if path.is_file() or (not path.exists() and path.suffix in (".db", ".sqlite", ".sqlite3")):
            raise TrackingStoreError(
                f"{redact_uri(tracking_uri)!r} is a file path, not a tracking URI; for an SQLite store "
                f"write sqlite:///{path}"
            )
        if not path.is_dir():
            raise TrackingStoreError(
                f"tracking store not found: {redact_uri(tracking_uri)!r} names the folder {str(path)!r}, "
                "which does not exist"
            )


def find_experiment(client: MlflowClient, experiment_name: str, tracking_uri: str) -> str:
    """Return the id of the active experiment named `experiment_name`.

    Raises ExperimentNotFoundError, naming the experiments that the store has or how to
    restore a deleted one, or TrackingStoreError when the store cannot be read.
    """
    try:
        experiment = client.get_experiment_by_name(experiment_name)
        names = [] if experiment else sorted(e.name for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY))
    except MlflowException as error:
        raise TrackingStoreError(
            f"failed to read the tracking store {redact_uri(tracking_uri)!r}: {redact_text(error.message, tracking_uri)}"
        ) from error
    except Exception as error:  # connection errors of the REST and SQL backends
        raise TrackingStoreError(
            f"failed to read the tracking store {redact_uri(tracking_uri)!r}: {redact_text(str(error), tracking_uri)}"
        ) from error
    if experiment is not None and experiment.lifecycle_stage == "active":
        return experiment.experiment_id
    if experiment is not None:
        raise ExperimentNotFoundError(
            f"experiment {experiment_name!r} is deleted in {redact_uri(tracking_uri)!r}; restore it "
            f"(`mlflow experiments restore --experiment-id {experiment.experiment_id}`) or choose another experiment"
        )
    raise ExperimentNotFoundError(
        f"experiment {experiment_name!r} not found in {redact_uri(tracking_uri)!r}; "
        f"experiments there: {', '.join(names) if names else 'none'}"
    )


def search_all_runs(client: MlflowClient, experiment_id: str, filter_string: str = "") -> list[Run]:
    """Return every active run of an experiment that matches `filter_string`, page by page."""
    runs: list[Run] = []
    page_token = None
    while True:
        page = client.search_runs(
            experiment_ids=[experiment_id],
            filter_string=filter_string,
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=1000,
            page_token=page_token,
        )
        runs.extend(page)
        page_token = page.token
        if not page_token:
            return runs


def add_store_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the --tracking-uri, --experiment and --sweep-id options that select the runs."""
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db",
                        help="MLflow tracking URI to read (default: sqlite:///mlflow.db)")
    parser.add_argument("--experiment", default="saffu", help="MLflow experiment name (default: saffu)")
    parser.add_argument("--sweep-id", default=None, help="read only the runs tagged saffu.sweep_id=ID (default: all)")


def as_options(message: str) -> str:
    """Name the command-line options in a message of the store checks, which name the
    sweep's config keys."""
    return (
        message.replace("tracking.uri=", "--tracking-uri ")
        .replace("set tracking.uri to", "pass --tracking-uri with")
        .replace("set experiment=OTHER_NAME", "pass --experiment OTHER_NAME")
        .replace("experiment=", "--experiment ")
    )


def load_runs(tracking_uri: str, experiment_name: str = "saffu", sweep_id: str | None = None) -> SweepRuns:
    """Read an experiment's runs, or one sweep's, and split them for analysis.

    With `sweep_id`, only runs tagged ``saffu.sweep_id=<sweep_id>`` are read. Each failed,
    unfinished, duplicate or untagged run is logged at WARNING level and returned in its
    own frame of the result. Duplicate finished runs of one config hash are resolved by
    keeping the one with the latest start time (then end time, then run id).

    Raises TrackingStoreError, ExperimentNotFoundError, or NoRunsError when nothing
    matches.
    """
    client = open_client(tracking_uri)
    experiment_id = find_experiment(client, experiment_name, tracking_uri)
    filter_string = f"tags.`{SWEEP_ID_TAG}` = '{_escape(sweep_id)}'" if sweep_id is not None else ""
    try:
        runs = search_all_runs(client, experiment_id, filter_string)
    except MlflowException as error:
        raise TrackingStoreError(
            f"failed to search runs in {redact_uri(tracking_uri)!r}: {redact_text(error.message, tracking_uri)}"
        ) from error

    where = f"experiment {experiment_name!r}" + (f", sweep {sweep_id!r}" if sweep_id is not None else "")
    if not runs:
        raise NoRunsError(f"no runs in {where} of {redact_uri(tracking_uri)!r}")

    frame = runs_to_frame(runs)
    result = split_runs(frame)
    result.tracking_uri = tracking_uri
    result.experiment_name = experiment_name
    result.experiment_id = experiment_id
    result.sweep_id = sweep_id
    log.info("read %d runs from %s: %s", len(runs), where, result.summary())
    return result


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def runs_to_frame(runs: list[Run]) -> pd.DataFrame:
    """Convert MLflow runs to one row each: RUN_COLUMNS, typed params, float metrics.

    Params are parsed column by column with :func:`parse_param_column`. A metric that a
    run did not log is NaN, and so is a logged NaN.
    """
    records = []
    param_keys: dict[str, None] = {}
    metric_keys: dict[str, None] = {}
    for run in runs:
        tags = run.data.tags
        record = {
            "run_id": run.info.run_id,
            "run_name": run.info.run_name,
            "status": run.info.status,
            "role": tags.get(ROLE_TAG),
            "sweep_id": tags.get(SWEEP_ID_TAG),
            "parent_run_id": tags.get(PARENT_RUN_TAG),
            "config_hash": tags.get(CONFIG_HASH_TAG),
            "git_commit": tags.get(GIT_COMMIT_TAG),
            "start_time": _timestamp(run.info.start_time),
            "end_time": _timestamp(run.info.end_time),
            "started": WORKER_PID_TAG in tags,
        }
        for key, value in run.data.params.items():
            param_keys.setdefault(key)
            record[("param", key)] = value
        for key, value in run.data.metrics.items():
            metric_keys.setdefault(key)
            record[("metric", key)] = value
        records.append(record)

    columns: dict[str, pd.Series] = {}
    for name in RUN_COLUMNS:
        values = [record[name] for record in records]
        if name.endswith("_time"):
            columns[name] = pd.Series(pd.to_datetime(values, utc=True), dtype="datetime64[ms, UTC]")
        elif name == "started":
            columns[name] = pd.Series(values, dtype=bool)
        else:
            columns[name] = pd.Series(values, dtype=object)
    for key in sorted(param_keys):
        if key in RUN_COLUMNS:
            log.warning("param %r has the name of a run column and is left out", key)
            continue
        columns[key] = parse_param_column([record.get(("param", key)) for record in records])
    for key in sorted(metric_keys):
        if key in columns:
            log.warning("metric %r has the same name as a param or run column and is left out", key)
            continue
        values = [record.get(("metric", key), math.nan) for record in records]
        columns[key] = pd.Series(values, dtype="float64")
    return add_derived_columns(pd.DataFrame(columns))


def _timestamp(milliseconds: int | None) -> pd.Timestamp | None:
    return None if milliseconds is None else pd.Timestamp(milliseconds, unit="ms", tz="UTC")


def parse_param_column(values: list[str | None]) -> pd.Series:
    """Type one param column from MLflow's strings.

    ``None``, ``null``, ``~``, the empty string and a missing param become missing
    values. The column becomes nullable Int64 when every other value is an integer,
    float64 when every other value is a number, boolean when every other value is
    ``True``/``False`` (any case), and otherwise object with the strings unchanged.
    """
    present = [v for v in values if v is not None and v.strip() not in _NONE_STRINGS]
    cleaned = [None if v is None or v.strip() in _NONE_STRINGS else v.strip() for v in values]
    if not present:
        return pd.Series([None] * len(values), dtype=object)
    if all(_INT_PATTERN.fullmatch(v.strip()) for v in present):
        return pd.Series([None if v is None else int(v) for v in cleaned], dtype="Int64")
    if all(_is_float(v) for v in present):
        return pd.Series([math.nan if v is None else float(v) for v in cleaned], dtype="float64")
    if all(v.strip().lower() in ("true", "false") for v in present):
        return pd.Series([None if v is None else v.lower() == "true" for v in cleaned], dtype="boolean")
    return pd.Series(cleaned, dtype=object)


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def add_derived_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """Add ``model``, ``experts``, ``is_anchor``, ``wall_seconds`` and the ``capped``
    columns of the training phases (see SweepRuns.jobs)."""
    frame = frame.copy()
    if "model.name" in frame:
        frame["model"] = frame["model.name"].astype(object).where(frame["model.name"].notna(), "unknown")
    else:
        frame["model"] = "unknown"
    frame["is_anchor"] = frame["model"].isin(ANCHOR_MODELS).astype(bool)
    frame["experts"] = [
        _experts_label(kind, code_dim)
        for kind, code_dim in zip(
            frame.get("model.experts.kind", pd.Series([None] * len(frame))),
            frame.get("model.experts.code_dim", pd.Series([None] * len(frame))),
        )
    ]
    seconds = [frame[name] for name in PHASE_SECONDS if name in frame]
    if seconds:
        # min_count=1: a job that logged no phase time has an unknown wall-clock time, not 0 s.
        frame["wall_seconds"] = pd.concat(seconds, axis=1).sum(axis=1, min_count=1).astype("float64")
    else:
        frame["wall_seconds"] = pd.Series(math.nan, index=frame.index, dtype="float64")
    for phase in TRAINED_PHASES:
        if f"{phase}/seconds" in frame:
            frame[f"{phase}/capped"] = capped_phase(frame, phase)
    return frame


def capped_phase(frame: pd.DataFrame, phase: str) -> pd.Series:
    """Return whether the ``train.max_seconds`` cap cut `phase` short in each job, NA where
    the phase did not run.

    Jobs log ``{phase}/stopped_by_time``. For runs from before that metric, the value is
    estimated as ``{phase}/seconds`` above ``train.max_seconds``, which can also be true of a
    phase whose last validation ended after the cap.
    """
    seconds = frame[f"{phase}/seconds"]
    cap = frame["train.max_seconds"].astype("float64") if "train.max_seconds" in frame else pd.Series(math.nan, index=frame.index)
    estimate = (seconds > cap).astype("boolean").where(seconds.notna() & cap.notna(), other=False)
    estimate = estimate.where(seconds.notna())
    if f"{phase}/stopped_by_time" in frame:
        logged = frame[f"{phase}/stopped_by_time"]
        estimate = (logged > 0).astype("boolean").where(logged.notna(), estimate)
    return estimate.astype("boolean")


def _experts_label(kind: object, code_dim: object) -> str | None:
    if kind is None or kind is pd.NA or (isinstance(kind, float) and math.isnan(kind)):
        return None
    if kind == "onehot" or code_dim is None or code_dim is pd.NA:
        return str(kind)
    return f"{kind}{int(code_dim)}"


def split_runs(frame: pd.DataFrame) -> SweepRuns:
    """Split a frame from :func:`runs_to_frame` into the parts of a SweepRuns.

    The tracking fields of the result are left empty for the caller to fill.
    """
    role = frame["role"]
    sweeps = frame.loc[role == "sweep", list(RUN_COLUMNS)].reset_index(drop=True)
    untagged = frame.loc[~role.isin(["sweep", "job"])].reset_index(drop=True)
    jobs = frame.loc[role == "job"]

    finished = jobs.loc[jobs["status"] == FINISHED]
    # KILLED before its job started: a queued job of an interrupted launch, holding only its config.
    unstarted = (jobs["status"] == "KILLED") & ~jobs["started"]
    never_started = jobs.loc[unstarted].reset_index(drop=True)
    failed = jobs.loc[jobs["status"].isin(FAILED_STATUSES) & ~unstarted].copy()
    unfinished = jobs.loc[~jobs["status"].isin((FINISHED, *FAILED_STATUSES))].reset_index(drop=True)

    kept, duplicates = drop_duplicate_configs(finished)
    finished_hashes = set(kept["config_hash"].dropna())
    failed["retried_ok"] = failed["config_hash"].isin(finished_hashes).astype(bool)
    failed = failed.reset_index(drop=True)

    for _, run in failed.iterrows():
        log.warning(
            "run %s (%s, config %s) has status %s%s and is left out",
            run["run_id"],
            run["run_name"],
            run["config_hash"],
            run["status"],
            "; a later run of the same config finished" if run["retried_ok"] else "",
        )
    for _, run in unfinished.iterrows():
        log.warning("run %s (%s) has status %s and is left out", run["run_id"], run["run_name"], run["status"])
    if len(never_started):
        log.info("%d KILLED runs of queued jobs that never started are left out", len(never_started))
    for _, run in untagged.iterrows():
        log.warning("run %s (%s) has no %s tag of sweep or job and is left out", run["run_id"], run["run_name"], ROLE_TAG)

    return SweepRuns(
        jobs=kept,
        failed=failed,
        unfinished=unfinished,
        never_started=never_started,
        duplicates=duplicates,
        sweeps=sweeps,
        untagged=untagged,
        tracking_uri="",
        experiment_name="",
        experiment_id="",
    )


def drop_duplicate_configs(finished: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Keep the latest finished run of each config hash.

    Returns (kept, dropped). "Latest" orders by start time, then end time, then run id.
    Runs without a config hash are all kept, because no tag marks them as repeats.
    ``dropped`` has the column ``kept_run_id``, and each drop is logged at WARNING level.
    """
    order = finished.sort_values(["start_time", "end_time", "run_id"], na_position="first")
    has_hash = order["config_hash"].notna()
    is_latest = ~order["config_hash"].duplicated(keep="last") | ~has_hash
    kept = order.loc[is_latest].sort_values("start_time", kind="stable").reset_index(drop=True)
    dropped = order.loc[~is_latest].copy()
    kept_by_hash = dict(zip(kept["config_hash"], kept["run_id"]))
    dropped["kept_run_id"] = dropped["config_hash"].map(kept_by_hash)
    dropped = dropped.reset_index(drop=True)
    for _, run in dropped.iterrows():
        log.warning(
            "run %s repeats config %s; the later run %s is kept", run["run_id"], run["config_hash"], run["kept_run_id"]
        )
    return kept, dropped


def load_curves(
    tracking_uri: str, run_ids: list[str], metrics: tuple[str, ...] = CURVE_METRICS
) -> pd.DataFrame:
    """Read the stepped metric histories of some runs.

    Returns a long frame with columns ``run_id``, ``metric``, ``step`` (int64, the epoch
    for the per-epoch curves) and ``value`` (float64), sorted by run, metric and step.
    A run that did not log a metric contributes no rows for it.
    """
    client = open_client(tracking_uri)
    rows = []
    for run_id in run_ids:
        for metric in metrics:
            try:
                history = client.get_metric_history(run_id, metric)
            except MlflowException as error:
                raise TrackingStoreError(
                    f"failed to read metric {metric!r} of run {run_id} from {redact_uri(tracking_uri)!r}: "
                    f"{redact_text(error.message, tracking_uri)}"
                ) from error
            rows.extend({"run_id": run_id, "metric": metric, "step": m.step, "value": m.value} for m in history)
    curves = pd.DataFrame(rows, columns=["run_id", "metric", "step", "value"])
    curves = curves.astype({"run_id": object, "metric": object, "step": "int64", "value": "float64"})
    return curves.sort_values(["run_id", "metric", "step"]).reset_index(drop=True)
