"""Moving runs between MLflow stores with `python -m analysis.archive`: the runs of a real
sweep exported, imported into a new store, imported again, and a killed import completed."""

from __future__ import annotations

import json
import math
import re
import signal
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from analysis.archive import TAG_ARCHIVED_RUN_ID, export_runs, import_runs, main
from analysis.load import load_runs
from sweep_helpers import INTERRUPTED, REPO, read_only, run_sweep, signal_after_start, stop_if_running
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
    """The archive contains the sweep's parent run, its three finished and one failed job runs,
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


def test_export_of_copies_updates_archive(archive, real_sweep_store, tmp_path) -> None:
    """A sweep continued in a store that imported the archive, then exported into that
    archive again: each copy updates its original's file, a new job is added, and the new
    job's parent link names the original parent run."""
    import shutil

    experiment = real_sweep_store.experiment
    folder = tmp_path / "runs"
    shutil.copytree(archive, folder)
    before = json.loads((folder / "archive.json").read_text())["runs"]
    uri = f"sqlite:///{tmp_path / 'continued.db'}"
    import_runs(uri, experiment, folder)
    client = MlflowClient(tracking_uri=uri)
    (parent_copy,) = [run for run in all_runs(client, experiment) if run.data.tags.get("saffu.role") == "sweep"]
    new_job = client.create_run(
        parent_copy.info.experiment_id, run_name="next launch",
        tags={"saffu.role": "job", "mlflow.parentRunId": parent_copy.info.run_id},
    ).info.run_id
    client.log_metric(new_job, "val_ppl", 123.0)
    client.set_terminated(new_job, "FINISHED")

    summary = export_runs(uri, experiment, folder)
    after = json.loads((folder / "archive.json").read_text())["runs"]
    assert sorted(after) == sorted([*before, new_job])
    assert sorted(summary.copied) == sorted(after)
    assert sorted(path.stem for path in (folder / "runs").iterdir()) == sorted(after)
    record = json.loads((folder / "runs" / f"{new_job}.json").read_text())
    assert record["tags"]["mlflow.parentRunId"] == parent_copy.data.tags[TAG_ARCHIVED_RUN_ID]
    assert record["tags"]["mlflow.parentRunId"] in before


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


def write_archive(folder: Path, run_text: str | None, **header: object) -> Path:
    """Write an archive with one run file, ``abc.json``, holding `run_text`."""
    (folder / "runs").mkdir(parents=True)
    fields = {"format": "saffu-run-archive", "version": 1, "experiment": "x", "complete": True, "runs": ["abc"]}
    (folder / "archive.json").write_text(json.dumps({**fields, **header}))
    if run_text is not None:
        (folder / "runs" / "abc.json").write_text(run_text)
    return folder


def run_text(**changes: object) -> str:
    record = {"run_id": "abc", "run_name": "job", "status": "FINISHED", "start_time": 1, "end_time": 2,
              "params": {}, "tags": {}, "metrics": {"val_ppl": [[0, 1, 12.5]]}, **changes}
    return json.dumps(record)


def archive_with_link(tmp: Path) -> Path:
    folder = write_archive(tmp / "a", run_text())
    (folder / "artifacts" / "abc").mkdir(parents=True)
    (folder / "artifacts" / "abc" / "hostname").symlink_to("/etc/hostname")
    return folder


BAD_ARCHIVES = {
    "missing folder": (lambda tmp: tmp / "nowhere", "does not exist"),
    "file": (lambda tmp: (tmp / "f").write_text("x") and tmp / "f", "is a file"),
    "not an archive": (lambda tmp: write_archive(tmp / "a", None, format="other"), "is not the header of a saffu run archive"),
    "newer version": (lambda tmp: write_archive(tmp / "a", run_text(), version=2), "has format version 2"),
    "version true": (lambda tmp: write_archive(tmp / "a", run_text(), version=True), "has format version True"),
    "unfinished export": (lambda tmp: write_archive(tmp / "a", run_text(), complete=False), "did not finish"),
    "listed run missing": (lambda tmp: write_archive(tmp / "a", None), "abc.json is missing"),
    "cut-off run file": (lambda tmp: write_archive(tmp / "a", '{"run_id": "abc", "sta'), "cannot be read as JSON"),
    "running run": (lambda tmp: write_archive(tmp / "a", run_text(status="RUNNING")), "bad status 'RUNNING'"),
    "text metric value": (lambda tmp: write_archive(tmp / "a", run_text(metrics={"m": [[4, 5, "hello"]]})), "bad metric 'm'"),
    "text start time": (lambda tmp: write_archive(tmp / "a", run_text(start_time="yesterday")), "bad start_time"),
    "list param": (lambda tmp: write_archive(tmp / "a", run_text(params={"a": [1, 2]})), "bad params"),
    "renamed run file": (lambda tmp: write_archive(tmp / "a", run_text(run_id="xyz")), "holds run xyz, not abc"),
    "symbolic link": (archive_with_link, "is a symbolic link"),
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
    write_archive(tmp_path / "archive-of-x", run_text())
    cases = [
        (["--tracking-uri", real_sweep_store.tracking_uri, "--experiment", "nope", "--out", str(tmp_path / "o")],
         "experiment 'nope' not found"),
        (["--tracking-uri", f"sqlite:///{tmp_path / 'missing.db'}", "--out", str(tmp_path / "o")], "missing.db"),
        (["--tracking-uri", real_sweep_store.tracking_uri, "--out", str(tmp_path / "file")], "is a file"),
        (["--tracking-uri", real_sweep_store.tracking_uri, "--out", str(tmp_path / "other")], "holds no archive.json"),
        (["--tracking-uri", real_sweep_store.tracking_uri, "--out", str(tmp_path / "archive-of-x")],
         "holds the archive of experiment 'x'"),
    ]
    for arguments, message in cases:
        assert main(["export", *arguments]) == 1
        err = capsys.readouterr().err
        assert message in err, err
        assert "Traceback" not in err
    assert not (tmp_path / "missing.db").exists()
    assert not (tmp_path / "o").exists()


def test_interrupted_export_is_refused(real_sweep_store, tmp_path, capsys) -> None:
    """An export that stops after its first run file leaves an archive that import refuses
    until the export is run again."""
    out = tmp_path / "runs-archive"
    export_runs(real_sweep_store.tracking_uri, real_sweep_store.experiment, out)
    first = sorted((out / "runs").iterdir())[0]
    first.unlink()
    first.mkdir()  # The export cannot write this run file again, and stops there.
    assert main(["export", "--tracking-uri", real_sweep_store.tracking_uri, "--out", str(out)]) == 1
    capsys.readouterr()
    target = tmp_path / "target.db"
    assert main(["import", "--tracking-uri", f"sqlite:///{target}", str(out)]) == 1
    assert "did not finish" in capsys.readouterr().err
    first.rmdir()
    assert main(["export", "--tracking-uri", real_sweep_store.tracking_uri, "--out", str(out)]) == 0
    assert main(["import", "--tracking-uri", f"sqlite:///{target}", str(out)]) == 0
    assert len(all_runs(MlflowClient(tracking_uri=f"sqlite:///{target}"), real_sweep_store.experiment)) == 5


def test_later_import_updates_copies(tmp_path) -> None:
    """A job exported while its sweep's parent run still ran gets its parent link, and a
    parent run that a relaunch reopened and ended gets the new status, on the next import."""
    source = f"sqlite:///{tmp_path / 'source.db'}"
    client = MlflowClient(tracking_uri=source)
    experiment_id = client.create_experiment("sweep")
    parent = client.create_run(experiment_id, run_name="sweep", tags={"saffu.role": "sweep"}).info.run_id
    job = client.create_run(experiment_id, run_name="job", tags={"saffu.role": "job", "mlflow.parentRunId": parent})
    client.log_metric(job.info.run_id, "val_ppl", 20.0)
    client.set_terminated(job.info.run_id, "FINISHED")
    target = f"sqlite:///{tmp_path / 'target.db'}"
    export_runs(source, "sweep", tmp_path / "archive")
    import_runs(target, "sweep", tmp_path / "archive")

    client.set_terminated(parent, "KILLED")
    export_runs(source, "sweep", tmp_path / "archive")
    summary = import_runs(target, "sweep", tmp_path / "archive")
    assert summary.copied == [parent]
    assert summary.updated == [job.info.run_id]

    client.update_run(parent, status="RUNNING")  # A relaunch reopens the parent run,
    client.log_metric(parent, "jobs_finished", 1.0)
    client.set_terminated(parent, "FINISHED")  # and ends it when every job has finished.
    export_runs(source, "sweep", tmp_path / "archive")
    summary = import_runs(target, "sweep", tmp_path / "archive")
    assert summary.updated == [parent]

    copies = {run.data.tags["saffu.role"]: run for run in all_runs(MlflowClient(tracking_uri=target), "sweep")}
    assert copies["job"].data.tags["mlflow.parentRunId"] == copies["sweep"].info.run_id
    assert copies["sweep"].info.status == "FINISHED"
    assert copies["sweep"].data.metrics["jobs_finished"] == 1.0


def test_import_waits_for_a_live_import(archive, real_sweep_store, tmp_path, capsys) -> None:
    """A copy still RUNNING under a live importer (this test's process) is left alone, and
    the import stops with a message instead of deleting it."""
    import psutil

    from analysis.archive import TAG_IMPORTER

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    import_runs(uri, real_sweep_store.experiment, archive)
    client = MlflowClient(tracking_uri=uri)
    victim = all_runs(client, real_sweep_store.experiment)[0]
    client.update_run(victim.info.run_id, status="RUNNING")
    me = psutil.Process()
    client.set_tag(victim.info.run_id, TAG_IMPORTER, f"{socket.gethostname()}:{me.pid}:{me.create_time():.3f}")

    assert main(["import", "--tracking-uri", uri, "--experiment", real_sweep_store.experiment, str(archive)]) == 1
    assert f"another import (PID {me.pid}) is copying runs" in capsys.readouterr().err
    assert client.get_run(victim.info.run_id).info.lifecycle_stage == "active"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def test_signal_while_starting_stops_cleanly(real_sweep_store, tmp_path, signum) -> None:
    """SIGTERM or Ctrl-C while `python -m analysis.archive` imports MLflow: status 130 and
    one line, no traceback. With Python's defaults, SIGTERM ends it with status 143 and
    Ctrl-C in a traceback."""
    out = tmp_path / "runs-archive"
    command = [sys.executable, "-m", "analysis.archive", "export", "--tracking-uri", real_sweep_store.tracking_uri,
               "--experiment", real_sweep_store.experiment, "--out", str(out)]
    for delay in (0.1, 0.3, 0.6):
        process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            signal_after_start(process, signum, delay)
            output, _ = process.communicate(timeout=120)
        finally:
            stop_if_running(process)
        assert process.returncode in INTERRUPTED, (delay, output)
        assert "Traceback" not in output, delay
        assert output.strip().splitlines()[-1] in (
            "error: interrupted while starting; nothing was copied",
            "error: export interrupted; run the same command again to complete it",
        ), (delay, output)
        assert not out.exists() or json.loads((out / "archive.json").read_text())["complete"] is False, delay


def test_read_only_store_rejected(archive, tmp_path, capsys) -> None:
    """An import into a store file that cannot be written stops with one line before it
    copies anything, instead of after MLflow's retries."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["import", "--tracking-uri", uri, "--experiment", "copy", str(archive)]) == 0
    capsys.readouterr()
    with read_only(tmp_path / "mlflow.db"):
        assert main(["import", "--tracking-uri", uri, "--experiment", "second", str(archive)]) == 1
    assert capsys.readouterr().err.strip() == (
        f"error: --tracking-uri {uri}: {tmp_path / 'mlflow.db'} is read-only; make it writable "
        f"(chmod u+w {tmp_path / 'mlflow.db'}) or copy the store to a writable file"
    )
    assert [e.name for e in MlflowClient(tracking_uri=uri).search_experiments()] == ["copy", "Default"]
