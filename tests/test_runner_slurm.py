"""StepRunner on the real single-node Slurm (scripts/slurm-single-node.sh) with the bubblewrap runtime.

The CHAI calibrate step of the example pipeline for two scans, a scripted step where one sub-group of three
fails alone, and a cancelled batch whose Slurm job must be scancel'ed. Jobs are small; the node has 2 CPUs.
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Iterator

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from ccat_dagster.execution.hpc.slurm.backend import SlurmBackend
from ccat_dagster.execution.runner import OutcomeKind
from ccat_dagster.opsdb import models as m
from ccat_dagster.opsdb.enums import RunStatus
from ccat_dagster.pipelines.apply import apply_pipeline_spec
from ccat_dagster.pipelines.spec import load_pipeline_spec

from .conftest import require_slurm
from .dagster_fixtures import EXAMPLE, PIPELINE, archived_example_scan_keys, require_bwrap_and_numpy
from .runner_fixtures import (
    STEP,
    RunnerWorld,
    dispose_runner_world,
    make_runner_world,
    processes_mentioning,
    wait_until,
)
from .test_runner_failures import assert_nothing_registered, assert_path

pytestmark = [pytest.mark.slurm, pytest.mark.postgres, pytest.mark.bwrap]

# Job ends are seen within a second here (accounting is waited for by the backend itself); the production
# budget of scheduler calls is tested in test_slurm_polling.py.
POLL = {"poll_interval_seconds": 1.0, "min_poll_interval_seconds": 0.2, "scheduler_queries_per_minute": 600}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[RunnerWorld]:
    require_slurm()
    require_bwrap_and_numpy()
    # Paths go into #SBATCH lines, which accept only plain characters: a module-level directory.
    world = make_runner_world(tmp_path_factory.mktemp("slurm_runner"))
    with Session(world.engine) as session, session.begin():
        apply_pipeline_spec(session, load_pipeline_spec(EXAMPLE), source_path=EXAMPLE)
    yield world
    dispose_runner_world(world)


@pytest.fixture(scope="module")
def accounting_enabled() -> bool:
    config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, check=True).stdout
    return "accounting_storage/slurmdbd" in config


def _squeue_state(job_id: str) -> str:
    result = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, check=False)
    return result.stdout.strip()


def test_chai_calibrate_on_slurm_registers_products_and_accounting(world, accounting_enabled):
    # The example pipeline's own sub-groups (group_by [scan]), not the executed_obs_unit keys of world.apply().
    with Session(world.engine) as session:
        keys = sorted(archived_example_scan_keys(session))[:2]
    runner = world.runner(SlurmBackend(), **POLL)
    outcomes = runner.run(pipeline_name=PIPELINE, step_name="calibrate", sub_group_keys=keys, dagster_run_id="s-1")
    assert [o.kind for o in outcomes] == [OutcomeKind.COMPLETED] * 2, [o.detail for o in outcomes]
    attempts = world.attempts(PIPELINE)
    assert len({a.hpc_job_id for a in attempts}) == 2
    for attempt, outcome in zip(attempts, outcomes, strict=True):
        assert attempt.hpc_backend == "slurm" and attempt.hpc_job_id.isdigit()
        assert attempt.exit_code == 0 and attempt.wall_time_seconds is not None
        if accounting_enabled:
            assert attempt.cpu_hours is not None and attempt.cpu_hours > 0
        assert outcome.metadata["hpc_job_id"] == attempt.hpc_job_id
        assert_path(attempt, "staging_data", "submitted", "collecting_results", "completed")
        logs = os.listdir(attempt.attempt_dir + "/logs")
        assert f"slurm-{attempt.hpc_job_id}.out" in logs and "job.sbatch" in logs
    with Session(world.engine) as session:
        products = session.scalars(
            select(m.DataProduct).where(m.DataProduct.executed_reduction_step_id.in_([a.id for a in attempts]))
        ).all()
    assert sorted(p.relative_path.split(".", 1)[1] for p in products) == ["cal.f32", "cal.f32", "cal.json", "cal.json"]


def test_one_failing_sub_group_fails_alone_on_slurm(world, accounting_enabled):
    keys = world.scan_keys[:3]
    pipeline = world.apply(
        behaviour="ok", extra_config={"fail_keys": [keys[1]], "allocate_mb": 150, "hold_seconds": 2.5}
    )
    runner = world.runner(SlurmBackend(), **POLL)
    outcomes = runner.run(pipeline_name=pipeline, step_name=STEP, sub_group_keys=keys, dagster_run_id="s-2")
    assert [o.kind for o in outcomes] == [OutcomeKind.COMPLETED, OutcomeKind.FAILED, OutcomeKind.COMPLETED]
    ok_first, failed, ok_last = (world.attempts(pipeline, key)[0] for key in keys)
    assert failed.status is RunStatus.FAILED and failed.exit_code == 3
    assert failed.error.startswith("job failed with exit code 3") and "FATAL: calibration diverged" in failed.error
    assert_nothing_registered(world, [failed])
    for attempt in (ok_first, ok_last):
        assert attempt.status is RunStatus.COMPLETED and attempt.wall_time_seconds >= 2
        if accounting_enabled:  # Slurm samples memory once a second: the payload holds 150 MiB for 2.5 s
            assert attempt.peak_memory_gb is not None and attempt.peak_memory_gb > 0.1, attempt.peak_memory_gb
            assert attempt.cpu_hours is not None and attempt.cpu_hours > 0
    assert world.registered_counts([ok_first.id, ok_last.id])["products"] == 2


def test_cancelled_batch_scancels_its_slurm_job(world):
    pipeline = world.apply(behaviour="sleep", extra_config={"seconds": 300})
    runner = world.runner(SlurmBackend(), **POLL)
    outcomes: list = []
    thread = threading.Thread(
        target=lambda: outcomes.extend(
            runner.run(pipeline_name=pipeline, step_name=STEP, sub_group_keys=world.scan_keys[:1], dagster_run_id="s-3")
        ),
        daemon=True,
    )
    thread.start()
    running = wait_until(
        lambda: next((a for a in world.attempts(pipeline) if a.status is RunStatus.RUNNING), None),
        what="the Slurm job to run",
    )
    assert _squeue_state(running.hpc_job_id) == "RUNNING"
    runner.cancel()
    thread.join(60)
    assert not thread.is_alive() and [o.kind for o in outcomes] == [OutcomeKind.CANCELLED]
    (attempt,) = world.attempts(pipeline)
    assert attempt.status is RunStatus.CANCELLED and "the Dagster run was terminated" in attempt.error
    assert_path(attempt, "staging_data", "submitted", "cancelled")
    wait_until(
        lambda: _squeue_state(attempt.hpc_job_id) in ("", "CANCELLED"),
        what=f"squeue to stop listing job {attempt.hpc_job_id} as active",
        seconds=60,
    )
    assert SlurmBackend().status(attempt.hpc_job_id).state.value == "cancelled"
    wait_until(lambda: not processes_mentioning(attempt.attempt_dir), what="the container to be gone", seconds=30)
    assert_nothing_registered(world, [attempt])
