"""The report command, end to end on the filled store, and its errors."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from test_analysis_store import StoreInfo, _job_params, _StoreWriter, filled_store  # noqa: F401  (fixture)

from analysis.load import load_runs
from analysis.report import FIGURES, main, markdown_table, redact_uri

REPO_ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def report_dir(filled_store: StoreInfo, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("report")
    code = main(["--tracking-uri", filled_store.tracking_uri, "--experiment", filled_store.experiment,
                 "--sweep-id", filled_store.sweep_id, "--out", str(out)])
    assert code == 0
    return out


def test_report_writes_figures(report_dir: Path) -> None:
    for name in FIGURES.values():
        path = report_dir / name
        assert path.is_file(), name
        assert path.read_bytes()[:8] == PNG_MAGIC, name
        assert path.stat().st_size > 5_000, name


def test_report_links_every_figure(report_dir: Path) -> None:
    text = (report_dir / "report.md").read_text(encoding="utf-8")
    linked = set(re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text))
    assert linked == set(FIGURES.values())


def test_report_sections_present(report_dir: Path) -> None:
    text = (report_dir / "report.md").read_text(encoding="utf-8")
    for heading in ("## Runs", "## Pareto front: validation perplexity vs parameters", "### Best variant per parameter budget",
                    "## Pareto front: validation perplexity vs wall-clock time", "## Factor effects",
                    "### Two-factor interactions", "## Fine-tuning curves"):
        assert heading in text, heading


def test_report_lists_left_out_runs(report_dir: Path, filled_store: StoreInfo) -> None:  # noqa: F811
    if filled_store.known is None:
        pytest.skip("the store fixture comes from a real sweep")
    text = (report_dir / "report.md").read_text(encoding="utf-8")
    for name in (*filled_store.known.failed, *filled_store.known.unfinished, *filled_store.known.nan_runs,
                 filled_store.known.duplicate_dropped):
        assert f"| {name} |" in text, name
    assert "Knee of the front" in text


def test_report_ranked_csv(report_dir: Path, filled_store: StoreInfo) -> None:  # noqa: F811
    ranked = pd.read_csv(report_dir / "ranked.csv")
    assert list(ranked["rank"]) == list(range(1, len(ranked) + 1))
    assert ranked["val_ppl"].notna().all()
    if filled_store.known is not None:
        assert set(ranked.loc[ranked["on_front"], "run_name"]) == filled_store.known.front_params
        assert not set(ranked["run_name"]) & filled_store.known.anchors


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "analysis.report", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)


def test_cli_prints_report_path(filled_store: StoreInfo, tmp_path: Path) -> None:  # noqa: F811
    result = run_cli("--tracking-uri", filled_store.tracking_uri, "--experiment", filled_store.experiment,
                     "--out", str(tmp_path / "all"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path / "all" / "report.md")


def test_cli_unknown_experiment(filled_store: StoreInfo, tmp_path: Path) -> None:  # noqa: F811
    result = run_cli("--tracking-uri", filled_store.tracking_uri, "--experiment", "nope", "--out", str(tmp_path))
    assert result.returncode == 1
    assert "experiment 'nope' not found" in result.stderr
    assert "Traceback" not in result.stderr


def test_main_missing_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--tracking-uri", f"sqlite:///{tmp_path / 'absent.db'}", "--experiment", "saffu", "--out", str(tmp_path)])
    assert code == 1
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "absent.db").exists()


def test_main_error_names_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Errors of the store checks name the command's option, not the sweep's config key,
    and show the URI's password as ***."""
    code = main(["--tracking-uri", "postgresql://alice:hunter2@127.0.0.1:1/mlflow", "--out", str(tmp_path)])
    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --tracking-uri postgresql://alice:***@127.0.0.1:1/mlflow: ")
    assert "hunter2" not in err
    assert not (tmp_path / "report.md").exists()


def test_main_no_runs(filled_store: StoreInfo, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    code = main(["--tracking-uri", filled_store.tracking_uri, "--experiment", filled_store.experiment,
                 "--sweep-id", "no-such-sweep", "--out", str(tmp_path)])
    assert code == 1
    assert "no runs" in capsys.readouterr().err
    assert not (tmp_path / "report.md").exists()


def test_markdown_table_formats() -> None:
    frame = pd.DataFrame({"name": ["a|b"], "count": [1234], "ppl": [12.3456], "missing": [float("nan")]})
    text = markdown_table(frame)
    assert text.splitlines()[0] == "| name | count | ppl | missing |"
    assert text.splitlines()[2] == "| a\\|b | 1,234 | 12.35 |  |"


def test_redact_uri_hides_password() -> None:
    assert redact_uri("postgresql://user:secret@db:5432/mlflow") == "postgresql://user:***@db:5432/mlflow"
    assert redact_uri("sqlite:///mlflow.db") == "sqlite:///mlflow.db"


def write_small_store(path: Path, statuses: list[str]) -> str:
    """Create a store with one sweep whose jobs have the given statuses; return its URI."""
    uri = f"sqlite:///{path}"
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment("saffu", artifact_location=(path.parent / "artifacts").as_uri())
    parent = client.create_run(experiment_id, tags={"saffu.role": "sweep", "saffu.sweep_id": "s"}, run_name="small")
    for index, status in enumerate(statuses):
        tags = {"saffu.role": "job", "saffu.sweep_id": "s", "saffu.config_hash": f"h{index}",
                "mlflow.parentRunId": parent.info.run_id}
        run = client.create_run(experiment_id, tags=tags, run_name=f"job{index}")
        client.log_param(run.info.run_id, "model.name", "saffu")
        if status == "FINISHED":
            client.log_metric(run.info.run_id, "n_params", 1000.0)
            client.log_metric(run.info.run_id, "val_ppl", 300.0)
        client.set_terminated(run.info.run_id, status=status)
    client.set_terminated(parent.info.run_id)
    return uri


def test_report_no_finished_run(tmp_path: Path) -> None:
    uri = write_small_store(tmp_path / "failed.db", ["FAILED"])
    assert main(["--tracking-uri", uri, "--experiment", "saffu", "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert "| job0 |" in text
    assert "0 of 0 ranked SAFFU variants are on the front" in text
    # No job logged a fine-tuning or bp-only result, so only the curves figure is left out.
    for key, name in FIGURES.items():
        assert (tmp_path / "out" / name).is_file() == (key != "curves"), name


def test_report_single_run(tmp_path: Path) -> None:
    uri = write_small_store(tmp_path / "single.db", ["FINISHED"])
    assert main(["--tracking-uri", uri, "--experiment", "saffu", "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert "1 of 1 ranked SAFFU variants are on the front" in text
    assert "No knee" in text


def test_report_without_training_phases(tmp_path: Path) -> None:
    # Three explicit-only jobs, as a sweep with train.enabled=false train.bp_only=false logs them.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    writer = _StoreWriter(client, client.create_experiment("explicit-only", artifact_location=(tmp_path / "artifacts").as_uri()))
    parent = writer.run("explicit-20231114", {"saffu.role": "sweep", "saffu.sweep_id": "sw-explicit"}, {}, {})
    for block_size, n_params, val_ppl in ((1, 100.0, 400.0), (2, 200.0, 300.0), (4, 400.0, 350.0)):
        tags = {"saffu.role": "job", "saffu.sweep_id": "sw-explicit", "saffu.config_hash": f"h{block_size}",
                "mlflow.parentRunId": parent}
        metrics = {"n_params": n_params, "val_ppl": val_ppl, "explicit/val_ppl": val_ppl, "explicit/solve_seconds": 1.0}
        writer.run(f"b{block_size}", tags, _job_params(block_size, 0, "onehot", None, 1), metrics)
    out = tmp_path / "report"

    assert main(["--tracking-uri", uri, "--experiment", "explicit-only", "--out", str(out)]) == 0
    text = (out / "report.md").read_text(encoding="utf-8")
    assert "so there are no curves to draw" in text
    assert FIGURES["curves"] not in text
    assert not (out / FIGURES["curves"]).exists()
    assert (out / FIGURES["pareto_params"]).is_file()


def test_report_counts_capped_phases(tmp_path: Path) -> None:
    """Three jobs under a 600-second cap: one logged that the cap stopped its fine-tuning,
    one (from before the metric) ran it 700 s, and one stopped early."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    writer = _StoreWriter(client, client.create_experiment("capped", artifact_location=(tmp_path / "artifacts").as_uri()))
    parent = writer.run("capped-20231114", {"saffu.role": "sweep", "saffu.sweep_id": "sw-capped"}, {}, {})
    phases = {
        1: {"finetune/seconds": 612.0, "finetune/stopped_by_time": 1.0, "bp_only/seconds": 640.0, "bp_only/stopped_by_time": 0.0},
        2: {"finetune/seconds": 700.0, "bp_only/seconds": 300.0},
        4: {"finetune/seconds": 120.0, "finetune/stopped_by_time": 0.0, "bp_only/seconds": 90.0, "bp_only/stopped_by_time": 0.0},
    }
    for block_size, seconds in phases.items():
        tags = {"saffu.role": "job", "saffu.sweep_id": "sw-capped", "saffu.config_hash": f"h{block_size}",
                "mlflow.parentRunId": parent}
        metrics = {"n_params": 100.0 * block_size, "val_ppl": 300.0, "finetune/val_ppl": 300.0, "bp_only/val_ppl": 320.0, **seconds}
        params = {**_job_params(block_size, 0, "onehot", None, 1), "train.max_seconds": 600}
        writer.run(f"b{block_size}", tags, params, metrics, curves={"finetune/epoch_val_ppl": [330.0, 300.0]})
    out = tmp_path / "report"

    assert main(["--tracking-uri", uri, "--experiment", "capped", "--out", str(out)]) == 0
    text = (out / "report.md").read_text(encoding="utf-8")
    assert "The `train.max_seconds` cap stopped 2 of 3 fine-tuning phases and 0 of 3 bp-only phases" in text
    jobs = load_runs(uri, "capped").jobs.set_index("model.block_size")
    assert jobs["finetune/capped"].to_dict() == {1: True, 2: True, 4: False}
    assert jobs["bp_only/capped"].to_dict() == {1: False, 2: False, 4: False}
