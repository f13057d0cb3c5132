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

from saffu.planning import JobInterrupted, run_single
from saffu.tracking import TrackingURIError
from saffu.validation import ConfigError

log = logging.getLogger("sweep")

CONF_DIR = Path(__file__).resolve().parent / "conf"


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
    main()
