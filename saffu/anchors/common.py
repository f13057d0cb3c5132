"""Types and metric helpers shared by the anchor models."""

import math
from collections.abc import Callable, Mapping
from typing import Protocol

import torch

SPLITS = ("train", "valid", "test")

# log_metric(name, value, step): receives stepped metrics (per-order or per-epoch curves).
MetricLogger = Callable[[str, float, "int | None"], None]


class TokenCorpus(Protocol):
    """The fields of `saffu.data.TokenizedCorpus` that the anchors read.

    `train`, `valid` and `test` are 1-D int64 tensors of token ids in [0, vocab_size).
    `chars[split]` is the number of characters of the text that split's ids cover.
    """

    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    vocab_size: int
    chars: Mapping[str, int]


def split_tokens(corpus: TokenCorpus, split: str) -> torch.Tensor:
    """Return the token ids of one split, shape (n_tokens,), after checking shape and range."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    tokens = getattr(corpus, split)
    if tokens.dim() != 1:
        raise ValueError(f"corpus.{split} must be a 1-D tensor of token ids, got shape {tuple(tokens.shape)}")
    if tokens.numel() == 0:
        raise ValueError(f"corpus.{split} is empty; every split needs at least one token")
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= corpus.vocab_size:
        raise ValueError(
            f"corpus.{split} has token ids in [{low}, {high}], outside [0, vocab_size={corpus.vocab_size})"
        )
    return tokens.long()


def split_metrics(prefix: str, total_nll: float, n_tokens: int, n_chars: int) -> dict[str, float]:
    """Return `{prefix}_ppl` and `{prefix}_bpc` from a summed natural-log NLL over a split.

    Perplexity is exp(total_nll / n_tokens). Bits per character is total_nll / ln 2 / n_chars,
    or NaN when the split has no characters recorded.
    """
    ppl = math.exp(total_nll / n_tokens)
    bpc = total_nll / math.log(2) / n_chars if n_chars > 0 else math.nan
    return {f"{prefix}_ppl": ppl, f"{prefix}_bpc": bpc}
