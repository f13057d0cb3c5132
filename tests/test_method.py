"""The explicit solution, token codes, expert tables, attention targets and sparse fine-tuning."""

import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from saffu.codes import bit_codes, check_code_dim, min_code_dim
from saffu.evaluate import evaluate
from saffu.explicit import shifted_inputs, solve_layer
from saffu.finetune import batch_loss, make_optimizers
from saffu.model import LayerShape, SAFFULayer, SAFFUModel, make_windows
from saffu.solver import explicit_weights, fit_temperature, onehot_table, pair_counts


def solver_config(**overrides):
    values = dict(
        alpha=0.01, calibrate=True, temperature_bracket=[0.25, 32.0], calibration_tokens=2048,
        attention_target="hard", attention_tau=1.0, attention_tokens=None,
    )
    values.update(overrides)
    return OmegaConf.create(values)


def markov_chain(vocab_size: int, seed: int, concentration: float = 0.3) -> torch.Tensor:
    """A random first-order transition matrix P[x, y] with peaked rows."""
    generator = torch.Generator().manual_seed(seed)
    gamma = torch.distributions.Gamma(torch.full((vocab_size, vocab_size), concentration), torch.ones(vocab_size, vocab_size))
    torch.manual_seed(seed)
    rows = gamma.sample()
    return (rows / rows.sum(dim=1, keepdim=True)).to(torch.float64), generator


def sample_chain(transitions: torch.Tensor, length: int, generator: torch.Generator) -> torch.Tensor:
    tokens = torch.empty(length, dtype=torch.long)
    state = 0
    cumulative = transitions.cumsum(dim=1)
    uniforms = torch.rand(length, generator=generator, dtype=torch.float64)
    for t in range(length):
        state = int(torch.searchsorted(cumulative[state], uniforms[t]).clamp(max=transitions.shape[0] - 1))
        tokens[t] = state
    return tokens


def make_layer(tokens: torch.Tensor, vocab_size: int, block_size: int, radius: int, kind: str = "onehot", code_dim=None):
    counts = torch.bincount(tokens, minlength=vocab_size)
    shape = LayerShape(vocab_size, block_size, radius, kind, code_dim, min_code_dim(vocab_size + 1) + 2)
    expert_codes = bit_codes(counts, code_dim) if kind == "bitcode" else None
    return SAFFULayer(shape, bit_codes(counts, shape.attention_code_dim), expert_codes)


# --- the single-layer explicit solution ------------------------------------------------


def test_explicit_onehot_solution_is_stationary_and_optimal(gutenberg_dir):
    """On one-hot inputs with the alpha pseudo-counts added to the data, W is the optimum."""
    text = (gutenberg_dir / "train.txt").read_text(encoding="utf-8")[:200_000].lower()
    alphabet = sorted(set(text))
    index = {ch: i for i, ch in enumerate(alphabet)}
    ids = torch.tensor([index[ch] for ch in text])
    inputs, targets = ids[:-1], ids[1:]
    size, alpha = len(alphabet), 0.5

    flat, count = pair_counts(inputs, targets, size)
    weights = onehot_table(flat, count, size, size, alpha).to(torch.float64).requires_grad_(True)

    # The smoothed data: every (input, target) pair's count plus alpha, as example weights.
    counts = torch.zeros(size * size, dtype=torch.float64).index_add_(0, flat, count.double()).view(size, size) + alpha
    def loss_of(w):
        return -(counts * F.log_softmax(w, dim=1)).sum() / counts.sum()

    loss = loss_of(weights)
    (gradient,) = torch.autograd.grad(loss, weights)
    assert gradient.norm().item() < 1e-6

    start_loss = loss.item()
    candidate = weights.detach().clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([candidate], max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-15)
    def closure():
        optimizer.zero_grad()
        value = loss_of(candidate)
        value.backward()
        return value
    optimizer.step(closure)
    assert loss_of(candidate).item() >= start_loss - 1e-9


def test_explicit_weights_match_onehot_table():
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randint(0, 7, (500,), generator=generator)
    targets = torch.randint(0, 5, (500,), generator=generator)
    flat, count = pair_counts(inputs, targets, 5)
    dense = torch.zeros(7, 5, dtype=torch.float64)
    for x, y in zip(inputs.tolist(), targets.tolist()):
        dense[x, y] += 1
    torch.testing.assert_close(onehot_table(flat, count, 7, 5, 0.1), explicit_weights(dense, 0.1))


def test_explicit_weights_reject_nonpositive_alpha():
    with pytest.raises(ValueError, match="alpha=0"):
        explicit_weights(torch.ones(2, 2), 0.0)


def test_explicit_bigram_reaches_markov_chain_perplexity():
    """Held-out perplexity of the explicit bigram is within 3% of the chain's true value."""
    vocab_size = 40
    transitions, generator = markov_chain(vocab_size, seed=1)
    train_tokens = sample_chain(transitions, 200_000, generator)
    held_out = sample_chain(transitions, 50_000, generator)

    # The true perplexity of the held-out text under the chain (first token excluded below too).
    true_nll = -torch.log(transitions[held_out[:-1], held_out[1:]]).mean().item()

    layer = make_layer(train_tokens, vocab_size, block_size=1, radius=0)
    solve_layer(layer, train_tokens, solver_config(calibrate=False), torch.Generator().manual_seed(0))
    model = SAFFUModel([layer])
    context_ids, targets = make_windows(held_out, torch.tensor([0]), held_out.numel(), 0, vocab_size)
    with torch.no_grad():
        logits = model(context_ids)[0, 1:]
    model_nll = F.cross_entropy(logits, targets[0, 1:]).item()
    assert math.exp(model_nll) == pytest.approx(math.exp(true_nll), rel=0.03)


def test_temperature_fit_never_raises_loss():
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(2000, 30, generator=generator)
    targets = torch.randint(0, 30, (2000,), generator=generator)
    loss_at = lambda s: F.cross_entropy(s * logits, targets).item()
    scale, loss = fit_temperature(loss_at)
    assert loss <= loss_at(1.0)
    assert loss == pytest.approx(loss_at(scale))


# --- token codes ----------------------------------------------------------------------


def test_bit_codes_unique_nonnegative_normalized():
    counts = torch.tensor([50, 3, 3, 90, 0, 7, 1, 1, 12, 5])
    codes = bit_codes(counts, 4)
    assert codes.shape == (11, 4)
    assert (codes >= 0).all()
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(11))
    assert torch.unique(codes, dim=0).shape[0] == 11


def test_bit_codes_sparsest_for_frequent_tokens():
    counts = torch.tensor([5, 90, 40, 1, 1])
    ones = (bit_codes(counts, 3) > 0).sum(dim=1)
    assert ones[1] == 1  # most frequent
    assert ones[2] == 1
    assert ones[0] == 1
    assert ones[3] == 2  # ties by id: token 3 before token 4
    assert ones[4] == 2


def test_bit_codes_reject_small_dimension():
    assert min_code_dim(4097) == 13
    with pytest.raises(ValueError, match="at least 13"):
        check_code_dim(12, 4096)
    with pytest.raises(ValueError, match="at least 13"):
        bit_codes(torch.ones(4096), 12)


# --- expert tables and attention targets ----------------------------------------------


@pytest.fixture(scope="module")
def chain_tokens():
    transitions, generator = markov_chain(12, seed=5, concentration=0.5)
    return sample_chain(transitions, 3000, generator)


@pytest.mark.parametrize("kind, code_dim", [("onehot", None), ("bitcode", 5)])
def test_expert_tables_match_dense_counts(chain_tokens, kind, code_dim):
    vocab, block_size, radius, alpha = 12, 3, 4, 0.01
    layer = make_layer(chain_tokens, vocab, block_size, radius, kind, code_dim)
    solve_layer(layer, chain_tokens, solver_config(calibrate=False), torch.Generator().manual_seed(0))

    # Dense reference: inputs x_t = previous token (padding id V at t = 0 and before the text).
    n = chain_tokens.numel()
    inputs = [vocab] + chain_tokens[:-1].tolist()
    targets = chain_tokens.tolist()
    codes = layer.expert_codes.double() if kind == "bitcode" else torch.eye(vocab + 1, dtype=torch.float64)
    for offset in range(block_size):
        dense = torch.zeros(vocab + 1, vocab, dtype=torch.float64)
        for t in range(n):
            x = inputs[t - offset] if t - offset >= 0 else vocab
            dense[x, targets[t]] += 1
        expected = explicit_weights(codes.t() @ dense, alpha)
        actual = layer.expert_table.weight[offset * (vocab + 1) : (offset + 1) * (vocab + 1)] if kind == "onehot" else layer.expert_weights[offset]
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)

    bag = torch.zeros(vocab + 1, vocab, dtype=torch.float64)
    for t in range(n):
        window = inputs[max(0, t - radius + 1) : t + 1]
        for x in window:
            bag[x, targets[t]] += 1.0 / len(window)
    expected = explicit_weights(codes.t() @ bag, alpha)
    actual = layer.expert_table.weight[block_size * (vocab + 1) :] if kind == "onehot" else layer.expert_weights[block_size]
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_attention_weights_match_dense_targets(chain_tokens):
    vocab, block_size, radius, alpha = 12, 3, 4, 0.01
    layer = make_layer(chain_tokens, vocab, block_size, radius)
    solve_layer(layer, chain_tokens, solver_config(calibrate=False), torch.Generator().manual_seed(0))

    # Dense reference: each expert's full softmax at every position, the argmax for the true token.
    n = chain_tokens.numel()
    context_ids, targets = make_windows(chain_tokens, torch.tensor([0]), n, layer.shape.context, vocab)
    with torch.no_grad():
        logits = (layer.expert_logits(context_ids) * layer.expert_scale[:, None]).double()
        log_probs = F.log_softmax(logits, dim=-1)[0]  # (n, E, V)
        target_log_probs = log_probs[torch.arange(n), :, targets[0]]
        # The first expert within rounding of the best, as argmax takes the first of exact ties.
        near_best = target_log_probs >= target_log_probs.max(dim=-1, keepdim=True).values - 1e-5
        best = near_best.double().argmax(dim=-1)
        features = layer.attention_features(layer.block_tokens(context_ids))[0].double()
    cooccurrence = features.t() @ F.one_hot(best, layer.shape.n_experts).double()
    torch.testing.assert_close(layer.attention_weights.detach(), explicit_weights(cooccurrence, alpha), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block_size", [2, 8], ids=["context-is-radius-minus-1", "context-wider-than-radius"])
def test_window_mean_matches_direct_mean(chain_tokens, block_size):
    layer = make_layer(chain_tokens, 12, block_size, 5)
    solve_layer(layer, chain_tokens, solver_config(calibrate=False), torch.Generator().manual_seed(0))
    context_ids, _ = make_windows(chain_tokens, torch.tensor([0, 700]), 50, layer.shape.context, 12)
    with torch.no_grad():
        bag = layer.expert_logits(context_ids)[:, :, -1]  # (S, T, V)
    table = layer.expert_table.weight[block_size * 13 :]
    for s in range(2):
        for t in range(50):
            column = layer.shape.context + t
            window = [x for x in context_ids[s, column - 4 : column + 1].tolist() if x >= 0]
            torch.testing.assert_close(bag[s, t], table[window].mean(dim=0), atol=1e-4, rtol=1e-4)


# --- fine-tuning ----------------------------------------------------------------------


def test_finetune_step_updates_only_batch_rows(chain_tokens):
    vocab = 12
    layer = make_layer(chain_tokens, vocab, 2, 0)
    solve_layer(layer, chain_tokens, solver_config(calibrate=False), torch.Generator().manual_seed(0))
    model = SAFFUModel([layer])
    before = layer.expert_table.weight.detach().clone()

    # A batch that reads only tokens 0..4 (and the padding row of each expert).
    tokens = torch.tensor([0, 1, 2, 3, 4, 0, 2, 4, 1, 3] * 3)
    starts = torch.tensor([1, 11])
    loss = batch_loss(model, tokens, starts, 8)
    optimizers = make_optimizers(model, lr=0.05)
    loss.backward()
    assert layer.expert_table.weight.grad.is_sparse
    for optimizer in optimizers:
        optimizer.step()

    context_ids, _ = make_windows(tokens, starts, 8, model.context, vocab)
    read = layer.block_tokens(context_ids) + torch.arange(2) * (vocab + 1)
    touched = torch.zeros(before.shape[0], dtype=torch.bool)
    touched[read.unique()] = True
    changed = (layer.expert_table.weight.detach() != before).any(dim=1)
    assert changed[touched].all()
    assert not changed[~touched].any()


def test_finetune_starts_at_explicit_loss(chain_tokens):
    layer = make_layer(chain_tokens, 12, 3, 4)
    solve_layer(layer, chain_tokens, solver_config(), torch.Generator().manual_seed(0))
    model = SAFFUModel([layer])
    explicit = evaluate(model, chain_tokens, 1000).nll
    starts = torch.arange(0, chain_tokens.numel(), 100)
    with torch.no_grad():
        loss = batch_loss(model, chain_tokens, starts, 100).item() * chain_tokens.numel()
    assert loss == pytest.approx(explicit, rel=1e-5)
