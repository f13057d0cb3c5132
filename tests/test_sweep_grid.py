"""Expansion of sweep definitions into per-job overrides."""

import pytest
from hydra.errors import HydraException

from hydra_plugins.saffu_sweep.saffu_sweeper import SweepSettings, expand_overrides, format_override_value


def settings(**grid) -> SweepSettings:
    return SweepSettings(name="test", grid=grid, fixed=["train.epochs=1"])


def test_grid_is_cartesian_product():
    jobs, n_factors = expand_overrides(settings(**{"model.block_size": [1, 2], "model/experts": ["onehot", "bitcode32"]}), [])
    assert n_factors == 2
    assert jobs == [
        ["model.block_size=1", "model/experts=onehot", "train.epochs=1"],
        ["model.block_size=1", "model/experts=bitcode32", "train.epochs=1"],
        ["model.block_size=2", "model/experts=onehot", "train.epochs=1"],
        ["model.block_size=2", "model/experts=bitcode32", "train.epochs=1"],
    ]


def test_command_line_sweep_replaces_factor():
    jobs, _ = expand_overrides(settings(**{"model.block_size": [1, 2, 4], "model.radius": [0]}), ["model.block_size=8,16"])
    assert [job[0] for job in jobs] == ["model.block_size=8", "model.block_size=16"]


def test_single_value_replaces_factor():
    jobs, _ = expand_overrides(
        settings(**{"model.block_size": [1, 2], "model/experts": ["onehot", "bitcode16"]}),
        ["model/experts=bitcode64", "train.epochs=3", "data=folder"],
    )
    assert jobs == [
        ["model.block_size=1", "model/experts=bitcode64", "train.epochs=1", "train.epochs=3", "data=folder"],
        ["model.block_size=2", "model/experts=bitcode64", "train.epochs=1", "train.epochs=3", "data=folder"],
    ]


def test_command_line_sweep_adds_factor():
    jobs, n_factors = expand_overrides(settings(**{"model.block_size": [1]}), ["train.lr=0.001,0.01", "+sweep=smoke"])
    assert n_factors == 2
    assert jobs == [
        ["model.block_size=1", "train.lr=0.001", "train.epochs=1", "+sweep=smoke"],
        ["model.block_size=1", "train.lr=0.01", "train.epochs=1", "+sweep=smoke"],
    ]


def test_interval_sweep_rejected():
    with pytest.raises(HydraException, match="lists and ranges only"):
        expand_overrides(settings(**{"model.block_size": [1]}), ["train.lr=interval(0.001,0.01)"])


@pytest.mark.parametrize(
    ("value", "expected"),
    [(True, "true"), (None, "null"), (4, "4"), (0.5, "0.5"), ("onehot", "onehot"), ([0.25, 32.0], "[0.25,32.0]"), ("a b", "'a b'")],
)
def test_format_override_value(value, expected):
    assert format_override_value(value) == expected


def test_roadmap_has_250_jobs():
    import yaml

    from sweep_helpers import REPO

    roadmap = yaml.safe_load((REPO / "sweeps" / "roadmap.yaml").read_text())
    jobs, _ = expand_overrides(SweepSettings("roadmap", roadmap["grid"], roadmap["fixed"]), [])
    assert len(jobs) == 250
