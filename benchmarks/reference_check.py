"""Validation perplexity of explicitly solved models, no backpropagation.

    python benchmarks/reference_check.py --corpus PATH/TO/gutenberg-fiction
    python benchmarks/reference_check.py --corpus PATH/TO/gutenberg-fiction --solver-options

Solves each model of MODELS on the whole training split with the default solver
settings (conf/solver/explicit.yaml) and prints a Markdown table, so the explicit
solution can be compared with published or earlier numbers on the same corpus.

With --solver-options, solves the default model (conf/model/saffu.yaml) once per solver
setting of SOLVER_OPTIONS instead, each a change of one setting from the defaults, and
gives each validation perplexity beside the default's.
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from saffu.data import prepare  # noqa: E402
from saffu.evaluate import evaluate  # noqa: E402
from saffu.explicit import solve_model  # noqa: E402
from saffu.job import build_model  # noqa: E402

MODELS = [  # (block_size, radius, experts, code_dim)
    (1, 0, "onehot", None),
    (1, 0, "bitcode", 16),
    (1, 0, "bitcode", 32),
    (1, 0, "bitcode", 64),
    (4, 0, "onehot", None),
    (4, 16, "onehot", None),
]

SOLVER_OPTIONS = [  # (label, overrides of conf/solver/explicit.yaml)
    ("defaults", {}),
    ("no temperatures (calibrate=false)", {"calibrate": False}),
    ("soft attention targets, tau=0.5", {"attention_target": "soft", "attention_tau": 0.5}),
    ("soft attention targets, tau=1", {"attention_target": "soft", "attention_tau": 1.0}),
    ("soft attention targets, tau=2", {"attention_target": "soft", "attention_tau": 2.0}),
    ("alpha=0.001", {"alpha": 0.001}),
    ("alpha=0.1", {"alpha": 0.1}),
    ("alpha=1", {"alpha": 1.0}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", required=True, help="corpus folder with train.txt, valid.txt, test.txt")
    parser.add_argument("--calibrate", choices=["true", "false"], default="true", help="fit the temperatures")
    parser.add_argument("--solver-options", action="store_true", help="compare solver settings on the default model")
    args = parser.parse_args()
    missing = [name for name in ("train.txt", "valid.txt", "test.txt") if not (Path(args.corpus) / name).is_file()]
    if missing:
        parser.error(f"--corpus {args.corpus!r} lacks {', '.join(missing)}; give a folder with train.txt, valid.txt and test.txt")

    data_cfg = OmegaConf.create({
        "name": "folder", "dir": args.corpus, "max_train_tokens": None, "max_eval_tokens": None,
        "cache_dir": OmegaConf.load(ROOT / "conf" / "data" / "folder.yaml").cache_dir,
    })
    corpus = prepare(data_cfg, OmegaConf.load(ROOT / "conf" / "tokenizer" / "bpe.yaml"))
    solver_cfg = OmegaConf.load(ROOT / "conf" / "solver" / "explicit.yaml")
    solver_cfg.calibrate = args.calibrate == "true"

    print(f"{corpus.train.numel():,} training and {corpus.valid.numel():,} validation tokens, V = {corpus.vocab_size}\n")
    if args.solver_options:
        solver_options_table(corpus, solver_cfg)
        return
    print("| b | r | experts | validation ppl | solve s |")
    print("|---:|---:|---|---:|---:|")
    for block_size, radius, kind, code_dim in MODELS:
        model_cfg = OmegaConf.create({
            "name": "saffu", "layers": 1, "block_size": block_size, "radius": radius,
            "attention_code_dim": 32, "stack_top_k": 32, "experts": {"kind": kind, "code_dim": code_dim},
        })
        ppl, seconds = solve_and_evaluate(model_cfg, corpus, solver_cfg)
        name = kind if code_dim is None else f"{kind} d={code_dim}"
        print(f"| {block_size} | {radius} | {name} | {ppl:.1f} | {seconds:.1f} |", flush=True)


def solve_and_evaluate(model_cfg, corpus, solver_cfg) -> tuple[float, float]:
    """Solve a model explicitly and return its validation perplexity and solve seconds."""
    model = build_model(model_cfg, corpus)
    start = time.perf_counter()
    solve_model(model, corpus.train, solver_cfg, torch.Generator().manual_seed(0))
    seconds = time.perf_counter() - start
    return evaluate(model, corpus.valid, corpus.chars["valid"]).ppl, seconds


def solver_options_table(corpus, solver_cfg) -> None:
    """Print the default model's validation perplexity under each setting of SOLVER_OPTIONS."""
    model_cfg = OmegaConf.load(ROOT / "conf" / "model" / "saffu.yaml")
    model_cfg.experts = OmegaConf.load(ROOT / "conf" / "model" / "experts" / "onehot.yaml")
    print(f"Model: b={model_cfg.block_size}, r={model_cfg.radius}, one-hot experts.\n")
    print("| solver setting | validation ppl | change from defaults | solve s |")
    print("|---|---:|---:|---:|")
    default_ppl = None
    for label, overrides in SOLVER_OPTIONS:
        options = OmegaConf.merge(solver_cfg, overrides)
        ppl, seconds = solve_and_evaluate(model_cfg, corpus, options)
        default_ppl = ppl if default_ppl is None else default_ppl
        print(f"| {label} | {ppl:.2f} | {100 * (ppl / default_ppl - 1):+.1f}% | {seconds:.1f} |", flush=True)

if __name__ == "__main__":
    main()
