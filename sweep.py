"""Entry point: one SAFFU job (`python sweep.py`) or a sweep (`python sweep.py -m`).

`python sweep.py -m` runs the default grid (`sweep_default`), `python sweep.py -m
+sweep=smoke` the one in sweeps/smoke.yaml; see docs/sweeps.md. A multirun is expanded by
the saffu sweeper and run by the Ray launcher (hydra_plugins/saffu_sweep/).
"""

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from hydra_plugins.saffu_sweep.saffu_sweeper import SWEEP_KEYS
from saffu.planning import JobInterrupted, run_single
from saffu.tracking import TrackingURIError
from saffu.validation import ConfigError

log = logging.getLogger("sweep")

CONF_DIR = Path(__file__).resolve().parent / "conf"


def misplaced_sweep_overrides(arguments: list[str]) -> list[str]:
    """Return a message for each override that sets a sweep setting (``optuna.sampler=tpe``)
    at the top level of the config instead of under ``sweep``.

    Hydra rejects such an override with "Key 'optuna' is not in struct" and suggests
    ``+optuna.sampler=tpe``, which adds a top-level key instead of setting the study's
    sampler.
    """
    messages = []
    for argument in arguments:
        if argument.startswith("-") or "=" not in argument:
            continue
        key, value = argument.split("=", 1)
        key = key.lstrip("+~")
        head = key.split(".", 1)[0]
        if head in SWEEP_KEYS:
            messages.append(
                f"'{argument}' sets the sweep setting '{head}' at the top level of the config; sweep "
                f"settings live under 'sweep': write sweep.{key}={value}, or ++sweep.{key}={value} "
                f"when the sweep file does not set '{head}'"
            )
    return messages


@hydra.main(config_path="conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> dict[str, float]:
    """Run one job in this process, tracked as one MLflow run."""
    try:
        return run_single(cfg, CONF_DIR)
    except (ConfigError, TrackingURIError) as error:
        problems = error.problems if isinstance(error, ConfigError) else [str(error)]
        log.error("the job was not started: %d problem(s) in its config", len(problems))
        for problem in problems:
            log.error("  - %s", problem)
        sys.exit(2)
    except JobInterrupted as error:
        log.error("%s", error)
        sys.exit(130)
    except RuntimeError as error:
        log.error("%s", error)
        sys.exit(1)


if __name__ == "__main__":
    if misplaced := misplaced_sweep_overrides(sys.argv[1:]):
        for message in misplaced:
            print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    main()
