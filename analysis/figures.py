"""Matplotlib figures of a sweep: the Pareto front, factor effects and fine-tuning curves.

The functions build figures with the object-oriented API (``matplotlib.figure.Figure``
on the Agg canvas), so they never open a window and never touch pyplot's global state.
Each returns the Figure; :func:`save_figure` writes it as a PNG.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from analysis.effects import FACTORS, order_levels, phase_frame, saffu_jobs
from analysis.load import ANCHOR_MODELS
from analysis.pareto import ParetoResult, knee_point

log = logging.getLogger(__name__)

ANCHOR_LABELS = {"kneser_ney": "Kneser-Ney", "gpt2": "GPT-2"}
ANCHOR_MARKERS = {"kneser_ney": "s", "gpt2": "*"}
AXIS_LABELS = {
    "n_params": "parameters",
    "wall_seconds": "wall-clock seconds (sum of phases)",
    "val_ppl": "validation perplexity",
}


def new_figure(width: float = 7.0, height: float = 4.5) -> Figure:
    """Return a Figure attached to an Agg canvas."""
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Figure, path: str | Path, dpi: int = 110) -> Path:
    """Write `figure` as a PNG to `path`, creating the folder, and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=dpi)
    log.info("wrote %s", path)
    return path


def plot_pareto(result: ParetoResult, anchors: pd.DataFrame | None = None, title: str | None = None) -> Figure:
    """Plot the ranked variants, the front as a step line, the knee and the anchors.

    `result` comes from :func:`analysis.pareto.pareto_front`. `anchors` is a jobs frame
    of anchor models (column ``model`` in ANCHOR_MODELS) with the same cost and objective
    columns. Anchors missing either value are left out. The cost axis is logarithmic
    when every plotted cost is positive.
    """
    figure = new_figure()
    axes = figure.add_subplot()
    cost, objective = result.cost, result.objective
    ranked = result.ranked
    dominated = ranked.loc[~ranked["on_front"]]
    axes.scatter(dominated[cost], dominated[objective], s=18, color="0.6", label="dominated", zorder=2)
    front = result.front
    if len(front):
        axes.step(front[cost], front[objective], where="post", color="C0", linewidth=1.2, zorder=3)
        axes.scatter(front[cost], front[objective], s=30, color="C0", label="Pareto front", zorder=4)
    knee = knee_point(result) if len(front) else None
    if knee is not None:
        axes.scatter([knee[cost]], [knee[objective]], s=140, facecolors="none", edgecolors="C3", linewidths=1.5,
                     label="knee", zorder=5)

    plotted_costs = list(ranked[cost])
    if anchors is not None and len(anchors):
        for model in ANCHOR_MODELS:
            rows = anchors.loc[anchors["model"] == model] if "model" in anchors else anchors.iloc[0:0]
            rows = rows.loc[np.isfinite(pd.to_numeric(rows.get(cost), errors="coerce").astype(float))
                            & np.isfinite(pd.to_numeric(rows.get(objective), errors="coerce").astype(float))]
            if rows.empty:
                continue
            axes.scatter(rows[cost], rows[objective], s=90, marker=ANCHOR_MARKERS[model], color="C1" if model == "kneser_ney" else "C2",
                         edgecolors="black", linewidths=0.5, label=ANCHOR_LABELS[model], zorder=6)
            for _, row in rows.iterrows():
                axes.annotate(ANCHOR_LABELS[model], (row[cost], row[objective]), textcoords="offset points",
                              xytext=(6, 4), fontsize=8)
            plotted_costs.extend(rows[cost])
    if plotted_costs and all(float(c) > 0 for c in plotted_costs):
        axes.set_xscale("log")
    axes.set_xlabel(AXIS_LABELS.get(cost, cost))
    axes.set_ylabel(AXIS_LABELS.get(objective, objective))
    axes.set_title(title or f"{AXIS_LABELS.get(objective, objective)} vs {AXIS_LABELS.get(cost, cost)}")
    axes.grid(True, which="both", alpha=0.3)
    if len(ranked) or (anchors is not None and len(anchors)):
        axes.legend(fontsize=8, loc="best")
    else:
        axes.text(0.5, 0.5, "no finished run with both values", transform=axes.transAxes, ha="center")
    return figure


def plot_factor_effects(jobs: pd.DataFrame, factors: list[str], value: str = "val_ppl",
                        factor_columns: dict[str, str] | None = None) -> Figure:
    """Draw one box plot per factor of `value` by level, with the jobs as points.

    Each panel pools the non-anchor jobs over the other factors (the ``phase`` panel
    uses the per-phase metrics). The value axis is logarithmic, one panel per factor,
    three panels a row.
    """
    factor_columns = FACTORS if factor_columns is None else factor_columns
    columns = min(3, max(1, len(factors)))
    rows = max(1, math.ceil(len(factors) / columns))
    figure = new_figure(4.0 * columns, 3.4 * rows)
    if not factors:
        axes = figure.add_subplot()
        axes.text(0.5, 0.5, "no factor takes two or more values", transform=axes.transAxes, ha="center")
        axes.set_axis_off()
        return figure
    generator = np.random.default_rng(0)
    for position, name in enumerate(factors, start=1):
        axes = figure.add_subplot(rows, columns, position)
        column = factor_columns.get(name, name)
        frame = phase_frame(jobs, metric=value) if column == "phase" else saffu_jobs(jobs, value)
        if column not in frame or frame.empty:
            axes.set_title(f"{name}: no data")
            continue
        levels = frame[column].astype(object).where(frame[column].notna(), "None")
        order = order_levels(list(levels))
        groups = [frame.loc[levels == level, value].to_numpy(dtype=float) for level in order]
        axes.boxplot(groups, tick_labels=[str(level) for level in order], showfliers=False)
        for index, group in enumerate(groups, start=1):
            jitter = generator.uniform(-0.12, 0.12, size=len(group))
            axes.scatter(index + jitter, group, s=10, color="C0", alpha=0.7, zorder=3)
        axes.set_yscale("log")
        axes.set_title(name)
        axes.set_ylabel(AXIS_LABELS.get(value, value))
        axes.tick_params(axis="x", labelrotation=30)
        axes.grid(True, axis="y", alpha=0.3)
    return figure


def plot_finetune_curves(curves: pd.DataFrame, labels: dict[str, str] | None = None) -> Figure:
    """Plot per-epoch validation perplexity, one color per run.

    `curves` is the long frame of :func:`analysis.load.load_curves` (columns
    ``run_id``, ``metric``, ``step``, ``value``). ``finetune/epoch_val_ppl`` is drawn
    solid and ``bp_only/epoch_val_ppl`` dashed. `labels` maps run ids to legend labels.
    """
    figure = new_figure()
    axes = figure.add_subplot()
    labels = labels or {}
    styles = {"finetune/epoch_val_ppl": "-", "bp_only/epoch_val_ppl": "--"}
    if curves.empty:
        axes.text(0.5, 0.5, "no per-epoch curves were logged", transform=axes.transAxes, ha="center")
    for index, (run_id, run_curves) in enumerate(curves.groupby("run_id", sort=False)):
        color = f"C{index % 10}"
        for metric, metric_curve in run_curves.groupby("metric", sort=False):
            # One legend entry per run (its fine-tuning curve), because the line style shows the phase.
            label = labels.get(run_id, run_id[:8]) if metric == "finetune/epoch_val_ppl" else None
            axes.plot(metric_curve["step"], metric_curve["value"], styles.get(metric, ":"), color=color, marker="o",
                      markersize=3, label=label)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("epoch")
    axes.set_ylabel(AXIS_LABELS["val_ppl"])
    axes.set_title("fine-tuning (solid) and bp-only (dashed) curves")
    if not curves.empty:
        axes.set_yscale("log")
        axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes.grid(True, which="both", alpha=0.3)
    return figure
