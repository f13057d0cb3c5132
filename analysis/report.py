"""Write a Markdown report of a sweep, with its figures, from an MLflow tracking store.

Usage::

    python -m analysis.report --tracking-uri sqlite:///mlflow.db --experiment saffu \\
        [--sweep-id ID] --out reports/latest

writes ``OUT/report.md``, the PNG figures it links and ``OUT/ranked.csv``.
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
    import math
    from dataclasses import dataclass
    from datetime import datetime, timezone
    from pathlib import Path

    import pandas as pd

    from analysis.effects import FACTORS, factor_effects, interaction_effects, interaction_table, varied_factors
    from analysis.figures import plot_factor_effects, plot_finetune_curves, plot_pareto, save_figure
    from analysis.load import AnalysisError, SweepRuns, add_store_arguments, as_options, load_curves, load_runs
    from analysis.pareto import ParetoResult, best_per_budget, knee_point, pareto_front
    from saffu.tracking import redact_uri

log = logging.getLogger(__name__)

# Job columns shown in the report's tables, in this order, when the frame has them.
JOB_COLUMNS = [
    "rank",
    "run_name",
    "model",
    "model.block_size",
    "model.radius",
    "experts",
    "model.layers",
    "n_params",
    "val_ppl",
    "test_ppl",
    "wall_seconds",
    "tied",
]
FIGURES = {
    "pareto_params": "pareto_params.png",
    "pareto_wall": "pareto_wall_clock.png",
    "factors": "factor_effects.png",
    "curves": "finetune_curves.png",
}
MAX_CURVE_RUNS = 8


@dataclass
class ReportSections:
    """The analysis results that the report shows, for callers that want them too."""

    runs: SweepRuns
    by_params: ParetoResult
    by_wall_clock: ParetoResult
    effects: pd.DataFrame
    interactions: pd.DataFrame


def format_value(value: object) -> str:
    """Format one table cell: integers plainly, floats to 4 significant digits, missing as blank."""
    if value is None or value is pd.NA:
        return ""
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        if value.is_integer() and abs(value) < 1e15:
            return f"{int(value):,}"
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, pd.Timestamp):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(frame: pd.DataFrame, columns: list[str] | None = None, max_rows: int | None = None) -> str:
    """Render `frame` as a GitHub Markdown table, keeping the listed columns that exist."""
    columns = [c for c in (columns or list(frame.columns)) if c in frame.columns]
    if frame.empty or not columns:
        return "_none_\n"
    shown = frame if max_rows is None else frame.head(max_rows)
    lines = ["| " + " | ".join(str(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    for _, row in shown.iterrows():
        lines.append("| " + " | ".join(format_value(_python_value(row[c])) for c in columns) + " |")
    if max_rows is not None and len(frame) > max_rows:
        lines.append(f"\n_{len(frame) - max_rows} more rows not shown._")
    return "\n".join(lines) + "\n"


def _python_value(value: object) -> object:
    # Converts numpy scalars to Python ones, so that format_value receives int and float.
    return value.item() if hasattr(value, "item") and not isinstance(value, (str, pd.Timestamp)) else value


def analyze(runs: SweepRuns) -> ReportSections:
    """Compute the fronts, factor effects and interactions of the report from `runs`."""
    saffu = runs.jobs.loc[~runs.jobs["is_anchor"]]
    for column in ("val_ppl", "n_params"):
        if column not in saffu:
            saffu = saffu.assign(**{column: float("nan")})
    factors = varied_factors(runs.jobs)
    return ReportSections(
        runs=runs,
        by_params=pareto_front(saffu, "val_ppl", "n_params"),
        by_wall_clock=pareto_front(saffu, "val_ppl", "wall_seconds"),
        effects=factor_effects(runs.jobs, factors) if "val_ppl" in runs.jobs else pd.DataFrame(),
        interactions=interaction_effects(runs.jobs, factors) if "val_ppl" in runs.jobs else pd.DataFrame(),
    )


def write_report(runs: SweepRuns, out_dir: str | Path, top: int = 20) -> Path:
    """Write ``report.md``, ``ranked.csv`` and the PNG figures to `out_dir`, and return the report path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sections = analyze(runs)
    anchors = runs.jobs.loc[runs.jobs["is_anchor"]]

    save_figure(plot_pareto(sections.by_params, anchors), out_dir / FIGURES["pareto_params"])
    save_figure(plot_pareto(sections.by_wall_clock), out_dir / FIGURES["pareto_wall"])
    factors = list(dict.fromkeys(sections.effects["factor"])) if len(sections.effects) else []
    save_figure(plot_factor_effects(runs.jobs, factors), out_dir / FIGURES["factors"])
    if trained_phases(runs.jobs):
        curve_runs = sections.by_params.front.head(MAX_CURVE_RUNS)
        curves = load_curves(runs.tracking_uri, list(curve_runs["run_id"])) if len(curve_runs) else pd.DataFrame(
            columns=["run_id", "metric", "step", "value"]
        )
        save_figure(plot_finetune_curves(curves, dict(zip(curve_runs["run_id"], curve_runs["run_name"]))),
                    out_dir / FIGURES["curves"])
    sections.by_params.ranked.to_csv(out_dir / "ranked.csv", index=False)

    path = out_dir / "report.md"
    path.write_text(render_markdown(sections, top), encoding="utf-8")
    log.info("wrote %s", path)
    return path


def render_markdown(sections: ReportSections, top: int = 20) -> str:
    """Return the report text; figure links are the file names in FIGURES."""
    runs = sections.runs
    parts = [_header(runs), _runs_section(runs, sections), _pareto_section(sections, top),
             _effects_section(sections), _curves_section(runs.jobs)]
    return "\n".join(parts)


def _header(runs: SweepRuns) -> str:
    sweep_ids = sorted({s for s in runs.sweeps["sweep_id"].dropna()} | {s for s in runs.jobs["sweep_id"].dropna()})
    lines = [
        f"# Sweep report: {runs.experiment_name}",
        "",
        f"- Tracking store: `{redact_uri(runs.tracking_uri)}`",
        f"- Experiment: `{runs.experiment_name}` (id {runs.experiment_id})",
        f"- Sweep ids: {', '.join(f'`{s}`' for s in sweep_ids) if sweep_ids else 'none tagged'}"
        + (" (filtered)" if runs.sweep_id is not None else ""),
        f"- Written: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        "",
    ]
    if len(runs.sweeps):
        lines += ["Sweep parent runs:", "", markdown_table(runs.sweeps, ["run_name", "sweep_id", "status", "start_time"])]
    return "\n".join(lines)


def _runs_section(runs: SweepRuns, sections: ReportSections) -> str:
    counts = runs.summary()
    counts["excluded_from_front"] = len(sections.by_params.excluded)
    count_table = pd.DataFrame({"runs": list(counts.keys()), "count": list(counts.values())})
    lines = [
        "## Runs",
        "",
        "Only finished jobs with a finite `val_ppl` and `n_params` enter the rankings. Failed, unfinished and "
        "untagged runs are listed here, and a config hash with several finished runs keeps its latest run. "
        "`never_started` counts the KILLED runs of queued jobs of an interrupted launch, which hold only "
        "their config and are not listed.",
        "",
        markdown_table(count_table),
    ]
    if len(runs.failed):
        lines += ["Failed or killed runs (`retried_ok`: a later run of the same config finished):", "",
                  markdown_table(runs.failed, ["run_name", "run_id", "status", "config_hash", "retried_ok"])]
    if len(runs.unfinished):
        lines += ["Unfinished runs:", "", markdown_table(runs.unfinished, ["run_name", "run_id", "status", "config_hash"])]
    if len(runs.duplicates):
        lines += ["Duplicate finished runs replaced by a later run of the same config:", "",
                  markdown_table(runs.duplicates, ["run_name", "run_id", "config_hash", "kept_run_id", "val_ppl"])]
    if len(runs.untagged):
        lines += ["Runs without a `saffu.role` tag:", "", markdown_table(runs.untagged, ["run_name", "run_id", "status"])]
    if len(sections.by_params.excluded):
        lines += ["Finished jobs left out of the rankings:", "",
                  markdown_table(sections.by_params.excluded, ["run_name", "run_id", "n_params", "val_ppl", "reason"])]
    return "\n".join(lines)


def _pareto_section(sections: ReportSections, top: int) -> str:
    by_params = sections.by_params
    knee = knee_point(by_params)
    budgets = best_per_budget(by_params)
    anchors = sections.runs.jobs.loc[sections.runs.jobs["is_anchor"]]
    knee_text = (
        f"Knee of the front (farthest below the chord from the cheapest to the best point, in log-log scale): "
        f"**{knee['run_name']}** with {format_value(_python_value(knee['n_params']))} parameters and validation "
        f"perplexity {format_value(_python_value(knee['val_ppl']))}."
        if knee is not None
        else "No knee: the front has fewer than 3 distinct points."
    )
    lines = [
        "## Pareto front: validation perplexity vs parameters",
        "",
        f"![Pareto front vs parameters]({FIGURES['pareto_params']})",
        "",
        f"{len(by_params.front)} of {len(by_params.ranked)} ranked SAFFU variants are on the front "
        "(no other variant has both fewer or equal parameters and lower or equal perplexity, with one strictly lower). "
        "`tied` marks front variants with the same parameter count and perplexity as another.",
        "",
        markdown_table(by_params.front, JOB_COLUMNS),
        knee_text,
        "",
        "### Best variant per parameter budget",
        "",
        markdown_table(budgets.rename(columns={"n_eligible": "variants_within"}),
                       ["budget", "variants_within", "run_name", "experts", "model.block_size", "model.radius",
                        "n_params", "val_ppl"]),
        "### Anchors",
        "",
        markdown_table(anchors, ["run_name", "model", "n_params", "val_ppl", "test_ppl"]),
        "## Pareto front: validation perplexity vs wall-clock time",
        "",
        f"![Pareto front vs wall-clock]({FIGURES['pareto_wall']})",
        "",
        "Wall-clock time is the sum of the logged phase times (`explicit/solve_seconds`, `finetune/seconds`, "
        f"`bp_only/seconds`). Variants left out for lack of a logged time or perplexity: "
        f"{len(sections.by_wall_clock.excluded)}.",
        "",
        markdown_table(sections.by_wall_clock.front, JOB_COLUMNS),
        f"## Ranked variants (top {top}; all in `ranked.csv`)",
        "",
        "Ordered by Pareto layer (1 = the front, 2 = the front once layer 1 is removed, ...), then perplexity.",
        "",
        markdown_table(by_params.ranked, ["pareto_layer", *JOB_COLUMNS], max_rows=top),
    ]
    return "\n".join(lines)


def _effects_section(sections: ReportSections) -> str:
    effects, interactions = sections.effects, sections.interactions
    lines = [
        "## Factor effects",
        "",
        f"![Factor effects]({FIGURES['factors']})",
        "",
        "Validation perplexity of the SAFFU jobs at each level of a factor, pooled over all other factors. "
        "The `phase` factor compares the explicit, fine-tuned and bp-only models of the same jobs.",
        "",
        markdown_table(effects),
        "### Two-factor interactions",
        "",
        "For each pair of factors: the cell means of log10 validation perplexity, minus an additive fit of the two "
        "main effects (least squares over the observed cells). `spread` is the max minus the min of those residuals: "
        "0.1 means the pair changes perplexity by a factor of 1.26 beyond what each factor does alone.",
        "",
        markdown_table(interactions),
    ]
    if len(interactions):
        top = interactions.iloc[0]
        means, residuals = interaction_table(sections.runs.jobs, top["factor_a"], top["factor_b"])
        lines += [
            f"Largest interaction: **{top['factor_a']} x {top['factor_b']}**. Geometric mean validation perplexity per cell "
            f"(rows {top['factor_a']}, columns {top['factor_b']}):",
            "",
            markdown_table((10**means).reset_index().rename(columns={top["factor_a"]: f"{top['factor_a']} \\ {top['factor_b']}"})
                           .rename(columns=str)),
            "Residuals after main effects (log10 units):",
            "",
            markdown_table(residuals.reset_index().rename(columns={top["factor_a"]: f"{top['factor_a']} \\ {top['factor_b']}"})
                           .rename(columns=str)),
        ]
    else:
        lines += ["No pair of factors has enough observed cells to show an interaction.", ""]
    return "\n".join(lines)


def trained_phases(jobs: pd.DataFrame) -> list[str]:
    """Return the training phases (``finetune``, ``bp_only``) that some job logged a result for."""
    return [phase for phase in ("finetune", "bp_only") if f"{phase}/val_ppl" in jobs and jobs[f"{phase}/val_ppl"].notna().any()]


def _curves_section(jobs: pd.DataFrame) -> str:
    if not trained_phases(jobs):
        return "\n".join([
            "## Fine-tuning curves",
            "",
            "No job of this sweep was fine-tuned or trained the bp-only baseline (as with "
            "`train.enabled=false train.bp_only=false`), so there are no curves to draw.",
            "",
        ])
    return "\n".join([
        "## Fine-tuning curves",
        "",
        f"Per-epoch validation perplexity of up to {MAX_CURVE_RUNS} front variants, from the explicit solution "
        "(fine-tuning, solid) and from a random start (bp-only, dashed).",
        "",
        f"![Fine-tuning curves]({FIGURES['curves']})",
        "",
        capped_sentence(jobs),
        "",
    ])


def capped_sentence(jobs: pd.DataFrame) -> str:
    """Return a sentence with the number of training phases that the ``train.max_seconds`` cap cut short."""
    counts = []
    for phase, name in (("finetune", "fine-tuning"), ("bp_only", "bp-only")):
        column = f"{phase}/capped"
        if column in jobs and jobs[column].notna().any():
            ran = jobs[column].dropna()
            counts.append(f"{int(ran.sum())} of {len(ran)} {name} phases")
    if not counts:
        return ""
    return (
        f"The `train.max_seconds` cap stopped {' and '.join(counts)} before early stopping or the last epoch "
        "(columns `finetune/capped` and `bp_only/capped`). A capped phase's perplexity depends on the "
        "machine's speed and load as well as on the variant."
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line of ``python -m analysis.report``."""
    parser = argparse.ArgumentParser(prog="python -m analysis.report", description=__doc__.split("\n\n")[0])
    add_store_arguments(parser)
    parser.add_argument("--out", required=True, type=Path, help="folder for report.md, ranked.csv and the PNG figures")
    parser.add_argument("--top", type=int, default=20, help="rows of the ranked table in the report (default: 20)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the report command; return 0 on success and 1 on an analysis error."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        runs = load_runs(args.tracking_uri, args.experiment, args.sweep_id)
        path = write_report(runs, args.out, top=args.top)
    except AnalysisError as error:
        print(f"error: {as_options(str(error))}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    with exit_quietly_when_stopped("interrupted; run the same command again to write the report"):
        sys.exit(main())
