"""A standing pipeline's trigger over weeks, tick by tick against a real ops-db (PostgreSQL and SQLite).

calibrate (one sub-group per scan) → grid_map (one sub-group over all scans), the way ``opsdb_factories``
builds them; attempts complete through the real registration (products, copies, lineage, supersession).
"""

from __future__ import annotations

import uuid
from pathlib import Path

from sqlalchemy.orm import Session

from ccat_dagster.execution import planning
from ccat_dagster.execution.fingerprint import config_sha256
from ccat_dagster.execution.planning import GapReason, Readiness
from ccat_dagster.execution.registration import register_attempt_results
from ccat_dagster.execution.triggers import TickCursor, TickResult, evaluate_all, evaluate_tick
from ccat_dagster.opsdb import models as m
from ccat_dagster.opsdb.enums import PackageState, PhysicalCopyStatus, RunStatus

from .execution_factories import make_step_attempt, write_product
from .opsdb_factories import make_world


class Standing:
    """One world and the sensor's cursor, carried from tick to tick as the daemon would."""

    def __init__(self, engine, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
        self.engine = engine
        self.root = tmp_path
        self.cursor = TickCursor()
        with Session(engine) as session, session.begin():
            world = make_world(session)
            self.pipeline_id = world.pipeline.id
            self.steps = {"calibrate": world.step.id, "grid_map": world.final_step.id}
            self.location_id = world.processing.id
            self.world_ids = (world.software_version.id, world.config.id, world.package.executed_obs_unit.obs_unit_id)
            self.module_id = world.module.id

    def tick(self, **kwargs) -> TickResult:  # type: ignore[no-untyped-def]
        with Session(self.engine) as session, session.begin():
            pipeline = session.get(m.Pipeline, self.pipeline_id)
            result = evaluate_tick(session, pipeline, TickCursor.loads(self.cursor.dumps()), now=m.utcnow(), **kwargs)
        self.cursor = result.cursor
        return result

    def add_scan(self, name: str) -> None:
        with Session(self.engine) as session, session.begin():
            obs_unit = session.get(m.ObsUnit, self.world_ids[2])
            start = m.utcnow()
            eou = m.ExecutedObsUnit(id=uuid.uuid4(), obs_unit=obs_unit, start_time=start, end_time=start)
            session.add(
                m.RawDataPackage(
                    name=name,
                    executed_obs_unit=eou,
                    instrument_module_id=self.module_id,
                    size_bytes=10,
                    checksum=name.encode().hex().ljust(64, "0")[:64],
                    state=PackageState.ARCHIVED,
                )
            )

    def complete(self, plan: planning.SubGroupPlan, *, content: bytes = b"calibrated") -> int:
        """Run ``plan`` as the runner would: a new attempt with its inputs, one intermediate product, COMPLETED."""
        with Session(self.engine) as session, session.begin():
            world = _world(session, self)
            step = session.get(m.ReductionStep, plan.step_id)
            attempt = make_step_attempt(
                session,
                world,
                step=step,
                key=plan.sub_group_key,
                attempt=plan.attempts_so_far + 1,
                status=RunStatus.COLLECTING_RESULTS,
                fingerprint=plan.fingerprint or "",
            )
            attempt.software_version = session.get(m.ReductionSoftwareVersion, plan.software_version_id)
            attempt.config = session.get(m.ReductionStepConfig, plan.config_id)
            out = self.root / f"attempt-{attempt.id}"
            register_attempt_results(
                session,
                attempt=attempt,
                discovered=[write_product(out, f"{step.name}.dat", content, "intermediate")],
                processing_location_id=self.location_id,
                input_package_ids=list(plan.package_ids),
                input_product_ids=[p.product_id for p in plan.upstream_products],
            )
            return attempt.id

    def fail(self, plan: planning.SubGroupPlan) -> int:
        with Session(self.engine) as session, session.begin():
            world = _world(session, self)
            attempt = make_step_attempt(
                session,
                world,
                step=session.get(m.ReductionStep, plan.step_id),
                key=plan.sub_group_key,
                attempt=plan.attempts_so_far + 1,
                status=RunStatus.FAILED,
                fingerprint=plan.fingerprint or "",
            )
            attempt.input_packages = list(
                session.query(m.RawDataPackage).filter(m.RawDataPackage.id.in_(plan.package_ids))
            )
            return attempt.id


def _world(session: Session, standing: Standing):  # type: ignore[no-untyped-def]
    """The parts of ``opsdb_factories.World`` that ``make_step_attempt`` reads."""

    class _W:
        software_version = session.get(m.ReductionSoftwareVersion, standing.world_ids[0])
        config = session.get(m.ReductionStepConfig, standing.world_ids[1])
        step = None

    return _W()


def _requested(result: TickResult) -> list[tuple[str, list[str], bool]]:
    return [(r.step_name, r.sub_group_keys, r.rebuild) for r in result.requests]


def _run_to_up_to_date(standing: Standing) -> dict[str, planning.SubGroupPlan]:
    """Tick and complete what is requested until nothing is; the last plan of each (step, key)."""
    done: dict[str, planning.SubGroupPlan] = {}
    for _ in range(6):
        result = standing.tick()
        if not result.requests:
            return done
        for request in result.requests:
            for plan in request.plans:
                standing.complete(plan)
                done[f"{plan.step_name}/{plan.sub_group_key}"] = plan
    raise AssertionError("the pipeline did not settle")


def test_a_failed_attempt_is_planned_again_until_its_retries_are_used(engine, tmp_path):
    standing = Standing(engine, tmp_path)
    with Session(engine) as session, session.begin():
        session.get(m.ReductionStep, standing.steps["calibrate"]).max_retries = 1
    (first,) = standing.tick().requests
    (plan,) = first.plans
    standing.fail(plan)  # e.g. its run worker died: nothing else will ever touch this sub-group

    retry = standing.tick()
    assert _requested(retry) == [("calibrate", [plan.sub_group_key], False)]
    (again,) = retry.requests[0].plans
    assert again.fingerprint == plan.fingerprint and again.attempts_so_far == 1
    assert again.reason is GapReason.RETRY

    standing.fail(again)
    exhausted = standing.tick()
    assert exhausted.requests == [] and exhausted.skipped.get(Readiness.EXHAUSTED.value) == 1


def test_a_config_change_re_runs_the_step_and_the_fan_in_once_without_new_data(engine, tmp_path, monkeypatch):
    standing = Standing(engine, tmp_path)
    before = _run_to_up_to_date(standing)
    assert {key.split("/")[0] for key in before} == {"calibrate", "grid_map"}
    assert standing.tick().requests == []

    with Session(engine) as session, session.begin():
        step = session.get(m.ReductionStep, standing.steps["calibrate"])
        step.config = _sky_config()
    changed = standing.tick()
    assert changed.swept_steps == ("calibrate",)
    assert [(r.step_name, r.rebuild) for r in changed.requests] == [("calibrate", False)]
    assert {p.reason for p in changed.requests[0].plans} == {GapReason.CONFIG_CHANGED}

    # The change was evaluated once: the next tick reads no sub-group, whatever the archive holds.
    monkeypatch.setattr(planning, "resolve", _no_full_read)
    monkeypatch.setattr(planning, "resolve_touched", _no_full_read)
    quiet = standing.tick()
    assert quiet.requests == [] and quiet.swept_steps == ()
    monkeypatch.undo()

    for plan in changed.requests[0].plans:
        standing.complete(plan, content=b"calibrated with sky")
    follow = standing.tick()
    assert _requested(follow) == [("grid_map", ["all"], False)]
    assert follow.requests[0].plans[0].reason is GapReason.UPSTREAM_CHANGED


def test_a_newly_registered_compatible_version_re_runs_the_step(engine, tmp_path):
    standing = Standing(engine, tmp_path)
    _run_to_up_to_date(standing)
    with Session(engine) as session, session.begin():
        version = session.get(m.ReductionSoftwareVersion, standing.world_ids[0])
        session.add(
            m.ReductionSoftwareVersion(
                software=version.software,
                version="1.1.0",
                image_ref="docker://ccat/chai:1.1.0",
                image_digest="sha256:d",
            )
        )
    changed = standing.tick()
    # calibrate follows compatible 1.0.0 and now resolves 1.1.0; grid_map pins exact 1.0.0 and is not swept.
    assert changed.swept_steps == ("calibrate",)
    assert _requested(changed) == [("calibrate", [changed.requests[0].plans[0].sub_group_key], False)]
    assert changed.requests[0].plans[0].reason is GapReason.SOFTWARE_CHANGED


def test_a_sweep_walks_the_archive_in_pages(engine, tmp_path):
    standing = Standing(engine, tmp_path)
    for i in range(4):
        standing.add_scan(f"scan-{i}")
    _run_to_up_to_date(standing)
    with Session(engine) as session, session.begin():
        session.get(m.ReductionStep, standing.steps["calibrate"]).config = _sky_config()
    requested: list[str] = []
    for _ in range(6):
        result = standing.tick(batch_limit=2)
        requested += [k for r in result.requests if r.step_name == "calibrate" for k in r.sub_group_keys]
        if not standing.cursor.sweeps:
            break
    assert len(requested) == len(set(requested)) == 5  # every scan once, two packages per tick
    assert not standing.cursor.sweeps  # and the sweep ended, also when its last page touched nothing


def test_an_identical_upstream_re_run_leaves_the_fan_in_up_to_date(engine, tmp_path):
    standing = Standing(engine, tmp_path)
    done = _run_to_up_to_date(standing)
    calibrate = next(p for k, p in done.items() if k.startswith("calibrate/"))
    standing.complete(_forced(standing, calibrate.sub_group_key))  # the same bytes; old products superseded
    result = standing.tick()
    assert result.finished_attempts == 1 and result.requests == []
    assert result.skipped == {Readiness.UP_TO_DATE.value: 1}

    standing.complete(_forced(standing, calibrate.sub_group_key), content=b"other bytes")
    assert _requested(standing.tick()) == [("grid_map", ["all"], False)]


def test_deleted_intermediates_are_re_created_before_the_fan_in_runs_again(engine, tmp_path):
    standing = Standing(engine, tmp_path)
    done = _run_to_up_to_date(standing)
    old_key = next(p.sub_group_key for k, p in done.items() if k.startswith("calibrate/"))
    with Session(engine) as session, session.begin():  # what `retention run` with 0 days does to the copy
        for copy in session.query(m.PhysicalCopy).filter(m.PhysicalCopy.data_product_id.is_not(None)):
            if copy.data_product.reduction_step_id == standing.steps["calibrate"]:
                copy.status = PhysicalCopyStatus.DELETED
    standing.add_scan("scan-new")
    new = standing.tick()
    assert [r.step_name for r in new.requests] == ["calibrate"]
    standing.complete(new.requests[0].plans[0])

    rebuild = standing.tick()
    assert _requested(rebuild) == [("calibrate", [old_key], True)]
    assert rebuild.requests[0].plans[0].reason is GapReason.MISSING_INTERMEDIATE
    assert "grid_map" in standing.cursor.rebuild_waiting
    standing.complete(rebuild.requests[0].plans[0])

    fan_in = standing.tick()
    assert _requested(fan_in) == [("grid_map", ["all"], False)]
    standing.complete(fan_in.requests[0].plans[0])
    assert standing.tick().requests == [] and not standing.cursor.rebuild_waiting

    # The full evaluation (a CRON tick, `pipelines gaps`) agrees: nothing left.
    with Session(engine) as session:
        assert evaluate_all(session, session.get(m.Pipeline, standing.pipeline_id), now=m.utcnow()).requests == []


def test_a_manual_fan_in_run_after_retention_names_what_to_materialize_first(engine, tmp_path):
    standing = Standing(engine, tmp_path)
    standing.add_scan("scan-2")
    done = _run_to_up_to_date(standing)
    keys = sorted(p.sub_group_key for k, p in done.items() if k.startswith("calibrate/"))
    with Session(engine) as session, session.begin():  # what `retention run` with 0 days does to the copies
        for copy in session.query(m.PhysicalCopy).filter(m.PhysicalCopy.data_product_id.is_not(None)):
            if copy.data_product.reduction_step_id == standing.steps["calibrate"]:
                copy.status = PhysicalCopyStatus.DELETED

    with Session(engine) as session:  # what the step asset plans for `dagster asset materialize … grid_map`
        planner = planning.Planner(session, session.get(m.Pipeline, standing.pipeline_id), now=m.utcnow())
        (plan,) = planner.plan_keys("grid_map", ["all"], respect_cooldown=False, force=True)
        order = planner.recreation_order("grid_map")
    assert plan.readiness is Readiness.UPSTREAM_NOT_READY and plan.reason is GapReason.MISSING_INTERMEDIATE
    assert order == [("calibrate", keys)]
    hint = planning.recreation_hint("chai", order, shown=1)
    assert "\n" not in hint
    assert f"materialize first calibrate (2 sub-group(s): {keys[0]} and 1 more)" in hint
    assert f"--select chai/calibrate --partition {keys[0]}`" in hint and "metadata `recreate_first`" in hint


def _forced(standing: Standing, key: str) -> planning.SubGroupPlan:
    """A manual run's plan of one calibrate sub-group (up to date or not)."""
    with Session(standing.engine) as session:
        pipeline = session.get(m.Pipeline, standing.pipeline_id)
        (plan,) = planning.Planner(session, pipeline, now=m.utcnow()).plan_keys("calibrate", [key], force=True)
    return plan


def _sky_config() -> m.ReductionStepConfig:
    parameters = {"calibration_mode": "sky"}
    return m.ReductionStepConfig(name="calibrate", parameters=parameters, parameters_sha256=config_sha256(parameters))


def _no_full_read(*args, **kwargs):  # type: ignore[no-untyped-def]
    raise AssertionError("a tick without changes read the grouping")
