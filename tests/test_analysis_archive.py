"""Moving runs between MLflow stores with `python -m analysis.archive`: the runs of a real
sweep exported, imported into a new store, imported again, and a killed import completed."""

from __future__ import annotations

import json
import math
import re
import sqlite3
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from analysis.archive import TAG_ARCHIVED_RUN_ID, export_runs, import_runs, main
from analysis.load import load_runs
from sweep_helpers import run_sweep
from test_cluster import mlflow_server, watch  # noqa: F401  (fixtures: a real MLflow server on loopback)


def all_runs(client: MlflowClient, experiment: str) -> list:
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    return client.search_runs([experiment_id], max_results=1000)


@pytest.fixture(scope="module")
def archive(real_sweep_store, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("archive") / "runs"
    summary = export_runs(real_sweep_store.tracking_uri, real_sweep_store.experiment, folder)
    assert len(summary.copied) == 5
    assert summary.left_out == []
    return folder


@pytest.fixture(scope="module")
def imported(archive, real_sweep_store, tmp_path_factory) -> str:
    target = tmp_path_factory.mktemp("imported") / "mlflow.db"
    uri = f"sqlite:///{target}"
    summary = import_runs(uri, real_sweep_store.experiment, archive)
    assert len(summary.copied) == 5
    assert summary.skipped == []
    return uri


def test_export_writes_runs_and_artifacts(archive, real_sweep_store) -> None:
    """The archive holds the sweep's parent run, its three finished and one failed job runs,
    their config.yaml, and the failed run's traceback."""
    records = [json.loads(path.read_text()) for path in (archive / "runs").glob("*.json")]
    (parent,) = [record for record in records if record["tags"]["saffu.role"] == "sweep"]
    assert parent["status"] == "FAILED"  # A job failed, so the sweep did.
    jobs = [record for record in records if record["tags"]["saffu.role"] == "job"]
    assert sorted(record["status"] for record in jobs) == ["FAILED", "FINISHED", "FINISHED", "FINISHED"]
    (failed,) = [record for record in jobs if record["status"] == "FAILED"]
    traceback = (archive / "artifacts" / failed["run_id"] / "traceback.txt").read_text()
    assert "injected failure for block_size=2 radius=4" in traceback
    for record in records:
        if record["tags"]["saffu.role"] == "job":
            assert (archive / "artifacts" / record["run_id"] / "config.yaml").is_file()
    header = json.loads((archive / "archive.json").read_text())
    assert header["experiment"] == real_sweep_store.experiment


def test_imported_runs_match_the_source(imported, real_sweep_store) -> None:
    """The analysis reads the same jobs, metrics and failures from the copy as from the source."""
    source = load_runs(real_sweep_store.tracking_uri, real_sweep_store.experiment)
    copy = load_runs(imported, real_sweep_store.experiment)
    columns = ["config_hash", "status", "n_params", "val_ppl", "test_ppl", "finetune/val_ppl", "start_time", "end_time"]
    expected = source.jobs[columns].sort_values("config_hash").reset_index(drop=True)
    pd.testing.assert_frame_equal(copy.jobs[columns].sort_values("config_hash").reset_index(drop=True), expected)
    assert list(copy.failed["config_hash"]) == list(source.failed["config_hash"])
    assert list(copy.sweeps["sweep_id"]) == [real_sweep_store.sweep_id]


def test_import_keeps_histories_and_artifacts(imported, real_sweep_store) -> None:
    source_client = MlflowClient(tracking_uri=real_sweep_store.tracking_uri)
    client = MlflowClient(tracking_uri=imported)
    copies = {run.data.tags[TAG_ARCHIVED_RUN_ID]: run for run in all_runs(client, real_sweep_store.experiment)}
    (parent,) = [run for run in copies.values() if run.data.tags["saffu.role"] == "sweep"]
    for source in all_runs(source_client, real_sweep_store.experiment):
        copy = copies[source.info.run_id]
        assert copy.info.run_name == source.info.run_name
        assert copy.data.params == source.data.params
        for key in source.data.metrics:
            expected = [(m.step, m.timestamp, m.value) for m in source_client.get_metric_history(source.info.run_id, key)]
            got = [(m.step, m.timestamp, m.value) for m in client.get_metric_history(copy.info.run_id, key)]
            assert sorted(got) == sorted(expected), key
        if source.data.tags["saffu.role"] == "job":
            assert copy.data.tags["mlflow.parentRunId"] == parent.info.run_id
            assert [a.path for a in client.list_artifacts(copy.info.run_id)] == [
                a.path for a in source_client.list_artifacts(source.info.run_id)
            ]


def test_import_into_a_tracking_server(archive, real_sweep_store, mlflow_server) -> None:  # noqa: F811
    """Through a real MLflow server on loopback, with its own artifact store: the jobs,
    and the failed run's traceback, arrive as in the source."""
    summary = import_runs(mlflow_server.uri, real_sweep_store.experiment, archive)
    assert len(summary.copied) == 5
    copy = load_runs(mlflow_server.uri, real_sweep_store.experiment)
    source = load_runs(real_sweep_store.tracking_uri, real_sweep_store.experiment)
    assert sorted(copy.jobs["val_ppl"]) == sorted(source.jobs["val_ppl"])
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    (failed,) = [run for run in all_runs(client, real_sweep_store.experiment)
                 if run.info.status == "FAILED" and run.data.tags["saffu.role"] == "job"]
    text = Path(client.download_artifacts(failed.info.run_id, "traceback.txt", str(mlflow_server.store.parent)))
    assert "injected failure for block_size=2 radius=4" in text.read_text()


def test_import_again_copies_nothing(imported, archive, real_sweep_store) -> None:
    summary = import_runs(imported, real_sweep_store.experiment, archive)
    assert summary.copied == []
    assert len(summary.skipped) == 5
    assert len(all_runs(MlflowClient(tracking_uri=imported), real_sweep_store.experiment)) == 5


def test_copies_not_copied_back(imported, real_sweep_store, tmp_path) -> None:
    """An archive of the copies, imported into a third store and exported from there,
    copies nothing into the stores that already hold those runs."""
    experiment = real_sweep_store.experiment
    export_runs(imported, experiment, tmp_path / "second")
    third = f"sqlite:///{tmp_path / 'third.db'}"
    assert len(import_runs(third, experiment, tmp_path / "second").copied) == 5
    export_runs(third, experiment, tmp_path / "third")
    # A copy of the session's store, so that a wrong import cannot change what other tests read.
    with sqlite3.connect(real_sweep_store.path) as source, sqlite3.connect(tmp_path / "first.db") as first:
        source.backup(first)
    for store in (imported, f"sqlite:///{tmp_path / 'first.db'}"):
        for archive in ("second", "third"):
            summary = import_runs(store, experiment, tmp_path / archive)
            assert summary.copied == [], (store, archive)
            assert len(summary.skipped) == 5, (store, archive)
    client = MlflowClient(tracking_uri=third)
    origins = {run.data.tags[TAG_ARCHIVED_RUN_ID] for run in all_runs(client, experiment)}
    source = {run.info.run_id for run in all_runs(MlflowClient(tracking_uri=real_sweep_store.tracking_uri), experiment)}
    assert origins == source


def test_relaunch_on_copy_skips_finished(imported, real_sweep_store, tmp_path) -> None:
    """The config hashes travel with the runs: a dry run of the same sweep against the copy
    plans only the config whose job failed."""
    corpus = real_sweep_store.path.parent / "corpus"
    db = Path(imported[len("sqlite:///"):])
    result = run_sweep(
        tmp_path, corpus, "model.block_size=1,2", "model.radius=0,4", "model/experts=onehot", "model.layers=1",
        f"tracking.uri=sqlite:///{db}", "+sweep.dry_run=true",
    )
    assert result.returncode == 0, result.stdout[-4000:]
    assert "4 jobs, 1 to run, 3 already finished" in result.stdout, result.stdout[-4000:]
    planned = [line for line in result.stdout.splitlines() if re.match(r"\s*\d+\s+run\s", line)]
    assert len(planned) == 1, result.stdout[-4000:]
    assert "block_size=2 radius=4" in planned[0]


def test_killed_import_is_completed(archive, real_sweep_store, tmp_path) -> None:
    """A copy left RUNNING, as an import killed while it copied that run leaves it, is
    deleted and copied again, so each archived run has one complete copy."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    import_runs(uri, real_sweep_store.experiment, archive)
    client = MlflowClient(tracking_uri=uri)
    victim = next(run for run in all_runs(client, real_sweep_store.experiment) if run.info.status == "FINISHED")
    client.update_run(victim.info.run_id, status="RUNNING")

    summary = import_runs(uri, real_sweep_store.experiment, archive)
    assert len(summary.copied) == 1
    replaced = [run for run in all_runs(client, real_sweep_store.experiment)
                if run.data.tags[TAG_ARCHIVED_RUN_ID] == victim.data.tags[TAG_ARCHIVED_RUN_ID]]
    assert len(replaced) == 1
    assert replaced[0].info.run_id != victim.info.run_id
    runs = all_runs(client, real_sweep_store.experiment)
    assert len(runs) == 5
    assert all(run.info.status in ("FINISHED", "FAILED") for run in runs)
    assert client.get_run(victim.info.run_id).info.lifecycle_stage == "deleted"


def test_export_skips_running_keeps_nan(tmp_path) -> None:
    """A RUNNING run is named, not exported; a NaN metric is written as valid JSON and
    imported as NaN."""
    uri = f"sqlite:///{tmp_path / 'source.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment("hand-made")
    running = client.create_run(experiment_id, run_name="still-running").info.run_id
    done = client.create_run(experiment_id, run_name="diverged").info.run_id
    client.log_metric(done, "val_ppl", float("nan"), step=0)
    client.log_metric(done, "val_ppl", 12.5, step=1)
    client.set_terminated(done, "FINISHED")

    summary = export_runs(uri, "hand-made", tmp_path / "archive")
    assert summary.copied == [done]
    assert summary.left_out == [running]
    text = (tmp_path / "archive" / "runs" / f"{done}.json").read_text()
    json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))

    target = f"sqlite:///{tmp_path / 'target.db'}"
    import_runs(target, "copy", tmp_path / "archive")
    (copy,) = all_runs(MlflowClient(tracking_uri=target), "copy")
    values = [m.value for m in MlflowClient(tracking_uri=target).get_metric_history(copy.info.run_id, "val_ppl")]
    assert math.isnan(values[0])
    assert values[1] == 12.5


def write_archive(folder: Path, run_text: str | None, version: int = 1) -> Path:
    (folder / "runs").mkdir(parents=True)
    (folder / "archive.json").write_text(json.dumps({"format": "saffu-run-archive", "version": version, "experiment": "x"}))
    if run_text is not None:
        (folder / "runs" / "abc.json").write_text(run_text)
    return folder


BAD_ARCHIVES = {
    "missing folder": (lambda tmp: tmp / "nowhere", "does not exist"),
    "not an archive": (lambda tmp: (tmp / "a").mkdir() or (tmp / "a" / "archive.json").write_text("{}") and tmp / "a",
                       "is not a saffu run archive"),
    "newer version": (lambda tmp: write_archive(tmp / "a", None, version=2), "has format version 2"),
    "cut-off run file": (lambda tmp: write_archive(tmp / "a", '{"run_id": "abc", "sta'), "cannot be read as JSON"),
    "running run": (lambda tmp: write_archive(tmp / "a", json.dumps(
        {"run_id": "abc", "status": "RUNNING", "params": {}, "tags": {}, "metrics": {}})), "bad status 'RUNNING'"),
    "renamed run file": (lambda tmp: write_archive(tmp / "a", json.dumps(
        {"run_id": "xyz", "status": "FINISHED", "params": {}, "tags": {}, "metrics": {}})), "holds run xyz, not abc"),
}


@pytest.mark.parametrize("case", list(BAD_ARCHIVES))
def test_bad_archive_rejected(case, tmp_path, capsys) -> None:
    make, message = BAD_ARCHIVES[case]
    folder = make(tmp_path)
    target = tmp_path / "target.db"
    assert main(["import", "--tracking-uri", f"sqlite:///{target}", str(folder)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: "), err
    assert message in err, err
    assert "Traceback" not in err
    assert not target.exists()


def test_bad_export_arguments_rejected(real_sweep_store, tmp_path, capsys) -> None:
    (tmp_path / "file").write_text("x")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    cases = [
        (["--tracking-uri", real_sweep_store.tracking_uri, "--experiment", "nope", "--out", str(tmp_path / "o")],
         "experiment 'nope' not found"),
        (["--tracking-uri", f"sqlite:///{tmp_path / 'missing.db'}", "--out", str(tmp_path / "o")], "missing.db"),
        (["--tracking-uri", real_sweep_store.tracking_uri, "--out", str(tmp_path / "file")], "is a file"),
        (["--tracking-uri", real_sweep_store.tracking_uri, "--out", str(tmp_path / "other")], "holds no archive.json"),
    ]
    for arguments, message in cases:
        assert main(["export", *arguments]) == 1
        err = capsys.readouterr().err
        assert message in err, err
        assert "Traceback" not in err
    assert not (tmp_path / "missing.db").exists()
    assert not (tmp_path / "o").exists()
