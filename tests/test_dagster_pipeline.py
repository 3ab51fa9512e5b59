"""The Dagster layer end to end on PostgreSQL: code location, sensor ticks, runs, the materialize CLI."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys

import dagster as dg
import yaml
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from ccat_dagster.definitions import build_definitions
from ccat_dagster.demo.run import run_sensor_until_idle
from ccat_dagster.demo.seed import archive_waiting_packages
from ccat_dagster.execution.triggers import TickCursor
from ccat_dagster.opsdb import models as m
from ccat_dagster.opsdb.engine import make_engine
from ccat_dagster.opsdb.enums import PackageState, RunStatus, TriggerType
from ccat_dagster.pipelines.apply import apply_pipeline_spec
from ccat_dagster.pipelines.spec import load_pipeline_spec
from ccat_dagster.sensors.gaps import sensor_name

from .dagster_fixtures import (  # noqa: F401
    EXAMPLE,
    PER_SCAN,
    PIPELINE,
    archived_example_scan_keys,
    demo_world,
    request_step,
    require_bwrap_and_numpy,
)


def _expected_scan_keys(url: str) -> set[str]:
    engine = make_engine(url)
    with Session(engine) as session:
        keys = archived_example_scan_keys(session)
    engine.dispose()
    return keys


def _tick(defs, instance, cursor=None):
    context = dg.build_sensor_context(instance=instance, cursor=cursor, definitions=defs)
    result = defs.get_sensor_def(sensor_name(PIPELINE))(context)
    for request in result.dynamic_partitions_requests or []:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    return result


def _requested_keys(instance, request) -> list[str]:
    if request.partition_key:
        return [request.partition_key]
    start, end = request.tags["dagster/asset_partition_range_start"], request.tags["dagster/asset_partition_range_end"]
    keys = instance.get_dynamic_partitions(PER_SCAN)
    return keys[keys.index(start) : keys.index(end) + 1]


def test_code_location_builds_the_pipeline_graph(demo_world):
    defs = build_definitions(demo_world.settings())
    graph = defs.resolve_asset_graph()
    keys = {"/".join(k.path) for k in graph.get_all_asset_keys()}
    assert {f"{PIPELINE}/raw_data", f"{PIPELINE}/calibrate", f"{PIPELINE}/baseline", f"{PIPELINE}/grid_map"} <= keys
    calibrate = graph.get(dg.AssetKey([PIPELINE, "calibrate"]))
    grid_map = graph.get(dg.AssetKey([PIPELINE, "grid_map"]))
    assert calibrate.partitions_def.name == PER_SCAN
    assert grid_map.partitions_def.name == f"{PIPELINE}__all"
    assert dg.AssetKey([PIPELINE, "raw_data"]) in calibrate.parent_keys
    assert dg.AssetKey([PIPELINE, "baseline"]) in grid_map.parent_keys
    assert "chai-calibration" in calibrate.code_version
    assert defs.get_sensor_def(sensor_name(PIPELINE)) is not None


def test_first_tick_requests_exactly_the_archived_scans(demo_world):
    defs = build_definitions(demo_world.settings())
    instance = demo_world.instance()
    result = _tick(defs, instance)
    expected = _expected_scan_keys(demo_world.ops_db_url)
    assert set(instance.get_dynamic_partitions(PER_SCAN)) == expected
    assert [request_step(r) for r in result.run_requests] == ["calibrate"]  # upstream of the rest
    request = result.run_requests[0]
    assert set(_requested_keys(instance, request)) == expected
    assert request.tags["ccat/trigger"] == "sensor" and request.run_key.startswith("calibrate:")

    # A repeated tick with the cursor requests nothing again.
    again = _tick(defs, instance, result.cursor)
    assert again.run_requests == []


def test_state_change_to_archived_after_insertion_is_picked_up(demo_world):
    defs = build_definitions(demo_world.settings())
    instance = demo_world.instance()
    first = _tick(defs, instance)
    before = set(instance.get_dynamic_partitions(PER_SCAN))
    engine = make_engine(demo_world.ops_db_url)
    with Session(engine) as session, session.begin():
        archive_waiting_packages(session)
    second = _tick(defs, instance, first.cursor)
    new_keys = _expected_scan_keys(demo_world.ops_db_url) - before
    assert new_keys, "the demo seed has NGC253 scans still in transfer"
    requested = {k for r in second.run_requests for k in _requested_keys(instance, r)}
    assert requested == new_keys

    # A row that commits late, with an updated_at older than the watermark, is caught by the overlap window.
    cursor = TickCursor.loads(second.cursor)
    with Session(engine) as session, session.begin():
        package = session.scalars(select(m.RawDataPackage).where(m.RawDataPackage.state == PackageState.FAILED)).first()
        package.state = PackageState.ARCHIVED
        session.flush()
        session.execute(
            update(m.RawDataPackage)
            .where(m.RawDataPackage.id == package.id)
            .values(updated_at=cursor.package_ts - dt.timedelta(seconds=10))
        )
        late_id = package.id
    engine.dispose()
    third = _tick(defs, instance, second.cursor)
    assert TickCursor.loads(third.cursor).package_window.get(late_id) is not None


def test_full_chain_through_sensor_and_runs_then_cooldown(demo_world):
    require_bwrap_and_numpy()
    defs = build_definitions(demo_world.settings())
    instance = demo_world.instance()
    log = run_sensor_until_idle(defs=defs, instance=instance, pipeline=PIPELINE, echo=lambda _m: None)
    assert [(step.split("/")[1], ok) for step, _label, ok in log.runs] == [
        ("calibrate", True),
        ("baseline", True),
        ("grid_map", True),
    ]
    expected = _expected_scan_keys(demo_world.ops_db_url)
    assert instance.get_materialized_partitions(dg.AssetKey([PIPELINE, "calibrate"])) == expected
    event = instance.get_latest_materialization_event(dg.AssetKey([PIPELINE, "grid_map"]))
    metadata = event.asset_materialization.metadata
    assert metadata["product_count"].value >= 5 and metadata["hpc_job_id"].value
    assert event.asset_materialization.tags["dagster/data_version"] == metadata["input_fingerprint"].value

    engine = make_engine(demo_world.ops_db_url)
    with Session(engine) as session:
        final = session.scalars(
            select(m.DataProduct).join(m.ReductionStep).where(m.ReductionStep.name == "grid_map")
        ).all()
        assert {p.product_type.value for p in final} >= {"science", "plot", "statistics", "qa_metric"}
        statuses = {a.status for a in session.scalars(select(m.ExecutedReductionStep))}
        assert statuses == {RunStatus.COMPLETED}
    with Session(engine) as session, session.begin():
        archive_waiting_packages(session)
    engine.dispose()
    # New scans: their calibrate and baseline run; grid_map waits for its one-day cooldown.
    cursor_log = run_sensor_until_idle(defs=defs, instance=instance, pipeline=PIPELINE, echo=lambda _m: None)
    steps = [step.split("/")[1] for step, _label, _ok in cursor_log.runs]
    assert steps == ["calibrate", "baseline"]


def test_dagster_asset_materialize_cli(demo_world):
    require_bwrap_and_numpy()
    defs = build_definitions(demo_world.settings())
    instance = demo_world.instance()
    _tick(defs, instance)
    key = sorted(instance.get_dynamic_partitions(PER_SCAN))[0]
    env = {**os.environ, **demo_world.env}
    completed = subprocess.run(
        [
            os.path.join(os.path.dirname(sys.executable), "dagster"),
            "asset",
            "materialize",
            "-m",
            "ccat_dagster.definitions",
            "--select",
            f"{PIPELINE}/calibrate",
            "--partition",
            key,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    engine = make_engine(demo_world.ops_db_url)
    with Session(engine) as session:
        attempt = session.scalars(
            select(m.ExecutedReductionStep).where(m.ExecutedReductionStep.sub_group_key == key)
        ).one()
        assert attempt.status is RunStatus.COMPLETED and attempt.dagster_run_id
        assert [t.to_status.value for t in attempt.transitions] == [
            "staging_data",
            "submitted",
            "running",
            "collecting_results",
            "completed",
        ] or [t.to_status.value for t in attempt.transitions] == [
            "staging_data",
            "submitted",
            "collecting_results",
            "completed",
        ]
    engine.dispose()


def test_a_broken_pipeline_does_not_take_the_location_down(demo_world, tmp_path):
    spec = yaml.safe_load(EXAMPLE.read_text())
    spec["pipeline"] = "chai_copy"
    spec["grouping"]["name"] = "chai-copy"
    copy = EXAMPLE.parent / "chai_copy.yaml"
    path = tmp_path / "chai_copy.yaml"
    path.write_text(yaml.safe_dump(spec).replace("../software/chai", str(EXAMPLE.parent.parent / "software" / "chai")))
    engine = make_engine(demo_world.ops_db_url)
    with Session(engine) as session, session.begin():
        apply_pipeline_spec(session, load_pipeline_spec(path), source_path=copy)
        broken = session.scalars(select(m.Pipeline).where(m.Pipeline.name == "chai_copy")).one()
        broken.trigger_type = TriggerType.CRON
        broken.trigger_config = {}
    engine.dispose()
    defs = build_definitions(demo_world.settings())
    keys = {"/".join(k.path) for k in defs.resolve_asset_graph().get_all_asset_keys()}
    assert f"{PIPELINE}/grid_map" in keys
    assert "chai_copy/load_error" in keys and "chai_copy/calibrate" not in keys
    spec_of_error = defs.resolve_assets_def(dg.AssetKey(["chai_copy", "load_error"])).specs
    assert "no 'cron' expression" in json.dumps([s.description for s in spec_of_error])
