"""Serve the MLflow UI over the store of a real small sweep and check in headless Chromium that it shows
the sweep's parent run, its child runs and their perplexity and parameter-count columns."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from urllib.parse import quote

import pytest
from mlflow.tracking import MlflowClient
from test_analysis_store import StoreInfo

REPO_ROOT = Path(__file__).resolve().parent.parent
DOCS_SCREENSHOT = REPO_ROOT / "docs" / "images" / "mlflow-sweep-runs.png"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
SERVER_START_TIMEOUT_S = 180
# Key of the shared view that the test stores on the experiment; see jobs_view_url.
SHARE_KEY = "saffu-dashboard-test"


def find_chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def chromium() -> str:
    path = find_chromium()
    if path is None:
        reason = f"headless Chromium not found (looked for {', '.join(CHROMIUM_NAMES)}); install it with apt-get install chromium"
        if os.environ.get("CI"):
            pytest.fail(reason + "; CI must run the dashboard test")
        pytest.skip(reason)
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def served_store(real_sweep_store: StoreInfo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, StoreInfo]]:
    """Serve a copy of the store (the test adds an experiment tag to it) and yield the base URL."""
    work = tmp_path_factory.mktemp("mlflow-server")
    copy = work / "mlflow.db"
    # The backup API also copies what the write-ahead log contains, which a file copy could miss.
    with closing(sqlite3.connect(real_sweep_store.path)) as source, closing(sqlite3.connect(copy)) as target:
        source.backup(target)
    store = StoreInfo(f"sqlite:///{copy}", real_sweep_store.experiment, real_sweep_store.sweep_id, copy, None)
    port = free_port()
    log_path = work / "server.log"
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")  # the UI needs no job runner processes
    with log_path.open("w") as log_file:
        # A new session makes the server the leader of its own process group, so the group
        # id is its PID and stopping that group also stops its uvicorn worker.
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
             "--backend-store-uri", store.tracking_uri, "--default-artifact-root", (work / "artifacts").as_uri(),
             "--workers", "1"],
            cwd=work, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(base_url, server, log_path)
        yield base_url, store
    finally:
        stop_process_group(server)


def wait_for_health(base_url: str, server: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"mlflow server exited with code {server.returncode}; log:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{base_url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1)
    pytest.fail(f"mlflow server at {base_url} not healthy after {SERVER_START_TIMEOUT_S} s; log:\n{log_path.read_text()[-3000:]}")


def stop_process_group(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=15)
    try:
        # Workers that outlive the server's own exit are still in its group.
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_chromium(chromium: str, url: str, profile: Path, screenshot: Path | None = None,
                 budget_ms: int = 20_000) -> str:
    """Load `url` in headless Chromium and return the DOM after `budget_ms` of virtual time."""
    profile.mkdir(parents=True, exist_ok=True)
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--window-size=1800,1100", f"--virtual-time-budget={budget_ms}"]
    if screenshot is not None:
        result = subprocess.run([chromium, *flags, f"--screenshot={screenshot}", url], capture_output=True,
                                text=True, timeout=180)
        assert screenshot.is_file(), f"Chromium wrote no screenshot; stderr:\n{result.stderr[-2000:]}"
    result = subprocess.run([chromium, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, f"Chromium failed with code {result.returncode}:\n{result.stderr[-2000:]}"
    return result.stdout


def dom_with(chromium: str, url: str, profile: Path, expected: list[str], screenshot: Path | None = None) -> str:
    """Return the page's DOM, loading it again with more virtual time while an expected text is missing."""
    dom = ""
    for budget_ms in (20_000, 60_000):
        dom = run_chromium(chromium, url, profile, screenshot, budget_ms)
        if all(text in dom for text in expected):
            break
    return dom


def share_view(store: StoreInfo, state: dict[str, object]) -> str:
    """Store an MLflow UI shared view on the experiment and return the experiment id.

    The MLflow UI (checked with 3.17) loads a view from the experiment tag
    ``mlflow.sharedViewState.<key>`` when the URL has ``viewStateShareKey=<key>``;
    this is how its Share button works, and the only way to choose columns from a URL.
    """
    client = MlflowClient(tracking_uri=store.tracking_uri)
    experiment = client.get_experiment_by_name(store.experiment)
    assert experiment is not None
    client.set_experiment_tag(experiment.experiment_id, f"mlflow.sharedViewState.{SHARE_KEY}", json.dumps(state))
    return experiment.experiment_id


def test_dashboard_shows_sweep(chromium: str, served_store: tuple[str, StoreInfo], tmp_path: Path) -> None:
    base_url, store = served_store
    client = MlflowClient(tracking_uri=store.tracking_uri)
    experiment = client.get_experiment_by_name(store.experiment)
    assert experiment is not None
    sweep_filter = f"tags.`saffu.sweep_id` = '{store.sweep_id}'"
    parents = client.search_runs([experiment.experiment_id], f"{sweep_filter} and tags.`saffu.role` = 'sweep'")
    assert parents, "the store has no parent run for the sweep"
    children = client.search_runs([experiment.experiment_id], f"{sweep_filter} and tags.`saffu.role` = 'job'",
                                  order_by=["metrics.val_ppl ASC"])
    finished = [run for run in children if run.info.status == "FINISHED" and "n_params" in run.data.metrics]
    assert finished, "the sweep has no finished child run"
    assert all(run.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id for run in children)

    # The sweep's runs, as the UI shows them by default: the parent run with its children nested.
    sweep_url = f"{base_url}/#/experiments/{experiment.experiment_id}/runs?searchFilter={quote(sweep_filter)}"
    sweep_dom = dom_with(chromium, sweep_url, tmp_path / "profile-sweep", [parents[0].info.run_name],
                         screenshot=tmp_path / "sweep.png")
    assert parents[0].info.run_name in sweep_dom

    # The child runs with their metric columns, from a shared view that selects them.
    share_view(store, {
        "searchFilter": f"{sweep_filter} and tags.`saffu.role` = 'job'",
        "orderByKey": "metrics.`val_ppl`",
        "orderByAsc": True,
        "selectedColumns": ["metrics.`val_ppl`", "metrics.`n_params`", "params.`model.block_size`",
                            "params.`model.radius`", "params.`model.experts.kind`", "tags.`saffu.sweep_id`"],
    })
    jobs_url = f"{base_url}/#/experiments/{experiment.experiment_id}/runs?viewStateShareKey={SHARE_KEY}"
    # Rows beyond the first screen may not be rendered, so only the best 10 are checked.
    shown = finished[:10]
    expected = ["val_ppl", "n_params", *[run.info.run_name for run in shown]]
    screenshot = tmp_path / "sweep-jobs.png"
    jobs_dom = dom_with(chromium, jobs_url, tmp_path / "profile-jobs", expected, screenshot=screenshot)
    for text in expected:
        assert text in jobs_dom, text
    for run in shown:
        n_params = run.data.metrics["n_params"]
        if float(n_params).is_integer():
            assert f">{int(n_params)}<" in jobs_dom, (run.info.run_name, n_params)

    assert screenshot.stat().st_size > 10_000
    # The docs' copy is refreshed on request only, so a test run leaves the checkout clean.
    if os.environ.get("SAFFU_UPDATE_DOCS_IMAGES") == "1":
        DOCS_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(screenshot, DOCS_SCREENSHOT)
