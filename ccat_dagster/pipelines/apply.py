"""Store a checked PipelineSpec in ops-db, and read stored pipelines back.

``apply_pipeline_spec`` first resolves and checks everything that needs ops-db (processing location,
instrument module, presets, fan-in after presets, software versions already registered, groupings shared with
other pipelines, steps that cannot be removed) and only then writes, all inside the caller's transaction: a
rejected spec raises before its first write, and the caller's rollback (``session_scope``) undoes any write if
something fails later. Applying the same spec again changes nothing and reports ``unchanged``.

Immutable rows: a ReductionSoftwareVersion is never changed (same version, other image → rejected: bump the
version); a ReductionStepConfig is never changed (changed parameters → a new row; old attempts keep theirs).
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, selectinload

from ccat_dagster.errors import CcatError
from ccat_dagster.execution.qa import thresholds_to_dict
from ccat_dagster.execution.step import EXECUTION_MODE_KEY
from ccat_dagster.grouping.presets import PresetError, ensure_builtin_presets, get_preset
from ccat_dagster.grouping.rules import FilterRuleError, parse_rules, rules_to_json
from ccat_dagster.opsdb.enums import LocationType, StepRetention
from ccat_dagster.opsdb.models import (
    DataGrouping,
    DataLocation,
    ExecutedReductionStep,
    Instrument,
    InstrumentModule,
    Pipeline,
    ReductionSoftware,
    ReductionSoftwareVersion,
    ReductionStep,
    ReductionStepConfig,
)
from ccat_dagster.pipelines.spec import (
    PipelineSpec,
    SoftwareSpec,
    StepSpec,
    fan_in_problems,
    format_path,
    sha256_of,
)

__all__ = [
    "ApplyOutcome",
    "ApplyResult",
    "PipelineApplyError",
    "PipelineNotFoundError",
    "PipelineSummary",
    "apply_pipeline_spec",
    "config_name",
    "definition_sha256",
    "disable_pipeline",
    "enable_pipeline",
    "export_pipeline",
    "get_pipeline",
    "list_pipelines",
    "set_pipeline_enabled",
    "software_version_of",
]


class PipelineApplyError(CcatError, ValueError):
    """A spec ops-db cannot take ``problems`` holds one line per problem. Nothing is written."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(self.problems))


class PipelineNotFoundError(CcatError, LookupError):
    """No pipeline of that name in ops-db; the message lists the stored names."""


class ApplyOutcome(enum.StrEnum):
    CREATED = "created"
    UPDATED = "updated"
    UNCHANGED = "unchanged"


@dataclass(frozen=True)
class ApplyResult:
    outcome: ApplyOutcome
    pipeline_id: int
    pipeline_name: str
    # One line per change (empty when unchanged), e.g. "step 'baseline': cooldown_seconds 60 → 120".
    changes: tuple[str, ...] = ()


@dataclass(frozen=True)
class PipelineSummary:
    id: int
    name: str
    description: str
    enabled: bool
    trigger_type: str
    trigger_config: dict[str, Any]
    processing_location: str
    processing_location_id: int
    data_grouping: str
    priority: int
    steps: tuple[str, ...]
    spec_sha256: str
    updated_at: dt.datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "description": self.description,
            "enabled": self.enabled,
            "trigger_type": self.trigger_type,
            "trigger_config": self.trigger_config,
            "processing_location": self.processing_location,
            "processing_location_id": self.processing_location_id,
            "data_grouping": self.data_grouping,
            "priority": self.priority,
            "steps": list(self.steps),
            "spec_sha256": self.spec_sha256,
            "updated_at": self.updated_at.isoformat(),
        }


def config_name(pipeline: str, step: str) -> str:
    """``ReductionStepConfig.name`` of a step's parameters: ``<pipeline>.<step>``."""
    return f"{pipeline}.{step}"


# ------------------------------------------------------------------------------------------------- apply


@dataclass
class _Plan:
    """Everything phase 1 resolved; phase 2 only writes it."""

    location: DataLocation
    module: InstrumentModule | None
    filter_rules: list[dict[str, Any]]
    group_by: dict[str, list[str]]
    versions: dict[tuple[str, str], ReductionSoftwareVersion | None]
    pipeline: Pipeline | None
    grouping: DataGrouping | None
    removed_steps: list[ReductionStep]


def apply_pipeline_spec(session: Session, spec: PipelineSpec, *, source_path: str | Path | None = None) -> ApplyResult:
    """Create or update the pipeline ``spec`` describes, in the caller's transaction (flushes, never commits).

    Raises PipelineApplyError listing every problem; the caller must then roll back (``session_scope`` does).
    ``source_path`` only labels messages (default: the file the spec was loaded from).
    """
    origin = str(source_path or spec.source_path or f"pipeline {spec.name}")
    plan = _plan(session, spec, origin)
    return _write(session, spec, plan)


def _plan(session: Session, spec: PipelineSpec, origin: str) -> _Plan:
    problems: list[str] = []

    def problem(path: Sequence[str | int], message: str) -> None:
        problems.append(f"{origin}: {format_path(path)}: {message}")

    location = _find_location(session, spec.processing_location, problem)
    module = _find_module(session, spec.grouping.instrument_module, problem)

    if spec.grouping.preset is not None or any(step.group_by_preset for step in spec.steps):
        # The built-in presets (per-scan, …) exist in every ops-db that a pipeline names them in.
        ensure_builtin_presets(session)

    filter_rules = [dict(rule) for rule in spec.grouping.rules]
    if spec.grouping.preset is not None:
        try:
            preset = get_preset(session, spec.grouping.preset)
            filter_rules = rules_to_json(preset.filter_rules) + filter_rules
        except PresetError as error:
            problem(["grouping", "preset"], str(error))
    try:
        filter_rules = rules_to_json(parse_rules(filter_rules))
    except FilterRuleError as error:
        problem(["grouping", "rules"], f"preset and rules together are invalid: {error}")

    group_by: dict[str, list[str]] = {}
    for index, step in enumerate(spec.steps):
        if step.group_by is not None:
            group_by[step.name] = list(step.group_by)
            continue
        try:
            group_by[step.name] = list(get_preset(session, step.group_by_preset or "").group_by)
        except PresetError as error:
            problem(["steps", index, "group_by", "preset"], str(error))
    if any(step.group_by_preset for step in spec.steps):
        for index, message in fan_in_problems(
            group_by, {s.name: s.depends_on for s in spec.steps}, order=[s.name for s in spec.steps]
        ):
            problem(["steps", index, "group_by"], f"{message} (after resolving presets)")

    versions: dict[tuple[str, str], ReductionSoftwareVersion | None] = {}
    for index, step in enumerate(spec.steps):
        key = (step.software.name, step.software.version)
        if key in versions:
            continue
        versions[key] = existing = _find_version(session, step.software)
        if existing is not None:
            conflict = _version_conflict(existing, step.software)
            if conflict:
                problem(["steps", index, "software"], conflict)

    pipeline = session.scalars(
        select(Pipeline).where(Pipeline.name == spec.name).options(selectinload(Pipeline.steps))
    ).one_or_none()
    removed: list[ReductionStep] = []
    if pipeline is not None:
        wanted = {step.name for step in spec.steps}
        for step_row in pipeline.steps:
            if step_row.name in wanted:
                continue
            attempts = session.scalar(
                select(func.count())
                .select_from(ExecutedReductionStep)
                .where(ExecutedReductionStep.reduction_step_id == step_row.id)
            )
            if attempts:
                problem(
                    ["steps"],
                    f"step {step_row.name!r} is missing from the file but has {attempts} recorded "
                    "attempt(s) in ops-db, whose provenance must stay: keep the step in the file; to stop "
                    f"the pipeline, set enabled: false (or run `ccat-dagster pipelines disable {spec.name}`)",
                )
            else:
                removed.append(step_row)

    grouping = session.scalars(select(DataGrouping).where(DataGrouping.name == spec.grouping.name)).one_or_none()
    if grouping is not None:
        module_id = module.id if module is not None else None
        if (grouping.filter_rules, grouping.instrument_module_id) != (filter_rules, module_id):
            others = session.scalars(
                select(Pipeline.name)
                .where(Pipeline.data_grouping_id == grouping.id, Pipeline.name != spec.name)
                .order_by(Pipeline.name)
            ).all()
            if others:
                problem(
                    ["grouping", "name"],
                    f"data grouping {grouping.name!r} is shared with pipeline(s) {', '.join(others)} and "
                    "holds other rules or another instrument_module: changing it here would change what "
                    "they process. Give this grouping a new name, or change the rules in every pipeline that "
                    "uses it",
                )

    if problems:
        raise PipelineApplyError(problems)
    assert location is not None  # a missing location is a problem above
    return _Plan(location, module, filter_rules, group_by, versions, pipeline, grouping, removed)


def _write(session: Session, spec: PipelineSpec, plan: _Plan) -> ApplyResult:
    changes: list[str] = []
    created = plan.pipeline is None

    grouping = plan.grouping
    module_id = plan.module.id if plan.module is not None else None
    if grouping is None:
        grouping = DataGrouping(
            name=spec.grouping.name,
            description=spec.grouping.description,
            filter_rules=plan.filter_rules,
            instrument_module_id=module_id,
        )
        session.add(grouping)
        changes.append(f"data grouping {spec.grouping.name!r} created")
    else:
        label = f"data grouping {grouping.name!r}"
        _set(grouping, "description", spec.grouping.description, label, changes)
        _set(grouping, "filter_rules", plan.filter_rules, label, changes)
        _set(grouping, "instrument_module_id", module_id, label, changes)

    pipeline = plan.pipeline
    if pipeline is None:
        pipeline = Pipeline(name=spec.name)
        session.add(pipeline)
        changes.append(f"pipeline {spec.name!r} created")
    label = f"pipeline {spec.name!r}"
    tracked = None if created else changes
    _set(pipeline, "description", spec.description, label, tracked)
    _set(pipeline, "data_grouping", grouping, label, tracked, show=lambda g: g.name if g else None)
    _set(
        pipeline,
        "processing_location",
        plan.location,
        label,
        tracked,
        show=lambda loc: loc.name if loc else None,
    )
    _set(pipeline, "trigger_type", spec.trigger.type, label, tracked)
    _set(pipeline, "trigger_config", spec.trigger.to_config(), label, tracked)
    _set(pipeline, "enabled", spec.enabled, label, tracked)
    _set(pipeline, "priority", spec.priority, label, tracked)

    software_rows: dict[str, ReductionSoftware] = {}
    version_rows = dict(plan.versions)
    existing_steps = {step.name: step for step in pipeline.steps} if not created else {}
    step_rows: dict[str, ReductionStep] = {}
    for position, step in enumerate(spec.steps):
        software = _software_row(session, step.software.name, software_rows, changes)
        key = (step.software.name, step.software.version)
        if version_rows.get(key) is None:
            version_rows[key] = ReductionSoftwareVersion(
                software=software,
                version=step.software.version,
                image_ref=step.software.image_ref,
                image_digest=step.software.image_digest,
                entrypoint=list(step.software.entrypoint),
            )
            session.add(version_rows[key])
            changes.append(f"software {key[0]} {key[1]} registered ({step.software.image_ref})")
        config = _config_row(session, spec.name, step)

        row = existing_steps.get(step.name)
        step_label = f"step {step.name!r}"
        step_changes: list[str] | None = changes
        if row is None:
            row = ReductionStep(name=step.name)
            pipeline.steps.append(row)
            if not created:
                changes.append(f"{step_label} added")
            step_changes = None
        _set(row, "description", step.description, step_label, step_changes)
        _set(row, "position", position, step_label, step_changes)
        _set(row, "group_by", plan.group_by[step.name], step_label, step_changes)
        _set(row, "cooldown_seconds", step.cooldown_seconds, step_label, step_changes)
        _set(row, "software", software, step_label, step_changes, show=lambda s: s.name if s else None)
        _set(row, "version_policy", step.software.version_policy, step_label, step_changes)
        _set(row, "version_spec", step.software.version, step_label, step_changes)
        _set(row, "config", config, step_label, step_changes, show=_show_config)
        _set(row, "resources", stored_resources(step), step_label, step_changes)
        _set(row, "max_retries", step.max_retries, step_label, step_changes)
        _set(row, "retention", StepRetention(step.retention), step_label, step_changes)
        _set(row, "qa_checks", thresholds_to_dict(step.qa_checks), step_label, step_changes)
        step_rows[step.name] = row

    for step in spec.steps:
        row = step_rows[step.name]
        wanted = [step_rows[name] for name in step.depends_on]
        if {s.name for s in row.depends_on} != set(step.depends_on):
            if row.id is not None and not created and step.name in existing_steps:
                old = sorted(s.name for s in row.depends_on)
                changes.append(f"step {step.name!r}: depends_on {old} → {sorted(step.depends_on)}")
            row.depends_on = wanted

    for row in plan.removed_steps:
        for other in pipeline.steps:
            if row in other.depends_on:
                other.depends_on.remove(row)
        pipeline.steps.remove(row)
        changes.append(f"step {row.name!r} removed")

    session.flush()
    digest = definition_sha256(export_pipeline(session, spec.name))
    if pipeline.spec_sha256 != digest:
        pipeline.spec_sha256 = digest
    session.flush()

    if created:
        outcome = ApplyOutcome.CREATED
    elif changes:
        outcome = ApplyOutcome.UPDATED
    else:
        outcome = ApplyOutcome.UNCHANGED
    return ApplyResult(outcome, pipeline.id, pipeline.name, tuple(changes))


def _set(row: Any, attribute: str, value: Any, label: str, changes: list[str] | None, *, show: Any = None) -> None:
    """Assign only when the value differs (so an unchanged apply writes nothing) and record the change."""
    old = getattr(row, attribute)
    if old == value:
        return
    setattr(row, attribute, value)
    if changes is not None:
        render = show or _short
        changes.append(f"{label}: {attribute} {render(old)} → {render(value)}")


def _short(value: Any, limit: int = 80) -> str:
    text = value.value if isinstance(value, enum.Enum) else repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _show_config(config: ReductionStepConfig | None) -> str:
    if config is None:
        return "None"
    return f"#{config.id} {_short(config.parameters, 60)}" if config.id else f"(new) {_short(config.parameters, 60)}"


def _find_location(session: Session, wanted: str | int, problem: Any) -> DataLocation | None:
    if isinstance(wanted, int):
        location = session.get(DataLocation, wanted)
    else:
        location = session.scalars(select(DataLocation).where(DataLocation.name == wanted)).one_or_none()
    processing = session.scalars(
        select(DataLocation).where(DataLocation.location_type == LocationType.PROCESSING).order_by(DataLocation.name)
    ).all()
    valid = ", ".join(f"{loc.name} (id {loc.id})" for loc in processing) or "none: create one in ops-db first"
    if location is None:
        problem(["processing_location"], f"{wanted!r} is not a DataLocation; processing locations: {valid}")
        return None
    if location.location_type is not LocationType.PROCESSING:
        problem(
            ["processing_location"],
            f"DataLocation {location.name!r} is a {location.location_type.value} location, not a processing "
            f"location; processing locations: {valid}",
        )
        return None
    return location


def _find_module(session: Session, wanted: str | None, problem: Any) -> InstrumentModule | None:
    if wanted is None:
        return None
    instrument_name, _, module_name = wanted.rpartition("/")
    query = select(InstrumentModule).join(Instrument).where(InstrumentModule.name == module_name)
    if instrument_name:
        query = query.where(Instrument.name == instrument_name)
    matches = session.scalars(query.options(selectinload(InstrumentModule.instrument))).all()
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        names = ", ".join(sorted(f"{m.instrument.name}/{m.name}" for m in matches))
        problem(["grouping", "instrument_module"], f"{wanted!r} is ambiguous: write one of {names}")
        return None
    every = session.scalars(select(InstrumentModule).options(selectinload(InstrumentModule.instrument))).all()
    valid = ", ".join(sorted(f"{m.instrument.name}/{m.name}" for m in every)) or "none"
    problem(["grouping", "instrument_module"], f"{wanted!r} is not an instrument module; modules: {valid}")
    return None


def _find_version(session: Session, software: SoftwareSpec) -> ReductionSoftwareVersion | None:
    return session.scalars(
        select(ReductionSoftwareVersion)
        .join(ReductionSoftware)
        .where(ReductionSoftware.name == software.name, ReductionSoftwareVersion.version == software.version)
    ).one_or_none()


def _version_conflict(existing: ReductionSoftwareVersion, software: SoftwareSpec) -> str | None:
    differences = []
    if existing.image_ref != software.image_ref:
        differences.append(f"image_ref {existing.image_ref!r} (file: {software.image_ref!r})")
    # A file without a digest accepts the stored one (it may have been recorded when the image was pulled).
    if software.image_digest is not None and existing.image_digest != software.image_digest:
        differences.append(f"image_digest {existing.image_digest!r} (file: {software.image_digest!r})")
    if list(existing.entrypoint) != list(software.entrypoint):
        differences.append(f"entrypoint {existing.entrypoint!r} (file: {list(software.entrypoint)!r})")
    if not differences:
        return None
    return (
        f"software {software.name} {software.version} is already registered with "
        f"{'; '.join(differences)}. Versions are immutable, because earlier runs recorded which version they "
        "used: give the new image a new version (e.g. bump the patch number) or use the registered values"
    )


def _software_row(
    session: Session, name: str, cache: dict[str, ReductionSoftware], changes: list[str]
) -> ReductionSoftware:
    if name not in cache:
        row = session.scalars(select(ReductionSoftware).where(ReductionSoftware.name == name)).one_or_none()
        if row is None:
            row = ReductionSoftware(name=name)
            session.add(row)
            changes.append(f"software {name!r} registered")
        cache[name] = row
    return cache[name]


def _config_row(session: Session, pipeline: str, step: StepSpec) -> ReductionStepConfig:
    """The immutable config row for these parameters: an earlier identical one is reused, else a new one."""
    name = config_name(pipeline, step.name)
    parameters = dict(step.config)
    digest = sha256_of(parameters)
    row = session.scalars(
        select(ReductionStepConfig).where(
            ReductionStepConfig.name == name, ReductionStepConfig.parameters_sha256 == digest
        )
    ).one_or_none()
    if row is None:
        row = ReductionStepConfig(name=name, parameters=parameters, parameters_sha256=digest)
        session.add(row)
        session.flush([row])
    return row


# ----------------------------------------------------------------------------------------- read, toggle


def get_pipeline(session: Session, name: str) -> Pipeline:
    """The stored pipeline ``name`` with its steps (ordered by position). Raises PipelineNotFoundError."""
    pipeline = session.scalars(
        select(Pipeline)
        .where(Pipeline.name == name)
        .options(
            selectinload(Pipeline.steps).selectinload(ReductionStep.depends_on),
            selectinload(Pipeline.steps).selectinload(ReductionStep.software),
            selectinload(Pipeline.steps).selectinload(ReductionStep.config),
        )
    ).one_or_none()
    if pipeline is None:
        known = session.scalars(select(Pipeline.name).order_by(Pipeline.name)).all()
        raise PipelineNotFoundError(
            f"no pipeline {name!r} in ops-db; stored pipelines: {', '.join(known) or 'none'} "
            "(apply a YAML file with `ccat-dagster pipelines apply FILE`)"
        )
    return pipeline


def software_version_of(session: Session, step: ReductionStep) -> ReductionSoftwareVersion | None:
    """The ReductionSoftwareVersion the step's file declared (software + version_spec), as registered."""
    return session.scalars(
        select(ReductionSoftwareVersion).where(
            ReductionSoftwareVersion.reduction_software_id == step.reduction_software_id,
            ReductionSoftwareVersion.version == step.version_spec,
        )
    ).one_or_none()


def export_pipeline(session: Session, name: str) -> dict[str, Any]:
    """The stored pipeline as pipeline-YAML data (presets resolved, image_ref absolute).

    Applying the result changes nothing; ``pipelines show`` prints it.
    """
    pipeline = get_pipeline(session, name)
    grouping = pipeline.data_grouping
    trigger: dict[str, Any] = {"type": pipeline.trigger_type.value, **pipeline.trigger_config}
    grouping_data: dict[str, Any] = {"name": grouping.name, "description": grouping.description}
    if grouping.instrument_module is not None:
        module = grouping.instrument_module
        grouping_data["instrument_module"] = f"{module.instrument.name}/{module.name}"
    grouping_data["rules"] = list(grouping.filter_rules)
    steps = []
    for step in pipeline.steps:
        version = software_version_of(session, step)
        software: dict[str, Any] = {
            "name": step.software.name,
            "version": step.version_spec,
            "version_policy": step.version_policy.value,
            "image_ref": version.image_ref if version else None,
            "image_digest": version.image_digest if version else None,
            "entrypoint": list(version.entrypoint) if version else [],
        }
        steps.append(
            {
                "name": step.name,
                "description": step.description,
                "depends_on": [upstream.name for upstream in step.depends_on],
                "software": software,
                "config": dict(step.config.parameters),
                "group_by": list(step.group_by),
                "cooldown_seconds": step.cooldown_seconds,
                "resources": {k: v for k, v in step.resources.items() if k != EXECUTION_MODE_KEY},
                "max_retries": step.max_retries,
                **({"retention": step.retention.value} if step.retention is not StepRetention.AUTO else {}),
                **(
                    {"execution": {"mode": step.resources[EXECUTION_MODE_KEY]}}
                    if step.resources.get(EXECUTION_MODE_KEY, "auto") != "auto"
                    else {}
                ),
                **({"qa_checks": dict(step.qa_checks)} if step.qa_checks else {}),
            }
        )
    return {
        "pipeline": pipeline.name,
        "description": pipeline.description,
        "processing_location": pipeline.processing_location.name,
        "trigger": trigger,
        "enabled": pipeline.enabled,
        "priority": pipeline.priority,
        "grouping": grouping_data,
        "steps": steps,
    }


def definition_sha256(exported: dict[str, Any]) -> str:
    """``Pipeline.spec_sha256``: the hash of the stored definition (``export_pipeline``) without ``enabled``.

    ``enabled`` is left out because ``pipelines disable`` flips it without changing what the pipeline does.
    """
    return sha256_of({key: value for key, value in exported.items() if key != "enabled"})


def list_pipelines(session: Session) -> list[PipelineSummary]:
    pipelines = session.scalars(
        select(Pipeline)
        .order_by(Pipeline.name)
        .options(
            selectinload(Pipeline.steps),
            selectinload(Pipeline.processing_location),
            selectinload(Pipeline.data_grouping),
        )
    ).all()
    return [
        PipelineSummary(
            id=p.id,
            name=p.name,
            description=p.description,
            enabled=p.enabled,
            trigger_type=p.trigger_type.value,
            trigger_config=dict(p.trigger_config),
            processing_location=p.processing_location.name,
            processing_location_id=p.processing_location_id,
            data_grouping=p.data_grouping.name,
            priority=p.priority,
            steps=tuple(step.name for step in p.steps),
            spec_sha256=p.spec_sha256,
            updated_at=p.updated_at,
        )
        for p in pipelines
    ]


def set_pipeline_enabled(session: Session, name: str, *, enabled: bool) -> bool:
    """Switch evaluation of pipeline ``name`` on or off; returns the previous value."""
    pipeline = get_pipeline(session, name)
    previous = pipeline.enabled
    if previous != enabled:
        pipeline.enabled = enabled
        session.flush()
    return previous


def disable_pipeline(session: Session, name: str) -> bool:
    """Stop sensors and schedules from evaluating ``name`` (until enabled, or a file says enabled: true)."""
    return set_pipeline_enabled(session, name, enabled=False)


def enable_pipeline(session: Session, name: str) -> bool:
    return set_pipeline_enabled(session, name, enabled=True)


def stored_resources(step: StepSpec) -> dict[str, Any]:
    """``ReductionStep.resources``: what the step asks for, and how it runs when that is not left to ``auto``.

    The execution mode rides in the resources JSON (read by ``execution.step.StepDefinition``), written only
    when set, so the stored definitions of steps without it stay as they were."""
    resources: dict[str, Any] = step.resources.to_dict()
    if step.execution_mode != "auto":
        resources[EXECUTION_MODE_KEY] = step.execution_mode
    return resources
