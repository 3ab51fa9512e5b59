"""Starting attempts: the first tries, reattached jobs, free slots, and submission with its recording.

A round of sub-groups gets its attempts in one transaction (``AttemptStore.create_round``), its inputs staged
and its jobs prepared (``AttemptPreparation``), then submitted together (one by one when that fails, so a refused
job fails only its own attempt) and recorded SUBMITTED with their job ids. Jobs whose ids ops-db never learnt
are cancelled, since nothing could ever adopt or collect them. ``StepRunner`` (``execution.runner``) mixes this
in; the attributes below are its own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from ccat_dagster.execution.attempts import AttemptRef
from ccat_dagster.execution.batch import Active, Queued, best_effort
from ccat_dagster.execution.failures import ResourceCaps, retry_resources, submission_failure_kind
from ccat_dagster.execution.hpc.base import HpcBackend, HpcError, JobSpec
from ccat_dagster.execution.outcomes import RunLog, SubGroupOutcome
from ccat_dagster.execution.planning import SubGroupPlan
from ccat_dagster.execution.preparation import AttemptPreparation, PreparationFailure, Staged
from ccat_dagster.execution.resilience import ResilientAttemptStore
from ccat_dagster.execution.step import StepDefinition
from ccat_dagster.opsdb.enums import FailureKind, RunStatus

if TYPE_CHECKING:
    from ccat_dagster.execution.runner import RunnerConfig

log = logging.getLogger(__name__)


class AttemptSubmission:
    """The starting half of ``StepRunner``: attempts created, prepared, submitted and recorded."""

    config: RunnerConfig
    backend: HpcBackend
    store: ResilientAttemptStore
    caps: ResourceCaps
    clock: Callable[[], float]
    report: Callable[[str], None]
    log: RunLog
    submit_seconds: float
    _run_id: str
    _submitted: int
    # From ``AttemptCollection``.
    _fail: Callable[..., SubGroupOutcome]
    _skipped: Callable[[SubGroupPlan, str], SubGroupOutcome]

    def _first_tries(self, plans: list[SubGroupPlan], step: StepDefinition) -> list[Queued]:
        """A sub-group whose last attempt with these inputs ran out of memory or time starts with more."""
        earlier = self.store.last_failures(step.step_id, [(p.sub_group_key, p.fingerprint) for p in plans])
        queue = []
        for plan in plans:
            kind = earlier.get(plan.sub_group_key)
            more = retry_resources(step.resources, kind, base=step.resources, caps=self.caps) if kind else None
            resources = more if kind in (FailureKind.OOM, FailureKind.WALLTIME) and more else step.resources
            queue.append(Queued(plan, 0, resources, (kind,) if kind else ()))
        return queue

    def _adopted(
        self, plan: SubGroupPlan, ref: AttemptRef, step: StepDefinition, preparation: AttemptPreparation
    ) -> Active:
        self.report(
            f"attempt {ref.attempt_id} [{plan.sub_group_key}]: reattached to {self.backend.name} "
            f"job {ref.job_id} left by run {ref.owner_run_id}"
        )
        return Active(
            plan=plan,
            ref=ref,
            layout=preparation.layout(plan.sub_group_key, ref.attempt_id),
            resources=step.resources,
            job_id=ref.job_id,
            running=ref.status is RunStatus.RUNNING,
        )

    def _free_slots(self, active: list[Active]) -> int:
        """Jobs this run may submit now: ``max_in_flight`` minus the backend's jobs in flight at this location.

        Other runs' jobs are counted in ops-db (one COUNT per submission round); two runs that count at the same
        moment may overshoot the limit by one round of theirs, never more.
        """
        own = sum(1 for a in active if a.job_id)
        elsewhere = self.store.count_in_flight(
            processing_location_id=self.config.processing_location_id,
            backend=self.backend.name,
            excluding_run_id=self._run_id,
        )
        return self.config.max_in_flight - own - elsewhere

    def _start(
        self, batch: list[Queued], step: StepDefinition, preparation: AttemptPreparation
    ) -> tuple[list[Active], list[SubGroupOutcome]]:
        """Create attempts, stage inputs, prepare and submit the jobs of a round; each failure is its own."""
        refs, conflicts = self.store.create_round(
            [(q.plan, q.retry) for q in batch],
            run_id=self._run_id,
            backend=self.backend.name,
            attempt_dir_of=lambda key, attempt_id: str(preparation.layout(key, attempt_id).attempt_dir),
        )
        by_key = {q.plan.sub_group_key: q for q in batch}
        failed = [
            self._skipped(by_key[key].plan, "another run started this sub-group at the same moment")
            for key in conflicts
        ]
        created = [
            Active(
                plan=by_key[ref.sub_group_key].plan,
                ref=ref,
                layout=preparation.layout(ref.sub_group_key, ref.attempt_id),
                resources=by_key[ref.sub_group_key].resources,
                earlier=by_key[ref.sub_group_key].earlier,
            )
            for ref in refs
        ]
        if not created:
            return [], failed
        staged = self.store.through_outages("staging", preparation.stage, [item.plan for item in created])
        ready: list[tuple[Active, JobSpec]] = []
        for item in created:
            inputs: Staged | PreparationFailure = staged[item.plan.sub_group_key]
            try:
                if isinstance(inputs, PreparationFailure):
                    raise inputs
                spec = self.store.through_outages(
                    "preparation",
                    preparation.prepare,
                    item.plan,
                    item.ref,
                    resources=item.resources,
                    staged=inputs,
                    run_id=self._run_id,
                )
            except PreparationFailure as error:
                failed.append(self._fail(item, str(error), error.kind))
                continue
            ready.append((item, spec))
        submitted, refused = self._submit(ready)
        for item, error, kind in refused:
            failed.append(self._fail(item, error, kind))
        if submitted:
            self._record_submitted(submitted)
        return [item for item, _ in submitted], failed

    def _submit(
        self, ready: list[tuple[Active, JobSpec]]
    ) -> tuple[list[tuple[Active, str]], list[tuple[Active, str, FailureKind]]]:
        """All jobs of the round together; when that fails, one by one, so a refused job fails only its own."""
        if not ready:
            return [], []
        began = self.clock()
        try:
            try:
                job_ids = self.backend.submit_many([spec for _, spec in ready])
                return [(item, job_id) for (item, _), job_id in zip(ready, job_ids, strict=True)], []
            except HpcError as error:
                if len(ready) == 1:
                    return [], [(ready[0][0], f"submission failed: {error}", submission_failure_kind(error))]
                log.warning("submitting %s job(s) together failed (%s); one by one instead", len(ready), error)
            submitted, refused = [], []
            for item, spec in ready:
                try:
                    submitted.append((item, self.backend.submit(spec)))
                except HpcError as error:
                    refused.append((item, f"submission failed: {error}", submission_failure_kind(error)))
            return submitted, refused
        finally:
            self.submit_seconds += self.clock() - began

    def _record_submitted(self, submitted: list[tuple[Active, str]]) -> None:
        try:
            self.store.mark_submitted(
                [(item.attempt_id, job_id) for item, job_id in submitted], backend=self.backend.name
            )
        except BaseException:
            # Jobs whose ids ops-db never learnt can never be adopted or collected: these alone are cancelled.
            for _, job_id in submitted:
                best_effort(lambda job_id=job_id: self.backend.cancel(job_id))
            raise
        for item, job_id in submitted:
            item.job_id = job_id
        self._submitted += len(submitted)
        job_ids = [job_id for _, job_id in submitted]
        message = (
            f"submitted {len(submitted)} job(s) to {self.backend.name} (attempts {submitted[0][0].attempt_id}"
            + (f"–{submitted[-1][0].attempt_id}" if len(submitted) > 1 else "")
            + f"): {', '.join(job_ids[:5])}"
            + (" …" if len(job_ids) > 5 else "")
        )
        log.info(message)
        # A round is a few jobs when a job ends every moment: the run log gets a line per round only now and then.
        self.log.throttled("submit", f"{message}; {self._submitted} submitted by this run so far")
