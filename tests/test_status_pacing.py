"""Polling that fits the scheduler, in milliseconds: a fake clock and a fake Slurm that counts its calls.

The pacing of one batch (calls per minute within the budget, no re-poll right after a completion, sacct only
for jobs that left squeue) and the status cache that makes all run workers of a location share one query
(fresh answers reused, the budget held across workers, a busy lock not waited for, dead watchers forgotten,
damaged files ignored, a failed query seen by the others as the scheduler's trouble).
The same on the real Slurm, counted through squeue/sacct shims on PATH: tests/test_slurm_polling.py.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Sequence

import pytest

from ccat_dagster.execution.hpc.base import HpcBackend, JobInfo, JobState, SchedulerCommandError
from ccat_dagster.execution.outcomes import RunLog
from ccat_dagster.execution.polling import StatusPoller
from ccat_dagster.execution.runner import OutcomeKind
from ccat_dagster.execution.status_cache import SharedStatusCache, cache_directory

from .loop_fakes import FakeClock, make_loop


class CountingSlurm(HpcBackend):
    """Jobs run ``seconds`` of the fake clock each, ``slots`` at a time, started in submission order. A status
    query costs one squeue, and one sacct more when any asked job has left squeue, as the Slurm backend's does."""

    name = "slurm"
    shares_a_scheduler = True

    def __init__(self, clock: FakeClock | None = None, *, seconds: float = 1.0, slots: int = 2) -> None:
        self.clock = clock or FakeClock()
        self.seconds = seconds
        self.slots = slots
        self.submitted_at: dict[str, float] = {}
        self.calls: list[tuple[float, str, tuple[str, ...]]] = []
        self.fail_next = 0

    @property
    def scheduler_queries(self) -> int:
        return len(self.calls)

    def submit(self, spec) -> str:
        job_id = str(1000 + len(self.submitted_at))
        self.submitted_at[job_id] = self.clock.now
        return job_id

    def _start(self, job_id: str) -> float:
        """FIFO on ``slots``: a job starts when it was submitted or when the job ``slots`` ahead of it ended."""
        order = list(self.submitted_at)
        index = order.index(job_id)
        start = self.submitted_at[job_id]
        if index >= self.slots:
            start = max(start, self._start(order[index - self.slots]) + self.seconds)
        return start

    def _ended(self, job_id: str) -> bool:
        return self._start(job_id) + self.seconds <= self.clock.now

    def status_many(self, job_ids: Sequence[str]) -> dict[str, JobInfo]:
        return self.status_within(job_ids, max_calls=2)

    def status_within(self, job_ids: Sequence[str], *, max_calls: int) -> dict[str, JobInfo]:
        """As the Slurm backend's: sacct only when the allowance has a call left for it, else the jobs that left
        squeue are reported running and asked about at the next poll."""
        self.calls.append((self.clock.now, "squeue", tuple(job_ids)))
        if self.fail_next:
            self.fail_next -= 1
            raise SchedulerCommandError(
                "Unable to contact slurm controller", command=["squeue"], returncode=1, stderr=""
            )
        left = [j for j in job_ids if self._ended(j)]
        if left and max_calls >= 2:
            self.calls.append((self.clock.now, "sacct", tuple(left)))
            settled = set(left)
        else:
            settled = set()
        return {
            j: JobInfo(j, JobState.COMPLETED, exit_code=0)
            if j in settled
            else JobInfo(
                j, JobState.RUNNING if self._start(j) <= self.clock.now else JobState.PENDING, deferred=j in left
            )
            for j in job_ids
        }

    def cancel(self, job_id: str) -> None:
        pass

    def logs(self, job_id: str, *, tail_lines: int = 50) -> str:
        return ""


def calls_in_any_minute(calls) -> int:
    times = [t for t, _, _ in calls]
    return max(sum(1 for u in times if t <= u < t + 60) for t in times)


def test_a_busy_batch_stays_within_the_budget_and_never_re_polls_after_a_completion():
    slurm = CountingSlurm(seconds=1.0, slots=2)
    loop = make_loop(slurm, max_in_flight=200)
    slurm.clock = clock = loop.clock
    outcomes = loop.run([f"scan-{i}" for i in range(120)])
    assert {o.kind for o in outcomes.values()} == {OutcomeKind.COMPLETED}
    # 120 one-second jobs on 2 slots: ~60 s of work; the old pacing (0.2 s after every completion) asked ~300 times.
    assert calls_in_any_minute(slurm.calls) <= 20
    squeues = [t for t, command, _ in slurm.calls if command == "squeue"]
    gaps = [b - a for a, b in zip(squeues, squeues[1:], strict=False)]
    assert min(gaps) >= 3.0, "a poll came right after another (a completion must not trigger a re-poll)"
    # sacct only for the jobs that left squeue, never for the ones still queued or running.
    for _at, command, jobs in slurm.calls:
        if command == "sacct":
            assert all(slurm._ended(j) for j in jobs) and len(jobs) < 120
    assert clock.now - 1000.0 < 60 + 20, "the batch ends within a few polls of its last job"


def test_a_poll_that_needs_sacct_at_the_edge_of_the_budget_defers_it_to_the_next_poll():
    """The cost of a poll is known only after squeue: one that finds ended jobs while the minute's budget has a
    single call left sends squeue alone, reports those jobs still running, and settles them a poll later."""
    clock = FakeClock()
    slurm = CountingSlurm(clock, seconds=50.0, slots=1)
    poller = StatusPoller(
        slurm, tolerance_seconds=900, clock=clock, log=RunLog(lambda _m: None, every_seconds=10, clock=clock)
    )
    job = slurm.submit(None)
    answers = []
    for _ in range(20):  # squeue alone every 3 s: the budget's 20 calls within one minute
        answers.append(poller.poll([job]))
        clock.now += 3.0 - 0.3
    assert [command for _, command, _ in slurm.calls] == ["squeue"] * 20
    assert slurm._ended(job) and answers[-1][job].state is JobState.RUNNING, "sacct would have been the 21st call"
    assert answers[-1][job].deferred and poller.calls_per_query == 2, "the next poll makes room for sacct"
    assert calls_in_any_minute(slurm.calls) <= 20
    clock.now += poller.budget_wait()
    assert poller.poll([job])[job].state is JobState.COMPLETED
    assert calls_in_any_minute(slurm.calls) <= 20


def test_the_status_cache_hands_the_query_what_the_budget_has_left(tmp_path):
    clock = FakeClock()
    spent = {"calls": 0}
    asked = Asked()

    def query(job_ids, max_calls):
        spent["calls"] += 1
        return asked(job_ids, max_calls)

    worker = cache(tmp_path, clock, budget=5, calls=lambda: spent["calls"])
    for _ in range(5):
        assert worker.fetch(["1"], query, max_age_seconds=1).queried
        clock.now += 1.5
    assert asked.allowances == [5, 4, 3, 2, 1]


def test_the_pause_grows_while_nothing_changes_and_drops_to_the_floor_after_a_change():
    clock = FakeClock()
    poller = StatusPoller(
        CountingSlurm(clock),
        tolerance_seconds=900,
        clock=clock,
        log=RunLog(lambda _m: None, every_seconds=10, clock=clock),
        max_interval=30,
    )
    assert poller.floor == 3.0  # squeue alone at 20 calls per minute
    poller.calls_per_query = 2
    assert poller.floor == 6.0  # squeue and sacct
    waits = [poller.next_wait(changed=False) for _ in range(6)]
    assert waits == sorted(waits) and waits[-1] == 30
    assert poller.next_wait(changed=True) == 6.0


def test_the_local_backend_is_not_paced_by_the_scheduler_budget():
    loop = make_loop()  # ScriptedBackend: shares no scheduler
    assert loop.runner.poller.floor == loop.runner.config.min_poll_interval_seconds
    assert loop.runner.poller.shared is None


def cache(tmp_path, clock, *, budget=20.0, watcher=None, calls=None) -> SharedStatusCache:
    return SharedStatusCache(
        tmp_path / "slurm-1",
        clock=clock,
        queries_per_minute=budget,
        watcher=watcher,
        count_calls=calls or (lambda: 0),
    )


class Asked:
    def __init__(self, state: JobState = JobState.RUNNING) -> None:
        self.queries: list[list[str]] = []
        self.allowances: list[int] = []
        self.state = state

    def __call__(self, job_ids: list[str], max_calls: int) -> dict[str, JobInfo]:
        self.queries.append(sorted(job_ids))
        self.allowances.append(max_calls)
        return {j: JobInfo(j, self.state) for j in job_ids}


def test_two_run_workers_of_a_location_share_one_query_for_all_their_jobs(tmp_path):
    clock = FakeClock()
    a, b = cache(tmp_path, clock, watcher="run-a"), cache(tmp_path, clock, watcher="run-b")
    asked = Asked()
    assert a.fetch(["1", "2"], asked, max_age_seconds=3).queried
    first_b = b.fetch(["3"], asked, max_age_seconds=3)  # a fresh answer, without b's new job: no news yet
    assert not first_b.queried and first_b.infos == {}
    clock.now += 3
    assert b.fetch(["3"], asked, max_age_seconds=3).queried  # b's turn: it asks for a's jobs too
    clock.now += 1
    answer = a.fetch(["1", "2"], asked, max_age_seconds=3)
    assert not answer.queried and set(answer.infos) == {"1", "2"}
    assert asked.queries == [["1", "2"], ["1", "2", "3"]]
    b.close()
    clock.now += 3
    a.fetch(["1"], asked, max_age_seconds=3)
    assert asked.queries[-1] == ["1"], "a closed watcher's jobs are not asked for any more"


def test_the_budget_holds_for_all_workers_together(tmp_path):
    clock = FakeClock()
    counted = {"calls": 0}

    def query(job_ids, max_calls):
        assert max_calls >= 2
        counted["calls"] += 2  # squeue and sacct
        return {j: JobInfo(j, JobState.RUNNING) for j in job_ids}

    workers = [cache(tmp_path, clock, budget=10, watcher=f"run-{i}", calls=lambda: counted["calls"]) for i in range(3)]
    sent = 0
    for _ in range(60):  # a minute of polls every second from each of three workers, answers older than 0.1 s
        for worker in workers:
            sent += worker.fetch([f"{worker.watcher}-job"], query, max_age_seconds=0.1).queried
        clock.now += 1.0
    assert counted["calls"] == 10 and sent == 5


def test_a_worker_does_not_wait_for_another_ones_query(tmp_path):
    clock = FakeClock()
    a = cache(tmp_path, clock, watcher="run-a")
    a.fetch(["1"], Asked(), max_age_seconds=3)
    clock.now += 10
    held = os.open(tmp_path / "slurm-1" / "query.lock", os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_EX)  # another run worker is asking right now
    try:
        asked = Asked()
        answer = a.fetch(["1"], asked, max_age_seconds=3)
        assert not answer.queried and asked.queries == [] and answer.infos["1"].state is JobState.RUNNING
    finally:
        os.close(held)
    assert a.fetch(["1"], asked, max_age_seconds=3).queried  # the lock went with its holder


def test_a_dead_watchers_jobs_expire_and_damaged_files_read_as_no_answer(tmp_path):
    clock = FakeClock()
    dead = cache(tmp_path, clock, watcher="run-dead")
    dead.fetch(["7"], Asked(), max_age_seconds=3)  # then its process is killed: no close()
    clock.now += 601
    live = cache(tmp_path, clock, watcher="run-live")
    (tmp_path / "slurm-1" / "answers.json").write_text("{not json")
    asked = Asked()
    assert live.fetch(["8"], asked, max_age_seconds=3).queried and asked.queries == [["8"]]
    assert not (tmp_path / "slurm-1" / "watch" / "run-dead.json").exists()
    stored = json.loads((tmp_path / "slurm-1" / "answers.json").read_text())
    assert stored["infos"]["8"]["state"] == "running"


def test_a_failed_query_is_the_others_scheduler_trouble_too(tmp_path):
    clock = FakeClock()
    slurm = CountingSlurm(clock)
    slurm.fail_next = 1
    pollers = [
        StatusPoller(
            slurm,
            tolerance_seconds=900,
            clock=clock,
            log=RunLog(lambda _m: None, every_seconds=10, clock=clock),
            shared=cache(tmp_path, clock, watcher=f"run-{i}", calls=lambda: slurm.scheduler_queries),
        )
        for i in range(2)
    ]
    assert pollers[0].poll(["1000"]) is None
    assert pollers[1].poll(["1001"]) is None and len(slurm.calls) == 1  # told, not asked again
    assert pollers[1].trouble_since == clock.now


def test_cache_names_are_checked(tmp_path):
    with pytest.raises(ValueError, match="status cache name"):
        cache_directory(tmp_path, backend="../etc", processing_location_id=1)
    assert cache_directory(tmp_path, backend="slurm", processing_location_id=3) == tmp_path / "slurm-3"
