"""One job: corpus -> tokens -> explicit solve -> evaluate -> fine-tune -> evaluate -> bp-only.

A job is a plain function of its config, so Hydra, Ray, Optuna and tests can all call it.
"""

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import DictConfig

from saffu.codes import bit_codes, check_code_dim
from saffu.counts import CountCache
from saffu.data import TokenizedCorpus, prepare
from saffu.evaluate import evaluate
from saffu.explicit import solve_model
from saffu.finetune import train
from saffu.model import LayerShape, SAFFULayer, SAFFUModel, init_random_

log = logging.getLogger(__name__)

# log_metric(name, value, step): receives stepped metrics (per-epoch curves) while the job runs.
MetricLogger = Callable[[str, float, "int | None"], None]
ANCHORS = ("kneser_ney", "gpt2")


def _ignore_metric(name: str, value: float, step: int | None = None) -> None:
    pass


def build_model(model_cfg: DictConfig, corpus: TokenizedCorpus) -> SAFFUModel:
    """Create an unsolved SAFFU model whose bit codes are ranked by training frequency.
    Every layer has the same shape; layers above the first read distributions."""
    shape = LayerShape.from_config(model_cfg, corpus.vocab_size)
    check_code_dim(shape.attention_code_dim, corpus.vocab_size, "model.attention_code_dim")
    token_counts = torch.bincount(corpus.train, minlength=corpus.vocab_size)
    attention_codes = bit_codes(token_counts, shape.attention_code_dim)
    expert_codes = None
    if shape.expert_kind == "bitcode":
        check_code_dim(int(shape.code_dim), corpus.vocab_size, "model.experts.code_dim")
        expert_codes = bit_codes(token_counts, int(shape.code_dim))
    layers = [
        SAFFULayer(shape, attention_codes, expert_codes, reads_distribution=index > 0)
        for index in range(int(model_cfg.layers))
    ]
    return SAFFUModel(layers, top_k=int(model_cfg.stack_top_k))


def phase_metrics(phase: str, model: SAFFUModel, corpus: TokenizedCorpus) -> dict[str, float]:
    """Validation and test perplexity and bits per character of one phase's model."""
    metrics = {}
    for split, short in (("valid", "val"), ("test", "test")):
        result = evaluate(model, corpus.split(split), corpus.chars[split])
        metrics[f"{phase}/{short}_ppl"] = result.ppl
        metrics[f"{phase}/{short}_bpc"] = result.bpc
    return metrics


def run_job(cfg: DictConfig, log_metric: MetricLogger = _ignore_metric) -> dict[str, float]:
    """Run one job and return its final metrics by name.

    Each phase (`explicit`, `finetune`, `bp_only`) reports `{phase}/val_ppl`, `/test_ppl`,
    `/val_bpc`, `/test_bpc` and its seconds. The model reports `n_params` and
    `n_params/<matrix>`. The unprefixed `val_ppl`, `test_ppl`, `val_bpc` and `test_bpc`
    belong to the job's final model: the fine-tuned one when fine-tuning runs, else the
    explicit one.
    """
    torch.manual_seed(int(cfg.seed))
    generator = torch.Generator().manual_seed(int(cfg.seed))
    corpus = prepare(cfg.data, cfg.tokenizer)
    if cfg.model.name in ANCHORS:
        from saffu.anchors import run_anchor

        return run_anchor(cfg, corpus, log_metric)
    if cfg.model.name != "saffu":
        raise ValueError(f"model.name={cfg.model.name!r} is unknown; use model=saffu, model=kneser_ney or model=gpt2")

    metrics: dict[str, float] = {}
    model = build_model(cfg.model, corpus)
    counts = model.parameter_counts()
    metrics["n_params"] = float(counts["total"])
    metrics.update({f"n_params/{name}": float(value) for name, value in counts.items() if name != "total"})

    log.info("explicit solve: %s parameters on %d training tokens", f"{counts['total']:,}", corpus.train.numel())
    start = time.perf_counter()
    # The jobs of a sweep share the token co-occurrence counts through the corpus cache folder.
    counts = CountCache(Path(cfg.data.cache_dir).expanduser() / "counts")
    report = solve_model(model, corpus.train, cfg.solver, generator, counts)
    solve_seconds = time.perf_counter() - start
    metrics["explicit/solve_seconds"] = solve_seconds
    metrics["explicit/tokens_per_second"] = corpus.train.numel() / solve_seconds
    metrics["n_params_stored_counts"] = float(report.stored_counts)
    metrics.update({f"explicit/temperature/{name}": value for name, value in report.temperatures.items()})
    metrics.update(phase_metrics("explicit", model, corpus))
    log.info("explicit solve took %.1f s: validation perplexity %.2f", solve_seconds, metrics["explicit/val_ppl"])
    final_phase = "explicit"

    if cfg.train.enabled:
        result = train(
            model, corpus.train, corpus.valid, corpus.chars["valid"], cfg.train,
            float(cfg.train.lr), "finetune", log_metric, generator,
        )
        metrics.update(_train_metrics("finetune", result))
        metrics.update(phase_metrics("finetune", model, corpus))
        final_phase = "finetune"

    if cfg.train.bp_only:
        baseline = build_model(cfg.model, corpus)
        for layer in baseline.layers:
            init_random_(layer, generator)
        result = train(
            baseline, corpus.train, corpus.valid, corpus.chars["valid"], cfg.train,
            float(cfg.train.bp_only_lr), "bp_only", log_metric, generator,
        )
        metrics.update(_train_metrics("bp_only", result))
        metrics.update(phase_metrics("bp_only", baseline, corpus))

    for name in ("val_ppl", "test_ppl", "val_bpc", "test_bpc"):
        metrics[name] = metrics[f"{final_phase}/{name}"]
    bad = [name for name, value in metrics.items() if not math.isfinite(value)]
    if bad:
        log.warning("non-finite metrics: %s", ", ".join(bad))
    return metrics


def _train_metrics(phase: str, result) -> dict[str, float]:
    return {
        f"{phase}/seconds": result.seconds,
        f"{phase}/epochs": float(result.epochs),
        f"{phase}/best_epoch": float(result.best_epoch),
        f"{phase}/tokens_per_second": result.tokens_per_second,
        f"{phase}/stopped_by_time": float(result.stopped_by_time),
    }
