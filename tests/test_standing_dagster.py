"""Standing pipelines through real Dagster on PostgreSQL (ops-db and Dagster storage), real example software
under bubblewrap.

On a world each, without the daemon (they bring a new scan, which would be new data for the daemon's
pipeline): a MANUAL pipeline materialized from the CLI right after apply, and a fan-in that completes after
retention deleted its intermediates (and a run by hand that says what to re-create first). Then one real
``dagster-daemon`` for the rest of the module (``dagster sensor start``, ``dagster-daemon run``): it evaluates
the sensor, resolves its run requests (the implicit asset job with one step selected, partition ranges),
launches the runs as separate processes and chains the steps; a config change re-runs the step and the fan-in
with no new data; a forced upstream re-run with identical bytes leaves downstream up to date.
"""

from __future__ import annotations

import re
import time

import dagster as dg
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from ccat_dagster.assets.factory import PIPELINE_TAG, REBUILD_TAG, STEP_TAG, step_asset_key
from ccat_dagster.definitions import build_definitions
from ccat_dagster.demo.run import run_sensor_until_idle
from ccat_dagster.execution.retention import DeletionAction
from ccat_dagster.opsdb import models as m
from ccat_dagster.opsdb.engine import make_engine
from ccat_dagster.opsdb.enums import PackageState, PhysicalCopyStatus, RunStatus
from ccat_dagster.provenance.cleanup import run_retention_cleanup
from ccat_dagster.sensors.gaps import sensor_name

from .conftest import drop_pg_database
from .daemon_fixtures import (
    FAST_RUN_QUEUE,
    Daemon,
    apply_file,
    completed_steps,
    dagster_bin,
    pipeline_runs,
    run_cli,
    write_variant,
)
from .dagster_fixtures import (
    PER_SCAN,
    PIPELINE,
    archived_example_scan_ids,
    archived_example_scan_keys,
    make_world,
    require_bwrap_and_numpy,
)

# ------------------------------------------------------ without the daemon, on a world each: they bring a new scan


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


def test_a_manual_pipeline_is_materialized_from_the_cli_right_after_apply(world, tmp_path):
    manual = write_variant(tmp_path, PIPELINE, trigger={"type": "manual"})
    applied = run_cli(world, dagster_bin("ccat-dagster"), "pipelines", "apply", str(manual))
    assert applied.returncode == 0, applied.stdout + applied.stderr
    assert "partitions: " in applied.stdout and " added" in applied.stdout
    instance = world.instance()
    per_scan = PER_SCAN
    keys = sorted(instance.get_dynamic_partitions(per_scan))
    assert keys and instance.get_dynamic_partitions(f"{PIPELINE}__all") == ["all"]

    run = run_cli(
        world,
        dagster_bin("dagster"),
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
    assert completed_steps(world.ops_db_url, PIPELINE) == {"calibrate": 1}
    assert instance.get_materialized_partitions(dg.AssetKey([PIPELINE, "calibrate"])) == {keys[0]}

    # No run-requesting sensor for a MANUAL pipeline; the partitions sensor adds new sub-groups as data arrives.
    defs = build_definitions(world.settings())
    assert {s.name for s in defs.sensors if s.name.startswith(PIPELINE)} == {f"{PIPELINE}__partitions"}
    _archive_held_back(world)
    sensor = defs.get_sensor_def(f"{PIPELINE}__partitions")
    result = sensor(dg.build_sensor_context(instance=instance, definitions=defs))
    (request,) = [r for r in result.dynamic_partitions_requests if r.partitions_def_name == per_scan]
    assert request.partition_keys and not set(request.partition_keys) & set(keys)
    assert not result.run_requests


def test_retention_of_zero_days_and_a_new_scan_the_fan_in_completes(world, tmp_path):
    # baseline's intermediates may go although grid_map (a fan-in) reads them: they are re-created on demand.
    steps = {"baseline": {"retention": "recreate"}, "grid_map": {"cooldown_seconds": 0}}
    apply_file(world, write_variant(tmp_path, PIPELINE, steps=steps))
    settings = world.settings()
    instance = world.instance()
    defs = build_definitions(settings)
    first = run_sensor_until_idle(defs=defs, instance=instance, pipeline=PIPELINE, echo=lambda _m: None)
    assert all(ok for _s, _l, ok in first.runs)
    scans = completed_steps(world.ops_db_url, PIPELINE)["calibrate"]

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

    # A run by hand of the fan-in does not re-create them: it fails with one line saying what to run first.
    by_hand = defs.resolve_implicit_global_asset_job_def().execute_in_process(
        instance=instance,
        asset_selection=[step_asset_key(PIPELINE, "grid_map")],
        partition_key="all",
        raise_on_error=False,
    )
    (failure,) = by_hand.get_step_failure_events()
    message = failure.step_failure_data.user_failure_data.description
    assert message.startswith(f"1 sub-group(s) of {PIPELINE}/grid_map did not run (all): retention deleted")
    assert f"materialize first calibrate ({scans} sub-group(s): " in message and f"; then baseline ({scans} " in message
    assert f"--select {PIPELINE}/calibrate --partition scan=" in message and "\n" not in message
    assert completed_steps(world.ops_db_url, PIPELINE)["grid_map"] == 1
    _archive_held_back(world)

    log: list[str] = []
    second = run_sensor_until_idle(defs=defs, instance=instance, pipeline=PIPELINE, echo=log.append, max_ticks=12)
    assert all(ok for _s, _l, ok in second.runs), "\n".join(log)
    assert completed_steps(world.ops_db_url, PIPELINE)["grid_map"] == 2, "\n".join(log)
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


# ------------------------------------------------------------------ one daemon for the rest of the module


STEPS = ("calibrate", "baseline", "grid_map")
# No cooldowns: the example's steps wait a minute (grid_map a day) between runs of a sub-group, which would only
# delay the re-runs after the config change (cooldowns are tested in test_tick_planning.py).
QUICK = {step: {"cooldown_seconds": 0} for step in ("calibrate", "baseline", "grid_map")}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    """One world with the example pipeline (fan-in without cooldown), its sensor started and the daemon running.

    The tests share the pipeline: each first waits until the daemon has brought it up to date, whatever ran
    before, and asserts relative to that state, so they also hold alone or in another order.
    """
    require_bwrap_and_numpy()
    directory = tmp_path_factory.mktemp("standing-daemon")
    with pytest.MonkeyPatch.context() as monkeypatch:
        world, urls = make_world(directory, monkeypatch, scans=3, instance_config=FAST_RUN_QUEUE)
        daemon = Daemon(world, directory)
        try:
            apply_file(world, write_variant(directory, PIPELINE, steps=QUICK))
            daemon.start([sensor_name(PIPELINE)])
            yield daemon
        finally:
            daemon.stop()
            for url in urls:
                drop_pg_database(url)


def _up_to_date(daemon: Daemon) -> list[dg.DagsterRun]:
    """Wait until the pipeline's fan-in has completed, every run of it has ended and the sensor has seen them all
    (a tick after that requested nothing); its runs, oldest first."""
    instance = daemon.instance
    quiet_since: list[float] = []  # when every run was seen ended (reset when a run is in flight again)

    def settled() -> list[dg.DagsterRun]:
        runs = pipeline_runs(instance, PIPELINE)
        failed = [r for r in runs if r.status in (dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED)]
        assert not failed, f"run(s) failed: {[(r.run_id, r.tags) for r in failed]}\n{daemon.tail()}"
        if not runs or not all(r.is_finished for r in runs):
            quiet_since.clear()
            return []
        if not completed_steps(daemon.world.ops_db_url, PIPELINE).get("grid_map"):
            return []
        quiet_since[:] = quiet_since or [time.time()]
        ticks = daemon.sensor_ticks(sensor_name(PIPELINE), after=quiet_since[0])
        return runs if any(t.status.value == "SKIPPED" for t in ticks) else []

    return daemon.wait_until(settled, f"{PIPELINE} up to date")


def test_the_daemon_runs_the_sensor_and_the_chain_it_requests(daemon):
    runs = [r for r in _up_to_date(daemon) if r.tags.get("dagster/sensor_name")]
    # The first chain: the sensor's runs up to its first fan-in run.
    first_fan_in = next(i for i, r in enumerate(runs) if r.tags[STEP_TAG] == "grid_map")
    chain = runs[: first_fan_in + 1]

    # Every run is the implicit asset job with exactly one step selected, requested by the sensor.
    for run in chain:
        assert run.job_name == "__ASSET_JOB"
        assert run.tags["dagster/sensor_name"] == sensor_name(PIPELINE)
        assert run.asset_selection == {step_asset_key(PIPELINE, run.tags[STEP_TAG])}
    first = {step: min(i for i, r in enumerate(chain) if r.tags[STEP_TAG] == step) for step in STEPS}
    assert first["calibrate"] < first["baseline"] < first["grid_map"]

    # Exactly the archived scans were materialized, each with one completed attempt per per-scan step.
    engine = make_engine(daemon.world.ops_db_url)
    with Session(engine) as session:
        scans = archived_example_scan_keys(session)
        attempts = session.scalars(
            select(m.ExecutedReductionStep).where(m.ExecutedReductionStep.dagster_run_id.in_([r.run_id for r in chain]))
        ).all()
        done = {(a.step.name, a.sub_group_key) for a in attempts if a.status is RunStatus.COMPLETED}
    engine.dispose()
    assert daemon.instance.get_materialized_partitions(step_asset_key(PIPELINE, "calibrate")) == scans
    assert len(attempts) == len(done) == 2 * len(scans) + 1
    assert done == {(s, k) for s in ("calibrate", "baseline") for k in scans} | {("grid_map", "all")}


def test_a_config_change_with_the_daemon_running_re_runs_the_step_and_the_fan_in(daemon, tmp_path):
    _up_to_date(daemon)
    url = daemon.world.ops_db_url
    before = completed_steps(url, PIPELINE)
    engine = make_engine(url)
    with Session(engine) as session:
        scans = len(archived_example_scan_ids(session))
    engine.dispose()
    # The same `pipelines apply` as the CLI's, with the daemon running; no new data.
    changed = {**QUICK, "baseline": {**QUICK["baseline"], "config": {"baseline_order": 2, "line_window_kms": 50}}}
    apply_file(daemon.world, write_variant(tmp_path, PIPELINE, steps=changed))

    daemon.wait_until(
        lambda: completed_steps(url, PIPELINE).get("grid_map") == before["grid_map"] + 1,
        "a fan-in run after the change",
    )
    _up_to_date(daemon)
    # calibrate did not run again; baseline re-ran every scan, then the fan-in once.
    assert completed_steps(url, PIPELINE) == {
        "calibrate": before["calibrate"],
        "baseline": before["baseline"] + scans,
        "grid_map": before["grid_map"] + 1,
    }


def test_an_identical_upstream_re_run_leaves_downstream_up_to_date(daemon):
    _up_to_date(daemon)
    world = daemon.world
    sensor = sensor_name(PIPELINE)
    before = completed_steps(world.ops_db_url, PIPELINE)
    instance = daemon.instance
    key = sorted(instance.get_dynamic_partitions(PER_SCAN))[0]

    # An operator re-runs one up-to-date calibrate sub-group by hand (no trigger tag: forced); same bytes out.
    started_at = time.time()
    forced = (
        build_definitions(world.settings())
        .resolve_implicit_global_asset_job_def()
        .execute_in_process(
            instance=instance,
            asset_selection=[step_asset_key(PIPELINE, "calibrate")],
            partition_key=key,
            tags={PIPELINE_TAG: PIPELINE, STEP_TAG: "calibrate"},
            raise_on_error=False,
        )
    )
    assert forced.success
    assert completed_steps(world.ops_db_url, PIPELINE)["calibrate"] == before["calibrate"] + 1

    # The sensor's tick that sees the finished attempt requests nothing: baseline's inputs have the same content,
    # so its fingerprint (and the fan-in's after it) did not change.
    tick = _next_tick(daemon, sensor, after=started_at)
    assert not tick.run_ids, tick.skip_reason
    assert "sub-groups requested: none" in tick.skip_reason and "up_to_date" in tick.skip_reason
    assert completed_steps(world.ops_db_url, PIPELINE) == {**before, "calibrate": before["calibrate"] + 1}


def _next_tick(daemon: Daemon, sensor: str, *, after: float):  # type: ignore[no-untyped-def]
    """The first ended tick of ``sensor`` after ``after`` that saw finished attempts (or requested runs)."""

    def seen():  # type: ignore[no-untyped-def]
        ticks = [t for t in daemon.sensor_ticks(sensor, after=after) if t.status.value != "STARTED"]
        failed = [t for t in ticks if t.status.value == "FAILURE"]
        assert not failed, failed[0].error
        for tick in reversed(ticks):
            found = re.search(r"(\d+) finished attempt", tick.skip_reason or "")
            if tick.run_ids or (found and int(found.group(1)) > 0):
                return tick
        return None

    return daemon.wait_until(seen, f"a tick of {sensor} that saw finished attempts")
