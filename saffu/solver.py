"""The explicit (closed-form) solution of a softmax layer on non-negative inputs.

A layer maps an input x (length d, non-negative, each row normalized to sum to one) to
p = softmax(s * x W) over m outputs. With inputs X (n x d) and target distributions Y
(n x m), the co-occurrence F = X^T Y and its row sums f give

    W[i, j] = log(F[i, j] + alpha) - log(f[i] + alpha * m).

For one-hot inputs this is the smoothed maximum-likelihood conditional distribution, the
global minimum of the cross-entropy with alpha pseudo-counts added to the data. For other
inputs the logits are a log-linear pool of per-feature conditionals, and a scalar
temperature s, fitted by golden-section search, sharpens that pool.
"""

import logging
import math
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def explicit_weights(cooccurrence: torch.Tensor, alpha: float) -> torch.Tensor:
    """Solve W from a dense co-occurrence matrix F of shape (d, m); returns (d, m) float32."""
    if alpha <= 0:
        raise ValueError(f"alpha={alpha} must be > 0: the smoothing pseudo-count keeps log(0) out of W")
    cooccurrence = cooccurrence.to(torch.float64)
    n_outputs = cooccurrence.shape[1]
    row_totals = cooccurrence.sum(dim=1, keepdim=True)
    weights = torch.log(cooccurrence + alpha) - torch.log(row_totals + alpha * n_outputs)
    return weights.to(torch.float32)


def pair_counts(inputs: torch.Tensor, targets: torch.Tensor, n_outputs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Count (input, target) pairs by sorting their flat index.

    Args:
        inputs: (n,) int64 input ids in [0, n_inputs).
        targets: (n,) int64 target ids in [0, n_outputs).

    Returns:
        (flat_index, count): the distinct flat indices input * n_outputs + target, sorted, and
        how often each occurs. This is the sparse co-occurrence matrix of one-hot inputs.
    """
    flat = inputs * n_outputs + targets
    return torch.unique(flat, sorted=True, return_counts=True)


def onehot_table(
    flat_index: torch.Tensor, count: torch.Tensor, n_inputs: int, n_outputs: int, alpha: float
) -> torch.Tensor:
    """Expand sparse one-hot co-occurrence counts into the explicit W, shape (n_inputs, n_outputs).

    A smoothed row is the constant log(alpha) - log(f + alpha m) plus its seen entries, so
    the dense table is built in O(n_inputs * n_outputs + nnz) without a dense count matrix.
    """
    if alpha <= 0:
        raise ValueError(f"alpha={alpha} must be > 0: the smoothing pseudo-count keeps log(0) out of W")
    rows = flat_index // n_outputs
    row_totals = torch.zeros(n_inputs, dtype=torch.float64).index_add_(0, rows, count.to(torch.float64))
    log_denominator = torch.log(row_totals + alpha * n_outputs)

    table = (math.log(alpha) - log_denominator).to(torch.float32).unsqueeze(1).expand(n_inputs, n_outputs).contiguous()
    seen = torch.log(count.to(torch.float64) + alpha) - log_denominator[rows]
    table.view(-1)[flat_index] = seen.to(torch.float32)
    return table


def dense_cooccurrence(
    flat_index: torch.Tensor, count: torch.Tensor, n_inputs: int, n_outputs: int
) -> torch.Tensor:
    """Scatter sparse counts into a dense (n_inputs, n_outputs) float64 matrix."""
    dense = torch.zeros(n_inputs * n_outputs, dtype=torch.float64)
    dense.index_add_(0, flat_index, count.to(torch.float64))
    return dense.view(n_inputs, n_outputs)


def fit_temperature(
    loss_at: Callable[[float], float],
    bracket: tuple[float, float] = (0.25, 32.0),
    iterations: int = 12,
) -> tuple[float, float]:
    """Minimize loss_at(s) over s in `bracket` by golden-section search on log s.

    The loss of softmax(s * z) is unimodal in s for fixed logits z in practice, and the
    search runs on log s because the useful scales span two orders of magnitude. Twelve
    iterations narrow log s to 0.003 of the bracket's width, 1.5% of s for [0.25, 32]. The
    result is never worse than s = 1 when 1 lies in the bracket: the returned loss is the
    minimum of the search and of loss_at(1).

    Returns:
        (s, loss) at the minimum found.
    """
    low, high = math.log(bracket[0]), math.log(bracket[1])
    if not low < high:
        raise ValueError(f"temperature bracket {bracket} must be increasing and positive")
    left = high - GOLDEN * (high - low)
    right = low + GOLDEN * (high - low)
    loss_left, loss_right = loss_at(math.exp(left)), loss_at(math.exp(right))
    for _ in range(iterations):
        if loss_left <= loss_right:
            high, right, loss_right = right, left, loss_left
            left = high - GOLDEN * (high - low)
            loss_left = loss_at(math.exp(left))
        else:
            low, left, loss_left = left, right, loss_right
            right = low + GOLDEN * (high - low)
            loss_right = loss_at(math.exp(right))
    best_log, best_loss = (left, loss_left) if loss_left <= loss_right else (right, loss_right)
    if bracket[0] <= 1.0 <= bracket[1]:
        loss_one = loss_at(1.0)
        if loss_one <= best_loss:
            return 1.0, loss_one
    return math.exp(best_log), best_loss
