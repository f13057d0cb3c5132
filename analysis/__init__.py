"""Analysis of SAFFU ablation sweeps recorded in MLflow: loading, Pareto fronts, factor
effects, figures and a Markdown report (``python -m analysis.report``)."""

from analysis.effects import FACTORS, factor_effects, interaction_effects, interaction_table, phase_frame, varied_factors
from analysis.figures import plot_factor_effects, plot_finetune_curves, plot_pareto, save_figure
from analysis.load import (
    AnalysisError,
    ExperimentNotFoundError,
    NoRunsError,
    SweepRuns,
    TrackingStoreError,
    load_curves,
    load_runs,
)
from analysis.pareto import ParetoResult, best_per_budget, knee_point, pareto_front, quantile_budgets


def __getattr__(name: str):
    # analysis.report is imported on first use: importing it here made
    # `python -m analysis.report` warn that the module was already in sys.modules.
    if name in ("analyze", "write_report"):
        from analysis import report

        return getattr(report, name)
    raise AttributeError(f"module 'analysis' has no attribute {name!r}")

__all__ = [
    "FACTORS",
    "AnalysisError",
    "ExperimentNotFoundError",
    "NoRunsError",
    "ParetoResult",
    "SweepRuns",
    "TrackingStoreError",
    "analyze",
    "best_per_budget",
    "factor_effects",
    "interaction_effects",
    "interaction_table",
    "knee_point",
    "load_curves",
    "load_runs",
    "pareto_front",
    "phase_frame",
    "plot_factor_effects",
    "plot_finetune_curves",
    "plot_pareto",
    "quantile_budgets",
    "save_figure",
    "varied_factors",
    "write_report",
]
