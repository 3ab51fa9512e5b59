"""The orchestrator's own death never costs a job: daemon, run worker and code server killed mid-batch.

Each scenario asserts afterwards that the pipeline completed, that the attempts running at the fault were
collected (adopted by job id, not cancelled and redone), that nothing was lost or duplicated and that the
ops-db invariants hold.
"""

from __future__ import annotations

import os
import signal
import time

import dagster as dg
import pytest

from ccat_dagster.opsdb.enums import RunStatus

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.bwrap]


def _running(world, pipeline: str, step: str = "work") -> set[int]:  # type: ignore[no-untyped-def]
    return {a.id for a in world.attempts(pipeline, step) if a.status is RunStatus.RUNNING}


def _assert_collected_once(world, pipeline: str, attempt_ids: set[int]) -> None:  # type: ignore[no-untyped-def]
    """The attempts in flight at the fault ended COMPLETED themselves: their jobs were adopted, not redone."""
    by_id = {a.id: a for a in world.attempts(pipeline)}
    assert {i: by_id[i].status for i in attempt_ids} == {i: RunStatus.COMPLETED for i in attempt_ids}, [
        (a.id, a.sub_group_key, a.status, a.error) for a in by_id.values()
    ]
    assert all(count == 1 for count in world.completed_per_key(pipeline, "work").values())


def test_dagster_daemon_sigkill_with_runs_in_flight(fault_world, scenario, clock):
    world = fault_world
    with scenario("daemon_sigkill") as (pipeline, outcome):
        world.arrive(pipeline)
        running = world.wait_for("work attempts running", lambda: _running(world, pipeline))
        clock.fault()
        world.daemon.kill(signal.SIGKILL)
        time.sleep(3)
        world.daemon.restart()
        world.wait_complete(pipeline)
        outcome.recovery_seconds = clock.since_fault()
        _assert_collected_once(world, pipeline, running)
        world.measure(outcome, pipeline)


def test_run_worker_sigkill_mid_job_on_the_local_backend(fault_world, scenario, clock):
    world = fault_world
    with scenario("worker_sigkill_local") as (pipeline, outcome):
        world.arrive(pipeline)
        running = world.wait_for("work attempts running", lambda: _running(world, pipeline))
        (owner,) = {a.dagster_run_id for a in world.attempts(pipeline, "work") if a.id in running}
        pid = world.wait_for("the run worker's pid", lambda: world.worker_pid(owner))
        clock.fault()
        os.kill(pid, signal.SIGKILL)
        world.wait_complete(pipeline)
        outcome.recovery_seconds = clock.since_fault()
        # Dagster never noticed the death by itself (no worker health check): the reconcile sensor failed the run.
        assert world.instance().get_run_by_id(owner).status == dg.DagsterRunStatus.FAILURE
        adopters = [r for r in world.runs(pipeline) if r.tags.get("ccat/adopted_from") == owner]
        assert len(adopters) == 1 and adopters[0].status == dg.DagsterRunStatus.SUCCESS
        _assert_collected_once(world, pipeline, running)
        world.measure(outcome, pipeline)


def test_code_server_sigkill_with_runs_in_flight(fault_world, scenario, clock):
    world = fault_world
    with scenario("code_server_sigkill") as (pipeline, outcome):
        world.arrive(pipeline)
        running = world.wait_for("work attempts running", lambda: _running(world, pipeline))
        clock.fault()
        world.code_server.kill(signal.SIGKILL)  # the whole process group: its run workers die with it
        time.sleep(2)
        world.code_server.restart()
        world.wait_for_code_server()
        world.wait_complete(pipeline)
        outcome.recovery_seconds = clock.since_fault()
        _assert_collected_once(world, pipeline, running)
        world.measure(outcome, pipeline)
