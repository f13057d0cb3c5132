"""Pareto-efficient variants: lower validation perplexity at a lower cost.

The cost is the parameter count (``n_params``) or the wall-clock time (``wall_seconds``).
Variant A dominates variant B when A's cost and objective are both no larger than B's
and at least one of them is smaller. Variants with equal cost and objective do not
dominate each other, so ties are all on the front.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)


@dataclass
class ParetoResult:
    """The result of :func:`pareto_front`.

    Attributes:
        ranked: the rows with finite, non-negative cost and finite objective, ordered by
            ``pareto_layer``, then objective, then cost. Added columns: ``pareto_layer``
            (1 for the front, 2 for the front of what remains, ...), ``on_front`` (bool),
            ``tied`` (bool, another front row has the same cost and objective) and
            ``rank`` (1-based position in this order).
        front: the rows of ``ranked`` with ``on_front``, ordered by increasing cost.
        excluded: the input rows whose cost or objective is NaN, infinite or missing,
            or whose cost is negative, with a ``reason`` column.
        objective, cost: the column names used.
    """

    ranked: pd.DataFrame
    front: pd.DataFrame
    excluded: pd.DataFrame
    objective: str
    cost: str


def pareto_mask(costs: np.ndarray, objectives: np.ndarray) -> np.ndarray:
    """Return a boolean mask of the non-dominated points, for finite inputs (lower is better).

    Runs in O(n log n): after sorting by cost, a point is on the front when its objective
    is the lowest among points of its cost and lower than the best objective at any
    smaller cost.
    """
    costs = np.asarray(costs, dtype=float)
    objectives = np.asarray(objectives, dtype=float)
    if costs.shape != objectives.shape or costs.ndim != 1:
        raise ValueError(f"costs and objectives must be 1-D of one length, got {costs.shape} and {objectives.shape}")
    mask = np.zeros(len(costs), dtype=bool)
    order = np.lexsort((objectives, costs))
    best_below = math.inf
    start = 0
    while start < len(order):
        stop = start
        while stop < len(order) and costs[order[stop]] == costs[order[start]]:
            stop += 1
        group = order[start:stop]
        group_best = objectives[group].min()
        if group_best < best_below:
            mask[group[objectives[group] == group_best]] = True
            best_below = group_best
        start = stop
    return mask


def pareto_front(frame: pd.DataFrame, objective: str = "val_ppl", cost: str = "n_params") -> ParetoResult:
    """Find the non-dominated rows of `frame` and rank all of its usable rows.

    Rows whose cost or objective is missing, NaN or infinite, and rows with a negative
    cost, go to ``excluded`` with a reason and are logged. An empty frame, or one with no
    usable row, gives empty ``ranked`` and ``front``. Raises KeyError naming a missing
    column.
    """
    for column in (objective, cost):
        if column not in frame.columns:
            raise KeyError(f"column {column!r} not in the frame; columns: {', '.join(map(str, frame.columns))}")

    cost_values = pd.to_numeric(frame[cost], errors="coerce").astype("float64")
    objective_values = pd.to_numeric(frame[objective], errors="coerce").astype("float64")
    reasons = pd.Series("", index=frame.index, dtype=object)
    reasons[~np.isfinite(objective_values)] = f"{objective} is missing or not finite"
    bad_cost = ~np.isfinite(cost_values) | (cost_values < 0)
    reasons[bad_cost & (reasons == "")] = f"{cost} is missing, negative or not finite"
    usable = reasons == ""

    excluded = frame.loc[~usable].copy()
    excluded["reason"] = reasons[~usable]
    excluded = excluded.reset_index(drop=True)
    if len(excluded):
        log.warning(
            "%d of %d rows left out of the %s-vs-%s front: %s",
            len(excluded),
            len(frame),
            objective,
            cost,
            "; ".join(f"{_row_label(row)}: {row['reason']}" for _, row in excluded.iterrows()),
        )

    ranked = frame.loc[usable].copy()
    layers = pareto_layers(cost_values[usable].to_numpy(), objective_values[usable].to_numpy())
    ranked["pareto_layer"] = pd.Series(layers, index=ranked.index, dtype="int64")
    ranked["on_front"] = ranked["pareto_layer"] == 1
    key = list(zip(cost_values[usable], objective_values[usable]))
    front_keys = pd.Series(key, index=ranked.index)[ranked["on_front"]]
    ranked["tied"] = ranked["on_front"] & pd.Series(key, index=ranked.index).map(front_keys.value_counts()).gt(1)
    ranked = ranked.assign(_objective=objective_values[usable], _cost=cost_values[usable])
    ranked = ranked.sort_values(["pareto_layer", "_objective", "_cost"], kind="stable")
    ranked = ranked.drop(columns=["_objective", "_cost"]).reset_index(drop=True)
    ranked["rank"] = np.arange(1, len(ranked) + 1, dtype="int64")

    front = ranked.loc[ranked["on_front"]].copy()
    front = front.assign(_cost=pd.to_numeric(front[cost], errors="coerce"))
    front = front.sort_values(["_cost", objective], kind="stable").drop(columns="_cost").reset_index(drop=True)
    return ParetoResult(ranked=ranked, front=front, excluded=excluded, objective=objective, cost=cost)


def pareto_layers(costs: np.ndarray, objectives: np.ndarray) -> np.ndarray:
    """Return each point's non-dominated sorting layer (1 = front), by peeling fronts."""
    layers = np.zeros(len(costs), dtype=np.int64)
    remaining = np.arange(len(costs))
    layer = 1
    while len(remaining):
        mask = pareto_mask(costs[remaining], objectives[remaining])
        layers[remaining[mask]] = layer
        remaining = remaining[~mask]
        layer += 1
    return layers


def _row_label(row: pd.Series) -> str:
    for column in ("run_name", "run_id"):
        if column in row.index and isinstance(row[column], str):
            return row[column]
    return f"row {row.name}"


def power_of_ten_budgets(costs: pd.Series) -> list[float]:
    """Return the powers of ten from the first at or above the smallest cost up to the
    first at or above the largest. The list is empty when no cost is positive and finite."""
    values = pd.to_numeric(costs, errors="coerce")
    values = values[np.isfinite(values) & (values > 0)]
    if values.empty:
        return []
    low = math.ceil(math.log10(values.min()))
    high = math.ceil(math.log10(values.max()))
    return [float(10**exponent) for exponent in range(low, high + 1)]


def quantile_budgets(costs: pd.Series, quantiles: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)) -> list[float]:
    """Return the distinct cost quantiles, ascending (an empty list for no finite cost)."""
    values = pd.to_numeric(costs, errors="coerce")
    values = values[np.isfinite(values)]
    if values.empty:
        return []
    return sorted({float(q) for q in values.quantile(list(quantiles))})


def best_per_budget(result: ParetoResult, budgets: list[float] | None = None) -> pd.DataFrame:
    """Return the best variant at or under each cost budget.

    `budgets` defaults to :func:`power_of_ten_budgets` of the ranked rows' costs. The
    result has one row per budget with columns ``budget``, ``n_eligible`` (rows whose
    cost is at or under the budget) and, when any row is eligible, that budget's best
    row (lowest objective, then lowest cost, then first in rank). The best row under
    any budget is on the front. A budget that nothing fits keeps NaN in the row's
    columns.
    """
    ranked = result.ranked
    if budgets is None:
        budgets = power_of_ten_budgets(ranked[result.cost]) if len(ranked) else []
    rows = []
    cost_values = pd.to_numeric(ranked[result.cost], errors="coerce") if len(ranked) else pd.Series(dtype=float)
    objective_values = pd.to_numeric(ranked[result.objective], errors="coerce") if len(ranked) else None
    for budget in sorted(budgets):
        eligible = ranked.loc[cost_values <= budget]
        row: dict[str, object] = {"budget": float(budget), "n_eligible": len(eligible)}
        if len(eligible):
            order = np.lexsort((cost_values[eligible.index], objective_values[eligible.index]))
            row.update(eligible.iloc[order[0]].to_dict())
        rows.append(row)
    columns = ["budget", "n_eligible", *[c for c in ranked.columns if c not in ("budget", "n_eligible")]]
    return pd.DataFrame(rows, columns=columns)


def knee_point(result: ParetoResult, log_cost: bool = True, log_objective: bool = True) -> pd.Series | None:
    """Return the front row at the knee, or None when the front has fewer than 3 distinct points.

    The front's costs and objectives (log10 of each by default, since parameter counts
    span orders of magnitude and log perplexity is the cross-entropy) are scaled to
    [0, 1]. The knee is the point farthest from the straight line between the cheapest
    and the best front points: the point where more cost stops buying as much. Among
    tied points the first in front order is returned.
    """
    front = result.front
    cost = pd.to_numeric(front[result.cost], errors="coerce").to_numpy(dtype=float)
    objective = pd.to_numeric(front[result.objective], errors="coerce").to_numpy(dtype=float)
    if len(set(zip(cost, objective))) < 3:
        return None
    if log_cost:
        if (cost <= 0).any():
            raise ValueError(f"log_cost needs positive {result.cost}; pass log_cost=False")
        cost = np.log10(cost)
    if log_objective:
        if (objective <= 0).any():
            raise ValueError(f"log_objective needs positive {result.objective}; pass log_objective=False")
        objective = np.log10(objective)
    x = (cost - cost.min()) / (np.ptp(cost) or 1.0)
    y = (objective - objective.min()) / (np.ptp(objective) or 1.0)
    # The front runs from (0, 1) at the cheapest point to (1, 0) at the best one, so the
    # chord is x + y = 1 and a point's distance below it is proportional to 1 - x - y.
    distance = 1.0 - x - y
    return front.iloc[int(np.argmax(distance))]
