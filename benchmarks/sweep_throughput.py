"""Wall-clock and jobs per hour of a sweep run in one or more launches, from the driver's log.

    python sweep.py -m ... 2>&1 | tee -a sweep.log    # each launch appends to one file
    python benchmarks/sweep_throughput.py sweep.log

A launch starts at the driver's "sweep NAME: N jobs, output in ..." line and ends at its
last timestamped line: the summary (also that of a launch drained by SIGUSR1), the
interruption message, or, for a driver killed with SIGKILL, whatever it logged last. Its
finished and failed jobs come from its summary line, else from its last progress line. A
killed driver may have finished a job after its last line, so such a launch can show fewer
jobs than its store holds.

For a launch of an Optuna study, the summary line gives the jobs it ran ("to run"), the
FINISHED runs its trials reused ("skipped") and its failed trials; "finished" is the jobs
it ran minus those failed trials, and "completed" means the study reached its n_trials.

The total wall-clock adds the launches' durations and leaves out the time between them.
Jobs per hour divides the finished jobs of all launches by that total.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

# Hydra's default log format: "[2026-12-05 08:52:13,719][HYDRA] message".
LINE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3})\]\[[^\]]*\] (.*)$")
START = re.compile(r"^sweep (\S+): (\d+) jobs, output in ")
SUBMITTING = re.compile(r"^submitting (\d+) jobs \((\d+) skipped")
NOTHING_TO_DO = re.compile(r"^sweep \S+: all (\d+) jobs already have a FINISHED run")
PROGRESS = re.compile(r"^sweep progress: \d+/\d+ done \((\d+) finished, (\d+) failed\)")
SUMMARY = re.compile(r"^sweep \S+ done: (\d+) finished, (\d+) skipped \(already finished\), (\d+) failed")
# The summary of a launch that drained on SIGUSR1 and left jobs for the next launch.
DRAINED = re.compile(r"^sweep \S+ drained: (\d+) finished, (\d+) skipped \(already finished\), (\d+) failed")
# The summary of an Optuna study's launch (`+sweep=optuna`).
STUDY_SUMMARY = re.compile(
    r"^study \S+: (\d+)/(\d+) trials COMPLETE; this launch ran (\d+) jobs, reused (\d+) FINISHED runs, (\d+) trials failed"
)


@dataclass
class Launch:
    """One launch of a sweep: its time span and the jobs it ran."""

    name: str
    start: datetime
    end: datetime
    submitted: int = 0
    skipped: int = 0
    finished: int = 0
    failed: int = 0
    completed: bool = False

    @property
    def seconds(self) -> float:
        """Wall-clock seconds from the launch's first line to its last."""
        return (self.end - self.start).total_seconds()


def parse_launches(lines: list[str]) -> list[Launch]:
    """Split a driver log into its launches, in the order they appear."""
    launches: list[Launch] = []
    for line in lines:
        match = LINE.match(line.rstrip("\n"))
        if match is None:
            continue
        stamp = datetime.strptime(f"{match.group(1)}.{match.group(2)}", "%Y-%m-%d %H:%M:%S.%f")
        message = match.group(3)
        start = START.match(message)
        if start:
            launches.append(Launch(name=start.group(1), start=stamp, end=stamp))
            continue
        if not launches:
            continue
        launch = launches[-1]
        launch.end = stamp
        if found := SUBMITTING.match(message):
            launch.submitted, launch.skipped = int(found.group(1)), int(found.group(2))
        elif found := NOTHING_TO_DO.match(message):
            launch.skipped, launch.completed = int(found.group(1)), True
        elif (found := PROGRESS.match(message)) and not launch.completed:
            launch.finished, launch.failed = int(found.group(1)), int(found.group(2))
        elif found := SUMMARY.match(message):
            launch.finished, launch.skipped, launch.failed = (int(group) for group in found.groups())
            launch.completed = True
        elif found := DRAINED.match(message):
            launch.finished, launch.skipped, launch.failed = (int(group) for group in found.groups())
        elif found := STUDY_SUMMARY.match(message):
            complete, n_trials, ran, reused, failed = (int(group) for group in found.groups())
            launch.submitted, launch.skipped, launch.failed = ran, reused, failed
            launch.finished = max(0, ran - failed)
            launch.completed = complete >= n_trials
    return launches


def format_table(launches: list[Launch]) -> str:
    """Return a Markdown table of the launches and their total."""
    rows = [
        "| launch | started | minutes | to run | skipped | finished | failed | completed |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for number, launch in enumerate(launches, 1):
        # A launch without a summary was interrupted, killed, or is still running.
        completed = "yes" if launch.completed else "no"
        rows.append(
            f"| {number} | {launch.start:%Y-%m-%d %H:%M} | {launch.seconds / 60:.1f} | {launch.submitted} | "
            f"{launch.skipped} | {launch.finished} | {launch.failed} | {completed} |"
        )
    seconds = sum(launch.seconds for launch in launches)
    finished = sum(launch.finished for launch in launches)
    per_hour = finished / (seconds / 3600) if seconds > 0 else float("nan")
    rows.append("")
    noun = "launch" if len(launches) == 1 else "launches"
    rows.append(f"Total: {len(launches)} {noun}, {seconds / 3600:.2f} hours, {finished} jobs finished, {per_hour:.1f} jobs per hour.")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logs", nargs="+", type=Path, help="driver logs, read in the order given")
    args = parser.parse_args(argv)
    lines: list[str] = []
    for path in args.logs:
        try:
            lines.extend(path.read_text(encoding="utf-8", errors="replace").splitlines())
        except OSError as error:
            sys.exit(f"failed to read the driver log {path}: {error.strerror}; pass the file the sweep's output went to")
    launches = parse_launches(lines)
    if not launches:
        sys.exit("no sweep launch found: the logs have no 'sweep NAME: N jobs, output in ...' line")
    print(format_table(launches))


if __name__ == "__main__":
    main()
