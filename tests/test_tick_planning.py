"""What a sensor tick reads: a sub-group deferred by its cooldown is found again through one remembered
member, and a fan-in sub-group whose upstream sub-groups just got new data is settled as waiting without
reading its members. Both decide exactly what a full evaluation decides. PostgreSQL and SQLite."""

from __future__ import annotations

import datetime as dt

from sqlalchemy.orm import Session

from ccat_dagster.execution import planning
from ccat_dagster.execution.planning import Planner, Readiness
from ccat_dagster.execution.triggers import TickCursor, evaluate_all, evaluate_tick
from ccat_dagster.opsdb import models as m
from ccat_dagster.opsdb.enums import RunStatus

from .opsdb_factories import make_attempt, make_world


def test_a_deferred_sub_group_is_found_again_through_its_remembered_member(engine, monkeypatch):
    now = dt.datetime.now(dt.UTC)
    with Session(engine) as session, session.begin():
        world = make_world(session)
        world.step.cooldown_seconds = 3600
        key = next(iter(Planner(session, world.pipeline, now=now).sub_groups("calibrate")))
        # Completed with other inputs just now: the changed package waits for the cooldown.
        make_attempt(session, world, key=key, status=RunStatus.COMPLETED)
        pipeline_id, package_id = world.pipeline.id, world.package.id

    with Session(engine) as session, session.begin():
        first = evaluate_tick(session, session.get(m.Pipeline, pipeline_id), TickCursor(), now=now)
    assert first.requests == [] and first.skipped.get("cooldown") == 1
    cursor = TickCursor.loads(first.cursor.dumps())
    assert set(cursor.deferred["calibrate"]) == {key}
    assert cursor.deferred_members["calibrate"][key] == package_id

    def no_full_read(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("the deferred sub-group was looked up by reading the whole grouping")

    monkeypatch.setattr(planning, "resolve", no_full_read)
    with Session(engine) as session, session.begin():
        later = evaluate_tick(session, session.get(m.Pipeline, pipeline_id), cursor, now=now + dt.timedelta(hours=2))
    assert [(r.step_name, r.sub_group_keys) for r in later.requests] == [("calibrate", [key])]
    assert "calibrate" not in later.cursor.deferred and "calibrate" not in later.cursor.deferred_members


def test_a_fan_in_waiting_for_new_upstream_work_is_not_read_in_full(engine, monkeypatch):
    now = dt.datetime.now(dt.UTC)
    with Session(engine) as session, session.begin():
        pipeline_id = make_world(session).pipeline.id  # calibrate per scan → grid_map over all scans

    read_in_full: list[str] = []
    sub_groups = Planner.sub_groups

    def recording(self, step_name, **kwargs):  # type: ignore[no-untyped-def]
        read_in_full.append(step_name)
        return sub_groups(self, step_name, **kwargs)

    monkeypatch.setattr(Planner, "sub_groups", recording)
    with Session(engine) as session, session.begin():
        tick = evaluate_tick(session, session.get(m.Pipeline, pipeline_id), TickCursor(), now=now)
    assert "grid_map" not in read_in_full
    assert tick.partitions == {"calibrate": tick.requests[0].sub_group_keys, "grid_map": ["all"]}
    assert [r.step_name for r in tick.requests] == ["calibrate"]
    assert tick.skipped == {Readiness.UPSTREAM_NOT_READY.value: 1}

    # The full evaluation (a CRON tick) plans every sub-group and decides the same.
    with Session(engine) as session, session.begin():
        full = evaluate_all(session, session.get(m.Pipeline, pipeline_id), now=now)
    assert [(r.step_name, r.sub_group_keys) for r in full.requests] == [
        (r.step_name, r.sub_group_keys) for r in tick.requests
    ]
    assert full.skipped == tick.skipped
