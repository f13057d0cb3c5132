"""Export a sweep's job runs from an MLflow tracking store to one CSV file.

Usage::

    python -m analysis.export --tracking-uri sqlite:///mlflow.db --experiment saffu \\
        [--sweep-id ID] --out analysis/results/roadmap-gutenberg-fiction.csv

writes one row per job config. A config with a finished run gets the row of its latest
finished run. A config whose runs all failed or are still running gets the row of its
latest run, so the file shows what is missing instead of leaving it out. Rows are
sorted by status (FINISHED first) and then by the sweep's factors. The columns are
LEADING_COLUMNS, then every other param and metric in name order.
"""

from __future__ import annotations

import sys

from saffu.signals import exit_quietly_when_stopped, handle_stop_signals

if __name__ == "__main__":
    handle_stop_signals()

# Ctrl-C or SIGTERM while MLflow and pandas load ends the command with one line.
with exit_quietly_when_stopped("interrupted while starting; nothing was written"):
    import argparse
    import logging
    import os
    import tempfile
    from pathlib import Path

    import pandas as pd

    from analysis.effects import FACTORS
    from analysis.load import FINISHED, AnalysisError, SweepRuns, add_store_arguments, as_options, load_runs
    from saffu.files import apply_umask_mode

log = logging.getLogger(__name__)

# The factor columns of a job row. The factor "phase" compares metrics, so it has no column.
FACTOR_COLUMNS = tuple(column for column in FACTORS.values() if column != "phase")
# The columns a reader looks at first, in this order, when the runs have them.
LEADING_COLUMNS = (
    "status",
    "model",
    *FACTOR_COLUMNS,
    "n_params",
    "val_ppl",
    "test_ppl",
    "val_bpc",
    "test_bpc",
    "explicit/val_ppl",
    "finetune/val_ppl",
    "bp_only/val_ppl",
    "wall_seconds",
    "config_hash",
    "run_id",
    "run_name",
    "sweep_id",
    "git_commit",
    "start_time",
    "end_time",
)


def export_frame(runs: SweepRuns) -> pd.DataFrame:
    """Return one row per job config of `runs`: its finished run, else its latest run."""
    finished_hashes = set(runs.jobs["config_hash"].dropna())
    others = pd.concat(
        [runs.failed.drop(columns=["retried_ok"]), runs.unfinished, runs.never_started], ignore_index=True
    )
    if len(others):
        others = others.loc[~others["config_hash"].isin(finished_hashes)]
        others = others.sort_values("start_time", na_position="first", kind="stable")
        others = others.drop_duplicates("config_hash", keep="last")
    frames = [frame for frame in (runs.jobs, others) if len(frame)]
    if not frames:
        return pd.DataFrame(columns=list(LEADING_COLUMNS))
    rows = pd.concat(frames, ignore_index=True)

    rows["_unfinished"] = rows["status"] != FINISHED
    sort_keys = ["_unfinished", *[column for column in FACTOR_COLUMNS if column in rows.columns], "config_hash"]
    rows = rows.sort_values(sort_keys, na_position="last", kind="stable").drop(columns=["_unfinished"])
    leading = [column for column in LEADING_COLUMNS if column in rows.columns]
    rest = sorted(column for column in rows.columns if column not in leading and column != "role")
    return rows[leading + rest].reset_index(drop=True)


def write_csv(frame: pd.DataFrame, out: Path) -> None:
    """Write `frame` to `out` as CSV, atomically (see :func:`write_text`)."""
    write_text(frame.to_csv(index=False, float_format="%.10g", lineterminator="\n"), out)


def write_text(text: str, out: Path) -> None:
    """Write `text` to `out` through a temporary file in the same folder, so an
    interrupted write never leaves a half-written file in place of a complete one."""
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    try:
        with os.fdopen(handle, "w", newline="") as stream:
            stream.write(text)
        apply_umask_mode(temporary)
        os.replace(temporary, out)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line of ``python -m analysis.export``."""
    parser = argparse.ArgumentParser(prog="python -m analysis.export", description=__doc__.split("\n\n")[0])
    add_store_arguments(parser)
    parser.add_argument("--out", required=True, type=Path, help="CSV file to write")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the export command; return 0 on success and 1 on an analysis error."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.out.is_dir():
        print(f"error: --out {args.out} is a folder; give a file name such as {args.out / 'runs.csv'}", file=sys.stderr)
        return 1
    try:
        runs = load_runs(args.tracking_uri, args.experiment, args.sweep_id)
    except AnalysisError as error:
        print(f"error: {as_options(str(error))}", file=sys.stderr)
        return 1
    frame = export_frame(runs)
    try:
        write_csv(frame, args.out)
    except OSError as error:
        print(f"error: failed to write {args.out}: {error.strerror or error}; choose a writable --out path", file=sys.stderr)
        return 1
    counts = frame["status"].value_counts().to_dict() if len(frame) else {}
    print(f"{args.out}: {len(frame)} job configs ({', '.join(f'{n} {s}' for s, n in sorted(counts.items()))})")
    return 0


if __name__ == "__main__":
    with exit_quietly_when_stopped("interrupted; run the same command again to write the file"):
        sys.exit(main())
