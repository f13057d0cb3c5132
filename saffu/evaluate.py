"""Perplexity and bits per character of a model over a whole split.

Every token of the split is predicted, the first one from the start of text.
Perplexity = exp(total NLL / tokens); bits per character = total NLL / ln 2 / characters,
which compares models across tokenizers.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from saffu.model import IGNORE_INDEX, SAFFUModel, chunk_positions, make_windows, span_starts


@dataclass
class Evaluation:
    nll: float  # total negative log-likelihood in nats
    tokens: int
    chars: int

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.tokens)

    @property
    def bpc(self) -> float:
        return self.nll / math.log(2) / self.chars


@torch.no_grad()
def evaluate(model: SAFFUModel, tokens: torch.Tensor, chars: int, span: int = 512) -> Evaluation:
    """Score every token of `tokens` (n,) with `model`, in chunks of spans."""
    model.eval()
    layer = model.layers[-1]
    starts = span_starts(tokens.numel(), span)
    spans_per_chunk = max(1, chunk_positions(layer.shape.n_experts, model.vocab_size) // span)
    total = 0.0
    for first in range(0, starts.numel(), spans_per_chunk):
        context_ids, targets = make_windows(tokens, starts[first : first + spans_per_chunk], span, model.context, model.vocab_size)
        logits = model(context_ids)
        total += F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        ).item()
    return Evaluation(nll=total, tokens=int(tokens.numel()), chars=int(chars))
