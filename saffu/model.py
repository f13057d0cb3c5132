"""The SAFFU layer: explicit self-attention over explicitly solved feed-forward experts.

For position t, which predicts the next token y_t from the tokens x_t, x_{t-1}, ...:

- block expert j (j = 0 .. b-1) reads the token x_{t-j} (one-hot, or its bit code) and
  gives the logits row of a softmax layer over the V tokens;
- the bag-of-words expert (when r > 0) reads the token distribution of the last r tokens,
  and its logits are the mean of the rows of those tokens (a sliding-window sum);
- each expert's log-probabilities are l_{t,k} = log_softmax(s_k * z_{t,k});
- attention weights a_t = softmax(s_A * phi_t W_A), where phi_t concatenates the bit codes
  of the b block tokens, divided by b;
- the output is p_t = softmax(s * sum_k a_t[k] l_{t,k}), a product of experts.

Token ids are laid out so that every position has a current token: the input at position
t is the previous token of the text, and position 0 reads the padding id V (start of
text). Context before position 0 is OUTSIDE: block experts read the padding row there,
and the bag-of-words window leaves it out.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from saffu.codes import check_code_dim

OUTSIDE = -1
IGNORE_INDEX = -100
# Bag-of-words windows up to this radius are summed directly instead of by prefix sums.
SMALL_RADIUS = 4


@dataclass(frozen=True)
class LayerShape:
    """Sizes of one SAFFU layer."""

    vocab_size: int
    block_size: int
    radius: int
    expert_kind: str  # "onehot" or "bitcode"
    code_dim: int | None
    attention_code_dim: int

    @property
    def n_experts(self) -> int:
        return self.block_size + (1 if self.radius > 0 else 0)

    @property
    def context(self) -> int:
        """Tokens left of a position that its experts read."""
        return max(self.block_size, self.radius) - 1

    @property
    def expert_input_dim(self) -> int:
        return self.vocab_size + 1 if self.expert_kind == "onehot" else int(self.code_dim)

    @classmethod
    def from_config(cls, model_cfg: DictConfig, vocab_size: int) -> "LayerShape":
        return cls(
            vocab_size=vocab_size,
            block_size=int(model_cfg.block_size),
            radius=int(model_cfg.radius),
            expert_kind=str(model_cfg.experts.kind),
            code_dim=None if model_cfg.experts.code_dim is None else int(model_cfg.experts.code_dim),
            attention_code_dim=int(model_cfg.attention_code_dim),
        )


def layer_parameter_counts(shape: LayerShape) -> dict[str, int]:
    """Dense parameter counts of one layer: E * (V+1) * V for one-hot experts (E * d * V for
    bit-code experts), b * d_attn * E for attention when E > 1, and one temperature per
    expert plus the attention and output temperatures."""
    experts = shape.n_experts * shape.expert_input_dim * shape.vocab_size
    attention = shape.block_size * shape.attention_code_dim * shape.n_experts if shape.n_experts > 1 else 0
    temperatures = shape.n_experts + 2
    return {"experts": experts, "attention": attention, "temperatures": temperatures}


def count_parameters(model_cfg: DictConfig, vocab_size: int) -> dict[str, int]:
    """Count a model's dense parameters from its config alone, before any solve.

    Returns per-layer counts named `layer{i}/experts`, `layer{i}/attention`,
    `layer{i}/temperatures` and their sum under `total`.
    """
    shape = LayerShape.from_config(model_cfg, vocab_size)
    return stack_parameter_counts([shape] * int(model_cfg.layers))


def stack_parameter_counts(shapes: list[LayerShape]) -> dict[str, int]:
    """Name each layer's counts `layer{i}/<matrix>` and add their sum under `total`."""
    counts: dict[str, int] = {}
    for index, shape in enumerate(shapes):
        for name, value in layer_parameter_counts(shape).items():
            counts[f"layer{index}/{name}"] = value
    counts["total"] = sum(counts.values())
    return counts


class SAFFULayer(nn.Module):
    """One SAFFU layer over token inputs.

    Parameters (all trainable):
        expert_table: one-hot experts, an Embedding of E * (V+1) rows of V logits with
            sparse gradients (row k * (V+1) + x is expert k's row for token x).
        expert_weights: bit-code experts, (E, d, V).
        expert_scale: (E,) temperatures s_k.
        attention_weights: W_A, (b * d_attn, E).
        attention_scale, output_scale: s_A and s.
    Buffers: attention_codes (V+1, d_attn) and, for bit-code experts, expert_codes (V+1, d).
    """

    def __init__(
        self,
        shape: LayerShape,
        attention_codes: torch.Tensor,
        expert_codes: torch.Tensor | None = None,
        reads_distribution: bool = False,
    ):
        super().__init__()
        self.shape = shape
        # Layers above the first read the top-k predictive distribution of the layer below
        # at each block position instead of the token there.
        self.reads_distribution = reads_distribution
        vocab, experts = shape.vocab_size, shape.n_experts
        if shape.expert_kind == "onehot":
            self.expert_table = nn.Embedding(experts * (vocab + 1), vocab, sparse=True)
        elif shape.expert_kind == "bitcode":
            if expert_codes is None:
                raise ValueError("bit-code experts need expert_codes of shape (V + 1, code_dim)")
            self.expert_weights = nn.Parameter(torch.zeros(experts, int(shape.code_dim), vocab))
            self.register_buffer("expert_codes", expert_codes)
        else:
            raise ValueError(f"model.experts.kind={shape.expert_kind!r} is unknown; use onehot or bitcode")
        self.expert_scale = nn.Parameter(torch.ones(experts))
        self.attention_weights = nn.Parameter(torch.zeros(shape.block_size * shape.attention_code_dim, experts))
        self.attention_scale = nn.Parameter(torch.ones(()))
        self.output_scale = nn.Parameter(torch.ones(()))
        self.register_buffer("attention_codes", attention_codes)

    # --- inputs -------------------------------------------------------------------

    def block_tokens(self, context_ids: torch.Tensor) -> torch.Tensor:
        """Tokens x_{t-j} of the block, (S, T, b), with OUTSIDE replaced by the padding id."""
        shape = self.shape
        length = context_ids.shape[1] - shape.context
        columns = [context_ids[:, shape.context - j : shape.context - j + length] for j in range(shape.block_size)]
        tokens = torch.stack(columns, dim=2)  # (S, T, b)
        return torch.where(tokens == OUTSIDE, shape.vocab_size, tokens)

    def block_inputs(self, inputs: "TopK", length: int) -> "TopK":
        """Gather the layer below's top-k distributions q_{t-j} at the block positions, (S, T, b, k)."""
        context = self.shape.context
        columns = range(self.shape.block_size)
        indices = torch.stack([inputs.indices[:, context - j : context - j + length] for j in columns], dim=2)
        values = torch.stack([inputs.values[:, context - j : context - j + length] for j in columns], dim=2)
        return TopK(indices, values)

    def _distribution_block_logits(self, inputs: "TopK", length: int) -> torch.Tensor:
        """Block-expert logits sum_i q_{t-j}[i] W_j[i] of a layer that reads distributions, (S, T, b, V)."""
        shape = self.shape
        vocab = shape.vocab_size
        block = self.block_inputs(inputs, length)  # (S, T, b, k)
        batch, positions, _, top_k = block.indices.shape
        if shape.expert_kind == "onehot":
            offsets = torch.arange(shape.block_size, device=block.indices.device)[:, None] * (vocab + 1)
            rows = (block.indices + offsets).reshape(-1, top_k)
            # A weighted sum of k table rows without materializing them, with sparse gradients.
            logits = F.embedding_bag(
                rows, self.expert_table.weight, per_sample_weights=block.values.reshape(-1, top_k),
                mode="sum", sparse=self.expert_table.sparse,
            )
            return logits.view(batch, positions, shape.block_size, vocab)
        codes = (block.values.unsqueeze(-1) * self.expert_codes[block.indices]).sum(dim=3)  # (S, T, b, d)
        return torch.einsum("stjd,jdv->stjv", codes, self.expert_weights[: shape.block_size])

    def attention_features(self, block_tokens: torch.Tensor) -> torch.Tensor:
        """phi_t: the bit codes of the block tokens, concatenated and divided by b; (S, T, b * d_attn)."""
        codes = self.attention_codes[block_tokens]  # (S, T, b, d_attn)
        return codes.flatten(2) / self.shape.block_size

    def _window_mean(self, rows: torch.Tensor, inside: torch.Tensor, length: int) -> torch.Tensor:
        """Mean of `rows` over the last r positions of each target position, leaving out OUTSIDE.

        rows: (S, C + T, D) per-position vectors; inside: (S, C + T) bool. Returns (S, T, D).
        Small windows add r shifted slices. Larger ones subtract two entries of a prefix
        sum, which costs O(D) per position whatever the radius. The prefix sum is float32.
        Its rounding error grows with the prefix, at most C + T rows, and the mean divides
        it by the window's count: with entries up to 19 in size (S=4, T=512, r=256,
        D=4096), the mean differed from a float64 prefix sum's by at most 2e-6. The
        float64 version took twice as long there, on one thread.
        """
        radius, context = self.shape.radius, self.shape.context
        rows = rows * inside.unsqueeze(-1)
        counts = inside.to(rows.dtype)
        if radius <= SMALL_RADIUS:
            window_sum = sum(rows[:, context - i : context - i + length] for i in range(radius))
            window_count = sum(counts[:, context - i : context - i + length] for i in range(radius))
            return window_sum / window_count.clamp_min(1.0).unsqueeze(-1)
        # The window of target t covers columns (context + t - radius, context + t]; the
        # context is at least radius - 1 columns, so only t = 0 can start at column 0.
        prefix, prefix_counts = rows.cumsum(dim=1), counts.cumsum(dim=1)
        window_sum = prefix[:, context : context + length]
        window_count = prefix_counts[:, context : context + length]
        before = context - radius
        if before >= 0:
            window_sum = window_sum - prefix[:, before : before + length]
            window_count = window_count - prefix_counts[:, before : before + length]
        else:
            zero = torch.zeros_like(window_sum[:, :1])
            window_sum = window_sum - torch.cat([zero, prefix[:, : length - 1]], dim=1)
            window_count = window_count - F.pad(prefix_counts[:, : length - 1], (1, 0))
        return window_sum / window_count.clamp_min(1.0).unsqueeze(-1)

    # --- experts ------------------------------------------------------------------

    def expert_logits(
        self, context_ids: torch.Tensor, inputs: "TopK | None" = None, block: bool = True
    ) -> torch.Tensor:
        """Raw logits z_{t,k} of every expert, (S, T, E, V), before the temperatures.

        `inputs` is the layer below's top-k distribution at every column of `context_ids`,
        needed when the layer reads distributions. With block=False, only the
        bag-of-words expert's logits are computed, (S, T, 1, V).
        """
        shape = self.shape
        vocab = shape.vocab_size
        length = context_ids.shape[1] - shape.context
        parts = []
        if block and self.reads_distribution:
            parts.append(self._distribution_block_logits(inputs, length))
        elif block:
            tokens = self.block_tokens(context_ids)  # (S, T, b)
            if shape.expert_kind == "onehot":
                offsets = torch.arange(shape.block_size, device=tokens.device) * (vocab + 1)
                parts.append(self.expert_table(tokens + offsets))  # (S, T, b, V)
            else:
                codes = self.expert_codes[tokens]  # (S, T, b, d)
                parts.append(torch.einsum("stjd,jdv->stjv", codes, self.expert_weights[: shape.block_size]))
        if shape.radius == 0:
            return parts[0]

        inside = context_ids != OUTSIDE
        window_ids = torch.where(inside, context_ids, vocab)
        if shape.expert_kind == "onehot":
            rows = self.expert_table(window_ids + shape.block_size * (vocab + 1))  # (S, C + T, V)
            bag = self._window_mean(rows, inside, length)
        else:
            mean_code = self._window_mean(self.expert_codes[window_ids], inside, length)  # (S, T, d)
            bag = mean_code @ self.expert_weights[shape.block_size]
        parts.append(bag.unsqueeze(2))
        return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]

    # --- output -------------------------------------------------------------------

    def attention(self, context_ids: torch.Tensor) -> torch.Tensor:
        """Attention weights a_t over the experts, (S, T, E)."""
        features = self.attention_features(self.block_tokens(context_ids))
        return F.softmax(self.attention_scale * (features @ self.attention_weights), dim=-1)

    def forward(self, context_ids: torch.Tensor, inputs: "TopK | None" = None) -> torch.Tensor:
        """Map context ids (S, C + T), C = shape.context, to next-token logits (S, T, V):
        s * sum_k a_t[k] l_{t,k}.

        l_{t,k} differs from s_k * z_{t,k} by one log-normalizer per expert and position,
        and the attention-weighted sum of those is constant over the vocabulary, so the
        output softmax is the same without normalizing each expert. The sum is
        sum_k (a_t[k] s_k) z_{t,k}, formed by `mixed_logits` without the experts' logits.
        """
        weights = self.attention(context_ids) * self.expert_scale
        return self.output_scale * self.mixed_logits(context_ids, weights, inputs)

    def mixed_logits(
        self, context_ids: torch.Tensor, weights: torch.Tensor, inputs: "TopK | None" = None
    ) -> torch.Tensor:
        """sum_k weights[..., k] z_{t,k}, (S, T, V), for expert weights (S, T, E).

        Equal to weighting `expert_logits`, whose (S, T, E, V) tensor is E times the size of
        the output. Every block expert is linear in its input, so the weights move to the
        inputs instead. One-hot rows are summed with weights by `embedding_bag`. Bit-code
        experts become one matrix product of the weighted codes of all experts, (S, T, E * d)
        by (E * d, V).
        """
        shape = self.shape
        vocab, blocks = shape.vocab_size, shape.block_size
        batch, length = weights.shape[:2]
        block_weights = weights[..., :blocks]
        onehot = shape.expert_kind == "onehot"
        if self.reads_distribution:
            block = self.block_inputs(inputs, length)  # (S, T, b, k)
            if onehot:
                offsets = torch.arange(blocks, device=block.indices.device)[:, None] * (vocab + 1)
                rows = (block.indices + offsets).flatten(2)  # (S, T, b * k)
                row_weights = (block.values * block_weights.unsqueeze(-1)).flatten(2)
            else:
                codes = (block.values.unsqueeze(-1) * self.expert_codes[block.indices]).sum(dim=3)  # (S, T, b, d)
        else:
            tokens = self.block_tokens(context_ids)  # (S, T, b)
            if onehot:
                rows = tokens + torch.arange(blocks, device=tokens.device) * (vocab + 1)
                row_weights = block_weights
            else:
                codes = self.expert_codes[tokens]  # (S, T, b, d)

        if onehot:
            mixed = F.embedding_bag(
                rows.reshape(batch * length, -1), self.expert_table.weight,
                per_sample_weights=row_weights.reshape(batch * length, -1).to(self.expert_table.weight.dtype),
                mode="sum", sparse=self.expert_table.sparse,
            ).view(batch, length, vocab)
            if shape.radius > 0:
                mixed = mixed + weights[..., blocks:] * self.expert_logits(context_ids, block=False)[:, :, 0]
            return mixed

        weighted = [codes * block_weights.unsqueeze(-1)]  # (S, T, b, d)
        if shape.radius > 0:
            inside = context_ids != OUTSIDE
            window_ids = torch.where(inside, context_ids, vocab)
            mean_code = self._window_mean(self.expert_codes[window_ids], inside, length)  # (S, T, d)
            weighted.append((mean_code * weights[..., blocks:]).unsqueeze(2))
        stacked = torch.cat(weighted, dim=2) if len(weighted) > 1 else weighted[0]
        experts = stacked.shape[2]
        return stacked.flatten(2) @ self.expert_weights[:experts].flatten(0, 1)


@dataclass
class TopK:
    """A truncated distribution per position: token ids and their renormalized probabilities."""

    indices: torch.Tensor  # (..., k) int64
    values: torch.Tensor  # (..., k) float, each row sums to one


def top_k_inputs(logits: torch.Tensor, context_ids: torch.Tensor, top_k: int) -> TopK:
    """Truncate the distributions softmax(logits), (S, P, V), to their top k entries and
    renormalize them. Columns whose id is OUTSIDE read the one-hot padding id V instead.

    The renormalized top k of softmax(logits) is the softmax of the k largest logits, so
    the softmax over all V entries is never formed.
    """
    top_logits, indices = logits.topk(min(top_k, logits.shape[-1]), dim=-1)
    values = F.softmax(top_logits, dim=-1)
    outside = (context_ids == OUTSIDE).unsqueeze(-1)
    pad_indices = torch.full_like(indices, logits.shape[-1])
    pad_values = torch.zeros_like(values)
    pad_values[..., 0] = 1.0
    return TopK(torch.where(outside, pad_indices, indices), torch.where(outside, pad_values, values))


class SAFFUModel(nn.Module):
    """A stack of SAFFU layers. Layer l + 1 reads layer l's top-k predictive distribution at
    its block positions; the last layer's logits are the model's prediction."""

    def __init__(self, layers: list[SAFFULayer], top_k: int = 32):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.top_k = top_k

    @property
    def context(self) -> int:
        return sum(layer.shape.context for layer in self.layers)

    @property
    def vocab_size(self) -> int:
        return self.layers[0].shape.vocab_size

    def forward(self, context_ids: torch.Tensor, depth: int | None = None) -> torch.Tensor:
        """Map context ids (S, C + T), C = self.context, to next-token logits (S, T, V).

        With `depth`, run only the first `depth` layers; context_ids must then carry the
        context of those layers only.
        """
        layers = list(self.layers)[: depth or len(self.layers)]
        inputs = None
        for index, layer in enumerate(layers):
            # Layer `index` must cover the positions that the layers above it read.
            later = sum(above.shape.context for above in layers[index + 1 :])
            width = context_ids.shape[1] - sum(below.shape.context for below in layers[:index])
            logits = layer(context_ids[:, -width:], inputs)  # (S, later + T, V)
            if index + 1 < len(layers):
                inputs = top_k_inputs(logits, context_ids[:, -(logits.shape[1]) :], self.top_k)
        return logits

    def parameter_counts(self) -> dict[str, int]:
        return stack_parameter_counts([layer.shape for layer in self.layers])

    def sparse_parameters(self) -> list[nn.Parameter]:
        """Parameters whose gradients are sparse (the one-hot expert tables)."""
        return [layer.expert_table.weight for layer in self.layers if hasattr(layer, "expert_table")]

    def dense_parameters(self) -> list[nn.Parameter]:
        sparse = {id(p) for p in self.sparse_parameters()}
        return [p for p in self.parameters() if id(p) not in sparse]


def make_windows(
    tokens: torch.Tensor, starts: torch.Tensor, span: int, context: int, vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut spans of positions out of a token sequence.

    Position t reads the input token tokens[t - 1] (the padding id V at t = 0) and predicts
    tokens[t]. Returns context ids (S, context + span), with OUTSIDE left of position 0 and
    past the end, and targets (S, span), with IGNORE_INDEX past the end.
    """
    n = tokens.numel()
    offsets = torch.arange(-context, span)
    positions = starts[:, None] + offsets  # (S, C + T)
    previous = (positions - 1).clamp(0, n - 1)
    inputs = torch.where(positions == 0, vocab_size, tokens[previous])
    inputs = torch.where((positions < 0) | (positions >= n), OUTSIDE, inputs)

    target_positions = positions[:, context:]
    targets = torch.where(target_positions < n, tokens[target_positions.clamp(max=n - 1)], IGNORE_INDEX)
    return inputs, targets


def span_starts(n_positions: int, span: int) -> torch.Tensor:
    """Starts of consecutive spans that cover every position once."""
    return torch.arange(0, n_positions, span)


def sample_span_starts(n_positions: int, span: int, n_spans: int, generator: torch.Generator) -> torch.Tensor:
    """Starts of `n_spans` spans at random places, without overlap where the text allows."""
    slots = max(1, n_positions // span)
    if n_spans >= slots:
        return span_starts(n_positions, span)
    chosen = torch.randperm(slots, generator=generator)[:n_spans]
    return torch.sort(chosen).values * span


def chunk_positions(n_experts: int, vocab_size: int, budget_elements: int = 1 << 25) -> int:
    """Positions per chunk so that one (positions, E, V) float tensor stays near `budget_elements`."""
    return max(16, budget_elements // max(1, n_experts * vocab_size))


def init_random_(layer: SAFFULayer, generator: torch.Generator, std: float = 0.02) -> None:
    """Reset a layer to a random start (the bp-only baseline): small normal logits, unit temperatures."""
    with torch.no_grad():
        for parameter in (getattr(layer, "expert_table", None), getattr(layer, "expert_weights", None)):
            if parameter is None:
                continue
            weight = parameter.weight if isinstance(parameter, nn.Embedding) else parameter
            weight.copy_(torch.randn(weight.shape, generator=generator) * std)
        layer.attention_weights.copy_(torch.randn(layer.attention_weights.shape, generator=generator) * std)
        layer.expert_scale.fill_(1.0)
        layer.attention_scale.fill_(1.0)
        layer.output_scale.fill_(1.0)

