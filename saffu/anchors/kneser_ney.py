"""Interpolated Kneser-Ney n-gram language model, vectorized with numpy.

The estimator is the interpolated Kneser-Ney of Chen and Goodman ("An Empirical Study of
Smoothing Techniques for Language Modeling", 1998). With `discount=None` it is the
modified variant, with three discounts per order (for counts 1, 2 and 3+) estimated from
count-of-counts. With a number it is the standard variant, one discount for every order,
which is what `nltk.lm.KneserNeyInterpolated(order, discount=D)` computes.

It is written here, not taken from a library, for speed. NLTK 3.10's KneserNeyInterpolated
scans every context of the next order on each lower-order lookup. On 1.53M training tokens
of a 4096-token BPE corpus at order 3, it took 30 s to fit and 0.10 s per scored token on
2 shared CPU cores, about 2 hours for 78K validation tokens (benchmarks/anchors_speed.py).
This module counts orders 1..5 of the same tokens in 1.3 to 4 s and scores the validation
split in under 0.4 s per order. The PyPI package `kenlm` only queries ARPA files and cannot
estimate a model.
The tests check this implementation against NLTK on a small corpus.

Probabilities, for a context c of length k - 1 and a token w, with p_0(w) = 1 / V:

    p_k(w | c) = (max(a_k(c w) - D_k(a), 0) + gamma_k(c) * p_{k-1}(w | c[1:])) / T_k(c)
    gamma_k(c) = D_k1 * N1(c .) + D_k2 * N2(c .) + D_k3 * N3+(c .)
    T_k(c)     = sum over w of a_k(c w)

a_n is the raw count at the model's order n. Below it a_k is the continuation count
N1+(. c w), the number of distinct tokens seen before c w. A context with T_k(c) = 0 backs
off to p_{k-1} unchanged. Every p_k sums to one over the vocabulary.

The text is one stream without sentence markers, and the first token of a scored split
is predicted from the empty context (the unigram level).
"""

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from omegaconf import DictConfig

from saffu.anchors.common import MetricLogger, TokenCorpus, split_metrics, split_tokens

log = logging.getLogger(__name__)

# Discounts for counts 1, 2 and 3+ used when count-of-counts give none in (0, r), the
# same fallback values as the default of KenLM's `lmplz --discount_fallback`.
FALLBACK_DISCOUNTS = (0.5, 1.0, 1.5)


class NGramCounts:
    """Distinct n-grams of orders 1..max_order of a token stream, stored as a trie of dense ids.

    The k-gram x[i..i+k-1] has the key prefix_id * V + x[i+k-1], where prefix_id is the
    dense id of the (k-1)-gram x[i..i+k-2] and the empty 0-gram has id 0. `keys[k]` contains
    the sorted distinct keys of level k, shape (G_k,), and the dense id of a k-gram is its
    index there. Keys stay below G_{k-1} * V, so int64 suffices for any order.

    Attributes, for k in 1..max_order, each of shape (G_k,):
        keys[k]: sorted distinct keys.
        raw[k]: number of occurrences in the stream.
        continuation[k]: number of distinct (k+1)-grams that end with this k-gram, for
            k < max_order. A k-gram seen only at the start of the stream has 0.
    """

    def __init__(self, tokens: np.ndarray, vocab_size: int, max_order: int) -> None:
        tokens = np.asarray(tokens, dtype=np.int64)
        if tokens.ndim != 1 or tokens.size == 0:
            raise ValueError(f"tokens must be a non-empty 1-D array, got shape {tokens.shape}")
        if max_order < 1:
            raise ValueError(f"max_order must be at least 1, got {max_order}")
        if tokens.min() < 0 or tokens.max() >= vocab_size:
            raise ValueError(f"token ids must be in [0, {vocab_size}), got [{tokens.min()}, {tokens.max()}]")

        self.vocab_size = vocab_size
        self.max_order = min(max_order, tokens.size)
        self.keys: dict[int, np.ndarray] = {}
        self.raw: dict[int, np.ndarray] = {}
        self.continuation: dict[int, np.ndarray] = {}

        # ids[i] is the dense id of the (k-1)-gram starting at position i.
        ids = np.zeros(tokens.size + 1, dtype=np.int64)
        for k in range(1, self.max_order + 1):
            n_positions = tokens.size - k + 1
            position_keys = ids[:n_positions] * vocab_size + tokens[k - 1 : k - 1 + n_positions]
            keys, first, inverse, counts = np.unique(
                position_keys, return_index=True, return_inverse=True, return_counts=True
            )
            self.keys[k] = keys
            self.raw[k] = counts
            if k >= 2:
                # The suffix of the k-gram at position i is the (k-1)-gram at position i + 1.
                suffix_ids = ids[first + 1]
                self.continuation[k - 1] = np.bincount(suffix_ids, minlength=self.keys[k - 1].size)
            ids = inverse.reshape(-1)

    def lookup(self, order: int, prefix_ids: np.ndarray, words: np.ndarray) -> np.ndarray:
        """Return the dense ids of the `order`-grams (prefix, word), or -1 where not seen.

        `prefix_ids` are (order-1)-gram ids, -1 for an unseen prefix, broadcast with `words`.
        """
        keys = self.keys[order]
        query = np.asarray(prefix_ids, dtype=np.int64) * self.vocab_size + np.asarray(words, dtype=np.int64)
        found = np.searchsorted(keys, query)
        found_clipped = np.minimum(found, keys.size - 1)
        hit = (np.asarray(prefix_ids) >= 0) & (keys[found_clipped] == query)
        return np.where(hit, found_clipped, -1)

    def stream_ids(self, tokens: np.ndarray, max_order: int) -> list[np.ndarray]:
        """Return, for k in 0..max_order, the ids of the k-grams starting at each position of `tokens`.

        Entry k has shape (len(tokens) - k + 1,), with -1 for k-grams not seen in training.
        """
        tokens = np.asarray(tokens, dtype=np.int64)
        levels = [np.zeros(tokens.size + 1, dtype=np.int64)]
        for k in range(1, max_order + 1):
            n_positions = tokens.size - k + 1
            if n_positions <= 0:
                levels.append(np.zeros(0, dtype=np.int64))
                continue
            levels.append(self.lookup(k, levels[k - 1][:n_positions], tokens[k - 1 : k - 1 + n_positions]))
        return levels


@dataclass
class _Level:
    """Per-level arrays of one model: counts a_k per k-gram, and T_k and gamma_k per context."""

    counts: np.ndarray  # (G_k,) a_k: raw counts at the model order, continuation counts below
    discounts: np.ndarray  # (4,) discount for counts 0, 1, 2 and 3+ (the first is 0)
    totals: np.ndarray  # (G_{k-1},) T_k per context
    gammas: np.ndarray  # (G_{k-1},) gamma_k per context, the mass left to the lower order


def modified_discounts(counts: np.ndarray) -> tuple[float, float, float]:
    """Estimate the discounts D1, D2, D3+ from the count-of-counts n_1..n_4 of `counts`.

    D_r = r - (r + 1) * Y * n_{r+1} / n_r with Y = n_1 / (n_1 + 2 n_2) (Chen and Goodman).
    When a D_r is undefined or outside (0, r), every discount of the level falls back to
    FALLBACK_DISCOUNTS, as KenLM does with --discount_fallback.
    """
    n = [int(np.count_nonzero(counts == r)) for r in range(1, 5)]
    if n[0] == 0 or n[1] == 0 or n[2] == 0:
        return FALLBACK_DISCOUNTS
    y = n[0] / (n[0] + 2 * n[1])
    discounts = tuple(r - (r + 1) * y * n[r] / n[r - 1] for r in (1, 2, 3))
    if not all(0.0 < d < r for d, r in zip(discounts, (1, 2, 3))):
        return FALLBACK_DISCOUNTS
    return discounts


class KneserNeyModel:
    """Interpolated Kneser-Ney model of one order over precomputed `NGramCounts`.

    Args:
        counts: n-gram counts of the training stream, with max_order >= order.
        order: n, the longest n-gram used (context of n - 1 tokens).
        discount: None for modified Kneser-Ney, or one discount in (0, 1] for every level.
        discount_unigrams: when False, the unigram level is the undiscounted continuation
            distribution N1+(. w) / N1+(. .) with no uniform part, as in NLTK. Tokens that
            never follow another token then get probability 0, so keep True for real use.
    """

    def __init__(
        self, counts: NGramCounts, order: int, discount: float | None = None, discount_unigrams: bool = True
    ) -> None:
        if not 1 <= order <= counts.max_order:
            raise ValueError(f"order must be in [1, {counts.max_order}] for these counts, got {order}")
        if discount is not None and not 0.0 < discount <= 1.0:
            raise ValueError(f"discount must be in (0, 1] or None for modified Kneser-Ney, got {discount}")
        self.ngrams = counts
        self.order = order
        self.vocab_size = counts.vocab_size
        self.levels: dict[int, _Level] = {}
        for k in range(1, order + 1):
            level_counts = counts.raw[k] if k == order else counts.continuation[k]
            if k == 1 and not discount_unigrams:
                level_discounts = np.zeros(4)
            elif discount is None:
                level_discounts = np.array([0.0, *modified_discounts(level_counts)])
            else:
                level_discounts = np.array([0.0, discount, discount, discount])
            self.levels[k] = self._make_level(k, level_counts, level_discounts)
            log.debug("order %d level %d discounts %s", order, k, level_discounts[1:])

    def _make_level(self, k: int, level_counts: np.ndarray, discounts: np.ndarray) -> _Level:
        n_contexts = 1 if k == 1 else self.ngrams.keys[k - 1].size
        contexts = self.ngrams.keys[k] // self.vocab_size
        totals = np.bincount(contexts, weights=level_counts, minlength=n_contexts)
        gammas = np.bincount(contexts, weights=discounts[np.minimum(level_counts, 3)], minlength=n_contexts)
        return _Level(counts=level_counts, discounts=discounts, totals=totals, gammas=gammas)

    def _interpolate(self, k: int, context_ids: np.ndarray, gram_ids: np.ndarray, lower: np.ndarray) -> np.ndarray:
        """Return p_k from p_{k-1} (`lower`) for arrays of context ids and k-gram ids (-1: unseen)."""
        level = self.levels[k]
        seen_context = context_ids >= 0
        totals = np.where(seen_context, level.totals[np.maximum(context_ids, 0)], 0.0)
        gammas = np.where(seen_context, level.gammas[np.maximum(context_ids, 0)], 0.0)
        counts = np.where(gram_ids >= 0, level.counts[np.maximum(gram_ids, 0)], 0)
        discounted = np.maximum(counts - level.discounts[np.minimum(counts, 3)], 0.0)
        has_mass = totals > 0
        safe_totals = np.where(has_mass, totals, 1.0)
        return np.where(has_mass, (discounted + gammas * lower) / safe_totals, lower)

    def token_nll(self, tokens: np.ndarray) -> np.ndarray:
        """Return the natural-log NLL of every token of a stream, shape (len(tokens),).

        Token t is predicted from tokens max(0, t - n + 1)..t-1, so the first from the empty context.
        """
        tokens = np.asarray(tokens, dtype=np.int64)
        stream = self.ngrams.stream_ids(tokens, self.order)
        positions = np.arange(tokens.size)
        probs = np.full(tokens.size, 1.0 / self.vocab_size)
        for k in range(1, self.order + 1):
            if stream[k].size == 0:
                break  # the stream is shorter than k tokens, so no position has k - 1 tokens of context
            starts = positions - (k - 1)
            usable = starts >= 0
            safe_starts = np.maximum(starts, 0)
            context_ids = np.where(usable, stream[k - 1][safe_starts], -1)
            gram_ids = np.where(usable, stream[k][safe_starts], -1)
            probs = self._interpolate(k, context_ids, gram_ids, probs)
        with np.errstate(divide="ignore"):
            return -np.log(probs)

    def next_token_probs(self, context: Sequence[int]) -> np.ndarray:
        """Return p(w | context) for every token w, shape (vocab_size,).

        Only the last order - 1 tokens of `context` are used.
        """
        context = np.asarray(list(context)[max(0, len(context) - self.order + 1) :], dtype=np.int64)
        words = np.arange(self.vocab_size)
        probs = np.full(self.vocab_size, 1.0 / self.vocab_size)
        for k in range(1, self.order + 1):
            if k - 1 > context.size:
                break
            suffix = context[context.size - (k - 1) :]
            context_id = np.int64(0)
            for j, token in enumerate(suffix, start=1):
                context_id = self.ngrams.lookup(j, np.array([context_id]), np.array([token]))[0]
            context_ids = np.full(self.vocab_size, context_id)
            gram_ids = self.ngrams.lookup(k, context_ids, words)
            probs = self._interpolate(k, context_ids, gram_ids, probs)
        return probs

    def n_entries(self) -> int:
        """Return the number of distinct n-grams of orders 1..n in training, one stored count each."""
        return int(sum(self.ngrams.keys[k].size for k in range(1, self.order + 1)))


def run_kneser_ney(cfg: DictConfig, corpus: TokenCorpus, log_metric: MetricLogger) -> dict[str, float]:
    """Fit Kneser-Ney models of the orders `cfg.model.orders`, keep the best on validation, and score test.

    Logs `kneser_ney/val_ppl` with step = order for each order tried. `n_params` counts the
    distinct n-grams of orders 1..n of the training split, one stored count each. The
    per-context totals and gammas are derived from them and not counted.
    """
    model_cfg = cfg.model
    orders = sorted({int(order) for order in model_cfg.orders})
    if not orders or orders[0] < 1:
        raise ValueError(f"model.orders must be a non-empty list of orders >= 1, got {list(model_cfg.orders)}")
    discount = model_cfg.get("discount")
    discount = None if discount is None else float(discount)

    start = time.perf_counter()
    train = split_tokens(corpus, "train").numpy()
    valid = split_tokens(corpus, "valid").numpy()
    test = split_tokens(corpus, "test").numpy()
    counts = NGramCounts(train, corpus.vocab_size, max(orders))
    log.info("counted n-grams up to order %d of %d training tokens in %.1f s", max(orders), train.size, time.perf_counter() - start)

    best: tuple[float, int, KneserNeyModel] | None = None
    for order in orders:
        if order > counts.max_order:
            log.warning("skipping order %d: the training split has only %d tokens", order, train.size)
            continue
        model = KneserNeyModel(counts, order, discount)
        valid_nll = float(model.token_nll(valid).sum())
        valid_ppl = math.exp(valid_nll / valid.size)
        log_metric("kneser_ney/val_ppl", valid_ppl, order)
        log.info("order %d: %d n-grams, validation perplexity %.3f", order, model.n_entries(), valid_ppl)
        if best is None or valid_ppl < best[0]:
            best = (valid_ppl, order, model)
    assert best is not None  # orders[0] <= counts.max_order because train is non-empty

    _, order, model = best
    valid_nll = float(model.token_nll(valid).sum())
    test_nll = float(model.token_nll(test).sum())
    metrics = {
        "n_params": float(model.n_entries()),
        **split_metrics("val", valid_nll, valid.size, corpus.chars["valid"]),
        **split_metrics("test", test_nll, test.size, corpus.chars["test"]),
        "seconds": time.perf_counter() - start,
        "kneser_ney/order": float(order),
        "kneser_ney/modified": float(discount is None),
    }
    return metrics
