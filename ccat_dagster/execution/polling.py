"""One status query for all jobs of a batch, and patience with a scheduler that does not answer.

``StatusPoller.poll`` asks the backend about every job at once. A job the scheduler no longer knows is reported
FAILED with ``failure_kind`` lost, not as an error of the whole query. A query that fails in a way that says
nothing about the jobs (``SchedulerCommandError``, a timeout: the controller restarting or overloaded) returns
None and is logged as "waiting for the scheduler: …"; ``gave_up_after`` says when the trouble has lasted past
the tolerance, so the loop fails the waiting attempts then, and never cancels their jobs for it.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Callable, Sequence

from ccat_dagster.execution.hpc.base import HpcBackend, HpcError, JobInfo, JobState, UnknownJobError
from ccat_dagster.execution.outcomes import RunLog
from ccat_dagster.opsdb.enums import FailureKind

log = logging.getLogger(__name__)
# Errors of a status query that say nothing about the jobs: the scheduler could not be asked.
SCHEDULER_TROUBLE = (HpcError, TimeoutError, subprocess.TimeoutExpired)


class StatusPoller:
    def __init__(
        self, backend: HpcBackend, *, tolerance_seconds: float, clock: Callable[[], float], log: RunLog
    ) -> None:
        self.backend = backend
        self.tolerance_seconds = tolerance_seconds
        self.clock = clock
        self.log = log
        self.trouble_since: float | None = None
        self.query_seconds = 0.0

    def poll(self, job_ids: Sequence[str]) -> dict[str, JobInfo] | None:
        """The state of every job, or None when the scheduler could not be asked this time."""
        if not job_ids:
            return {}
        began = self.clock()
        try:
            infos = self._status(list(job_ids))
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

    def _status(self, job_ids: list[str]) -> dict[str, JobInfo]:
        try:
            return self.backend.status_many(job_ids)
        except UnknownJobError as error:
            unknown = set(error.job_ids)
            known = [j for j in job_ids if j not in unknown]
            infos = self.backend.status_many(known) if known else {}
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
