"""A hand-made MLflow store of two sweeps, and the `filled_store` fixture that the analysis,
notebook and dashboard tests read.

The store follows the schema that sweep.py writes (parent run per sweep, nested job runs,
flattened config params, final and per-phase metrics, per-epoch curves). Its runs are
chosen so that the expected results are known:

- sweep ``sw-main``: 9 finished SAFFU jobs, of which j1 and j7 are dominated and j8 and j9
  tie (same n_params and val_ppl); j4 finished twice (the later run, val_ppl 350, is kept);
  j6 failed once before it finished; jf failed for good; jr is still running; jn finished
  with a NaN val_ppl; and the anchors Kneser-Ney and GPT-2.
- sweep ``sw-other``: one finished job.

The store of a real sweep is `real_sweep_store` (conftest.py), read by
test_analysis_real_sweep.py, the notebook and the dashboard tests. Tests here that check
the known results read `StoreInfo.known` and skip when it is None.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from analysis.load import (
    ExperimentNotFoundError,
    NoRunsError,
    SweepRuns,
    TrackingStoreError,
    load_curves,
    load_runs,
    parse_param_column,
)

EXPERIMENT = "saffu-test"
MAIN_SWEEP = "sw-main"
OTHER_SWEEP = "sw-other"
START_MS = 1_700_000_000_000

# name, block_size, radius, expert kind, code_dim, layers, n_params, val_ppl
SAFFU_JOBS = [
    ("j1", 1, 0, "onehot", None, 1, 1000, 300.0),
    ("j2", 1, 0, "bitcode", 32, 1, 100, 400.0),
    ("j3", 1, 16, "onehot", None, 1, 2000, 250.0),
    ("j4", 1, 16, "bitcode", 32, 1, 200, 350.0),
    ("j5", 4, 0, "onehot", None, 1, 4000, 200.0),
    ("j6", 4, 0, "bitcode", 32, 1, 400, 320.0),
    ("j7", 4, 16, "onehot", None, 1, 8000, 210.0),
    ("j8", 4, 16, "bitcode", 32, 1, 800, 300.0),
    ("j9", 4, 16, "bitcode", 32, 2, 800, 300.0),
]


@dataclass
class KnownAnswers:
    """The results that the hand-made store is built to give, for sweep ``sw-main``."""

    front_params: set[str] = field(default_factory=lambda: {"j2", "j4", "j6", "j8", "j9", "j3", "j5"})
    dominated: set[str] = field(default_factory=lambda: {"j1", "j7"})
    tied: set[str] = field(default_factory=lambda: {"j8", "j9"})
    nan_runs: set[str] = field(default_factory=lambda: {"jn"})
    failed: set[str] = field(default_factory=lambda: {"jf", "j6-failed", "jk-started"})
    retried_ok: set[str] = field(default_factory=lambda: {"j6-failed"})
    unfinished: set[str] = field(default_factory=lambda: {"jr"})
    never_started: set[str] = field(default_factory=lambda: {"jk-queued"})
    duplicate_dropped: str = "j4-first"
    duplicate_kept: str = "j4"
    kept_duplicate_val_ppl: float = 350.0
    anchors: set[str] = field(default_factory=lambda: {"kneser-ney", "gpt2"})
    finished_jobs: int = 12  # 9 SAFFU jobs, jn and the 2 anchors
    # val_ppl of the finite SAFFU jobs by block size: (count, median, min, max)
    block_size_effect: dict[int, tuple[int, float, float, float]] = field(
        default_factory=lambda: {1: (4, 325.0, 250.0, 400.0), 4: (5, 300.0, 200.0, 320.0)}
    )


@dataclass
class StoreInfo:
    """Where a filled store is and what it is built to contain (known=None for a real sweep)."""

    tracking_uri: str
    experiment: str
    sweep_id: str
    path: Path
    known: KnownAnswers | None


class _StoreWriter:
    def __init__(self, client: MlflowClient, experiment_id: str) -> None:
        self.client = client
        self.experiment_id = experiment_id
        self.clock = START_MS

    def run(self, name: str, tags: dict[str, str], params: dict[str, object], metrics: dict[str, float],
            status: str = "FINISHED", curves: dict[str, list[float]] | None = None) -> str:
        self.clock += 60_000
        run = self.client.create_run(self.experiment_id, start_time=self.clock, tags=tags, run_name=name)
        run_id = run.info.run_id
        timestamp = self.clock + 1_000
        metric_list = [Metric(key, value, timestamp, 0) for key, value in metrics.items()]
        for key, values in (curves or {}).items():
            metric_list += [Metric(key, value, timestamp + step, step) for step, value in enumerate(values)]
        self.client.log_batch(
            run_id,
            metrics=metric_list,
            params=[Param(key, str(value)) for key, value in params.items()],
            tags=[RunTag("mlflow.runName", name)],
        )
        if status != "RUNNING":
            self.client.set_terminated(run_id, status=status, end_time=self.clock + 30_000)
        return run_id


def _job_params(block_size: int, radius: int, kind: str, code_dim: int | None, layers: int, model: str = "saffu") -> dict[str, object]:
    return {
        "model.name": model,
        "model.layers": layers,
        "model.block_size": block_size,
        "model.radius": radius,
        "model.experts.kind": kind,
        "model.experts.code_dim": code_dim,
        "model.attention_code_dim": 32,
        "data.name": "wikitext2",
        "data.dir": None,
        "tokenizer.vocab_size": 4096,
        "solver.alpha": 0.01,
        "train.epochs": 3,
        "seed": 0,
    }


def _job_metrics(n_params: int, val_ppl: float) -> tuple[dict[str, float], dict[str, list[float]]]:
    explicit = val_ppl * 1.2
    bp_only = val_ppl * 1.5
    metrics = {
        "n_params": float(n_params),
        "val_ppl": val_ppl,
        "test_ppl": val_ppl * 1.05,
        "val_bpc": math.log2(val_ppl) / 4 if val_ppl == val_ppl else math.nan,
        "explicit/val_ppl": explicit,
        "explicit/test_ppl": explicit * 1.05,
        "explicit/solve_seconds": n_params / 100.0,
        "finetune/val_ppl": val_ppl,
        "finetune/test_ppl": val_ppl * 1.05,
        "finetune/seconds": 10.0,
        "bp_only/val_ppl": bp_only,
        "bp_only/test_ppl": bp_only * 1.05,
        "bp_only/seconds": 10.0,
    }
    curves = {
        "finetune/epoch_val_ppl": [explicit, (explicit + val_ppl) / 2, val_ppl],
        "bp_only/epoch_val_ppl": [bp_only * 3, bp_only * 1.5, bp_only],
    }
    return metrics, curves


def fill_store(path: Path, experiment: str = EXPERIMENT) -> StoreInfo:
    """Create a SQLite MLflow store at `path` with the hand-made sweeps described above."""
    tracking_uri = f"sqlite:///{path}"
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment_id = client.create_experiment(experiment, artifact_location=(path.parent / "artifacts").as_uri())
    writer = _StoreWriter(client, experiment_id)

    parent_id = writer.run("smoke-20231114-221320", {"saffu.role": "sweep", "saffu.sweep_id": MAIN_SWEEP}, {}, {})

    def job_tags(config_hash: str, sweep_id: str = MAIN_SWEEP, parent: str = parent_id) -> dict[str, str]:
        return {
            "saffu.role": "job",
            "saffu.sweep_id": sweep_id,
            "saffu.config_hash": config_hash,
            "saffu.git_commit": "0123abc",
            "mlflow.parentRunId": parent,
        }

    for name, block_size, radius, kind, code_dim, layers, n_params, val_ppl in SAFFU_JOBS:
        params = _job_params(block_size, radius, kind, code_dim, layers)
        if name == "j4":
            first_metrics, first_curves = _job_metrics(n_params, 340.0)
            writer.run("j4-first", job_tags("h-j4"), params, first_metrics, curves=first_curves)
        if name == "j6":
            writer.run("j6-failed", job_tags("h-j6"), params, {"explicit/val_ppl": 390.0}, status="FAILED")
        metrics, curves = _job_metrics(n_params, val_ppl)
        writer.run(name, job_tags(f"h-{name}"), params, metrics, curves=curves)

    writer.run("jf", job_tags("h-jf"), _job_params(1, 64, "onehot", None, 1), {}, status="FAILED")
    writer.run("jr", job_tags("h-jr"), _job_params(4, 64, "bitcode", 32, 1), {"explicit/val_ppl": 280.0}, status="RUNNING")
    # Two runs of an interrupted launch: one queued job, one whose worker had started it.
    writer.run("jk-queued", job_tags("h-jk"), _job_params(2, 64, "onehot", None, 1), {}, status="KILLED")
    started_tags = {**job_tags("h-jk2"), "saffu.worker_pid": "4242"}
    writer.run("jk-started", started_tags, _job_params(2, 16, "onehot", None, 1), {}, status="KILLED")
    nan_metrics, _ = _job_metrics(150, math.nan)
    writer.run("jn", job_tags("h-jn"), _job_params(1, 64, "bitcode", 32, 1), nan_metrics)

    kneser_ney = _job_params(4, 0, "onehot", None, 1, model="kneser_ney")
    writer.run("kneser-ney", job_tags("h-kn"), kneser_ney, {"n_params": 50_000.0, "val_ppl": 280.0, "test_ppl": 290.0})
    gpt2 = _job_params(4, 0, "onehot", None, 1, model="gpt2")
    writer.run("gpt2", job_tags("h-gpt2"), gpt2, {"n_params": 124_000_000.0, "val_ppl": 60.0, "test_ppl": 62.0})

    other_parent = writer.run("roadmap-20231115-090000", {"saffu.role": "sweep", "saffu.sweep_id": OTHER_SWEEP}, {}, {})
    other_metrics, other_curves = _job_metrics(300, 330.0)
    writer.run("other-j1", job_tags("h-other", OTHER_SWEEP, other_parent), _job_params(2, 4, "bitcode", 16, 1),
               other_metrics, curves=other_curves)
    return StoreInfo(tracking_uri, experiment, MAIN_SWEEP, path, KnownAnswers())


_STORES: dict[str, StoreInfo] = {}


@pytest.fixture(scope="session")
def filled_store(tmp_path_factory: pytest.TempPathFactory) -> StoreInfo:
    """A filled MLflow store; replace this fixture to run the tests on a real sweep.

    Test modules import this fixture, so pytest registers it once per module; the cache
    makes them all share one store, which the tests only read.
    """
    if "store" not in _STORES:
        _STORES["store"] = fill_store(tmp_path_factory.mktemp("mlflow-store") / "mlflow.db")
    return _STORES["store"]


def test_store_has_both_sweeps(filled_store: StoreInfo) -> None:
    client = MlflowClient(tracking_uri=filled_store.tracking_uri)
    experiment = client.get_experiment_by_name(filled_store.experiment)
    assert experiment is not None
    parents = client.search_runs([experiment.experiment_id], "tags.`saffu.role` = 'sweep'")
    assert len(parents) >= 1
    assert filled_store.sweep_id in {run.data.tags["saffu.sweep_id"] for run in parents}


def _known(store: StoreInfo) -> KnownAnswers:
    if store.known is None:
        pytest.skip("the store fixture comes from a real sweep, whose exact results are not known in advance")
    return store.known


@pytest.fixture(scope="module")
def sweep_runs(filled_store: StoreInfo) -> SweepRuns:
    return load_runs(filled_store.tracking_uri, filled_store.experiment, filled_store.sweep_id)


def test_load_types_config_columns(sweep_runs: SweepRuns) -> None:
    jobs = sweep_runs.jobs
    assert str(jobs["model.block_size"].dtype) == "Int64"
    assert str(jobs["model.radius"].dtype) == "Int64"
    assert str(jobs["model.layers"].dtype) == "Int64"
    assert str(jobs["model.experts.code_dim"].dtype) == "Int64"
    assert jobs["val_ppl"].dtype == "float64"
    assert jobs["n_params"].dtype == "float64"
    onehot = jobs.loc[jobs["model.experts.kind"] == "onehot"]
    assert len(onehot) > 0
    assert onehot["model.experts.code_dim"].isna().all()


def test_load_types_float_and_none_params(sweep_runs: SweepRuns, filled_store: StoreInfo) -> None:
    _known(filled_store)
    jobs = sweep_runs.jobs
    assert jobs["solver.alpha"].dtype == "float64"
    assert jobs["data.dir"].isna().all()
    assert set(jobs["experts"].dropna()) == {"onehot", "bitcode32"}


def test_load_keeps_only_the_sweep(sweep_runs: SweepRuns, filled_store: StoreInfo) -> None:
    assert set(sweep_runs.jobs["sweep_id"]) == {filled_store.sweep_id}
    assert set(sweep_runs.sweeps["sweep_id"]) == {filled_store.sweep_id}
    assert len(sweep_runs.sweeps) == 1


def test_load_whole_experiment(filled_store: StoreInfo) -> None:
    everything = load_runs(filled_store.tracking_uri, filled_store.experiment)
    in_sweep = load_runs(filled_store.tracking_uri, filled_store.experiment, filled_store.sweep_id)
    assert len(everything.jobs) >= len(in_sweep.jobs)
    if filled_store.known is not None:
        assert set(everything.sweeps["sweep_id"]) == {MAIN_SWEEP, OTHER_SWEEP}
        assert len(everything.jobs) == len(in_sweep.jobs) + 1


def test_load_counts_failed_runs(sweep_runs: SweepRuns, filled_store: StoreInfo) -> None:
    known = _known(filled_store)
    assert set(sweep_runs.failed["run_name"]) == known.failed
    retried = set(sweep_runs.failed.loc[sweep_runs.failed["retried_ok"], "run_name"])
    assert retried == known.retried_ok
    assert not set(sweep_runs.jobs["run_name"]) & known.failed


def test_load_reports_unfinished_runs(sweep_runs: SweepRuns, filled_store: StoreInfo) -> None:
    known = _known(filled_store)
    assert set(sweep_runs.unfinished["run_name"]) == known.unfinished
    assert set(sweep_runs.unfinished["status"]) == {"RUNNING"}


def test_load_sets_aside_never_started_runs(sweep_runs: SweepRuns, filled_store: StoreInfo) -> None:
    known = _known(filled_store)
    assert set(sweep_runs.never_started["run_name"]) == known.never_started
    assert not set(sweep_runs.failed["run_name"]) & known.never_started
    assert "jk-started" in set(sweep_runs.failed["run_name"])


def test_load_keeps_latest_duplicate(sweep_runs: SweepRuns, filled_store: StoreInfo) -> None:
    known = _known(filled_store)
    assert list(sweep_runs.duplicates["run_name"]) == [known.duplicate_dropped]
    kept = sweep_runs.jobs.loc[sweep_runs.jobs["run_name"] == known.duplicate_kept]
    assert len(kept) == 1
    assert kept["val_ppl"].iloc[0] == known.kept_duplicate_val_ppl
    assert sweep_runs.duplicates["kept_run_id"].iloc[0] == kept["run_id"].iloc[0]
    assert sweep_runs.jobs["config_hash"].is_unique


def test_load_summary_counts(sweep_runs: SweepRuns, filled_store: StoreInfo) -> None:
    known = _known(filled_store)
    summary = sweep_runs.summary()
    assert summary["finished_jobs"] == known.finished_jobs
    assert summary["anchors"] == len(known.anchors)
    assert summary["failed"] == len(known.failed)
    assert summary["failed_then_finished"] == len(known.retried_ok)
    assert summary["unfinished"] == len(known.unfinished)
    assert summary["never_started"] == len(known.never_started)
    assert summary["duplicates_dropped"] == 1
    assert summary["sweeps"] == 1


def test_load_marks_anchors(sweep_runs: SweepRuns, filled_store: StoreInfo) -> None:
    known = _known(filled_store)
    anchors = sweep_runs.jobs.loc[sweep_runs.jobs["is_anchor"]]
    assert set(anchors["run_name"]) == known.anchors
    assert anchors["wall_seconds"].isna().all()


def test_load_sums_phase_seconds(sweep_runs: SweepRuns, filled_store: StoreInfo) -> None:
    _known(filled_store)
    j5 = sweep_runs.jobs.loc[sweep_runs.jobs["run_name"] == "j5"].iloc[0]
    assert j5["wall_seconds"] == 4000 / 100.0 + 10.0 + 10.0


def test_load_nan_metric_stays_nan(sweep_runs: SweepRuns, filled_store: StoreInfo) -> None:
    known = _known(filled_store)
    nan_rows = sweep_runs.jobs.loc[sweep_runs.jobs["run_name"].isin(known.nan_runs)]
    assert len(nan_rows) == len(known.nan_runs)
    assert nan_rows["val_ppl"].isna().all()


def test_load_curves_by_epoch(sweep_runs: SweepRuns, filled_store: StoreInfo) -> None:
    saffu = sweep_runs.jobs.loc[~sweep_runs.jobs["is_anchor"]]
    curves = load_curves(filled_store.tracking_uri, list(saffu["run_id"].head(2)))
    assert list(curves.columns) == ["run_id", "metric", "step", "value"]
    assert len(curves) > 0
    assert curves["step"].min() >= 0
    if filled_store.known is not None:
        assert set(curves["metric"]) == {"finetune/epoch_val_ppl", "bp_only/epoch_val_ppl"}
        assert curves.groupby(["run_id", "metric"])["step"].apply(list).map(lambda s: s == [0, 1, 2]).all()


def test_load_unknown_experiment(filled_store: StoreInfo) -> None:
    with pytest.raises(ExperimentNotFoundError, match="no-such-experiment") as error:
        load_runs(filled_store.tracking_uri, "no-such-experiment")
    assert filled_store.experiment in str(error.value)


def test_load_unknown_sweep(filled_store: StoreInfo) -> None:
    with pytest.raises(NoRunsError, match="no-such-sweep"):
        load_runs(filled_store.tracking_uri, filled_store.experiment, "no-such-sweep")


def test_load_missing_sqlite_file(tmp_path: Path) -> None:
    missing = tmp_path / "absent.db"
    with pytest.raises(TrackingStoreError, match="does not exist"):
        load_runs(f"sqlite:///{missing}", "saffu")
    assert not missing.exists()


def test_load_dead_server_fails_at_health_check() -> None:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(TrackingStoreError, match="no MLflow server responds"):
        load_runs(f"http://127.0.0.1:{port}", "saffu")


def test_load_invalid_uri_scheme() -> None:
    with pytest.raises(TrackingStoreError, match="bogus"):
        load_runs("bogus://nowhere", "saffu")


def test_load_empty_experiment(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'empty.db'}"
    MlflowClient(tracking_uri=uri).create_experiment("empty", artifact_location=(tmp_path / "artifacts").as_uri())
    with pytest.raises(NoRunsError, match="no runs"):
        load_runs(uri, "empty")


def test_load_deleted_experiment(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment("gone", artifact_location=(tmp_path / "artifacts").as_uri())
    client.delete_experiment(experiment_id)
    with pytest.raises(ExperimentNotFoundError) as error:
        load_runs(uri, "gone")
    assert str(error.value) == (
        f"experiment 'gone' is deleted in {uri!r}; restore it "
        f"(`mlflow experiments restore --experiment-id {experiment_id}`) or choose another experiment"
    )


def test_load_file_path_as_uri(tmp_path: Path) -> None:
    """A path to a database file given where a URI belongs, existing or not, gets the
    sqlite:/// form in the message."""
    existing = tmp_path / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{existing}").search_experiments()
    for path in (existing, tmp_path / "other.db"):
        with pytest.raises(TrackingStoreError) as error:
            load_runs(str(path), "saffu")
        assert str(error.value) == f"{str(path)!r} is a file path, not a tracking URI; for an SQLite store write sqlite:///{path}"


@pytest.mark.parametrize(
    ("uri", "package"),
    [("postgresql://alice:hunter2@127.0.0.1:1/mlflow", "psycopg"), ("mysql://alice:hunter2@127.0.0.1:1/mlflow", "mysqlclient")],
)
def test_load_database_uri_hides_password(uri: str, package: str) -> None:
    """A database whose driver is not installed is named with the package to install, and
    the URI is shown with its password replaced by ***."""
    with pytest.raises(TrackingStoreError) as error:
        load_runs(uri, "saffu")
    assert "hunter2" not in str(error.value)
    assert "alice:***@127.0.0.1:1" in str(error.value)
    assert package in str(error.value)


def test_load_from_read_only_folder(tmp_path: Path) -> None:
    """A store in WAL mode, as the sweeps leave it, cannot be read from a folder that cannot
    be written. The message names the folder instead of SQLite's "unable to open"."""
    import sqlite3

    from saffu.tracking import prepare_store
    from sweep_helpers import read_only

    folder = tmp_path / "store"
    folder.mkdir()
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    prepare_store(uri, "saffu")
    sqlite3.connect(folder / "mlflow.db").close()  # The last connection removes -wal and -shm.
    with read_only(folder):
        with pytest.raises(TrackingStoreError) as error:
            load_runs(uri, "saffu")
    assert str(error.value) == (
        f"failed to open the tracking store {uri!r}: the folder {str(folder)!r} is not writable, and SQLite "
        "writes its -wal and -shm files there even to read; copy the store to a writable folder"
    )


def test_parse_param_column_types() -> None:
    assert str(parse_param_column(["1", "None", "16"]).dtype) == "Int64"
    assert parse_param_column(["0.01", "1e-3", None]).dtype == "float64"
    assert str(parse_param_column(["True", "false"]).dtype) == "boolean"
    text = parse_param_column(["onehot", "None"])
    assert list(text) == ["onehot", None]
    assert parse_param_column(["None", "null"]).isna().all()
