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
from analysis.report import analyze, write_report

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
