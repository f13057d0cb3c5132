"""Factor effects and interactions on hand-made job tables with known results."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest

from analysis.effects import factor_effects, interaction_effects, interaction_table, order_levels, phase_frame, varied_factors


def grid_jobs(interaction: float = 0.0) -> pd.DataFrame:
    """A 3 x 2 x 2 grid whose log10 val_ppl is additive plus `interaction` in one cell of block_size x radius."""
    rows = []
    block_effect = {1: 0.3, 4: 0.1, 16: 0.0}
    radius_effect = {0: 0.2, 16: 0.0}
    experts_effect = {"onehot": 0.0, "bitcode32": 0.05}
    for block_size, radius, experts in itertools.product(block_effect, radius_effect, experts_effect):
        log_ppl = 2.0 + block_effect[block_size] + radius_effect[radius] + experts_effect[experts]
        if block_size == 16 and radius == 16:
            log_ppl += interaction
        ppl = 10**log_ppl
        rows.append({
            "run_name": f"b{block_size}-r{radius}-{experts}",
            "model.block_size": block_size,
            "model.radius": radius,
            "experts": experts,
            "model.layers": 1,
            "is_anchor": False,
            "val_ppl": ppl,
            "explicit/val_ppl": ppl * 1.2,
            "finetune/val_ppl": ppl,
            "bp_only/val_ppl": ppl * 1.5,
        })
    rows.append({"run_name": "gpt2", "is_anchor": True, "val_ppl": 60.0, "model.layers": 12})
    frame = pd.DataFrame(rows)
    return frame.astype({"model.block_size": "Int64", "model.radius": "Int64", "model.layers": "Int64"})


def test_varied_factors_skip_constant_and_anchor() -> None:
    # layers is 1 for every SAFFU job; the anchor's 12 layers must not count.
    assert varied_factors(grid_jobs()) == ["block_size", "radius", "experts", "phase"]


def test_effects_known_summary() -> None:
    jobs = pd.DataFrame({
        "model.block_size": pd.array([1, 1, 1, 4, 4], dtype="Int64"),
        "is_anchor": [False] * 5,
        "val_ppl": [300.0, 100.0, 200.0, 50.0, math.nan],
    })
    effects = factor_effects(jobs, ["block_size"]).set_index("level")
    assert effects.loc[1, "count"] == 3
    assert effects.loc[1, "median"] == 200.0
    assert effects.loc[1, "min"] == 100.0
    assert effects.loc[1, "max"] == 300.0
    assert effects.loc[4, "count"] == 1  # the NaN job is left out
    assert list(effects.index) == [1, 4]


def test_effects_phase_uses_phase_metrics() -> None:
    jobs = grid_jobs()
    effects = factor_effects(jobs, ["phase"]).set_index("level")
    assert list(effects.index) == ["explicit", "finetune", "bp_only"]
    finetune_median = effects.loc["finetune", "median"]
    assert effects.loc["explicit", "median"] == pytest.approx(finetune_median * 1.2)
    assert effects.loc["bp_only", "median"] == pytest.approx(finetune_median * 1.5)
    assert (effects["count"] == 12).all()


def test_phase_frame_skips_missing_phase() -> None:
    jobs = grid_jobs().drop(columns=["bp_only/val_ppl"])
    jobs.loc[0, "explicit/val_ppl"] = math.nan
    frame = phase_frame(jobs)
    assert set(frame["phase"]) == {"explicit", "finetune"}
    assert len(frame) == 12 + 11


def test_interaction_zero_when_additive() -> None:
    table = interaction_effects(grid_jobs(), ["block_size", "radius", "experts"])
    assert len(table) == 3
    assert np.allclose(table["spread"], 0.0, atol=1e-12)


def test_interaction_finds_planted_pair() -> None:
    table = interaction_effects(grid_jobs(interaction=0.3), ["block_size", "radius", "experts"])
    top = table.iloc[0]
    assert (top["factor_a"], top["factor_b"]) == ("block_size", "radius")
    assert top["spread"] > 0.1
    others = table.iloc[1:]
    assert np.allclose(others["spread"], 0.0, atol=1e-12)


def test_interaction_residuals_double_center() -> None:
    # One planted cell in a complete 3 x 2 grid: residuals of a balanced table are
    # cell - row mean - column mean + grand mean, which sum to zero along rows and columns.
    means, residuals = interaction_table(grid_jobs(interaction=0.3), "block_size", "radius")
    assert list(means.index) == [1, 4, 16]
    assert list(means.columns) == [0, 16]
    assert np.allclose(residuals.sum(axis=0), 0.0)
    assert np.allclose(residuals.sum(axis=1), 0.0)
    assert residuals.loc[16, 16] == pytest.approx(0.3 * (1 - 1 / 3) * (1 - 1 / 2))


def test_interaction_skips_pair_without_enough_cells() -> None:
    jobs = grid_jobs()
    # Keep one experts level per block size: 3 cells cannot show an interaction of 3 x 2 levels.
    keep = (jobs["model.block_size"] == 1) & (jobs["experts"] == "onehot") | (jobs["model.block_size"] != 1) & (jobs["experts"] == "bitcode32")
    table = interaction_effects(jobs.loc[keep | jobs["is_anchor"]], ["block_size", "experts"])
    assert table.empty


def test_order_levels_natural() -> None:
    assert order_levels(["bitcode128", "onehot", "bitcode16", "bitcode32"]) == ["onehot", "bitcode16", "bitcode32", "bitcode128"]
    assert order_levels([16, 4, 256, 0]) == [0, 4, 16, 256]
    assert order_levels(["bp_only", "explicit", "finetune"]) == ["explicit", "finetune", "bp_only"]
