"""StepRunner failure paths end to end: real local backend, bubblewrap, local staging and PostgreSQL.

Each test checks what ops-db says afterwards: the attempt row (status, exit code, error text), its
RunStatusTransition audit rows, that nothing was registered for refused output, and that the staged raw
data the container saw is untouched.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from ccat_dagster.execution.hpc.base import JobSpec, JobState
from ccat_dagster.execution.hpc.local import LocalBackend
from ccat_dagster.execution.hpc.local_wrapper import status_path
from ccat_dagster.execution.runner import OutcomeKind
from ccat_dagster.opsdb import models as m
from ccat_dagster.opsdb.enums import RunStatus

from .dagster_fixtures import require_bwrap_and_numpy
from .runner_fixtures import (
    STEP,
    RunnerWorld,
    dispose_runner_world,
    make_runner_world,
    processes_mentioning,
    wait_until,
)

pytestmark = [pytest.mark.postgres, pytest.mark.bwrap]

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[RunnerWorld]:
    require_bwrap_and_numpy()
    world = make_runner_world(tmp_path_factory.mktemp("runner"))
    yield world
    dispose_runner_world(world)


@pytest.fixture
def keys(world) -> list[str]:
    return world.scan_keys[:2]


def transitions_of(attempt: m.ExecutedReductionStep) -> list[str]:
    """The audit trail, checked to be a chain (each row starts where the previous ended)."""
    rows = sorted(attempt.transitions, key=lambda t: (t.at, t.id))
    previous = RunStatus.PENDING
    for row in rows:
        assert row.from_status is previous, f"transition {row.from_status} → {row.to_status} after {previous}"
        previous = row.to_status
    assert previous is attempt.status
    return [row.to_status.value for row in rows]


def assert_path(attempt: m.ExecutedReductionStep, *expected: str) -> None:
    """``expected`` without ``running``: a job that ends between two polls may skip it."""
    seen = transitions_of(attempt)
    assert [s for s in seen if s != "running"] == list(expected), seen


def assert_nothing_registered(world: RunnerWorld, attempts: Sequence[m.ExecutedReductionStep]) -> None:
    counts = world.registered_counts([a.id for a in attempts])
    # The input lineage is written when the attempt is created: one row per scan package, never more.
    assert counts == {"products": 0, "copies": 0, "input_lineage": len(attempts)}, counts


def run(world: RunnerWorld, pipeline: str, keys: list[str], *, runner=None, run_id: str = "run-1"):
    runner = runner or world.runner()
    return runner.run(pipeline_name=pipeline, step_name=STEP, sub_group_keys=keys, dagster_run_id=run_id)


class RecordingBackend(LocalBackend):
    """The real local backend, remembering every JobSpec it was given."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.specs: list[JobSpec] = []

    def submit_many(self, specs: Sequence[JobSpec]) -> list[str]:
        self.specs.extend(specs)
        return super().submit_many(specs)


class TerminatedByDagster(BaseException):
    """Stands in for Dagster's run-termination interrupt (a BaseException raised inside the asset body)."""


def test_happy_path_registers_products(world, keys):
    pipeline = world.apply(behaviour="ok")
    outcomes = run(world, pipeline, keys)
    assert [o.kind for o in outcomes] == [OutcomeKind.COMPLETED] * 2
    attempts = world.attempts(pipeline)
    for attempt in attempts:
        assert attempt.exit_code == 0 and attempt.error is None and attempt.wall_time_seconds > 0
        assert_path(attempt, "staging_data", "submitted", "collecting_results", "completed")
    assert world.registered_counts([a.id for a in attempts]) == {"products": 2, "copies": 2, "input_lineage": 2}


@pytest.mark.parametrize(
    ("behaviour", "message"),
    [
        ("write_input", "Read-only file system: '/workflow/input/"),
        ("write_root", "Read-only file system: '/workflow/sneaky.txt'"),
    ],
)
def test_writing_outside_the_output_fails_and_leaves_the_staged_input_untouched(world, keys, behaviour, message):
    pipeline = world.apply(behaviour=behaviour)
    run(world, world.apply(behaviour="ok"), keys)  # stage first, so the snapshot covers what the container sees
    before = world.staged_snapshot()
    assert before
    outcomes = run(world, pipeline, keys)
    assert [o.kind for o in outcomes] == [OutcomeKind.FAILED] * 2
    attempts = world.attempts(pipeline)
    for attempt in attempts:
        assert attempt.status is RunStatus.FAILED and attempt.exit_code == 1
        assert "job failed with exit code 1" in attempt.error and message in attempt.error
        assert_path(attempt, "staging_data", "submitted", "failed")
    assert_nothing_registered(world, attempts)
    assert world.staged_snapshot() == before
    assert not list(world.data_dir.rglob("sneaky.txt"))


@pytest.mark.parametrize(
    ("behaviour", "problem"),
    [
        ("symlink_out", "science/manifest-link.json: symbolic link to '/workflow/config/manifest.json'"),
        ("fifo", "science/pipe: named pipe (FIFO)"),
        ("empty", "the final step wrote no file"),
    ],
)
def test_output_breaking_the_contract_is_refused_and_nothing_is_registered(world, keys, behaviour, problem):
    pipeline = world.apply(behaviour=behaviour)
    run(world, world.apply(behaviour="ok"), keys)  # stage first, whatever ran before in this module
    before = world.staged_snapshot()
    assert before
    outcomes = run(world, pipeline, keys)
    assert [o.kind for o in outcomes] == [OutcomeKind.FAILED] * 2
    attempts = world.attempts(pipeline)
    for attempt, outcome in zip(attempts, outcomes, strict=True):
        assert attempt.status is RunStatus.FAILED and attempt.exit_code == 0
        assert attempt.error.startswith("output collection refused: ")
        assert "nothing of this attempt may be registered" in attempt.error and problem in attempt.error
        assert outcome.detail == attempt.error
        assert_path(attempt, "staging_data", "submitted", "collecting_results", "failed")
    assert_nothing_registered(world, attempts)
    assert world.staged_snapshot() == before


def test_non_zero_exit_fails_with_the_exit_code_and_the_log_tail(world, keys):
    pipeline = world.apply(behaviour="exit3")
    run(world, pipeline, keys[:1])
    (attempt,) = world.attempts(pipeline)
    assert attempt.status is RunStatus.FAILED and attempt.exit_code == 3
    assert attempt.error.startswith("job failed with exit code 3\n--- last log lines ---\n"), attempt.error[:200]
    assert "FATAL: calibration diverged" in attempt.error and "progress line 39" in attempt.error
    assert "progress line 0\n" not in attempt.error  # a tail, not the whole log
    assert_path(attempt, "staging_data", "submitted", "failed")
    assert_nothing_registered(world, [attempt])


def test_job_killed_with_137_says_killed_or_out_of_memory(world, keys):
    pipeline = world.apply(behaviour="sigkill")
    outcomes = run(world, pipeline, keys[:1])
    (attempt,) = world.attempts(pipeline)
    assert attempt.status is RunStatus.FAILED and attempt.exit_code == 137
    assert "killed" in attempt.error and "out of memory" in attempt.error
    assert "allocating a very large cube" in attempt.error
    assert outcomes[0].detail == attempt.error
    assert_nothing_registered(world, [attempt])


def test_exit_137_without_oom_evidence_is_retried_unchanged(world, keys):
    """A payload that exits 137 with no sign of the kernel's OOM killer is a signal, not oom: the retry asks for the
    same memory. Memory escalation after a real oom is covered by the loop tests and by the local backend's
    memory-cgroup test (the evidence it classifies by)."""
    pipeline = world.apply(behaviour="oom_once", max_retries=2, resources={"memory_gb": 1.5})
    backend = RecordingBackend(state_dir=world.base_dir / ".local-jobs", max_concurrent_jobs=2)
    (outcome,) = run(world, pipeline, keys[:1], runner=world.runner(backend))
    assert outcome.kind is OutcomeKind.COMPLETED and outcome.attempts == 2
    first, second = world.attempts(pipeline)
    assert (first.attempt, first.retry_count, first.status, first.exit_code) == (1, 0, RunStatus.FAILED, 137)
    assert first.failure_kind is not None and first.failure_kind.value in ("signal", "exit_code")
    assert (second.attempt, second.retry_count, second.status) == (2, 1, RunStatus.COMPLETED)
    assert first.hpc_job_id != second.hpc_job_id and first.dagster_run_id == second.dagster_run_id
    assert_path(first, "staging_data", "submitted", "failed")
    assert_path(second, "staging_data", "submitted", "collecting_results", "completed")
    assert [s.resources.memory_gb for s in backend.specs] == [1.5, 1.5]
    assert [s.resources.time_hours for s in backend.specs] == [1.0, 1.0]
    assert world.registered_counts([first.id])["products"] == 0
    assert world.registered_counts([second.id])["products"] == 1


@pytest.mark.parametrize("warning", [False, True], ids=["hard-limit", "pre-walltime-warning"])
def test_attempt_over_its_time_limit_is_retried_with_more_time(world, keys, warning):
    limit_hours = 2 / 3600
    pipeline = world.apply(behaviour="timeout_once", max_retries=1, resources={"time_hours": limit_hours})
    backend = RecordingBackend(state_dir=world.base_dir / ".local-jobs", max_concurrent_jobs=2, kill_grace_seconds=1)
    runner = world.runner(backend, pre_walltime_signal_seconds=1 if warning else 0)
    (outcome,) = run(world, pipeline, keys[:1], runner=runner)
    assert outcome.kind is OutcomeKind.COMPLETED
    first, second = world.attempts(pipeline)
    assert first.status is RunStatus.FAILED and "time limit" in first.error, first.error
    assert second.status is RunStatus.COMPLETED and second.retry_count == 1
    assert [s.resources.time_hours for s in backend.specs] == [limit_hours, 2 * limit_hours]
    assert [s.resources.memory_gb for s in backend.specs] == [1.0, 1.0]


def test_retries_stop_at_max_retries(world, keys):
    pipeline = world.apply(behaviour="exit3", max_retries=1)
    (outcome,) = run(world, pipeline, keys[:1])
    assert outcome.kind is OutcomeKind.FAILED
    attempts = world.attempts(pipeline)
    assert [(a.attempt, a.retry_count, a.status) for a in attempts] == [
        (1, 0, RunStatus.FAILED),
        (2, 1, RunStatus.FAILED),
    ]
    assert outcome.attempt_id == attempts[-1].id
    assert_nothing_registered(world, attempts)


def test_one_failing_sub_group_fails_alone(world, keys):
    pipeline = world.apply(behaviour="ok", extra_config={"fail_keys": [keys[0]]})
    outcomes = run(world, pipeline, keys)
    assert [o.kind for o in outcomes] == [OutcomeKind.FAILED, OutcomeKind.COMPLETED]
    failed, completed = (world.attempts(pipeline, key)[0] for key in keys)
    assert failed.status is RunStatus.FAILED and completed.status is RunStatus.COMPLETED
    assert world.registered_counts([completed.id])["products"] == 1


def test_refused_output_in_a_collection_round_rolls_back_only_its_sub_group(world):
    """Sub-groups that end in the same poll are registered in one transaction, each in its own savepoint."""
    keys = world.scan_keys[:3]
    assert len(keys) == 3
    pipeline = world.apply(behaviour="ok", extra_config={"fail_keys": [keys[1]], "fail_behaviour": "fifo"})
    # A first poll after all three jobs have ended: one collection round for the three.
    runner = world.runner(min_poll_interval_seconds=3.0, poll_interval_seconds=3.0)
    outcomes = run(world, pipeline, keys, runner=runner)
    assert [o.kind for o in outcomes] == [OutcomeKind.COMPLETED, OutcomeKind.FAILED, OutcomeKind.COMPLETED]
    first, refused, last = (world.attempts(pipeline, key)[0] for key in keys)
    assert first.status is RunStatus.COMPLETED and last.status is RunStatus.COMPLETED
    assert refused.status is RunStatus.FAILED and refused.error.startswith("output collection refused: ")
    assert_path(refused, "staging_data", "submitted", "collecting_results", "failed")
    assert_nothing_registered(world, [refused])
    assert world.registered_counts([first.id, last.id])["products"] == 2
    # Lineage aggregates were written for the completed attempts of the round, not for the refused one.
    with Session(world.engine) as session:
        totals = set(session.scalars(select(m.RunLineageTotal.executed_reduction_step_id)))
    assert {first.id, last.id} <= totals and refused.id not in totals


# ---------------------------------------------------------------- cancellation


def _job_process_group(world: RunnerWorld, job_id: str) -> int | None:
    try:
        status = json.loads(status_path(world.base_dir / ".local-jobs", job_id).read_text())
    except (OSError, ValueError):
        return None
    return status.get("pgid")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _running_attempt(world: RunnerWorld, pipeline: str) -> m.ExecutedReductionStep:
    def running():
        attempts = world.attempts(pipeline)
        return attempts[0] if attempts and attempts[0].status is RunStatus.RUNNING else None

    return wait_until(running, what="the attempt to be running")


def _assert_cancelled_and_gone(world: RunnerWorld, pipeline: str, pgid: int, attempt_dir: str) -> None:
    (attempt,) = world.attempts(pipeline)
    assert attempt.status is RunStatus.CANCELLED and "the Dagster run was terminated" in attempt.error
    assert_path(attempt, "staging_data", "submitted", "cancelled")
    wait_until(lambda: not _group_alive(pgid), what=f"process group {pgid} to be gone", seconds=15)
    wait_until(lambda: not processes_mentioning(attempt_dir), what="the container to be gone", seconds=15)
    assert_nothing_registered(world, [attempt])


@pytest.mark.parametrize("how", ["cancel", "base-exception"])
def test_run_termination_cancels_the_job_and_marks_the_attempt_cancelled(world, keys, how):
    pipeline = world.apply(behaviour="sleep", extra_config={"seconds": 120})
    outcomes: list = []
    errors: list[BaseException] = []
    runner = world.runner()
    if how == "base-exception":
        poll = runner._poll
        state = {"interrupt": False}

        def interrupting_poll(active):
            if state["interrupt"]:
                raise TerminatedByDagster()
            return poll(active)

        runner._poll = interrupting_poll  # type: ignore[method-assign]

    def target():
        try:
            outcomes.extend(run(world, pipeline, keys[:1], runner=runner))
        except BaseException as error:  # noqa: BLE001 - the test inspects it
            errors.append(error)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    attempt = _running_attempt(world, pipeline)
    pgid = wait_until(lambda: _job_process_group(world, attempt.hpc_job_id), what="the job's process group")
    assert _group_alive(pgid)
    if how == "cancel":
        runner.cancel()
    else:
        state["interrupt"] = True
    thread.join(30)
    assert not thread.is_alive()
    if how == "cancel":
        assert not errors and [o.kind for o in outcomes] == [OutcomeKind.CANCELLED]
    else:
        assert len(errors) == 1 and isinstance(errors[0], TerminatedByDagster)
    _assert_cancelled_and_gone(world, pipeline, pgid, attempt.attempt_dir)
    status = world.local_backend().status(attempt.hpc_job_id)
    assert status.state in (JobState.CANCELLED, JobState.FAILED)


# ---------------------------------------------------------------- reattach after a restart

_CHILD = """
import json, sys
from pathlib import Path
from ccat_dagster.execution.hpc.local import LocalBackend
from ccat_dagster.execution.hpc.local_wrapper import status_path
from ccat_dagster.execution.runner import RunnerConfig, StepRunner
from ccat_dagster.execution.runtimes import BubblewrapRuntime
from ccat_dagster.execution.staging import LocalStager
from ccat_dagster.opsdb.engine import make_engine
a = json.loads(sys.argv[1])
base = Path(a["base_dir"])
StepRunner(
    engine=make_engine(a["url"]),
    backend=LocalBackend(state_dir=base / ".local-jobs", max_concurrent_jobs=2),
    runtime=BubblewrapRuntime(),
    stager=LocalStager(),
    config=RunnerConfig(
        pipeline_base_dir=base,
        processing_location_id=a["location"],
        sif_cache_dir=base / "sif",
        poll_interval_seconds=3600,  # it polls once right after submitting, then is killed while waiting
    ),
).run(pipeline_name=a["pipeline"], step_name=a["step"], sub_group_keys=a["keys"], dagster_run_id=a["run_id"])
"""


def _runner_that_dies(world: RunnerWorld, pipeline: str, keys: list[str], run_id: str) -> m.ExecutedReductionStep:
    """Start a runner in another process, let it submit, then kill it with SIGKILL: no cleanup runs."""
    args = {
        "url": world.url,
        "base_dir": str(world.base_dir),
        "location": world.processing_location_id,
        "pipeline": pipeline,
        "step": STEP,
        "keys": keys,
        "run_id": run_id,
    }
    child = subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(args)], cwd=REPO)

    def submitted() -> m.ExecutedReductionStep | None:
        attempt = next((a for a in world.attempts(pipeline) if a.hpc_job_id), None)
        if attempt is None and child.poll() is not None:
            raise AssertionError(f"the first runner exited with {child.returncode} before submitting (see stderr)")
        return attempt

    try:
        attempt = wait_until(submitted, what="the first runner to submit")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    return attempt


@pytest.mark.parametrize(
    ("case", "second_run_id"),
    [("still-running", "run-1"), ("still-running", "run-2-retry"), ("finished-unwatched", "run-1")],
)
def test_a_restarted_runner_adopts_the_job_instead_of_submitting_again(world, keys, case, second_run_id):
    pipeline = world.apply(behaviour="sleep", extra_config={"seconds": 4 if case == "still-running" else 0.5})
    submitted = _runner_that_dies(world, pipeline, keys[:1], "run-1")
    backend = world.local_backend()
    if case == "finished-unwatched":
        wait_until(lambda: backend.status(submitted.hpc_job_id).is_terminal, what="the job to finish")
    else:
        assert not backend.status(submitted.hpc_job_id).is_terminal
    world.reports.clear()
    runner = world.runner(backend)
    runner.is_run_alive = lambda run_id: False  # run-1's process is gone
    (outcome,) = run(world, pipeline, keys[:1], runner=runner, run_id=second_run_id)
    assert outcome.kind is OutcomeKind.COMPLETED, outcome.detail
    (attempt,) = world.attempts(pipeline)
    assert attempt.id == submitted.id and attempt.hpc_job_id == submitted.hpc_job_id
    assert attempt.status is RunStatus.COMPLETED and attempt.dagster_run_id == second_run_id
    assert_path(attempt, "staging_data", "submitted", "collecting_results", "completed")
    assert any(f"reattached to local job {submitted.hpc_job_id}" in line for line in world.reports)
    assert not any(line.startswith("submitted ") for line in world.reports)
    assert world.registered_counts([attempt.id])["products"] == 1


def test_a_job_owned_by_a_live_run_is_not_adopted(world, keys):
    pipeline = world.apply(behaviour="sleep", extra_config={"seconds": 3})
    submitted = _runner_that_dies(world, pipeline, keys[:1], "run-1")
    runner = world.runner()
    runner.is_run_alive = lambda run_id: run_id == "run-1"
    (outcome,) = run(world, pipeline, keys[:1], runner=runner, run_id="run-2")
    assert outcome.kind is OutcomeKind.SKIPPED and "in flight in another run" in outcome.detail
    (attempt,) = world.attempts(pipeline)
    assert attempt.id == submitted.id and attempt.dagster_run_id == "run-1"
    world.local_backend().cancel(submitted.hpc_job_id)
