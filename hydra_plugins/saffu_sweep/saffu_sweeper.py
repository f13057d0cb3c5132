"""``hydra/sweeper: saffu``: expands a sweep definition into jobs and launches them.

A sweep definition (``sweeps/NAME.yaml``, loaded by ``+sweep=NAME`` into ``sweep``, or the
default grid in ``sweep_default``) has:

- ``grid``: key -> list of values. Keys with a ``/`` are config groups (``model/experts``).
  The jobs are the Cartesian product of the lists.
- ``variants`` (instead of ``grid``): a list of jobs, each a list of override strings, for
  variants that are not a product, such as the Pareto front that ``python -m
  analysis.frontier`` writes.
- ``fixed``: override strings applied to every job.
- ``max_retries`` (default 1): how often a job whose worker died runs again.
- ``dry_run`` (default false): print the job list with parameter counts and stop.
- ``optuna`` (optional): run an Optuna study over the grid instead of every job of it;
  the grid's factors become categorical parameters (see :mod:`saffu.search`).

Command-line sweep overrides (``model.block_size=1,2``) replace the factor of that key or
add a factor. Other command-line overrides apply to every job after ``fixed``, so they win.

Before any job starts, every job's config is composed and checked, each distinct corpus is
prepared once, and jobs whose config hash already has a FINISHED run are skipped. Invalid
configs stop the sweep with one message per problem and exit status 2; failed jobs give
exit status 1 after the summary.
"""


import dataclasses
import itertools
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, ListConfig, OmegaConf

log = logging.getLogger(__name__)

# Characters that make Hydra's override grammar read a value as more than one string.
_SPECIAL_CHARACTERS = set(" ,[]{}()=:'\"\\$")


@dataclass
class SaffuSweeperConf:
    _target_: str = "hydra_plugins.saffu_sweep.saffu_sweeper.SaffuSweeper"


ConfigStore.instance().store(group="hydra/sweeper", name="saffu", node=SaffuSweeperConf, provider="saffu")


@dataclass
class SweepSettings:
    """The sweep definition in force: ``sweep`` where given, else ``sweep_default``."""

    name: str
    grid: dict[str, list[Any]]
    fixed: list[str]
    # Jobs given one by one (each a list of overrides) instead of a grid; empty for a grid.
    variants: list[list[str]] = dataclasses.field(default_factory=list)
    max_retries: int = 1
    dry_run: bool = False
    # The ``optuna`` node as a plain dict, or None for a grid sweep.
    optuna: dict[str, Any] | None = None


SWEEP_KEYS = frozenset({"grid", "variants", "fixed", "max_retries", "dry_run", "optuna"})


class SweepDefinitionError(ValueError):
    """A sweep definition (grid, fixed, max_retries, dry_run) with invalid entries."""


def read_sweep_settings(config: DictConfig) -> SweepSettings:
    """Read the sweep definition from `config`: each key of ``sweep`` replaces the one of
    ``sweep_default``, so ``+sweep.dry_run=true`` alone keeps the default grid."""
    default = config.get("sweep_default") or {}
    chosen = config.get("sweep") or {}
    # A misspelled setting (say +sweep.dry_rnu=true) must stop the sweep, not launch it.
    for node_name, node in (("sweep", chosen), ("sweep_default", default)):
        unknown = sorted(set(node) - SWEEP_KEYS)
        if unknown:
            raise SweepDefinitionError(
                f"{node_name} has unknown keys {unknown}; a sweep definition accepts only "
                f"{sorted(SWEEP_KEYS)}, e.g. +sweep.dry_run=true"
            )

    def pick(key: str, fallback: Any) -> Any:
        if key in chosen:
            return chosen[key]
        if key in default:
            return default[key]
        return fallback

    # Variants given in `sweep` replace the default grid, and a grid given there replaces them.
    variants = chosen.get("variants") if "grid" not in chosen else None
    if variants is None and "grid" not in chosen and "variants" in default:
        variants = default["variants"]
    grid = pick("grid", None) if variants is None else {}
    fixed = pick("fixed", [])
    max_retries = pick("max_retries", 1)
    dry_run = pick("dry_run", False)
    optuna = pick("optuna", None)

    problems = []
    if "grid" in chosen and "variants" in chosen:
        problems.append("sweep has both grid and variants; give one of them")
    if variants is not None:
        problems.extend(_variant_problems(variants))
        if optuna is not None:
            problems.append("sweep.optuna searches a grid; replace sweep.variants with sweep.grid")
    elif not isinstance(grid, (Mapping, DictConfig)) or not grid:
        problems.append("sweep.grid is missing or empty; give a mapping of config key -> list of values")
    else:
        for key, values in grid.items():
            if not isinstance(values, (list, ListConfig)) or len(values) == 0:
                problems.append(f"sweep.grid[{key!r}]={values!r} is invalid: expected a non-empty list of values")
    if not isinstance(fixed, (list, ListConfig)) or not all(isinstance(item, str) for item in fixed):
        problems.append(f"sweep.fixed={fixed!r} is invalid: expected a list of override strings such as train.epochs=1")
    if not isinstance(max_retries, int) or isinstance(max_retries, bool) or max_retries < 0:
        problems.append(f"sweep.max_retries={max_retries!r} is invalid: expected an integer >= 0")
    if not isinstance(dry_run, bool):
        problems.append(f"sweep.dry_run={dry_run!r} is invalid: expected true or false")
    if optuna is not None and not isinstance(optuna, (Mapping, DictConfig)):
        problems.append(f"sweep.optuna={optuna!r} is invalid: expected a mapping of Optuna settings (see sweeps/optuna.yaml)")
    if problems:
        raise SweepDefinitionError("; ".join(problems))

    choices = config.hydra.runtime.choices
    name = choices.get("sweep") or choices.get("sweep@sweep_default") or "sweep"
    container = OmegaConf.to_container(grid, resolve=True) if isinstance(grid, DictConfig) else dict(grid)
    return SweepSettings(
        name=str(name),
        grid={str(key): list(values) for key, values in container.items()},
        variants=[[str(item) for item in variant] for variant in (variants or [])],
        fixed=[str(item) for item in fixed],
        max_retries=int(max_retries),
        dry_run=bool(dry_run),
        optuna=_to_dict(optuna) if optuna is not None else None,
    )


def _variant_problems(variants: Any) -> list[str]:
    """Check that `variants` is a non-empty list of non-empty lists of override strings."""
    example = "e.g. [[model.block_size=1, model.radius=0], [model.block_size=4, model.radius=16]]"
    if not isinstance(variants, (list, ListConfig)) or len(variants) == 0:
        return [f"sweep.variants={variants!r} is invalid: expected a non-empty list of override lists, {example}"]
    problems = []
    for index, variant in enumerate(variants):
        if (
            not isinstance(variant, (list, ListConfig))
            or len(variant) == 0
            or not all(isinstance(item, str) and "=" in item for item in variant)
        ):
            problems.append(
                f"sweep.variants[{index}]={variant!r} is invalid: expected a non-empty list of "
                f"key=value override strings, {example}"
            )
    return problems


def _to_dict(node: Any) -> dict[str, Any]:
    if isinstance(node, DictConfig):
        container = OmegaConf.to_container(node, resolve=True)
        assert isinstance(container, dict)
        return {str(key): value for key, value in container.items()}
    return dict(node)


def format_override_value(value: Any) -> str:
    """Write a YAML value as Hydra override syntax: ``true``, ``null``, ``[1,2]``, quoted strings."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_override_value(item) for item in value) + "]"
    if isinstance(value, str) and (not value or _SPECIAL_CHARACTERS & set(value)):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return str(value)


def expand_overrides(settings: SweepSettings, arguments: Sequence[str]) -> tuple[list[list[str]], list[int]]:
    """Expand the grid, or the variants, crossed with command-line sweeps, into one override
    list per job.

    Each job's list is: one value per factor (for variants, the variant's overrides, then
    one value per command-line factor), then ``fixed``, then the command-line overrides
    that are not sweeps. Returns the lists and, per job, how many leading overrides name
    it. Raises HydraException for a sweep kind the grid cannot enumerate (interval sweeps).
    """
    factors, constant = grid_factors(settings, arguments)
    if settings.variants:
        jobs, leading = [], []
        for variant in settings.variants:
            for combination in itertools.product(*factors.values()):
                jobs.append(list(variant) + list(combination) + settings.fixed + constant)
                leading.append(len(variant) + len(combination))
        return jobs, leading
    combinations = itertools.product(*factors.values()) if factors else iter([()])
    jobs = [list(combination) + settings.fixed + constant for combination in combinations]
    return jobs, [len(factors)] * len(jobs)


def grid_factors(settings: SweepSettings, arguments: Sequence[str]) -> tuple[dict[str, list[str]], list[str]]:
    """Return the grid's factors, with command-line sweeps applied, as key -> list of
    ``key=value`` overrides, and the command-line overrides that are not factors."""
    factors: dict[str, list[str]] = {
        key: [f"{key}={format_override_value(value)}" for value in values] for key, values in settings.grid.items()
    }
    constant: list[str] = []
    parser = OverridesParser.create()
    for override in parser.parse_overrides(list(arguments)):
        key = override.key_or_group
        if override.is_sweep_override():
            if not override.is_discrete_sweep():
                raise HydraException(
                    f"{override.input_line}: the saffu sweeper enumerates lists and ranges only; "
                    "write the values as a comma-separated list"
                )
            prefix = override.get_key_element()
            factors[key] = [f"{prefix}={value}" for value in override.sweep_string_iterator()]
        elif key in settings.grid:
            factors[key] = [override.input_line]
        else:
            constant.append(override.input_line)
    return factors, constant


class SaffuSweeper(Sweeper):
    """Grid sweeper with checks before launch, resume and a summary; see the module docstring."""

    def __init__(self) -> None:
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.launcher: Any = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> Any:
        from saffu.launch import drain_on_signal, sigterm_as_interrupt
        from saffu.signals import interrupt_behind

        # From here on SIGUSR1 drains the sweep instead of ending the process (its default
        # action), and SIGTERM, like Ctrl-C, stops it with one line instead of a traceback.
        with drain_on_signal() as drain, sigterm_as_interrupt():
            try:
                return self._sweep(arguments, drain)
            # An error that a Ctrl-C or SIGTERM caused inside a library counts as the interrupt.
            except (KeyboardInterrupt, Exception) as error:
                if interrupt_behind(error) is None:
                    raise
                log.error("sweep interrupted; relaunch the same command to run what is missing")
                raise SystemExit(130) from None

    def _sweep(self, arguments: list[str], drain: threading.Event) -> Any:
        from hydra_plugins.saffu_sweep.composing import compose_jobs
        from hydra_plugins.saffu_sweep.ray_launcher import RayLauncher, conf_dir_of
        from saffu.launch import RaySettings, describe_overrides, ray_address_problem
        from saffu.planning import PreparedSweep, close_stale_sweep_run, plan_jobs, split_finished
        from saffu.search import OptunaSettingsError, read_optuna_settings
        from saffu.tracking import (
            RunRecorder,
            TrackingURIError,
            config_secrets,
            prepare_store,
            redact_all,
            redact_override,
            validate_experiment_name,
            validate_tracking_uri,
        )
        from saffu.validation import ConfigError

        assert self.config is not None and self.hydra_context is not None
        config = self.config
        optuna_settings = None
        try:
            settings = read_sweep_settings(config)
            job_overrides, leading = expand_overrides(settings, arguments)
            validate_tracking_uri(config.tracking.uri)
            validate_experiment_name(config.experiment)
            if settings.optuna is not None:
                optuna_settings = read_optuna_settings(settings.optuna)
            ray_settings = RaySettings.from_config(config.ray)
        except (OptunaSettingsError, ConfigError) as error:
            _stop_on_problems(error.problems)
        except (SweepDefinitionError, TrackingURIError, HydraException) as error:
            _stop_on_problems([str(error)])

        sweep_dir = Path(str(config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        # Hydra's BasicSweeper saves the config as typed. This one replaces passwords in URIs by ***.
        text = redact_all(OmegaConf.to_yaml(config), config_secrets(config))
        (sweep_dir / "multirun.yaml").write_text(text, encoding="utf-8")
        log.info("sweep %s: %d jobs, output in %s", settings.name, len(job_overrides), sweep_dir)

        composed = compose_jobs(self.hydra_context, config, job_overrides)
        plan = plan_jobs(composed, conf_dir_of(config), ray_settings)
        if plan.problems:
            _stop_on_problems(plan.problems)
        for job in plan.jobs:
            job.label = describe_overrides(job.overrides[: leading[job.index]])
        log.info("checked %d job configs; no problems found", len(composed))
        if not settings.dry_run:
            unreachable = ray_address_problem(ray_settings.address)
            if unreachable:
                _stop_on_problems([unreachable])

        try:
            tracking = prepare_store(config.tracking.uri, config.experiment, config.tracking.get("artifact_location"))
        except TrackingURIError as error:  # For example an experiment that is deleted in the store.
            _stop_on_problems([str(error)])
        if optuna_settings is not None:
            return self._run_study(settings, optuna_settings, arguments, composed, plan.jobs, tracking, ray_settings, drain)

        to_run, skipped = split_finished(plan.jobs, tracking)
        params = {
            "sweep.name": settings.name,
            "sweep.grid": settings.grid,
            "sweep.fixed": settings.fixed,
            "sweep.n_jobs": len(plan.jobs),
            "sweep.command_line": " ".join(redact_override(argument) for argument in arguments),
        }
        prepared = PreparedSweep(settings.name, to_run, skipped, tracking, ray_settings, settings.max_retries, params)

        if settings.dry_run:
            log_dry_run(prepared, plan.jobs)
            return []
        if not to_run:
            log.info("sweep %s: all %d jobs already have a FINISHED run; nothing to do", settings.name, len(skipped))
            close_stale_sweep_run(RunRecorder(tracking), prepared.sweep_id)
            return []
        if skipped:
            log.info("resuming: %d of %d jobs already have a FINISHED run and are skipped", len(skipped), len(plan.jobs))

        if isinstance(self.launcher, RayLauncher):
            from saffu.launch import RayJoinError
            from saffu.planning import SweepAlreadyRunning
            from saffu.tracking import ArtifactStoreError

            try:
                summary = self.launcher.run_prepared(prepared, drain)
            except (SweepAlreadyRunning, RayJoinError, ArtifactStoreError) as error:
                _stop_on_problems([str(error).splitlines()[0]])
            except KeyboardInterrupt:
                # The launcher has already cancelled the jobs and marked their runs KILLED.
                log.error("sweep %s interrupted; relaunch the same command to run what is missing", settings.name)
                raise SystemExit(130) from None
            if summary.exit_code:  # Jobs failed (1), or a drain left some for the next launch (75).
                raise SystemExit(summary.exit_code)
            return []

        # Another launcher (e.g. hydra/launcher=basic for debugging) gets plain override lists.
        return [self.launcher.launch([job.overrides for job in to_run], initial_job_idx=0)]

    def _run_study(
        self,
        settings: SweepSettings,
        optuna_settings: Any,
        arguments: list[str],
        composed: list[Any],
        jobs: list[Any],
        tracking: Any,
        ray_settings: Any,
        drain: threading.Event,
    ) -> Any:
        """Run an Optuna study whose space is the grid (see :mod:`saffu.search`)."""
        from hydra_plugins.saffu_sweep.ray_launcher import RayLauncher
        from saffu.launch import EXIT_DRAINED, RayJoinError
        from saffu.planning import PreparedSweep, SweepAlreadyRunning, split_finished
        from saffu.search import SearchSpace, StudyMismatchError, default_study_name, describe_space
        from saffu.tracking import ArtifactStoreError, redact_override

        assert self.config is not None
        factors, _ = grid_factors(settings, arguments)
        space = SearchSpace.from_plan(factors, composed, jobs)
        study_name = optuna_settings.study_name or default_study_name(settings.name, jobs)
        params = {
            "sweep.name": settings.name,
            "sweep.grid": settings.grid,
            "sweep.fixed": settings.fixed,
            "sweep.n_jobs": len(jobs),
            "sweep.command_line": " ".join(redact_override(argument) for argument in arguments),
        }
        prepared = PreparedSweep(settings.name, jobs, [], tracking, ray_settings, settings.max_retries, params)
        log.info(
            "Optuna study %s: %s sampler, %d trials, %d at once, over %d configs (%s)",
            study_name, optuna_settings.sampler, optuna_settings.n_trials, optuna_settings.parallel, len(jobs),
            describe_space(space),
        )
        if settings.dry_run:
            # "skip" marks the configs whose FINISHED run a trial would reuse.
            to_run, skipped = split_finished(jobs, tracking)
            log_dry_run(dataclasses.replace(prepared, jobs=to_run, skipped=skipped), jobs)
            return []
        if not isinstance(self.launcher, RayLauncher):
            _stop_on_problems(["the Optuna search runs its trials on Ray; use hydra/launcher=ray (the default)"])

        from sqlalchemy.exc import SQLAlchemyError

        try:
            outcome = self.launcher.run_study(
                prepared, space, optuna_settings, study_name, Path(str(self.config.hydra.sweep.dir)), drain
            )
        except (StudyMismatchError, SweepAlreadyRunning, RayJoinError, SQLAlchemyError, ArtifactStoreError) as error:
            _stop_on_problems([str(error).splitlines()[0]])
        except KeyboardInterrupt:
            # The study loop has already cancelled the jobs, marked their trials FAIL and queued them again.
            log.error("study %s interrupted; relaunch the same command to continue it", study_name)
            raise SystemExit(130) from None
        if outcome.exit_code == EXIT_DRAINED:
            log.warning("study %s drained before %d COMPLETE trials; relaunch the same command to continue it",
                        study_name, optuna_settings.n_trials)
        if outcome.exit_code:
            raise SystemExit(outcome.exit_code)
        return []


def _stop_on_problems(problems: list[str]) -> None:
    """Log each problem and exit with status 2, without a traceback."""
    log.error("the sweep was not started: %d problem(s)", len(problems))
    for problem in problems:
        log.error("  - %s", problem)
    raise SystemExit(2)


def log_dry_run(prepared: Any, jobs: list[Any]) -> None:
    """Log the job list with parameter counts, memory requests and a relative cost estimate.
    A job's status is ``skip`` (a FINISHED run exists), ``wait`` (a live sweep is running
    its config, so a launch now would wait for it) or ``run``."""
    from saffu.launch import configs_running_elsewhere
    from saffu.tracking import RunRecorder

    skipped = {job.config_hash for job in prepared.skipped}
    waiting = configs_running_elsewhere(RunRecorder(prepared.tracking), {job.config_hash for job in prepared.jobs}, None)
    costs = {job.index: _relative_cost(job) for job in jobs}
    total_cost = sum(costs.values()) or 1.0
    lines = [f"{'#':>4}  {'status':<8} {'params':>12} {'memory':>9} {'cost %':>7}  overrides"]
    for job in jobs:
        status = "run"
        if job.config_hash in skipped:
            status = "skip"
        elif job.config_hash in waiting:
            status = "wait"
        memory = f"{job.memory_bytes / 2**30:.2f} GiB"
        lines.append(
            f"{job.index:>4}  {status:<8} {job.n_params or 0:>12,} {memory:>9} {100 * costs[job.index] / total_cost:>6.1f}%  {job.label}"
        )
    elsewhere = f", {len(waiting)} running in another sweep" if waiting else ""
    log.info(
        "dry run of sweep %s (%s): %d jobs, %d to run, %d already finished%s\n%s",
        prepared.name, prepared.sweep_id, len(jobs), len(prepared.jobs), len(prepared.skipped), elsewhere,
        "\n".join(lines),
    )
    log.info(
        "cost % is each job's share of the sweep's parameters x training tokens x passes, "
        "a rough estimate of its share of the compute, not a measured time"
    )


def _relative_cost(job: Any) -> float:
    train = job.config.get("train", {})
    passes = 1 + (int(train.get("epochs", 0)) if train.get("enabled", True) else 0)
    if train.get("bp_only"):
        passes += int(train.get("epochs", 0))
    return float(job.n_params or 0) * float(job.train_tokens or 1) * passes
