"""The one typed definition of a step as the execution layer sees it, read from ops-db once per batch.

``StepDefinition`` is what the runner, the attempt preparation and the outcome metadata need of a
``ReductionStep``: names, the resolved software version, config, resources and retry limit. It holds no ORM
object, so a loop that runs for hours never touches a closed session. ``resources_of`` turns the step's
``resources`` JSON into ``JobResources``; the defaults of a missing key are ``JobResources``' own, written once.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from ccat_dagster.execution.hpc.base import JobResources
from ccat_dagster.opsdb import models as m

_RESOURCE_DEFAULTS = {f.name: f.default for f in fields(JobResources)}
# The pipeline YAML's ``execution: {mode: ...}``, stored in ``ReductionStep.resources`` when it is not auto.
EXECUTION_MODE_KEY = "execution_mode"


class ExecutionMode(enum.StrEnum):
    AUTO = "auto"
    PACKED = "packed"
    JOB_PER_SUB_GROUP = "job_per_sub_group"


def chooses_packing(mode: ExecutionMode, resources: JobResources, *, enabled: bool, max_task_minutes: float) -> bool:
    """Whether a step's sub-groups run packed: asked for (``packed``), or ``auto`` with packing enabled at the
    site and a step short enough (``time_hours`` ≤ ``max_task_minutes``) and without GPUs."""
    if mode is ExecutionMode.PACKED:
        return True
    if mode is ExecutionMode.JOB_PER_SUB_GROUP or not enabled:
        return False
    return resources.gpus == 0 and resources.time_hours * 60 <= max_task_minutes


def resources_of(raw: Mapping[str, Any] | None) -> JobResources:
    """``JobResources`` from a step's ``resources`` JSON (cpu, memory_gb, time_hours, gpus); missing keys default."""
    values = {**_RESOURCE_DEFAULTS, **{k: v for k, v in (raw or {}).items() if k in _RESOURCE_DEFAULTS}}
    return JobResources(
        cpu=int(values["cpu"]),
        memory_gb=float(values["memory_gb"]),
        time_hours=float(values["time_hours"]),
        gpus=int(values["gpus"]),
    )


@dataclass(frozen=True)
class StepDefinition:
    """One step of one pipeline with its software version resolved, detached from any session."""

    pipeline_name: str
    step_name: str
    step_id: int
    is_final: bool
    software_name: str
    software_version: str
    image_ref: str
    image_digest: str | None
    entrypoint: tuple[str, ...]
    config: Mapping[str, Any] = field(default_factory=dict)
    resources: JobResources = JobResources()
    max_retries: int = 0
    execution_mode: ExecutionMode = ExecutionMode.AUTO

    @property
    def asset_label(self) -> str:
        return f"{self.pipeline_name}/{self.step_name}"

    @property
    def software_label(self) -> str:
        return f"{self.software_name}=={self.software_version}"

    @classmethod
    def of(cls, pipeline: m.Pipeline, step: m.ReductionStep, version: m.ReductionSoftwareVersion) -> StepDefinition:
        """Read from the ORM rows (inside their session); ``is_final``: no step of the pipeline depends on it."""
        return cls(
            pipeline_name=pipeline.name,
            step_name=step.name,
            step_id=step.id,
            is_final=not any(step in other.depends_on for other in pipeline.steps),
            software_name=step.software.name,
            software_version=version.version,
            image_ref=version.image_ref,
            image_digest=version.image_digest,
            entrypoint=tuple(version.entrypoint or []),
            config=dict(step.config.parameters or {}),
            resources=resources_of(step.resources),
            max_retries=step.max_retries,
            execution_mode=ExecutionMode((step.resources or {}).get(EXECUTION_MODE_KEY, "auto")),
        )
