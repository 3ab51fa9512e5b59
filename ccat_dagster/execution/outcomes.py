"""What a batch tells its caller: one ``SubGroupOutcome`` per sub-group, and throttled lines for the run log.

Each run-log line is an event-log write in Dagster, so a batch of hundreds of sub-groups must not write one per
poll: ``RunLog.throttled`` lets a kind of line through at most every ``every_seconds`` (per kind), and
``Progress`` says "N of M sub-groups done" at the same pace. Per-sub-group happy-path messages go to the Python
logger only; failures always reach the run log.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ccat_dagster.execution.discovery import DiscoveredProduct
from ccat_dagster.execution.hpc.base import JobInfo, JobResources, JobState
from ccat_dagster.execution.planning import SubGroupPlan
from ccat_dagster.execution.step import StepDefinition
from ccat_dagster.opsdb.enums import FailureKind

Reporter = Callable[[str], None]
# A batch waiting on queued or running jobs says so at least this often, even when nothing changed.
WAIT_REPORT_SECONDS = 300.0


class OutcomeKind(enum.StrEnum):
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"


@dataclass
class SubGroupOutcome:
    sub_group_key: str
    kind: OutcomeKind
    attempt_id: int | None = None
    attempts: int = 0
    fingerprint: str | None = None
    detail: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    failure_kind: FailureKind | None = None
    """Why the last attempt failed (FAILED / CANCELLED outcomes)."""
    products: tuple[DiscoveredProduct, ...] = ()
    """The registered products of a COMPLETED outcome (what its materialization lists)."""
    waits_for_recreation: bool = False
    """SKIPPED: the sub-group reads upstream intermediates whose copies retention deleted."""


def completed_outcome(
    plan: SubGroupPlan,
    *,
    attempt_id: int,
    attempt_number: int,
    step: StepDefinition,
    info: JobInfo,
    backend: str,
    job_id: str | None,
    resources: JobResources,
    products: tuple[int, int],
    products_dir: str,
    earlier: Sequence[FailureKind],
    product_files: Sequence[DiscoveredProduct] = (),
) -> SubGroupOutcome:
    """A completed sub-group, with the metadata its materialization shows."""
    metadata: dict[str, Any] = {
        "ops_db_attempt_id": attempt_id,
        "attempt": attempt_number,
        "product_count": products[0],
        "product_bytes": products[1],
        "hpc_backend": backend,
        "hpc_job_id": job_id,
        "wall_time_seconds": info.wall_time_seconds,
        "cpu_hours": info.cpu_hours,
        "peak_memory_gb": info.peak_memory_gb,
        "software_version": step.software_label,
        "image_digest": step.image_digest or "",
        "input_fingerprint": plan.fingerprint,
        "sub_group_members": len(plan.package_ids) or len(plan.upstream_products),
        "products_dir": products_dir,
        "memory_gb": resources.memory_gb,
        "time_hours": resources.time_hours,
    }
    if earlier:
        metadata["earlier_failure_kinds"] = ", ".join(kind.value for kind in earlier)
    return SubGroupOutcome(
        plan.sub_group_key,
        OutcomeKind.COMPLETED,
        attempt_id=attempt_id,
        attempts=attempt_number,
        fingerprint=plan.fingerprint,
        metadata=metadata,
        products=tuple(product_files),
    )


class RunLog:
    """The run log, with per-kind throttling on an injected clock."""

    def __init__(self, report: Reporter, *, every_seconds: float, clock: Callable[[], float]) -> None:
        self.report = report
        self.every_seconds = every_seconds
        self.clock = clock
        self._last: dict[str, float] = {}
        self._last_wait = ""

    def __call__(self, message: str) -> None:
        self.report(message)

    def throttled(self, kind: str, message: str, *, every_seconds: float | None = None) -> None:
        now = self.clock()
        if now - self._last.get(kind, float("-inf")) >= (
            self.every_seconds if every_seconds is None else every_seconds
        ):
            self._last[kind] = now
            self.report(message)

    def waiting(self, backend: str, job_ids: Sequence[str | None], infos: dict[str, JobInfo]) -> None:
        """Say what the batch waits for: when the job states change (throttled), and every WAIT_REPORT_SECONDS."""
        counts: Counter[str] = Counter()
        for job_id in job_ids:
            info = infos.get(job_id) if job_id else None
            if info is not None and info.is_terminal:
                continue  # finished in this poll: being collected, not waited for
            label = info.state.value.upper() if info else "UNKNOWN"
            if info is not None and info.state is JobState.PENDING and info.reason:
                label += f" ({info.reason})"
            counts[label] += 1
        summary = ", ".join(f"{n} {label}" for label, n in sorted(counts.items()))
        if not summary:
            return
        before = self._last.get("wait")
        self.throttled(
            "wait",
            f"waiting for {sum(counts.values())} {backend} job(s): {summary}",
            every_seconds=self.every_seconds if summary != self._last_wait else WAIT_REPORT_SECONDS,
        )
        if self._last.get("wait") != before:
            self._last_wait = summary


class Progress:
    """Counts finished sub-groups; "N of M done" at most every ``every_seconds``, skips as they happen."""

    def __init__(self, total: int, log: RunLog) -> None:
        self.total = total
        self.log = log
        self.counts: dict[OutcomeKind, int] = {}
        log._last["progress"] = log.clock()  # the first line after every_seconds, not at the first outcome

    def done(self, outcome: SubGroupOutcome) -> None:
        self.counts[outcome.kind] = self.counts.get(outcome.kind, 0) + 1
        if outcome.kind is OutcomeKind.SKIPPED:  # failures were reported where they happened
            self.log(f"{outcome.sub_group_key}: {outcome.kind.value}: {outcome.detail.partition(chr(10))[0]}")
        self.log.throttled("progress", self._line())

    def finish(self) -> None:
        self.log(self._line())

    def _line(self) -> str:
        finished = sum(self.counts.values())
        kinds = ", ".join(f"{count} {kind.value}" for kind, count in sorted(self.counts.items()))
        return f"{finished} of {self.total} sub-groups done" + (f" ({kinds})" if kinds else "")
