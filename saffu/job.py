"""One job: corpus -> tokens -> explicit solve -> evaluate -> fine-tune -> evaluate -> bp-only.

A job is a plain function of its config, so Hydra, Ray, Optuna and tests can all call it.
"""

import logging
from collections.abc import Callable

from omegaconf import DictConfig

log = logging.getLogger(__name__)

# log_metric(name, value, step): receives stepped metrics (per-epoch curves) while the job runs.
MetricLogger = Callable[[str, float, "int | None"], None]


def _ignore_metric(name: str, value: float, step: int | None = None) -> None:
    pass


def run_job(cfg: DictConfig, log_metric: MetricLogger = _ignore_metric) -> dict[str, float]:
    """Run one job and return its final metrics by name (see METRICS in saffu.tracking)."""
    raise NotImplementedError("the job pipeline is being written")
