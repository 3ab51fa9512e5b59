"""Faults of a shared service (daemon, code server, PostgreSQL, the whole PIPELINE_BASE_DIR), after the
side-by-side scenarios: nothing else in flight.

Each scenario asserts afterwards that the pipeline completed, that the attempts running at the fault were
collected (adopted by job id, not cancelled and redone), that nothing was lost or duplicated and that the
ops-db invariants hold.
"""

from __future__ import annotations

import signal
import time

import pytest

from ccat_dagster.opsdb.enums import FailureKind, RunStatus

from .harness import BASE_TMPFS_MB, Clock, FaultWorld, assert_invariants_hold, record

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.bwrap]
# The pipelines this module's world is seeded with (tests/faults/conftest.py).
WORLD_SCENARIOS = (
    "daemon_sigkill",
    "code_server_sigkill",
    "disk_full_base_dir",
    "pg_stop_sensor_tick",
    "pg_stop_collection",
)


def test_dagster_daemon_sigkill_with_runs_in_flight(fault_world):
    def kill_and_restart() -> None:
        fault_world.daemon.kill(signal.SIGKILL)
        time.sleep(1)
        fault_world.daemon.restart()

    with record(fault_world, "daemon_sigkill") as (pipeline, outcome):
        fault_world.fault_while_jobs_run(pipeline, outcome, kill_and_restart)


def test_code_server_sigkill_with_runs_in_flight(fault_world):
    def kill_and_restart() -> None:
        fault_world.code_server.kill(signal.SIGKILL)  # the whole process group: its run workers die with it
        time.sleep(1)
        fault_world.code_server.restart()
        fault_world.wait_for_code_server()

    with record(fault_world, "code_server_sigkill") as (pipeline, outcome):
        fault_world.fault_while_jobs_run(pipeline, outcome, kill_and_restart)


def test_the_whole_pipeline_base_dir_full_fails_only_the_attempt_that_hit_it(fault_world):
    """PIPELINE_BASE_DIR (attempt directories, outputs, the local backend's job records) is shrunk to a few MiB
    more than it holds; one payload writes 16 MiB and hits ENOSPC, the other sub-group of the same round has
    written its product by then. Then the operator makes room, and the next tick completes the pipeline."""
    world = fault_world
    base = world.require_tmpfs()
    with record(world, "disk_full_base_dir") as (pipeline, outcome):
        clock = Clock()
        hog, innocent = world.packages_of(pipeline)
        keys = world.keys_of_packages(pipeline, {"hog": hog, "innocent": innocent})
        base.resize(base.used_mb() + 4)
        try:
            world.arrive(pipeline)
            first = world.wait_for(
                "the hog's attempt to fail",
                lambda: next(
                    (
                        a
                        for a in world.attempts(pipeline, "work")
                        if a.sub_group_key == keys["hog"] and a.status.is_terminal
                    ),
                    None,
                ),
                pipeline=pipeline,
            )
            clock.fault()
        finally:
            base.resize(BASE_TMPFS_MB)
        world.wait_complete(pipeline)
        outcome.recovery_seconds = clock.since_fault()
        assert (first.status, first.failure_kind) == (RunStatus.FAILED, FailureKind.DISK_FULL), first.error
        assert "no space left on device (ENOSPC)" in (first.error or "") and str(base.path) in first.error
        by_key = world.attempts_by_key(pipeline, "work")
        assert [a.status for a in by_key[keys["innocent"]]] == [RunStatus.COMPLETED], by_key[keys["innocent"]]
        assert first.dagster_run_id == by_key[keys["innocent"]][0].dagster_run_id, "not one round"
        assert [a.status for a in by_key[keys["hog"]]] == [RunStatus.FAILED, RunStatus.COMPLETED]
        world.measure(outcome, pipeline)


def _pg_outage(world: FaultWorld, seconds: float) -> None:
    world.pg.stop()
    try:
        time.sleep(seconds)
    finally:
        world.pg.start()


def test_postgresql_stopped_for_20_s_during_a_sensor_tick_and_during_collection(fault_world):
    """One outage, two scenarios: one pipeline's data has just arrived (its sensor's next ticks find no
    database), the other's jobs end and are to be collected while the database is down (the payload sleeps 4 s,
    the outage starts 2 s into it)."""
    world = fault_world
    with (
        record(world, "pg_stop_collection") as (collecting, collection),
        record(world, "pg_stop_sensor_tick") as (ticking, tick),
    ):
        world.arrive(collecting)
        running = world.wait_for("work attempts running", lambda: world.running_attempts(collecting))
        world.arrive(ticking)
        time.sleep(2)
        fault = time.monotonic()
        _pg_outage(world, 20)
        for pipeline, outcome in ((collecting, collection), (ticking, tick)):
            world.wait_complete(pipeline)
            outcome.recovery_seconds = time.monotonic() - fault
        world.assert_collected_once(collecting, running)
        world.measure(collection, collecting)
        world.measure(tick, ticking)


def test_ops_db_invariants_hold_after_every_scenario(fault_world):
    assert_invariants_hold(fault_world)
