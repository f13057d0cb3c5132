"""Measure the speed of the anchor models on a real corpus folder (train.txt, valid.txt, test.txt).

The corpus is tokenized with a byte-level BPE of `--vocab-size` tokens trained on train.txt,
in a temporary folder that is deleted afterwards. The script then measures:

- Kneser-Ney (saffu.anchors.kneser_ney): n-gram counting, and validation scoring per order.
- NLTK's KneserNeyInterpolated at `--nltk-order`: fit on the training split and scoring of
  the first `--nltk-tokens` validation tokens, extrapolated to the whole split.
- GPT-2 (saffu.anchors.gpt2): seconds per training step and per evaluated token of each
  size in conf/model/gpt2.yaml, extrapolated to one epoch and one validation pass.

Usage:
    python benchmarks/anchors_speed.py --corpus ../shared/data/gutenberg-fiction --threads 2
"""

import argparse
import logging
import math
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from tokenizers import ByteLevelBPETokenizer

from saffu.anchors.gpt2 import (
    build_gpt2,
    count_parameters,
    evaluate_nll,
    make_optimizer,
    parse_sizes,
    real_token_logits,
    training_options,
)
from saffu.anchors.kneser_ney import KneserNeyModel, NGramCounts, run_kneser_ney

log = logging.getLogger("anchors_speed")
REPO = Path(__file__).resolve().parents[1]


def tokenize(corpus: Path, vocab_size: int) -> SimpleNamespace:
    """Train a byte-level BPE on train.txt and return the three splits as a corpus object."""
    texts = {split: (corpus / f"{split}.txt").read_text(encoding="utf-8") for split in ("train", "valid", "test")}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        train_path = Path(folder) / "train.txt"
        train_path.write_text(texts["train"], encoding="utf-8")
        tokenizer = ByteLevelBPETokenizer()
        tokenizer.train([str(train_path)], vocab_size=vocab_size, min_frequency=2, show_progress=False)
    ids = {split: torch.tensor(tokenizer.encode(text).ids, dtype=torch.long) for split, text in texts.items()}
    log.info(
        "tokenized in %.1f s: %s tokens, vocabulary %d",
        time.perf_counter() - start,
        {split: tensor.numel() for split, tensor in ids.items()},
        tokenizer.get_vocab_size(),
    )
    return SimpleNamespace(
        **ids, vocab_size=tokenizer.get_vocab_size(), chars={split: len(text) for split, text in texts.items()}
    )


def measure_kneser_ney(corpus: SimpleNamespace) -> None:
    """Log counting and per-order scoring times, then the metrics of a full run_kneser_ney."""
    model_cfg = OmegaConf.load(REPO / "conf/model/kneser_ney.yaml")
    orders = [int(order) for order in model_cfg.orders]
    start = time.perf_counter()
    counts = NGramCounts(corpus.train.numpy(), corpus.vocab_size, max(orders))
    log.info("kneser_ney: counted orders 1..%d in %.2f s", max(orders), time.perf_counter() - start)
    for order in orders:
        start = time.perf_counter()
        model = KneserNeyModel(counts, order, model_cfg.get("discount"))
        nll = model.token_nll(corpus.valid.numpy())
        log.info(
            "kneser_ney: order %d, %d n-grams, validation perplexity %.3f, %.2f s",
            order, model.n_entries(), math.exp(nll.mean()), time.perf_counter() - start,
        )
    metrics = run_kneser_ney(OmegaConf.create({"model": model_cfg}), corpus, lambda name, value, step: None)
    log.info("kneser_ney: run_kneser_ney returned %s", metrics)


def measure_nltk(corpus: SimpleNamespace, order: int, n_tokens: int) -> None:
    """Log NLTK KneserNeyInterpolated fit time and seconds per scored validation token."""
    from nltk.lm import KneserNeyInterpolated
    from nltk.util import everygrams

    train = [str(token) for token in corpus.train.tolist()]
    valid = [str(token) for token in corpus.valid[:n_tokens].tolist()]
    start = time.perf_counter()
    model = KneserNeyInterpolated(order, discount=0.75)
    model.fit([everygrams(train, max_len=order)], vocabulary_text=train)
    fit_seconds = time.perf_counter() - start
    start = time.perf_counter()
    for position, token in enumerate(valid):
        model.score(token, valid[max(0, position - order + 1) : position])
    per_token = (time.perf_counter() - start) / len(valid)
    log.info(
        "nltk: order %d, fit %.1f s on %d tokens, %.4f s per scored token, so about %.0f s for %d validation tokens",
        order, fit_seconds, len(train), per_token, per_token * corpus.valid.numel(), corpus.valid.numel(),
    )


def measure_gpt2(corpus: SimpleNamespace, steps: int, eval_tokens: int) -> None:
    """Log parameters, seconds per training step and per evaluated token for each configured size."""
    model_cfg = OmegaConf.load(REPO / "conf/model/gpt2.yaml")
    options = training_options(model_cfg)
    vocab_size = corpus.vocab_size
    stream = torch.cat([torch.tensor([vocab_size]), corpus.train])
    windows_per_epoch = (stream.numel() - 1) // options.context
    steps_per_epoch = math.ceil(windows_per_epoch / options.batch_size)
    generator = torch.Generator().manual_seed(0)
    offsets = torch.arange(options.context)
    for size in parse_sizes(model_cfg.sizes):
        model = build_gpt2(vocab_size, size, options.context, options.dropout)
        optimizer = make_optimizer(model, options)
        model.train()
        step_seconds = []
        for step in range(steps + 2):
            starts = torch.randint(0, stream.numel() - options.context - 1, (options.batch_size, 1), generator=generator)
            index = starts + offsets
            begin = time.perf_counter()
            logits = real_token_logits(model, stream[index], vocab_size)
            loss = F.cross_entropy(logits.reshape(-1, vocab_size), stream[index + 1].reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step >= 2:  # the first steps include one-time allocation
                step_seconds.append(time.perf_counter() - begin)
        per_step = sum(step_seconds) / len(step_seconds)
        begin = time.perf_counter()
        evaluate_nll(
            model, corpus.valid[:eval_tokens], vocab_size, options.context, options.stride,
            options.eval_batch_size, torch.device("cpu"),
        )
        per_eval_token = (time.perf_counter() - begin) / eval_tokens
        log.info(
            "gpt2 %s: %d parameters, %.3f s per step of %d x %d tokens, about %.0f s per epoch of %d steps, "
            "about %.0f s per validation pass of %d tokens",
            size.label, count_parameters(model), per_step, options.batch_size, options.context,
            per_step * steps_per_epoch, steps_per_epoch, per_eval_token * corpus.valid.numel(), corpus.valid.numel(),
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, required=True, help="folder with train.txt, valid.txt and test.txt")
    parser.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size (default 4096)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the torch default)")
    parser.add_argument("--nltk-order", type=int, default=3, help="order of the NLTK model (default 3)")
    parser.add_argument("--nltk-tokens", type=int, default=200, help="validation tokens NLTK scores (default 200; 0 skips NLTK)")
    parser.add_argument("--gpt2-steps", type=int, default=10, help="timed training steps per GPT-2 size (default 10)")
    parser.add_argument("--gpt2-eval-tokens", type=int, default=4096, help="validation tokens per GPT-2 evaluation timing (default 4096)")
    args = parser.parse_args()

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    log.info("torch %s with %d threads", torch.__version__, torch.get_num_threads())
    corpus = tokenize(args.corpus, args.vocab_size)
    measure_kneser_ney(corpus)
    if args.nltk_tokens > 0:
        measure_nltk(corpus, args.nltk_order, args.nltk_tokens)
    measure_gpt2(corpus, args.gpt2_steps, args.gpt2_eval_tokens)


if __name__ == "__main__":
    main()
