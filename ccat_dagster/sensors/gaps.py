"""Triggers: a sensor per CONTINUOUS pipeline and a cron-driven sensor per CRON pipeline, as thin
Dagster wrappers around ``ccat_dagster.execution.triggers``."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Sequence

import dagster as dg
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG
from dagster._utils.schedules import get_latest_completed_cron_tick, get_next_cron_tick, is_valid_cron_string

from ccat_dagster.assets.factory import (
    BACKEND_TAG,
    PIPELINE_TAG,
    REBUILD_TAG,
    STEP_TAG,
    TRIGGER_TAG,
    partitions_name,
    step_asset_key,
    step_asset_keys,
)
from ccat_dagster.assets.snapshot import PipelineSnapshot
from ccat_dagster.execution.planning import load_pipeline
from ccat_dagster.execution.triggers import StepRequest, TickCursor, TickResult, evaluate_all, evaluate_tick
from ccat_dagster.opsdb.engine import session_scope, shared_engine
from ccat_dagster.opsdb.models import utcnow
from ccat_dagster.settings import Settings


def sensor_name(pipeline: str) -> str:
    return f"{pipeline}__new_data"


def build_pipeline_sensor(pipeline: PipelineSnapshot, *, settings: Settings) -> dg.SensorDefinition:
    @dg.sensor(
        name=sensor_name(pipeline.name),
        description=(
            f"Watches ops-db for raw data of grouping {pipeline.grouping_name!r} that became archived or changed, "
            "and for finished upstream attempts; requests runs for the sub-groups with a gap."
        ),
        minimum_interval_seconds=settings.sensor_interval_seconds,
        asset_selection=step_asset_keys(pipeline),
        default_status=dg.DefaultSensorStatus.STOPPED,
    )
    def _sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        engine = shared_engine(settings.ops_db_url)
        cursor = TickCursor.loads(context.cursor)
        with session_scope(engine) as session:
            result = evaluate_tick(
                session,
                load_pipeline(session, pipeline.name),
                cursor,
                now=utcnow(),
                batch_limit=settings.sensor_batch_limit,
                overlap_seconds=settings.watermark_overlap_seconds,
            )
        context.log.info(_summary(result))
        return _sensor_result(pipeline, result, settings=settings, trigger="sensor", instance=context.instance)

    return _sensor


def cron_sensor_name(pipeline: str) -> str:
    return f"{pipeline}__cron"


def build_pipeline_cron_sensor(pipeline: PipelineSnapshot, *, settings: Settings) -> dg.SensorDefinition:
    """The trigger of a CRON pipeline: a full gap evaluation at every cron tick, follow-ups in between.

    A Dagster schedule launches one target with one partitions definition, and a pipeline's steps have their
    own partitions each, so the cron trigger is a sensor that keeps the cron itself: at each cron tick it
    evaluates every step and sub-group (``evaluate_all``); between ticks it only starts dependent steps whose
    upstream attempts finished, so a nightly pipeline runs through in one night. Like a Dagster schedule it does
    not catch up on cron ticks from before it was turned on.
    """
    cron = pipeline.trigger_config.get("cron") or pipeline.trigger_config.get("cron_schedule")
    if not cron:
        raise ValueError(f"pipeline {pipeline.name!r} is CRON but its trigger_config has no 'cron' expression")
    if not is_valid_cron_string(cron):
        raise ValueError(f"pipeline {pipeline.name!r}: {cron!r} is not a valid cron expression")
    timezone = pipeline.trigger_config.get("timezone", "UTC")

    @dg.sensor(
        name=cron_sensor_name(pipeline.name),
        description=(
            f"Evaluates every step and sub-group of {pipeline.name!r} for gaps on {cron!r} ({timezone}), and "
            "starts dependent steps as soon as their upstream sub-groups complete."
        ),
        minimum_interval_seconds=settings.sensor_interval_seconds,
        asset_selection=step_asset_keys(pipeline),
        default_status=dg.DefaultSensorStatus.STOPPED,
    )
    def _sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        state = json.loads(context.cursor) if context.cursor else {}
        tick = TickCursor.loads(state.get("tick"))
        now = utcnow()
        latest = get_latest_completed_cron_tick(cron, now, timezone)
        fired = dt.datetime.fromisoformat(state["fired"]) if state.get("fired") else None
        if fired is None:
            tick.attempt_ts = now
            cursor = json.dumps({"fired": latest.isoformat(), "tick": tick.dumps()})
            upcoming = get_next_cron_tick(cron, now, timezone)
            return dg.SensorResult(cursor=cursor, skip_reason=f"turned on; first evaluation at {upcoming.isoformat()}")
        engine = shared_engine(settings.ops_db_url)
        with session_scope(engine) as session:
            pipeline_row = load_pipeline(session, pipeline.name)
            if latest > fired:
                result = evaluate_all(session, pipeline_row, now=now)
                result.cursor = tick
                fired = latest
            else:
                result = evaluate_tick(
                    session,
                    pipeline_row,
                    tick,
                    now=now,
                    batch_limit=settings.sensor_batch_limit,
                    overlap_seconds=settings.watermark_overlap_seconds,
                    read_packages=False,
                )
        context.log.info(_summary(result))
        return _sensor_result(
            pipeline,
            result,
            settings=settings,
            trigger="schedule",
            instance=context.instance,
            cursor=json.dumps({"fired": fired.isoformat(), "tick": result.cursor.dumps()}),
        )

    return _sensor


def _sensor_result(
    pipeline: PipelineSnapshot,
    result: TickResult,
    *,
    settings: Settings,
    trigger: str,
    instance: dg.DagsterInstance,
    cursor: str | None = None,
) -> dg.SensorResult:
    """Partition add requests (one per partitions definition) and the runs, cut into contiguous ranges."""
    additions: dict[str, list[str]] = {}
    order: dict[str, dict[str, int]] = {}
    for step_name in sorted({*result.partitions, *(r.step_name for r in result.requests)}):
        name = partitions_name(pipeline.name, pipeline.step(step_name).group_by)
        if name not in order:
            order[name] = {key: i for i, key in enumerate(instance.get_dynamic_partitions(name))}
            additions[name] = []
        known = order[name]
        for key in sorted(result.partitions.get(step_name, [])):
            if key not in known:
                known[key] = len(known)
                additions[name].append(key)
    run_requests = []
    for step_request in result.requests:
        name = partitions_name(pipeline.name, pipeline.step(step_request.step_name).group_by)
        run_requests.extend(
            step_run_requests(pipeline, step_request, positions=order[name], settings=settings, trigger=trigger)
        )
    return dg.SensorResult(
        run_requests=run_requests,
        dynamic_partitions_requests=[
            dg.AddDynamicPartitionsRequest(partitions_def_name=name, partition_keys=keys)
            for name, keys in additions.items()
            if keys
        ],
        cursor=cursor if cursor is not None else result.cursor.dumps(),
        skip_reason=None if run_requests else f"no gaps ({_summary(result)})",
    )


def step_run_requests(
    pipeline: PipelineSnapshot,
    request: StepRequest,
    *,
    positions: dict[str, int],
    settings: Settings,
    trigger: str,
) -> list[dg.RunRequest]:
    """The runs a trigger launches for ``request`` (``trigger``: sensor, schedule, manual, api), the same
    batching, tags and run keys for every way a run is started: one run per contiguous range of at most
    MAX_PARTITIONS_PER_RUN sub-groups with a gap.

    Dagster's run overhead is per run, so sub-groups are batched; a run targets a partition *range* (what the
    UI shows and what backfills use), so a range only ever spans sub-groups that all have a gap.
    """
    plans = sorted(request.plans, key=lambda p: positions[p.sub_group_key])
    chunks: list[list] = []
    for plan in plans:
        current = chunks[-1] if chunks else None
        if (
            current is not None
            and len(current) < settings.max_partitions_per_run
            and positions[plan.sub_group_key] == positions[current[-1].sub_group_key] + 1
        ):
            current.append(plan)
        else:
            chunks.append([plan])
    selection = [step_asset_key(pipeline.name, request.step_name)]
    base_tags = {
        TRIGGER_TAG: trigger,
        PIPELINE_TAG: pipeline.name,
        STEP_TAG: request.step_name,
        BACKEND_TAG: settings.hpc_backend,
        "dagster/priority": str(pipeline.priority),
    }
    if request.rebuild:
        # The runs redo up-to-date sub-groups whose deleted intermediates a consumer needs (run_step forces them).
        base_tags[REBUILD_TAG] = "missing_intermediate"
    runs = []
    for chunk in chunks:
        # The attempt count is part of the key: a retry after a failed attempt, or a re-creation of deleted
        # intermediates, has the same fingerprint as the run before it but is new work, not a duplicate.
        digest = _batch_digest([(p.sub_group_key, f"{p.fingerprint}#{p.attempts_so_far}") for p in chunk])
        run_key = f"{request.step_name}{'+rebuild' if request.rebuild else ''}:{digest}"
        if len(chunk) == 1:
            runs.append(
                dg.RunRequest(
                    run_key=run_key, asset_selection=selection, partition_key=chunk[0].sub_group_key, tags=base_tags
                )
            )
            continue
        runs.append(
            dg.RunRequest(
                run_key=run_key,
                asset_selection=selection,
                tags={
                    **base_tags,
                    ASSET_PARTITION_RANGE_START_TAG: chunk[0].sub_group_key,
                    ASSET_PARTITION_RANGE_END_TAG: chunk[-1].sub_group_key,
                    "ccat/sub_groups": str(len(chunk)),
                },
            )
        )
    return runs


def _batch_digest(items: Sequence[tuple[str, str | None]]) -> str:
    digest = hashlib.sha256()
    for key, fingerprint in sorted(items):
        digest.update(f"{key}\0{fingerprint}\n".encode())
    first = items[0][0] if len(items) == 1 else f"{len(items)}"
    return f"{first}:{digest.hexdigest()[:32]}"


def _summary(result: TickResult) -> str:
    runs = (
        ", ".join(
            f"{r.step_name}: {len(r.plans)}" + (" (re-creating deleted intermediates)" if r.rebuild else "")
            for r in result.requests
        )
        or "none"
    )
    skipped = ", ".join(f"{k} {v}" for k, v in sorted(result.skipped.items())) or "none"
    return (
        f"{result.changed_packages} changed package(s), {result.finished_attempts} finished attempt(s); "
        f"sub-groups requested: {runs}; not requested: {skipped}"
        + (f"; definition changed, sweeping: {', '.join(result.swept_steps)}" if result.swept_steps else "")
        + ("; more changes pending for the next tick" if result.more_pending else "")
    )
