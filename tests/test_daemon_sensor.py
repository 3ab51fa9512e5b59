"""The trigger path through Dagster's own daemon: ``dagster sensor start`` then ``dagster-daemon run``.

The other sensor tests call the sensor function directly; this one lets the real daemon evaluate it, resolve its
run requests (the implicit asset job with one step selected, partition ranges), launch the runs as separate
processes and chain the steps, on PostgreSQL ops-db and Dagster storage.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ccat_dagster.assets.factory import step_asset_key
from ccat_dagster.opsdb import models as m
from ccat_dagster.opsdb.engine import make_engine
from ccat_dagster.opsdb.enums import RunStatus
from ccat_dagster.sensors.gaps import sensor_name

from .dagster_fixtures import PIPELINE, REPO, archived_example_scan_keys, make_world, require_bwrap_and_numpy

STEPS = ("calibrate", "baseline", "grid_map")
TIMEOUT_SECONDS = 300


def _dagster(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def _workspace(tmp_path: Path) -> Path:
    workspace = tmp_path / "workspace.yaml"
    workspace.write_text(
        "load_from:\n"
        "  - python_module:\n"
        "      module_name: ccat_dagster.definitions\n"
        "      attribute: defs\n"
        "      location_name: ccat_dagster\n"
        f"      working_directory: {REPO}\n"
    )
    return workspace


def _wait_for_chain(instance: dg.DagsterInstance, daemon: subprocess.Popen, log: Path) -> list[dg.DagsterRun]:
    """The runs of the three steps, once every one of them has finished (or fail with the daemon's log)."""
    deadline = time.monotonic() + TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        runs = instance.get_runs()
        steps = {run.tags.get("ccat/step") for run in runs if run.status == dg.DagsterRunStatus.SUCCESS}
        failed = [run for run in runs if run.status in (dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED)]
        assert not failed, f"run(s) failed: {[(r.run_id, r.tags) for r in failed]}\n{log.read_text()[-4000:]}"
        assert daemon.poll() is None, f"dagster-daemon exited ({daemon.returncode}):\n{log.read_text()[-4000:]}"
        if steps >= set(STEPS) and all(run.is_finished for run in runs):
            return list(reversed(runs))
        time.sleep(1)
    raise AssertionError(f"no complete chain after {TIMEOUT_SECONDS} s:\n{log.read_text()[-4000:]}")


def test_the_daemon_runs_the_sensor_and_the_chain_it_requests(tmp_path, monkeypatch):
    require_bwrap_and_numpy()
    world, urls = make_world(tmp_path, monkeypatch)
    monkeypatch.setenv("CCAT_WORKFLOW_MANAGER_SENSOR_INTERVAL_SECONDS", "2")
    workspace = _workspace(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    log = tmp_path / "daemon.log"
    daemon = None
    try:
        started = subprocess.run(
            [_dagster("dagster"), "sensor", "start", sensor_name(PIPELINE), "-w", str(workspace)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert started.returncode == 0, started.stdout + started.stderr
        with log.open("w") as out:
            daemon = subprocess.Popen(
                [_dagster("dagster-daemon"), "run", "-w", str(workspace)],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        instance = world.instance()
        runs = _wait_for_chain(instance, daemon, log)

        # Every run is the implicit asset job with exactly one step selected, requested by the sensor.
        for run in runs:
            assert run.job_name == "__ASSET_JOB"
            assert run.tags["dagster/sensor_name"] == sensor_name(PIPELINE)
            assert run.asset_selection == {step_asset_key(PIPELINE, run.tags["ccat/step"])}
        first = {step: min(i for i, r in enumerate(runs) if r.tags["ccat/step"] == step) for step in STEPS}
        assert first["calibrate"] < first["baseline"] < first["grid_map"]

        # Exactly the archived scans were materialized, each with one completed attempt per per-scan step.
        engine = make_engine(world.ops_db_url)
        with Session(engine) as session:
            scans = archived_example_scan_keys(session)
            completed = dict(
                session.execute(
                    select(m.ReductionStep.name, func.count())
                    .join(m.ExecutedReductionStep.step)
                    .where(m.ExecutedReductionStep.status == RunStatus.COMPLETED)
                    .group_by(m.ReductionStep.name)
                ).all()
            )
        engine.dispose()
        assert instance.get_materialized_partitions(step_asset_key(PIPELINE, "calibrate")) == scans
        assert completed == {"calibrate": len(scans), "baseline": len(scans), "grid_map": 1}
    finally:
        if daemon is not None and daemon.poll() is None:
            os.killpg(daemon.pid, signal.SIGTERM)
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(daemon.pid, signal.SIGKILL)
                daemon.wait()
        from .conftest import drop_pg_database

        for url in urls:
            drop_pg_database(url)
