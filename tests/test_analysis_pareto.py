"""Pareto fronts, ranks, budgets and knees on hand-made tables with known results."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest

from analysis.pareto import (
    best_per_budget,
    knee_point,
    pareto_front,
    pareto_layers,
    pareto_mask,
    power_of_ten_budgets,
    quantile_budgets,
)


def table(rows: list[tuple[str, float, float]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["run_name", "n_params", "val_ppl"])


def front_names(frame: pd.DataFrame) -> list[str]:
    return list(pareto_front(frame).front["run_name"])


def test_front_drops_dominated_rows() -> None:
    frame = table([("a", 100, 400), ("b", 200, 350), ("c", 300, 360), ("d", 400, 300), ("e", 500, 300)])
    assert front_names(frame) == ["a", "b", "d"]


def test_front_keeps_exact_ties() -> None:
    frame = table([("a", 100, 400), ("b", 200, 300), ("c", 200, 300), ("d", 300, 350)])
    result = pareto_front(frame)
    assert sorted(result.front["run_name"]) == ["a", "b", "c"]
    assert set(result.front.loc[result.front["tied"], "run_name"]) == {"b", "c"}
    assert not result.front.loc[result.front["run_name"] == "a", "tied"].item()


def test_front_drops_dominated_duplicate() -> None:
    # Same parameter count, worse perplexity: dominated, not tied.
    frame = table([("a", 200, 300), ("a-again", 200, 310)])
    result = pareto_front(frame)
    assert list(result.front["run_name"]) == ["a"]
    assert result.ranked.set_index("run_name").loc["a-again", "pareto_layer"] == 2


def test_front_same_ppl_more_params_dominated() -> None:
    frame = table([("small", 100, 300), ("large", 900, 300)])
    assert front_names(frame) == ["small"]


def test_front_single_run() -> None:
    result = pareto_front(table([("only", 100, 300)]))
    assert list(result.front["run_name"]) == ["only"]
    assert list(result.ranked["rank"]) == [1]
    assert knee_point(result) is None


def test_front_empty_table() -> None:
    result = pareto_front(table([]))
    assert result.front.empty
    assert result.ranked.empty
    assert result.excluded.empty
    assert knee_point(result) is None
    assert best_per_budget(result).empty


def test_front_excludes_nan_and_reports() -> None:
    frame = table([("a", 100, 400), ("nan-ppl", 50, math.nan), ("nan-params", math.nan, 100), ("inf", 10, math.inf)])
    result = pareto_front(frame)
    assert front_names(frame) == ["a"]
    assert set(result.excluded["run_name"]) == {"nan-ppl", "nan-params", "inf"}
    reasons = result.excluded.set_index("run_name")["reason"]
    assert "val_ppl" in reasons["nan-ppl"]
    assert "n_params" in reasons["nan-params"]


def test_front_all_nan() -> None:
    result = pareto_front(table([("a", 100, math.nan), ("b", math.nan, 300)]))
    assert result.front.empty
    assert len(result.excluded) == 2


def test_front_missing_column() -> None:
    with pytest.raises(KeyError, match="wall_seconds"):
        pareto_front(table([("a", 1, 1)]), cost="wall_seconds")


def test_ranked_order_and_layers() -> None:
    frame = table([("a", 100, 400), ("b", 200, 300), ("c", 300, 350), ("d", 400, 380), ("e", 150, 500)])
    result = pareto_front(frame)
    ranked = result.ranked.set_index("run_name")
    assert ranked.loc[["a", "b"], "pareto_layer"].tolist() == [1, 1]
    assert ranked.loc["c", "pareto_layer"] == 2
    assert ranked.loc["e", "pareto_layer"] == 2
    assert ranked.loc["d", "pareto_layer"] == 3
    assert list(result.ranked["run_name"]) == ["b", "a", "c", "e", "d"]
    assert list(result.ranked["rank"]) == [1, 2, 3, 4, 5]


def test_mask_matches_brute_force() -> None:
    generator = np.random.default_rng(1)
    costs = generator.integers(1, 8, size=60).astype(float)
    objectives = generator.integers(1, 8, size=60).astype(float)
    mask = pareto_mask(costs, objectives)
    for i in range(len(costs)):
        dominated = any(
            costs[j] <= costs[i] and objectives[j] <= objectives[i] and (costs[j] < costs[i] or objectives[j] < objectives[i])
            for j in range(len(costs))
        )
        assert mask[i] == (not dominated), i


def test_layers_partition_points() -> None:
    costs = np.array([1.0, 2.0, 3.0, 1.0, 2.0])
    objectives = np.array([3.0, 2.0, 1.0, 4.0, 3.0])
    layers = pareto_layers(costs, objectives)
    assert list(layers) == [1, 1, 1, 2, 2]
    for i, j in itertools.combinations(range(len(costs)), 2):
        if layers[i] == layers[j]:
            assert not (costs[i] <= costs[j] and objectives[i] < objectives[j])


def test_budget_picks_best_under_each() -> None:
    frame = table([("a", 50, 500), ("b", 90, 400), ("c", 900, 300), ("d", 5000, 200), ("e", 800, 350)])
    result = pareto_front(frame)
    budgets = best_per_budget(result)
    assert list(budgets["budget"]) == [100.0, 1000.0, 10000.0]
    assert list(budgets["run_name"]) == ["b", "c", "d"]
    assert list(budgets["n_eligible"]) == [2, 4, 5]


def test_budget_with_nothing_eligible() -> None:
    result = pareto_front(table([("a", 500, 300)]))
    budgets = best_per_budget(result, [10, 1000])
    assert budgets["n_eligible"].tolist() == [0, 1]
    assert pd.isna(budgets["run_name"].iloc[0])
    assert budgets["run_name"].iloc[1] == "a"


def test_budget_helpers() -> None:
    costs = pd.Series([50, 100, 2000, math.nan])
    assert power_of_ten_budgets(costs) == [100.0, 1000.0, 10000.0]
    assert power_of_ten_budgets(pd.Series([math.nan])) == []
    assert quantile_budgets(pd.Series([1, 2, 3, 4, 5]), (0.5, 1.0)) == [3.0, 5.0]


def test_knee_is_the_bend() -> None:
    # log10 cost 2, 3, 4, 5, 6; perplexity drops fast to the 10^3 point and then slowly.
    frame = table([("a", 1e2, 1000), ("b", 1e3, 120), ("c", 1e4, 110), ("d", 1e5, 105), ("e", 1e6, 100)])
    knee = knee_point(pareto_front(frame))
    assert knee is not None
    assert knee["run_name"] == "b"


def test_knee_needs_three_points() -> None:
    assert knee_point(pareto_front(table([("a", 1, 2), ("b", 2, 1)]))) is None
    # Two tied points count once.
    assert knee_point(pareto_front(table([("a", 1, 3), ("b", 2, 2), ("c", 2, 2)]))) is None
