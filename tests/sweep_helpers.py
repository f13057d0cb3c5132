"""Helpers for the sweep tests: a small corpus slice, running sweep.py, reading the store."""

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
SWEEP = REPO / "sweep.py"
# The exit status of a program stopped by Ctrl-C or SIGTERM, as subprocess reports it: 130,
# or -2 where CPython ended the process with SIGINT after it exited with status 130. CPython
# does so when the KeyboardInterrupt was raised inside code that exec() ran from a string,
# as dataclasses does while a module is imported. A shell reports 130 for both.
INTERRUPTED = (130, -signal.SIGINT)

# Overrides that make every job small: a corpus slice, a 512-token vocabulary, one epoch.
SMALL_JOB = [
    "data.max_train_tokens=20000",
    "data.max_eval_tokens=4000",
    "tokenizer.vocab_size=512",
    "train.epochs=1",
]


def write_corpus_slice(source: Path, target: Path, train_chars: int = 300_000, eval_chars: int = 40_000) -> Path:
    """Write the first lines of each split of a real corpus to `target`, cut at line ends."""
    target.mkdir(parents=True, exist_ok=True)
    for name, size in (("train", train_chars), ("valid", eval_chars), ("test", eval_chars)):
        text = (source / f"{name}.txt").read_text(encoding="utf-8")[:size]
        (target / f"{name}.txt").write_text(text[: text.rfind("\n") + 1], encoding="utf-8")
    return target


def write_gated_job(folder: Path) -> None:
    """Write the module ``gated_job`` to `folder`: its ``run_job`` waits until the file
    ``gate`` exists in the folder named by the environment variable GATE_DIR, then runs the
    real job. A test uses it to hold jobs while it sends signals to the driver."""
    (folder / "gated_job.py").write_text(
        "import os\n"
        "import time\n"
        "from pathlib import Path\n\n"
        "from saffu.job import run_job as real_run_job\n\n\n"
        "def run_job(cfg, log_metric):\n"
        "    while not (Path(os.environ['GATE_DIR']) / 'gate').exists():\n"
        "        time.sleep(0.5)\n"
        "    return real_run_job(cfg, log_metric=log_metric)\n"
    )


def start_sweep(command: list[str], cwd: Path, log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start a sweep driver in the background, its stdout and stderr going to `log_path`."""
    with log_path.open("w") as out:
        return subprocess.Popen(command, cwd=cwd, env=env or sweep_env(), stdout=out, stderr=subprocess.STDOUT)


def signal_after_start(process: subprocess.Popen, signum: int, delay: float) -> None:
    """Send `signum` to `process` `delay` seconds after the program started its own code,
    that is once the process catches SIGTERM (bit 15 of SigCgt in /proc/PID/status): the
    programs install that handler before their slow imports."""
    deadline = time.monotonic() + 60
    while True:
        status = Path(f"/proc/{process.pid}/status").read_text()
        caught = int(next(line for line in status.splitlines() if line.startswith("SigCgt:")).split()[1], 16)
        if caught & (1 << (signal.SIGTERM - 1)):
            break
        assert process.poll() is None, "the program exited before it caught SIGTERM"
        assert time.monotonic() < deadline, "the program did not catch SIGTERM within 60 s"
        time.sleep(0.002)
    time.sleep(delay)
    process.send_signal(signum)


def stop_if_running(process: subprocess.Popen) -> None:
    """SIGKILL `process` and its children when it is still running (a test that failed early)."""
    if process.poll() is None:
        kill_processes([psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)])


def wait_for(condition, process: subprocess.Popen, log: Path, message: str, timeout: float = 300) -> None:
    """Poll `condition` every half second until it holds; fail with `message` and the end of
    `log` when `process` exits first or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"{message}; the process exited:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"{message} within {timeout:.0f} s:\n{log.read_text()[-4000:]}"
        time.sleep(0.5)


def sweep_command(tmp_path: Path, corpus: Path, *overrides: str) -> list[str]:
    """Build a `python sweep.py -m` command whose outputs and store live under `tmp_path`."""
    return [
        sys.executable, str(SWEEP), "-m",
        "data=folder", f"data.dir={corpus}", *SMALL_JOB,
        f"hydra.sweep.dir={tmp_path / 'multirun'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        *overrides,
    ]


def sweep_env(extra_pythonpath: Path | None = None, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, **(extra or {})}
    env["HYDRA_FULL_ERROR"] = "0"
    if extra_pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(extra_pythonpath), env.get("PYTHONPATH")]))
    return env


def run_sweep(
    tmp_path: Path,
    corpus: Path,
    *overrides: str,
    timeout: float = 420,
    pythonpath: Path | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run a sweep to the end and return the CompletedProcess (stdout and stderr merged)."""
    return subprocess.run(
        sweep_command(tmp_path, corpus, *overrides),
        cwd=tmp_path, env=sweep_env(pythonpath, env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, timeout=timeout,
    )


def count_finished_jobs(db: Path) -> int:
    """Count FINISHED job runs by reading the SQLite store directly (safe while a sweep writes)."""
    return count_job_runs(db, "FINISHED")


def count_job_runs(db: Path, status: str | None = None) -> int:
    """Count job runs, of any status or of `status`, by reading the SQLite store directly."""
    if not db.exists():
        return 0
    connection = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    query = (
        "SELECT COUNT(*) FROM runs JOIN tags ON tags.run_uuid = runs.run_uuid "
        "WHERE tags.key = 'saffu.role' AND tags.value = 'job'"
    )
    try:
        if status is None:
            return connection.execute(query).fetchone()[0]
        return connection.execute(query + " AND runs.status = ?", (status,)).fetchone()[0]
    except sqlite3.OperationalError:
        return 0  # The schema is not there yet.
    finally:
        connection.close()


def kill_processes(processes: list[psutil.Process]) -> None:
    """SIGKILL processes that the test started. psutil checks each one's start time first, so
    a process id reused by another program is left alone."""
    for process in processes:
        try:
            if process.is_running():
                process.kill()
        except psutil.NoSuchProcess:
            pass


def job_runs(client, experiment_id: str) -> list:
    return client.search_runs([experiment_id], "tags.`saffu.role` = 'job'", max_results=1000)


def deleted_job_runs(client, experiment_id: str) -> list:
    from mlflow.entities import ViewType

    return client.search_runs(
        [experiment_id], "tags.`saffu.role` = 'job'", run_view_type=ViewType.DELETED_ONLY, max_results=1000
    )


@contextlib.contextmanager
def read_only(path: Path):
    """Make the file or folder `path` read-only inside the block, for this process too. Root
    ignores file modes, so as root it is made immutable (``chattr +i``) instead; the test is
    skipped where the file system cannot do that."""
    import pytest

    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(0o555 if path.is_dir() else 0o444)
        try:
            yield
        finally:
            path.chmod(mode)
        return
    chattr = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
    if chattr.returncode != 0 or os.access(path, os.W_OK):
        pytest.skip(f"cannot make {path} read-only for root: {chattr.stderr.strip() or 'chattr had no effect'}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)
