"""Retention per step (keep / recreate / auto) and what re-creating a deleted intermediate would cost.
PostgreSQL and SQLite."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy.orm import Session

from ccat_dagster.execution.registration import record_input_lineage
from ccat_dagster.execution.retention import (
    DeletionAction,
    delete_deletable_copies,
    effective_retention,
    mark_deletable_intermediates,
)
from ccat_dagster.opsdb.engine import session_scope
from ccat_dagster.opsdb.enums import PhysicalCopyStatus, RunStatus, StepRetention, TriggerType
from ccat_dagster.provenance.report import recreation_text

from .execution_factories import add_product, make_staging_world, make_step_attempt

NOW = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
OLD = NOW - dt.timedelta(days=10)


@pytest.mark.parametrize(
    ("setting", "trigger", "expected"),
    [
        (StepRetention.AUTO, TriggerType.CONTINUOUS, StepRetention.KEEP),  # a standing fan-in reads it again
        (StepRetention.AUTO, TriggerType.CRON, StepRetention.KEEP),
        (StepRetention.AUTO, TriggerType.MANUAL, StepRetention.RECREATE),  # nothing re-reads it by itself
        (StepRetention.RECREATE, TriggerType.CONTINUOUS, StepRetention.RECREATE),
        (StepRetention.KEEP, TriggerType.MANUAL, StepRetention.KEEP),
    ],
)
def test_retention_setting_decides_whether_consumed_intermediates_may_go(engine, tmp_path, setting, trigger, expected):
    with session_scope(engine) as session:
        world = make_staging_world(session, tmp_path, n_packages=0).world
        world.step.retention = setting
        world.pipeline.trigger_type = trigger
        producer = make_step_attempt(session, world, key="scan-1", status=RunStatus.COMPLETED, at=OLD)
        product, copy = add_product(
            session, producer, world.processing, path=tmp_path / "p" / "cal.dat", relative_path="cal.dat"
        )
        consumer = make_step_attempt(session, world, step=world.final_step, status=RunStatus.COMPLETED, at=OLD)
        record_input_lineage(session, attempt=consumer, package_ids=[], product_ids=[product.id])
        assert effective_retention(world.step) is expected
        marked = mark_deletable_intermediates(session, now=NOW, retention_days=0)
    assert marked == ([] if expected is StepRetention.KEEP else [copy.id])


def test_a_kept_step_still_loses_superseded_intermediates(engine, tmp_path):
    with session_scope(engine) as session:
        world = make_staging_world(session, tmp_path, n_packages=0).world
        world.step.retention = StepRetention.KEEP
        producer = make_step_attempt(session, world, key="scan-1", status=RunStatus.COMPLETED, at=OLD)
        old, old_copy = add_product(session, producer, world.processing, path=tmp_path / "a.dat", relative_path="a")
        new, _ = add_product(session, producer, world.processing, path=tmp_path / "b.dat", relative_path="b")
        old.superseded_by = new
        assert mark_deletable_intermediates(session, now=NOW, retention_days=0) == [old_copy.id]


def test_the_cost_of_re_creating_a_copy_counts_the_ancestors_whose_intermediates_are_gone(engine, tmp_path):
    root = tmp_path / "pipelines"
    with session_scope(engine) as session:
        world = make_staging_world(session, tmp_path, n_packages=0).world
        calibrate = make_step_attempt(session, world, key="scan-1", status=RunStatus.COMPLETED, at=OLD)
        calibrate.cpu_hours = 0.25
        calibrated, calibrated_copy = add_product(
            session, calibrate, world.processing, path=root / "cal.dat", relative_path="cal.dat"
        )
        calibrated_copy.status = PhysicalCopyStatus.DELETED  # an earlier cleanup removed it
        grid = make_step_attempt(session, world, step=world.final_step, status=RunStatus.COMPLETED, at=OLD)
        grid.cpu_hours = 0.5
        record_input_lineage(session, attempt=grid, package_ids=[], product_ids=[calibrated.id])
        _, cube_copy = add_product(session, grid, world.processing, path=root / "cube.dat", relative_path="cube.dat")
        cube_copy.status = PhysicalCopyStatus.DELETION_POSSIBLE
        keep_id = cube_copy.id
    (outcome,) = delete_deletable_copies(engine, dry_run=True, allowed_roots=[root])
    assert (outcome.copy_id, outcome.action) == (keep_id, DeletionAction.WOULD_DELETE)
    # Re-creating the cube re-runs grid_map and, first, calibrate (its input is gone too).
    assert (outcome.recreate_attempts, outcome.recreate_cpu_hours) == (2, 0.75)
    assert recreation_text(outcome) == "re-creating it would re-run 2 attempt(s), 0.75 CPU h"
    with Session(engine) as session:
        assert session.get(type(cube_copy), keep_id).status is PhysicalCopyStatus.DELETION_POSSIBLE


def _example_with(tmp_path, **step_keys):  # type: ignore[no-untyped-def]
    import yaml

    from .dagster_fixtures import EXAMPLE

    document = yaml.safe_load(EXAMPLE.read_text())
    for step in document["steps"]:
        step["software"]["image_ref"] = str((EXAMPLE.parent / step["software"]["image_ref"]).resolve())
    document["steps"][1].update(step_keys)
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def test_the_retention_key_is_validated_and_stored(engine, tmp_path):
    from ccat_dagster.demo.seed import seed_demo
    from ccat_dagster.opsdb import models as m
    from ccat_dagster.pipelines.apply import apply_pipeline_spec, export_pipeline
    from ccat_dagster.pipelines.spec import PipelineSpecError, load_pipeline_spec

    with pytest.raises(PipelineSpecError, match="retention") as error:
        load_pipeline_spec(_example_with(tmp_path, retention="forever"))
    assert "auto, keep, recreate" in str(error.value)
    path = _example_with(tmp_path, retention="recreate")
    with session_scope(engine) as session:
        seed_demo(session, data_dir=tmp_path / "data", scans=1)
        apply_pipeline_spec(session, load_pipeline_spec(path), source_path=path)
        steps = {s.name: s.retention for s in session.query(m.ReductionStep)}
        exported = export_pipeline(session, "chai_ngc253_co43")
    assert steps == {
        "calibrate": StepRetention.AUTO,
        "baseline": StepRetention.RECREATE,
        "grid_map": StepRetention.AUTO,
    }
    assert [s.get("retention") for s in exported["steps"]] == [None, "recreate", None]
