"""Analysis of SAFFU ablation sweeps recorded in MLflow: loading, Pareto fronts, factor
effects, figures and a Markdown report (``python -m analysis.report``).

The names below are imported from their modules on first use, so that the command-line
programs (``python -m analysis.archive``, ``analysis.export``, ``analysis.report``) start
without importing pandas and matplotlib first and can catch Ctrl-C while they import.
"""

import importlib

# The module of each name that ``analysis`` exports.
_MODULES = {
    "FACTORS": "effects",
    "factor_effects": "effects",
    "interaction_effects": "effects",
    "interaction_table": "effects",
    "phase_frame": "effects",
    "varied_factors": "effects",
    "plot_factor_effects": "figures",
    "plot_finetune_curves": "figures",
    "plot_pareto": "figures",
    "save_figure": "figures",
    "AnalysisError": "load",
    "ExperimentNotFoundError": "load",
    "NoRunsError": "load",
    "SweepRuns": "load",
    "TrackingStoreError": "load",
    "load_curves": "load",
    "load_runs": "load",
    "ParetoResult": "pareto",
    "best_per_budget": "pareto",
    "knee_point": "pareto",
    "pareto_front": "pareto",
    "quantile_budgets": "pareto",
    "analyze": "report",
    "write_report": "report",
}

__all__ = sorted(_MODULES)


def __getattr__(name: str):
    if name not in _MODULES:
        raise AttributeError(f"module 'analysis' has no attribute {name!r}")
    return getattr(importlib.import_module(f"analysis.{_MODULES[name]}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_MODULES))
