"""Explicit-solve throughput per layer beside a bare scatter-add count, and fine-tuning throughput.

    python benchmarks/solve_speed.py --corpus PATH/TO/gutenberg-fiction --tokens 1000000 [--stacked]

The bare reference does only the counting the solve cannot avoid: one vectorized
`index_add_` per block offset and per bag-of-words offset into a dense table. The ratio
solve / bare shows what the rest of the solve (tables, temperatures, attention) costs.
Prints a Markdown table; tokenization is excluded (the token cache is built first).
With --stacked it then solves two-layer models and prints the seconds of each part: the
first layer, the layer-1 inputs (the first layer's top-k distributions at every training
position) and the second layer's solve. With --count-cache it solves the models of
CACHED_CONFIGS twice over one empty count cache, as the first and a later job of a sweep
do, and prints the seconds of the expert tables (the counting) and of the whole solve.
"""

import argparse
import platform
import tempfile
import time
from datetime import date

import torch
from omegaconf import OmegaConf

from saffu.counts import CountCache
from saffu.data import prepare
from saffu.explicit import shifted_inputs, solve_layer, solve_model
from saffu.finetune import batch_loss, make_optimizers
from saffu.job import build_model

CONFIGS = [  # (block_size, radius, experts, code_dim)
    (1, 0, "onehot", None),
    (4, 16, "onehot", None),
    (8, 64, "bitcode", 64),
    (8, 64, "onehot", None),
]
STACKED_CONFIGS = [  # two layers each
    (4, 16, "onehot", None),
    (8, 64, "bitcode", 64),
]
CACHED_CONFIGS = [  # one layer each: the widest block and window of the roadmap
    (16, 256, "onehot", None),
    (16, 256, "bitcode", 64),
]


def bare_count_seconds(tokens: torch.Tensor, vocab: int, block_size: int, radius: int) -> float:
    """Time the per-offset pair counting alone, by scatter-add into dense tables."""
    start = time.perf_counter()
    for offset in range(block_size):
        table = torch.zeros((vocab + 1) * vocab)
        table.index_add_(0, shifted_inputs(tokens, offset, vocab) * vocab + tokens, torch.ones(tokens.numel()))
    if radius > 0:
        table = torch.zeros((vocab + 1) * vocab, dtype=torch.float64)
        weight = 1.0 / torch.clamp(torch.arange(tokens.numel(), dtype=torch.float64) + 1, max=radius)
        for offset in range(radius):
            inputs = shifted_inputs(tokens, offset, vocab)[offset:]
            table.index_add_(0, inputs * vocab + tokens[offset:], weight[offset:])
    return time.perf_counter() - start


def finetune_tokens_per_second(model, tokens: torch.Tensor, steps: int = 20) -> float:
    """Training positions per second over `steps` steps of 8 spans of 64 positions."""
    optimizers = make_optimizers(model, 1e-4)
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in range(steps):
        starts = torch.randint(0, tokens.numel() - 64, (8,), generator=generator)
        loss = batch_loss(model, tokens, starts, 64)
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
    return steps * 8 * 64 / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", required=True, help="corpus folder with train.txt, valid.txt, test.txt")
    parser.add_argument("--tokens", type=int, default=1_000_000, help="training tokens to solve on")
    parser.add_argument("--cache-dir", default=None, help="token cache folder (default: SAFFU_CACHE_DIR or ~/.cache/saffu)")
    parser.add_argument("--stacked", action="store_true", help="also time the solve of two-layer models, part by part")
    parser.add_argument("--count-cache", action="store_true", help="also time solves that count into and read from a count cache")
    args = parser.parse_args()

    base = OmegaConf.load("conf/solver/explicit.yaml")
    data_cfg = OmegaConf.create({
        "name": "folder", "dir": args.corpus, "max_train_tokens": args.tokens, "max_eval_tokens": None,
        "cache_dir": args.cache_dir or OmegaConf.load("conf/data/folder.yaml").cache_dir,
    })
    corpus = prepare(data_cfg, OmegaConf.load("conf/tokenizer/bpe.yaml"))
    tokens = corpus.train

    print(f"{date.today()}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"{tokens.numel():,} training tokens, V = {corpus.vocab_size}\n")
    print("| b | r | experts | solve s | tokens/s | bare count s | solve / bare | fine-tune tokens/s |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|")
    for block_size, radius, kind, code_dim in CONFIGS:
        model = build_model(model_config(block_size, radius, kind, code_dim, layers=1), corpus)
        start = time.perf_counter()
        solve_layer(model.layers[0], tokens, base, torch.Generator().manual_seed(0))
        solve = time.perf_counter() - start
        bare = bare_count_seconds(tokens, corpus.vocab_size, block_size, radius)
        finetune = finetune_tokens_per_second(model, tokens)
        name = kind if code_dim is None else f"{kind} d={code_dim}"
        print(f"| {block_size} | {radius} | {name} | {solve:.1f} | {tokens.numel() / solve:,.0f} | {bare:.1f} | "
              f"{solve / bare:.1f} | {finetune:,.0f} |", flush=True)
    if args.stacked:
        print_stacked(corpus, tokens, base)
    if args.count_cache:
        print_count_cache(corpus, tokens, base)


def model_config(block_size: int, radius: int, kind: str, code_dim: int | None, layers: int):
    return OmegaConf.create({
        "name": "saffu", "layers": layers, "block_size": block_size, "radius": radius,
        "attention_code_dim": 32, "stack_top_k": 32, "experts": {"kind": kind, "code_dim": code_dim},
    })


def print_stacked(corpus, tokens: torch.Tensor, solver_cfg) -> None:
    """Solve each two-layer model of STACKED_CONFIGS and print the seconds of each part."""
    print("\n| b | r | experts | layer 0 s | layer 1 inputs s | layer 1 solve s | total s |")
    print("|---:|---:|---|---:|---:|---:|---:|")
    for block_size, radius, kind, code_dim in STACKED_CONFIGS:
        model = build_model(model_config(block_size, radius, kind, code_dim, layers=2), corpus)
        start = time.perf_counter()
        report = solve_model(model, tokens, solver_cfg, torch.Generator().manual_seed(0))
        total = time.perf_counter() - start
        layer0 = sum(value for name, value in report.seconds.items() if name.startswith("layer0/"))
        inputs = report.seconds["layer1/inputs"]
        layer1 = sum(value for name, value in report.seconds.items() if name.startswith("layer1/")) - inputs
        name = kind if code_dim is None else f"{kind} d={code_dim}"
        print(f"| {block_size} | {radius} | {name} | {layer0:.1f} | {inputs:.1f} | {layer1:.1f} | {total:.1f} |", flush=True)


def print_count_cache(corpus, tokens: torch.Tensor, solver_cfg) -> None:
    """Solve each model of CACHED_CONFIGS into an empty count cache, then again from it."""
    print("\n| b | r | experts | count cache | expert tables s | solve s |")
    print("|---:|---:|---|---|---:|---:|")
    for block_size, radius, kind, code_dim in CACHED_CONFIGS:
        name = kind if code_dim is None else f"{kind} d={code_dim}"
        with tempfile.TemporaryDirectory(prefix="saffu-counts-") as folder:
            for state in ("empty", "filled"):
                model = build_model(model_config(block_size, radius, kind, code_dim, layers=1), corpus)
                start = time.perf_counter()
                report = solve_model(model, tokens, solver_cfg, torch.Generator().manual_seed(0), CountCache(folder))
                total = time.perf_counter() - start
                print(f"| {block_size} | {radius} | {name} | {state} | {report.seconds['layer0/experts']:.1f} | "
                      f"{total:.1f} |", flush=True)


if __name__ == "__main__":
    main()
