"""Fixed non-negative token codes: bit codes ordered by token frequency.

The token of frequency rank r (ties broken by token id) gets the r-th binary vector of
length d, in order of increasing number of ones and then lexicographically, normalized
to sum to one. Frequent tokens get the sparsest codes, and no code is all zeros. The
padding index (the last row) gets the next unused code.
"""

from itertools import combinations
from math import comb

import torch


def min_code_dim(n_codes: int) -> int:
    """Return the smallest d with sum_{w=1..d} C(d, w) = 2**d - 1 >= n_codes."""
    if n_codes < 1:
        raise ValueError(f"n_codes must be at least 1, got {n_codes}")
    return max(1, (n_codes).bit_length())


def check_code_dim(code_dim: int, vocab_size: int, name: str = "code_dim") -> None:
    """Raise ValueError unless `code_dim` gives a distinct code to every token and the padding."""
    needed = min_code_dim(vocab_size + 1)
    if code_dim < needed:
        raise ValueError(
            f"{name}={code_dim} is too small for a vocabulary of {vocab_size} tokens plus padding: "
            f"bit codes need at least {needed} dimensions; set {name} to {needed} or more"
        )


def bit_codes(token_counts: torch.Tensor, code_dim: int) -> torch.Tensor:
    """Build the bit-code table.

    Args:
        token_counts: (V,) training frequency of each token id.
        code_dim: d, the code length; must satisfy 2**d - 1 >= V + 1.

    Returns:
        (V + 1, d) float32 table; row V is the padding code. Each row is non-negative,
        sums to one and is unique.
    """
    vocab_size = int(token_counts.numel())
    check_code_dim(code_dim, vocab_size)

    # Tokens by decreasing count, ties by increasing id (a stable sort keeps id order).
    order = torch.sort(-token_counts.to(torch.float64), stable=True).indices
    rank_of_token = torch.empty(vocab_size, dtype=torch.long)
    rank_of_token[order] = torch.arange(vocab_size)

    codes = torch.zeros(vocab_size + 1, code_dim)
    patterns = _patterns_by_weight(code_dim, vocab_size + 1)
    for token in range(vocab_size):
        codes[token, list(patterns[rank_of_token[token]])] = 1.0
    codes[vocab_size, list(patterns[vocab_size])] = 1.0
    return codes / codes.sum(dim=1, keepdim=True)


def _patterns_by_weight(code_dim: int, count: int) -> list[tuple[int, ...]]:
    """List the first `count` sets of one-positions, by number of ones and then lexicographically
    (as bit strings read left to right, so (0,) = 100... comes before (1,) = 010...)."""
    patterns: list[tuple[int, ...]] = []
    for weight in range(1, code_dim + 1):
        if len(patterns) >= count:
            break
        take = min(comb(code_dim, weight), count - len(patterns))
        for _, ones in zip(range(take), combinations(range(code_dim), weight)):
            patterns.append(ones)
    return patterns
