"""Write the Pareto-efficient variants of a sweep as a sweep file, to run them again.

Usage::

    python -m analysis.frontier --tracking-uri sqlite:///mlflow.db --experiment NAME \\
        [--sweep-id ID] [--fixed OVERRIDE ...] --out sweeps/frontier.yaml

reads the finished SAFFU jobs and takes the Pareto front of validation perplexity against
parameter count (:func:`analysis.pareto.pareto_front`). It writes a sweep definition whose
``variants`` are the front's factor settings: block size, radius, expert inputs, layers,
and the other factors that vary among the jobs. ``--fixed`` overrides go to every job. This is
the second stage of a sweep run in two stages: the explicit solve of every config first
(``train.enabled=false train.bp_only=false``), then fine-tuning and the bp-only baseline
for the front only::

    python sweep.py -m --config-dir DIR +sweep=frontier data=folder data.dir=PATH

where ``DIR/sweep/frontier.yaml`` is the written file (or write it to ``sweeps/``).
"""

from __future__ import annotations

import sys

from saffu.signals import exit_quietly_when_stopped, handle_stop_signals

if __name__ == "__main__":
    handle_stop_signals()

# Ctrl-C or SIGTERM while MLflow and pandas load ends the command with one line.
with exit_quietly_when_stopped("interrupted while starting; nothing was written"):
    import argparse
    import logging
    import math
    from pathlib import Path

    import pandas as pd
    import yaml

    from analysis.effects import FACTORS, saffu_jobs, varied_factors
    from analysis.export import write_text
    from analysis.load import AnalysisError, add_store_arguments, as_options, load_runs
    from analysis.pareto import pareto_front

log = logging.getLogger(__name__)

# Columns whose values are option names of a config group: `experts` contains onehot,
# bitcode32, ..., the names of the files in conf/model/experts.
GROUP_COLUMNS = {"experts": "model/experts"}


def front_variants(jobs: pd.DataFrame) -> tuple[list[list[str]], pd.DataFrame]:
    """Return the override list of each SAFFU job on the front of val_ppl against n_params,
    in increasing parameter count, and the front's rows."""
    rows = saffu_jobs(jobs)
    front = pareto_front(rows).front
    columns = [FACTORS[name] for name in varied_factors(rows) if FACTORS[name] != "phase"]
    for always in ("model.block_size", "model.radius", "experts", "model.layers"):
        if always in rows.columns and always not in columns:
            columns.append(always)
    variants = []
    for _, row in front.iterrows():
        overrides = []
        for column in columns:
            value = row[column]
            if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
                continue
            key = GROUP_COLUMNS.get(column, column)
            overrides.append(f"{key}={_override_value(value)}")
        variants.append(overrides)
    return variants, front


def _override_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def sweep_text(variants: list[list[str]], fixed: list[str], front: pd.DataFrame, source: str) -> str:
    """Return the YAML text of a sweep file with `variants`, `fixed` and a comment per variant."""
    lines = [
        f"# The Pareto-efficient variants of {source} (validation perplexity against parameters),",
        "# written by python -m analysis.frontier. Each variant is one job.",
        "variants:",
    ]
    for overrides, (_, row) in zip(variants, front.iterrows()):
        lines.append(f"  # {int(row['n_params']):,} parameters, val_ppl {row['val_ppl']:.2f}")
        lines.append("  - " + yaml.safe_dump(overrides, default_flow_style=True, width=10_000).strip())
    lines.append("fixed: " + yaml.safe_dump(list(fixed), default_flow_style=True, width=10_000).strip())
    lines.append("max_retries: 1")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.frontier", description=__doc__.splitlines()[0],
    )
    add_store_arguments(parser)
    parser.add_argument("--fixed", nargs="*", default=[], help="overrides for every job, e.g. train.enabled=true")
    parser.add_argument("--out", required=True, type=Path, help="the sweep file to write (.yaml)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    try:
        runs = load_runs(args.tracking_uri, args.experiment, args.sweep_id)
    except AnalysisError as error:
        print(f"error: {as_options(str(error))}", file=sys.stderr)
        return 1
    variants, front = front_variants(runs.jobs)
    if not variants:
        print(f"error: experiment {args.experiment!r} has no finished SAFFU job with finite val_ppl and n_params",
              file=sys.stderr)
        return 1
    text = sweep_text(variants, args.fixed, front, f"experiment {args.experiment}")
    try:
        write_text(text, args.out)
    except OSError as error:
        print(f"error: failed to write {args.out}: {error}", file=sys.stderr)
        return 1
    log.info("wrote %d variants to %s", len(variants), args.out)
    return 0


if __name__ == "__main__":
    with exit_quietly_when_stopped("interrupted; run the same command again to write the file"):
        sys.exit(main())
