"""Copy an experiment's runs from one MLflow store to another through a folder of files.

Usage::

    python -m analysis.archive export --tracking-uri sqlite:///mlflow.db --experiment saffu --out runs/
    python -m analysis.archive import --tracking-uri sqlite:///other.db --experiment saffu runs/

`export` writes ``archive.json`` (the experiment and the list of runs) and, for each
finished, failed or killed run, ``runs/RUN_ID.json`` (name, status, times, params, tags
and every metric's full history) and ``artifacts/RUN_ID/`` (the run's artifacts). A run
still RUNNING is left out and named in the summary. Exporting into an earlier archive of
the same experiment adds and updates runs. ``archive.json`` marks the archive incomplete
while an export writes it, so an interrupted export leaves an archive that import refuses.

`import` creates each archived run in the target experiment with its name, status,
times, params, tags, metric histories and artifacts, and points a job run at the copy of
its sweep's parent run. Each copy is tagged ``saffu.archived_run_id`` with the id of the
run in the store where it ran. A run that the target already contains, or a copy of it, is
not copied twice: importing an archive again, or an archive of the copies back into the
first store, copies nothing. A copy whose run changed after the earlier export (a parent
run that a relaunch reopened and ended, a job exported before its parent run had ended)
is updated. An import killed half-way leaves at most one run RUNNING, which the next
import deletes and copies again. Because the config hash tags come along, a sweep
relaunched against the target store skips the configs that finished in the source.

MLflow itself has no run import. The tool for this, mlflow-export-import, has not had a
release since 1.2.0, which fails on MLflow 3 stores: it creates the target experiment a
second time and stops with "already exists". Hence this module.
"""

from __future__ import annotations

import sys

from saffu.signals import exit_quietly_when_stopped, handle_stop_signals

if __name__ == "__main__":
    handle_stop_signals()

# Ctrl-C or SIGTERM while MLflow loads ends the command with one line.
with exit_quietly_when_stopped("interrupted while starting; nothing was copied"):
    import argparse
    import json
    import logging
    import math
    import os
    import shutil
    import socket
    import tempfile
    from collections.abc import Iterator, Mapping
    from dataclasses import dataclass, field
    from pathlib import Path
    from typing import Any

    import psutil
    from mlflow.exceptions import MlflowException

    from analysis.export import write_text
    from analysis.load import (
        AnalysisError,
        TrackingStoreError,
        as_options,
        find_experiment,
        open_client,
        search_all_runs,
    )
    from saffu.files import apply_umask_mode
    from saffu.tracking import (
        TAG_PARENT,
        TAG_ROLE,
        RunRecorder,
        TrackingURIError,
        prepare_store,
        redact_uri,
        validate_experiment_name,
    )

log = logging.getLogger(__name__)

# MLflow draws a progress bar for each run's artifacts and prints a link to each run it ends.
# The summary line replaces both.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

FORMAT = "saffu-run-archive"
FORMAT_VERSION = 1
# The tag on an imported run that names the run it copies (for a copy of a copy, the first run).
TAG_ARCHIVED_RUN_ID = "saffu.archived_run_id"
# The tag on a copy while an import writes it: the importing process as HOST:PID:START_TIME.
TAG_IMPORTER = "saffu.importer"
TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")
NON_FINITE = ("nan", "inf", "-inf")
# MLflow's limits per log_batch call.
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000


class ArchiveError(AnalysisError):
    """An archive folder that cannot be written or read, with the fix in the message."""


@dataclass
class ArchiveSummary:
    """The run ids of one export or import, by outcome."""

    copied: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)

    def line(self, verb: str) -> str:
        text = f"{len(self.copied)} runs {verb}"
        if self.updated:
            text += f", {len(self.updated)} updated"
        text += f", {len(self.skipped)} skipped"
        if self.left_out:
            shown = ", ".join(self.left_out[:3]) + (f" and {len(self.left_out) - 3} more" if len(self.left_out) > 3 else "")
            text += f", {len(self.left_out)} still RUNNING and left out ({shown})"
        return text


# -- export


def export_runs(tracking_uri: str, experiment: str, out: Path) -> ArchiveSummary:
    """Write the terminated runs of `experiment` in the store at `tracking_uri` to the
    archive folder `out`, creating it if needed.

    Each file is written atomically. ``archive.json`` has ``"complete": false`` while the
    export runs, so an interrupted export leaves an archive that import refuses.
    """
    header = existing_header(out, experiment)
    client = open_client(tracking_uri)
    experiment_id = find_experiment(client, experiment, tracking_uri)
    runs = search_all_runs(client, experiment_id)
    summary = ArchiveSummary()
    listed = set(header.get("runs", []))
    # A run imported from an archive is written under the id of the run where it ran, so a
    # later export of the copies updates that run's file instead of adding a second one.
    origins = {run.info.run_id: run.data.tags.get(TAG_ARCHIVED_RUN_ID, run.info.run_id) for run in runs}
    write_header(out, experiment, sorted(listed), complete=False)
    for run in sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id)):
        run_id = run.info.run_id
        origin = origins[run_id]
        if run.info.status not in TERMINAL_STATUSES:
            summary.left_out.append(origin)
            continue
        tags = dict(run.data.tags)
        if tags.get(TAG_PARENT) in origins:
            tags[TAG_PARENT] = origins[tags[TAG_PARENT]]
        record = {
            "run_id": origin,
            "run_name": run.info.run_name,
            "status": run.info.status,
            "start_time": run.info.start_time,
            "end_time": run.info.end_time,
            "params": dict(sorted(run.data.params.items())),
            "tags": dict(sorted(tags.items())),
            "metrics": {key: metric_history(client, run_id, key) for key in sorted(run.data.metrics)},
        }
        artifacts = out / "artifacts" / origin
        if not artifacts.exists() and not download_artifacts(client, run_id, artifacts):
            if run.data.tags.get(TAG_ROLE) == "job":
                log.warning("job run %s has no artifacts, not even config.yaml; its artifact folder may be missing", run_id)
        write_json(out / "runs" / f"{origin}.json", record)
        listed.add(origin)
        summary.copied.append(origin)
    write_header(out, experiment, sorted(listed), complete=True)
    return summary


def existing_header(out: Path, experiment: str) -> dict[str, Any]:
    """Return the header of the earlier archive in `out`, or {} for a new folder; raise
    ArchiveError when `out` is neither, or contains another experiment's archive."""
    if out.exists() and not out.is_dir():
        raise ArchiveError(f"--out {out} is a file; give a folder, new or made by an earlier export")
    if not out.is_dir() or not any(out.iterdir()):
        return {}
    if not (out / "archive.json").is_file():
        raise ArchiveError(f"--out {out} is a folder that holds no archive.json; give a new folder or an earlier archive")
    header = read_header(out)
    if header["experiment"] != experiment:
        raise ArchiveError(
            f"--out {out} holds the archive of experiment {header['experiment']!r}; "
            f"give a new folder for experiment {experiment!r}"
        )
    return header


def write_header(out: Path, experiment: str, runs: list[str], complete: bool) -> None:
    header = {"format": FORMAT, "version": FORMAT_VERSION, "experiment": experiment, "complete": complete, "runs": runs}
    write_json(out / "archive.json", header)


def metric_history(client: Any, run_id: str, key: str) -> list[list[Any]]:
    """Return every logged value of a metric as ``[step, timestamp, value]``, in logging order."""
    history = client.get_metric_history(run_id, key)
    return [[m.step, m.timestamp, encode_float(m.value)] for m in sorted(history, key=lambda m: (m.timestamp, m.step))]


def encode_float(value: float) -> float | str:
    """JSON has no NaN or infinity: write them as the strings that float() reads back."""
    return value if math.isfinite(value) else str(value)


def download_artifacts(client: Any, run_id: str, destination: Path) -> bool:
    """Copy a run's artifacts into `destination`, which appears only once they are all
    there. Return False when the run has none."""
    if not client.list_artifacts(run_id):
        return False
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{run_id}.", dir=destination.parent))
    try:
        client.download_artifacts(run_id, "", str(staging))
        apply_umask_mode(staging, directory=True)
        staging.rename(destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return True


def write_json(path: Path, value: Any) -> None:
    write_text(json.dumps(value, indent=1, allow_nan=False) + "\n", path)


# -- reading an archive


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

    @property
    def copied_tags(self) -> dict[str, str]:
        """The tags that a copy gets as they are; the parent link is translated."""
        return {key: value for key, value in self.record["tags"].items() if key not in (TAG_PARENT, TAG_IMPORTER)}


def read_header(folder: Path) -> dict[str, Any]:
    path = folder / "archive.json"
    header = read_json(path)
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ArchiveError(f"{path} is not the header of a saffu run archive; give the --out folder of an export")
    version = header.get("version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise ArchiveError(
            f"{path} has format version {version!r}, and this saffu reads version {FORMAT_VERSION}; "
            "import it with the saffu version that exported it"
        )
    runs = header.get("runs")
    if not isinstance(header.get("experiment"), str) or not isinstance(runs, list) or not all(isinstance(r, str) for r in runs):
        raise ArchiveError(f"{path} lacks the experiment name or the run list; export the archive again")
    return header


def read_archive(folder: Path) -> list[ArchivedRun]:
    """Read and check every run file of the archive `folder`, parents before their children.
    Raise ArchiveError on the first problem, before anything is imported."""
    if folder.exists() and not folder.is_dir():
        raise ArchiveError(f"{folder} is a file; give the --out folder of `python -m analysis.archive export`")
    if not folder.is_dir():
        raise ArchiveError(f"archive folder {folder} does not exist; give the --out folder of `python -m analysis.archive export`")
    header = read_header(folder)
    if header.get("complete") is not True:
        raise ArchiveError(
            f"the export that wrote {folder} did not finish, so runs may be missing; "
            "run the same export again, then import"
        )
    runs = []
    for run_id in header["runs"]:
        path = folder / "runs" / f"{run_id}.json"
        runs.append(ArchivedRun(path, check_record(path, read_json(path))))
        check_artifacts(folder / "artifacts" / run_id)
    archived = {run.run_id for run in runs}
    # Parents first, so that each child can point at its parent's new run id.
    return sorted(runs, key=lambda run: (run.parent_id in archived, run.record["start_time"] or 0, run.run_id))


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArchiveError(f"{path} is missing; export the archive again") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ArchiveError(f"{path} cannot be read as JSON ({error}); export the archive again") from None


def check_record(path: Path, record: Any) -> dict[str, Any]:
    """Return `record` if it has the fields, types and values that an export writes;
    otherwise raise ArchiveError naming the bad fields."""
    if not isinstance(record, dict):
        raise ArchiveError(f"{path} is not a run file of an export; export the archive again")
    problems = []
    if not isinstance(record.get("run_id"), str):
        problems.append("run_id")
    if record.get("status") not in TERMINAL_STATUSES:
        problems.append(f"status {record.get('status')!r}")
    if record.get("run_name") is not None and not isinstance(record["run_name"], str):
        problems.append("run_name")
    for name in ("start_time", "end_time"):
        if record.get(name) is not None and type(record[name]) is not int:
            problems.append(name)
    for name in ("params", "tags"):
        values = record.get(name)
        if not isinstance(values, dict) or not all(isinstance(v, str) for v in values.values()):
            problems.append(name)
    metrics = record.get("metrics")
    if not isinstance(metrics, dict):
        problems.append("metrics")
    else:
        problems += [f"metric {key!r}" for key, history in metrics.items() if not valid_history(history)]
    if problems:
        raise ArchiveError(f"{path} is not a run file of an export: bad {', '.join(problems)}; export the archive again")
    if path.stem != record["run_id"]:
        raise ArchiveError(f"{path} holds run {record['run_id']}, not {path.stem}; export the archive again")
    return record


def valid_history(history: Any) -> bool:
    """Return whether `history` is a list of ``[step, timestamp, value]`` as an export writes it."""
    if not isinstance(history, list):
        return False
    for point in history:
        if not isinstance(point, list) or len(point) != 3:
            return False
        step, timestamp, value = point
        if type(step) is not int or type(timestamp) is not int:
            return False
        if not (type(value) in (int, float) or value in NON_FINITE):
            return False
    return True


def check_artifacts(folder: Path) -> None:
    """Raise ArchiveError if a run's artifact folder contains a link: an import would copy the
    file that it points at, which may be anywhere on the importing machine."""
    if not folder.is_dir():
        return
    for path in folder.rglob("*"):
        if path.is_symlink():
            raise ArchiveError(f"{path} is a symbolic link; an archive holds plain files only, so replace it by the file")


# -- import


def import_runs(tracking_uri: str, experiment: str, folder: Path) -> ArchiveSummary:
    """Create the runs of the archive `folder` in `experiment` of the store at `tracking_uri`,
    creating the experiment if needed.

    A run that the target already contains, or a copy of it, is not copied again. A copy
    whose run changed since (a sweep relaunched after the earlier export) is updated:
    new tags, new metric values, the parent link, the status and end time.
    """
    archived = read_archive(folder)
    try:
        validate_experiment_name(experiment)
        spec = prepare_store(tracking_uri, experiment)
    except (TrackingURIError, ValueError) as error:
        raise TrackingStoreError(str(error)) from None
    recorder = RunRecorder(spec)
    present = {run.info.run_id for run in recorder.search("")}
    copies: dict[str, Any] = {}  # original run id -> its complete copy in the target
    for run in recorder.search(f"tags.`{TAG_ARCHIVED_RUN_ID}` != ''"):
        if run.info.status in TERMINAL_STATUSES:
            copies[run.data.tags[TAG_ARCHIVED_RUN_ID]] = run
        else:
            remove_unfinished_copy(recorder, run)

    summary = ArchiveSummary()
    new_ids: dict[str, str] = {}  # archived run id -> its run id in the target
    for run in archived:
        if run.run_id in present or run.origin in present:
            new_ids[run.run_id] = run.run_id if run.run_id in present else run.origin
            summary.skipped.append(run.run_id)
        elif run.origin in copies:
            copy = copies[run.origin]
            new_ids[run.run_id] = copy.info.run_id
            if update_copy(recorder.client, copy, run, new_ids):
                summary.updated.append(run.run_id)
            else:
                summary.skipped.append(run.run_id)
        else:
            new_id = copy_run(recorder, run, folder / "artifacts" / run.run_id, new_ids)
            new_ids[run.run_id] = new_id
            copies[run.origin] = recorder.get_run(new_id)
            summary.copied.append(run.run_id)
    return summary


def importer_identity() -> str:
    process = psutil.Process()
    return f"{socket.gethostname()}:{process.pid}:{process.create_time():.3f}"


def remove_unfinished_copy(recorder: RunRecorder, run: Any) -> None:
    """Delete a copy that an import left RUNNING when that import has ended; raise
    ArchiveError when it may still be running."""
    host, _, rest = run.data.tags.get(TAG_IMPORTER, "::").partition(":")
    pid, _, start = rest.partition(":")
    if host == socket.gethostname():
        try:
            alive = abs(psutil.Process(int(pid)).create_time() - float(start)) < 1.0
        except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
            alive = False
        if alive:
            raise ArchiveError(f"another import (PID {pid}) is copying runs into this experiment; wait for it to end")
    elif host:
        raise ArchiveError(
            f"run {run.info.run_id} is being copied by an import on host {host}, or was left by one that was killed; "
            f"once that import has ended, delete the run (`mlflow runs delete --run-id {run.info.run_id}`) and import again"
        )
    log.warning("deleting run %s, a copy of %s that a killed import left unfinished", run.info.run_id,
                run.data.tags[TAG_ARCHIVED_RUN_ID])
    recorder.delete_run(run.info.run_id)


def copy_run(recorder: RunRecorder, run: ArchivedRun, artifacts: Path, new_ids: Mapping[str, str]) -> str:
    """Create one archived run in the recorder's experiment and return its new id. A copy
    that fails half-way is deleted, so that no partial run stays behind."""
    from mlflow.entities import Param

    record = run.record
    tags = {**run.copied_tags, TAG_ARCHIVED_RUN_ID: run.origin, TAG_IMPORTER: importer_identity()}
    if run.parent_id in new_ids:
        tags[TAG_PARENT] = new_ids[run.parent_id]
    client = recorder.client
    created = client.create_run(
        recorder.spec.experiment_id, start_time=record["start_time"], tags=tags, run_name=record.get("run_name")
    )
    run_id = created.info.run_id
    try:
        params = [Param(key, value) for key, value in record["params"].items()]
        for chunk in batches(params, PARAMS_PER_BATCH):
            client.log_batch(run_id, params=chunk, synchronous=True)
        log_metric_points(client, run_id, metric_points(record))
        if artifacts.is_dir():
            client.log_artifacts(run_id, str(artifacts))
        client.delete_tag(run_id, TAG_IMPORTER)
        client.set_terminated(run_id, status=record["status"], end_time=record["end_time"])
    except BaseException:
        client.delete_run(run_id)
        raise
    return run_id


def update_copy(client: Any, copy: Any, run: ArchivedRun, new_ids: Mapping[str, str]) -> bool:
    """Bring an earlier copy up to date with its archived run; return whether it changed.

    A terminated run changes when a relaunch of its sweep reopens it (a sweep's parent
    run), and a job copied before its parent run had ended has no parent link yet.
    """
    from mlflow.entities import RunTag

    record = run.record
    tags = dict(run.copied_tags)
    if run.parent_id in new_ids:
        tags[TAG_PARENT] = new_ids[run.parent_id]
    changed_tags = [RunTag(key, value) for key, value in tags.items() if copy.data.tags.get(key) != value]
    ended_differently = (copy.info.status, copy.info.end_time) != (record["status"], record["end_time"])
    if not changed_tags and not ended_differently:
        return False
    run_id = copy.info.run_id
    for chunk in batches(changed_tags, 100):
        client.log_batch(run_id, tags=chunk, synchronous=True)
    if ended_differently:
        logged = {
            (key, m.step, m.timestamp) for key in record["metrics"] for m in client.get_metric_history(run_id, key)
        }
        log_metric_points(client, run_id, [m for m in metric_points(record) if (m.key, m.step, m.timestamp) not in logged])
        client.set_terminated(run_id, status=record["status"], end_time=record["end_time"])
    return True


def metric_points(record: Mapping[str, Any]) -> list[Any]:
    from mlflow.entities import Metric

    return [
        Metric(key, float(value), timestamp, step)
        for key, history in record["metrics"].items()
        for step, timestamp, value in history
    ]


def log_metric_points(client: Any, run_id: str, metrics: list[Any]) -> None:
    for chunk in batches(metrics, METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=chunk, synchronous=True)


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
    """Run the export or import command; return 0 on success, 1 on an error and 130 when
    interrupted by Ctrl-C or SIGTERM."""
    from saffu.launch import sigterm_as_interrupt

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    where = f"experiment {args.experiment!r} of {redact_uri(args.tracking_uri)}"
    folder = args.out if args.command == "export" else args.archive
    try:
        with sigterm_as_interrupt():
            if args.command == "export":
                summary = export_runs(args.tracking_uri, args.experiment, args.out)
                again = "; export again once they end" if summary.left_out else ""
                print(f"{args.out}: {summary.line('exported')} from {where}{again}")
            else:
                summary = import_runs(args.tracking_uri, args.experiment, args.archive)
                print(f"{args.archive}: {summary.line('imported')} into {where}")
    except KeyboardInterrupt:
        print(f"error: {args.command} interrupted; run the same command again to complete it", file=sys.stderr)
        return 130
    except AnalysisError as error:
        print(f"error: {as_options(str(error))}", file=sys.stderr)
        return 1
    except MlflowException as error:
        print(f"error: {where}: {error.message}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"error: {folder}: {error.strerror or error}; check the folder's path and permissions", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    with exit_quietly_when_stopped("interrupted; run the same command again to complete it"):
        sys.exit(main())
