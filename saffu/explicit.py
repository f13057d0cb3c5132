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

from saffu.counts import CountCache, TextCounts
from saffu.model import (
    IGNORE_INDEX,
    OUTSIDE,
    SAFFULayer,
    SAFFUModel,
    TopK,
    top_k_inputs,
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
    """Fitted temperatures and the seconds each part of the solve took."""

    seconds: dict[str, float] = field(default_factory=dict)
    temperatures: dict[str, float] = field(default_factory=dict)
    stored_counts: int = 0  # non-zero co-occurrence entries kept sparsely


def shifted_inputs(tokens: torch.Tensor, offset: int, pad: int) -> torch.Tensor:
    """Input token x_{t - offset} at every position t (x_t = tokens[t - 1]; padding before the text)."""
    inputs = torch.cat([torch.full((offset + 1,), pad, dtype=torch.long), tokens[: max(0, tokens.numel() - offset - 1)]])
    return inputs[: tokens.numel()]


@torch.no_grad()
def solve_model(
    model: SAFFUModel,
    tokens: torch.Tensor,
    solver_cfg: DictConfig,
    generator: torch.Generator,
    counts: CountCache | None = None,
) -> SolveReport:
    """Solve every layer of `model` explicitly, bottom up, on the training ids `tokens` (n,).

    A layer above the first is solved from the top-k predictive distributions of the
    layers below at every training position, computed in streamed chunks. `counts` keeps
    the token co-occurrence counts on disk for the next job on the same text.
    """
    report = SolveReport()
    for index, layer in enumerate(model.layers):
        start = time.perf_counter()
        below = None if index == 0 else _distributions_below(model, index, tokens)
        report.seconds[f"layer{index}/inputs"] = time.perf_counter() - start
        layer_report = solve_layer(layer, tokens, solver_cfg, generator, below, counts)
        report.stored_counts += layer_report.stored_counts
        for name, value in layer_report.seconds.items():
            report.seconds[f"layer{index}/{name}"] = value
        for name, value in layer_report.temperatures.items():
            report.temperatures[f"layer{index}/{name}"] = value
        log.info("layer %d solved in %.1f s", index, time.perf_counter() - start)
    return report


def _distributions_below(model: SAFFUModel, depth: int, tokens: torch.Tensor) -> TopK:
    """Top-k predictive distribution of the first `depth` layers at every position, (n, k)."""
    span = 1024
    context = sum(layer.shape.context for layer in model.layers[:depth])
    starts = span_starts(tokens.numel(), span)
    spans_per_chunk = max(1, chunk_positions(model.layers[depth - 1].shape.n_experts, model.vocab_size) // span)
    # The result is allocated once and filled chunk by chunk. Keeping each chunk's small
    # result between the chunk's large temporaries fragmented glibc's heap, so resident
    # memory grew with every chunk: 19.6 GB for two one-hot layers on 1.5M tokens.
    top_k = min(model.top_k, model.vocab_size)
    indices = torch.empty(tokens.numel(), top_k, dtype=torch.long)
    values = torch.empty(tokens.numel(), top_k)
    filled = 0
    for first in range(0, starts.numel(), spans_per_chunk):
        context_ids, targets = make_windows(tokens, starts[first : first + spans_per_chunk], span, context, model.vocab_size)
        logits = model(context_ids, depth=depth)  # (S, T, V)
        top = top_k_inputs(logits, context_ids[:, context:], model.top_k)
        keep = targets != IGNORE_INDEX
        count = int(keep.sum())
        indices[filled : filled + count] = top.indices[keep]
        values[filled : filled + count] = top.values[keep]
        filled += count
    return TopK(indices[:filled], values[:filled])


def layer_windows(
    tokens: torch.Tensor, starts: torch.Tensor, span: int, layer: SAFFULayer, below: TopK | None
) -> tuple[torch.Tensor, torch.Tensor, TopK | None]:
    """Context ids, targets and (for a layer that reads distributions) its inputs on spans."""
    shape = layer.shape
    context_ids, targets = make_windows(tokens, starts, span, shape.context, shape.vocab_size)
    if below is None:
        return context_ids, targets, None
    positions = (starts[:, None] + torch.arange(-shape.context, span)).clamp(0, tokens.numel() - 1)
    outside = (context_ids == OUTSIDE).unsqueeze(-1)
    pad_indices = torch.full_like(below.indices[positions], shape.vocab_size)
    pad_values = torch.zeros_like(below.values[positions])
    pad_values[..., 0] = 1.0
    inputs = TopK(
        torch.where(outside, pad_indices, below.indices[positions]),
        torch.where(outside, pad_values, below.values[positions]),
    )
    return context_ids, targets, inputs


@torch.no_grad()
def solve_layer(
    layer: SAFFULayer,
    tokens: torch.Tensor,
    solver_cfg: DictConfig,
    generator: torch.Generator,
    below: TopK | None = None,
    counts: CountCache | None = None,
) -> SolveReport:
    """Set every parameter of `layer` to the explicit solution on the training ids `tokens` (n,).

    `below` is the layer below's top-k distribution at every position, for a layer that
    reads distributions. `counts` reads and keeps the token co-occurrence counts.
    """
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
    text_counts = (counts or CountCache(None)).bind(tokens, counted, vocab)
    for offset in range(shape.block_size):
        if below is not None:
            _set_distribution_expert(layer, offset, tokens, counted, below, alpha)
            continue
        flat, count = offset_pair_counts(text_counts, tokens, counted, offset, vocab)
        report.stored_counts += flat.numel()
        _set_expert(layer, offset, flat, count, alpha)
    if shape.radius > 0:
        _set_bag_of_words(layer, bag_of_words_counts(text_counts, tokens, counted, shape.radius, vocab), alpha)
    report.seconds["experts"] = time.perf_counter() - start

    start = time.perf_counter()
    if solver_cfg.calibrate:
        calibration = _Windows(*layer_windows(tokens, calibration_starts, CALIBRATION_SPAN, layer, below))
        _fit_expert_temperatures(layer, calibration, solver_cfg, report)
    report.seconds["expert_temperatures"] = time.perf_counter() - start

    start = time.perf_counter()
    if shape.n_experts > 1:
        _set_attention(layer, tokens, solver_cfg, generator, below)
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


def _set_distribution_expert(
    layer: SAFFULayer, offset: int, tokens: torch.Tensor, counted: torch.Tensor, below: TopK, alpha: float
) -> None:
    """Solve block expert `offset` of a layer that reads distributions: F[i, y] sums
    q_{t-offset}[i] over the positions t whose next token is y."""
    shape = layer.shape
    vocab, n = shape.vocab_size, tokens.numel()
    cooccurrence = torch.zeros((vocab + 1) * vocab, dtype=torch.float64)
    targets = tokens[offset:][counted[offset:]]
    sources = torch.arange(n - offset)[counted[offset:]]
    flat = (below.indices[sources] * vocab + targets[:, None]).reshape(-1)
    cooccurrence.index_add_(0, flat, below.values[sources].reshape(-1).to(torch.float64))
    # Positions before the text read the padding row.
    head = tokens[:offset][counted[:offset]]
    cooccurrence.index_add_(0, vocab * vocab + head, torch.ones(head.numel(), dtype=torch.float64))
    cooccurrence = cooccurrence.view(vocab + 1, vocab)

    if shape.expert_kind == "onehot":
        rows = slice(offset * (vocab + 1), (offset + 1) * (vocab + 1))
        layer.expert_table.weight[rows] = explicit_weights(cooccurrence, alpha)
    else:
        layer.expert_weights[offset] = explicit_weights(layer.expert_codes.to(torch.float64).t() @ cooccurrence, alpha)


def offset_pair_counts(
    text_counts: TextCounts, tokens: torch.Tensor, counted: torch.Tensor, offset: int, vocab: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse counts of (x_{t - offset}, next token) pairs over the counted positions, as
    `pair_counts` returns them, read from `text_counts` when a job has counted them before."""

    def count() -> tuple[torch.Tensor, torch.Tensor]:
        flat, count = pair_counts(shifted_inputs(tokens, offset, vocab)[counted], tokens[counted], vocab)
        # (V + 1) * V and the counts fit int32, which halves the file.
        return flat.to(torch.int32), count.to(torch.int32)

    flat, count = text_counts.get(f"offset{offset}", count)
    return flat.to(torch.int64), count.to(torch.int64)


def bag_of_words_counts(
    text_counts: TextCounts, tokens: torch.Tensor, counted: torch.Tensor, radius: int, vocab: int
) -> torch.Tensor:
    """Co-occurrence F (V + 1, V) of the bag-of-words expert: F[x, y] sums, over counted
    positions t with next token y, the share of token x in the window of the last `radius`
    inputs (1 / window size per occurrence). Read from `text_counts` when counted before."""
    n = tokens.numel()

    def count() -> tuple[torch.Tensor, torch.Tensor]:
        # Each position adds its window's token distribution: weight 1 / window size per token.
        weight = counted / torch.clamp(torch.arange(n, dtype=torch.float64) + 1, max=radius)
        cooccurrence = torch.zeros((vocab + 1) * vocab, dtype=torch.float64)
        for offset in range(min(radius, n)):
            inputs = shifted_inputs(tokens, offset, vocab)[offset:]
            cooccurrence.index_add_(0, inputs * vocab + tokens[offset:], weight[offset:])
        # Stored sparsely: most (input, next token) pairs never occur within a window.
        seen = cooccurrence.nonzero().squeeze(1)
        return seen.to(torch.int32), cooccurrence[seen]

    seen, values = text_counts.get(f"bag_of_words_r{radius}", count)
    cooccurrence = torch.zeros((vocab + 1) * vocab, dtype=torch.float64)
    cooccurrence[seen.to(torch.int64)] = values
    return cooccurrence.view(vocab + 1, vocab)


def _set_bag_of_words(layer: SAFFULayer, cooccurrence: torch.Tensor, alpha: float) -> None:
    """Solve the bag-of-words expert from its co-occurrence F (V + 1, V)."""
    shape = layer.shape
    vocab = shape.vocab_size
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
    inputs: TopK | None = None  # the layer below's distributions, (S, C + T, k)


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
    general = list(range(shape.block_size)) if shape.expert_kind == "bitcode" or layer.reads_distribution else []
    if shape.radius > 0:
        general.append(shape.block_size)
    if not general:
        return
    logits = layer.expert_logits(calibration.context_ids, calibration.inputs)  # (S, T, E, V)
    for k in general:
        expert = logits[:, :, k]
        scale, loss = fit_temperature(lambda s: _cross_entropy(s * expert, calibration.targets), bracket)
        layer.expert_scale[k] = scale
        report.temperatures[f"expert{k}"] = scale
        log.debug("expert %d temperature %.3f (calibration loss %.4f)", k, scale, loss)


def _set_attention(
    layer: SAFFULayer, tokens: torch.Tensor, solver_cfg: DictConfig, generator: torch.Generator, below: TopK | None
) -> None:
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
    tables = _block_log_prob_tables(layer)
    cooccurrence = torch.zeros(shape.block_size * shape.attention_code_dim, shape.n_experts, dtype=torch.float64)
    for first in range(0, starts.numel(), spans_per_chunk):
        context_ids, targets, inputs = layer_windows(tokens, starts[first : first + spans_per_chunk], span, layer, below)
        valid = targets != IGNORE_INDEX
        target_log_probs = _target_log_probs(layer, context_ids, targets.clamp_min(0), inputs, tables)  # (S, T, E)
        if solver_cfg.attention_target == "hard":
            attention_targets = F.one_hot(target_log_probs.argmax(dim=-1), shape.n_experts).to(torch.float64)
        else:
            attention_targets = F.softmax(float(solver_cfg.attention_tau) * target_log_probs, dim=-1).to(torch.float64)
        features = layer.attention_features(layer.block_tokens(context_ids)).to(torch.float64)  # (S, T, b * d_attn)
        features = features[valid]
        cooccurrence += features.t() @ attention_targets[valid]
    layer.attention_weights.copy_(explicit_weights(cooccurrence, float(solver_cfg.alpha)))


def _block_log_prob_tables(layer: SAFFULayer) -> list[torch.Tensor] | None:
    """Per-token log-probability tables (V + 1, V) of the block experts of a token layer:
    the one-hot rows themselves, or log_softmax(s_j * C W_j) for bit-code experts."""
    shape = layer.shape
    vocab = shape.vocab_size
    if layer.reads_distribution:
        return None
    if shape.expert_kind == "onehot":
        return [layer.expert_table.weight[j * (vocab + 1) : (j + 1) * (vocab + 1)] for j in range(shape.block_size)]
    return [
        F.log_softmax(layer.expert_scale[j] * (layer.expert_codes @ layer.expert_weights[j]), dim=-1)
        for j in range(shape.block_size)
    ]


def _target_log_probs(
    layer: SAFFULayer,
    context_ids: torch.Tensor,
    targets: torch.Tensor,
    inputs: TopK | None = None,
    tables: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """log P_k(y_t) of every expert for the true next token, (S, T, E).

    A block expert's row depends on one token only, so its log-probability is a lookup:
    W_j[x_{t-j}, y_t] for one-hot experts, whose rows are already normalized
    log-conditionals, and a row of log_softmax(s_j * C W_j) for bit-code experts. Only the
    bag-of-words expert needs its whole softmax at every position, and so do the block
    experts of a layer that reads distributions.
    """
    shape = layer.shape
    if layer.reads_distribution:
        logits = layer.expert_logits(context_ids, inputs) * layer.expert_scale[:, None]
        log_probs = F.log_softmax(logits, dim=-1)  # (S, T, E, V)
        return log_probs.gather(-1, targets[:, :, None, None].expand(-1, -1, shape.n_experts, 1)).squeeze(-1)
    vocab = shape.vocab_size
    tokens = layer.block_tokens(context_ids)  # (S, T, b)
    tables = tables if tables is not None else _block_log_prob_tables(layer)
    columns = [table[tokens[:, :, j], targets] for j, table in enumerate(tables)]
    if shape.radius > 0:
        bag = layer.expert_logits(context_ids, block=False)[:, :, 0]  # (S, T, V)
        bag = F.log_softmax(layer.expert_scale[shape.block_size] * bag, dim=-1)
        columns.append(bag.gather(-1, targets.unsqueeze(-1)).squeeze(-1))
    return torch.stack(columns, dim=-1)


def _fit_output_temperatures(layer: SAFFULayer, calibration: _Windows, solver_cfg: DictConfig, report: SolveReport) -> None:
    """Fit s_A with s = 1, then s, on the calibration spans."""
    bracket = tuple(solver_cfg.temperature_bracket)
    scaled_logits = layer.expert_logits(calibration.context_ids, calibration.inputs) * layer.expert_scale[:, None]
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
