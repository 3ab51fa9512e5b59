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

Besides the loop, each in its own module: starting attempts and their submission (``execution.submission``),
collection and the ending of failed and completed attempts (``execution.collection``), the batch's queued and
in-flight sub-groups (``execution.batch``), the poller of a backend (``execution.polling.poller_for``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from sqlalchemy import Engine

from ccat_dagster.errors import CcatError
from ccat_dagster.execution.attempts import Adoption, AttemptStore, OpsDbAttemptStore
from ccat_dagster.execution.batch import Active, Queued, best_effort, waits_for_recreation
from ccat_dagster.execution.collection import AttemptCollection
from ccat_dagster.execution.failures import ResourceCaps
from ccat_dagster.execution.hpc.base import HpcBackend, JobInfo, JobState
from ccat_dagster.execution.outcomes import OutcomeKind, Progress, RunLog, SubGroupOutcome
from ccat_dagster.execution.planning import Planner, Readiness, SubGroupPlan, load_pipeline, recreation_hint
from ccat_dagster.execution.polling import poller_for
from ccat_dagster.execution.preparation import AttemptPreparation, ContainerPreparation
from ccat_dagster.execution.resilience import ResilientAttemptStore
from ccat_dagster.execution.runtimes import ContainerRuntime
from ccat_dagster.execution.staging import Stager
from ccat_dagster.execution.step import StepDefinition
from ccat_dagster.execution.submission import AttemptSubmission
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


class _Cancelled(Exception):
    pass


class StepRunner(AttemptSubmission, AttemptCollection):
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
        config = self.config
        self.poller = poller_for(
            backend,
            clock=self.clock,
            run_log=self.log,
            status_cache_dir=config.status_cache_dir,
            processing_location_id=config.processing_location_id,
            tolerance_seconds=config.scheduler_tolerance_seconds,
            min_interval=config.min_poll_interval_seconds,
            max_interval=config.poll_interval_seconds,
            queries_per_minute=config.scheduler_queries_per_minute,
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
                plans = [replace(p, detail=hint) if waits_for_recreation(p) else p for p in plans]
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
            best_effort(chosen.close)  # the batch's allocations are released, however it ended

    def _execute(
        self, step: StepDefinition, plans: Sequence[SubGroupPlan], dagster_run_id: str, retry_failed: bool
    ) -> dict[str, SubGroupOutcome]:
        preparation = self.preparation or self._container_preparation(step)
        outcomes: dict[str, SubGroupOutcome] = {}
        starts: list[SubGroupPlan] = []
        adopted: list[Active] = []
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
            if queue:  # the packed engine's first allocation comes up while the first round is staged
                best_effort(lambda: self.backend.prepare_for(queue[0].resources))
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

    # ------------------------------------------------------------------ the loop

    def _loop(
        self,
        queue: list[Queued],
        active: list[Active],
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
            best_effort(self.on_round_end)
            best_effort(self.poller.close)
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
        self, active: list[Active], queue: list[Queued], error: BaseException, *, terminated: bool
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

    # ------------------------------------------------------------------ polling

    def _poll(self, active: list[Active]) -> dict[str, JobInfo] | None:
        infos = self.poller.poll([a.job_id for a in active if a.job_id])
        self.status_query_seconds = self.poller.query_seconds
        return infos

    def _staging_progress(self, message: str) -> None:
        """Every staging message to the Python log; to the run log at most every ``progress_report_seconds``."""
        log.info(message)
        self.log.throttled("staging", message)

    def _note_running(self, items: list[Active], infos: dict[str, JobInfo]) -> None:
        """Record RUNNING for the jobs that started since the last poll, all in one transaction."""
        started = [a for a in items if infos[a.job_id].state is JobState.RUNNING and not a.running]
        if not started:
            return
        self.store.mark_running([a.attempt_id for a in started])
        for item in started:
            item.running = True
