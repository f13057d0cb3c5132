"""Factor effects on validation perplexity across a sweep's SAFFU jobs.

A factor is a config setting that the sweep varies. :data:`FACTORS` maps each factor's
short name to its column in the jobs frame of :func:`analysis.load.load_runs`. The
factor ``phase`` is not a column: it compares the explicit, fine-tuned and bp-only
models of each job, read from the ``<phase>/val_ppl`` metrics by :func:`phase_frame`.
"""

from __future__ import annotations

import itertools
import logging
import re

import numpy as np
import pandas as pd

from analysis.load import PHASES

log = logging.getLogger(__name__)

FACTORS: dict[str, str] = {
    "block_size": "model.block_size",
    "radius": "model.radius",
    "experts": "experts",
    "layers": "model.layers",
    "attention_code_dim": "model.attention_code_dim",
    "vocab_size": "tokenizer.vocab_size",
    "alpha": "solver.alpha",
    "phase": "phase",
}

EFFECT_COLUMNS = ["factor", "level", "count", "median", "min", "max", "mean"]
INTERACTION_COLUMNS = ["factor_a", "factor_b", "n_cells", "spread", "max_abs_residual", "scale"]


def saffu_jobs(jobs: pd.DataFrame, value: str = "val_ppl") -> pd.DataFrame:
    """Return the non-anchor jobs whose `value` is finite (a missing `value` column gives none)."""
    rows = jobs.loc[~jobs["is_anchor"]] if "is_anchor" in jobs else jobs
    if value not in rows:
        return rows.iloc[0:0]
    return rows.loc[np.isfinite(pd.to_numeric(rows[value], errors="coerce").astype("float64"))]


def phase_frame(jobs: pd.DataFrame, phases: tuple[str, ...] = PHASES, metric: str = "val_ppl") -> pd.DataFrame:
    """Reshape per-phase metrics to one row per job and phase.

    Returns the non-anchor jobs' columns plus ``phase`` (one of `phases`) and `metric`,
    which contains that phase's ``<phase>/<metric>``. Phases that a job did not log, or
    logged as NaN, give no row. A phase with no column at all is skipped.
    """
    rows = jobs.loc[~jobs["is_anchor"]] if "is_anchor" in jobs else jobs
    parts = []
    for phase in phases:
        column = f"{phase}/{metric}"
        if column not in rows:
            continue
        part = rows.drop(columns=[metric], errors="ignore").copy()
        part["phase"] = phase
        part[metric] = pd.to_numeric(rows[column], errors="coerce").astype("float64")
        parts.append(part.loc[np.isfinite(part[metric])])
    if not parts:
        return rows.iloc[0:0].assign(phase=pd.Series(dtype=object), **{metric: pd.Series(dtype="float64")})
    return pd.concat(parts, ignore_index=True)


def varied_factors(jobs: pd.DataFrame, factors: dict[str, str] | None = None) -> list[str]:
    """Return the factor names whose column takes at least two distinct values among the SAFFU jobs.

    ``phase`` counts when at least two phases have a logged validation perplexity.
    """
    factors = FACTORS if factors is None else factors
    rows = saffu_jobs(jobs)
    names = []
    for name, column in factors.items():
        if column == "phase":
            levels = phase_frame(jobs)["phase"].nunique()
        elif column in rows:
            levels = rows[column].astype(object).where(rows[column].notna(), None).nunique(dropna=False)
        else:
            levels = 0
        if levels >= 2:
            names.append(name)
    return names


def _frame_for(jobs: pd.DataFrame, columns: list[str], value: str) -> pd.DataFrame:
    if "phase" in columns:
        return phase_frame(jobs, metric=value)
    return saffu_jobs(jobs, value)


def _levels(series: pd.Series) -> pd.Series:
    # A missing level (code_dim None, say) is a level of its own, shown as "None".
    return series.astype(object).where(series.notna(), "None")


def factor_effects(
    jobs: pd.DataFrame, factors: list[str] | None = None, value: str = "val_ppl", factor_columns: dict[str, str] | None = None
) -> pd.DataFrame:
    """Summarize `value` at each level of each factor, pooled over the other factors.

    `factors` defaults to :func:`varied_factors`. Only non-anchor jobs with a finite
    `value` count; for ``phase`` the values are the per-phase metrics of
    :func:`phase_frame`. Returns columns EFFECT_COLUMNS: ``factor`` (name), ``level``
    (the setting, or the string ``None``), ``count``, and the ``median``, ``min``,
    ``max`` and ``mean`` of `value`, ordered by factor and then level.
    """
    factor_columns = FACTORS if factor_columns is None else factor_columns
    factors = varied_factors(jobs, factor_columns) if factors is None else factors
    tables = []
    for name in factors:
        column = factor_columns.get(name, name)
        frame = _frame_for(jobs, [column], value)
        if column not in frame:
            log.warning("factor %r has no column %r in the jobs frame and is skipped", name, column)
            continue
        grouped = frame.groupby(_levels(frame[column]), sort=False)[value]
        table = grouped.agg(["count", "median", "min", "max", "mean"]).reset_index(names="level")
        table.insert(0, "factor", name)
        tables.append(_sort_levels(table))
    if not tables:
        return pd.DataFrame(columns=EFFECT_COLUMNS)
    return pd.concat(tables, ignore_index=True)[EFFECT_COLUMNS]


def _sort_levels(table: pd.DataFrame) -> pd.DataFrame:
    order = order_levels(list(table["level"]))
    return table.set_index(table["level"].map(order.index)).sort_index().reset_index(drop=True)


def order_levels(levels: list[object]) -> list[object]:
    """Return the distinct `levels` in display order.

    Phases come in pipeline order (explicit, finetune, bp_only), numbers in numeric
    order, and text in natural order (``onehot`` before ``bitcode16`` before
    ``bitcode128``), with ``None`` last.
    """
    unique = list(dict.fromkeys(levels))
    if set(map(str, unique)) <= set(PHASES):
        return sorted(unique, key=lambda level: PHASES.index(str(level)))
    return sorted(unique, key=_level_key)


def _level_key(level: object) -> tuple[int, float, str, float]:
    if level is None or str(level) == "None":
        return (3, 0.0, "", 0.0)
    number = pd.to_numeric(pd.Series([level], dtype=object), errors="coerce").iloc[0]
    if not pd.isna(number):
        return (0, float(number), "", 0.0)
    text = str(level)
    if text == "onehot":
        return (1, 0.0, "", 0.0)
    match = re.fullmatch(r"(.*?)(\d+)", text)
    if match:
        return (2, 0.0, match.group(1), float(match.group(2)))
    return (2, 0.0, text, -1.0)


def interaction_table(
    jobs: pd.DataFrame,
    factor_a: str,
    factor_b: str,
    value: str = "val_ppl",
    log_scale: bool = True,
    factor_columns: dict[str, str] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Compute the cell means of two factors and what remains after their main effects.

    Each cell is a pair of levels (a, b). Its mean m_ab is the mean of `value` (of
    log10 `value` with `log_scale`, so that effects are ratios of perplexity) over the
    jobs in the cell. An additive model m_ab ~ mu + alpha_a + beta_b is fitted to the
    observed cells by least squares with equal weight per cell, which handles empty
    cells and unequal cell sizes. The residual m_ab - fit_ab is the interaction: how
    much the effect of factor a depends on the level of factor b.

    Returns (means, residuals): two frames indexed by the levels of `factor_a` with one
    column per level of `factor_b`, NaN where a cell has no job.
    """
    factor_columns = FACTORS if factor_columns is None else factor_columns
    column_a = factor_columns.get(factor_a, factor_a)
    column_b = factor_columns.get(factor_b, factor_b)
    frame = _frame_for(jobs, [column_a, column_b], value)
    values = np.log10(frame[value]) if log_scale else frame[value]
    cells = pd.DataFrame({"a": _levels(frame[column_a]), "b": _levels(frame[column_b]), "value": values})
    means = cells.groupby(["a", "b"], sort=False)["value"].mean()

    levels_a = list(dict.fromkeys(means.index.get_level_values("a")))
    levels_b = list(dict.fromkeys(means.index.get_level_values("b")))
    design = np.zeros((len(means), 1 + len(levels_a) + len(levels_b)))
    design[:, 0] = 1.0
    for row, (a, b) in enumerate(means.index):
        design[row, 1 + levels_a.index(a)] = 1.0
        design[row, 1 + len(levels_a) + levels_b.index(b)] = 1.0
    # lstsq returns the minimum-norm solution of this rank-deficient design; the fitted
    # values, and so the residuals, are the same for every least-squares solution.
    coefficients, *_ = np.linalg.lstsq(design, means.to_numpy(), rcond=None)
    residuals = pd.Series(means.to_numpy() - design @ coefficients, index=means.index)

    def to_grid(series: pd.Series) -> pd.DataFrame:
        grid = series.unstack("b")
        grid = grid.loc[_sort_index(grid.index), _sort_index(grid.columns)]
        grid.index.name = factor_a
        grid.columns.name = factor_b
        return grid

    return to_grid(means), to_grid(residuals)


def _sort_index(index: pd.Index) -> list[object]:
    return order_levels(list(index))


def interaction_effects(
    jobs: pd.DataFrame,
    factors: list[str] | None = None,
    value: str = "val_ppl",
    log_scale: bool = True,
    factor_columns: dict[str, str] | None = None,
) -> pd.DataFrame:
    """Rank the two-factor interactions by the spread of their residual cell means.

    For each pair of `factors` (default: :func:`varied_factors`) the residuals of
    :func:`interaction_table` are computed. ``spread`` is their max minus their min:
    the largest difference in `value` (in log10 units with `log_scale`, so 0.1 is a
    factor of 1.26 in perplexity) that the two factors cause together beyond their main
    effects. ``max_abs_residual`` is the largest single departure. A pair needs at
    least two levels of each factor and more observed cells than the additive model has
    free parameters (levels_a + levels_b - 1). Other pairs have zero residuals by
    construction, so they are skipped and logged.

    Returns columns INTERACTION_COLUMNS, the largest spread first; ``scale`` is
    ``log10`` or ``linear``.
    """
    factor_columns = FACTORS if factor_columns is None else factor_columns
    factors = varied_factors(jobs, factor_columns) if factors is None else factors
    rows = []
    for factor_a, factor_b in itertools.combinations(factors, 2):
        means, residuals = interaction_table(jobs, factor_a, factor_b, value, log_scale, factor_columns)
        n_cells = int(means.notna().to_numpy().sum())
        free = means.shape[0] + means.shape[1] - 1
        if means.shape[0] < 2 or means.shape[1] < 2 or n_cells <= free:
            log.info(
                "interaction %s x %s skipped: %d observed cells of %d x %d levels cannot show an interaction",
                factor_a,
                factor_b,
                n_cells,
                means.shape[0],
                means.shape[1],
            )
            continue
        observed = residuals.to_numpy()[means.notna().to_numpy()]
        # An exactly additive pair leaves residuals of about 1e-16 from the fit's rounding.
        observed = np.where(np.abs(observed) < 1e-12, 0.0, observed)
        rows.append(
            {
                "factor_a": factor_a,
                "factor_b": factor_b,
                "n_cells": n_cells,
                "spread": float(observed.max() - observed.min()),
                "max_abs_residual": float(np.abs(observed).max()),
                "scale": "log10" if log_scale else "linear",
            }
        )
    table = pd.DataFrame(rows, columns=INTERACTION_COLUMNS)
    return table.sort_values("spread", ascending=False, kind="stable").reset_index(drop=True)
