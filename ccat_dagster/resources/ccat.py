"""The resources every step asset uses. Each builds its domain object; no domain logic lives here."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import dagster as dg
from sqlalchemy import Engine

from ccat_dagster.execution.hpc.base import HpcBackend
from ccat_dagster.execution.runtimes import ContainerRuntime, get_runtime
from ccat_dagster.execution.staging import ExternalStager, LocalStager, Stager
from ccat_dagster.execution.step import StepDefinition, chooses_packing
from ccat_dagster.opsdb.engine import shared_engine
from ccat_dagster.settings import OPS_DB_URL_VAR, Settings


class OpsDbResource(dg.ConfigurableResource):
    """The operations database (PostgreSQL in production). ``url`` is a SQLAlchemy URL; keep secrets in the
    environment (``dg.EnvVar("CCAT_OPS_DB_URL")``) so they never reach the run config shown in the UI."""

    url: str

    def engine(self) -> Engine:
        return shared_engine(self.url)


class HpcBackendResource(dg.ConfigurableResource):
    """Where jobs run: ``local`` (subprocesses on this host), ``slurm`` (sbatch on a cluster) or ``kubernetes``
    (a Job per attempt; its ``K8S_*`` settings are read from the environment)."""

    kind: str = "local"
    state_dir: str = ""
    max_concurrent_jobs: int = 2
    slurm_partition: str = ""
    packed_execution: str = "auto"
    packed_state_dir: str = ""
    packed_max_task_minutes: int = 30
    packed_max_allocations: int = 2
    packed_allocations_per_batch: int = 10
    packed_cores_per_allocation: int = 2
    packed_walltime_minutes: int = 60
    packed_idle_seconds: int = 60

    def for_step(self, step: StepDefinition) -> HpcBackend | None:
        """The packed backend when the step's sub-groups run packed here (see docs/pipeline-yaml.md), else None
        (the step runs one job per sub-group on ``get()``). Packing needs Slurm; ``auto`` also needs Parsl."""
        if self.kind != "slurm":
            return None
        enabled = self.packed_execution == "auto" and importlib.util.find_spec("parsl") is not None
        if not chooses_packing(
            step.execution_mode, step.resources, enabled=enabled, max_task_minutes=self.packed_max_task_minutes
        ):
            return None
        from ccat_dagster.execution.hpc.packed.backend import PackedBackend
        from ccat_dagster.execution.hpc.packed.engine import ParslEngine, PilotSettings

        state_dir = Path(self.packed_state_dir)
        engine = ParslEngine(
            PilotSettings(
                max_allocations=self.packed_max_allocations,
                allocations_per_batch=self.packed_allocations_per_batch,
                cores_per_allocation=self.packed_cores_per_allocation,
                walltime_minutes=self.packed_walltime_minutes,
                idle_seconds=self.packed_idle_seconds,
                partition=self.slurm_partition,
                run_dir=state_dir / "runinfo",
            )
        )
        return PackedBackend(state_dir / "tasks", engine, max_task_hours=self.packed_walltime_minutes / 60)

    def get(self) -> HpcBackend:
        if self.kind == "local":
            from ccat_dagster.execution.hpc.local import LocalBackend

            return LocalBackend(state_dir=Path(self.state_dir), max_concurrent_jobs=self.max_concurrent_jobs)
        if self.kind == "slurm":
            from ccat_dagster.execution.hpc.slurm import SlurmBackend

            return SlurmBackend(partition=self.slurm_partition or None)
        if self.kind == "kubernetes":
            from ccat_dagster.execution.hpc.kubernetes import backend_from_settings

            # Its settings (image, volumes, credentials) come from the environment, validated at start-up.
            return backend_from_settings(Settings.from_env())
        raise dg.Failure(
            f"HPC backend {self.kind!r} is not available in this deployment: use local, slurm or kubernetes"
        )


class ContainerRuntimeResource(dg.ConfigurableResource):
    """How the reduction container runs: ``apptainer`` (production) or ``bubblewrap`` (same contract, no Apptainer)."""

    kind: str = "apptainer"

    def get(self) -> ContainerRuntime:
        return get_runtime(self.kind)


class StagerResource(dg.ConfigurableResource):
    """How raw data reaches the processing location: ``local`` copies from the archive disk, ``external`` asks
    data-transfer through StagingJob rows and waits."""

    kind: str = "local"
    poll_interval_seconds: float = 5.0

    def get(self) -> Stager:
        if self.kind == "external":
            return ExternalStager(poll_interval_seconds=self.poll_interval_seconds)
        return LocalStager()


class ExecutionSettingsResource(dg.ConfigurableResource):
    """Paths and limits of this processing location (see docs/configuration.md)."""

    pipeline_base_dir: str
    sif_cache_dir: str
    processing_location_id: int
    max_in_flight: int = 100
    poll_interval_seconds: float = 2.0
    staging_timeout_seconds: float = 3600.0
    scheduler_tolerance_seconds: float = 900.0
    scheduler_queries_per_minute: float = 20.0
    ops_db_tolerance_seconds: float = 300.0
    max_memory_gb: float = 512.0
    max_time_hours: float = 48.0
    max_products_per_attempt: int = 10_000


def resources_from_settings(settings: Settings, *, processing_location_id: int) -> dict[str, Any]:
    return {
        # From the environment when set, so a password never appears in the resource config the UI shows.
        "opsdb": OpsDbResource(
            url=dg.EnvVar(OPS_DB_URL_VAR) if os.environ.get(OPS_DB_URL_VAR) else settings.ops_db_url
        ),
        "hpc": HpcBackendResource(
            kind=settings.hpc_backend,
            state_dir=str(settings.pipeline_base_dir / ".local-jobs"),
            max_concurrent_jobs=settings.local_max_running,
            slurm_partition=settings.slurm_partition,
            packed_execution=settings.packed_execution,
            packed_state_dir=str(settings.pipeline_base_dir / ".packed"),
            packed_max_task_minutes=settings.packed_max_task_minutes,
            packed_max_allocations=settings.packed_max_allocations,
            packed_allocations_per_batch=settings.packed_allocations_per_batch,
            packed_cores_per_allocation=settings.packed_cores_per_allocation,
            packed_walltime_minutes=settings.packed_walltime_minutes,
            packed_idle_seconds=settings.packed_idle_seconds,
        ),
        "container_runtime": ContainerRuntimeResource(kind=settings.container_runtime),
        "stager": StagerResource(kind=settings.stager),
        "execution": ExecutionSettingsResource(
            pipeline_base_dir=str(settings.pipeline_base_dir),
            sif_cache_dir=str(settings.sif_cache_dir),
            processing_location_id=processing_location_id,
            max_in_flight=settings.max_concurrent_jobs,
            poll_interval_seconds=float(settings.poll_interval_seconds),
            staging_timeout_seconds=float(settings.staging_timeout_seconds),
            scheduler_tolerance_seconds=float(settings.scheduler_tolerance_seconds),
            scheduler_queries_per_minute=float(settings.scheduler_queries_per_minute),
            ops_db_tolerance_seconds=float(settings.ops_db_tolerance_seconds),
            max_memory_gb=float(settings.max_memory_gb),
            max_time_hours=float(settings.max_time_hours),
            max_products_per_attempt=settings.max_products_per_attempt,
        ),
    }
