"""One status query for all jobs of a batch, and patience with a scheduler that does not answer.

``StatusPoller.poll`` asks the backend about every job at once. A job the scheduler no longer knows is reported
FAILED with ``failure_kind`` lost, not as an error of the whole query. A query that fails in a way that says
nothing about the jobs (``SchedulerCommandError``, a timeout: the controller restarting or overloaded) returns
None and is logged as "waiting for the scheduler: …"; ``gave_up_after`` says when the trouble has lasted past
the tolerance, so the loop fails the waiting attempts then, and never cancels their jobs for it.

Pacing (``next_wait``): against a shared scheduler (``HpcBackend.shares_a_scheduler``, e.g. Slurm) a poll costs
scheduler calls (squeue, plus sacct for jobs that left squeue), and the controller only changes a job's state
at its own cadence (slurmctld's scheduling pass, about once a second or slower). The pause after a poll that saw
something change is therefore not a fixed fraction of a second but what keeps the calls within
``queries_per_minute``: 60 / budget × the calls the last query cost (3 s for squeue alone at 20 per minute,
6 s when sacct was needed too). Polls that see nothing change stretch it by ×1.5 up to ``max_interval``; a
completion never triggers an immediate re-poll. With a ``SharedStatusCache`` all run workers of the location
share one query per interval (``execution.status_cache``). Backends whose status costs nobody else anything
(the local process table) keep the short ``min_interval`` and no cache.
"""

from __future__ import annotations

import logging
import subprocess
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

from ccat_dagster.execution.hpc.base import HpcBackend, HpcError, JobInfo, JobState, UnknownJobError
from ccat_dagster.execution.outcomes import RunLog
from ccat_dagster.execution.status_cache import SharedStatusCache, cache_directory
from ccat_dagster.opsdb.enums import FailureKind

log = logging.getLogger(__name__)
# Errors of a status query that say nothing about the jobs: the scheduler could not be asked.
SCHEDULER_TROUBLE = (HpcError, TimeoutError, subprocess.TimeoutExpired)
WINDOW_SECONDS = 60.0


class CachedSchedulerTrouble(HpcError):
    """Another run worker's query of the same scheduler failed a moment ago (its first line is the message)."""


class StatusPoller:
    def __init__(
        self,
        backend: HpcBackend,
        *,
        tolerance_seconds: float,
        clock: Callable[[], float],
        log: RunLog,
        min_interval: float = 0.2,
        max_interval: float = 2.0,
        queries_per_minute: float = 20.0,
        shared: SharedStatusCache | None = None,
    ) -> None:
        if queries_per_minute <= 0:
            raise ValueError(f"queries_per_minute={queries_per_minute!r}: must be > 0")
        self.backend = backend
        self.tolerance_seconds = tolerance_seconds
        self.clock = clock
        self.log = log
        self.trouble_since: float | None = None
        self.query_seconds = 0.0
        self.min_interval = min_interval
        self.max_interval = max_interval
        self.queries_per_minute = queries_per_minute
        self.paced = backend.shares_a_scheduler
        self.shared = shared if self.paced else None
        self.calls_per_query = 1
        """Scheduler calls a query is expected to cost (squeue alone 1, with sacct 2): the most of the last
        minute's queries, what the pacing budgets for."""
        self.queries_sent = 0
        self.polls = 0
        self._sent: deque[tuple[float, int]] = deque()  # (when, calls) of this poller's queries, the last minute
        self._wait = self.floor

    @property
    def floor(self) -> float:
        """The shortest pause between two polls: what keeps this location within its calls per minute."""
        if not self.paced:
            return self.min_interval
        return max(self.min_interval, 60.0 * self.calls_per_query / self.queries_per_minute)

    def budget_wait(self) -> float:
        """Seconds until one more query of the expected cost fits this poller's calls of the last minute (0: now).

        The pauses alone keep the average within the budget; this makes it hold in every minute even when the
        cost of a query changes (a poll that needs sacct after several that did not)."""
        if not self.paced:
            return 0.0
        now = self.clock()
        while self._sent and now - self._sent[0][0] >= WINDOW_SECONDS:
            self._sent.popleft()
        spent = sum(calls for _, calls in self._sent)
        for at, calls in self._sent:
            if spent + self.calls_per_query <= self.queries_per_minute:
                break
            spent -= calls
            if spent + self.calls_per_query <= self.queries_per_minute:
                return at + WINDOW_SECONDS - now
        return 0.0

    def next_wait(self, *, changed: bool) -> float:
        """The pause before the next poll: the floor after a change (a submission, a job that ended), else the
        last pause ×1.5, up to ``max_interval`` (never below the floor)."""
        if changed:
            self._wait = self.floor
        else:
            self._wait = min(self._wait * 1.5, max(self.max_interval, self.floor))
        return self._wait

    def close(self) -> None:
        if self.shared is not None:
            self.shared.close()

    def poll(self, job_ids: Sequence[str]) -> dict[str, JobInfo] | None:
        """The state of the jobs, or None when the scheduler could not be asked this time.

        With a shared cache the answer may lack a job submitted since the location's last query (it is asked
        about in the next one): a missing job is no news, not a lost one."""
        if not job_ids:
            return {}
        self.polls += 1
        began = self.clock()
        try:
            infos = self._ask(list(job_ids))
        except SCHEDULER_TROUBLE as error:
            self._trouble(error, len(job_ids))
            return None
        finally:
            self.query_seconds += self.clock() - began
        if self.trouble_since is not None:
            self.log(f"the scheduler answers again after {self.clock() - self.trouble_since:.0f} s")
            self.trouble_since = None
        return infos

    def gave_up_after(self) -> float | None:
        """Seconds the scheduler has been away, once that is past the tolerance (then the count starts over)."""
        if self.trouble_since is None or self.clock() - self.trouble_since < self.tolerance_seconds:
            return None
        waited = self.clock() - self.trouble_since
        self.trouble_since = None
        return waited

    def _ask(self, job_ids: list[str]) -> dict[str, JobInfo]:
        """Ask the scheduler (or read the location's shared answer); raises SCHEDULER_TROUBLE."""
        if self.shared is None:
            before = self.backend.scheduler_queries
            infos = self._status(job_ids, self._allowance())
            # A poll that had to leave a job for later counts the call it skipped: the next one gets room for it.
            self._counted(self.backend.scheduler_queries - before + any(i.deferred for i in infos.values()))
            return infos
        answer = self.shared.fetch(job_ids, self._status, max_age_seconds=self.floor)
        if answer.queried:
            self._counted(answer.calls)
        elif answer.calls:
            self.calls_per_query = answer.calls
        if answer.error and not answer.queried:
            raise CachedSchedulerTrouble(f"{answer.error} (asked by another run of this location)")
        return answer.infos

    def _counted(self, calls: int) -> None:
        self.queries_sent += 1
        if calls <= 0:
            return
        self._sent.append((self.clock(), calls))
        while self._sent and self.clock() - self._sent[0][0] >= WINDOW_SECONDS:
            self._sent.popleft()
        self.calls_per_query = max(c for _, c in self._sent)

    def _allowance(self) -> int:
        """Scheduler calls one more query may cost within this poller's calls of the last minute (at least 1)."""
        now = self.clock()
        spent = sum(calls for at, calls in self._sent if now - at < WINDOW_SECONDS)
        return max(1, int(self.queries_per_minute - spent))

    def _status(self, job_ids: list[str], max_calls: int) -> dict[str, JobInfo]:
        """The backend's answer within ``max_calls`` scheduler calls; unknown jobs are LOST, not an error."""
        before = self.backend.scheduler_queries

        def ask(ids: list[str]) -> dict[str, JobInfo]:
            if not self.paced:
                return self.backend.status_many(ids)
            left = max_calls - (self.backend.scheduler_queries - before)
            return self.backend.status_within(ids, max_calls=max(1, left))

        try:
            return ask(job_ids)
        except UnknownJobError as error:
            unknown = set(error.job_ids)
            known = [j for j in job_ids if j not in unknown]
            if error.known is not None:
                infos = {j: error.known[j] for j in known if j in error.known}
            else:
                infos = ask(known) if known else {}
            for job_id in unknown:
                infos[job_id] = JobInfo(
                    job_id=job_id,
                    state=JobState.FAILED,
                    reason="job unknown to the scheduler",
                    failure_kind=FailureKind.LOST,
                )
            return infos

    def _trouble(self, error: BaseException, jobs: int) -> None:
        now = self.clock()
        if self.trouble_since is None:
            self.trouble_since = now
        message = (
            f"waiting for the scheduler ({jobs} job(s), {now - self.trouble_since:.0f} s of "
            f"{self.tolerance_seconds:.0f} s tolerance): {str(error).strip() or repr(error)}"
        )
        log.warning(message)
        self.log.throttled("scheduler", message)


def poller_for(
    backend: HpcBackend,
    *,
    clock: Callable[[], float],
    run_log: RunLog,
    status_cache_dir: Path | None,
    processing_location_id: int,
    tolerance_seconds: float,
    min_interval: float,
    max_interval: float,
    queries_per_minute: float,
) -> StatusPoller:
    """The poller of a batch's jobs on ``backend``: sharing one query per interval with the location's other runs
    when ``status_cache_dir`` is set and the backend shares a scheduler."""
    shared = None
    if status_cache_dir is not None and backend.shares_a_scheduler:
        shared = SharedStatusCache(
            cache_directory(status_cache_dir, backend=backend.name, processing_location_id=processing_location_id),
            # Shared by processes (and hosts) that do not share a monotonic clock; a fake clock in tests.
            clock=time.time if clock is time.monotonic else clock,
            queries_per_minute=queries_per_minute,
            count_calls=lambda: backend.scheduler_queries,
        )
    return StatusPoller(
        backend,
        tolerance_seconds=tolerance_seconds,
        clock=clock,
        log=run_log,
        min_interval=min_interval,
        max_interval=max_interval,
        queries_per_minute=queries_per_minute,
        shared=shared,
    )
