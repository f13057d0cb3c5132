"""The claims benchmark's job plans and its time-to-quality rule."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import claims  # noqa: E402


def write_corpus(folder: Path) -> Path:
    folder.mkdir()
    for name in ("train", "valid", "test"):
        (folder / f"{name}.txt").write_text("a small text\n", encoding="utf-8")
    return folder


def test_data_table_plans_three_jobs_per_size(tmp_path):
    args = claims.parse_args(["data", "--corpus", str(write_corpus(tmp_path / "c")), "--sizes", "1000", "2000"])
    jobs = claims.plan(args)
    assert [job.label for job in jobs] == ["saffu", "kneser_ney", "gpt2"] * 2
    assert "data.max_train_tokens=2000" in jobs[3].overrides
    assert "train.max_seconds=120" in jobs[0].overrides
    assert "model.sizes=[{n_layer:4,n_head:4,n_embd:128}]" in jobs[2].overrides


def test_planned_jobs_compose_to_distinct_configs(tmp_path):
    args = claims.parse_args(["epochs", "--corpus", str(write_corpus(tmp_path / "c"))])
    hashes = [claims.job_hash(job.overrides) for job in claims.plan(args)]
    assert len(hashes) == 3
    assert len(set(hashes)) == 3


def test_wallclock_jobs_are_the_data_tables_largest(tmp_path):
    corpus = str(write_corpus(tmp_path / "c"))
    wallclock = claims.plan(claims.parse_args(["wallclock", "--corpus", corpus, "--seconds", "60"]))
    data = claims.plan(claims.parse_args(["data", "--corpus", corpus, "--seconds", "60", "--sizes", "1000000"]))
    # The same configs, so the data table reuses the wall-clock table's finished runs.
    assert [claims.job_hash(job.overrides) for job in wallclock] == [claims.job_hash(job.overrides) for job in data]


def test_missing_corpus_file_rejected(tmp_path):
    corpus = write_corpus(tmp_path / "c")
    (corpus / "test.txt").unlink()
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "claims.py"), "epochs", "--corpus", str(corpus)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "lacks test.txt" in result.stderr
    assert "Traceback" not in result.stderr


def run_with(metrics: dict[str, float]) -> SimpleNamespace:
    return SimpleNamespace(data=SimpleNamespace(metrics=metrics))


@pytest.mark.parametrize(
    ("metrics", "expected"),
    [
        ({"bp_only/val_ppl": 130.0, "bp_only/seconds": 360.0, "explicit/solve_seconds": 7.2, "explicit/val_ppl": 125.0},
         "explicit+bp reached it after 7.2 s, the explicit solve alone: 50.0 times sooner"),
        ({"bp_only/val_ppl": 120.0, "bp_only/seconds": 360.0, "explicit/solve_seconds": 10.0, "explicit/val_ppl": 125.0,
          "finetune/val_ppl": 119.0, "finetune/seconds": 80.0},
         "explicit+bp reached it after 90.0 s, the solve plus fine-tuning (at most): 4.0 times sooner"),
        ({"bp_only/val_ppl": 115.5, "bp_only/seconds": 617.0, "explicit/solve_seconds": 7.4, "explicit/val_ppl": 118.3,
          "finetune/val_ppl": 118.3, "finetune/seconds": 616.0},
         "explicit+bp did not reach it (best 118.30)"),
        ({"explicit/solve_seconds": 7.4, "explicit/val_ppl": 118.3}, "the job has no bp-only phase"),
    ],
    ids=["explicit alone", "after fine-tuning", "never", "no bp-only"],
)
def test_time_to_quality_cases(metrics, expected):
    assert expected in claims.time_to_quality(run_with(metrics))
