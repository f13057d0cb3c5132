"""The throughput reader on driver logs in the sweep driver's own line format."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from sweep_throughput import format_table, parse_launches  # noqa: E402

# One launch of 8 jobs that ran for 30 minutes, in the lines the driver writes.
ONE_LAUNCH = """\
[2026-12-05 12:00:00,000][HYDRA] sweep frontier: 8 jobs, output in multirun/2026-12-05/12-00-00
[2026-12-05 12:00:30,000][HYDRA] submitting 8 jobs (0 skipped as already finished)
[2026-12-05 12:15:00,000][HYDRA] sweep progress: 4/8 done (4 finished, 0 failed), 2 running, 4 left
[2026-12-05 12:30:00,000][HYDRA] sweep frontier done: 8 finished, 0 skipped (already finished), 0 failed
"""

# A launch stopped after 10 minutes, then a relaunch that ran the rest in 20 minutes.
TWO_LAUNCHES = """\
[2026-12-05 09:00:00,000][HYDRA] sweep roadmap: 6 jobs, output in multirun/2026-12-05/09-00-00
[2026-12-05 09:00:10,000][HYDRA] submitting 6 jobs (0 skipped as already finished)
[2026-12-05 09:10:00,000][HYDRA] sweep progress: 2/6 done (2 finished, 0 failed), 2 running, 4 left
[2026-12-05 10:00:00,000][HYDRA] sweep roadmap: 6 jobs, output in multirun/2026-12-05/10-00-00
[2026-12-05 10:00:10,000][HYDRA] submitting 4 jobs (2 skipped as already finished)
[2026-12-05 10:20:00,000][HYDRA] sweep roadmap done: 3 finished, 2 skipped (already finished), 1 failed
"""


def test_one_launch_totals():
    launches = parse_launches(ONE_LAUNCH.splitlines())
    assert len(launches) == 1
    assert launches[0].completed
    assert launches[0].seconds == 1800
    table = format_table(launches)
    assert "| 1 | 2026-12-05 12:00 | 30.0 | 8 | 0 | 8 | 0 | yes |" in table
    assert table.endswith("Total: 1 launch, 0.50 hours, 8 jobs finished, 16.0 jobs per hour.")


def test_interrupted_launch_then_relaunch():
    first, second = parse_launches(TWO_LAUNCHES.splitlines())
    assert not first.completed
    assert (first.submitted, first.finished, first.failed) == (6, 2, 0)
    assert second.completed
    assert (second.submitted, second.skipped, second.finished, second.failed) == (4, 2, 3, 1)
    # The hour between the launches is left out: 10 + 20 minutes, 5 jobs finished.
    assert format_table([first, second]).endswith("Total: 2 launches, 0.50 hours, 5 jobs finished, 10.0 jobs per hour.")


# An Optuna study's launch: 4 trials, 3 of them new jobs (one failed), one reusing a run.
STUDY_LAUNCH = """\
[2026-12-05 13:20:00,000][HYDRA] sweep optuna: 250 jobs, output in multirun/2026-12-05/13-20-00
[2026-12-05 13:20:05,000][HYDRA] study optuna-abc (tpe sampler, storage sqlite:///optuna.db): 0 of 4 trials COMPLETE, up to 4 jobs at once
[2026-12-05 13:24:00,000][HYDRA] study optuna-abc: 3/4 trials COMPLETE; this launch ran 3 jobs, reused 1 FINISHED runs, 1 trials failed. Pareto front (2 trials, pareto_front.csv on run 0123):
"""


def test_study_launch_counts_jobs():
    (launch,) = parse_launches(STUDY_LAUNCH.splitlines())
    assert (launch.submitted, launch.skipped, launch.finished, launch.failed) == (3, 1, 2, 1)
    assert not launch.completed
    assert "| 1 | 2026-12-05 13:20 | 4.0 | 3 | 1 | 2 | 1 | no |" in format_table([launch])
