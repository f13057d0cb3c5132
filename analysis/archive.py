"""Copy an experiment's runs from one MLflow store to another through a folder of files.

Usage::

    python -m analysis.archive export --tracking-uri sqlite:///mlflow.db --experiment saffu --out runs/
    python -m analysis.archive import --tracking-uri sqlite:///other.db --experiment saffu runs/

`export` writes ``archive.json`` and, for each finished, failed or killed run,
``runs/RUN_ID.json`` (name, status, times, params, tags and every metric's full history)
and ``artifacts/RUN_ID/`` (the run's artifacts). A run still RUNNING is left out and
named in the summary; export again once it ends. Exporting into an existing archive
adds and updates runs; the files of runs no longer in the store stay.

`import` creates each archived run in the target experiment with its name, status,
times, params, tags, metric histories and artifacts, and points a job run at the imported
copy of its sweep's parent run. Each copy is tagged ``saffu.archived_run_id`` with the id
of the run it copies (for a copy of a copy, the first run). Importing the same archive
again, or an archive of the copies back into the first store, copies nothing twice, and
an import that was killed half-way is completed by running it again. Because the config hash tags come along, a
sweep relaunched against the target store skips the configs that finished in the source.

The archive is plain JSON, one file per run, so a sweep's results can move between
machines, clusters and tracking servers, or be kept in version control beside the code
that produced them.

MLflow itself has no run import. The maintained tool for this, mlflow-export-import, has
not had a release since 1.2.0, which fails on MLflow 3 stores: it creates the target
experiment a second time and stops with "already exists". Hence this module.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException

from analysis.export import write_text
from analysis.load import AnalysisError, TrackingStoreError, find_experiment, open_client, search_all_runs
from saffu.files import apply_umask_mode
from saffu.tracking import (
    TAG_PARENT,
    RunRecorder,
    TrackingURIError,
    prepare_store,
    redact_uri,
    validate_experiment_name,
)

log = logging.getLogger(__name__)

# MLflow draws a progress bar for each run's artifacts; the summary line says what was copied.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

FORMAT = "saffu-run-archive"
FORMAT_VERSION = 1
# The tag on an imported run that names the run it was copied from.
TAG_ARCHIVED_RUN_ID = "saffu.archived_run_id"
TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")
# MLflow's limits per log_batch call.
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000


class ArchiveError(AnalysisError):
    """An archive folder that cannot be written or read, with the fix in the message."""


@dataclass
class ArchiveSummary:
    """What one export or import did, run ids by outcome."""

    copied: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)

    def line(self, verb: str) -> str:
        text = f"{len(self.copied)} runs {verb}, {len(self.skipped)} skipped"
        if self.left_out:
            shown = ", ".join(self.left_out[:3]) + (f" and {len(self.left_out) - 3} more" if len(self.left_out) > 3 else "")
            text += f", {len(self.left_out)} still running left out ({shown}): export again once they end"
        return text


# -- export


def export_runs(tracking_uri: str, experiment: str, out: Path) -> ArchiveSummary:
    """Write the terminated runs of `experiment` in the store at `tracking_uri` to the
    archive folder `out`, creating it if needed. Each file is written atomically."""
    if out.exists() and not out.is_dir():
        raise ArchiveError(f"--out {out} is a file; give a folder, new or made by an earlier export")
    if out.is_dir() and any(out.iterdir()) and not (out / "archive.json").is_file():
        raise ArchiveError(f"--out {out} is a folder that holds no archive.json; give a new folder or an earlier archive")
    client = open_client(tracking_uri)
    experiment_id = find_experiment(client, experiment, tracking_uri)
    runs = search_all_runs(client, experiment_id)
    summary = ArchiveSummary()
    write_json(out / "archive.json", {"format": FORMAT, "version": FORMAT_VERSION, "experiment": experiment})
    for run in sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id)):
        run_id = run.info.run_id
        if run.info.status not in TERMINAL_STATUSES:
            summary.left_out.append(run_id)
            continue
        record = {
            "run_id": run_id,
            "run_name": run.info.run_name,
            "status": run.info.status,
            "start_time": run.info.start_time,
            "end_time": run.info.end_time,
            "params": dict(sorted(run.data.params.items())),
            "tags": dict(sorted(run.data.tags.items())),
            "metrics": {key: metric_history(client, run_id, key) for key in sorted(run.data.metrics)},
        }
        artifacts = out / "artifacts" / run_id
        if not artifacts.exists():
            download_artifacts(client, run_id, artifacts)
        write_json(out / "runs" / f"{run_id}.json", record)
        summary.copied.append(run_id)
    return summary


def metric_history(client: Any, run_id: str, key: str) -> list[list[Any]]:
    """Return every logged value of a metric as ``[step, timestamp, value]``, in logging order."""
    history = client.get_metric_history(run_id, key)
    return [[m.step, m.timestamp, encode_float(m.value)] for m in sorted(history, key=lambda m: (m.timestamp, m.step))]


def encode_float(value: float) -> float | str:
    """JSON has no NaN or infinity: write them as the strings that float() reads back."""
    return value if math.isfinite(value) else str(value)


def download_artifacts(client: Any, run_id: str, destination: Path) -> None:
    """Copy a run's artifacts into `destination`, which appears only once they are all there."""
    if not client.list_artifacts(run_id):
        return
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{run_id}.", dir=destination.parent))
    try:
        client.download_artifacts(run_id, "", str(staging))
        apply_umask_mode(staging, directory=True)
        staging.rename(destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_json(path: Path, value: Any) -> None:
    write_text(json.dumps(value, indent=1, sort_keys=False) + "\n", path)


# -- import


@dataclass
class ArchivedRun:
    """One run file of an archive."""

    path: Path
    record: dict[str, Any]

    @property
    def run_id(self) -> str:
        return self.record["run_id"]

    @property
    def parent_id(self) -> str | None:
        return self.record["tags"].get(TAG_PARENT)

    @property
    def origin(self) -> str:
        """The id of the run in the store where it ran: a copy of a copy names the first run."""
        return self.record["tags"].get(TAG_ARCHIVED_RUN_ID, self.run_id)


def read_archive(folder: Path) -> list[ArchivedRun]:
    """Read and check every run file of the archive `folder`, parents before their children."""
    if not folder.is_dir():
        raise ArchiveError(f"archive folder {folder} does not exist; give the --out folder of `python -m analysis.archive export`")
    header = read_json(folder / "archive.json")
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ArchiveError(f"{folder / 'archive.json'} is not a saffu run archive; give the --out folder of an export")
    if header.get("version") != FORMAT_VERSION:
        raise ArchiveError(
            f"{folder / 'archive.json'} has format version {header.get('version')!r}, and this saffu reads "
            f"version {FORMAT_VERSION}; import it with the saffu version that exported it"
        )
    runs = [ArchivedRun(path, check_record(path, read_json(path))) for path in sorted((folder / "runs").glob("*.json"))]
    archived = {run.run_id for run in runs}
    # Parents first, so that each child can point at its parent's new run id.
    return sorted(runs, key=lambda run: (run.parent_id in archived, run.record["start_time"] or 0, run.run_id))


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArchiveError(f"{path} is missing; give the --out folder of `python -m analysis.archive export`") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ArchiveError(f"{path} cannot be read as JSON ({error}); export the run again") from None


def check_record(path: Path, record: Any) -> dict[str, Any]:
    """Raise ArchiveError unless `record` has the fields and types that an export writes."""
    expected = {"run_id": str, "status": str, "params": dict, "tags": dict, "metrics": dict}
    problems = [name for name, kind in expected.items() if not isinstance(record, dict) or not isinstance(record.get(name), kind)]
    if not problems and record["status"] not in TERMINAL_STATUSES:
        problems.append(f"status {record['status']!r}")
    if not problems:
        for key, history in record["metrics"].items():
            if not isinstance(history, list) or not all(isinstance(point, list) and len(point) == 3 for point in history):
                problems.append(f"metric {key!r}")
    if problems:
        raise ArchiveError(f"{path} is not a run file of an export: bad {', '.join(problems)}; export the run again")
    if path.stem != record["run_id"]:
        raise ArchiveError(f"{path} holds run {record['run_id']}, not {path.stem}; export the run again")
    return record


def import_runs(tracking_uri: str, experiment: str, folder: Path) -> ArchiveSummary:
    """Create the runs of the archive `folder` in `experiment` of the store at `tracking_uri`,
    creating the experiment if needed; skip the runs that an earlier import copied."""
    archived = read_archive(folder)
    try:
        validate_experiment_name(experiment)
        spec = prepare_store(tracking_uri, experiment)
    except (TrackingURIError, ValueError) as error:
        raise TrackingStoreError(str(error)) from None
    recorder = RunRecorder(spec)
    present = {run.info.run_id for run in recorder.search("")}
    copies: dict[str, str] = {}  # original run id -> id of its complete copy in the target
    for run in recorder.search(f"tags.`{TAG_ARCHIVED_RUN_ID}` != ''"):
        origin = run.data.tags[TAG_ARCHIVED_RUN_ID]
        if run.info.status in TERMINAL_STATUSES:
            copies[origin] = run.info.run_id
        else:
            # An import that was killed while it copied this run; copy it again.
            log.warning("deleting run %s, a copy of %s that an earlier import left unfinished", run.info.run_id, origin)
            recorder.delete_run(run.info.run_id)

    summary = ArchiveSummary()
    new_ids: dict[str, str] = {}  # archived run id -> its run id in the target
    for run in archived:
        existing = next(
            (found for found in (
                run.run_id if run.run_id in present else None,
                run.origin if run.origin in present else None,
                copies.get(run.origin),
            ) if found),
            None,
        )
        if existing is not None:
            new_ids[run.run_id] = existing
            summary.skipped.append(run.run_id)
            continue
        new_ids[run.run_id] = copy_run(recorder, run, folder / "artifacts" / run.run_id, new_ids)
        summary.copied.append(run.run_id)
    return summary


def copy_run(recorder: RunRecorder, run: ArchivedRun, artifacts: Path, new_ids: Mapping[str, str]) -> str:
    """Create one archived run in the recorder's experiment and return its new id. A copy
    that fails half-way is deleted, so that no partial run stays behind."""
    from mlflow.entities import Metric, Param

    record = run.record
    tags = {key: value for key, value in record["tags"].items() if key != TAG_PARENT}
    if run.parent_id is not None and run.parent_id in new_ids:
        tags[TAG_PARENT] = new_ids[run.parent_id]
    tags[TAG_ARCHIVED_RUN_ID] = run.origin
    client = recorder.client
    created = client.create_run(
        recorder.spec.experiment_id, start_time=record.get("start_time"), tags=tags, run_name=record.get("run_name")
    )
    run_id = created.info.run_id
    try:
        params = [Param(key, str(value)) for key, value in record["params"].items()]
        for chunk in batches(params, PARAMS_PER_BATCH):
            client.log_batch(run_id, params=chunk, synchronous=True)
        metrics = [
            Metric(key, float(value), int(timestamp), int(step))
            for key, history in record["metrics"].items()
            for step, timestamp, value in history
        ]
        for chunk in batches(metrics, METRICS_PER_BATCH):
            client.log_batch(run_id, metrics=chunk, synchronous=True)
        if artifacts.is_dir():
            client.log_artifacts(run_id, str(artifacts))
        client.set_terminated(run_id, status=record["status"], end_time=record.get("end_time"))
    except BaseException:
        client.delete_run(run_id)
        raise
    return run_id


def batches(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


# -- command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line of ``python -m analysis.archive``."""
    parser = argparse.ArgumentParser(prog="python -m analysis.archive", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="write an experiment's runs to an archive folder")
    export.add_argument("--tracking-uri", default="sqlite:///mlflow.db", help="MLflow store to read (default: sqlite:///mlflow.db)")
    export.add_argument("--experiment", default="saffu", help="experiment to export (default: saffu)")
    export.add_argument("--out", required=True, type=Path, help="archive folder to write, new or from an earlier export")
    load = commands.add_parser("import", help="create an archive's runs in an experiment")
    load.add_argument("--tracking-uri", default="sqlite:///mlflow.db", help="MLflow store to write (default: sqlite:///mlflow.db)")
    load.add_argument("--experiment", default="saffu", help="experiment to create the runs in; created if missing (default: saffu)")
    load.add_argument("archive", type=Path, help="archive folder written by `export`")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the export or import command; return 0 on success and 1 on an error."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    where = f"experiment {args.experiment!r} of {redact_uri(args.tracking_uri)}"
    try:
        if args.command == "export":
            summary = export_runs(args.tracking_uri, args.experiment, args.out)
            print(f"{args.out}: {summary.line('exported')} from {where}")
        else:
            summary = import_runs(args.tracking_uri, args.experiment, args.archive)
            print(f"{args.archive}: {summary.line('imported')} into {where}")
    except AnalysisError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except MlflowException as error:
        print(f"error: {where}: {error.message}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"error: {error.filename or ''}: {error.strerror or error}; check the folder's path and permissions", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
