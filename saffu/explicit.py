"""Explicit solve of a SAFFU layer from training token ids, in one streamed pass per part.

Order: expert tables from per-offset co-occurrence counts, then the temperatures of the
experts whose inputs are not one-hot, then the attention weights W_A from the best
expert at each position and their temperature s_A, and last the output temperature s.
"""

import logging
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from saffu.model import (
    IGNORE_INDEX,
    SAFFULayer,
    chunk_positions,
    make_windows,
    sample_span_starts,
    span_starts,
)
from saffu.solver import explicit_weights, fit_temperature, onehot_table, pair_counts

log = logging.getLogger(__name__)

CALIBRATION_SPAN = 256


@dataclass
class SolveReport:
    """What the solve fitted and how long each part took (seconds)."""

    seconds: dict[str, float] = field(default_factory=dict)
    temperatures: dict[str, float] = field(default_factory=dict)
    stored_counts: int = 0  # non-zero co-occurrence entries kept sparsely


def shifted_inputs(tokens: torch.Tensor, offset: int, pad: int) -> torch.Tensor:
    """Input token x_{t - offset} at every position t (x_t = tokens[t - 1]; padding before the text)."""
    inputs = torch.cat([torch.full((offset + 1,), pad, dtype=torch.long), tokens[: max(0, tokens.numel() - offset - 1)]])
    return inputs[: tokens.numel()]


@torch.no_grad()
def solve_layer(layer: SAFFULayer, tokens: torch.Tensor, solver_cfg: DictConfig, generator: torch.Generator) -> SolveReport:
    """Set every parameter of `layer` to the explicit solution on the training ids `tokens` (n,)."""
    report = SolveReport()
    shape = layer.shape
    vocab, alpha = shape.vocab_size, float(solver_cfg.alpha)

    # Temperatures are fitted on training spans held out of the counts: on positions the
    # counts include, every expert looks sharper than it is on unseen text.
    calibration_starts = _calibration_starts(tokens.numel(), solver_cfg, generator)
    if not solver_cfg.calibrate:
        calibration_starts = calibration_starts[:0]
    counted = torch.ones(tokens.numel(), dtype=torch.bool)
    for first in calibration_starts.tolist():
        counted[first : first + CALIBRATION_SPAN] = False

    start = time.perf_counter()
    for offset in range(shape.block_size):
        inputs = shifted_inputs(tokens, offset, vocab)
        flat, count = pair_counts(inputs[counted], tokens[counted], vocab)
        report.stored_counts += flat.numel()
        _set_expert(layer, offset, flat, count, alpha)
    if shape.radius > 0:
        _set_bag_of_words(layer, tokens, counted, alpha)
    report.seconds["experts"] = time.perf_counter() - start

    start = time.perf_counter()
    if solver_cfg.calibrate:
        context_ids, targets = make_windows(tokens, calibration_starts, CALIBRATION_SPAN, shape.context, vocab)
        calibration = _Windows(context_ids, targets)
        _fit_expert_temperatures(layer, calibration, solver_cfg, report)
    report.seconds["expert_temperatures"] = time.perf_counter() - start

    start = time.perf_counter()
    if shape.n_experts > 1:
        _set_attention(layer, tokens, solver_cfg, generator)
    report.seconds["attention"] = time.perf_counter() - start

    start = time.perf_counter()
    if solver_cfg.calibrate:
        _fit_output_temperatures(layer, calibration, solver_cfg, report)
    report.seconds["output_temperatures"] = time.perf_counter() - start
    return report


def _set_expert(layer: SAFFULayer, offset: int, flat: torch.Tensor, count: torch.Tensor, alpha: float) -> None:
    """Solve block expert `offset` from its sparse (input token, next token) counts."""
    vocab = layer.shape.vocab_size
    if layer.shape.expert_kind == "onehot":
        rows = slice(offset * (vocab + 1), (offset + 1) * (vocab + 1))
        layer.expert_table.weight[rows] = onehot_table(flat, count, vocab + 1, vocab, alpha)
        return
    # Bit-code inputs: F = C^T N, with N the sparse (V+1, V) count matrix and C the codes.
    counts = torch.sparse_coo_tensor(
        torch.stack([flat // vocab, flat % vocab]), count.to(torch.float32), (vocab + 1, vocab),
        is_coalesced=True, check_invariants=False,
    )
    cooccurrence = torch.sparse.mm(counts.t(), layer.expert_codes).t()  # (d, V)
    layer.expert_weights[offset] = explicit_weights(cooccurrence, alpha)


def _set_bag_of_words(layer: SAFFULayer, tokens: torch.Tensor, counted: torch.Tensor, alpha: float) -> None:
    """Solve the bag-of-words expert: F[x, y] sums, over positions t with next token y, the
    share of token x in the window of the last r inputs (1 / window size per occurrence)."""
    shape = layer.shape
    vocab, radius = shape.vocab_size, shape.radius
    n = tokens.numel()
    # Each position adds its window's token distribution: weight 1 / window size per token.
    weight = counted / torch.clamp(torch.arange(n, dtype=torch.float64) + 1, max=radius)
    cooccurrence = torch.zeros((vocab + 1) * vocab, dtype=torch.float64)
    for offset in range(min(radius, n)):
        inputs = shifted_inputs(tokens, offset, vocab)[offset:]
        targets = tokens[offset:]
        cooccurrence.index_add_(0, inputs * vocab + targets, weight[offset:])
    cooccurrence = cooccurrence.view(vocab + 1, vocab)

    if shape.expert_kind == "onehot":
        rows = slice(shape.block_size * (vocab + 1), (shape.block_size + 1) * (vocab + 1))
        layer.expert_table.weight[rows] = explicit_weights(cooccurrence, alpha)
    else:
        codes = layer.expert_codes.to(torch.float64)
        layer.expert_weights[shape.block_size] = explicit_weights(codes.t() @ cooccurrence, alpha)


@dataclass
class _Windows:
    context_ids: torch.Tensor  # (S, C + T)
    targets: torch.Tensor  # (S, T)


def _calibration_starts(n_positions: int, solver_cfg: DictConfig, generator: torch.Generator) -> torch.Tensor:
    """Random training spans for the temperatures, at most a tenth of the training positions."""
    budget = min(int(solver_cfg.calibration_tokens), n_positions // 10)
    n_spans = max(1, budget // CALIBRATION_SPAN)
    return sample_span_starts(n_positions, CALIBRATION_SPAN, n_spans, generator)


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX).item()


def _fit_expert_temperatures(layer: SAFFULayer, calibration: _Windows, solver_cfg: DictConfig, report: SolveReport) -> None:
    """Fit s_k for every expert whose inputs are not one-hot: bit-code experts and the bag of words."""
    shape = layer.shape
    bracket = tuple(solver_cfg.temperature_bracket)
    general = list(range(shape.block_size)) if shape.expert_kind == "bitcode" else []
    if shape.radius > 0:
        general.append(shape.block_size)
    if not general:
        return
    logits = layer.expert_logits(calibration.context_ids)  # (S, T, E, V)
    for k in general:
        expert = logits[:, :, k]
        scale, loss = fit_temperature(lambda s: _cross_entropy(s * expert, calibration.targets), bracket)
        layer.expert_scale[k] = scale
        report.temperatures[f"expert{k}"] = scale
        log.debug("expert %d temperature %.3f (calibration loss %.4f)", k, scale, loss)


def _set_attention(layer: SAFFULayer, tokens: torch.Tensor, solver_cfg: DictConfig, generator: torch.Generator) -> None:
    """Solve W_A from phi_t to the attention targets a*_t over the attention positions."""
    shape = layer.shape
    n = tokens.numel()
    span = 1024
    limit = solver_cfg.attention_tokens
    if limit is None or int(limit) >= n:
        starts = span_starts(n, span)
    else:
        starts = sample_span_starts(n, span, max(1, int(limit) // span), generator)

    spans_per_chunk = max(1, chunk_positions(1, shape.vocab_size) // span)
    cooccurrence = torch.zeros(shape.block_size * shape.attention_code_dim, shape.n_experts, dtype=torch.float64)
    for first in range(0, starts.numel(), spans_per_chunk):
        context_ids, targets = make_windows(tokens, starts[first : first + spans_per_chunk], span, shape.context, shape.vocab_size)
        valid = targets != IGNORE_INDEX
        target_log_probs = _target_log_probs(layer, context_ids, targets.clamp_min(0))  # (S, T, E)
        if solver_cfg.attention_target == "hard":
            attention_targets = F.one_hot(target_log_probs.argmax(dim=-1), shape.n_experts).to(torch.float64)
        else:
            attention_targets = F.softmax(float(solver_cfg.attention_tau) * target_log_probs, dim=-1).to(torch.float64)
        features = layer.attention_features(layer.block_tokens(context_ids)).to(torch.float64)  # (S, T, b * d_attn)
        features = features[valid]
        cooccurrence += features.t() @ attention_targets[valid]
    layer.attention_weights.copy_(explicit_weights(cooccurrence, float(solver_cfg.alpha)))


def _target_log_probs(layer: SAFFULayer, context_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log P_k(y_t) of every expert for the true next token, (S, T, E).

    A block expert's row depends on one token only, so its log-probability is a lookup:
    W_j[x_{t-j}, y_t] for one-hot experts, whose rows are already normalized
    log-conditionals, and a row of log_softmax(s_j * C W_j) for bit-code experts. Only the
    bag-of-words expert needs its whole softmax at every position.
    """
    shape = layer.shape
    vocab = shape.vocab_size
    tokens = layer.block_tokens(context_ids)  # (S, T, b)
    columns = []
    for j in range(shape.block_size):
        if shape.expert_kind == "onehot":
            table = layer.expert_table.weight[j * (vocab + 1) : (j + 1) * (vocab + 1)]
        else:
            table = F.log_softmax(layer.expert_scale[j] * (layer.expert_codes @ layer.expert_weights[j]), dim=-1)
        columns.append(table[tokens[:, :, j], targets])
    if shape.radius > 0:
        bag = layer.expert_logits(context_ids, block=False)[:, :, 0]  # (S, T, V)
        bag = F.log_softmax(layer.expert_scale[shape.block_size] * bag, dim=-1)
        columns.append(bag.gather(-1, targets.unsqueeze(-1)).squeeze(-1))
    return torch.stack(columns, dim=-1)


def _fit_output_temperatures(layer: SAFFULayer, calibration: _Windows, solver_cfg: DictConfig, report: SolveReport) -> None:
    """Fit s_A with s = 1, then s, on the calibration spans."""
    bracket = tuple(solver_cfg.temperature_bracket)
    scaled_logits = layer.expert_logits(calibration.context_ids) * layer.expert_scale[:, None]
    features = layer.attention_features(layer.block_tokens(calibration.context_ids))
    attention_logits = features @ layer.attention_weights

    def mixed_logits(attention_scale: float) -> torch.Tensor:
        attention = F.softmax(attention_scale * attention_logits, dim=-1)
        return torch.einsum("stk,stkv->stv", attention, scaled_logits)

    if layer.shape.n_experts > 1:
        attention_scale, _ = fit_temperature(lambda s: _cross_entropy(mixed_logits(s), calibration.targets), bracket)
        layer.attention_scale.fill_(attention_scale)
        report.temperatures["attention"] = attention_scale
    mixed = mixed_logits(float(layer.attention_scale))
    output_scale, _ = fit_temperature(lambda s: _cross_entropy(s * mixed, calibration.targets), bracket)
    layer.output_scale.fill_(output_scale)
    report.temperatures["output"] = output_scale
