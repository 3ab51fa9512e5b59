"""Standing pipelines through real Dagster on PostgreSQL (ops-db and Dagster storage), real example software
under bubblewrap: a MANUAL pipeline materialized from the CLI right after apply, a fan-in that completes after
retention deleted its intermediates, and a config change picked up by the running dagster-daemon.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest
import yaml
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ccat_dagster.assets.factory import REBUILD_TAG
from ccat_dagster.definitions import build_definitions
from ccat_dagster.demo.run import run_sensor_until_idle
from ccat_dagster.execution.retention import DeletionAction
from ccat_dagster.opsdb import models as m
from ccat_dagster.opsdb.engine import make_engine
from ccat_dagster.opsdb.enums import PackageState, PhysicalCopyStatus, RunStatus
from ccat_dagster.provenance.cleanup import run_retention_cleanup
from ccat_dagster.sensors.gaps import sensor_name

from .conftest import drop_pg_database
from .dagster_fixtures import (
    EXAMPLE,
    PER_SCAN,
    PIPELINE,
    REPO,
    archived_example_scan_ids,
    archived_example_scan_keys,
    make_world,
    require_bwrap_and_numpy,
)


@pytest.fixture
def world(tmp_path, monkeypatch):
    require_bwrap_and_numpy()
    world, urls = make_world(tmp_path, monkeypatch, scans=3)
    # One scan of the grouping is still "in transfer": _archive_held_back brings it as new data.
    engine = make_engine(world.ops_db_url)
    with Session(engine) as session, session.begin():
        newest = max(archived_example_scan_ids(session), key=str)
        for package in session.scalars(select(m.RawDataPackage).where(m.RawDataPackage.executed_obs_unit_id == newest)):
            package.state = PackageState.WAITING
    engine.dispose()
    yield world
    for url in urls:
        drop_pg_database(url)


def _archive_held_back(world) -> None:  # type: ignore[no-untyped-def]
    """Data-transfer finishes the held-back scan (its archive copy exists already)."""
    engine = make_engine(world.ops_db_url)
    with Session(engine) as session, session.begin():
        for package in session.scalars(select(m.RawDataPackage).where(m.RawDataPackage.state == PackageState.WAITING)):
            package.state = PackageState.ARCHIVED
            package.updated_at = m.utcnow()
    engine.dispose()


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def _variant(tmp_path: Path, name: str, *, trigger=None, steps=None) -> Path:  # type: ignore[no-untyped-def]
    """The example pipeline with changes: ``trigger``, and per step name a dict of keys to set."""
    document = yaml.safe_load(EXAMPLE.read_text())
    for step in document["steps"]:
        step["software"]["image_ref"] = str((EXAMPLE.parent / step["software"]["image_ref"]).resolve())
        step.update((steps or {}).get(step["name"], {}))
    if trigger is not None:
        document["trigger"] = trigger
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def _cli(world, *argv: str) -> subprocess.CompletedProcess:  # type: ignore[no-untyped-def]
    return subprocess.run(
        list(argv),
        env={**os.environ, **world.env, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _completed(url: str) -> dict[str, int]:
    engine = make_engine(url)
    with Session(engine) as session:
        rows = session.execute(
            select(m.ReductionStep.name, func.count())
            .join(m.ExecutedReductionStep.step)
            .where(m.ExecutedReductionStep.status == RunStatus.COMPLETED)
            .group_by(m.ReductionStep.name)
        ).all()
    engine.dispose()
    return dict(rows)


def test_a_manual_pipeline_is_materialized_from_the_cli_right_after_apply(world, tmp_path):
    manual = _variant(tmp_path, "manual", trigger={"type": "manual"})
    applied = _cli(world, _bin("ccat-dagster"), "pipelines", "apply", str(manual))
    assert applied.returncode == 0, applied.stdout + applied.stderr
    assert "partitions: " in applied.stdout and " added" in applied.stdout
    instance = world.instance()
    keys = sorted(instance.get_dynamic_partitions(PER_SCAN))
    assert keys and instance.get_dynamic_partitions(f"{PIPELINE}__all") == ["all"]

    run = _cli(
        world,
        _bin("dagster"),
        "asset",
        "materialize",
        "-m",
        "ccat_dagster.definitions",
        "--select",
        f"{PIPELINE}/calibrate",
        "--partition",
        keys[0],
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert _completed(world.ops_db_url) == {"calibrate": 1}
    assert instance.get_materialized_partitions(dg.AssetKey([PIPELINE, "calibrate"])) == {keys[0]}

    # No run-requesting sensor for a MANUAL pipeline; the partitions sensor adds new sub-groups as data arrives.
    defs = build_definitions(world.settings())
    assert {s.name for s in defs.sensors if s.name.startswith(PIPELINE)} == {f"{PIPELINE}__partitions"}
    _archive_held_back(world)
    sensor = defs.get_sensor_def(f"{PIPELINE}__partitions")
    result = sensor(dg.build_sensor_context(instance=instance, definitions=defs))
    (request,) = [r for r in result.dynamic_partitions_requests if r.partitions_def_name == PER_SCAN]
    assert request.partition_keys and not set(request.partition_keys) & set(keys)
    assert not result.run_requests


def test_retention_of_zero_days_and_a_new_scan_the_fan_in_completes(world, tmp_path):
    # baseline's intermediates may go although grid_map (a fan-in) reads them: they are re-created on demand.
    recreate = _variant(
        tmp_path,
        "recreate",
        steps={"baseline": {"retention": "recreate"}, "grid_map": {"cooldown_seconds": 0}},
    )
    assert _cli(world, _bin("ccat-dagster"), "pipelines", "apply", str(recreate)).returncode == 0
    settings = world.settings()
    instance = world.instance()
    defs = build_definitions(settings)
    first = run_sensor_until_idle(defs=defs, instance=instance, pipeline=PIPELINE, echo=lambda _m: None)
    assert all(ok for _s, _l, ok in first.runs)
    scans = _completed(world.ops_db_url)["calibrate"]

    engine = make_engine(world.ops_db_url)
    report = run_retention_cleanup(
        engine,
        pipeline_base_dir=settings.pipeline_base_dir,
        processing_location_id=settings.processing_location_id,
        retention_days=0,
        dry_run=False,
    )
    # At least one intermediate of calibrate and one of baseline per scan (grid_map's products are final).
    assert report.count(DeletionAction.DELETED) >= 2 * scans
    _archive_held_back(world)

    log: list[str] = []
    second = run_sensor_until_idle(defs=defs, instance=instance, pipeline=PIPELINE, echo=log.append, max_ticks=12)
    assert all(ok for _s, _l, ok in second.runs), "\n".join(log)
    completed = _completed(world.ops_db_url)
    assert completed["grid_map"] == 2, "\n".join(log)
    with Session(engine) as session:
        latest = session.scalars(
            select(m.ExecutedReductionStep)
            .join(m.ExecutedReductionStep.step)
            .where(m.ReductionStep.name == "grid_map")
            .order_by(m.ExecutedReductionStep.id.desc())
        ).first()
        # The fan-in read every scan's baseline, the old scans' from re-created (present) copies.
        every_scan = archived_example_scan_keys(session)
        assert {p.sub_group_key for p in latest.input_products} == every_scan and len(every_scan) > scans
        assert all(
            copy.status is PhysicalCopyStatus.PRESENT for p in latest.input_products for copy in p.physical_copies
        )
    engine.dispose()
    rebuilt = instance.get_runs(filters=dg.RunsFilter(tags={REBUILD_TAG: "missing_intermediate"}))
    assert {run.tags["ccat/step"] for run in rebuilt} == {"calibrate", "baseline"}, "\n".join(log)


@pytest.mark.slow
def test_a_config_change_with_the_daemon_running_re_runs_the_step_and_the_fan_in(world, tmp_path):
    quick = _variant(tmp_path, "quick", steps={"grid_map": {"cooldown_seconds": 0}})
    assert _cli(world, _bin("ccat-dagster"), "pipelines", "apply", str(quick)).returncode == 0
    defs = build_definitions(world.settings())
    instance = world.instance()
    run_sensor_until_idle(defs=defs, instance=instance, pipeline=PIPELINE, echo=lambda _m: None)
    before = _completed(world.ops_db_url)
    assert before["grid_map"] == 1

    workspace = tmp_path / "workspace.yaml"
    workspace.write_text(
        "load_from:\n  - python_module:\n      module_name: ccat_dagster.definitions\n      attribute: defs\n"
        f"      location_name: ccat_dagster\n      working_directory: {REPO}\n"
    )
    env = {**os.environ, **world.env, "PYTHONPATH": str(REPO), "CCAT_WORKFLOW_MANAGER_SENSOR_INTERVAL_SECONDS": "2"}
    started = subprocess.run(
        [_bin("dagster"), "sensor", "start", sensor_name(PIPELINE), "-w", str(workspace)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert started.returncode == 0, started.stdout + started.stderr
    log = tmp_path / "daemon.log"
    with log.open("w") as out:
        daemon = subprocess.Popen(
            [_bin("dagster-daemon"), "run", "-w", str(workspace)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        changed = _variant(
            tmp_path,
            "changed",
            steps={
                "grid_map": {"cooldown_seconds": 0},
                "baseline": {"config": {"baseline_order": 2, "line_window_kms": 50}},
            },
        )
        assert _cli(world, _bin("ccat-dagster"), "pipelines", "apply", str(changed)).returncode == 0
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            done = _completed(world.ops_db_url)
            if done.get("grid_map", 0) == 2 and all(r.is_finished for r in instance.get_runs()):
                break
            assert daemon.poll() is None, log.read_text()[-4000:]
            time.sleep(1)
        else:
            raise AssertionError(f"no re-run after the config change: {done}\n{log.read_text()[-4000:]}")
        # No new data: calibrate did not run again; baseline re-ran every scan, then the fan-in once.
        assert done == {
            "calibrate": before["calibrate"],
            "baseline": 2 * before["baseline"],
            "grid_map": 2,
        }
        failed = [r.run_id for r in instance.get_runs() if r.status is not dg.DagsterRunStatus.SUCCESS]
        assert not failed, log.read_text()[-4000:]
    finally:
        os.killpg(daemon.pid, signal.SIGTERM)
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(daemon.pid, signal.SIGKILL)
            daemon.wait()
