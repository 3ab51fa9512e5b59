"""Ending attempts: collection of the jobs that succeeded, and the failure (maybe retry) of the others.

The jobs that ended in one poll are collected together: COLLECTING_RESULTS for all, discovery of each one's
products, then products, lineage and COMPLETED in one transaction (``AttemptStore.register_round``). A job that
did not succeed fails its attempt with its ``FailureKind`` (refined by the job's log tail and a full file
system) and is retried as the kind allows (``execution.failures``). Attempts whose status the scheduler could
not give past the tolerance fail as scheduler_unavailable, their jobs not cancelled. ``StepRunner``
(``execution.runner``) mixes this in; the attributes below are its own.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ccat_dagster.errors import CcatError
from ccat_dagster.execution.batch import Active, Queued, best_effort, waits_for_recreation
from ccat_dagster.execution.discovery import DiscoveredProduct
from ccat_dagster.execution.failures import (
    ResourceCaps,
    describe_resource_change,
    failure_kind_of,
    failure_message,
    refine_with_log,
    retry_resources,
)
from ccat_dagster.execution.hpc.base import HpcBackend, JobInfo, JobState
from ccat_dagster.execution.outcomes import OutcomeKind, SubGroupOutcome, completed_outcome
from ccat_dagster.execution.planning import SubGroupPlan
from ccat_dagster.execution.polling import StatusPoller
from ccat_dagster.execution.preparation import AttemptPreparation, PreparationFailure
from ccat_dagster.execution.resilience import ResilientAttemptStore
from ccat_dagster.execution.step import StepDefinition
from ccat_dagster.opsdb.enums import FailureKind

if TYPE_CHECKING:
    from ccat_dagster.execution.runner import RunnerConfig

log = logging.getLogger(__name__)


class AttemptCollection:
    """The ending half of ``StepRunner``: attempts collected, failed, retried, and their outcomes."""

    config: RunnerConfig
    backend: HpcBackend
    store: ResilientAttemptStore
    caps: ResourceCaps
    poller: StatusPoller
    report: Callable[[str], None]
    _cancel: threading.Event

    def _scheduler_gone(self, active: list[Active]) -> list[SubGroupOutcome]:
        """Past the tolerance: the attempts fail as scheduler_unavailable; their jobs are NOT cancelled."""
        waited = self.poller.gave_up_after()
        if waited is None:
            return []
        return [
            self._fail(
                item,
                f"the scheduler could not be asked about {self.backend.name} job {item.job_id} for {waited:.0f} s "
                f"(tolerance {self.config.scheduler_tolerance_seconds:.0f} s); the job was not cancelled and may "
                "still be running or have finished",
                FailureKind.SCHEDULER_UNAVAILABLE,
            )
            for item in active
        ]

    def _finish(
        self, finished: list[tuple[Active, JobInfo]], step: StepDefinition, preparation: AttemptPreparation
    ) -> list[tuple[SubGroupOutcome, Queued | None]]:
        """Jobs that ended in one poll: collect the successful ones together, fail (maybe retry) the others."""
        results: list[tuple[SubGroupOutcome, Queued | None]] = []
        succeeded = [(a, i) for a, i in finished if i.state is JobState.COMPLETED and i.exit_code in (0, None)]
        if succeeded:
            results.extend((outcome, None) for outcome in self._collect(succeeded, step, preparation))
        for item, info in finished:
            if not (info.state is JobState.COMPLETED and info.exit_code in (0, None)):
                results.append(self._finish_failed(item, info, step, preparation))
        return results

    def _collect(
        self, succeeded: list[tuple[Active, JobInfo]], step: StepDefinition, preparation: AttemptPreparation
    ) -> list[SubGroupOutcome]:
        self.store.mark_collecting([(item.attempt_id, info) for item, info in succeeded])
        outcomes: list[SubGroupOutcome] = []
        discovered = []
        for item, info in succeeded:
            try:
                discovered.append((item, info, preparation.discover(item.layout)))
            except PreparationFailure as error:
                outcomes.append(self._fail(item, str(error), error.kind, info=info))
        registered = self.store.register_round(
            [(item.attempt_id, products) for item, _, products in discovered],
            processing_location_id=self.config.processing_location_id,
        )
        for item, info, products in discovered:
            result = registered[item.attempt_id]
            if isinstance(result, CcatError):
                outcomes.append(
                    self._fail(item, f"output collection refused: {result}", FailureKind.CONTRACT, info=info)
                )
            else:
                outcomes.append(self._completed(item, info, step, result.product_count, result.product_bytes, products))
        return outcomes

    def _finish_failed(
        self, item: Active, info: JobInfo, step: StepDefinition, preparation: AttemptPreparation
    ) -> tuple[SubGroupOutcome, Queued | None]:
        """A job that did not succeed: fail the attempt with its kind and say whether (and how) to retry."""
        if info.state is JobState.CANCELLED:
            # Cancelled by someone outside ccat-dagster (scancel by an admin, the site's tooling): not a cancel of
            # this run, so the attempt FAILS (kind cancelled) and the next tick plans the sub-group again; it is
            # not retried inside this batch, in case whoever cancelled it had a reason.
            message = f"job {item.job_id} was cancelled outside ccat-dagster; the next evaluation plans it again"
            return self._fail(item, message, FailureKind.CANCELLED, info=info), None
        tail = best_effort(lambda: self.backend.logs(item.job_id, tail_lines=30)) if item.job_id else ""
        kind = refine_with_log(failure_kind_of(info), tail or "")
        error = failure_message(info, kind, tail or "")
        full = (
            preparation.full_file_system(item.layout) if kind in (FailureKind.EXIT_CODE, FailureKind.SIGNAL) else None
        )
        if full is not None:
            # The payload's own write failed (its output directory may be a file system of its own): the exit code
            # is only the payload's reaction, the full disk is the cause, and a retry finds it as full.
            kind = FailureKind.DISK_FULL
            error = f"no space left on device (ENOSPC): the file system of {full} is full; {error}"
        outcome = self._fail(item, error, kind, info=info)
        retry = item.ref.retry
        resources = retry_resources(item.resources, kind, base=step.resources, caps=self.caps)
        if retry < step.max_retries and resources is not None and not self._cancel.is_set():
            change = describe_resource_change(item.resources, resources)
            self.report(
                f"attempt {item.attempt_id} failed ({kind.value}: {error.splitlines()[0]}); "
                f"retry {retry + 1} of {step.max_retries}{change}"
            )
            return outcome, Queued(item.plan, retry + 1, resources, (*item.earlier, kind))
        if retry < step.max_retries and resources is None and not self._cancel.is_set():
            self.report(f"attempt {item.attempt_id}: {kind.value} is not retried (a retry cannot fix it)")
        outcome.metadata.update(
            {
                k: v
                for k, v in {
                    "exit_code": info.exit_code,
                    "wall_time_seconds": info.wall_time_seconds,
                    "cpu_hours": info.cpu_hours,
                    "peak_memory_gb": info.peak_memory_gb,
                }.items()
                if v is not None
            }
        )
        return outcome, None

    def _completed(
        self,
        item: Active,
        info: JobInfo,
        step: StepDefinition,
        product_count: int,
        product_bytes: int,
        products: Sequence[DiscoveredProduct] = (),
    ) -> SubGroupOutcome:
        log.debug("attempt %s [%s]: completed, %s product(s)", item.attempt_id, item.plan.sub_group_key, product_count)
        return completed_outcome(
            item.plan,
            attempt_id=item.attempt_id,
            attempt_number=item.ref.attempt_number,
            step=step,
            info=info,
            backend=self.backend.name,
            job_id=item.job_id,
            resources=item.resources,
            products=(product_count, product_bytes),
            products_dir=str(item.layout.products_dir),
            earlier=item.earlier,
            product_files=products,
        )

    def _fail(
        self,
        item: Active,
        error: str,
        kind: FailureKind,
        *,
        info: JobInfo | None = None,
        cancelled: bool = False,
    ) -> SubGroupOutcome:
        self.store.fail(item.attempt_id, error=error, kind=kind, info=info, cancelled=cancelled)
        status = "cancelled" if cancelled else "failed"
        self.report(f"attempt {item.attempt_id} [{item.plan.sub_group_key}]: {status} ({kind.value}): {error}")
        return self._outcome_of(item, OutcomeKind.CANCELLED if cancelled else OutcomeKind.FAILED, error, kind)

    def _outcome_of(
        self, item: Active, kind: OutcomeKind, detail: str, failure_kind: FailureKind | None = None
    ) -> SubGroupOutcome:
        return SubGroupOutcome(
            item.plan.sub_group_key,
            kind,
            attempt_id=item.attempt_id,
            attempts=item.ref.attempt_number,
            fingerprint=item.plan.fingerprint,
            detail=detail,
            metadata={"failure_kind": failure_kind.value} if failure_kind else {},
            failure_kind=failure_kind,
        )

    @staticmethod
    def _skipped(plan: SubGroupPlan, detail: str) -> SubGroupOutcome:
        return SubGroupOutcome(
            plan.sub_group_key,
            OutcomeKind.SKIPPED,
            fingerprint=plan.fingerprint,
            detail=detail,
            waits_for_recreation=waits_for_recreation(plan),
        )
