"""Shared fixtures: the real corpora, found through SAFFU_DATA_DIR."""

import os
from pathlib import Path

import pytest

CORPORA = ("gutenberg-fiction", "kjv")


def data_root() -> Path | None:
    """Return the folder that contains the real corpora, or None when SAFFU_DATA_DIR is unset."""
    value = os.environ.get("SAFFU_DATA_DIR")
    return Path(value) if value else None


@pytest.fixture(scope="session")
def corpora_dir() -> Path:
    """Folder of the real corpora. Skips without SAFFU_DATA_DIR, and fails instead when
    SAFFU_REQUIRE_DATA=1 (set by .ci/run), so CI never passes by skipping them."""
    root = data_root()
    missing = root is None or not all((root / name / "train.txt").is_file() for name in CORPORA)
    if missing:
        reason = f"the corpora {CORPORA} are not under SAFFU_DATA_DIR={root}; set it to the folder that holds them"
        if os.environ.get("SAFFU_REQUIRE_DATA") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return root


@pytest.fixture(scope="session")
def gutenberg_dir(corpora_dir: Path) -> Path:
    return corpora_dir / "gutenberg-fiction"


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory, request):
    """Keeps tokenizer and token-id caches out of the user's home during tests unless
    SAFFU_CACHE_DIR is set (CI sets it so the tests share one cache)."""
    if "SAFFU_CACHE_DIR" not in os.environ:
        os.environ["SAFFU_CACHE_DIR"] = str(tmp_path_factory.mktemp("saffu-cache"))
    yield


# A job function that fails for one config of the real sweep below, as a job that raises would.
FAILING_JOB = '''
from saffu.job import run_job as real_run_job


def run_job(cfg, log_metric):
    if cfg.model.block_size == 2 and cfg.model.radius == 4:
        raise ValueError("injected failure for block_size=2 radius=4")
    return real_run_job(cfg, log_metric=log_metric)
'''


@pytest.fixture(scope="session")
def real_sweep_store(tmp_path_factory, gutenberg_dir: Path):
    """An MLflow store filled by `python sweep.py -m` on a slice of gutenberg-fiction: four
    jobs (block size 1, 2 x radius 0, 4) of which block_size=2 radius=4 raises, so the
    store holds three finished job runs, one failed run and the sweep's parent run."""
    from sweep_helpers import run_sweep, write_corpus_slice
    from test_analysis_store import StoreInfo

    work = tmp_path_factory.mktemp("real-sweep")
    corpus = write_corpus_slice(gutenberg_dir, work / "corpus", train_chars=120_000, eval_chars=20_000)
    (work / "failing_job.py").write_text(FAILING_JOB)
    result = run_sweep(
        work, corpus, "model.block_size=1,2", "model.radius=0,4", "model/experts=onehot", "model.layers=1", "ray.num_cpus=2",
        "hydra.launcher.job_function=failing_job:run_job", pythonpath=work,
    )
    assert result.returncode == 1, result.stdout[-6000:]
    assert "3 finished, 0 skipped (already finished), 1 failed" in result.stdout, result.stdout[-6000:]

    from mlflow.tracking import MlflowClient

    db = work / "mlflow.db"
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("saffu")
    (parent,) = client.search_runs([experiment.experiment_id], "tags.`saffu.role` = 'sweep'")
    return StoreInfo(f"sqlite:///{db}", "saffu", parent.data.tags["saffu.sweep_id"], db, None)
