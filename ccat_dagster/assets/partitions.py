"""The partitions of a pipeline's step assets: its current sub-groups, for every trigger type.

A CONTINUOUS pipeline's sensor adds the partitions it plans. MANUAL and CRON pipelines are run by hand too
(the UI's Materialize, ``dagster asset materialize --select P/S --partition K``), which needs the partition to
exist before any run: ``sync_partitions`` adds every current sub-group (``ccat-dagster pipelines apply`` calls it
when a Dagster instance is configured), and the sensor ``<pipeline>__partitions`` adds the sub-groups that new
raw data creates, for MANUAL and CRON pipelines. Neither requests runs.
"""

from __future__ import annotations

import dagster as dg
from sqlalchemy.orm import Session

from ccat_dagster.assets.factory import partitions_name
from ccat_dagster.assets.snapshot import PipelineSnapshot
from ccat_dagster.execution.planning import Planner, load_pipeline
from ccat_dagster.execution.triggers import TickCursor, new_partition_keys
from ccat_dagster.opsdb import models as m
from ccat_dagster.opsdb.engine import session_scope, shared_engine
from ccat_dagster.settings import Settings


def sync_partitions(instance: dg.DagsterInstance, session: Session, pipeline_name: str) -> dict[str, list[str]]:
    """Add every current sub-group of every step of the pipeline as a partition; returns what was added, per
    partitions definition. Reads the whole grouping once per step (an apply, not a tick)."""
    pipeline = load_pipeline(session, pipeline_name)
    planner = Planner(session, pipeline, now=m.utcnow())
    wanted: dict[str, set[str]] = {}
    for step in pipeline.steps:
        name = partitions_name(pipeline.name, tuple(step.group_by or []))
        wanted.setdefault(name, set()).update(planner.sub_groups(step.name))
    return _add_missing(instance, wanted)


def add_missing_partitions(instance: dg.DagsterInstance, wanted: dict[str, set[str]]) -> dict[str, list[str]]:
    """Add the keys of ``wanted`` (partitions definition name → keys) the instance does not hold yet."""
    return _add_missing(instance, wanted)


def _add_missing(instance: dg.DagsterInstance, wanted: dict[str, set[str]]) -> dict[str, list[str]]:
    added: dict[str, list[str]] = {}
    for name, keys in wanted.items():
        existing = set(instance.get_dynamic_partitions(name))
        new = sorted(keys - existing)
        if new:
            instance.add_dynamic_partitions(name, new)
            added[name] = new
    return added


def partitions_sensor_name(pipeline: str) -> str:
    return f"{pipeline}__partitions"


def build_partitions_sensor(pipeline: PipelineSnapshot, *, settings: Settings) -> dg.SensorDefinition:
    """For a MANUAL or CRON pipeline: add the partitions of sub-groups that new raw data creates. Running by
    default (it only adds partitions); its cursor is the package change watermark of ``evaluate_tick``."""

    @dg.sensor(
        name=partitions_sensor_name(pipeline.name),
        description=(
            f"Adds the sub-groups that new raw data of grouping {pipeline.grouping_name!r} creates as partitions "
            f"of {pipeline.name!r}'s steps, so they can be materialized by hand; requests no runs."
        ),
        minimum_interval_seconds=settings.sensor_interval_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING,
    )
    def _sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        cursor = TickCursor.loads(context.cursor)
        with session_scope(shared_engine(settings.ops_db_url)) as session:
            keys, more = new_partition_keys(
                session,
                load_pipeline(session, pipeline.name),
                cursor,
                now=m.utcnow(),
                batch_limit=settings.sensor_batch_limit,
                overlap_seconds=settings.watermark_overlap_seconds,
            )
        wanted: dict[str, set[str]] = {}
        for step_name, step_keys in keys.items():
            name = partitions_name(pipeline.name, pipeline.step(step_name).group_by)
            wanted.setdefault(name, set()).update(step_keys)
        requests = []
        for name, step_keys in wanted.items():
            new = sorted(step_keys - set(context.instance.get_dynamic_partitions(name)))
            if new:
                requests.append(dg.AddDynamicPartitionsRequest(partitions_def_name=name, partition_keys=new))
        if not requests:
            return dg.SensorResult(
                cursor=cursor.dumps(), skip_reason="no new sub-groups" + ("; more changes pending" if more else "")
            )
        return dg.SensorResult(dynamic_partitions_requests=requests, cursor=cursor.dumps())

    return _sensor
