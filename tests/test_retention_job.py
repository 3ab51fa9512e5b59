"""The retention cleanup as a Dagster job with a daily schedule and as ``ccat-dagster retention
run``: marks superseded / long-consumed intermediates, deletes only deletion_possible intermediates inside the
allowed roots, never final products, records failures, and a dry run changes nothing (ops-db or disk)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
from sqlalchemy import select
from sqlalchemy.orm import Session

from ccat_dagster.assets.retention import (
    RETENTION_JOB,
    RETENTION_OP,
    RETENTION_SCHEDULE,
    build_retention_definitions,
)
from ccat_dagster.cli import main
from ccat_dagster.opsdb import models as m
from ccat_dagster.opsdb.engine import session_scope
from ccat_dagster.opsdb.enums import DataProductType, PhysicalCopyStatus, RunStatus, StepRetention
from ccat_dagster.provenance.cleanup import run_retention_cleanup
from ccat_dagster.settings import Settings

from .dagster_fixtures import demo_world  # noqa: F401
from .execution_factories import add_product, make_staging_world, make_step_attempt

P = PhysicalCopyStatus
NOW = dt.datetime.now(dt.UTC)


@dataclass
class Retention:
    settings: Settings
    env: dict[str, str]
    copies: dict[str, int]
    paths: dict[str, Path]


def _world(db_url: str, engine, tmp_path: Path) -> Retention:
    """Intermediates in every retention situation, under PIPELINE_BASE_DIR = tmp_path/pipelines."""
    base = tmp_path / "pipelines"
    copies: dict[str, int] = {}
    paths: dict[str, Path] = {}
    with session_scope(engine) as session:
        world = make_staging_world(session, tmp_path, n_packages=0).world
        # A step whose consumed intermediates may go (the fan-in reading them would keep them under auto).
        world.step.retention = StepRetention.RECREATE
        upstream = make_step_attempt(
            session, world, key="scan-1", status=RunStatus.COMPLETED, at=NOW - dt.timedelta(days=20)
        )

        def product(name, product_type=DataProductType.INTERMEDIATE, status=P.PRESENT, path=None):
            target = path or base / "chai" / "scan-1" / "workspace" / name
            row, copy = add_product(
                session, upstream, world.processing, path=target, relative_path=name,
                product_type=product_type, copy_status=status,
            )  # fmt: skip
            copies[name], paths[name] = copy.id, target
            return row

        superseded = product("superseded.f32")
        replacement = product("replacement.f32")
        superseded.superseded_by_id = replacement.id
        consumed_long_ago = product("consumed_long_ago.f32")
        consumed_recently = product("consumed_recently.f32")
        product("science/map.fits", DataProductType.SCIENCE, status=P.DELETION_POSSIBLE)
        product("outside.f32", status=P.DELETION_POSSIBLE, path=tmp_path / "elsewhere" / "outside.f32")
        # A copy whose path is a directory cannot be deleted as a product file: deletion_failed.
        directory = base / "chai" / "scan-1" / "workspace" / "a_directory"
        product("a_directory", status=P.DELETION_POSSIBLE, path=directory / "placeholder")
        session.flush()
        session.execute(
            m.PhysicalCopy.__table__.update()
            .where(m.PhysicalCopy.id == copies["a_directory"])
            .values(path=str(directory))
        )
        paths["a_directory"] = directory
        old = make_step_attempt(
            session, world, step=world.final_step, key="all", status=RunStatus.COMPLETED,
            at=NOW - dt.timedelta(days=10),
        )  # fmt: skip
        old.input_products.extend([consumed_long_ago, replacement])
        recent = make_step_attempt(
            session, world, step=world.final_step, key="night", status=RunStatus.COMPLETED,
            at=NOW - dt.timedelta(hours=2),
        )  # fmt: skip
        recent.input_products.append(consumed_recently)
        session.flush()
    env = {
        "CCAT_OPS_DB_URL": db_url,
        "CCAT_DAGSTER_DATA_DIR": str(tmp_path / "data"),
        "CCAT_WORKFLOW_MANAGER_PIPELINE_BASE_DIR": str(base),
        "CCAT_WORKFLOW_MANAGER_RETENTION_DAYS": "5",
    }
    return Retention(Settings.from_env(env), env, copies, paths)


def _statuses(engine, copies: dict[str, int]) -> dict[str, PhysicalCopyStatus]:
    with Session(engine) as session:
        rows = dict(session.execute(select(m.PhysicalCopy.id, m.PhysicalCopy.status)).tuples().all())
    return {name: rows[copy_id] for name, copy_id in copies.items()}


BEFORE = {
    "superseded.f32": P.PRESENT,
    "replacement.f32": P.PRESENT,
    "consumed_long_ago.f32": P.PRESENT,
    "consumed_recently.f32": P.PRESENT,
    "science/map.fits": P.DELETION_POSSIBLE,
    "outside.f32": P.DELETION_POSSIBLE,
    "a_directory": P.DELETION_POSSIBLE,
}


def _logs(instance: dg.DagsterInstance, run_id: str) -> str:
    return "\n".join(entry.user_message for entry in instance.all_logs(run_id))


def test_job_dry_run_lists_everything_and_changes_nothing(db_url, engine, tmp_path):
    world = _world(db_url, engine, tmp_path)
    jobs, _schedules = build_retention_definitions(world.settings)
    instance = dg.DagsterInstance.ephemeral()
    result = jobs[0].execute_in_process(
        run_config={"ops": {RETENTION_OP: {"config": {"dry_run": True}}}}, instance=instance
    )
    assert result.success
    assert _statuses(engine, world.copies) == BEFORE
    assert all(path.exists() for path in world.paths.values())
    logs = _logs(instance, result.run_id)
    for name in ("superseded.f32", "replacement.f32", "consumed_long_ago.f32"):
        assert f"would mark copy {world.copies[name]} deletion_possible: {world.paths[name]}" in logs
        assert f"copy {world.copies[name]}: would_delete {world.paths[name]}" in logs
    assert f"copy {world.copies['outside.f32']}: failed" in logs and "outside the allowed roots" in logs
    assert "consumed_recently" not in logs and "map.fits" not in logs
    output = next(e for e in result.all_events if e.event_type_value == "STEP_OUTPUT")
    metadata = output.event_specific_data.metadata
    assert metadata["marked"].value == 3 and metadata["would_delete"].value == 3 and metadata["failed"].value == 2


def test_job_deletes_intermediates_only_and_records_failures(db_url, engine, tmp_path):
    world = _world(db_url, engine, tmp_path)
    jobs, _schedules = build_retention_definitions(world.settings)
    instance = dg.DagsterInstance.ephemeral()
    result = jobs[0].execute_in_process(instance=instance, raise_on_error=False)
    # A file that could not be deleted fails the run, after everything else was done.
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert "2 file(s) could not be deleted" in failure.event_specific_data.error.message
    statuses = _statuses(engine, world.copies)
    assert statuses == {
        "superseded.f32": P.DELETED,
        "replacement.f32": P.DELETED,
        "consumed_long_ago.f32": P.DELETED,
        "consumed_recently.f32": P.PRESENT,
        "science/map.fits": P.DELETION_POSSIBLE,  # final products: never deleted by the cleanup
        "outside.f32": P.DELETION_FAILED,
        "a_directory": P.DELETION_FAILED,
    }
    assert not world.paths["superseded.f32"].exists() and not world.paths["consumed_long_ago.f32"].exists()
    assert world.paths["consumed_recently.f32"].exists() and world.paths["science/map.fits"].exists()
    assert world.paths["outside.f32"].exists()
    logs = _logs(instance, result.run_id)
    assert f"copy {world.copies['superseded.f32']}: deleted {world.paths['superseded.f32']}" in logs
    assert f"copy {world.copies['a_directory']}: failed {world.paths['a_directory']}" in logs
    with Session(engine) as session:
        reason = session.get(m.PhysicalCopy, world.copies["a_directory"]).status_reason
    assert "is a directory" in reason


def test_retention_days_override_and_schedule(db_url, engine, tmp_path):
    world = _world(db_url, engine, tmp_path)
    jobs, schedules = build_retention_definitions(world.settings)
    instance = dg.DagsterInstance.ephemeral()
    result = jobs[0].execute_in_process(
        run_config={"ops": {RETENTION_OP: {"config": {"dry_run": True, "retention_days": 0}}}},
        instance=instance,
    )
    assert result.success
    assert f"would mark copy {world.copies['consumed_recently.f32']} " in _logs(instance, result.run_id)

    schedule = schedules[0]
    assert schedule.name == RETENTION_SCHEDULE and schedule.job_name == RETENTION_JOB
    assert schedule.cron_schedule == "0 4 * * *"
    assert schedule.default_status is dg.DefaultScheduleStatus.STOPPED


def test_cleanup_dry_run_rolls_back_its_marks(db_url, engine, tmp_path):
    """The marks of a dry run live in a transaction that is rolled back (on SQLite too, where savepoints
    would commit)."""
    world = _world(db_url, engine, tmp_path)
    report = run_retention_cleanup(
        engine,
        pipeline_base_dir=world.settings.pipeline_base_dir,
        processing_location_id=None,
        retention_days=0,
        dry_run=True,
    )
    assert len(report.marked) == 4 and report.dry_run
    assert _statuses(engine, world.copies) == BEFORE


def test_cli(db_url, engine, tmp_path, monkeypatch, capsys):
    world = _world(db_url, engine, tmp_path)
    for name, value in world.env.items():
        monkeypatch.setenv(name, value)
    assert main(["retention", "run", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("retention cleanup (DRY RUN, nothing changed): would mark 3")
    assert f"would delete copy #{world.copies['superseded.f32']} {world.paths['superseded.f32']}:" in out
    assert _statuses(engine, world.copies) == BEFORE
    assert main(["retention", "run"]) == 1  # two copies could not be deleted
    out = capsys.readouterr().out
    assert "deleted 3 file(s), 2 refused/failed" in out
    assert main(["retention", "run", "--retention-days", "-1"]) == 2
    assert "give 0 or more days" in capsys.readouterr().err


def test_the_code_location_carries_the_job_and_schedule(demo_world):  # noqa: F811
    from ccat_dagster.definitions import build_definitions

    defs = build_definitions(demo_world.settings())
    # What a code server checks (unique op / job names), for the definitions this module adds.
    jobs, schedules = build_retention_definitions(demo_world.settings())
    dg.Definitions.validate_loadable(dg.Definitions(jobs=jobs, schedules=schedules))
    assert defs.resolve_job_def(RETENTION_JOB).name == RETENTION_JOB
    assert defs.resolve_schedule_def(RETENTION_SCHEDULE).default_status is dg.DefaultScheduleStatus.STOPPED
