"""Faults that leave the shared services up: each scenario has its own pipeline and packages.

They run side by side on the shared world (``SideBySide``: most of a scenario is waiting), each test joining
its own. Each asserts afterwards that its pipeline completed (or, where its data is bad, that exactly the bad
sub-groups failed with a clear error), that nothing was lost or duplicated, and that the ops-db invariants hold
on its rows."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from ccat_dagster.opsdb.enums import FailureKind, RunStatus

from .harness import Clock, FaultWorld, Outcome, SideBySide, assert_invariants_hold

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.bwrap]


# ------------------------------------------------------------------ the scenarios


def worker_sigkill_local(world: FaultWorld, pipeline: str, outcome: Outcome, clock: Clock) -> None:
    world.arrive(pipeline)
    clock.fault()
    owner, running = world.kill_run_worker_mid_job(pipeline)
    world.wait_complete(pipeline)
    outcome.recovery_seconds = clock.since_fault()
    world.assert_adopted(pipeline, owner, running)
    world.measure(outcome, pipeline)


def worker_sigkill_before_attempt(world: FaultWorld, pipeline: str, outcome: Outcome, clock: Clock) -> None:
    """The work run's worker is killed as soon as it has recorded its process, before the step created any
    attempt: nothing in ops-db points at the run. ccat_orphaned_attempts marks it failed and launches it again."""
    world.arrive(pipeline)

    def fresh_worker() -> tuple[str, int] | None:
        for run in world.runs(pipeline, [dg.DagsterRunStatus.STARTED]):
            if run.tags.get("ccat/step") == "work" and (pid := world.worker_pid(run.run_id)):
                return run.run_id, pid
        return None

    killed, pid = world.wait_for("the work run's worker", fresh_worker, interval=0.05, pipeline=pipeline)
    os.kill(pid, signal.SIGKILL)
    clock.fault()
    early = [a.id for a in world.attempts(pipeline, "work") if a.dagster_run_id == killed]
    world.wait_complete(pipeline)
    outcome.recovery_seconds = clock.since_fault()
    if early:
        pytest.skip(f"the worker created attempt(s) {early} before it was killed: this run tested adoption instead")
    assert world.instance().get_run_by_id(killed).status == dg.DagsterRunStatus.FAILURE
    again = [r for r in world.runs(pipeline) if r.tags.get("ccat/relaunched_from") == killed]
    assert len(again) == 1 and again[0].status == dg.DagsterRunStatus.SUCCESS, world.timeline(pipeline)
    assert again[0].tags["ccat/relaunch"] == "1"
    assert set(world.completed_per_key(pipeline, "work").values()) == {1}
    world.measure(outcome, pipeline)


def dead_runs_fill_pool(world: FaultWorld, pipeline: str, outcome: Outcome, clock: Clock) -> None:
    packages = world.packages_of(pipeline)
    killed: list[str] = []
    # Two slots in this pipeline's pool (as `dagster instance concurrency set` would). Two arrivals, one tick
    # apart, make two runs; both are killed once their jobs run, holding both slots. A third run (the third
    # arrival) can only start once run monitoring has given the slots back; it is killed too: three dead runs,
    # one more than the pool's slots. Then new data.
    world.set_pool_limit(f"ccat/{pipeline}", 2)

    def work_runs() -> list[dg.DagsterRun]:
        return [r for r in world.runs(pipeline) if r.tags.get("ccat/step") == "work" and r.run_id not in killed]

    def running_workers(count: int) -> list[tuple[str, int]] | None:
        found = []
        for run in world.runs(pipeline, [dg.DagsterRunStatus.STARTED]):
            if run.run_id in killed or run.tags.get("ccat/step") != "work" or run.tags.get("ccat/adoption"):
                continue
            busy = [a for a in world.attempts(pipeline, "work") if a.dagster_run_id == run.run_id]
            pid = world.worker_pid(run.run_id)
            if pid and any(a.status is RunStatus.RUNNING for a in busy):
                found.append((run.run_id, pid))
        return found if len(found) >= count else None

    for package in packages[:2]:
        before = len(work_runs())
        world.arrive(pipeline, [package])
        world.wait_for("the arrival's run", lambda before=before: len(work_runs()) > before, pipeline=pipeline)
    for batch, package in ((2, None), (1, packages[2])):
        if package is not None:
            world.arrive(pipeline, [package])
        for _ in range(batch):  # each as soon as its job runs (the other run may still be launching)
            ((run_id, pid), *_) = world.wait_for("a new run with a running job", lambda: running_workers(1))
            if not killed:
                clock.fault()
            os.kill(pid, signal.SIGKILL)
            killed.append(run_id)
    world.arrive(pipeline, packages[3:])
    world.wait_complete(pipeline)
    outcome.recovery_seconds = clock.since_fault()
    assert len(killed) == 3
    assert {world.instance().get_run_by_id(r).status for r in killed} == {dg.DagsterRunStatus.FAILURE}
    assert set(world.completed_per_key(pipeline, "work").values()) == {1}
    world.measure(outcome, pipeline)


def two_launches(world: FaultWorld, pipeline: str, outcome: Outcome, clock: Clock) -> None:
    world.arrive(pipeline)
    # The sensor adds the partition (and requests its own run); then two more launches start together.
    key = world.wait_for(
        "the scan's partition",
        lambda: next(iter(world.instance().get_dynamic_partitions(f"{pipeline}__executed_obs_unit")), None),
    )
    argv = [
        str(Path(sys.executable).with_name("dagster")),
        "asset",
        "materialize",
        "-m",
        "ccat_dagster.definitions",
        "-a",
        "defs",
        "--select",
        f"{pipeline}/work",
        "--partition",
        key,
        # Not forced: a launch of work that is done or in flight elsewhere must not redo it.
        "--config-json",
        json.dumps({"ops": {f"{pipeline}__work": {"config": {"force": False}}}}),
    ]
    clock.fault()
    launches = [
        subprocess.Popen(argv, env=world.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in launches]
    world.wait_complete(pipeline)
    outcome.recovery_seconds = clock.since_fault()
    attempts = world.attempts(pipeline, "work")
    completed = [a for a in attempts if a.status is RunStatus.COMPLETED]
    assert len(completed) == 1, ([(a.id, a.status.value, a.error) for a in attempts], [o[-2000:] for o in outputs])
    world.measure(outcome, pipeline)


def payload_killed_local(world: FaultWorld, pipeline: str, outcome: Outcome, clock: Clock) -> None:
    world.arrive(pipeline)
    running = world.wait_for("work attempts running", lambda: world.running_attempts(pipeline))
    victim = min(running)
    job_id = next(a.hpc_job_id for a in world.attempts(pipeline, "work") if a.id == victim)
    status = world.local_job_status(job_id)
    clock.fault()
    os.killpg(int(status["pgid"]), signal.SIGKILL)
    world.wait_complete(pipeline)
    outcome.recovery_seconds = clock.since_fault()
    attempts = {a.id: a for a in world.attempts(pipeline, "work")}
    assert attempts[victim].status is RunStatus.FAILED
    assert "signal" in (attempts[victim].error or "").lower() or "137" in (attempts[victim].error or "")
    key = attempts[victim].sub_group_key
    assert [a.status for a in attempts.values() if a.sub_group_key == key][-1] is RunStatus.COMPLETED
    world.measure(outcome, pipeline)


def bad_raw_tars(world: FaultWorld, pipeline: str, outcome: Outcome, clock: Clock) -> None:
    good, corrupt, missing = world.packages_of(pipeline)
    archive = world.archive_dir
    originals = {name: (archive / f"{name}.tar").read_bytes() for name in (corrupt, missing)}
    data = bytearray(originals[corrupt])
    data[len(data) // 2] ^= 0xFF
    (archive / f"{corrupt}.tar").write_bytes(bytes(data))
    (archive / f"{missing}.tar").unlink()
    try:
        _bad_raw_tars(world, pipeline, outcome, clock, good, corrupt, missing)
    finally:
        # Data-transfer delivers them again: the archive holds what ops-db says it holds.
        for name, content in originals.items():
            (archive / f"{name}.tar").write_bytes(content)


def _bad_raw_tars(  # type: ignore[no-untyped-def]
    world: FaultWorld, pipeline: str, outcome: Outcome, clock: Clock, good: str, corrupt: str, missing: str
):
    clock.fault()
    world.arrive(pipeline)
    keys = world.keys_of_packages(pipeline, {"good": good, "corrupt": corrupt, "missing": missing})

    def settled() -> bool:
        """No run of it active and every scan's attempts ended (completed, or failed past its retries)."""
        if world.runs(pipeline, list(world.active_statuses)):
            return False
        by_key = world.attempts_by_key(pipeline, "work")
        return all(by_key.get(key) and all(a.status.is_terminal for a in by_key[key]) for key in keys.values())

    world.wait_for("every scan's attempts to end", settled, timeout=240, pipeline=pipeline)
    outcome.recovery_seconds = clock.since_fault()
    by_key = world.attempts_by_key(pipeline, "work")
    good_attempts = [(a.status.value, a.error) for a in by_key[keys["good"]]]
    assert good_attempts[-1][0] == "completed", f"the good scan failed with the bad ones: {good_attempts}"
    for kind in ("corrupt", "missing"):
        attempts = by_key[keys[kind]]
        assert all(a.status is RunStatus.FAILED for a in attempts)
        package = corrupt if kind == "corrupt" else missing
        assert package in (attempts[-1].error or ""), (kind, attempts[-1].error)
    # The missing tar's archive copy says "present": the one violation, and it is the fault itself.
    violations = world.violations_of(pipeline)
    assert [v.kind.value for v in violations] == ["copy_without_file"], violations
    assert missing in violations[0].message
    outcome.note = "the bad scans fail alone, naming their package"


def disk_full_output_dir(world: FaultWorld, pipeline: str, outcome: Outcome, clock: Clock) -> None:
    """One sub-group's output directory is a file system of its own, smaller than what the payload writes (every
    sub-group writes 8 MiB): that attempt fails disk_full naming the directory; the other sub-group completes
    in the same round; once the file system has room, the next tick runs the sub-group again and the pipeline
    completes."""
    world.require_tmpfs()
    victim, innocent = world.packages_of(pipeline)
    keys = world.keys_of_packages(pipeline, {"victim": victim, "innocent": innocent})
    output_dir = world.pipeline_base_dir / pipeline / keys["victim"] / "output"  # work is the final step here
    small = world.mount_tmpfs(output_dir, 4)
    world.arrive(pipeline)
    first = world.wait_for(
        "the victim's attempt to fail",
        lambda: next(
            (
                a
                for a in world.attempts(pipeline, "work")
                if a.sub_group_key == keys["victim"] and a.status is RunStatus.FAILED
            ),
            None,
        ),
        pipeline=pipeline,
    )
    clock.fault()
    small.resize(64)  # the operator makes room
    world.wait_complete(pipeline)
    outcome.recovery_seconds = clock.since_fault()
    assert first.failure_kind is FailureKind.DISK_FULL, (first.failure_kind, first.error)
    assert f"ENOSPC): the file system of {output_dir} is full" in (first.error or ""), first.error
    by_key = world.attempts_by_key(pipeline, "work")
    assert [a.status for a in by_key[keys["innocent"]]] == [RunStatus.COMPLETED]
    assert first.dagster_run_id == by_key[keys["innocent"]][0].dagster_run_id, "not one round"
    assert [a.status for a in by_key[keys["victim"]]] == [RunStatus.FAILED, RunStatus.COMPLETED]
    world.measure(outcome, pipeline)


SCENARIOS = {
    "dead_runs_fill_pool": dead_runs_fill_pool,
    "worker_sigkill_local": worker_sigkill_local,
    "worker_sigkill_before_attempt": worker_sigkill_before_attempt,
    "payload_killed_local": payload_killed_local,
    "bad_raw_tars": bad_raw_tars,
    "disk_full_output_dir": disk_full_output_dir,
    "two_launches": two_launches,
}


@pytest.fixture(scope="module")
def side_by_side(fault_world):  # type: ignore[no-untyped-def]
    group = SideBySide(fault_world, SCENARIOS)
    yield group
    group.join()


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_scenario(side_by_side, name):
    side_by_side.result(name)


def test_ops_db_invariants_hold_after_every_scenario(fault_world):
    """Last in the module: the scenarios above have ended (each test waited for its own)."""
    assert_invariants_hold(fault_world)


WORLD_SCENARIOS = tuple(SCENARIOS)  # the pipelines this module's world is seeded with (tests/faults/conftest.py)
