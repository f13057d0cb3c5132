"""MLflow tracking for jobs and sweeps: store setup, run records, retried writes.

Layout of an experiment: one parent run per sweep (tag ``saffu.role=sweep``) and one child
run per job attempt (tag ``saffu.role=job``, nested through ``mlflow.parentRunId``). A job
run has the flattened job config as params, the metrics of ``saffu.job.run_job`` and the
resolved config as ``config.yaml``. A failed attempt also has ``traceback.txt``.

Every write goes through :func:`with_retries`, which retries transient store errors
(SQLite "database is locked", HTTP 5xx, connection errors) with exponential backoff.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import socket
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit

from filelock import FileLock

from saffu.files import apply_umask_mode

log = logging.getLogger(__name__)

# MLflow 3 sends usage telemetry unless these variables are set, and jobs must send data to the tracking store only.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

# Final metrics returned by saffu.job.run_job. `bp_only/*` is present only when
# train.bp_only is true, and `n_params/<matrix>` entries vary with the model.
PHASE_METRICS = ("val_ppl", "test_ppl", "val_bpc", "test_bpc")
METRICS = (
    "n_params",
    *(f"explicit/{name}" for name in PHASE_METRICS),
    "explicit/solve_seconds",
    *(f"finetune/{name}" for name in PHASE_METRICS),
    "finetune/seconds",
    *PHASE_METRICS,
)

# Top-level config nodes that configure the sweep, not the model: never hashed or logged as params.
SWEEP_MACHINERY_KEYS = ("sweep", "sweep_default", "hydra", "ray", "tracking", "experiment")

# Leaves whose names end like this are locations of caches or outputs. They change with the
# machine, not with the result, so the config hash leaves them out.
PATH_SUFFIXES_EXCLUDED_FROM_HASH = ("cache_dir", "output_dir")

# Settings added after stores already held runs, with the value that keeps the behaviour from
# before they existed. The hash leaves a setting out while it has that value, so the runs
# of earlier versions keep their hashes and a relaunch still skips them.
HASH_NEUTRAL_DEFAULTS: dict[str, Any] = {"train.eval_interval_tokens": None}

TAG_ROLE = "saffu.role"
TAG_SWEEP_ID = "saffu.sweep_id"
TAG_SWEEP_NAME = "saffu.sweep_name"
TAG_CONFIG_HASH = "saffu.config_hash"
TAG_GIT_COMMIT = "saffu.git_commit"
TAG_ATTEMPT = "saffu.attempt"
TAG_JOB_INDEX = "saffu.job_index"
TAG_DRIVER_HOST = "saffu.driver_host"
TAG_DRIVER_PID = "saffu.driver_pid"
TAG_DRIVER_START = "saffu.driver_start_time"
# Unix time, rewritten every 30 seconds by a running sweep's driver on its parent run.
TAG_DRIVER_HEARTBEAT = "saffu.driver_heartbeat"
TAG_WORKER_PID = "saffu.worker_pid"
TAG_WORKER_HOST = "saffu.worker_host"
TAG_PARENT = "mlflow.parentRunId"
# Set on the parent run of an Optuna study and on each job run that one of its trials started.
TAG_OPTUNA_STUDY = "saffu.optuna_study"
TAG_OPTUNA_TRIAL = "saffu.optuna_trial"

SUPPORTED_SCHEMES = (
    "sqlite", "file", "http", "https", "postgresql", "mysql", "mssql", "databricks",
)
# Database schemes that MLflow opens through SQLAlchemy, and the package of each default driver.
DATABASE_SCHEMES = ("postgresql", "mysql", "mssql")
DRIVER_PACKAGES = {
    "postgresql": "psycopg[binary] for postgresql://, or psycopg2-binary for postgresql+psycopg2://",
    "mysql": "mysqlclient for mysql://, or PyMySQL for mysql+pymysql://",
    "mssql": "pyodbc for mssql://",
}

T = TypeVar("T")


class ArtifactStoreError(RuntimeError):
    """A run's artifact store could not be written."""


def artifact_store_error(error: Exception, name: str, secrets: list[str]) -> ArtifactStoreError:
    """Describe a failed write of the artifact `name` in one line, with the URIs in `secrets`
    redacted."""
    message = str(error).strip()
    text = redact_all(message.splitlines()[0] if message else "", secrets)
    return ArtifactStoreError(
        f"could not write {name} to the artifact store ({type(error).__name__}: {text}); check that "
        "tracking.artifact_location, or the tracking server's artifact root, exists and can be written from here"
    )


class TrackingURIError(ValueError):
    """A tracking URI that MLflow cannot use, with the reason and the fix in its message."""


# ---------------------------------------------------------------------------------------------
# Config hashing and flattening


def job_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Return a copy of a resolved config without the sweep machinery keys."""
    return {key: value for key, value in config.items() if key not in SWEEP_MACHINERY_KEYS}


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings into dotted keys (``model.experts.kind``); lists stay leaves."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_config(value, prefix=f"{name}."))
        else:
            flat[name] = value
    return flat


def config_hash(config: Mapping[str, Any]) -> str:
    """Hash a resolved job config: 16 hex digits of SHA-256 over its canonical JSON.

    The sweep machinery keys, cache/output locations and the settings of
    HASH_NEUTRAL_DEFAULTS at their neutral value are left out. Everything else counts, the
    seed included. Two jobs with the same hash compute the same thing.
    """
    flat = flatten_config(job_config(config))
    hashed = {
        key: value
        for key, value in flat.items()
        if not key.endswith(PATH_SUFFIXES_EXCLUDED_FROM_HASH)
        and not (key in HASH_NEUTRAL_DEFAULTS and value == HASH_NEUTRAL_DEFAULTS[key])
    }
    canonical = json.dumps(hashed, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def git_commit(path: Path | None = None) -> str:
    """Return the commit of the repository that contains `path`, with ``-dirty`` for local
    changes. Outside a git checkout (a container image, say) return the environment
    variable SAFFU_GIT_COMMIT, or ``unknown`` without it."""
    fallback = os.environ.get("SAFFU_GIT_COMMIT", "unknown")
    where = str(path or Path(__file__).resolve().parent)
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where, capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return fallback
    return f"{commit}-dirty" if status else commit


# ---------------------------------------------------------------------------------------------
# URIs


# ``scheme://user:password@rest`` or ``scheme://token@rest``. The password runs to the "@"
# before the host, as SQLAlchemy reads it, so it may contain "/", "?" or "#", which
# urlsplit would take for the start of the path, query or fragment. Like SQLAlchemy, it reads
# ``http://host:5000/a@b`` as credentials, so such a URI is redacted more than it needs.
_CREDENTIALS = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:/@]*)(?::(?P<password>[^@]*))?@(?P<rest>.*)$", re.DOTALL)
_SECRET_QUERY_WORDS = ("password", "passwd", "pwd", "token", "secret", "key", "auth")


def hide_run_links(uri: str) -> None:
    """Stop MLflow from printing a link to each run it ends when `uri` contains a password,
    because the link repeats the tracking URI as given. Workers inherit the setting."""
    if redact_uri(uri) != uri:
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"


def uri_password(uri: str) -> str | None:
    """Return the password in `uri` (``user:password@``), or None."""
    match = _CREDENTIALS.match(uri)
    return match["password"] if match and match["password"] else None


def redact_uri(uri: str) -> str:
    """Return `uri` with any password, token or key in it replaced by ``***``, for logs."""
    match = _CREDENTIALS.match(uri)
    if match:
        credentials = f"{match['user']}:***@" if match["password"] is not None else "***@"
        scheme, rest = match["scheme"], match["rest"]
    else:
        credentials, scheme, rest = "", "", uri
    if "?" in rest:
        # Only the query is rebuilt: urlunsplit would turn sqlite:///a.db into sqlite:/a.db.
        base, query_text = rest.split("?", 1)
        query_text, hash_sign, fragment = query_text.partition("#")
        query = [
            (name, "***" if any(word in name.lower() for word in _SECRET_QUERY_WORDS) else value)
            for name, value in parse_qsl(query_text, keep_blank_values=True)
        ]
        rest = f"{base}?{urlencode(query, safe='*')}{hash_sign}{fragment}"
    return f"{scheme}{credentials}{rest}"


def sqlite_path(uri: str) -> Path | None:
    """Return the database file of a ``sqlite:///`` URI (relative paths against the working
    directory), or None for another scheme or an in-memory database."""
    if not uri.startswith("sqlite:"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0] if uri.startswith("sqlite:///") else ""
    if not path or path == ":memory:":
        return None
    return Path(path).resolve()


def validate_tracking_uri(uri: str, check_server: bool = True) -> None:
    """Raise TrackingURIError unless MLflow can use `uri`: a known scheme, a writable folder
    for a SQLite file, and for http(s) a server that responds to ``/health``."""
    shown = redact_uri(uri)
    if not uri or not isinstance(uri, str):
        raise TrackingURIError(f"tracking.uri={uri!r} is empty; set tracking.uri=sqlite:///mlflow.db or a server URL")
    scheme = urlsplit(uri).scheme.split("+", 1)[0]
    if not scheme:
        raise TrackingURIError(
            f"tracking.uri={shown} is a file path, not a URI; for an SQLite store write tracking.uri=sqlite:///{uri}"
        )
    if scheme not in SUPPORTED_SCHEMES:
        listed = ", ".join("file (with MLFLOW_ALLOW_FILE_STORE=true)" if name == "file" else name for name in SUPPORTED_SCHEMES)
        raise TrackingURIError(
            f"tracking.uri={shown} has the unsupported scheme {scheme!r}; use one of "
            f"{listed}, e.g. tracking.uri=sqlite:///mlflow.db"
        )

    if scheme == "sqlite":
        if not uri.startswith("sqlite:///"):
            raise TrackingURIError(
                f"tracking.uri={shown} has no database path; write sqlite:///relative.db or sqlite:////absolute.db"
            )
        path = sqlite_path(uri)
        if path is None:
            raise TrackingURIError(
                f"tracking.uri={shown} is an in-memory database, which separate job processes cannot share; "
                "use a file such as sqlite:///mlflow.db"
            )
        if not path.parent.is_dir():
            raise TrackingURIError(
                f"tracking.uri={shown}: the folder {path.parent} does not exist; create it or point the URI elsewhere"
            )
        if not os.access(path.parent, os.W_OK):
            raise TrackingURIError(f"tracking.uri={shown}: the folder {path.parent} is not writable")
        # SQLite opens a read-only file and fails only at the first write, which MLflow 3.17
        # retried for 45 s here. A read-only lock file holds prepare_store for its 120 s timeout.
        for part in (path, *(path.with_name(path.name + suffix) for suffix in ("-wal", "-shm", ".lock"))):
            if part.exists() and not os.access(part, os.W_OK):
                raise TrackingURIError(
                    f"tracking.uri={shown}: {part} is read-only; make it writable (chmod u+w {part}) "
                    "or copy the store to a writable file"
                )
        if path.is_file() and path.stat().st_size > 0:
            with path.open("rb") as file:
                header = file.read(16)
            if header != b"SQLite format 3\x00":
                raise TrackingURIError(
                    f"tracking.uri={shown}: {path} exists and is not an SQLite database; "
                    "point the URI at a new file or an MLflow store"
                )
        return

    if scheme == "file" and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in ("1", "true"):
        raise TrackingURIError(
            f"tracking.uri={shown} is MLflow's file store, which MLflow 3 opens only with "
            "MLFLOW_ALLOW_FILE_STORE=true; use a database such as tracking.uri=sqlite:///mlflow.db"
        )

    if scheme in ("http", "https"):
        if not urlsplit(uri).hostname:
            raise TrackingURIError(f"tracking.uri={shown} has no host; write http://HOST:PORT")
        if check_server:
            _check_server(uri)

    if scheme in DATABASE_SCHEMES:
        problem = database_driver_problem(uri, "tracking.uri")
        if problem:
            raise TrackingURIError(problem)


def database_driver_problem(uri: str, key: str) -> str | None:
    """Return a message naming the package to install when SQLAlchemy cannot load the
    database driver of `uri`, the value of the config key `key`; None when it can.

    MLflow and Optuna open a database through SQLAlchemy, which imports the driver named in
    the scheme (or the dialect's default one) only when it connects: without this check a
    missing driver ends in a ModuleNotFoundError from inside MLflow or Optuna.
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        make_url(uri).get_dialect().import_dbapi()
    except (ArgumentError, NoSuchModuleError, ImportError) as error:
        scheme = urlsplit(uri).scheme.split("+", 1)[0] if "://" in uri else ""
        hint = DRIVER_PACKAGES.get(scheme, "the driver's package")
        return (
            f"{key}={redact_uri(uri)}: SQLAlchemy cannot load its database driver "
            f"({type(error).__name__}: {redact_text(str(error), uri)}); install {hint}"
        )
    return None


def redact_override(argument: str) -> str:
    """Return a command-line override with any URI in its value redacted by :func:`redact_uri`
    (``tracking.uri=postgresql://alice:***@host/db``), for params and logs. A value in
    Hydra's quotes (``key="scheme://..."``) keeps its quotes."""
    key, separator, value = argument.partition("=")
    if not separator or "://" not in value:
        return argument
    quote = value[0] if len(value) > 1 and value[0] in "'\"" and value[-1] == value[0] else ""
    if quote:
        return f"{key}={quote}{redact_uri(value[1:-1])}{quote}"
    return f"{key}={redact_uri(value)}"


def redact_text(text: str, uri: str) -> str:
    """Return `text` with `uri` and its password, if any, replaced as :func:`redact_uri` does."""
    if not uri:
        return text
    text = text.replace(uri, redact_uri(uri))
    password = uri_password(uri)
    return text.replace(password, "***") if password else text


# Config values that may hold a URI with a password: the tracking store, the artifact store
# and an Optuna study's storage.
SECRET_URI_KEYS = ("tracking.uri", "tracking.artifact_location", "sweep.optuna.storage")


def config_secrets(cfg: Any) -> list[str]:
    """Return the URIs in `cfg` (at SECRET_URI_KEYS) that contain a password, token or key."""
    from omegaconf import OmegaConf

    uris = []
    for key in SECRET_URI_KEYS:
        value = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
        if isinstance(value, str) and redact_uri(value) != value:
            uris.append(value)
    return uris


def redact_saved_configs(folder: str | os.PathLike[str], uris: Iterable[str]) -> list[Path]:
    """Rewrite the YAML files in `folder` (Hydra's saved configs) with each of `uris` redacted
    by :func:`redact_text`, and return the files that changed.

    Hydra saves the composed config and the overrides as typed: ``.hydra/`` of a single
    job's output folder and ``multirun.yaml`` of a sweep. Each file is replaced by a
    rename, so a reader never sees half of it.
    """
    changed = []
    uris = list(uris)
    for path in sorted(Path(folder).glob("*.yaml")):
        text = path.read_text(encoding="utf-8")
        redacted = redact_all(text, uris)
        if redacted == text:
            continue
        partial = path.with_name(path.name + ".partial")
        partial.write_text(redacted, encoding="utf-8")
        os.replace(partial, path)
        changed.append(path)
    return changed


def redact_all(text: str, uris: Iterable[str]) -> str:
    """Return `text` with each of `uris` redacted by :func:`redact_text`."""
    for uri in uris:
        text = redact_text(text, uri)
    return text


def validate_experiment_name(name: Any) -> None:
    """Raise TrackingURIError unless `name` can name an MLflow experiment."""
    if not isinstance(name, str) or not name.strip():
        raise TrackingURIError(f"experiment={name!r} is empty; set experiment=NAME, for example experiment=roadmap")


def _check_server(uri: str) -> None:
    import requests

    url = uri.rstrip("/") + "/health"
    try:
        response = requests.get(url, timeout=10)
    except requests.RequestException as error:
        raise TrackingURIError(
            f"tracking.uri={redact_uri(uri)}: no MLflow server responds ({type(error).__name__}); "
            "start one with `mlflow server --host 127.0.0.1 --port PORT` or set tracking.uri to a reachable server"
        ) from None
    if response.status_code >= 400:
        raise TrackingURIError(
            f"tracking.uri={redact_uri(uri)}: {url} returned HTTP {response.status_code}; "
            "check that the URL points at an MLflow tracking server"
        )


# ---------------------------------------------------------------------------------------------
# Retries


def is_transient(error: BaseException) -> bool:
    """Tell whether a store error may go away on retry: a locked or busy SQLite database,
    an HTTP 429, 502, 503 or 504 response, or a dropped connection."""
    import requests

    if isinstance(error, (requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError)):
        return True
    text = str(error).lower()
    transient_words = (
        "database is locked", "database table is locked", "database is busy", "disk i/o error",
        "unable to open database file", "connection refused", "connection reset", "connection aborted",
        "max retries exceeded", "temporarily unavailable", "too many requests", "bad gateway",
        "service unavailable", "gateway timeout", "timed out",
    )
    if any(word in text for word in transient_words):
        return True
    status = getattr(error, "get_http_status_code", None)
    if callable(status):
        try:
            code = int(status())
        except (TypeError, ValueError):
            return False
        # MLflow reports its own INTERNAL_ERROR as 500 too, so only the codes that a proxy
        # or an overloaded server send count here.
        return code in (429, 502, 503, 504)
    return False


def with_retries(
    action: Callable[[], T],
    what: str,
    attempts: int = 10,
    base_delay_s: float = 0.2,
    max_delay_s: float = 10.0,
) -> T:
    """Call `action` until it succeeds, retrying transient store errors with exponential
    backoff (`base_delay_s`, doubled each time up to `max_delay_s`). Logs each retry.
    Re-raises the last error after `attempts` tries, and other errors at once."""
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except Exception as error:
            if attempt == attempts or not is_transient(error):
                raise
            delay = min(max_delay_s, base_delay_s * 2 ** (attempt - 1))
            log.warning(
                "MLflow %s failed (attempt %d of %d: %s: %s); retrying in %.1f s",
                what, attempt, attempts, type(error).__name__, str(error).splitlines()[0][:200], delay,
            )
            time.sleep(delay)
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------
# The store


@dataclass(frozen=True)
class TrackingSpec:
    """Address of the store for job processes: tracking URI and experiment id, picklable so Ray can ship it."""

    uri: str
    experiment_id: str


def prepare_store(uri: str, experiment: str, artifact_location: str | None = None) -> TrackingSpec:
    """Make the store ready before any job starts: validate the URI, create the database
    schema and the experiment. Call it in the driver only.

    Several processes that create a fresh SQLite store at once can lose runs, so this runs
    under a file lock next to the database and turns on SQLite's write-ahead log, which lets
    readers work while one process writes. For a SQLite store without `artifact_location`,
    artifacts go to ``mlartifacts/`` beside the database file.
    """
    from mlflow.exceptions import MlflowException

    validate_tracking_uri(uri)
    hide_run_links(uri)
    db_path = sqlite_path(uri)
    try:
        if db_path is not None:
            if artifact_location is None:
                artifact_location = (db_path.parent / "mlartifacts").as_uri()
            with FileLock(str(db_path) + ".lock", timeout=120):
                if not db_path.exists() or db_path.stat().st_size == 0:
                    _create_sqlite_store(db_path)
                experiment_id = _ensure_experiment(uri, experiment, artifact_location)
                _enable_wal(db_path)
        else:
            experiment_id = _ensure_experiment(uri, experiment, artifact_location)
    except MlflowException as error:
        # For example an http(s) server that responds to /health but not to MLflow's REST API.
        lines = str(error).strip().splitlines()
        first_line = redact_text(lines[0], uri) if lines else type(error).__name__
        raise TrackingURIError(
            f"tracking.uri={redact_uri(uri)}: MLflow could not open the store ({first_line}); "
            "check that the URI points at an MLflow tracking server or database"
        ) from None
    log.info("MLflow store %s is ready, experiment %r has id %s", redact_uri(uri), experiment, experiment_id)
    return TrackingSpec(uri=uri, experiment_id=experiment_id)


def _create_sqlite_store(db_path: Path) -> None:
    """Create MLflow's tables in a new file beside `db_path` and rename it into place.

    MLflow creates a new store's tables one migration at a time, which takes seconds. A
    Ctrl-C or kill in between would leave a file with half the tables, which MLflow then
    fails to open, so every later launch would fail too.
    """
    from mlflow.tracking import MlflowClient

    # Left by a creation that was killed: the caller holds the store's lock, so none is in progress.
    for leftover in db_path.parent.glob(f".{db_path.name}.*.creating"):
        leftover.unlink(missing_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{db_path.name}.", suffix=".creating", dir=db_path.parent)
    os.close(handle)
    try:
        MlflowClient(tracking_uri=f"sqlite:///{temporary}").search_experiments(max_results=1)
        apply_umask_mode(temporary)
        os.replace(temporary, db_path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _ensure_experiment(uri: str, name: str, artifact_location: str | None) -> str:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = with_retries(lambda: client.get_experiment_by_name(name), "get_experiment_by_name")
    if found is not None:
        if found.lifecycle_stage == "deleted":
            raise TrackingURIError(
                f"experiment {name!r} is deleted in {redact_uri(uri)}; restore it "
                f"(`mlflow experiments restore --experiment-id {found.experiment_id}`) or set experiment=OTHER_NAME"
            )
        return found.experiment_id
    try:
        return with_retries(
            lambda: client.create_experiment(name, artifact_location=artifact_location), "create_experiment"
        )
    except MlflowException as error:
        # Another driver on a server store created it in between.
        found = client.get_experiment_by_name(name)
        if found is None:
            raise error
        return found.experiment_id


def _enable_wal(db_path: Path) -> None:
    connection = sqlite3.connect(db_path, timeout=60)
    try:
        mode = connection.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    finally:
        connection.close()
    if str(mode).lower() != "wal":
        log.warning("SQLite store %s stays in journal mode %s; parallel writers will wait longer", db_path, mode)


def driver_identity() -> dict[str, str]:
    """Return tags that identify this process, so a later launch can tell whether it still runs."""
    import psutil

    process = psutil.Process()
    return {
        TAG_DRIVER_HOST: socket.gethostname(),
        TAG_DRIVER_PID: str(process.pid),
        TAG_DRIVER_START: f"{process.create_time():.3f}",
        TAG_DRIVER_HEARTBEAT: f"{time.time():.0f}",
    }


# A driver on another host whose heartbeat is older than this is taken for dead. Drivers beat
# every 30 s (saffu.launch.HEARTBEAT_INTERVAL_S); the margin covers store retries and clocks
# that differ between hosts by a minute or two.
HEARTBEAT_TIMEOUT_S = 300.0


def driver_is_alive(tags: Mapping[str, str], now: float | None = None) -> bool | None:
    """Return whether the driver named by a parent run's tags still runs. On this host the
    process itself is checked, and on another host the heartbeat tag. Returns None for a
    driver on another host without a heartbeat tag (a driver of an older version)."""
    import psutil

    if tags.get(TAG_DRIVER_HOST) != socket.gethostname():
        beat = tags.get(TAG_DRIVER_HEARTBEAT)
        try:
            return (now if now is not None else time.time()) - float(beat) < HEARTBEAT_TIMEOUT_S
        except (TypeError, ValueError):
            return None
    try:
        process = psutil.Process(int(tags.get(TAG_DRIVER_PID, "-1")))
        return abs(process.create_time() - float(tags.get(TAG_DRIVER_START, "0"))) < 1.0
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return False


class RunRecorder:
    """Writes runs of one experiment through an MlflowClient, each write retried."""

    def __init__(self, spec: TrackingSpec) -> None:
        from mlflow.tracking import MlflowClient

        self.spec = spec
        self.client = MlflowClient(tracking_uri=spec.uri)

    # -- reads

    def search(self, filter_string: str, include_deleted: bool = False) -> list[Any]:
        """Return every run of the experiment that matches `filter_string`, all pages."""
        from mlflow.entities import ViewType

        view = ViewType.ALL if include_deleted else ViewType.ACTIVE_ONLY
        runs: list[Any] = []
        token = None
        while True:
            page = with_retries(
                lambda: self.client.search_runs(
                    [self.spec.experiment_id], filter_string, run_view_type=view, max_results=1000, page_token=token
                ),
                "search_runs",
            )
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    def finished_config_hashes(self) -> set[str]:
        """Return the config hashes of the job runs that finished in this experiment."""
        return set(self.finished_job_runs())

    def secret_uris(self) -> list[str]:
        """Return the tracking URI and the experiment's artifact location, for redacting errors."""
        uris = [self.spec.uri]
        with contextlib.suppress(Exception):
            uris.append(self.client.get_experiment(self.spec.experiment_id).artifact_location)
        return [uri for uri in uris if uri]

    def get_run(self, run_id: str) -> Any:
        return with_retries(lambda: self.client.get_run(run_id), "get_run")

    def running_job_runs(self) -> list[Any]:
        """Return the RUNNING job runs of this experiment."""
        return self.search(f"tags.`{TAG_ROLE}` = 'job' and attributes.status = 'RUNNING'")

    def finished_job_runs(self) -> dict[str, Any]:
        """Return the FINISHED job runs of this experiment by config hash, the latest run
        where one config finished more than once."""
        runs = self.search(f"tags.`{TAG_ROLE}` = 'job' and attributes.status = 'FINISHED'")
        latest: dict[str, Any] = {}
        for run in sorted(runs, key=lambda r: r.info.start_time or 0):
            if TAG_CONFIG_HASH in run.data.tags:
                latest[run.data.tags[TAG_CONFIG_HASH]] = run
        return latest

    # -- runs

    def create_run(self, name: str, tags: Mapping[str, str], params: Mapping[str, Any] | None = None) -> str:
        """Create a RUNNING run with `tags` and `params`, and return its id."""
        run = with_retries(
            lambda: self.client.create_run(self.spec.experiment_id, tags=dict(tags), run_name=name), "create_run"
        )
        run_id = run.info.run_id
        if params:
            self.log_params(run_id, params)
        return run_id

    def reopen_run(self, run_id: str, tags: Mapping[str, str]) -> None:
        """Set a terminated run back to RUNNING and update its tags."""
        with_retries(lambda: self.client.update_run(run_id, status="RUNNING"), "update_run")
        self.set_tags(run_id, tags)

    def end_run(self, run_id: str, status: str) -> None:
        """Mark a run FINISHED, FAILED or KILLED."""
        with_retries(lambda: self.client.set_terminated(run_id, status=status), "set_terminated")

    def delete_run(self, run_id: str) -> None:
        """Move a run to MLflow's trash: searches and the UI skip it, `mlflow gc` removes it."""
        with_retries(lambda: self.client.delete_run(run_id), "delete_run")

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        entries = [RunTag(key, str(value)) for key, value in tags.items()]
        for chunk in _chunks(entries, 100):
            with_retries(lambda: self.client.log_batch(run_id, tags=chunk, synchronous=True), "log_batch(tags)")

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        """Log params in batches of 100, the MLflow limit; values become strings."""
        from mlflow.entities import Param

        entries = [Param(key, _param_value(value)) for key, value in params.items()]
        for chunk in _chunks(entries, 100):
            with_retries(lambda: self.client.log_batch(run_id, params=chunk, synchronous=True), "log_batch(params)")

    def log_metric(self, run_id: str, key: str, value: float, step: int | None = None) -> None:
        """Log one metric value; `step` None logs step 0."""
        from mlflow.entities import Metric

        metric = Metric(key, float(value), int(time.time() * 1000), int(step or 0))
        with_retries(lambda: self.client.log_batch(run_id, metrics=[metric], synchronous=True), f"log_metric({key})")

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        """Log final metrics in one batch (chunks of 1000, the MLflow limit)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        entries = [Metric(key, float(value), now, step) for key, value in metrics.items()]
        for chunk in _chunks(entries, 1000):
            with_retries(lambda: self.client.log_batch(run_id, metrics=chunk, synchronous=True), "log_batch(metrics)")

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        with_retries(lambda: self.client.log_text(run_id, text, artifact_file), f"log_text({artifact_file})")

    def log_artifact(self, run_id: str, path: Path) -> None:
        with_retries(lambda: self.client.log_artifact(run_id, str(path)), f"log_artifact({path.name})")


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
    # MLflow keeps at most 6000 characters of a param value.
    return text if len(text) <= 6000 else text[:5997] + "..."


def _chunks(items: list[T], size: int) -> Iterable[list[T]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
