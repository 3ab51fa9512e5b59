"""Migration 0006 rewrites every attempt's input fingerprint from its recorded inputs: after the upgrade a
sub-group that was up to date is still up to date. PostgreSQL and SQLite."""

from __future__ import annotations

import hashlib
import json

from alembic import command
from sqlalchemy.orm import Session

from ccat_dagster.execution.planning import Planner, Readiness
from ccat_dagster.execution.registration import record_input_lineage
from ccat_dagster.opsdb import models as m
from ccat_dagster.opsdb.engine import make_engine
from ccat_dagster.opsdb.enums import RunStatus
from ccat_dagster.opsdb.migrate import alembic_config, upgrade

from .execution_factories import make_step_attempt
from .opsdb_factories import make_world


def _v1(package: m.RawDataPackage, version: m.ReductionSoftwareVersion, config_sha: str) -> str:
    """The id-based fingerprint of version 1, written out by hand."""
    payload = {
        "v": "ccat-fp-1",
        "packages": [[package.id, package.checksum]],
        "products": [],
        "software": f"{version.software.name}=={version.version}",
        "image_digest": version.image_digest or "",
        "config": config_sha,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _state(url: str, attempt_id: int) -> tuple[str, Readiness]:
    engine = make_engine(url)
    with Session(engine) as session:
        attempt = session.get(m.ExecutedReductionStep, attempt_id)
        planner = Planner(session, attempt.step.pipeline, now=m.utcnow())
        (plan,) = planner.plan_keys("calibrate", [attempt.sub_group_key])
        fingerprint = attempt.input_fingerprint
    engine.dispose()
    return fingerprint, plan.readiness


def test_fingerprints_are_rewritten_both_ways_and_up_to_date_stays_up_to_date(db_url):
    engine = make_engine(db_url)
    with Session(engine) as session, session.begin():
        world = make_world(session)
        (plan,) = Planner(session, world.pipeline, now=m.utcnow()).plan(
            "calibrate", Planner(session, world.pipeline, now=m.utcnow()).sub_groups("calibrate").values()
        )
        attempt = make_step_attempt(
            session, world, key=plan.sub_group_key, status=RunStatus.COMPLETED, fingerprint=plan.fingerprint or ""
        )
        record_input_lineage(session, attempt=attempt, package_ids=list(plan.package_ids), product_ids=[])
        attempt_id = attempt.id
        v1 = _v1(world.package, world.software_version, world.config.parameters_sha256)
    engine.dispose()
    assert _state(db_url, attempt_id) == (plan.fingerprint, Readiness.UP_TO_DATE)

    command.downgrade(alembic_config(db_url), "0002")
    engine = make_engine(db_url)
    with engine.connect() as connection:
        (stored,) = connection.exec_driver_sql(
            f"SELECT input_fingerprint FROM executed_reduction_step WHERE id = {attempt_id}"
        ).one()
    engine.dispose()
    assert stored == v1 != plan.fingerprint

    upgrade(db_url)
    assert _state(db_url, attempt_id) == (plan.fingerprint, Readiness.UP_TO_DATE)
