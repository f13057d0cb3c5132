"""Composing the configs of a batch of jobs in the driver, shared by the sweeper and the launcher."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import HydraContext
from omegaconf import DictConfig, open_dict
from omegaconf.errors import OmegaConfBaseException

from saffu.planning import resolve_job_config
from saffu.signals import interrupt_behind


def compose_jobs(
    hydra_context: HydraContext,
    master_config: DictConfig,
    job_overrides: Sequence[Sequence[str]],
    initial_job_idx: int = 0,
) -> list[tuple[list[str], dict[str, Any] | str, str]]:
    """Compose and resolve each job's config as Hydra's launchers do.

    Returns, per job, its overrides, its resolved job config or the composition error as
    a message, and its output folder (``hydra.sweep.dir/hydra.sweep.subdir``).
    """
    composed = []
    original = HydraConfig.instance().cfg
    try:
        for offset, overrides in enumerate(job_overrides):
            index = initial_job_idx + offset
            overrides = list(overrides)
            try:
                cfg = hydra_context.config_loader.load_sweep_config(master_config, overrides)
            except (HydraException, OmegaConfBaseException) as error:
                if interrupt_behind(error) is not None:
                    raise  # The sweeper stops on it as on the interrupt itself.
                composed.append((overrides, describe_composition_error(overrides, error), ""))
                continue
            with open_dict(cfg):
                cfg.hydra.job.id = str(index)
                cfg.hydra.job.num = index
            HydraConfig.instance().set_config(cfg)
            # Absolute, because a Ray worker on another node has its own working directory.
            output_dir = str((Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)).resolve())
            composed.append((overrides, resolve_job_config(cfg), output_dir))
    finally:
        HydraConfig.instance().cfg = original
    return composed


def describe_composition_error(overrides: Sequence[str], error: Exception) -> str:
    """Condense Hydra's multi-line composition error into one problem line with a fix."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    kept = [line for line in lines if not line.startswith(("full_key:", "object_type=", "reference_type="))]
    text = " ".join(kept[:3]) or type(error).__name__
    fix = "check the key and value against conf/ (`python sweep.py --cfg job` prints the config)"
    if "not in struct" in text or "Could not override" in text or "Could not append" in text:
        fix = (
            "the key is unknown or misspelled: check it against conf/ (`python sweep.py --cfg job` prints the "
            "config); use +key=value only for keys that no config file defines"
        )
    elif "Could not find" in text or "not found" in text:
        fix = "the config group option does not exist: pick one of the files under conf/"
    return f"the overrides `{' '.join(overrides)}` cannot be composed: {text}; {fix}"
