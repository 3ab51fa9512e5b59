"""The step runner's loop in milliseconds: in-memory attempt store, scripted backend, fake clock.

Each test drives ``StepRunner.execute`` through one fault path and checks what the store says afterwards
(status, failure kind, the audit trail), what the backend was asked (submissions with which resources,
cancellations) and how long the loop waited on its clock. The same paths on real parts: test_runner_failures.py
(local backend, bubblewrap, PostgreSQL), test_runner_slurm.py (Slurm), test_runner_isolation.py.
"""

from __future__ import annotations

import pytest
from sqlalchemy.exc import OperationalError

from ccat_dagster.execution.attempts import InMemoryAttemptStore
from ccat_dagster.execution.failures import ResourceCaps, failure_kind_of, refine_with_log, retry_resources
from ccat_dagster.execution.hpc.base import JobInfo, JobResources, JobState, SchedulerCommandError
from ccat_dagster.execution.planning import Readiness
from ccat_dagster.execution.runner import OutcomeKind
from ccat_dagster.opsdb.enums import FailureKind, RunStatus

from .loop_fakes import STEP, ScriptedBackend, make_loop, plan

S = RunStatus
K = FailureKind
DONE = [S.STAGING_DATA, S.SUBMITTED, S.RUNNING, S.COLLECTING_RESULTS, S.COMPLETED]


def scheduler_down(message: str = "slurm_load_jobs error: Unable to contact slurm controller") -> SchedulerCommandError:
    return SchedulerCommandError(message, command=["squeue"], returncode=1, stderr=message)


def kinds(loop, key):
    return [(row.status, row.failure_kind) for row in loop.store.attempts_of(key)]


def test_a_batch_completes_every_sub_group_through_the_whole_state_machine():
    loop = make_loop()
    outcomes = loop.run(["a", "b", "c"])
    assert {k: o.kind for k, o in outcomes.items()} == {k: OutcomeKind.COMPLETED for k in "abc"}
    for key in "abc":
        (row,) = loop.store.attempts_of(key)
        assert row.history == DONE and row.job_id and row.product_count == 1
    assert outcomes["a"].metadata["product_count"] == 1 and outcomes["a"].metadata["memory_gb"] == 2.0
    assert not loop.backend.cancelled


def test_transient_status_errors_are_waited_out_without_failing_or_cancelling():
    loop = make_loop()
    loop.backend.status_errors = [scheduler_down(), TimeoutError("squeue timed out after 60 s"), scheduler_down()]
    outcomes = loop.run(["a", "b"])
    assert [o.kind for o in outcomes.values()] == [OutcomeKind.COMPLETED] * 2
    assert not loop.backend.cancelled and len(loop.backend.submitted) == 2
    waits = [line for line in loop.reports if line.startswith("waiting for the scheduler")]
    assert waits and "Unable to contact slurm controller" in waits[0]
    assert any("the scheduler answers again" in line for line in loop.reports)
    # The pauses while the scheduler was away grew (back-off), they did not stay at the first interval.
    assert max(loop.clock.sleeps) > loop.runner.config.min_poll_interval_seconds * 2


def test_scheduler_away_past_the_tolerance_fails_the_attempts_without_cancelling_their_jobs():
    loop = make_loop(scheduler_tolerance_seconds=900, scheduler_backoff_max_seconds=60)
    loop.backend.status_errors = [scheduler_down() for _ in range(1000)]
    started = loop.clock.now
    outcomes = loop.run(["a", "b"])
    assert [o.kind for o in outcomes.values()] == [OutcomeKind.FAILED] * 2
    assert {o.failure_kind for o in outcomes.values()} == {K.SCHEDULER_UNAVAILABLE}
    assert 900 <= loop.clock.now - started <= 900 + 60 + 5
    assert loop.backend.cancelled == []
    for key in "ab":
        (row,) = loop.store.attempts_of(key)  # not retried: the job may still be running
        assert (row.status, row.failure_kind) == (S.FAILED, K.SCHEDULER_UNAVAILABLE)
        assert "was not cancelled" in row.error
    assert max(loop.clock.sleeps) <= 60


def test_an_attempt_left_by_a_dead_run_is_adopted_and_collected_once():
    loop = make_loop()
    orphan = loop.store.add(plan("a"), run_id="dead-run", backend="fake", status=S.RUNNING, job_id="old-7")
    orphan.history = [S.STAGING_DATA, S.SUBMITTED, S.RUNNING]
    loop.backend.add_job("old-7", "a", polls=1)
    loop.runner.is_run_alive = lambda run_id: False
    outcomes = loop.run(["a"], plans=[plan("a", Readiness.IN_FLIGHT)])
    assert outcomes["a"].kind is OutcomeKind.COMPLETED and outcomes["a"].attempt_id == orphan.id
    assert loop.backend.submitted == [] and orphan.status is S.COMPLETED and orphan.run_id == "run-1"
    assert any("reattached to fake job old-7 left by run dead-run" in line for line in loop.reports)


def test_an_attempt_watched_by_a_live_run_is_left_alone():
    loop = make_loop()
    row = loop.store.add(plan("a"), run_id="live-run", backend="fake", status=S.RUNNING, job_id="old-8")
    loop.runner.is_run_alive = lambda run_id: run_id == "live-run"
    outcomes = loop.run(["a"], plans=[plan("a", Readiness.IN_FLIGHT)])
    assert outcomes["a"].kind is OutcomeKind.SKIPPED and "in flight in another run" in outcomes["a"].detail
    assert row.status is S.RUNNING and row.run_id == "live-run" and loop.backend.submitted == []


def test_an_in_flight_attempt_without_a_job_is_ended_as_lost_and_the_sub_group_runs_again():
    loop = make_loop()
    stale = loop.store.add(plan("a"), run_id="dead-run", backend="fake", status=S.STAGING_DATA)
    outcomes = loop.run(["a"], plans=[plan("a", Readiness.IN_FLIGHT)])
    assert (stale.status, stale.failure_kind) == (S.FAILED, K.LOST)
    assert outcomes["a"].kind is OutcomeKind.COMPLETED and outcomes["a"].attempt_id != stale.id


def test_walltime_retries_get_more_time_up_to_the_cap():
    loop = make_loop(ScriptedBackend({"a": ["walltime"] * 5}), max_time_hours=2.5)
    step = STEP.__class__(**{**STEP.__dict__, "max_retries": 5})
    outcomes = loop.run(["a"], step=step)
    assert [s.resources.time_hours for s in loop.backend.specs_of("a")] == [1.0, 2.0, 2.5]
    assert [s.resources.memory_gb for s in loop.backend.specs_of("a")] == [2.0, 2.0, 2.0]
    assert outcomes["a"].kind is OutcomeKind.FAILED and outcomes["a"].failure_kind is K.WALLTIME
    assert kinds(loop, "a") == [(S.FAILED, K.WALLTIME)] * 3


def test_out_of_memory_retries_get_more_memory_and_complete():
    loop = make_loop(ScriptedBackend({"a": ["oom", "oom", "ok"]}))
    outcomes = loop.run(["a"])
    assert [s.resources.memory_gb for s in loop.backend.specs_of("a")] == [2.0, 4.0, 6.0]
    assert outcomes["a"].kind is OutcomeKind.COMPLETED
    assert outcomes["a"].metadata["earlier_failure_kinds"] == "oom, oom"
    assert [r.retry for r in loop.store.attempts_of("a")] == [0, 1, 2]


@pytest.mark.parametrize("ending", ["node_failure", "unknown"])
def test_node_failures_and_lost_jobs_are_retried_unchanged(ending):
    loop = make_loop(ScriptedBackend({"a": [ending, "ok"]}))
    outcomes = loop.run(["a"])
    assert outcomes["a"].kind is OutcomeKind.COMPLETED
    first = loop.store.attempts_of("a")[0]
    assert first.failure_kind is (K.NODE_FAILURE if ending == "node_failure" else K.LOST)
    specs = loop.backend.specs_of("a")
    assert len(specs) == 2 and specs[0].resources == specs[1].resources


def test_refused_output_is_a_contract_failure_and_never_retried():
    loop = make_loop()
    loop.preparation.refused_output = {"b"}
    outcomes = loop.run(["a", "b"])
    assert outcomes["a"].kind is OutcomeKind.COMPLETED
    assert outcomes["b"].kind is OutcomeKind.FAILED and outcomes["b"].failure_kind is K.CONTRACT
    assert kinds(loop, "b") == [(S.FAILED, K.CONTRACT)]  # max_retries is 2: still one attempt
    assert loop.store.attempts_of("b")[0].history[-2:] == [S.COLLECTING_RESULTS, S.FAILED]


def test_a_refused_submission_fails_only_its_sub_group():
    loop = make_loop()
    loop.backend.refuse = {"b"}
    outcomes = loop.run(["a", "b", "c"])
    assert {k: o.kind for k, o in outcomes.items()} == {
        "a": OutcomeKind.COMPLETED,
        "b": OutcomeKind.FAILED,
        "c": OutcomeKind.COMPLETED,
    }
    assert "Invalid account or partition" in outcomes["b"].detail
    assert kinds(loop, "b") == [(S.FAILED, K.CONTRACT)]


def test_staging_and_disk_full_fail_only_their_sub_groups():
    loop = make_loop()
    loop.preparation.staging_fails = {"b"}
    loop.preparation.disk_full = {"c"}
    outcomes = loop.run(["a", "b", "c"])
    assert outcomes["a"].kind is OutcomeKind.COMPLETED
    assert (outcomes["b"].failure_kind, outcomes["c"].failure_kind) == (K.STAGING, K.DISK_FULL)
    assert kinds(loop, "b") == [(S.FAILED, K.STAGING)] and kinds(loop, "c") == [(S.FAILED, K.DISK_FULL)]
    assert "the disk is full" in outcomes["c"].detail
    assert [key for key, _ in loop.backend.submitted] == ["a"]


def test_a_job_that_failed_on_its_full_output_file_system_is_disk_full_and_not_retried():
    loop = make_loop(ScriptedBackend({"b": ["exit_code", "ok"]}))  # STEP.max_retries is 2
    loop.preparation.full_output = {"b"}
    outcomes = loop.run(["a", "b"])
    assert outcomes["a"].kind is OutcomeKind.COMPLETED
    assert kinds(loop, "b") == [(S.FAILED, K.DISK_FULL)]  # a retry would find the disk as full
    (row,) = loop.store.attempts_of("b")
    assert row.error.startswith("no space left on device (ENOSPC): the file system of /nonexistent/")
    assert "/output is full" in row.error and "exit code 3" in row.error


def test_a_signal_death_that_the_job_log_shows_as_a_memory_kill_is_oom_and_gets_more_memory():
    """Slurm's OverMemoryKill leaves FAILED 0:9, and its memory samples may all be below the request."""

    class MemoryKillLogs(ScriptedBackend):
        def logs(self, job_id: str, *, tail_lines: int = 50) -> str:
            return (
                "slurmstepd-vm: error: StepId=7.batch exceeded memory limit (1080520704 > 1073741824), being killed\n"
                "slurmstepd-vm: error: Exceeded job memory limit\n"
            )

    loop = make_loop(MemoryKillLogs({"a": ["signal", "ok"]}))
    outcomes = loop.run(["a"])
    assert outcomes["a"].kind is OutcomeKind.COMPLETED
    assert kinds(loop, "a") == [(S.FAILED, K.OOM), (S.COMPLETED, None)]
    assert [spec.resources.memory_gb for spec in loop.backend.specs_of("a")] == [2.0, 4.0]
    assert refine_with_log(K.SIGNAL, "Detected 1 oom_kill event in StepId=9.batch") is K.OOM
    assert refine_with_log(K.SIGNAL, "killed by signal 9") is K.SIGNAL
    assert refine_with_log(K.CONTRACT, "Exceeded job memory limit") is K.CONTRACT


def test_a_failure_before_the_first_try_starts_the_next_run_with_more_memory():
    store = InMemoryAttemptStore()
    store.add(plan("a"), run_id="earlier", backend="fake", status=S.FAILED, failure_kind=K.OOM)
    loop = make_loop(store=store)
    loop.run(["a"])
    assert [s.resources.memory_gb for s in loop.backend.specs_of("a")] == [4.0]


def test_cancel_cancels_the_jobs_and_marks_the_attempts_cancelled():
    loop = make_loop(ScriptedBackend(polls=50))
    loop.backend.on_status = lambda: loop.clock.now > 1005 and loop.runner.cancel()
    outcomes = loop.run(["a", "b"])
    assert [o.kind for o in outcomes.values()] == [OutcomeKind.CANCELLED] * 2
    assert sorted(loop.backend.cancelled) == sorted(row.job_id for row in loop.store.rows.values())
    assert {row.status for row in loop.store.rows.values()} == {S.CANCELLED}


class Terminated(BaseException):
    """Dagster's run termination inside the asset body."""


def test_run_termination_cancels_the_jobs():
    loop = make_loop(ScriptedBackend(polls=50))

    def terminate():
        if loop.clock.now > 1005:
            raise Terminated()

    loop.backend.on_status = terminate
    with pytest.raises(Terminated):
        loop.run(["a"])
    (row,) = loop.store.rows.values()
    assert loop.backend.cancelled == [row.job_id] and row.status is S.CANCELLED


class FlakyStore(InMemoryAttemptStore):
    """Raises a connection error from chosen methods, a given number of times each."""

    def __init__(self, failures: dict[str, int]) -> None:
        super().__init__()
        self.failures = dict(failures)

    def _maybe_fail(self, name: str) -> None:
        if self.failures.get(name, 0) > 0:
            self.failures[name] -= 1
            raise OperationalError("SELECT 1", {}, Exception("server closed the connection unexpectedly"))

    def register_round(self, *args, **kwargs):
        self._maybe_fail("register_round")
        return super().register_round(*args, **kwargs)

    def mark_running(self, *args, **kwargs):
        self._maybe_fail("mark_running")
        return super().mark_running(*args, **kwargs)


def test_ops_db_away_for_a_while_during_collection_is_waited_out():
    loop = make_loop(store=FlakyStore({"register_round": 4, "mark_running": 2}))
    outcomes = loop.run(["a", "b"])
    assert [o.kind for o in outcomes.values()] == [OutcomeKind.COMPLETED] * 2
    assert any(line.startswith("waiting for ops-db (register_round") for line in loop.reports)
    assert not loop.backend.cancelled


def test_ops_db_away_past_its_tolerance_leaves_the_jobs_running_for_the_next_run_to_adopt():
    store = FlakyStore({"register_round": 10_000})
    loop = make_loop(store=store, opsdb_tolerance_seconds=120)
    with pytest.raises(OperationalError):
        loop.run(["a"])
    (row,) = store.rows.values()
    assert row.status is S.COLLECTING_RESULTS and row.job_id and loop.backend.cancelled == []
    # ops-db is back; the next run adopts the attempt and collects the finished job exactly once.
    store.failures.clear()
    again = make_loop(loop.backend, store=store)
    outcomes = again.run(["a"], plans=[plan("a", Readiness.IN_FLIGHT)], run_id="run-2")
    assert outcomes["a"].kind is OutcomeKind.COMPLETED and outcomes["a"].attempt_id == row.id
    assert row.status is S.COMPLETED and row.history.count(S.COMPLETED) == 1
    assert len(loop.backend.submitted) == 1


def test_max_in_flight_bounds_the_jobs_submitted_at_once():
    loop = make_loop(ScriptedBackend(polls=3), max_in_flight=2)
    in_flight = []
    loop.backend.on_status = lambda: in_flight.append(
        sum(1 for j in loop.backend.jobs.values() if j.polls_left > 0 and not j.cancelled)
    )
    outcomes = loop.run(list("abcde"))
    assert all(o.kind is OutcomeKind.COMPLETED for o in outcomes.values())
    assert max(in_flight) == 2 and len(loop.backend.submitted) == 5


# ---------------------------------------------------------------- the pure parts


@pytest.mark.parametrize(
    ("info", "kind"),
    [
        (JobInfo("1", JobState.FAILED, exit_code=0, reason="TIMEOUT"), K.WALLTIME),
        (
            JobInfo("1", JobState.FAILED, exit_code=143, reason="killed by signal 15 (the pre-walltime warning)"),
            K.WALLTIME,
        ),
        (JobInfo("1", JobState.FAILED, exit_code=0, reason="OUT_OF_MEMORY"), K.OOM),
        (JobInfo("1", JobState.FAILED, exit_code=137), K.OOM),
        (JobInfo("1", JobState.FAILED, exit_code=0, reason="NODE_FAIL"), K.NODE_FAILURE),
        (JobInfo("1", JobState.FAILED, exit_code=139), K.SIGNAL),
        (JobInfo("1", JobState.FAILED, exit_code=3), K.EXIT_CODE),
        (JobInfo("1", JobState.CANCELLED), K.CANCELLED),
        (JobInfo("1", JobState.FAILED, reason="wrapper ended without recording an exit status"), K.LOST),
        # The backend's own evidence wins over anything the fallback would read from the exit code.
        (JobInfo("1", JobState.FAILED, exit_code=137, failure_kind=K.NODE_FAILURE), K.NODE_FAILURE),
    ],
)
def test_failure_kind_of_prefers_the_backend_and_falls_back_on_exit_code_and_reason(info, kind):
    assert failure_kind_of(info) is kind


def test_retry_resources_escalate_by_the_base_request_and_stop_at_the_cap():
    base = JobResources(memory_gb=4, time_hours=2)
    caps = ResourceCaps(max_memory_gb=10, max_time_hours=5)
    assert retry_resources(base, K.OOM, base=base, caps=caps) == JobResources(memory_gb=8, time_hours=2)
    assert retry_resources(JobResources(memory_gb=8, time_hours=2), K.OOM, base=base, caps=caps).memory_gb == 10
    assert retry_resources(JobResources(memory_gb=10, time_hours=2), K.OOM, base=base, caps=caps) is None
    assert retry_resources(base, K.WALLTIME, base=base, caps=caps).time_hours == 4
    assert retry_resources(base, K.LOST, base=base, caps=caps) == base
    for never in (K.CONTRACT, K.CANCELLED, K.STAGING, K.DISK_FULL, K.SCHEDULER_UNAVAILABLE):
        assert retry_resources(base, never, base=base, caps=caps) is None


def test_ops_db_away_while_staging_and_preparing_is_waited_out_too():
    loop = make_loop()
    failures = {"stage": 2, "prepare": 3}
    stage, prepare = loop.preparation.stage, loop.preparation.prepare

    def flaky(name, action):
        def call(*args, **kwargs):
            if failures[name] > 0:
                failures[name] -= 1
                raise OperationalError("SELECT 1", {}, Exception("could not connect to server"))
            return action(*args, **kwargs)

        return call

    loop.preparation.stage, loop.preparation.prepare = flaky("stage", stage), flaky("prepare", prepare)
    outcomes = loop.run(["a", "b"])
    assert [o.kind for o in outcomes.values()] == [OutcomeKind.COMPLETED] * 2
    assert failures == {"stage": 0, "prepare": 0}
    assert any(line.startswith("waiting for ops-db (preparation") for line in loop.reports)


def test_an_adopted_attempt_mid_collection_is_collected_even_if_the_scheduler_forgot_its_job():
    loop = make_loop()
    row = loop.store.add(plan("a"), run_id="dead-run", backend="fake", status=S.COLLECTING_RESULTS, job_id="gone-1")
    row.history = [S.STAGING_DATA, S.SUBMITTED, S.RUNNING, S.COLLECTING_RESULTS]
    row.exit_code = 0
    queries = []
    loop.backend.on_status = lambda: queries.append(1)
    outcomes = loop.run(["a"], plans=[plan("a", Readiness.IN_FLIGHT)])
    assert outcomes["a"].kind is OutcomeKind.COMPLETED and outcomes["a"].attempt_id == row.id
    assert row.status is S.COMPLETED and row.exit_code == 0 and row.product_count == 1
    assert queries == [] and loop.backend.submitted == []
