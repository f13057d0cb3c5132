"""``hydra/launcher: ray``: runs each job of a multirun as a Ray task, tracked in MLflow.

The maintained hydra-ray-launcher plugin is not used: it pins cloudpickle<3 (Ray 2.60
needs cloudpickle 3), pulls in boto3 for its AWS mode, and runs jobs with no hook for
checking every config before launch, resuming, MLflow parent runs or retrying jobs whose
worker died. This launcher does those through :mod:`saffu.planning` and :mod:`saffu.launch`.

With ``hydra/sweeper: saffu`` the sweeper checks and prepares the jobs and calls
:meth:`RayLauncher.run_prepared`. With another sweeper, :meth:`RayLauncher.launch` does
the same steps itself for each batch.
"""


import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

log = logging.getLogger(__name__)


@dataclass
class RayLauncherConf:
    _target_: str = "hydra_plugins.saffu_sweep.ray_launcher.RayLauncher"
    # The function each task runs: "module:function" taking (cfg, log_metric=) and returning metrics.
    job_function: str = "saffu.job:run_job"
    # Seconds between progress lines while no job completes.
    progress_interval_s: float = 30.0


ConfigStore.instance().store(group="hydra/launcher", name="ray", node=RayLauncherConf, provider="saffu")


class RayLauncher(Launcher):
    """Launches jobs as Ray tasks; see the module docstring."""

    def __init__(self, job_function: str = "saffu.job:run_job", progress_interval_s: float = 30.0) -> None:
        self.job_function = job_function
        self.progress_interval_s = float(progress_interval_s)
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        # Tasks run saffu.launch.execute_job, which calls `job_function` with tracking; the
        # task function of sweep.py is the single-run entry point and is not shipped to workers.
        self.task_function = task_function

    def run_prepared(self, prepared: "PreparedSweep", drain: threading.Event | None = None) -> "SweepSummary":  # noqa: F821
        """Run a sweep that the sweeper has checked and prepared; setting `drain` stops it after its running jobs."""
        from saffu.planning import run_sweep

        return run_sweep(prepared, self.job_function, self.progress_interval_s, drain)

    def run_study(
        self,
        prepared: "PreparedSweep",  # noqa: F821
        space: "SearchSpace",  # noqa: F821
        settings: "OptunaSettings",  # noqa: F821
        study_name: str,
        sweep_dir: Path | None = None,
        drain: threading.Event | None = None,
    ) -> "StudyOutcome":  # noqa: F821
        """Run an Optuna study whose trials are jobs of a prepared sweep; setting `drain` stops it after its running jobs."""
        from saffu.search import run_study

        return run_study(
            prepared, space, settings, study_name, self.job_function, self.progress_interval_s, sweep_dir, drain
        )

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        """Check, prepare and run one batch of jobs (used when another sweeper drives this launcher)."""
        from hydra_plugins.saffu_sweep.composing import compose_jobs
        from saffu.launch import RaySettings
        from saffu.planning import PreparedSweep, plan_jobs, run_sweep, split_finished
        from saffu.tracking import prepare_store
        from saffu.validation import ConfigError

        assert self.config is not None and self.hydra_context is not None
        composed = compose_jobs(self.hydra_context, self.config, job_overrides, initial_job_idx)
        ray_settings = RaySettings.from_config(self.config.ray)
        plan = plan_jobs(composed, conf_dir_of(self.config), ray_settings)
        if plan.problems:
            raise ConfigError(plan.problems)

        tracking = prepare_store(self.config.tracking.uri, self.config.experiment, self.config.tracking.get("artifact_location"))
        to_run, skipped = split_finished(plan.jobs, tracking)
        prepared = PreparedSweep("launch", to_run, skipped, tracking, ray_settings)
        summary = run_sweep(prepared, self.job_function, self.progress_interval_s)

        failed = {job.index: error for job, error in summary.failed}
        returns = []
        for job in plan.jobs:
            result = JobReturn(overrides=job.overrides)
            if job.index in failed:
                result.status = JobStatus.FAILED
                result.return_value = RuntimeError(failed[job.index])
            else:
                result.status = JobStatus.COMPLETED
                result.return_value = None
            returns.append(result)
        return returns


def conf_dir_of(config: DictConfig) -> Path | None:
    """Return the folder of the primary config source (conf/), for the unknown-key check."""
    for source in config.hydra.runtime.config_sources:
        if source.provider == "main" and source.schema == "file":
            return Path(source.path)
    return None
