"""Tests of the anchor models: Kneser-Ney n-grams and the small GPT-2."""

import math
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from saffu.anchors import run_anchor
from saffu.anchors.gpt2 import (
    GPT2Size,
    TrainingOptions,
    build_gpt2,
    count_parameters,
    evaluate_nll,
    evaluation_windows,
    real_token_logits,
    train_size,
)
from saffu.anchors.kneser_ney import KneserNeyModel, NGramCounts, modified_discounts


@dataclass
class SmallCorpus:
    """Stand-in for saffu.data.TokenizedCorpus with the fields the anchors read."""

    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    vocab_size: int
    chars: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Four characters per token, an arbitrary but fixed ratio for the bpc checks.
        if not self.chars:
            self.chars = {split: 4 * getattr(self, split).numel() for split in ("train", "valid", "test")}


class MetricRecorder:
    """log_metric callback that keeps every (name, value, step)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float, int | None]] = []

    def __call__(self, name: str, value: float, step: int | None = None) -> None:
        self.calls.append((name, value, step))

    def series(self, name: str) -> dict[int | None, float]:
        return {step: value for logged, value, step in self.calls if logged == name}


def random_transitions(vocab_size: int, concentration: float, seed: int, n_rows: int | None = None) -> np.ndarray:
    """Return a row-stochastic matrix of shape (n_rows or vocab_size, vocab_size) with Dirichlet rows."""
    rng = np.random.default_rng(seed)
    return rng.dirichlet(np.full(vocab_size, concentration), size=n_rows or vocab_size)


def sample_chain(transitions: np.ndarray, n_tokens: int, seed: int) -> np.ndarray:
    """Sample n_tokens from a first-order Markov chain started at token 0."""
    rng = np.random.default_rng(seed)
    cumulative = np.cumsum(transitions, axis=1)
    uniforms = rng.random(n_tokens)
    tokens = np.empty(n_tokens, dtype=np.int64)
    tokens[0] = 0
    for t in range(1, n_tokens):
        tokens[t] = min(np.searchsorted(cumulative[tokens[t - 1]], uniforms[t]), transitions.shape[1] - 1)
    return tokens


def sample_second_order_chain(transitions: np.ndarray, vocab_size: int, n_tokens: int, seed: int) -> np.ndarray:
    """Sample from a chain whose next token depends on the previous two (rows indexed a * V + b)."""
    rng = np.random.default_rng(seed)
    cumulative = np.cumsum(transitions, axis=1)
    uniforms = rng.random(n_tokens)
    tokens = np.zeros(n_tokens, dtype=np.int64)
    for t in range(2, n_tokens):
        row = tokens[t - 2] * vocab_size + tokens[t - 1]
        tokens[t] = min(np.searchsorted(cumulative[row], uniforms[t]), vocab_size - 1)
    return tokens


def stationary_distribution(transitions: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eig(transitions.T)
    vector = np.real(vectors[:, np.argmin(np.abs(values - 1.0))])
    return vector / vector.sum()


# --- Kneser-Ney ---------------------------------------------------------------------------


def test_kneser_ney_matches_nltk():
    nltk_lm = pytest.importorskip("nltk.lm")
    from nltk.util import everygrams

    vocab_size = 6
    chain = sample_chain(random_transitions(vocab_size, 0.5, seed=1), 600, seed=2)
    # Repeating the first tokens at the end gives every n-gram at the start a left neighbour.
    # NLTK's lower-order gamma counts raw followers, which differs from the continuation
    # followers only for n-grams seen nowhere but at the start of the stream.
    train = np.concatenate([chain, chain[:6]])
    queries = np.random.default_rng(3).integers(0, vocab_size, 300)
    words = [str(token) for token in train]
    for order in (2, 3, 4):
        reference = nltk_lm.KneserNeyInterpolated(order, discount=0.75)
        reference.fit([everygrams(words, max_len=order)], vocabulary_text=words)
        model = KneserNeyModel(NGramCounts(train, vocab_size, order), order, 0.75, discount_unigrams=False)

        ours = np.exp(-model.token_nll(queries))
        theirs = np.array(
            [
                reference.score(str(queries[t]), [str(w) for w in queries[max(0, t - order + 1) : t]])
                for t in range(queries.size)
            ]
        )
        np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-12, err_msg=f"order {order}")


@pytest.mark.parametrize("discount", [None, 0.75])
def test_kneser_ney_normalized(discount):
    vocab_size = 7
    # Token 6 never occurs in training, so only the uniform part gives it mass.
    train = np.random.default_rng(0).integers(0, vocab_size - 1, 400)
    counts = NGramCounts(train, vocab_size, 4)
    contexts = [[], [2], [6], [1, 2], [6, 6], [0, 1, 2], [5, 6, 0], list(train[-3:]), [3, 3, 3, 3, 3]]
    for order in (1, 2, 3, 4):
        model = KneserNeyModel(counts, order, discount)
        for context in contexts:
            probs = model.next_token_probs(context)
            assert probs.shape == (vocab_size,)
            assert np.all(probs > 0), f"order {order}, context {context}: {probs}"
            assert probs.sum() == pytest.approx(1.0, abs=1e-12), f"order {order}, context {context}"


def test_kneser_ney_nll_agrees_with_next_token_probs():
    vocab_size = 5
    train = np.random.default_rng(4).integers(0, vocab_size, 300)
    stream = np.random.default_rng(5).integers(0, vocab_size, 40)
    model = KneserNeyModel(NGramCounts(train, vocab_size, 3), 3)
    nll = model.token_nll(stream)
    for t in range(stream.size):
        expected = -math.log(model.next_token_probs(stream[:t])[stream[t]])
        assert nll[t] == pytest.approx(expected, rel=1e-12), f"position {t}"


def test_kneser_ney_first_token_uses_unigram():
    vocab_size = 5
    train = np.random.default_rng(6).integers(0, vocab_size, 300)
    model = KneserNeyModel(NGramCounts(train, vocab_size, 3), 3)
    stream = np.array([2, 3, 4])
    unigram = model.next_token_probs([])
    assert model.token_nll(stream)[0] == pytest.approx(-math.log(unigram[2]))


def test_kneser_ney_counts_continuations():
    # Stream a b a c: bigrams ab, ba, ac. Token a follows only b, so N1+(. a) = 1.
    counts = NGramCounts(np.array([0, 1, 0, 2]), 3, 2)
    assert counts.raw[1].tolist() == [2, 1, 1]
    assert counts.continuation[1].tolist() == [1, 1, 1]
    assert counts.raw[2].tolist() == [1, 1, 1]


def test_modified_discounts_fall_back():
    assert modified_discounts(np.array([1, 1, 2])) == (0.5, 1.0, 1.5)
    counts = np.array([1] * 100 + [2] * 40 + [3] * 20 + [4] * 10)
    d1, d2, d3 = modified_discounts(counts)
    y = 100 / (100 + 2 * 40)
    assert d1 == pytest.approx(1 - 2 * y * 40 / 100)
    assert d2 == pytest.approx(2 - 3 * y * 20 / 40)
    assert d3 == pytest.approx(3 - 4 * y * 10 / 20)


def test_kneser_ney_markov_chain_perplexity():
    vocab_size = 20
    transitions = random_transitions(vocab_size, 0.5, seed=7)
    train = sample_chain(transitions, 50_000, seed=8)
    held_out = sample_chain(transitions, 20_000, seed=9)
    stationary = stationary_distribution(transitions)
    entropy_rate = -np.sum(stationary[:, None] * transitions * np.log(transitions))
    true_ppl = math.exp(entropy_rate)
    sample_ppl = math.exp(-np.mean(np.log(transitions[held_out[:-1], held_out[1:]])))

    model = KneserNeyModel(NGramCounts(train, vocab_size, 2), 2)
    model_ppl = math.exp(model.token_nll(held_out)[1:].mean())

    assert model_ppl == pytest.approx(true_ppl, rel=0.03)
    assert model_ppl == pytest.approx(sample_ppl, rel=0.02)
    assert model_ppl >= sample_ppl * 0.999  # no model beats the true chain by more than noise


def test_kneser_ney_selects_best_order():
    vocab_size = 8
    transitions = random_transitions(vocab_size, 0.3, seed=10, n_rows=vocab_size * vocab_size)
    tokens = sample_second_order_chain(transitions, vocab_size, 40_000, seed=11)
    corpus = SmallCorpus(
        torch.from_numpy(tokens[:30_000]), torch.from_numpy(tokens[30_000:35_000]),
        torch.from_numpy(tokens[35_000:]), vocab_size,
    )
    cfg = OmegaConf.create({"model": {"name": "kneser_ney", "orders": [1, 2, 3, 4], "discount": None}})
    recorder = MetricRecorder()

    metrics = run_anchor(cfg, corpus, recorder)

    by_order = recorder.series("kneser_ney/val_ppl")
    assert sorted(by_order) == [1, 2, 3, 4]
    assert metrics["kneser_ney/order"] == min(by_order, key=by_order.get)
    assert metrics["kneser_ney/order"] == 3
    assert metrics["val_ppl"] == pytest.approx(by_order[3])


def test_kneser_ney_metrics():
    vocab_size = 6
    tokens = sample_chain(random_transitions(vocab_size, 0.5, seed=12), 6000, seed=13)
    corpus = SmallCorpus(
        torch.from_numpy(tokens[:4000]), torch.from_numpy(tokens[4000:5000]), torch.from_numpy(tokens[5000:]),
        vocab_size,
    )
    cfg = OmegaConf.create({"model": {"name": "kneser_ney", "orders": [2], "discount": None}})

    metrics = run_anchor(cfg, corpus, MetricRecorder())

    for key in ("n_params", "val_ppl", "test_ppl", "val_bpc", "test_bpc", "seconds", "kneser_ney/order"):
        assert isinstance(metrics[key], float), key
    distinct = len(set(tokens[:4000].tolist())) + len(set(zip(tokens[:3999].tolist(), tokens[1:4000].tolist())))
    assert metrics["n_params"] == distinct
    nll_from_bpc = metrics["val_bpc"] * corpus.chars["valid"] * math.log(2)
    assert math.exp(nll_from_bpc / 1000) == pytest.approx(metrics["val_ppl"])


# --- GPT-2 --------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Run each test on one torch thread and restore the previous count afterwards.

    The models here are tiny, and two OpenMP threads on a loaded 2-core machine ran
    these tests about 6 times slower than one thread.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_gpt2_parameter_count():
    vocab_size, context = 4096, 128
    for n_layer, n_head, n_embd in [(4, 4, 128), (4, 4, 192), (6, 8, 256)]:
        model = build_gpt2(vocab_size, GPT2Size(n_layer, n_head, n_embd), context, 0.1)
        # Tied input and output embedding of V + 1 rows, positions, blocks, final LayerNorm.
        expected = (vocab_size + 1) * n_embd + context * n_embd + n_layer * (12 * n_embd**2 + 13 * n_embd) + 2 * n_embd
        assert count_parameters(model) == expected
        assert count_parameters(model) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("n_tokens,context,stride", [(1, 8, 4), (8, 8, 4), (9, 8, 4), (50, 8, 3), (50, 8, 8), (50, 8, 1)])
def test_evaluation_windows_score_each_token_once(n_tokens, context, stride):
    scored = []
    for start, end, first_scored in evaluation_windows(n_tokens, context, stride):
        assert 0 <= start <= first_scored < end <= n_tokens
        assert end - start == min(context, n_tokens)
        scored.extend(range(first_scored, end))
    assert scored == list(range(n_tokens))


def test_gpt2_evaluation_matches_per_token_contexts():
    vocab_size, context = 11, 6
    torch.manual_seed(0)
    model = build_gpt2(vocab_size, GPT2Size(1, 2, 16), context, 0.0).eval()
    tokens = torch.randint(0, vocab_size, (23,))
    inputs = torch.cat([torch.tensor([vocab_size]), tokens[:-1]])

    total = evaluate_nll(model, tokens, vocab_size, context, 1, 4, torch.device("cpu"))

    expected = 0.0
    with torch.no_grad():
        for t in range(tokens.numel()):
            window = inputs[max(0, t - context + 1) : t + 1]
            logits = model(input_ids=window[None]).logits[0, -1]
            log_probs = torch.log_softmax(logits[:vocab_size], dim=-1)
            expected -= float(log_probs[tokens[t]])
    assert total == pytest.approx(expected, rel=1e-5)


def test_gpt2_output_excludes_start_symbol():
    vocab_size = 9
    model = build_gpt2(vocab_size, GPT2Size(1, 2, 16), 8, 0.0)
    logits = real_token_logits(model, torch.tensor([[vocab_size, 1, 2]]), vocab_size)
    assert logits.shape == (1, 3, vocab_size)


def periodic_corpus(vocab_size: int, period: int, n_train: int, n_eval: int) -> SmallCorpus:
    """A random pattern of `period` tokens repeated; validation and test start at other phases.

    With period == vocab_size the pattern is a permutation, so each token determines the next.
    """
    generator = torch.Generator().manual_seed(0)
    if period == vocab_size:
        pattern = torch.randperm(vocab_size, generator=generator)
    else:
        pattern = torch.randint(0, vocab_size, (period,), generator=generator)
    stream = pattern.repeat((n_train + 2 * n_eval) // period + 1)
    return SmallCorpus(
        stream[:n_train], stream[n_train + 3 : n_train + 3 + n_eval],
        stream[n_train + n_eval + 5 : n_train + 2 * n_eval + 5], vocab_size,
    )


def test_gpt2_learns_and_selects_best_size():
    vocab_size = 16
    corpus = periodic_corpus(vocab_size, period=16, n_train=3200, n_eval=300)
    cfg = OmegaConf.create(
        {
            "seed": 0,
            "model": {
                "name": "gpt2",
                "sizes": [{"n_layer": 1, "n_head": 1, "n_embd": 4}, {"n_layer": 1, "n_head": 2, "n_embd": 32}],
                "context": 16, "batch_size": 8, "lr": 0.01, "warmup_steps": 5, "dropout": 0.0,
                "max_epochs": 5, "patience": 2, "threads": 1,
            },
        }
    )
    recorder = MetricRecorder()

    metrics = run_anchor(cfg, corpus, recorder)

    size_ppl = {label: metrics[f"gpt2/{label}/val_ppl"] for label in ("l1_h1_d4", "l1_h2_d32")}
    best_label = min(size_ppl, key=size_ppl.get)
    assert metrics["val_ppl"] == size_ppl[best_label]
    assert metrics["n_params"] == metrics[f"gpt2/{best_label}/n_params"]
    chosen = build_gpt2(vocab_size, GPT2Size(1, int(metrics["gpt2/n_head"]), int(metrics["gpt2/n_embd"])), 16, 0.0)
    assert metrics["n_params"] == sum(p.numel() for p in chosen.parameters())
    # Uniform perplexity is 16, and the pattern of period 16 makes most next tokens certain.
    assert metrics["val_ppl"] < 1.5
    assert metrics["test_ppl"] < 1.5
    curve = recorder.series("bp_only/epoch_val_ppl")
    assert min(curve.values()) == pytest.approx(metrics["val_ppl"])
    assert curve[1] > metrics["val_ppl"]


def test_gpt2_early_stopping_stops():
    vocab_size, context = 16, 16
    # Uniform random tokens: nothing generalizes, so validation perplexity rises as the model memorizes.
    generator = torch.Generator().manual_seed(1)
    train = torch.randint(0, vocab_size, (512,), generator=generator)
    valid = torch.randint(0, vocab_size, (256,), generator=generator)
    options = TrainingOptions(
        context=context, batch_size=8, lr=0.03, warmup_steps=0, schedule="constant", dropout=0.0,
        max_epochs=200, patience=2,
    )
    recorder = MetricRecorder()

    result = train_size(GPT2Size(1, 2, 64), train, valid, vocab_size, options, 0, torch.device("cpu"), recorder)

    curve = recorder.series("gpt2/l1_h2_d64/val_ppl")
    assert len(curve) < options.max_epochs
    best_index = min(curve, key=curve.get)
    assert len(curve) == best_index + options.patience
    assert result.val_ppl == pytest.approx(curve[best_index])


def test_gpt2_max_seconds_stops():
    vocab_size = 8
    corpus = periodic_corpus(vocab_size, period=12, n_train=4000, n_eval=100)
    options = TrainingOptions(context=16, batch_size=4, max_epochs=100, patience=100, max_seconds=0.0)
    recorder = MetricRecorder()

    result = train_size(
        GPT2Size(1, 1, 8), corpus.train, corpus.valid, vocab_size, options, 0, torch.device("cpu"), recorder
    )

    assert result.steps == 1
    assert len(recorder.series("gpt2/l1_h1_d8/val_ppl")) == 1


def test_run_anchor_rejects_unknown_name():
    corpus = periodic_corpus(4, period=4, n_train=40, n_eval=8)
    with pytest.raises(ValueError, match="unknown anchor"):
        run_anchor(OmegaConf.create({"model": {"name": "lstm"}}), corpus, MetricRecorder())
