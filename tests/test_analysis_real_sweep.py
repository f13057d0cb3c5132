"""The analysis on a store filled by a real sweep (`real_sweep_store` in conftest.py): four
jobs of `python sweep.py -m` on real text, one of which raised."""

from __future__ import annotations

import math
import os
import stat
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from analysis.load import load_curves, load_runs
from analysis.pareto import pareto_front
from analysis.report import main as report_main
from saffu.model import count_parameters

pytestmark = [pytest.mark.corpus, pytest.mark.slow]

CONF = Path(__file__).resolve().parent.parent / "conf"
FINISHED_CONFIGS = {(1, 0), (1, 4), (2, 0)}
FAILED_CONFIG = (2, 4)


def expected_params(block_size: int, radius: int, vocab_size: int) -> int:
    model = OmegaConf.load(CONF / "model" / "saffu.yaml")
    model.block_size, model.radius = block_size, radius
    model.experts = OmegaConf.load(CONF / "model" / "experts" / "onehot.yaml")
    return count_parameters(model, vocab_size)["total"]


@pytest.fixture(scope="module")
def runs(real_sweep_store):
    return load_runs(real_sweep_store.tracking_uri, real_sweep_store.experiment, real_sweep_store.sweep_id)


def test_real_sweep_rows_per_finished_job(runs) -> None:
    jobs = runs.jobs
    assert len(runs.sweeps) == 1
    assert set(zip(jobs["model.block_size"], jobs["model.radius"])) == FINISHED_CONFIGS
    assert len(jobs) == 3
    assert pd.api.types.is_integer_dtype(jobs["model.block_size"])
    assert jobs["val_ppl"].dtype == "float64"
    assert jobs["val_ppl"].map(math.isfinite).all()
    # The loaded parameter counts are the formula's, for the vocabulary the sweep used.
    for _, row in jobs.iterrows():
        assert row["n_params"] == expected_params(row["model.block_size"], row["model.radius"], row["tokenizer.vocab_size"])
    # Explicit+bp keeps the explicit model when fine-tuning does not help, so it is never worse on validation.
    assert (jobs["finetune/val_ppl"] <= jobs["explicit/val_ppl"] * (1 + 1e-6)).all()
    # One epoch on a slice of the corpus ends long before the default 600-second cap.
    assert (jobs["finetune/stopped_by_time"] == 0.0).all()
    assert (jobs["bp_only/stopped_by_time"] == 0.0).all()
    assert not jobs["finetune/capped"].any()


def test_real_sweep_failed_run(runs) -> None:
    assert len(runs.failed) == 1
    failed = runs.failed.iloc[0]
    assert (failed["model.block_size"], failed["model.radius"]) == FAILED_CONFIG
    assert failed["status"] == "FAILED"
    assert not failed["retried_ok"]
    assert len(runs.unfinished) == 0
    assert runs.summary()["failed"] == 1


def test_real_sweep_front_and_report(runs, real_sweep_store, tmp_path) -> None:
    result = pareto_front(runs.jobs)
    assert len(result.ranked) == 3
    # Every ranked job off the front is dominated by a front member: no more parameters, no higher perplexity.
    for _, row in result.ranked.loc[~result.ranked["on_front"]].iterrows():
        assert ((result.front["n_params"] <= row["n_params"]) & (result.front["val_ppl"] <= row["val_ppl"])).any()
    curves = load_curves(real_sweep_store.tracking_uri, list(runs.jobs["run_id"]))
    assert set(curves["metric"]) >= {"finetune/epoch_val_ppl", "bp_only/epoch_val_ppl"}

    code = report_main(["--tracking-uri", real_sweep_store.tracking_uri, "--experiment", real_sweep_store.experiment,
                        "--sweep-id", real_sweep_store.sweep_id, "--out", str(tmp_path)])
    assert code == 0
    report = (tmp_path / "report.md").read_text()
    failed_name = runs.failed.iloc[0]["run_name"]
    assert "Failed or killed runs" in report
    assert failed_name in report
    ranked = pd.read_csv(tmp_path / "ranked.csv")
    assert set(ranked["run_id"]) == set(runs.jobs["run_id"])


def test_export_one_row_per_config(real_sweep_store, tmp_path) -> None:
    from analysis.export import main as export_main

    out = tmp_path / "results" / "sweep.csv"
    args = ["--tracking-uri", real_sweep_store.tracking_uri, "--experiment", real_sweep_store.experiment, "--out", str(out)]
    assert export_main(args) == 0
    table = pd.read_csv(out)
    assert list(table["status"]) == ["FINISHED", "FINISHED", "FINISHED", "FAILED"]
    configs = list(zip(table["model.block_size"], table["model.radius"]))
    assert configs == [(1, 0), (1, 4), (2, 0), FAILED_CONFIG]
    assert list(table.columns[:3]) == ["status", "model", "model.block_size"]
    finished = table.loc[table["status"] == "FINISHED"]
    assert finished["val_ppl"].map(math.isfinite).all()
    assert math.isnan(table.loc[3, "val_ppl"])
    assert table["config_hash"].is_unique
    vocab_size = int(finished["tokenizer.vocab_size"].iloc[0])
    for _, row in finished.iterrows():
        assert row["n_params"] == expected_params(int(row["model.block_size"]), int(row["model.radius"]), vocab_size)

    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask

    first = out.read_bytes()
    assert export_main(args) == 0
    assert out.read_bytes() == first
    assert [path.name for path in out.parent.iterdir()] == ["sweep.csv"]


def test_export_rejects_missing_experiment(real_sweep_store, tmp_path, capsys) -> None:
    from analysis.export import main as export_main

    out = tmp_path / "sweep.csv"
    code = export_main(["--tracking-uri", real_sweep_store.tracking_uri, "--experiment", "nope", "--out", str(out)])
    assert code == 1
    assert "nope" in capsys.readouterr().err
    assert not out.exists()


def test_export_reports_unwritable_out(real_sweep_store, tmp_path, capsys) -> None:
    from analysis.export import main as export_main

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    out = blocker / "sweep.csv"
    code = export_main(["--tracking-uri", real_sweep_store.tracking_uri, "--experiment", real_sweep_store.experiment,
                        "--out", str(out)])
    assert code == 1
    assert f"error: failed to write {out}" in capsys.readouterr().err
    assert [path.name for path in tmp_path.iterdir()] == ["a-file"]


def test_export_rejects_non_database_file(tmp_path, capsys) -> None:
    from analysis.export import main as export_main

    text = tmp_path / "notes.db"
    text.write_text("plain text, not an SQLite database\n" * 20)
    code = export_main(["--tracking-uri", f"sqlite:///{text}", "--out", str(tmp_path / "out.csv")])
    assert code == 1
    assert "file is not a database" in capsys.readouterr().err
    assert not (tmp_path / "out.csv").exists()


def test_frontier_file_runs_as_sweep(real_sweep_store, runs, tmp_path) -> None:
    import subprocess
    import sys

    import yaml
    from sweep_helpers import sweep_command

    from saffu.launch import describe_overrides

    out = tmp_path / "conf" / "sweep" / "frontier.yaml"
    written = subprocess.run(
        [sys.executable, "-m", "analysis.frontier", "--tracking-uri", real_sweep_store.tracking_uri,
         "--experiment", real_sweep_store.experiment, "--fixed", "train.epochs=2", "--out", str(out)],
        cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=300,
    )
    assert written.returncode == 0, written.stderr
    sweep = yaml.safe_load(out.read_text())
    front = pareto_front(runs.jobs).front
    expected = [
        ["model.block_size=" + str(row["model.block_size"]), "model.radius=" + str(row["model.radius"]),
         "model/experts=onehot", "model.layers=1"]
        for _, row in front.iterrows()
    ]
    assert sweep["variants"] == expected
    assert sweep["fixed"] == ["train.epochs=2"]

    corpus = real_sweep_store.path.parent / "corpus"
    command = sweep_command(tmp_path, corpus, "+sweep=frontier", "+sweep.dry_run=true")
    # Hydra reads its flags before the overrides.
    command[3:3] = ["--config-dir", str(tmp_path / "conf")]
    listed = subprocess.run(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            timeout=300)
    assert listed.returncode == 0, listed.stdout[-4000:]
    assert f"sweep frontier: {len(expected)} jobs" in listed.stdout
    for variant in expected:
        assert describe_overrides(variant) in listed.stdout
