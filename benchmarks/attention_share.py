"""Share of the attention weight that each expert gets from the explicit solve, on validation text.

    python benchmarks/attention_share.py --corpus PATH/TO/gutenberg-fiction --tokens 200000

Solves one one-layer model per entry of --experts, with the block size and radius given.
For each model it prints the validation perplexity and, per expert, the mean attention
weight over the scored positions and the expert's own perplexity (its temperature-scaled
softmax alone). A model whose attention puts nearly all weight on one expert scores about
as that expert does, whatever the others add.
"""

from __future__ import annotations

import argparse
import platform
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from saffu.data import prepare
from saffu.evaluate import evaluate
from saffu.explicit import solve_model
from saffu.job import build_model
from saffu.model import IGNORE_INDEX, make_windows, span_starts

CONF = Path(__file__).resolve().parent.parent / "conf"
SPAN = 512


def attention_share(model, tokens: torch.Tensor, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the mean attention weight (E,) and each expert's perplexity (E,) over the
    first `max_tokens` of `tokens`, for a one-layer model."""
    layer = model.layers[0]
    tokens = tokens[:max_tokens]
    context_ids, targets = make_windows(tokens, span_starts(tokens.numel(), SPAN), SPAN, layer.shape.context, model.vocab_size)
    with torch.no_grad():
        weights = layer.attention(context_ids)  # (S, T, E)
        logits = layer.expert_logits(context_ids) * layer.expert_scale.view(1, 1, -1, 1)  # (S, T, E, V)
        log_probs = F.log_softmax(logits, dim=-1)
    scored = targets != IGNORE_INDEX
    target_log_probs = log_probs.gather(-1, targets.clamp_min(0)[..., None, None].expand(-1, -1, log_probs.shape[2], 1))
    return weights[scored].mean(dim=0), target_log_probs.squeeze(-1)[scored].mean(dim=0).neg().exp()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", required=True, help="corpus folder with train.txt, valid.txt, test.txt")
    parser.add_argument("--tokens", type=int, default=200_000, help="training tokens (default: %(default)s)")
    parser.add_argument("--eval-tokens", type=int, default=20_000, help="validation tokens scored (default: %(default)s)")
    parser.add_argument("--block-size", type=int, default=4, help="model.block_size (default: %(default)s)")
    parser.add_argument("--radius", type=int, default=16, help="model.radius (default: %(default)s)")
    parser.add_argument(
        "--experts", nargs="+", default=["onehot", "bitcode16", "bitcode128"],
        help="model/experts choices, one model each (default: %(default)s)",
    )
    args = parser.parse_args()

    print(f"{date.today()}, {platform.processor() or platform.machine()}, {args.tokens} training tokens, "
          f"block size {args.block_size}, radius {args.radius}, {args.eval_tokens} validation tokens scored\n")
    print("| experts | val ppl | mean attention per expert | perplexity per expert |")
    print("|---|---:|---|---|")
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        for experts in args.experts:
            cfg = compose("config", overrides=[
                "data=folder", f"data.dir={args.corpus}", f"data.max_train_tokens={args.tokens}",
                f"model/experts={experts}", f"model.block_size={args.block_size}", f"model.radius={args.radius}",
            ])
            corpus = prepare(cfg.data, cfg.tokenizer)
            model = build_model(cfg.model, corpus)
            solve_model(model, corpus.train, cfg.solver, torch.Generator().manual_seed(int(cfg.seed)), None)
            valid = corpus.split("valid")[: args.eval_tokens]
            ppl = evaluate(model, valid, corpus.chars["valid"]).ppl
            shares, expert_ppl = attention_share(model, valid, args.eval_tokens)
            print(f"| {experts} | {ppl:.1f} | {' '.join(f'{share:.3f}' for share in shares.tolist())} | "
                  f"{' '.join(f'{value:.0f}' for value in expert_ppl.tolist())} |")
    print("\nExperts in order: the block experts at offsets 0 to b-1, then the bag of words.")


if __name__ == "__main__":
    main()
