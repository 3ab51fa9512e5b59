"""Faults on the real single-node Slurm (scripts/slurm-single-node.sh): the code server switches to the Slurm
backend for this module (a restart, as an operator changing CCAT_WORKFLOW_MANAGER_HPC_BACKEND would do).

Other engineers' tests use the same Slurm: outages are kept to seconds and slurmctld is always started again.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from ccat_dagster.opsdb.enums import RunStatus

from .conftest import Clock, record

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.bwrap, pytest.mark.slurm]

CTLD_PID_FILE = Path("/run/slurmctld.pid")


def _require_slurm() -> None:
    if shutil.which("scontrol") is None or shutil.which("slurmctld") is None:
        message = "Slurm is not installed: run scripts/slurm-single-node.sh as root"
    else:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30, check=False)
        if "UP" in ping.stdout:
            return
        message = f"slurmctld does not answer ({ping.stdout.strip()})"
    if os.environ.get("CI") or os.environ.get("CCAT_REQUIRE_ALL_BACKENDS"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def slurm_world(fault_world):  # type: ignore[no-untyped-def]
    _require_slurm()
    fault_world.code_server.env["CCAT_WORKFLOW_MANAGER_HPC_BACKEND"] = "slurm"
    fault_world.code_server.restart()
    fault_world.wait_for_code_server()
    yield fault_world
    fault_world.code_server.env["CCAT_WORKFLOW_MANAGER_HPC_BACKEND"] = "local"


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


def test_run_worker_sigkill_mid_job_on_slurm(slurm_world):
    world = slurm_world
    with record(world, "worker_sigkill_slurm") as (pipeline, outcome):
        clock = Clock()
        world.arrive(pipeline)
        clock.fault()
        owner, running = world.kill_run_worker_mid_job(pipeline)
        assert all(a.hpc_backend == "slurm" for a in world.attempts(pipeline, "work"))
        world.wait_complete(pipeline)
        outcome.recovery_seconds = clock.since_fault()
        world.assert_adopted(pipeline, owner, running)
        world.measure(outcome, pipeline)


def test_a_job_scancelled_from_outside_is_retried(slurm_world):
    world = slurm_world
    with record(world, "scancel_outside") as (pipeline, outcome):
        world.arrive(pipeline)
        running = world.wait_for("a work job running", lambda: world.running_attempts(pipeline), pipeline=pipeline)
        (victim,) = [a for a in world.attempts(pipeline, "work") if a.id in running]
        fault = time.monotonic()
        subprocess.run(["scancel", victim.hpc_job_id], check=True, timeout=30)
        world.wait_complete(pipeline)
        outcome.recovery_seconds = time.monotonic() - fault
        attempts = world.attempts(pipeline, "work")
        cancelled = next(a for a in attempts if a.id == victim.id)
        assert cancelled.status in (RunStatus.FAILED, RunStatus.CANCELLED), cancelled.error
        assert "cancel" in (cancelled.error or "").lower(), cancelled.error
        assert attempts[-1].status is RunStatus.COMPLETED and attempts[-1].sub_group_key == victim.sub_group_key
        world.measure(outcome, pipeline)


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
