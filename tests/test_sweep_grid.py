"""Expansion of sweep definitions into per-job overrides."""

import pytest
from hydra.errors import HydraException

from hydra_plugins.saffu_sweep.saffu_sweeper import (
    SweepDefinitionError,
    SweepSettings,
    expand_overrides,
    format_override_value,
    read_sweep_settings,
)


def settings(**grid) -> SweepSettings:
    return SweepSettings(name="test", grid=grid, fixed=["train.epochs=1"])


def test_grid_is_cartesian_product():
    jobs, leading = expand_overrides(settings(**{"model.block_size": [1, 2], "model/experts": ["onehot", "bitcode32"]}), [])
    assert leading == [2, 2, 2, 2]
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
    jobs, leading = expand_overrides(settings(**{"model.block_size": [1]}), ["train.lr=0.001,0.01", "+sweep=smoke"])
    assert leading == [2, 2]
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


def test_variants_are_one_job_each():
    variants = SweepSettings(
        name="frontier", grid={}, fixed=["train.epochs=1"],
        variants=[["model.block_size=1", "model.radius=0"], ["model.block_size=4"]],
    )
    jobs, leading = expand_overrides(variants, ["model.layers=1,2", "train.lr=0.1"])
    assert jobs == [
        ["model.block_size=1", "model.radius=0", "model.layers=1", "train.epochs=1", "train.lr=0.1"],
        ["model.block_size=1", "model.radius=0", "model.layers=2", "train.epochs=1", "train.lr=0.1"],
        ["model.block_size=4", "model.layers=1", "train.epochs=1", "train.lr=0.1"],
        ["model.block_size=4", "model.layers=2", "train.epochs=1", "train.lr=0.1"],
    ]
    assert leading == [3, 3, 2, 2]


def sweep_config(sweep: dict):
    from omegaconf import OmegaConf

    return OmegaConf.create({
        "sweep_default": {"grid": {"model.block_size": [1, 2]}, "fixed": [], "max_retries": 1},
        "sweep": sweep,
        "hydra": {"runtime": {"choices": {"sweep": "frontier"}}},
    })


def test_variants_replace_default_grid():
    settings = read_sweep_settings(sweep_config({"variants": [["model.block_size=8"]]}))
    assert settings.variants == [["model.block_size=8"]]
    assert settings.grid == {}
    assert expand_overrides(settings, [])[0] == [["model.block_size=8"]]


@pytest.mark.parametrize(
    ("sweep", "expected"),
    [
        ({"variants": []}, "expected a non-empty list of override lists"),
        ({"variants": [["model.block_size"]]}, "sweep.variants[0]"),
        ({"variants": [[]]}, "sweep.variants[0]"),
        ({"variants": [["model.block_size=1"]], "grid": {"model.radius": [0]}}, "both grid and variants"),
        ({"variants": [["model.block_size=1"]], "optuna": {"n_trials": 5}}, "sweep.optuna searches a grid"),
    ],
    ids=["empty", "no equals sign", "empty variant", "with grid", "with optuna"],
)
def test_bad_variants_rejected(sweep, expected):
    # Hydra's plugin discovery may reload the sweeper module, which replaces the class that
    # this file imported, so the check is by name.
    with pytest.raises(ValueError) as error:
        read_sweep_settings(sweep_config(sweep))
    assert type(error.value).__name__ == SweepDefinitionError.__name__
    assert expected in str(error.value)
