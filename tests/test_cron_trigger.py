"""A CRON pipeline on PostgreSQL: its trigger loads, evaluates all gaps at a cron tick and chains the steps."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json

import dagster as dg
import pytest
import yaml
from sqlalchemy.orm import Session

from ccat_dagster.definitions import build_definitions, read_pipelines
from ccat_dagster.demo.seed import archive_waiting_packages
from ccat_dagster.opsdb.engine import make_engine
from ccat_dagster.pipelines.apply import apply_pipeline_spec
from ccat_dagster.pipelines.spec import load_pipeline_spec
from ccat_dagster.sensors.gaps import build_pipeline_cron_sensor, cron_sensor_name, sensor_name

from .dagster_fixtures import (  # noqa: F401
    EXAMPLE,
    PIPELINE,
    demo_world,
    execute_request,
    request_step,
    require_bwrap_and_numpy,
)
from .test_dagster_pipeline import _expected_scan_keys, _requested_keys


def _make_cron(world, tmp_path, cron: str = "0 12 * * *") -> None:
    spec = yaml.safe_load(EXAMPLE.read_text())
    spec["trigger"] = {"type": "cron", "cron": cron}
    path = tmp_path / "cron.yaml"
    software = str(EXAMPLE.parent.parent / "software" / "chai")
    path.write_text(yaml.safe_dump(spec).replace("../software/chai", software))
    engine = make_engine(world.ops_db_url)
    with Session(engine) as session, session.begin():
        apply_pipeline_spec(session, load_pipeline_spec(path), source_path=path)
    engine.dispose()


def _tick(defs, instance, cursor):
    context = dg.build_sensor_context(instance=instance, cursor=cursor, definitions=defs)
    result = defs.get_sensor_def(cron_sensor_name(PIPELINE))(context)
    for request in result.dynamic_partitions_requests or []:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    return result


def _before_last_cron_tick(cursor: str) -> str:
    """The cursor as if the sensor had last evaluated two days ago: the next tick is a cron tick."""
    state = json.loads(cursor)
    state["fired"] = (dt.datetime.fromisoformat(state["fired"]) - dt.timedelta(days=2)).isoformat()
    return json.dumps(state)


def _run_all(defs, instance, result) -> list[str]:
    steps = []
    for request in result.run_requests:
        outcome = execute_request(defs, instance, request)
        assert outcome.success, request.asset_selection
        steps.append(request_step(request))
    return steps


def test_cron_pipeline_loads_as_a_cron_sensor(demo_world, tmp_path):
    _make_cron(demo_world, tmp_path)
    defs = build_definitions(demo_world.settings())
    keys = {"/".join(k.path) for k in defs.resolve_asset_graph().get_all_asset_keys()}
    assert f"{PIPELINE}/calibrate" in keys and f"{PIPELINE}/load_error" not in keys
    sensor = defs.get_sensor_def(cron_sensor_name(PIPELINE))
    assert "0 12 * * *" in sensor.description
    assert set(sensor.asset_selection.resolve(defs.resolve_asset_graph())) == {
        dg.AssetKey([PIPELINE, step]) for step in ("calibrate", "baseline", "grid_map")
    }
    with pytest.raises(dg.DagsterInvariantViolationError):
        defs.get_sensor_def(sensor_name(PIPELINE))


def test_cron_pipeline_waits_for_its_tick_then_runs_through_in_one_night(demo_world, tmp_path):
    require_bwrap_and_numpy()
    _make_cron(demo_world, tmp_path)
    defs = build_definitions(demo_world.settings())
    instance = demo_world.instance()

    # Turned on: like a Dagster schedule, no catch-up of earlier cron ticks.
    first = _tick(defs, instance, None)
    assert first.run_requests == [] and "first evaluation at" in first.skip_reason.skip_message
    assert _tick(defs, instance, first.cursor).run_requests == []

    # At the cron tick: a full gap evaluation; only the first step has gaps that can run.
    at_tick = _tick(defs, instance, _before_last_cron_tick(first.cursor))
    assert [request_step(r) for r in at_tick.run_requests] == ["calibrate"]
    assert at_tick.run_requests[0].tags["ccat/trigger"] == "schedule"
    expected = _expected_scan_keys(demo_world.ops_db_url)
    assert {k for r in at_tick.run_requests for k in _requested_keys(instance, r)} == expected
    assert _run_all(defs, instance, at_tick) == ["calibrate"]

    # Between cron ticks the dependent steps follow their finished upstream sub-groups.
    cursor, chain = at_tick.cursor, []
    for _ in range(5):
        result = _tick(defs, instance, cursor)
        cursor = result.cursor
        if not result.run_requests:
            break
        chain.extend(_run_all(defs, instance, result))
    assert chain == ["baseline", "grid_map"]

    # New raw data waits for the next cron tick.
    engine = make_engine(demo_world.ops_db_url)
    with Session(engine) as session, session.begin():
        archive_waiting_packages(session)
    engine.dispose()
    new_keys = _expected_scan_keys(demo_world.ops_db_url) - expected
    assert new_keys
    assert _tick(defs, instance, cursor).run_requests == []
    next_tick = _tick(defs, instance, _before_last_cron_tick(cursor))
    assert [request_step(r) for r in next_tick.run_requests] == ["calibrate"]
    assert {k for r in next_tick.run_requests for k in _requested_keys(instance, r)} == new_keys


def test_a_malformed_cron_expression_is_a_load_error(demo_world, tmp_path):
    _make_cron(demo_world, tmp_path)
    settings = demo_world.settings()
    snapshot = next(s for name, s in read_pipelines(settings)[1] if name == PIPELINE)
    broken = dataclasses.replace(snapshot, trigger_config={"cron": "61 * * * *"})
    with pytest.raises(ValueError, match="'61 \\* \\* \\* \\*' is not a valid cron expression"):
        build_pipeline_cron_sensor(broken, settings=settings)
