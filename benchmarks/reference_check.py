"""Validation perplexity of explicitly solved models, no backpropagation.

    python benchmarks/reference_check.py --corpus PATH/TO/gutenberg-fiction

Solves each model of MODELS on the whole training split with the default solver
settings (conf/solver/explicit.yaml) and prints a Markdown table, so the explicit
solution can be compared with published or earlier numbers on the same corpus.
"""

import argparse
import time

import torch
from omegaconf import OmegaConf

from saffu.data import prepare
from saffu.evaluate import evaluate
from saffu.explicit import solve_model
from saffu.job import build_model

MODELS = [  # (block_size, radius, experts, code_dim)
    (1, 0, "onehot", None),
    (1, 0, "bitcode", 16),
    (1, 0, "bitcode", 32),
    (1, 0, "bitcode", 64),
    (4, 0, "onehot", None),
    (4, 16, "onehot", None),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", required=True, help="corpus folder with train.txt, valid.txt, test.txt")
    parser.add_argument("--calibrate", choices=["true", "false"], default="true", help="fit the temperatures")
    args = parser.parse_args()

    data_cfg = OmegaConf.create({
        "name": "folder", "dir": args.corpus, "max_train_tokens": None, "max_eval_tokens": None,
        "cache_dir": OmegaConf.load("conf/data/folder.yaml").cache_dir,
    })
    corpus = prepare(data_cfg, OmegaConf.load("conf/tokenizer/bpe.yaml"))
    solver_cfg = OmegaConf.load("conf/solver/explicit.yaml")
    solver_cfg.calibrate = args.calibrate == "true"

    print(f"{corpus.train.numel():,} training and {corpus.valid.numel():,} validation tokens, V = {corpus.vocab_size}\n")
    print("| b | r | experts | validation ppl | solve s |")
    print("|---:|---:|---|---:|---:|")
    for block_size, radius, kind, code_dim in MODELS:
        model_cfg = OmegaConf.create({
            "name": "saffu", "layers": 1, "block_size": block_size, "radius": radius,
            "attention_code_dim": 32, "stack_top_k": 32, "experts": {"kind": kind, "code_dim": code_dim},
        })
        model = build_model(model_cfg, corpus)
        start = time.perf_counter()
        solve_model(model, corpus.train, solver_cfg, torch.Generator().manual_seed(0))
        seconds = time.perf_counter() - start
        ppl = evaluate(model, corpus.valid, corpus.chars["valid"]).ppl
        name = kind if code_dim is None else f"{kind} d={code_dim}"
        print(f"| {block_size} | {radius} | {name} | {ppl:.1f} | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
