"""Run one step for a batch of sub-groups: the scheduling loop, and nothing else.

The path of the data, top to bottom: plan (gap evaluation) → attempts (``AttemptStore``) → staging, manifest
and command (``AttemptPreparation``) → backend submit (bounded by ``max_in_flight``) → one status poll for all
jobs → collection (products + lineage + COMPLETED in one transaction, ``AttemptStore.register_round``). Each
sub-group has its own attempt and outcome: a failure at any phase (staging, preparation, submission, the job,
collection) fails only its sub-group, typed by a ``FailureKind``; a retry follows the kind
(``execution.failures``: more memory after oom, more time after walltime, never after a contract failure).

The loop never cancels a job because of its own trouble. A status query that fails (the scheduler restarting,
overloaded, a command timing out) is logged as "waiting for the scheduler" and waited out with back-off for
``scheduler_tolerance_seconds``; only then do the affected attempts fail as ``scheduler_unavailable``, and
their jobs are left alone. Ops-db calls are retried through outages (``execution.resilience``). Should the
batch itself break, its attempts stay as ops-db recorded them (non-terminal, with their job ids), and the next
run of the step adopts them. Only ``cancel()`` or Dagster's run termination (a ``BaseException`` in the asset
body) cancels jobs.

Time is injected (``clock``, ``sleep``), and so are the store and the preparation, so that the loop is tested
in milliseconds with fakes (tests/test_runner_loop.py) besides the real-backend tests.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from ccat_dagster.errors import CcatError
from ccat_dagster.execution import contract
from ccat_dagster.execution.attempts import Adoption, AttemptRef, AttemptStore, OpsDbAttemptStore
from ccat_dagster.execution.discovery import DiscoveredProduct
from ccat_dagster.execution.failures import (
    ResourceCaps,
    describe_resource_change,
    failure_kind_of,
    failure_message,
    refine_with_log,
    retry_resources,
    submission_failure_kind,
)
from ccat_dagster.execution.hpc.base import (
    HpcBackend,
    HpcError,
    JobInfo,
    JobResources,
    JobSpec,
    JobState,
)
from ccat_dagster.execution.outcomes import OutcomeKind, Progress, RunLog, SubGroupOutcome, completed_outcome
from ccat_dagster.execution.planning import (
    GapReason,
    Planner,
    Readiness,
    SubGroupPlan,
    load_pipeline,
    recreation_hint,
)
from ccat_dagster.execution.polling import StatusPoller
from ccat_dagster.execution.preparation import (
    AttemptPreparation,
    ContainerPreparation,
    PreparationFailure,
    Staged,
)
from ccat_dagster.execution.resilience import ResilientAttemptStore
from ccat_dagster.execution.runtimes import ContainerRuntime
from ccat_dagster.execution.staging import Stager
from ccat_dagster.execution.status_cache import SharedStatusCache, cache_directory
from ccat_dagster.execution.step import StepDefinition
from ccat_dagster.opsdb.engine import session_scope
from ccat_dagster.opsdb.enums import FailureKind, RunStatus
from ccat_dagster.opsdb.models import utcnow

Reporter = Callable[[str], None]
log = logging.getLogger(__name__)
__all__ = ["OutcomeKind", "RunnerConfig", "RunnerError", "StepRunner", "SubGroupOutcome"]


class RunnerError(CcatError):
    """A batch could not be run at all (bad pipeline or step, nothing to do where work was required)."""


@dataclass(frozen=True)
class RunnerConfig:
    pipeline_base_dir: Path
    processing_location_id: int
    sif_cache_dir: Path
    max_in_flight: int = 4
    """Jobs of this backend in flight from the processing location (all runs), counted in ops-db."""
    poll_interval_seconds: float = 2.0
    """The longest pause between two status polls (the back-off ceiling)."""
    min_poll_interval_seconds: float = 0.2
    """The first pause after a submission or a finished job; grows ×1.5 per poll that sees nothing end."""
    scheduler_queries_per_minute: float = 20.0
    """Against a shared scheduler (Slurm): the status calls per minute all runs of this location may send; the
    pause after a change is what keeps within it (see ``execution.polling``)."""
    status_cache_dir: Path | None = None
    """Where the runs of this location share one status query per poll (None: each run asks alone)."""
    staging_timeout_seconds: float = 3600.0
    pre_walltime_signal_seconds: int = 120
    progress_report_seconds: float = 10.0
    """At most one "N of M sub-groups done" line per this many seconds in the run log."""
    scheduler_tolerance_seconds: float = 900.0
    """How long status queries may fail before the attempts waiting on them fail as scheduler_unavailable."""
    scheduler_backoff_max_seconds: float = 60.0
    """The longest pause between two status queries while the scheduler does not answer."""
    opsdb_tolerance_seconds: float = 300.0
    """How long an ops-db call is retried through connection failures before the batch gives up."""
    max_memory_gb: float = 512.0
    """The most memory a retry after oom may ask for."""
    max_time_hours: float = 48.0
    """The most time a retry after walltime may ask for."""
    max_products_per_attempt: int | None = 10_000
    """More files than this in an attempt's output is refused (contract)."""


@dataclass
class _Queued:
    """A sub-group waiting for a submission slot: its next attempt's retry number and resources."""

    plan: SubGroupPlan
    retry: int
    resources: JobResources
    earlier: tuple[FailureKind, ...] = ()


@dataclass
class _Active:
    """One attempt in flight inside this batch."""

    plan: SubGroupPlan
    ref: AttemptRef
    layout: contract.AttemptLayout
    resources: JobResources
    job_id: str | None = None
    running: bool = False
    earlier: tuple[FailureKind, ...] = ()

    @property
    def attempt_id(self) -> int:
        return self.ref.attempt_id


class _Cancelled(Exception):
    pass


class StepRunner:
    """Executes one step of one pipeline for a batch of sub-group keys."""

    def __init__(
        self,
        *,
        engine: Engine | None,
        backend: HpcBackend,
        runtime: ContainerRuntime | None,
        stager: Stager | None,
        config: RunnerConfig,
        report: Reporter = lambda _message: None,
        is_run_alive: Callable[[str], bool] = lambda _run_id: False,
        on_outcome: Callable[[SubGroupOutcome], None] = lambda _outcome: None,
        on_round_end: Callable[[], None] = lambda: None,
        store: AttemptStore | None = None,
        preparation: AttemptPreparation | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] | None = None,
        backend_for_step: Callable[[StepDefinition], HpcBackend | None] = lambda _step: None,
    ) -> None:
        self.engine = engine
        self.backend_for_step = backend_for_step
        self.runtime = runtime
        self.stager = stager
        self.config = config
        self.report = report
        self.is_run_alive = is_run_alive
        self.on_outcome = on_outcome
        self.on_round_end = on_round_end
        self.clock = clock
        self._cancel = threading.Event()
        self.sleep = sleep or self._cancel.wait
        if store is None:
            if engine is None:
                raise RunnerError("StepRunner needs an engine (ops-db) or an AttemptStore")
            store = OpsDbAttemptStore(engine)
        # Not the cancellable wait: a cancelled batch still records its cancellations, waiting for ops-db to answer.
        self.store: ResilientAttemptStore = ResilientAttemptStore(
            store,
            tolerance_seconds=config.opsdb_tolerance_seconds,
            clock=clock,
            sleep=sleep or time.sleep,
            report=report,
        )
        self.preparation = preparation
        self.caps = ResourceCaps(max_memory_gb=config.max_memory_gb, max_time_hours=config.max_time_hours)
        # Where a batch's time went besides ccat-dagster's own work (benchmarks/bench_scale.py reads them).
        self.waited_seconds = 0.0
        self.status_query_seconds = 0.0
        self.submit_seconds = 0.0
        self._run_id = ""
        # After ``run(by_hand=True)``: (step, sub-group keys) to materialize first, upstream first, for the
        # sub-groups that wait for intermediates retention deleted (empty when none waits).
        self.recreate_first: list[tuple[str, list[str]]] = []
        self.log = RunLog(report, every_seconds=config.progress_report_seconds, clock=clock)
        self._submitted = 0
        self._use_backend(backend)

    def _use_backend(self, backend: HpcBackend) -> None:
        """Jobs go to ``backend``, polled at its pace (a step may choose another backend, e.g. packed)."""
        self.backend = backend
        config, clock = self.config, self.clock
        shared = None
        if config.status_cache_dir is not None and backend.shares_a_scheduler:
            shared = SharedStatusCache(
                cache_directory(
                    config.status_cache_dir,
                    backend=backend.name,
                    processing_location_id=config.processing_location_id,
                ),
                # Shared by processes (and hosts) that do not share a monotonic clock; a fake clock in tests.
                clock=time.time if clock is time.monotonic else clock,
                queries_per_minute=config.scheduler_queries_per_minute,
                count_calls=lambda: backend.scheduler_queries,
            )
        self.poller = StatusPoller(
            backend,
            tolerance_seconds=config.scheduler_tolerance_seconds,
            clock=clock,
            log=self.log,
            min_interval=config.min_poll_interval_seconds,
            max_interval=config.poll_interval_seconds,
            queries_per_minute=config.scheduler_queries_per_minute,
            shared=shared,
        )

    def cancel(self) -> None:
        """Ask the batch to stop: jobs in flight are cancelled and their attempts end CANCELLED."""
        self._cancel.set()

    # ------------------------------------------------------------------ entry points

    def run(
        self,
        *,
        pipeline_name: str,
        step_name: str,
        sub_group_keys: Sequence[str],
        dagster_run_id: str,
        force: bool = False,
        retry_failed: bool = False,
        by_hand: bool = False,
    ) -> list[SubGroupOutcome]:
        """Run the sub-groups of ``sub_group_keys`` that need it; one outcome per key, in order.

        ``force`` also redoes up-to-date sub-groups (a manual run). ``retry_failed`` (a re-execution or retry of
        an earlier run) also redoes sub-groups whose attempts with the current inputs all failed, past
        ``max_retries``; up-to-date ones are still skipped, so only the failed ones run again. ``by_hand`` (a run
        a person launched): a sub-group waiting for upstream intermediates that retention deleted says which
        upstream sub-groups to materialize first, since no trigger re-creates them for this run.
        """
        if self.engine is None:
            raise RunnerError("StepRunner.run plans from ops-db: give it an engine")
        keys = list(dict.fromkeys(sub_group_keys))
        with session_scope(self.engine) as session:
            pipeline = load_pipeline(session, pipeline_name)
            planner = Planner(session, pipeline, now=utcnow())
            plans = planner.plan_keys(step_name, keys, respect_cooldown=False, force=force)
            self.recreate_first = planner.recreation_order(step_name) if by_hand else []
            if order := self.recreate_first:
                hint = recreation_hint(pipeline_name, order)
                plans = [replace(p, detail=hint) if _waits_for_recreation(p) else p for p in plans]
            info = planner.step_info(step_name)
            step = StepDefinition.of(pipeline, info.step, info.version)
        outcomes = self.execute(step=step, plans=plans, dagster_run_id=dagster_run_id, retry_failed=retry_failed)
        return [outcomes[k] for k in keys]

    def execute(
        self, *, step: StepDefinition, plans: Sequence[SubGroupPlan], dagster_run_id: str, retry_failed: bool = False
    ) -> dict[str, SubGroupOutcome]:
        """The loop for planned sub-groups: start the gaps, adopt the in-flight ones, skip the rest."""
        self._run_id = dagster_run_id
        chosen = self.backend_for_step(step)
        if chosen is None:
            return self._execute(step, plans, dagster_run_id, retry_failed)
        self.report(f"{step.asset_label}: sub-groups run packed ({chosen.name} backend, {step.execution_mode.value})")
        self._use_backend(chosen)
        try:
            return self._execute(step, plans, dagster_run_id, retry_failed)
        finally:
            _best_effort(chosen.close)  # the batch's allocations are released, however it ended

    def _execute(
        self, step: StepDefinition, plans: Sequence[SubGroupPlan], dagster_run_id: str, retry_failed: bool
    ) -> dict[str, SubGroupOutcome]:
        preparation = self.preparation or self._container_preparation(step)
        outcomes: dict[str, SubGroupOutcome] = {}
        starts: list[SubGroupPlan] = []
        adopted: list[_Active] = []
        for plan in plans:
            if plan.readiness is Readiness.GAP or (retry_failed and plan.readiness is Readiness.EXHAUSTED):
                starts.append(plan)
            elif plan.readiness is Readiness.IN_FLIGHT:
                result = self.store.adopt(plan, run_id=dagster_run_id, is_run_alive=self.is_run_alive)
                if result.outcome is Adoption.ADOPTED and result.attempt is not None:
                    adopted.append(self._adopted(plan, result.attempt, step, preparation))
                elif result.outcome is Adoption.ENDED:
                    starts.append(plan)  # the attempt could not be reattached: the gap is still there
                else:
                    outcomes[plan.sub_group_key] = self._skipped(plan, f"in flight in another run: {plan.detail}")
            else:
                outcomes[plan.sub_group_key] = self._skipped(
                    plan, f"{plan.readiness.value}: {plan.detail}".rstrip(": ")
                )
        queue = self._first_tries(starts, step)
        total = len(queue) + len(adopted)
        self.report(
            f"{step.asset_label}: {total} sub-group(s) to run, {len(outcomes)} skipped"
            + "".join(f"\n  skipped {k}: {o.detail}" for k, o in list(outcomes.items())[:20])
        )
        if total:
            outcomes.update(self._loop(queue, adopted, step, preparation, total))
        return outcomes

    def _container_preparation(self, step: StepDefinition) -> ContainerPreparation:
        if self.engine is None or self.runtime is None or self.stager is None:
            raise RunnerError("StepRunner needs an engine, a container runtime and a stager to prepare attempts")
        return ContainerPreparation(
            engine=self.engine,
            step=step,
            runtime=self.runtime,
            stager=self.stager,
            pipeline_base_dir=self.config.pipeline_base_dir,
            processing_location_id=self.config.processing_location_id,
            sif_cache_dir=self.config.sif_cache_dir,
            staging_timeout_seconds=self.config.staging_timeout_seconds,
            pre_walltime_signal_seconds=self.config.pre_walltime_signal_seconds,
            max_products=self.config.max_products_per_attempt,
            progress=self._staging_progress,
        )

    def _first_tries(self, plans: list[SubGroupPlan], step: StepDefinition) -> list[_Queued]:
        """A sub-group whose last attempt with these inputs ran out of memory or time starts with more."""
        earlier = self.store.last_failures(step.step_id, [(p.sub_group_key, p.fingerprint) for p in plans])
        queue = []
        for plan in plans:
            kind = earlier.get(plan.sub_group_key)
            more = retry_resources(step.resources, kind, base=step.resources, caps=self.caps) if kind else None
            resources = more if kind in (FailureKind.OOM, FailureKind.WALLTIME) and more else step.resources
            queue.append(_Queued(plan, 0, resources, (kind,) if kind else ()))
        return queue

    def _adopted(
        self, plan: SubGroupPlan, ref: AttemptRef, step: StepDefinition, preparation: AttemptPreparation
    ) -> _Active:
        self.report(
            f"attempt {ref.attempt_id} [{plan.sub_group_key}]: reattached to {self.backend.name} "
            f"job {ref.job_id} left by run {ref.owner_run_id}"
        )
        return _Active(
            plan=plan,
            ref=ref,
            layout=preparation.layout(plan.sub_group_key, ref.attempt_id),
            resources=step.resources,
            job_id=ref.job_id,
            running=ref.status is RunStatus.RUNNING,
        )

    # ------------------------------------------------------------------ the loop

    def _loop(
        self,
        queue: list[_Queued],
        active: list[_Active],
        step: StepDefinition,
        preparation: AttemptPreparation,
        total: int,
    ) -> dict[str, SubGroupOutcome]:
        outcomes: dict[str, SubGroupOutcome] = {}
        progress = Progress(total, self.log)
        wait = self.poller.floor

        def settle(outcome: SubGroupOutcome) -> None:
            outcomes[outcome.sub_group_key] = outcome
            progress.done(outcome)
            self.on_outcome(outcome)

        try:
            # A job that exited 0 and whose collection a dead run began: collect it now, whatever the scheduler
            # still remembers of the job (it may have been purged since).
            collecting = [a for a in active if a.ref.status is RunStatus.COLLECTING_RESULTS]
            if collecting:
                active = [a for a in active if a.ref.status is not RunStatus.COLLECTING_RESULTS]
                exited = [(a, JobInfo(a.job_id or "", JobState.COMPLETED, exit_code=0)) for a in collecting]
                for outcome in self._collect(exited, step, preparation):
                    settle(outcome)
            next_poll = self.clock()  # the first poll right after the first submissions
            while queue or active:
                if self._cancel.is_set():
                    raise _Cancelled()
                free = self._free_slots(active) if queue else 0
                refilled = False
                if free > 0:
                    batch, queue = queue[:free], queue[free:]
                    started, failed = self._start(batch, step, preparation)
                    active.extend(started)
                    for outcome in failed:
                        settle(outcome)
                    refilled = bool(started)
                ended = False
                if active and self.clock() >= next_poll and (hold := self.poller.budget_wait()) > 0:
                    next_poll = self.clock() + hold  # this minute's scheduler calls are spent
                elif active and self.clock() >= next_poll:
                    infos = self._poll(active)
                    if infos is None:  # the scheduler did not answer: wait longer, or give up on these jobs
                        gone = self._scheduler_gone(active)
                        for outcome in gone:
                            settle(outcome)
                        if gone:
                            active = []
                        wait = min(max(wait * 2, self.poller.floor), self._trouble_backoff)
                    else:
                        self.log.waiting(self.backend.name, [a.job_id for a in active], infos)
                        self._note_running([a for a in active if a.job_id in infos], infos)
                        finished = [
                            (a, infos[a.job_id]) for a in active if a.job_id in infos and infos[a.job_id].is_terminal
                        ]
                        if finished:
                            done = {id(a) for a, _ in finished}
                            active = [a for a in active if id(a) not in done]
                            for outcome, retry in self._finish(finished, step, preparation):
                                if retry is not None:
                                    queue.append(retry)
                                else:
                                    settle(outcome)
                            ended = True
                        wait = self.poller.next_wait(changed=ended or refilled)
                    next_poll = self.clock() + wait
                elif refilled:
                    # New jobs: the next poll comes no later than the floor after them, never at once.
                    next_poll = min(next_poll, self.clock() + self.poller.next_wait(changed=True))
                self.on_round_end()
                if ended and queue:
                    continue  # slots were freed: refill them now; the next poll still waits its turn
                if active or queue:
                    # Nothing ended, or this location's slots are held by other runs: wait, then look again.
                    pause = max(next_poll - self.clock(), 0.0) if active else wait
                    if pause > 0:
                        began = self.clock()
                        self.sleep(pause)
                        self.waited_seconds += self.clock() - began
        except BaseException as error:  # Dagster's run termination arrives as a BaseException
            terminated = not isinstance(error, Exception) or isinstance(error, _Cancelled) or self._cancel.is_set()
            outcomes.update(self._stop(active, queue, error, terminated=terminated))
            _best_effort(self.on_round_end)
            _best_effort(self.poller.close)
            if not isinstance(error, _Cancelled):
                raise
        self.poller.close()
        progress.finish()
        self.on_round_end()
        return outcomes

    @property
    def _trouble_backoff(self) -> float:
        return max(self.config.poll_interval_seconds, self.config.scheduler_backoff_max_seconds)

    def _stop(
        self, active: list[_Active], queue: list[_Queued], error: BaseException, *, terminated: bool
    ) -> dict[str, SubGroupOutcome]:
        """End the batch. Terminated: cancel the jobs, attempts CANCELLED. Broken by its own error: leave the
        jobs running and their attempts as recorded, for the next run of the step to adopt."""
        outcomes: dict[str, SubGroupOutcome] = {}
        if terminated:
            reason = "the Dagster run was terminated"
            for item in active:
                detail = reason
                if item.job_id:
                    try:
                        self.backend.cancel(item.job_id)
                    except CcatError as cancel_error:  # the attempt still ends; say what could not be cancelled
                        detail += f" (cancelling job {item.job_id} failed: {cancel_error})"
                try:
                    outcomes[item.plan.sub_group_key] = self._fail(item, detail, FailureKind.CANCELLED, cancelled=True)
                except Exception:  # noqa: BLE001 - ops-db away: a later run ends the attempt
                    log.warning("could not record the cancellation of attempt %s", item.attempt_id, exc_info=True)
                    outcomes[item.plan.sub_group_key] = self._outcome_of(item, OutcomeKind.CANCELLED, detail)
        else:
            reason = (
                f"the batch stopped ({error!r}); its jobs were not cancelled: the next run of this step "
                "adopts them by their recorded job ids"
            )
            self.report(f"{len(active)} attempt(s) left in flight: {reason}")
            for item in active:
                outcomes[item.plan.sub_group_key] = self._outcome_of(item, OutcomeKind.FAILED, reason)
        kind = OutcomeKind.CANCELLED if terminated else OutcomeKind.FAILED
        for queued in queue:
            outcomes[queued.plan.sub_group_key] = SubGroupOutcome(
                queued.plan.sub_group_key, kind, fingerprint=queued.plan.fingerprint, detail=reason
            )
        return outcomes

    def _free_slots(self, active: list[_Active]) -> int:
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

    # ------------------------------------------------------------------ starting attempts

    def _start(
        self, batch: list[_Queued], step: StepDefinition, preparation: AttemptPreparation
    ) -> tuple[list[_Active], list[SubGroupOutcome]]:
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
            _Active(
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
        ready: list[tuple[_Active, JobSpec]] = []
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
        self, ready: list[tuple[_Active, JobSpec]]
    ) -> tuple[list[tuple[_Active, str]], list[tuple[_Active, str, FailureKind]]]:
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

    def _record_submitted(self, submitted: list[tuple[_Active, str]]) -> None:
        try:
            self.store.mark_submitted(
                [(item.attempt_id, job_id) for item, job_id in submitted], backend=self.backend.name
            )
        except BaseException:
            # Jobs whose ids ops-db never learnt can never be adopted or collected: these alone are cancelled.
            for _, job_id in submitted:
                _best_effort(lambda job_id=job_id: self.backend.cancel(job_id))
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

    # ------------------------------------------------------------------ polling

    def _poll(self, active: list[_Active]) -> dict[str, JobInfo] | None:
        infos = self.poller.poll([a.job_id for a in active if a.job_id])
        self.status_query_seconds = self.poller.query_seconds
        return infos

    def _scheduler_gone(self, active: list[_Active]) -> list[SubGroupOutcome]:
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

    def _staging_progress(self, message: str) -> None:
        """Every staging message to the Python log; to the run log at most every ``progress_report_seconds``."""
        log.info(message)
        self.log.throttled("staging", message)

    def _note_running(self, items: list[_Active], infos: dict[str, JobInfo]) -> None:
        """Record RUNNING for the jobs that started since the last poll, all in one transaction."""
        started = [a for a in items if infos[a.job_id].state is JobState.RUNNING and not a.running]
        if not started:
            return
        self.store.mark_running([a.attempt_id for a in started])
        for item in started:
            item.running = True

    # ------------------------------------------------------------------ finished jobs

    def _finish(
        self, finished: list[tuple[_Active, JobInfo]], step: StepDefinition, preparation: AttemptPreparation
    ) -> list[tuple[SubGroupOutcome, _Queued | None]]:
        """Jobs that ended in one poll: collect the successful ones together, fail (maybe retry) the others."""
        results: list[tuple[SubGroupOutcome, _Queued | None]] = []
        succeeded = [(a, i) for a, i in finished if i.state is JobState.COMPLETED and i.exit_code in (0, None)]
        if succeeded:
            results.extend((outcome, None) for outcome in self._collect(succeeded, step, preparation))
        for item, info in finished:
            if not (info.state is JobState.COMPLETED and info.exit_code in (0, None)):
                results.append(self._finish_failed(item, info, step, preparation))
        return results

    def _collect(
        self, succeeded: list[tuple[_Active, JobInfo]], step: StepDefinition, preparation: AttemptPreparation
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
        self, item: _Active, info: JobInfo, step: StepDefinition, preparation: AttemptPreparation
    ) -> tuple[SubGroupOutcome, _Queued | None]:
        """A job that did not succeed: fail the attempt with its kind and say whether (and how) to retry."""
        if info.state is JobState.CANCELLED:
            # Cancelled by someone outside ccat-dagster (scancel by an admin, the site's tooling): not a cancel of
            # this run, so the attempt FAILS (kind cancelled) and the next tick plans the sub-group again; it is
            # not retried inside this batch, in case whoever cancelled it had a reason.
            message = f"job {item.job_id} was cancelled outside ccat-dagster; the next evaluation plans it again"
            return self._fail(item, message, FailureKind.CANCELLED, info=info), None
        tail = _best_effort(lambda: self.backend.logs(item.job_id, tail_lines=30)) if item.job_id else ""
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
            return outcome, _Queued(item.plan, retry + 1, resources, (*item.earlier, kind))
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

    # ------------------------------------------------------------------ outcomes

    def _completed(
        self,
        item: _Active,
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
        item: _Active,
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
        self, item: _Active, kind: OutcomeKind, detail: str, failure_kind: FailureKind | None = None
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
            waits_for_recreation=_waits_for_recreation(plan),
        )


def _waits_for_recreation(plan: SubGroupPlan) -> bool:
    return plan.readiness is Readiness.UPSTREAM_NOT_READY and plan.reason is GapReason.MISSING_INTERMEDIATE


def _best_effort(action: Callable[[], Any]) -> Any:
    try:
        return action()
    except Exception:  # noqa: BLE001 - cleanup on the way out must not hide the error that got us here
        log.warning("best-effort action failed", exc_info=True)
        return None
