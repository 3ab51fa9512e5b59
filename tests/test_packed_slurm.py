"""Packed execution on the real single-node Slurm: Parsl's HighThroughputExecutor on a SlurmProvider.

Sub-groups run as tasks inside one allocation through the real StepRunner (in-memory attempt store; real
containers, staging and ops-db run packed in test_packed_chai.py): one failing sub-group fails alone and is retried,
each has its own exit code, wall time and peak memory, all in one allocation; a second batch on the same engine
is cancelled while its tasks run and they end; closing releases the allocation. Then a run worker killed with
SIGKILL in the middle of a batch: a new backend collects the task whose result was written and reports the
unfinished one lost (its allocation ends by the heartbeat threshold; the test scancels it rather than wait).
A task over its memory: the watchdog ends it as oom and its retry, asking for twice the memory, runs in an
allocation sized for it. Last, an allocation ended under its running task as Slurm ends one at its walltime
(scancel: SIGTERM to its processes, SIGKILL after KillWait; a real 1-minute walltime behaves the same but takes
a minute): the task is lost, not cancelled, its retries stay within max_retries, the batch asks for no more
allocations than PACKED_ALLOCATIONS_PER_BATCH, and none is left behind.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from ccat_dagster.execution import contract
from ccat_dagster.execution.attempts import InMemoryAttemptStore
from ccat_dagster.execution.hpc.base import JobSpec, JobState
from ccat_dagster.execution.hpc.packed.backend import PackedBackend
from ccat_dagster.execution.hpc.packed.engine import ParslEngine, PilotSettings
from ccat_dagster.execution.runner import OutcomeKind, RunnerConfig, StepRunner
from ccat_dagster.opsdb.enums import FailureKind, RunStatus

from .loop_fakes import STEP, FakePreparation, plan

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
SMALL = STEP.__class__(**{**STEP.__dict__, "resources": STEP.resources.__class__(cpu=1, memory_gb=0.5, time_hours=0.1)})


def _require_slurm_and_parsl() -> None:
    required = bool(os.environ.get("CI") or os.environ.get("CCAT_REQUIRE_ALL_BACKENDS"))
    problems = []
    if shutil.which("sinfo") is None:
        problems.append("Slurm client commands not installed (run scripts/slurm-single-node.sh as root)")
    try:
        import parsl  # noqa: F401
    except ImportError:
        problems.append("Parsl not installed (pip install -e '.[dev]')")
    if problems:
        if required:
            pytest.fail("; ".join(problems))
        pytest.skip("; ".join(problems))


def settings(tmp_path: Path) -> PilotSettings:
    return PilotSettings(
        max_allocations=1,
        cores_per_allocation=2,
        walltime_minutes=10,
        idle_seconds=30,
        address="127.0.0.1",
        run_dir=tmp_path / "runinfo",
    )


@dataclass
class ScriptPreparation(FakePreparation):
    """``fail-once`` exits 3 on its first attempt, ``long-*`` sleeps 60 s, the others print and exit 0."""

    base: Path = Path("/nonexistent")

    def layout(self, sub_group_key, attempt_id):
        return contract.attempt_layout(
            base_dir=self.base,
            pipeline="p",
            sub_group_key=sub_group_key,
            step="reduce",
            attempt_id=attempt_id,
            is_final=True,
        )

    def prepare(self, plan, attempt, *, resources, staged, run_id):
        key = plan.sub_group_key
        marker = self.base / f"{key}.tried"
        if key.startswith("long"):
            command = ["/bin/sleep", "60"]
        else:
            script = f"if [ ! -e {marker} ] && [ {key} = fail-once ]; then touch {marker}; exit 3; fi; echo {key}"
            command = ["/bin/sh", "-c", script]
        return JobSpec(
            command=command,
            resources=resources,
            env={},
            job_name=f"a{attempt.attempt_id}",
            log_dir=self.layout(key, attempt.attempt_id).attempt_dir / "logs",
        )


def runner_for(tmp_path: Path, backend: PackedBackend, store: InMemoryAttemptStore) -> StepRunner:
    return StepRunner(
        engine=None,
        backend=backend,
        runtime=None,
        stager=None,
        config=RunnerConfig(
            pipeline_base_dir=tmp_path,
            processing_location_id=0,
            sif_cache_dir=tmp_path,
            max_in_flight=50,
        ),
        store=store,
        preparation=ScriptPreparation(base=tmp_path),
    )


def still_queued(job_ids: list[str]) -> list[str]:
    if not job_ids:
        return []
    out = subprocess.run(
        ["squeue", "--noheader", f"--jobs={','.join(job_ids)}", "--format=%i"], capture_output=True, text=True
    ).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


def wait_released(job_ids: list[str], seconds: float) -> list[str]:
    deadline = time.monotonic() + seconds
    while (left := still_queued(job_ids)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def test_packed_sub_groups_fail_alone_retry_share_one_allocation_and_cancel(tmp_path):
    """One engine for two batches (as the allocation outlives a batch until its idle timeout): the first completes
    with one retried failure, the second is cancelled while its tasks run; closing releases the allocation."""
    _require_slurm_and_parsl()
    engine = ParslEngine(settings(tmp_path))
    backend = PackedBackend(tmp_path / "tasks", engine, max_task_hours=10 / 60, kill_grace_seconds=1)
    store = InMemoryAttemptStore()
    keys = [f"scan-{i}" for i in range(7)] + ["fail-once"]
    try:
        outcomes = runner_for(tmp_path, backend, store).execute(
            step=SMALL, plans=[plan(k) for k in keys], dagster_run_id="run-1"
        )
        assert {k: o.kind for k, o in outcomes.items()} == {k: OutcomeKind.COMPLETED for k in keys}, outcomes
        first, second = store.attempts_of("fail-once")
        assert (first.status, first.failure_kind) == (RunStatus.FAILED, FailureKind.EXIT_CODE)
        assert second.status is RunStatus.COMPLETED
        for key in keys:
            assert outcomes[key].metadata["peak_memory_gb"] > 0 and outcomes[key].metadata["wall_time_seconds"] >= 0
        assert "scan-3" in backend.logs(outcomes["scan-3"].metadata["hpc_job_id"])
        assert len(engine.allocation_ids()) == 1, engine.allocation_ids()  # nine tasks, one allocation

        runner = runner_for(tmp_path, backend, store)
        cancelled: dict = {}
        thread = threading.Thread(
            target=lambda: cancelled.update(
                runner.execute(step=SMALL, plans=[plan("long-1"), plan("long-2")], dagster_run_id="run-c")
            )
        )
        thread.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all(
            rows and rows[0].status is RunStatus.RUNNING
            for rows in (store.attempts_of("long-1"), store.attempts_of("long-2"))
        ):
            time.sleep(0.2)
        runner.cancel()
        thread.join(timeout=30)
        assert not thread.is_alive() and {o.kind for o in cancelled.values()} == {OutcomeKind.CANCELLED}
        job_ids = [store.attempts_of(k)[0].job_id for k in ("long-1", "long-2")]
        assert {backend.status(j).state for j in job_ids} == {JobState.CANCELLED}
        # The wrappers in the allocation see the cancel markers and end their payloads (sleep 60) within seconds.
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not all(
            read_status(tmp_path, j).get("cancel_requested") for j in job_ids
        ):
            time.sleep(0.2)
        assert all(read_status(tmp_path, j).get("cancel_requested") for j in job_ids), "the payloads were not ended"
    finally:
        backend.close()
    assert wait_released(engine.allocation_ids(), 15) == []


def read_status(tmp_path: Path, job_id: str) -> dict:
    import json

    return json.loads((tmp_path / "tasks" / f"{job_id}.json").read_text())


WORKER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from ccat_dagster.execution.hpc.base import JobResources, JobSpec
    from ccat_dagster.execution.hpc.packed.backend import PackedBackend
    from ccat_dagster.execution.hpc.packed.engine import ParslEngine, PilotSettings
    base = Path(sys.argv[1])
    engine = ParslEngine(PilotSettings(max_allocations=1, cores_per_allocation=2, walltime_minutes=10,
                                       idle_seconds=30, address="127.0.0.1", run_dir=base / "runinfo"))
    backend = PackedBackend(base / "tasks", engine, max_task_hours=0.1)
    def spec(name, command):
        return JobSpec(command=command, resources=JobResources(cpu=1, memory_gb=0.5, time_hours=0.1), env={},
                       job_name=name, log_dir=base / name)
    quick = backend.submit(spec("quick", ["/bin/sh", "-c", "echo written"]))
    slow = backend.submit(spec("slow", ["/bin/sleep", "60"]))
    while not backend.status(quick).is_terminal or backend.status(slow).state.value != "running":
        time.sleep(0.2)
    print(quick, slow, *engine.allocation_ids(), flush=True)
    time.sleep(600)  # killed here, in the middle of the batch
    """
)


def test_a_killed_run_worker_loses_no_written_result_and_its_unfinished_task_is_lost(tmp_path):
    _require_slurm_and_parsl()
    worker = subprocess.Popen(
        [sys.executable, "-c", WORKER, str(tmp_path)], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        line = worker.stdout.readline().split()
        assert len(line) >= 3, f"the worker did not get its tasks running: {line}"
        quick, slow, *allocations = line
    finally:
        os.killpg(worker.pid, 9)  # the run worker and its interchange, as an OOM kill of the run would
        worker.wait()
    restarted = PackedBackend(tmp_path / "tasks", ParslEngine(settings(tmp_path)), max_task_hours=0.1)
    infos = restarted.status_many([quick, slow])
    assert infos[quick].state is JobState.COMPLETED and "written" in restarted.logs(quick)
    assert (infos[slow].state, infos[slow].failure_kind) == (JobState.FAILED, FailureKind.LOST)
    # Its workers lose the interchange and end within the heartbeat threshold (about 25 s), and the allocation
    # with them; the test does not wait for that: it releases the allocation it made.
    subprocess.run(["scancel", *allocations], check=False)


@dataclass
class EndedOncePreparation(ScriptPreparation):
    """``ended-once`` sleeps 60 s on its first attempt (its allocation is ended under it), else prints."""

    def prepare(self, plan, attempt, *, resources, staged, run_id):
        spec = super().prepare(plan, attempt, resources=resources, staged=staged, run_id=run_id)
        marker = self.base / "ended-once.tried"
        script = f"if [ ! -e {marker} ]; then touch {marker}; exec sleep 60; fi; echo second"
        return JobSpec(**{**spec.__dict__, "command": ["/bin/sh", "-c", script]})


def end_allocation_under_running_task(tmp_path: Path, allocations_per_batch: int):
    """One batch, one task; its allocation is ended as Slurm ends one at its walltime (SIGTERM to every process
    of the job, SIGKILL after KillWait) while the task runs. Returns the outcome, the attempts, the allocations."""
    engine = ParslEngine(
        PilotSettings(
            **{
                **settings(tmp_path).__dict__,
                "allocations_per_batch": allocations_per_batch,
                "status_poll_seconds": 3,
            }
        )
    )
    backend = PackedBackend(tmp_path / "tasks", engine, max_task_hours=10 / 60, kill_grace_seconds=1)
    store = InMemoryAttemptStore()
    runner = runner_for(tmp_path, backend, store)
    runner.preparation = EndedOncePreparation(base=tmp_path)
    outcomes: dict = {}
    thread = threading.Thread(
        target=lambda: outcomes.update(runner.execute(step=SMALL, plans=[plan("ended-once")], dagster_run_id="r"))
    )
    try:
        thread.start()
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and not (
            (rows := store.attempts_of("ended-once")) and rows[0].status is RunStatus.RUNNING
        ):
            time.sleep(0.2)
        (first_allocation,) = engine.allocation_ids()
        subprocess.run(["scancel", first_allocation], check=True)
        thread.join(timeout=60)
        assert not thread.is_alive(), "the batch did not end"
    finally:
        runner.cancel()
        thread.join(timeout=30)
        backend.close()
    return outcomes["ended-once"], store.attempts_of("ended-once"), engine.allocation_ids()


def test_a_task_whose_allocation_ends_under_it_is_lost_retried_and_the_allocations_stay_bounded(tmp_path):
    """Allowed two allocations: the task ended with its allocation is lost (not cancelled: nobody here cancelled
    it), and retried within max_retries; a retry sent before the dead allocation's workers are written off (the
    heartbeat threshold) is lost too. The last one runs in the second allocation and completes; nothing else is
    asked for, nothing is left."""
    _require_slurm_and_parsl()
    outcome, attempts, allocations = end_allocation_under_running_task(tmp_path, allocations_per_batch=2)
    described = [(a.status, a.failure_kind, a.error) for a in attempts]
    assert outcome.kind is OutcomeKind.COMPLETED, described
    *lost, last = attempts
    assert 1 <= len(lost) <= SMALL.max_retries, described
    assert all((a.status, a.failure_kind) == (RunStatus.FAILED, FailureKind.LOST) for a in lost), described
    assert "allocation ended" in (lost[0].error or ""), described
    assert last.status is RunStatus.COMPLETED
    assert len(allocations) == 2, allocations
    assert wait_released(allocations, 15) == []


def test_a_batch_that_spent_its_allocations_fails_its_task_instead_of_asking_for_more(tmp_path):
    """Allowed one allocation, which ends under the task: the retry can never run, so it fails with the reason
    (lost), the next retry is refused, the batch ends, and Slurm was asked for one allocation only."""
    _require_slurm_and_parsl()
    outcome, attempts, allocations = end_allocation_under_running_task(tmp_path, allocations_per_batch=1)
    assert outcome.kind is not OutcomeKind.COMPLETED, outcome
    assert len(attempts) <= 1 + SMALL.max_retries, attempts
    assert attempts[0].failure_kind is FailureKind.LOST
    assert any("used all 1 Slurm allocations" in (a.error or "") for a in attempts[1:]), [a.error for a in attempts]
    assert len(allocations) == 1, allocations
    assert wait_released(allocations, 15) == []


@dataclass
class HungryPreparation(ScriptPreparation):
    """``hungry`` holds 150 MiB for two seconds: over a 0.1 GiB task, within the 0.2 GiB of its retry."""

    def prepare(self, plan, attempt, *, resources, staged, run_id):
        spec = super().prepare(plan, attempt, resources=resources, staged=staged, run_id=run_id)
        if plan.sub_group_key != "hungry":
            return spec
        hold = "import time; block = bytearray(150 * 2**20); time.sleep(2)"
        return JobSpec(**{**spec.__dict__, "command": [sys.executable, "-c", hold]})


def test_a_task_over_its_memory_is_retried_with_more_in_an_allocation_sized_for_it(tmp_path):
    """The retry after oom asks for twice the memory: Parsl runs it in an allocation of that shape of its own,
    beside the batch's allocation, and both are released at the end."""
    _require_slurm_and_parsl()
    engine = ParslEngine(settings(tmp_path))
    backend = PackedBackend(tmp_path / "tasks", engine, max_task_hours=1)
    store = InMemoryAttemptStore()
    small = STEP.__class__(
        **{**STEP.__dict__, "resources": STEP.resources.__class__(cpu=1, memory_gb=0.1, time_hours=0.1)}
    )
    runner = runner_for(tmp_path, backend, store)
    runner.preparation = HungryPreparation(base=tmp_path)
    try:
        outcomes = runner.execute(step=small, plans=[plan("hungry"), plan("modest")], dagster_run_id="oom-run")
        allocations = engine.allocation_ids()
    finally:
        backend.close()
    assert {k: o.kind for k, o in outcomes.items()} == {
        "hungry": OutcomeKind.COMPLETED,
        "modest": OutcomeKind.COMPLETED,
    }
    first, retry = store.attempts_of("hungry")
    assert (first.status, first.failure_kind) == (RunStatus.FAILED, FailureKind.OOM), first.error
    assert "memory watchdog" in (first.error or "")
    assert retry.status is RunStatus.COMPLETED
    assert len(allocations) == 2, allocations  # the batch's own, and one sized for the retry
    assert wait_released(allocations, 60) == []
