"""Faults on the real single-node Slurm (scripts/slurm-single-node.sh): the code server switches to the Slurm
backend for this module (a restart, as an operator changing CCAT_WORKFLOW_MANAGER_HPC_BACKEND would do).

Other engineers' tests use the same Slurm: outages are kept to seconds and slurmctld is always started again.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from ccat_dagster.opsdb.enums import FailureKind, RunStatus

from ..conftest import require_slurm
from .harness import MEMORY_CAP_GB, Clock, FaultWorld, Outcome, SideBySide, assert_invariants_hold, record

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.bwrap, pytest.mark.slurm]

CTLD_PID_FILE = Path("/run/slurmctld.pid")


@pytest.fixture(scope="module")
def slurm_world(fault_world):  # type: ignore[no-untyped-def]
    require_slurm()
    fault_world.code_server.env["CCAT_WORKFLOW_MANAGER_HPC_BACKEND"] = "slurm"
    # These scenarios are of one Slurm job per sub-group (sacct, scancel of a job): their short steps stay unpacked.
    fault_world.code_server.env["CCAT_WORKFLOW_MANAGER_PACKED_EXECUTION"] = "off"
    fault_world.code_server.restart()
    fault_world.wait_for_code_server()
    yield fault_world
    fault_world.code_server.env["CCAT_WORKFLOW_MANAGER_HPC_BACKEND"] = "local"
    fault_world.code_server.env.pop("CCAT_WORKFLOW_MANAGER_PACKED_EXECUTION", None)


def _slurmctld_running() -> bool:
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30, check=False)
    return "UP" in ping.stdout


def _stop_slurmctld() -> None:
    pid = int(CTLD_PID_FILE.read_text().strip())
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _slurmctld_running():
        time.sleep(0.2)


def _start_slurmctld() -> None:
    if not _slurmctld_running():
        subprocess.run(["slurmctld"], capture_output=True, timeout=60, check=False)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not _slurmctld_running():
        time.sleep(0.5)


def worker_sigkill_slurm(world: FaultWorld, pipeline: str, outcome: Outcome, clock: Clock) -> None:
    world.arrive(pipeline)
    clock.fault()
    owner, running = world.kill_run_worker_mid_job(pipeline)
    assert all(a.hpc_backend == "slurm" for a in world.attempts(pipeline, "work"))
    world.wait_complete(pipeline)
    outcome.recovery_seconds = clock.since_fault()
    world.assert_adopted(pipeline, owner, running)
    world.measure(outcome, pipeline)


def scancel_outside(world: FaultWorld, pipeline: str, outcome: Outcome, clock: Clock) -> None:
    world.arrive(pipeline)
    running = world.wait_for("a work job running", lambda: world.running_attempts(pipeline), pipeline=pipeline)
    (victim,) = [a for a in world.attempts(pipeline, "work") if a.id in running]
    clock.fault()
    subprocess.run(["scancel", victim.hpc_job_id], check=True, timeout=30)
    world.wait_complete(pipeline)
    outcome.recovery_seconds = clock.since_fault()
    attempts = world.attempts(pipeline, "work")
    cancelled = next(a for a in attempts if a.id == victim.id)
    assert cancelled.status in (RunStatus.FAILED, RunStatus.CANCELLED), cancelled.error
    assert "cancel" in (cancelled.error or "").lower(), cancelled.error
    assert attempts[-1].status is RunStatus.COMPLETED and attempts[-1].sub_group_key == victim.sub_group_key
    world.measure(outcome, pipeline)


def oom_escalation(world: FaultWorld, pipeline: str, outcome: Outcome, clock: Clock) -> None:
    """The payload holds 1.4 GiB with 1 GiB requested: Slurm kills it (OverMemoryKill), the attempt is oom, the
    retry asks for 2 GiB (the step's request added once) and completes."""
    clock.fault()
    world.arrive(pipeline)
    world.wait_complete(pipeline)
    outcome.recovery_seconds = clock.since_fault()
    attempts = world.attempts(pipeline, "work")
    assert [(a.status, a.failure_kind) for a in attempts] == [
        (RunStatus.FAILED, FailureKind.OOM),
        (RunStatus.COMPLETED, None),
    ], [(a.status, a.failure_kind, a.error) for a in attempts]
    assert [sacct_limits(a.hpc_job_id)["ReqMem"] for a in attempts] == ["1G", "2G"]
    world.measure(outcome, pipeline)


def oom_cap(world: FaultWorld, pipeline: str, outcome: Outcome, clock: Clock) -> None:
    """The payload needs 2.6 GiB, more than the cap (CCAT_WORKFLOW_MANAGER_MAX_MEMORY_GB=2): the retry gets 2 GiB,
    fails oom again, and no attempt asks for more than the cap; the sub-group ends exhausted, saying why."""
    clock.fault()
    world.arrive(pipeline)
    (key,) = world.keys_of_packages(pipeline, {"scan": world.packages_of(pipeline)[0]}).values()

    def settled() -> bool:
        attempts = world.attempts(pipeline, "work")
        return (
            len(attempts) >= 2
            and all(a.status.is_terminal for a in attempts)
            and not world.runs(pipeline, list(world.active_statuses))
        )

    world.wait_for("both attempts to end", settled, timeout=240, pipeline=pipeline)
    outcome.recovery_seconds = clock.since_fault()
    attempts = world.attempts(pipeline, "work")
    assert [(a.status, a.failure_kind) for a in attempts] == [(RunStatus.FAILED, FailureKind.OOM)] * 2, [
        (a.status, a.failure_kind, a.error) for a in attempts
    ]
    assert [sacct_limits(a.hpc_job_id)["ReqMem"] for a in attempts] == ["1G", f"{MEMORY_CAP_GB}G"]
    assert world.readiness(pipeline, "work")[key] == "exhausted"
    violations = world.violations_of(pipeline)
    assert violations == [], violations
    outcome.note = f"stops at the cap ({MEMORY_CAP_GB} GiB): two attempts, the sub-group exhausted"


def walltime_escalation(world: FaultWorld, pipeline: str, outcome: Outcome, clock: Clock) -> None:
    """A 1-minute limit for work that needs 90 s: Slurm's pre-walltime SIGTERM (delivered into the bubblewrap
    sandbox) ends the payload, the attempt is walltime, the retry gets 2 minutes and completes. The payload reads
    its limit from WORKFLOW_TIME_LIMIT_SECONDS and, given enough, finishes at once."""
    clock.fault()
    world.arrive(pipeline)
    world.wait_complete(pipeline)
    outcome.recovery_seconds = clock.since_fault()
    attempts = world.attempts(pipeline, "work")
    assert [(a.status, a.failure_kind) for a in attempts] == [
        (RunStatus.FAILED, FailureKind.WALLTIME),
        (RunStatus.COMPLETED, None),
    ], [(a.status, a.failure_kind, a.error) for a in attempts]
    assert [sacct_limits(a.hpc_job_id)["Timelimit"] for a in attempts] == ["00:01:00", "00:02:00"]
    world.measure(outcome, pipeline)


def sacct_limits(job_id: str | None) -> dict[str, str]:
    """What Slurm's accounting says the job asked for (ReqMem, Timelimit).

    slurmdbd writes a job's record a moment after the job ends, and a record written before the job's
    limits reached it has them empty (seen: Timelimit ''): such an answer is asked again."""
    assert job_id
    deadline = time.monotonic() + 60
    while True:
        done = subprocess.run(
            ["sacct", "-j", job_id, "-X", "-n", "-P", "--format=ReqMem,Timelimit"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        rows = done.stdout.strip().splitlines()
        if (rows and all(rows[0].split("|"))) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert rows and all(rows[0].split("|")), f"sacct has no complete record of job {job_id} after 60 s: {rows}"
    req_mem, time_limit = rows[0].split("|")
    return {"ReqMem": req_mem, "Timelimit": time_limit}


SCENARIOS = {
    "walltime_escalation": walltime_escalation,
    "oom_escalation": oom_escalation,
    "oom_cap": oom_cap,
    "worker_sigkill_slurm": worker_sigkill_slurm,
    "scancel_outside": scancel_outside,
}


@pytest.fixture(scope="module")
def side_by_side(slurm_world):  # type: ignore[no-untyped-def]
    group = SideBySide(slurm_world, SCENARIOS)
    yield group
    group.join()


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_scenario(side_by_side, name):
    side_by_side.result(name)


def test_slurmctld_restarted_and_stopped_longer_than_a_poll_during_a_batch(slurm_world):
    def outage() -> None:
        try:
            _stop_slurmctld()
            _start_slurmctld()  # a restart
            time.sleep(2)
            _stop_slurmctld()
            time.sleep(8)  # the runner polls every second: several polls find no controller
        finally:
            _start_slurmctld()

    with record(slurm_world, "slurmctld_outage") as (pipeline, outcome):
        slurm_world.fault_while_jobs_run(pipeline, outcome, outage)


def test_ops_db_invariants_hold_after_every_scenario(slurm_world):
    """Last in the module: the scenarios above have ended (each test waited for its own)."""
    assert_invariants_hold(slurm_world)


# The pipelines this module's world is seeded with (tests/faults/conftest.py).
WORLD_SCENARIOS = (*SCENARIOS, "slurmctld_outage")
