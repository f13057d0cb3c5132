"""Anchor language models trained on the same token ids as SAFFU: Kneser-Ney n-grams and a small GPT-2.

`run_anchor` dispatches on `cfg.model.name`. Each anchor picks its order or size on the
validation split and returns the metrics of the kept model, including `n_params`,
`val_ppl`, `test_ppl`, `val_bpc`, `test_bpc` and `seconds`, all as floats. Every token of
a split is predicted, the first from an empty context.
"""

import logging

from omegaconf import DictConfig

from saffu.anchors.common import MetricLogger, TokenCorpus
from saffu.anchors.gpt2 import run_gpt2
from saffu.anchors.kneser_ney import run_kneser_ney

log = logging.getLogger(__name__)

ANCHORS = {"kneser_ney": run_kneser_ney, "gpt2": run_gpt2}

__all__ = ["ANCHORS", "MetricLogger", "TokenCorpus", "run_anchor"]


def run_anchor(cfg: DictConfig, corpus: TokenCorpus, log_metric: MetricLogger) -> dict[str, float]:
    """Train and evaluate the anchor named by `cfg.model.name` and return its metrics by name."""
    name = cfg.model.name
    if name not in ANCHORS:
        raise ValueError(f"unknown anchor model.name={name!r}; expected one of {sorted(ANCHORS)}")
    log.info("running anchor %s", name)
    return ANCHORS[name](cfg, corpus, log_metric)
