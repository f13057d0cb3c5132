"""Peak resident memory and wall-clock of one explicit-only job, run as `python sweep.py`.

    python benchmarks/job_memory.py --corpus PATH/TO/gutenberg-fiction --tokens 300000 model.layers=2

Runs the job in a child process with fine-tuning and the bp-only baseline off, logging to
a temporary MLflow store. Prints the child's peak resident set size (the operating
system's ru_maxrss, which counts what the allocator kept as well as live tensors), the
seconds it took and the explicit solve's validation perplexity. It also prints the child's
CPU seconds and minor page faults: memory that the allocator returns to the system and
takes back shows up as page faults and system time, which a busy machine changes less
than wall-clock time. Further arguments are
Hydra overrides for the job. Run one job on the corpus first: with a cold token cache
the figures include training the tokenizer.
"""

import argparse
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", required=True, help="corpus folder with train.txt, valid.txt, test.txt")
    parser.add_argument("--tokens", type=int, default=None, help="training tokens (default: the whole split)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the job, e.g. model.layers=2")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="saffu-job-memory-") as folder:
        command = [
            sys.executable, str(REPO / "sweep.py"), "data=folder", f"data.dir={args.corpus}",
            f"data.max_train_tokens={'null' if args.tokens is None else args.tokens}",
            "train.enabled=false", "train.bp_only=false", f"tracking.uri=sqlite:///{folder}/mlflow.db",
            "experiment=job-memory", f"hydra.run.dir={folder}/run", *args.overrides,
        ]
        start = time.perf_counter()
        result = subprocess.run(command, cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        seconds = time.perf_counter() - start
        if result.returncode != 0:
            sys.exit(f"the job failed with exit status {result.returncode}:\n{result.stdout[-3000:]}")
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    ppl = next((line.split("validation perplexity")[-1].strip() for line in result.stdout.splitlines()
                if "explicit solve took" in line), "?")
    print(f"{date.today()}, {platform.processor() or platform.machine()}, overrides: {' '.join(args.overrides) or 'none'}, "
          f"training tokens: {args.tokens or 'all'}")
    print(f"peak resident memory {usage.ru_maxrss / 2**20:.2f} GiB, {seconds:.1f} s, explicit validation perplexity {ppl}")
    print(f"CPU seconds: {usage.ru_utime:.1f} user, {usage.ru_stime:.1f} system; {usage.ru_minflt:,} minor page faults")


if __name__ == "__main__":
    main()
