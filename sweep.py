"""Entry point: one SAFFU job (`python sweep.py`) or a sweep (`python sweep.py -m`).

`python sweep.py -m` runs the default grid (`sweep_default`), `python sweep.py -m
+sweep=smoke` the one in sweeps/smoke.yaml; see docs/sweeps.md. A multirun is expanded by
the saffu sweeper and run by the Ray launcher (hydra_plugins/saffu_sweep/).
"""

import sys

from saffu.signals import exit_quietly_when_stopped, handle_stop_signals

if __name__ == "__main__":
    # SIGUSR1 drains a sweep. A single job, which has nothing left to start, runs to its end.
    handle_stop_signals(drain=True)

# Ctrl-C or SIGTERM while Hydra, Ray and MLflow load ends the command with one line.
with exit_quietly_when_stopped("interrupted while starting; nothing was run"):
    import logging
    import traceback
    from pathlib import Path

    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig, OmegaConf

    from hydra_plugins.saffu_sweep.saffu_sweeper import SWEEP_KEYS
    from saffu.planning import JobInterrupted, run_single
    from saffu.tracking import (
        ArtifactStoreError,
        TrackingURIError,
        config_secrets,
        redact_override,
        redact_saved_configs,
        redact_text,
    )
    from saffu.validation import ConfigError

log = logging.getLogger("sweep")

CONF_DIR = Path(__file__).resolve().parent / "conf"


def parse_overrides(arguments: list[str]) -> list[tuple[str, str, str]]:
    """Return (argument, key, value) for each ``key=value`` override on the command line, with
    Hydra's ``+``, ``++`` and ``~`` prefixes taken off the key."""
    overrides = []
    for argument in arguments:
        if argument.startswith("-") or "=" not in argument:
            continue
        key, value = argument.split("=", 1)
        overrides.append((argument, key.lstrip("+~"), value))
    return overrides


def tracking_keys() -> list[str]:
    """Return the keys that the files of the ``tracking`` config group define, in file order."""
    keys: dict[str, None] = {}
    for path in sorted((CONF_DIR / "tracking").glob("*.yaml")):
        keys.update(dict.fromkeys(str(key) for key in OmegaConf.load(path).keys()))
    return list(keys)


def misplaced_sweep_overrides(arguments: list[str]) -> list[str]:
    """Return a message for each override that sets a sweep setting (``optuna.sampler=tpe``)
    at the top level of the config instead of under ``sweep``.

    Hydra rejects such an override with "Key 'optuna' is not in struct" and suggests
    ``+optuna.sampler=tpe``, which adds a top-level key instead of setting the study's
    sampler.
    """
    messages = []
    for argument, key, value in parse_overrides(arguments):
        head = key.split(".", 1)[0]
        if head not in SWEEP_KEYS:
            continue
        if head == "optuna":
            fix = f"write +sweep=optuna sweep.{key}={value}"
        else:
            fix = f"write sweep.{key}={value}, or ++sweep.{key}={value} when the sweep file does not set '{head}'"
        messages.append(
            f"'{argument}' sets the sweep setting '{head}' at the top level of the config; sweep "
            f"settings live under 'sweep': {fix}"
        )
    return messages


def unknown_tracking_overrides(arguments: list[str]) -> list[str]:
    """Return a message for each override of a key under ``tracking`` that the tracking
    config does not have (``+tracking.ur=...``).

    Hydra would add such a key with a leading ``+`` and go on with the default store. Without
    the ``+`` it would reject the key with a message that repeats the value, which may
    contain a password. The messages here show the value with its password redacted.
    """
    known = tracking_keys()
    messages = []
    for argument, key, _ in parse_overrides(arguments):
        if not key.startswith("tracking.") or key.split(".")[1] in known:
            continue
        messages.append(
            f"'{redact_override(argument)}' sets the unknown key '{key}'; the tracking config has only "
            f"{', '.join('tracking.' + name for name in known)}: check the spelling"
        )
    return messages


@hydra.main(config_path="conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> dict[str, float]:
    """Run one job in this process, tracked as one MLflow run."""
    redact_hydra_output(cfg)
    try:
        return run_single(cfg, CONF_DIR)
    except (ConfigError, TrackingURIError, ArtifactStoreError) as error:
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
    except Exception:
        log_failure(cfg)
        sys.exit(1)


def redact_hydra_output(cfg: DictConfig) -> None:
    """Replace passwords in URIs by ``***`` in the configs that Hydra saved in this job's
    output folder (``.hydra/``) before the job started."""
    secrets = config_secrets(cfg)
    if not secrets or not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.output_subdir is not None:
        redact_saved_configs(Path(hydra_cfg.runtime.output_dir) / hydra_cfg.output_subdir, secrets)


def log_failure(cfg: DictConfig) -> None:
    """Log the exception being handled, with its traceback, and tracking.uri's password
    replaced by ``***``. Left to Hydra, the error would be printed after the command line's
    overrides, with the password as typed."""
    uri = str(OmegaConf.select(cfg, "tracking.uri", default="") or "")
    log.error("the job failed:\n%s", redact_text(traceback.format_exc(), uri).rstrip())


if __name__ == "__main__":
    if misplaced := misplaced_sweep_overrides(sys.argv[1:]) + unknown_tracking_overrides(sys.argv[1:]):
        for message in misplaced:
            print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    # The sweeper and run_single stop on an interrupt themselves; this covers Hydra's start.
    with exit_quietly_when_stopped("interrupted; run the same command again to run what is missing"):
        main()
