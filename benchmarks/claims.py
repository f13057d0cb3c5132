"""The claims tables: explicit-only, explicit+bp and bp-only beside Kneser-Ney and GPT-2.

    python benchmarks/claims.py epochs --corpus PATH/TO/CORPUS
    python benchmarks/claims.py wallclock --corpus PATH/TO/CORPUS --seconds 120
    python benchmarks/claims.py data --corpus PATH/TO/CORPUS --seconds 60 --plot docs/images/data-efficiency-CORPUS.png

Each row of a table is an ordinary job, run by `python sweep.py OVERRIDES` in a child
process, so it goes through the job code of a sweep and is logged to MLflow as one run.
A job whose config already has a FINISHED run in the experiment is not run again: the
table reads that run, so an interrupted benchmark resumes where it stopped.

- `epochs`: every trained model gets the same number of passes over the training split
  (`--epochs`): SAFFU's fine-tuning and bp-only phases and GPT-2.
- `wallclock`: every trained model gets the same training seconds (`--seconds`).
- `data`: the same jobs trained on the first 62.5K, 125K, 250K, 500K and 1M training
  tokens (`--sizes`) and evaluated on the same validation and test splits. Training runs
  to early stopping, capped at `--seconds` per phase. `--plot` saves validation
  perplexity against training tokens.

The explicit-only and Kneser-Ney rows need no passes and no training seconds; they are the
same in both budgets. GPT-2 trains the sizes given by `--gpt2-sizes` (indices into
`model.sizes` of conf/model/gpt2.yaml) and keeps the best on validation. The benchmark's
default is the smallest size only, because each size costs a full training budget; the
job config alone tries all three.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from saffu.planning import resolve_job_config  # noqa: E402
from saffu.tracking import RunRecorder, config_hash, prepare_store  # noqa: E402

DATA_SIZES = [62_500, 125_000, 250_000, 500_000, 1_000_000]
METRICS = ("val_ppl", "test_ppl", "val_bpc", "test_bpc")


@dataclass
class Job:
    """One benchmark job: the rows it gives and the overrides that define it."""

    label: str
    overrides: list[str]


@dataclass
class Row:
    """One table row: a model (or SAFFU phase) and its metrics."""

    model: str
    train_tokens: int
    n_params: float
    metrics: dict[str, float]
    seconds: float
    trained_tokens: float  # positions trained on, NaN for the count-based rows
    kept_state: str  # the training state that early stopping kept


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("table", choices=["epochs", "wallclock", "data"], help="which table to build")
    parser.add_argument("--corpus", required=True, help="corpus folder with train.txt, valid.txt and test.txt")
    parser.add_argument("--tracking-uri", default="sqlite:///claims.db", help="MLflow store of the runs")
    parser.add_argument("--experiment", default=None, help="MLflow experiment (default: claims-<corpus folder name>)")
    parser.add_argument("--train-tokens", type=int, default=1_000_000, help="training tokens of the epochs and wallclock tables")
    parser.add_argument("--epochs", type=int, default=1, help="passes over the training split in the epochs table")
    parser.add_argument("--seconds", type=float, default=120.0, help="training seconds per phase in the wallclock and data tables")
    parser.add_argument("--sizes", type=int, nargs="+", default=DATA_SIZES, help="training tokens of the data table")
    parser.add_argument("--gpt2-sizes", type=int, nargs="+", default=[0], help="indices into model.sizes of conf/model/gpt2.yaml")
    parser.add_argument("--no-gpt2", action="store_true", help="leave GPT-2 out (it is the slowest job on a CPU)")
    parser.add_argument("--plot", default=None, help="data table only: save validation perplexity against training tokens here")
    parser.add_argument("--dry-run", action="store_true", help="print the jobs and their overrides, run nothing")
    args = parser.parse_args(argv)

    corpus = Path(args.corpus)
    if not corpus.is_dir():
        parser.error(f"--corpus {args.corpus!r} not found; give a folder with train.txt, valid.txt and test.txt")
    missing = [name for name in ("train.txt", "valid.txt", "test.txt") if not (corpus / name).is_file()]
    if missing:
        parser.error(f"--corpus {args.corpus!r} lacks {', '.join(missing)}; give a folder with train.txt, valid.txt and test.txt")

    if args.plot and args.table != "data":
        parser.error("--plot draws the data table; use it with `data`")
    for name in ("train_tokens", "epochs", "seconds"):
        value = getattr(args, name)
        if not math.isfinite(value) or value <= 0:
            parser.error(f"--{name.replace('_', '-')} must be a positive finite number, got {value}")
    if any(size <= 0 for size in args.sizes):
        parser.error(f"--sizes must be positive token counts, got {args.sizes}")

    args.experiment = args.experiment or f"claims-{corpus.resolve().name}"
    return args


def gpt2_sizes_override(indices: list[int]) -> str:
    """Return the override `model.sizes=[...]` that keeps the given entries of conf/model/gpt2.yaml."""
    from omegaconf import OmegaConf

    sizes = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / "gpt2.yaml").sizes)
    if any(index < 0 or index >= len(sizes) for index in indices):
        raise SystemExit(f"--gpt2-sizes {indices} is out of range; conf/model/gpt2.yaml has sizes 0 to {len(sizes) - 1}")
    chosen = [sizes[index] for index in indices]
    return "model.sizes=[" + ",".join("{" + ",".join(f"{k}:{v}" for k, v in size.items()) + "}" for size in chosen) + "]"


def hydra_value(text: str) -> str:
    """Quote a string for a Hydra override when it contains characters that Hydra parses,
    such as commas (a sweep) or brackets (a list)."""
    if re.fullmatch(r"[\w./~+-]*", text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def plan(args: argparse.Namespace) -> list[Job]:
    """Return the jobs of the requested table, in the order they run."""
    common = ["data=folder", f"data.dir={hydra_value(str(Path(args.corpus).resolve()))}", f"experiment={hydra_value(args.experiment)}",
              f"tracking.uri={hydra_value(args.tracking_uri)}"]
    gpt2 = [] if args.no_gpt2 else ["model=gpt2", gpt2_sizes_override(args.gpt2_sizes)]
    jobs: list[Job] = []
    if args.table in ("epochs", "wallclock"):
        data = [f"data.max_train_tokens={args.train_tokens}"]
        if args.table == "epochs":
            saffu = [f"train.epochs={args.epochs}", "train.max_seconds=null", f"train.patience={args.epochs}"]
            anchor = [f"model.max_epochs={args.epochs}", "model.max_seconds=null"]
        else:
            saffu = ["train.epochs=100", f"train.max_seconds={args.seconds:g}"]
            anchor = ["model.max_epochs=100", f"model.max_seconds={args.seconds:g}"]
        jobs.append(Job("saffu", common + data + saffu))
        jobs.append(Job("kneser_ney", common + data + ["model=kneser_ney"]))
        if gpt2:
            jobs.append(Job("gpt2", common + data + gpt2 + anchor))
        return jobs
    for size in args.sizes:
        data = [f"data.max_train_tokens={size}"]
        jobs.append(Job("saffu", common + data + ["train.epochs=100", f"train.max_seconds={args.seconds:g}"]))
        jobs.append(Job("kneser_ney", common + data + ["model=kneser_ney"]))
        if gpt2:
            jobs.append(Job("gpt2", common + data + gpt2 + ["model.max_epochs=100", f"model.max_seconds={args.seconds:g}"]))
    return jobs


def job_hash(overrides: list[str]) -> str:
    """Return the config hash that `python sweep.py OVERRIDES` gives its run."""
    from hydra import compose, initialize_config_dir

    from hydra.errors import HydraException

    try:
        with initialize_config_dir(str(ROOT / "conf"), version_base=None):
            config = resolve_job_config(compose("config", overrides))
    except HydraException as error:
        raise SystemExit(f"a benchmark job's overrides do not compose: {error}; overrides: {overrides}") from None
    if isinstance(config, str):
        raise SystemExit(f"a benchmark job's config is invalid: {config}")
    return config_hash(config)


def run_jobs(jobs: list[Job], hashes: list[str], args: argparse.Namespace) -> dict[str, object]:
    """Run every job without a FINISHED run and return the runs by config hash.
    `hashes` are the jobs' config hashes, in the same order."""
    tracking = prepare_store(args.tracking_uri, args.experiment)
    recorder = RunRecorder(tracking)
    finished = recorder.finished_job_runs()
    for number, (job, digest) in enumerate(zip(jobs, hashes), start=1):
        if digest in finished:
            print(f"[{number}/{len(jobs)}] {job.label}: finished run {finished[digest].info.run_id}, skipped", file=sys.stderr)
            continue
        command = [sys.executable, str(ROOT / "sweep.py"), *job.overrides, "hydra.run.dir=outputs/claims/${now:%Y-%m-%d_%H-%M-%S}"]
        print(f"[{number}/{len(jobs)}] {job.label}: {' '.join(job.overrides)}", file=sys.stderr, flush=True)
        # The job's log goes to stderr, so stdout carries only the table.
        status = subprocess.run(command, cwd=os.getcwd(), stdout=sys.stderr).returncode
        if status != 0:
            print(f"[{number}/{len(jobs)}] {job.label} failed (exit {status}); its row is left out", file=sys.stderr)
    finished = recorder.finished_job_runs()
    return {digest: finished[digest] for digest in hashes if digest in finished}


def rows_of(job: Job, run) -> list[Row]:
    """Return the table rows of one finished run: three phases for SAFFU, one row for an anchor."""
    metrics, params = run.data.metrics, run.data.params
    tokens = int(params.get("data.max_train_tokens") or 0)
    n_params = metrics.get("n_params", math.nan)
    if job.label != "saffu":
        name = {"kneser_ney": "Kneser-Ney", "gpt2": "GPT-2"}[job.label]
        if job.label == "kneser_ney":
            name += f" (order {int(metrics['kneser_ney/order'])})" if "kneser_ney/order" in metrics else ""
            seconds, trained, kept_state = metrics.get("seconds", math.nan), math.nan, "counts"
        else:
            name += f" ({int(metrics['gpt2/n_layer'])}x{int(metrics['gpt2/n_embd'])})" if "gpt2/n_layer" in metrics else ""
            # Training seconds of every size tried, the budget the size search spent.
            seconds = sum(value for key, value in metrics.items() if key.startswith("gpt2/") and key.endswith("/seconds"))
            window = float(params.get("model.batch_size", "nan")) * float(params.get("model.context", "nan"))
            trained = metrics.get("gpt2/steps", math.nan) * window
            kept_state = f"best after {metrics.get('gpt2/best_epoch', math.nan):.2f} epochs"
        return [Row(name, tokens, n_params, {m: metrics.get(m, math.nan) for m in METRICS}, seconds, trained, kept_state)]
    rows = []
    for phase, name in (("explicit", "SAFFU explicit only"), ("finetune", "SAFFU explicit+bp"), ("bp_only", "SAFFU bp only")):
        values = {m: metrics.get(f"{phase}/{m}", math.nan) for m in METRICS}
        if phase == "explicit":
            rows.append(Row(name, tokens, n_params, values, metrics.get("explicit/solve_seconds", math.nan), math.nan, "counts"))
            continue
        seconds = metrics.get(f"{phase}/seconds", math.nan)
        # The phase's throughput is its trained positions over its seconds.
        trained = metrics.get(f"{phase}/tokens_per_second", math.nan) * seconds
        best = metrics.get(f"{phase}/best_epoch", math.nan)
        start = "the explicit solution" if phase == "finetune" else "the random start"
        kept_state = start if best == 0 else f"pass {best:.0f}"
        rows.append(Row(name, tokens, n_params, values, seconds, trained, kept_state))
    return rows


def markdown(rows: list[Row], with_tokens: bool) -> str:
    head = ["training tokens"] if with_tokens else []
    head += ["model", "parameters", "val ppl", "test ppl", "val bpc", "test bpc", "training s", "trained tokens", "kept"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if h in ("model", "kept") else "---:" for h in head) + "|"]
    for row in rows:
        cells = [f"{row.train_tokens:,}"] if with_tokens else []
        cells += [row.model, f"{row.n_params:,.0f}"]
        cells += [f"{row.metrics[m]:.2f}" if m.endswith("ppl") else f"{row.metrics[m]:.3f}" for m in METRICS]
        cells += [f"{row.seconds:.1f}", "" if math.isnan(row.trained_tokens) else f"{row.trained_tokens:,.0f}", row.kept_state]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def time_to_quality(run) -> str:
    """Describe how long explicit+bp took to reach bp-only's best validation perplexity.

    Validation runs once per epoch, so a time after the solve is an upper bound: the end
    of the epoch in which explicit+bp got there.
    """
    metrics = run.data.metrics
    target, bp_seconds = metrics.get("bp_only/val_ppl"), metrics.get("bp_only/seconds")
    if target is None or bp_seconds is None:
        return "time to quality: the job has no bp-only phase"
    solve = metrics["explicit/solve_seconds"]
    if metrics["explicit/val_ppl"] <= target:
        seconds, route = solve, "the explicit solve alone"
    elif metrics.get("finetune/val_ppl", math.inf) <= target:
        seconds, route = solve + metrics["finetune/seconds"], "the solve plus fine-tuning (at most)"
    else:
        return (f"time to quality: bp-only reached validation perplexity {target:.2f} after {bp_seconds:.1f} s; "
                f"explicit+bp did not reach it (best {metrics.get('finetune/val_ppl', math.nan):.2f})")
    return (f"time to quality: bp-only reached validation perplexity {target:.2f} after {bp_seconds:.1f} s; "
            f"explicit+bp reached it after {seconds:.1f} s, {route}: {bp_seconds / seconds:.1f} times sooner")


def plot(rows: list[Row], path: str, corpus: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    # explicit+bp often equals explicit-only, so it is dashed to stay visible on top of it.
    styles = {"SAFFU explicit+bp": {"linestyle": "--", "marker": "x"}}
    for name in dict.fromkeys(row.model.split(" (")[0] for row in rows):
        points = sorted((row.train_tokens, row.metrics["val_ppl"]) for row in rows if row.model.split(" (")[0] == name)
        style = styles.get(name, {"marker": "o"})
        axis.plot([p[0] for p in points], [p[1] for p in points], label=name, **style)
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("training tokens")
    axis.set_ylabel("validation perplexity")
    axis.set_title(f"Data efficiency on {corpus}")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend()
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    print(f"saved {path}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    jobs = plan(args)
    # Composing every config first also stops a dry run on a bad override.
    hashes = [job_hash(job.overrides) for job in jobs]
    if args.dry_run:
        for job in jobs:
            print(f"{job.label}: python sweep.py {' '.join(shlex.quote(override) for override in job.overrides)}")
        return 0
    runs = run_jobs(jobs, hashes, args)
    rows: list[Row] = []
    missing = 0
    for job, digest in zip(jobs, hashes):
        run = runs.get(digest)
        if run is None:
            missing += 1
            continue
        rows.extend(rows_of(job, run))
    print(markdown(rows, with_tokens=args.table == "data"))
    saffu_run = runs.get(hashes[0])  # the first job of the epochs and wallclock tables is SAFFU's
    if args.table != "data" and saffu_run is not None:
        print("\n" + time_to_quality(saffu_run))
    if args.plot and rows:
        plot(rows, args.plot, Path(args.corpus).resolve().name)
    if missing:
        print(f"{missing} job(s) have no finished run; rerun the command to run them", file=sys.stderr)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
