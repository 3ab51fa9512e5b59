"""What the code location needs to know about a pipeline, read from ops-db once when the location loads."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from ccat_dagster.execution.qa import QaThreshold, thresholds_from_dict
from ccat_dagster.opsdb import models as m


@dataclass(frozen=True)
class StepSnapshot:
    name: str
    description: str
    group_by: tuple[str, ...]
    depends_on: tuple[str, ...]
    software: str
    version_spec: str
    version_policy: str
    config_sha256: str
    max_retries: int
    resources: dict
    cooldown_seconds: int
    qa_checks: tuple[QaThreshold, ...] = ()

    @property
    def code_version(self) -> str:
        return f"{self.software}@{self.version_policy}:{self.version_spec}+cfg:{self.config_sha256[:12]}"


@dataclass(frozen=True)
class PipelineSnapshot:
    id: int
    name: str
    description: str
    trigger_type: str
    trigger_config: dict
    priority: int
    grouping_name: str
    grouping_rules: list
    steps: tuple[StepSnapshot, ...]

    def step(self, name: str) -> StepSnapshot:
        return next(s for s in self.steps if s.name == name)

    def downstream_of(self, name: str) -> list[StepSnapshot]:
        return [s for s in self.steps if name in s.depends_on]


def load_pipeline_snapshots(
    session: Session, *, processing_location_id: int
) -> list[tuple[str, PipelineSnapshot | Exception]]:
    """Enabled pipelines of this processing location; a row that cannot be read becomes its error."""
    pipelines = session.scalars(
        select(m.Pipeline)
        .where(m.Pipeline.enabled.is_(True))
        .where(m.Pipeline.processing_location_id == processing_location_id)
        # Everything _snapshot reads, in a handful of statements (lazy loads were ~5 per pipeline).
        .options(
            selectinload(m.Pipeline.data_grouping),
            selectinload(m.Pipeline.steps).options(
                selectinload(m.ReductionStep.depends_on),
                selectinload(m.ReductionStep.software),
                selectinload(m.ReductionStep.config),
            ),
        )
        .order_by(m.Pipeline.name)
    ).all()
    out: list[tuple[str, PipelineSnapshot | Exception]] = []
    for pipeline in pipelines:
        try:
            out.append((pipeline.name, _snapshot(pipeline)))
        except Exception as error:  # noqa: BLE001 - one broken row must not take the location down
            out.append((pipeline.name, error))
    return out


def pipeline_snapshot(pipeline: m.Pipeline) -> PipelineSnapshot:
    """The snapshot of one loaded pipeline row (enabled or not), as the code location builds it."""
    return _snapshot(pipeline)


def _snapshot(pipeline: m.Pipeline) -> PipelineSnapshot:
    return PipelineSnapshot(
        id=pipeline.id,
        name=pipeline.name,
        description=pipeline.description or "",
        trigger_type=pipeline.trigger_type.value,
        trigger_config=dict(pipeline.trigger_config or {}),
        priority=pipeline.priority,
        grouping_name=pipeline.data_grouping.name,
        grouping_rules=list(pipeline.data_grouping.filter_rules or []),
        steps=tuple(
            StepSnapshot(
                name=step.name,
                description=step.description or "",
                group_by=tuple(step.group_by or []),
                depends_on=tuple(u.name for u in step.depends_on),
                software=step.software.name,
                version_spec=step.version_spec,
                version_policy=step.version_policy.value,
                config_sha256=step.config.parameters_sha256,
                max_retries=step.max_retries,
                resources=dict(step.resources or {}),
                cooldown_seconds=step.cooldown_seconds,
                qa_checks=thresholds_from_dict(step.qa_checks),
            )
            for step in pipeline.steps
        ),
    )
