"""Faults of a shared service (daemon, code server), after the concurrent scenarios: nothing else in flight.

Each scenario asserts afterwards that the pipeline completed, that the attempts running at the fault were
collected (adopted by job id, not cancelled and redone), that nothing was lost or duplicated and that the
ops-db invariants hold.
"""

from __future__ import annotations

import signal
import time

import pytest

from .conftest import record

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.bwrap]


def test_dagster_daemon_sigkill_with_runs_in_flight(fault_world):
    def kill_and_restart() -> None:
        fault_world.daemon.kill(signal.SIGKILL)
        time.sleep(3)
        fault_world.daemon.restart()

    with record(fault_world, "daemon_sigkill") as (pipeline, outcome):
        fault_world.fault_while_jobs_run(pipeline, outcome, kill_and_restart)


def test_code_server_sigkill_with_runs_in_flight(fault_world):
    def kill_and_restart() -> None:
        fault_world.code_server.kill(signal.SIGKILL)  # the whole process group: its run workers die with it
        time.sleep(2)
        fault_world.code_server.restart()
        fault_world.wait_for_code_server()

    with record(fault_world, "code_server_sigkill") as (pipeline, outcome):
        fault_world.fault_while_jobs_run(pipeline, outcome, kill_and_restart)


def test_ops_db_invariants_hold_after_every_scenario(fault_world):
    """The whole of ops-db, every pipeline of the suite, once the scenarios are over."""
    violations = fault_world.violations()
    assert violations == [], "\n".join(map(str, violations))


def _pg_outage(world, seconds: float) -> None:  # type: ignore[no-untyped-def]
    world.pg.stop()
    try:
        time.sleep(seconds)
    finally:
        world.pg.start()


def test_postgresql_stopped_for_20_s_during_a_sensor_tick(fault_world):
    world = fault_world
    with record(world, "pg_stop_sensor_tick") as (pipeline, outcome):
        world.arrive(pipeline)
        fault = time.monotonic()
        _pg_outage(world, 20)  # the next ticks of every sensor find no database
        world.wait_complete(pipeline)
        outcome.recovery_seconds = time.monotonic() - fault
        world.measure(outcome, pipeline)


def test_postgresql_stopped_for_20_s_during_collection(fault_world):
    def outage() -> None:
        time.sleep(2)  # the payload sleeps 4 s: its jobs end, and are to be collected, while the database is down
        _pg_outage(fault_world, 20)

    with record(fault_world, "pg_stop_collection") as (pipeline, outcome):
        fault_world.fault_while_jobs_run(pipeline, outcome, outage)
