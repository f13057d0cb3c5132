"""Compare an Optuna study's Pareto front with the grid's, by hypervolume, from an MLflow store.

    python benchmarks/optuna_vs_grid.py --tracking-uri sqlite:///mlflow.db --budgets 25 50 100

The grid and the study must log to one experiment, and tags distinguish their runs:

- the study's parent run has ``saffu.optuna_study``; its ``trials.csv`` artifact lists every
  trial with its state and MLflow run (a trial that reused a FINISHED run, for example one
  of the grid's, points at that run);
- a grid's parent run is a ``saffu.role=sweep`` run without ``saffu.optuna_study``; its
  ``jobs.csv`` artifact lists the config hash of every job, also of those that the grid
  skipped because a FINISHED run of the config already existed.

Points are (log10(n_params), val_ppl), both minimized. The reference point is worse than
every grid and study point: per coordinate, the maximum plus 10% of the range. For each
budget N the study's front is that of its first N COMPLETE trials by trial number, and the
table gives its hypervolume divided by the grid front's. A ratio of 1 means the study
found a front as good as the full grid's.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from saffu.search import hypervolume_2d, objective_point, pareto_front, reference_point  # noqa: E402
from saffu.tracking import TAG_CONFIG_HASH, TAG_OPTUNA_STUDY, TAG_ROLE, TAG_SWEEP_NAME  # noqa: E402


@dataclass
class StudyTrial:
    number: int
    run_id: str
    point: tuple[float, float]


def read_csv_artifact(client, run_id: str, name: str) -> list[dict[str, str]] | None:
    """Return the rows of a CSV artifact of a run, or None when the run has no such file."""
    import tempfile

    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory() as folder:
        try:
            text = Path(client.download_artifacts(run_id, name, folder)).read_text(encoding="utf-8")
        except (MlflowException, OSError):
            return None
    return list(csv.DictReader(io.StringIO(text)))


def run_point(run) -> tuple[float, float] | None:
    """Return a run's (log10(n_params), val_ppl), or None when a metric is missing or not finite."""
    metrics = run.data.metrics
    if "val_ppl" not in metrics or "n_params" not in metrics:
        return None
    val_ppl, n_params = float(metrics["val_ppl"]), float(metrics["n_params"])
    if not (math.isfinite(val_ppl) and math.isfinite(n_params) and n_params > 0):
        return None
    return objective_point(val_ppl, n_params)


def load_points(tracking_uri: str, experiment: str, study: str | None, grid_sweep: str | None):
    """Read the grid's points and the study's COMPLETE trials (in trial order) from MLflow."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise SystemExit(f"experiment {experiment!r} not found in {tracking_uri}; pass --experiment NAME")
    experiment_id = found.experiment_id

    def search(filter_string: str) -> list:
        runs, token = [], None
        while True:
            page = client.search_runs([experiment_id], filter_string, max_results=1000, page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    parents = search(f"tags.`{TAG_ROLE}` = 'sweep'")
    studies = [run for run in parents if TAG_OPTUNA_STUDY in run.data.tags]
    if study is not None:
        studies = [run for run in studies if run.data.tags[TAG_OPTUNA_STUDY] == study]
    if not studies:
        raise SystemExit(f"no Optuna study{' named ' + study if study else ''} in experiment {experiment!r}")
    if len(studies) > 1:
        names = sorted({run.data.tags[TAG_OPTUNA_STUDY] for run in studies})
        raise SystemExit(f"several studies in experiment {experiment!r}: {', '.join(names)}; pass --study NAME")
    study_run = studies[0]

    grids = [run for run in parents if TAG_OPTUNA_STUDY not in run.data.tags]
    if grid_sweep is not None:
        grids = [run for run in grids if run.data.tags.get(TAG_SWEEP_NAME) == grid_sweep]
    if not grids:
        raise SystemExit(f"no grid sweep{' named ' + grid_sweep if grid_sweep else ''} in experiment {experiment!r}")

    finished = search(f"tags.`{TAG_ROLE}` = 'job' and attributes.status = 'FINISHED'")
    by_id = {run.info.run_id: run for run in finished}
    by_hash = {run.data.tags.get(TAG_CONFIG_HASH): run for run in sorted(finished, key=lambda r: r.info.start_time)}

    grid_points: dict[str, tuple[float, float]] = {}
    for grid in grids:
        jobs = read_csv_artifact(client, grid.info.run_id, "jobs.csv")
        if jobs is None:
            raise SystemExit(f"grid sweep run {grid.info.run_id} has no jobs.csv; relaunch the grid to write it")
        for job in jobs:
            run = by_hash.get(job["config_hash"])
            point = run_point(run) if run is not None else None
            if point is not None:
                grid_points[job["config_hash"]] = point

    trials_table = read_csv_artifact(client, study_run.info.run_id, "trials.csv")
    if trials_table is None:
        raise SystemExit(f"study run {study_run.info.run_id} has no trials.csv; it is written when a launch ends")
    trials = []
    for row in sorted(trials_table, key=lambda row: int(row["trial"])):
        run = by_id.get(row["mlflow_run_id"]) or by_hash.get(row["config_hash"])
        if row["state"] != "COMPLETE" or run is None:
            continue
        point = run_point(run)
        if point is not None:
            trials.append(StudyTrial(int(row["trial"]), row["mlflow_run_id"], point))
    return study_run.data.tags[TAG_OPTUNA_STUDY], grid_points, trials


def comparison_rows(
    grid_points: dict[str, tuple[float, float]],
    trials: Sequence[StudyTrial],
    budgets: Sequence[int],
    reference: tuple[float, float] | None = None,
) -> tuple[tuple[float, float], float, list[dict[str, object]]]:
    """Return the reference point, the grid front's hypervolume and one row per budget."""
    every_point = list(grid_points.values()) + [trial.point for trial in trials]
    reference = reference or reference_point(every_point)
    grid_hv = hypervolume_2d(grid_points.values(), reference)
    rows = []
    for budget in budgets:
        used = trials[:budget]
        row: dict[str, object] = {"budget": budget, "trials": len(used), "configs": len({t.run_id for t in used})}
        front = pareto_front(trial.point for trial in used)
        study_hv = hypervolume_2d(front, reference)
        row.update(front=len(front), hypervolume=study_hv, ratio=study_hv / grid_hv if grid_hv > 0 else math.nan)
        row["note"] = "" if len(used) >= budget else f"the study has only {len(trials)} COMPLETE trials"
        rows.append(row)
    return reference, grid_hv, rows


def markdown_table(rows: Sequence[dict[str, object]], grid_hv: float) -> str:
    lines = [
        "| trials | COMPLETE trials used | distinct runs | front size | hypervolume | grid hypervolume | ratio | note |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['budget']} | {row['trials']} | {row['configs']} | {row['front']} | {row['hypervolume']:.4g} "
            f"| {grid_hv:.4g} | {row['ratio']:.3f} | {row['note']} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db", help="MLflow tracking URI (default: %(default)s)")
    parser.add_argument("--experiment", default="saffu", help="MLflow experiment name (default: %(default)s)")
    parser.add_argument("--study", help="Optuna study name (default: the only study in the experiment)")
    parser.add_argument("--grid-sweep", help="sweep name of the grid (default: every sweep that is not a study)")
    parser.add_argument("--budgets", type=int, nargs="+", default=[25, 50, 100], help="trial counts (default: 25 50 100)")
    parser.add_argument(
        "--reference", type=float, nargs=2, metavar=("LOG10_PARAMS", "VAL_PPL"),
        help="reference point (default: 10%% of the range beyond the worst grid or study point)",
    )
    args = parser.parse_args(argv)

    study, grid_points, trials = load_points(args.tracking_uri, args.experiment, args.study, args.grid_sweep)
    if not grid_points:
        raise SystemExit("the grid has no FINISHED run with finite val_ppl and n_params")
    reference = tuple(args.reference) if args.reference else None
    reference, grid_hv, rows = comparison_rows(grid_points, trials, args.budgets, reference)
    grid_front = pareto_front(grid_points.values())
    print(f"Study `{study}` against the grid: {len(grid_points)} grid configs, grid front of {len(grid_front)} points.")
    print(f"Points are (log10(n_params), val_ppl), both minimized; reference point ({reference[0]:.4g}, {reference[1]:.4g}).")
    print()
    print(markdown_table(rows, grid_hv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
