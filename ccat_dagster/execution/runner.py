"""Run one step for a batch of sub-groups: attempts, staging, container command, HPC jobs, collection.

The path of the data, top to bottom: plan (gap evaluation) → attempt rows → staging → manifest + command →
backend submit (all jobs of the batch, bounded by ``max_in_flight``) → one status poll for all jobs →
collection (products + lineage + COMPLETED in one transaction). Each sub-group has its own attempt and its
own outcome: one failing sub-group fails only itself; a failed attempt is retried as a new attempt while
``max_retries`` allows, with more memory/time after an out-of-memory or timeout failure.

Cost per sub-group is kept small (issue 7): ops-db work is done for a whole submission round or poll in one
transaction (attempt rows, SUBMITTED / RUNNING / COLLECTING_RESULTS), except collection, which is one
transaction per sub-group so that one refused collection never rolls back another. The poll interval starts
at ``min_poll_interval_seconds`` and backs off to ``poll_interval_seconds`` while nothing finishes. Per-
sub-group happy-path messages go to the Python logger; the reporter (the Dagster run log) gets batch lines,
throttled progress and every failure. ``on_outcome`` hears each sub-group's final outcome as soon as it is
known (the asset turns it into a materialization at once, so progress is visible during a long batch), and
``on_round_end`` is called after every submission / poll round (the asset writes that round's events then,
as one batch).

``max_in_flight`` bounds the jobs of this backend in flight from the whole processing location, counted in
ops-db (SUBMITTED / RUNNING attempts), not only this run's.

Job ids are committed to ops-db before waiting, so a run that dies can be re-executed and will reattach to
its jobs instead of submitting them again.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from ccat_dagster.errors import CcatError
from ccat_dagster.execution import contract
from ccat_dagster.execution.discovery import discover_products
from ccat_dagster.execution.hpc.base import HpcBackend, JobInfo, JobResources, JobSpec, JobState, UnknownJobError
from ccat_dagster.execution.images import BuildCheck, resolve_image
from ccat_dagster.execution.planning import Planner, Readiness, SubGroupPlan, load_pipeline
from ccat_dagster.execution.registration import (
    record_input_lineage,
    record_lineage_aggregates,
    register_attempt_results,
)
from ccat_dagster.execution.runtimes import ContainerInvocation, ContainerRuntime
from ccat_dagster.execution.staging import StagedPackage, Stager, require_present_products
from ccat_dagster.opsdb import models as m
from ccat_dagster.opsdb.engine import session_scope
from ccat_dagster.opsdb.enums import TERMINAL_RUN_STATUSES, RunStatus
from ccat_dagster.opsdb.models import utcnow
from ccat_dagster.opsdb.states import transition

Reporter = Callable[[str], None]
log = logging.getLogger(__name__)
# A batch waiting on queued or running jobs says so at least this often, even when nothing changed.
WAIT_REPORT_SECONDS = 300.0


class RunnerError(CcatError):
    """A batch could not be run at all (bad pipeline or step, nothing to do where work was required)."""


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


@dataclass
class _Active:
    """One attempt in flight inside this batch."""

    plan: SubGroupPlan
    attempt_id: int
    attempt_number: int
    layout: contract.AttemptLayout
    resources: JobResources
    spec: JobSpec | None = None
    job_id: str | None = None
    last_state: JobState | None = None
    staged: dict[int, StagedPackage] = field(default_factory=dict)
    retry: int = 0


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
    staging_timeout_seconds: float = 3600.0
    pre_walltime_signal_seconds: int = 120
    progress_report_seconds: float = 10.0
    """At most one "N of M sub-groups done" line per this many seconds in the run log."""


class StepRunner:
    """Executes one step of one pipeline for a batch of sub-group keys."""

    def __init__(
        self,
        *,
        engine: Engine,
        backend: HpcBackend,
        runtime: ContainerRuntime,
        stager: Stager,
        config: RunnerConfig,
        report: Reporter = lambda _message: None,
        is_run_alive: Callable[[str], bool] = lambda _run_id: False,
        on_outcome: Callable[[SubGroupOutcome], None] = lambda _outcome: None,
        on_round_end: Callable[[], None] = lambda: None,
    ) -> None:
        self.engine = engine
        self.backend = backend
        self.runtime = runtime
        self.stager = stager
        self.config = config
        self.report = report
        self.is_run_alive = is_run_alive
        self.on_outcome = on_outcome
        self.on_round_end = on_round_end
        # Where a batch's time went besides ccat-dagster's own work (benchmarks/bench_scale.py reads them).
        self.waited_seconds = 0.0
        self.status_query_seconds = 0.0
        self.submit_seconds = 0.0
        self._cancel = threading.Event()
        self._run_id = ""
        self._last_wait: tuple[str, float] = ("", 0.0)
        self._last_staging_report = float("-inf")
        self._last_submit_report = float("-inf")
        self._submitted = 0

    def cancel(self) -> None:
        """Ask the batch to stop: jobs in flight are cancelled and their attempts end CANCELLED."""
        self._cancel.set()

    # ------------------------------------------------------------------ entry point

    def run(
        self,
        *,
        pipeline_name: str,
        step_name: str,
        sub_group_keys: Sequence[str],
        dagster_run_id: str,
        force: bool = False,
        retry_failed: bool = False,
    ) -> list[SubGroupOutcome]:
        """Run the sub-groups of ``sub_group_keys`` that need it; one outcome per key, in order.

        ``force`` also redoes up-to-date sub-groups (a manual run). ``retry_failed`` (a re-execution or retry of
        an earlier run) also redoes sub-groups whose attempts with the current inputs all failed, past
        ``max_retries``; up-to-date ones are still skipped, so only the failed ones run again.
        """
        keys = list(dict.fromkeys(sub_group_keys))
        outcomes: dict[str, SubGroupOutcome] = {}
        with session_scope(self.engine) as session:
            pipeline = load_pipeline(session, pipeline_name)
            planner = Planner(session, pipeline, now=utcnow())
            plans = planner.plan_keys(step_name, keys, respect_cooldown=False, force=force)
            info = planner.step_info(step_name)
            step = info.step
            is_final = not any(step in s.depends_on for s in pipeline.steps)
            step_snapshot = _StepSnapshot.of(pipeline, step, info.version, is_final)

        queue: list[tuple[SubGroupPlan, int]] = []
        adopted: list[_Active] = []
        for plan in plans:
            if plan.readiness is Readiness.GAP or (retry_failed and plan.readiness is Readiness.EXHAUSTED):
                queue.append((plan, 0))
            elif plan.readiness is Readiness.IN_FLIGHT:
                active = self._adopt(plan, step_snapshot, dagster_run_id)
                if active is None:
                    outcomes[plan.sub_group_key] = SubGroupOutcome(
                        plan.sub_group_key,
                        OutcomeKind.SKIPPED,
                        fingerprint=plan.fingerprint,
                        detail=f"in flight in another run: {plan.detail}",
                    )
                else:
                    adopted.append(active)
            else:
                outcomes[plan.sub_group_key] = SubGroupOutcome(
                    plan.sub_group_key,
                    OutcomeKind.SKIPPED,
                    fingerprint=plan.fingerprint,
                    detail=f"{plan.readiness.value}: {plan.detail}".rstrip(": "),
                )
        total = len(queue) + len(adopted)
        self.report(
            f"{step_snapshot.asset_label}: {total} sub-group(s) to run, {len(outcomes)} skipped"
            + "".join(f"\n  skipped {k}: {o.detail}" for k, o in list(outcomes.items())[:20])
        )
        if total:
            outcomes.update(self._execute(queue, adopted, step_snapshot, dagster_run_id, total))
        return [outcomes[k] for k in keys]

    # ------------------------------------------------------------------ the loop

    def _execute(
        self,
        queue: list[tuple[SubGroupPlan, int]],
        adopted: list[_Active],
        step: _StepSnapshot,
        run_id: str,
        total: int,
    ) -> dict[str, SubGroupOutcome]:
        outcomes: dict[str, SubGroupOutcome] = {}
        active: list[_Active] = list(adopted)
        progress = _Progress(total, self.report, every_seconds=self.config.progress_report_seconds)
        self._run_id = run_id
        wait = self.config.min_poll_interval_seconds

        def settle(outcome: SubGroupOutcome) -> None:
            outcomes[outcome.sub_group_key] = outcome
            progress.done(outcome)
            self.on_outcome(outcome)

        try:
            while queue or active:
                if self._cancel.is_set():
                    raise _Cancelled()
                free = self._free_slots(active) if queue else 0
                if free > 0:
                    batch, queue = queue[:free], queue[free:]
                    started, failed = self._start(batch, step, run_id)
                    active.extend(started)
                    for outcome in failed:
                        settle(outcome)
                    wait = self.config.min_poll_interval_seconds
                if active:
                    infos = self._poll([a.job_id for a in active if a.job_id])
                    self._report_waiting(active, infos)
                    self._note_running(
                        [a for a in active if a.job_id in infos and not infos[a.job_id].is_terminal], infos
                    )
                    finished = [
                        (a, infos[a.job_id]) for a in active if a.job_id in infos and infos[a.job_id].is_terminal
                    ]
                    if finished:
                        ended = {id(a) for a, _ in finished}
                        active = [a for a in active if id(a) not in ended]
                        for item, outcome, retry in self._finish_many(finished, step):
                            if retry is not None:
                                queue.append((item.plan, retry))
                            else:
                                settle(outcome)
                        wait = self.config.min_poll_interval_seconds
                        if queue:
                            self.on_round_end()
                            continue  # slots were freed: refill them before waiting
                    else:
                        wait = min(wait * 1.5, self.config.poll_interval_seconds)
                self.on_round_end()
                if active or queue:
                    # Nothing ended, or this location's slots are held by other runs: wait, then look again.
                    began = time.monotonic()
                    self._cancel.wait(wait)
                    self.waited_seconds += time.monotonic() - began
        except BaseException as error:  # Dagster's run termination arrives as a BaseException
            cancelled = not isinstance(error, Exception) or isinstance(error, _Cancelled) or self._cancel.is_set()
            reason = "the Dagster run was terminated" if cancelled else f"the batch failed: {error!r}"
            for item in active:
                self._abort(item, reason, cancelled=cancelled)
                outcomes[item.plan.sub_group_key] = SubGroupOutcome(
                    item.plan.sub_group_key,
                    OutcomeKind.CANCELLED if cancelled else OutcomeKind.FAILED,
                    attempt_id=item.attempt_id,
                    fingerprint=item.plan.fingerprint,
                    detail=reason,
                )
            for plan, _ in queue:
                outcomes[plan.sub_group_key] = SubGroupOutcome(
                    plan.sub_group_key,
                    OutcomeKind.CANCELLED if cancelled else OutcomeKind.FAILED,
                    fingerprint=plan.fingerprint,
                    detail=reason,
                )
            self.on_round_end()
            if not isinstance(error, _Cancelled):
                raise
        progress.finish()
        self.on_round_end()
        return outcomes

    def _free_slots(self, active: list[_Active]) -> int:
        """Jobs this run may submit now: ``max_in_flight`` minus the backend's jobs in flight at this location.

        Other runs' jobs are counted in ops-db (one COUNT per submission round); two runs that count at the same
        moment may overshoot the limit by one round of theirs, never more.
        """
        own = sum(1 for a in active if a.job_id)
        with session_scope(self.engine) as session:
            elsewhere = session.scalar(
                select(func.count(m.ExecutedReductionStep.id))
                .join(m.ReductionStep, m.ReductionStep.id == m.ExecutedReductionStep.reduction_step_id)
                .join(m.Pipeline, m.Pipeline.id == m.ReductionStep.pipeline_id)
                .where(m.Pipeline.processing_location_id == self.config.processing_location_id)
                .where(m.ExecutedReductionStep.hpc_backend == self.backend.name)
                .where(m.ExecutedReductionStep.status.in_([RunStatus.SUBMITTED, RunStatus.RUNNING]))
                .where(m.ExecutedReductionStep.hpc_job_id.is_not(None))
                .where(
                    (m.ExecutedReductionStep.dagster_run_id != self._run_id)
                    | m.ExecutedReductionStep.dagster_run_id.is_(None)
                )
            )
        return self.config.max_in_flight - own - int(elsewhere or 0)

    # ------------------------------------------------------------------ phases

    def _start(
        self, batch: list[tuple[SubGroupPlan, int]], step: _StepSnapshot, run_id: str
    ) -> tuple[list[_Active], list[SubGroupOutcome]]:
        """Create attempts, stage inputs, write manifests, submit all jobs of the batch together."""
        created, failed = self._create_attempts(batch, step, run_id)
        if not created:
            return [], failed
        package_ids = sorted({p for a in created for p in a.plan.package_ids})
        ready: list[_Active] = []
        try:
            staged = (
                self.stager.stage(
                    engine=self.engine,
                    package_ids=package_ids,
                    processing_location_id=self.config.processing_location_id,
                    timeout_seconds=self.config.staging_timeout_seconds,
                    progress=self._staging_progress,
                )
                if package_ids
                else {}
            )
        except CcatError as error:
            for item in created:
                failed.append(self._fail(item, f"staging failed: {error}"))
            return [], failed
        for item in created:
            try:
                item.staged = {pid: staged[pid] for pid in item.plan.package_ids}
                item.spec = self._prepare(item, step, run_id)
                ready.append(item)
            except CcatError as error:
                failed.append(self._fail(item, str(error)))
        if ready:
            began = time.monotonic()
            job_ids = self.backend.submit_many([a.spec for a in ready if a.spec is not None])
            self.submit_seconds += time.monotonic() - began
            with session_scope(self.engine) as session:
                attempts = _attempts_by_id(session, [a.attempt_id for a in ready])
                for item, job_id in zip(ready, job_ids, strict=True):
                    item.job_id = job_id
                    attempt = attempts[item.attempt_id]
                    attempt.hpc_job_id = job_id
                    attempt.hpc_backend = self.backend.name
                    transition(session, attempt, RunStatus.SUBMITTED, message=f"{self.backend.name} job {job_id}")
            self._submitted += len(ready)
            message = (
                f"submitted {len(ready)} job(s) to {self.backend.name} (attempts {ready[0].attempt_id}"
                + (f"–{ready[-1].attempt_id}" if len(ready) > 1 else "")
                + f"): {', '.join(job_ids[:5])}"
                + (" …" if len(job_ids) > 5 else "")
            )
            log.info(message)
            # The run log gets a line per round only every progress_report_seconds: a round is a few jobs when
            # a job ends every moment, and each line is an event-log write.
            now = time.monotonic()
            if now - self._last_submit_report >= self.config.progress_report_seconds:
                self._last_submit_report = now
                self.report(f"{message}; {self._submitted} submitted by this run so far")
        return ready, failed

    def _create_attempts(
        self, batch: list[tuple[SubGroupPlan, int]], step: _StepSnapshot, run_id: str
    ) -> tuple[list[_Active], list[SubGroupOutcome]]:
        """The attempt rows of a submission round, in one transaction.

        When another run started one of these sub-groups at the same moment (the one-non-terminal-attempt
        constraint), the round is retried one sub-group per transaction to find which; only that one is skipped.
        """
        try:
            with session_scope(self.engine) as session:
                return self._insert_attempts(session, batch, step, run_id), []
        except IntegrityError:
            created: list[_Active] = []
            failed: list[SubGroupOutcome] = []
            for plan, retry in batch:
                try:
                    with session_scope(self.engine) as session:
                        created.extend(self._insert_attempts(session, [(plan, retry)], step, run_id))
                except IntegrityError:
                    failed.append(
                        SubGroupOutcome(
                            plan.sub_group_key,
                            OutcomeKind.SKIPPED,
                            fingerprint=plan.fingerprint,
                            detail="another run started this sub-group at the same moment",
                        )
                    )
            return created, failed

    def _insert_attempts(
        self, session: Session, batch: list[tuple[SubGroupPlan, int]], step: _StepSnapshot, run_id: str
    ) -> list[_Active]:
        step_ids = {plan.step_id for plan, _ in batch}
        keys = [plan.sub_group_key for plan, _ in batch]
        previous = {
            (step_id, key): number
            for step_id, key, number in session.execute(
                select(
                    m.ExecutedReductionStep.reduction_step_id,
                    m.ExecutedReductionStep.sub_group_key,
                    func.max(m.ExecutedReductionStep.attempt),
                )
                .where(m.ExecutedReductionStep.reduction_step_id.in_(step_ids))
                .where(m.ExecutedReductionStep.sub_group_key.in_(keys))
                .group_by(m.ExecutedReductionStep.reduction_step_id, m.ExecutedReductionStep.sub_group_key)
            ).tuples()
        }
        attempts = [
            m.ExecutedReductionStep(
                reduction_step_id=plan.step_id,
                sub_group_key=plan.sub_group_key,
                attempt=(previous.get((plan.step_id, plan.sub_group_key)) or 0) + 1,
                retry_count=retry,
                status=RunStatus.PENDING,
                input_fingerprint=plan.fingerprint,
                reduction_software_version_id=plan.software_version_id,
                reduction_step_config_id=plan.config_id,
                dagster_run_id=run_id,
                hpc_backend=self.backend.name,
                # Empty collections on the new rows: appending below then needs no lazy load per attempt.
                input_packages=[],
                input_products=[],
                transitions=[],
            )
            for plan, retry in batch
        ]
        session.add_all(attempts)
        session.flush()
        for (plan, _retry), attempt in zip(batch, attempts, strict=True):
            record_input_lineage(
                session,
                attempt=attempt,
                package_ids=list(plan.package_ids),
                product_ids=[p.product_id for p in plan.upstream_products],
            )
        # Only now the transitions and directories: nothing below queries, so they reach ops-db in a few
        # batched statements at commit instead of one by one between the lineage queries above.
        created: list[_Active] = []
        for (plan, retry), attempt in zip(batch, attempts, strict=True):
            transition(
                session,
                attempt,
                RunStatus.STAGING_DATA,
                message=f"{len(plan.package_ids)} package(s), {len(plan.upstream_products)} upstream product(s)",
            )
            layout = self._layout(step, plan.sub_group_key, attempt.id)
            attempt.attempt_dir = str(layout.attempt_dir)
            log.debug(
                "attempt %s (%s[%s] #%s): pending → staging_data",
                attempt.id,
                step.step_name,
                plan.sub_group_key,
                attempt.attempt,
            )
            created.append(
                _Active(
                    plan=plan,
                    attempt_id=attempt.id,
                    attempt_number=attempt.attempt,
                    layout=layout,
                    resources=_scaled_resources(step.resources, retry, session, plan),
                    retry=retry,
                )
            )
        return created

    def _prepare(self, item: _Active, step: _StepSnapshot, run_id: str) -> JobSpec:
        """Layout, manifest, mounts and the container command of one attempt."""
        plan = item.plan
        self._relocate_registered_outputs(item)
        item.layout.create(set_aside_previous_output=True)
        with session_scope(self.engine) as session:
            upstream_paths = (
                require_present_products(
                    session,
                    product_ids=[p.product_id for p in plan.upstream_products],
                    processing_location_id=self.config.processing_location_id,
                )
                if plan.upstream_products
                else {}
            )
        inputs = [
            contract.InputFile(
                package_id=staged.package_id,
                package_name=staged.package_name,
                raw_file_id=str(raw_file_id),
                relative_path=relative_path,
                size=size,
                sha256=sha256,
            )
            for staged in item.staged.values()
            for raw_file_id, relative_path, size, sha256 in staged.files
        ]
        upstream = [
            contract.UpstreamProduct(
                product_id=p.product_id,
                step=p.step_name,
                sub_group_key=p.sub_group_key,
                relative_path=p.relative_path,
                product_type=p.product_type,
                sha256=p.sha256,
                size=p.size_bytes,
                host_path=Path(upstream_paths[p.product_id]),
            )
            for p in plan.upstream_products
        ]
        image = resolve_image(
            image_ref=step.image_ref,
            image_digest=step.image_digest,
            sif_cache_dir=self.config.sif_cache_dir,
            runtime_name=self.runtime.name,
            check=BuildCheck(self.engine, step.software_name, step.software_version, attempt_id=item.attempt_id),
        )
        manifest = contract.build_manifest(
            layout=item.layout,
            run_id=run_id,
            software=contract.SoftwareRef(
                name=step.software_name,
                version=step.software_version,
                image_ref=step.image_ref,
                image_digest=step.image_digest,
            ),
            config=step.config,
            inputs=inputs,
            upstream_products=upstream,
        )
        contract.write_manifest(layout=item.layout, manifest=manifest)
        mounts = contract.build_mounts(
            layout=item.layout,
            input_packages=[(s.package_name, s.host_dir) for s in item.staged.values()],
            upstream_products=upstream,
        )
        missing = contract.missing_mount_sources(mounts=mounts)
        if missing:
            raise contract.ContainerContractError(
                f"mount sources missing on this host: {', '.join(map(str, missing[:5]))}"
            )
        invocation = ContainerInvocation(
            image=image,
            mounts=mounts,
            env=contract.build_environment(layout=item.layout),
            args=list(step.entrypoint),
            gpus=item.resources.gpus,
        )
        return JobSpec(
            command=self.runtime.command(invocation),
            resources=item.resources,
            env={},
            job_name=_job_name(step, plan.sub_group_key, item.attempt_id),
            log_dir=item.layout.logs_dir,
            pre_walltime_signal_seconds=self.config.pre_walltime_signal_seconds,
        )

    def _relocate_registered_outputs(self, item: _Active) -> None:
        """Move the files of products registered by earlier attempts out of the step's output directory.

        The directory must start empty (everything in it becomes this attempt's products); earlier products
        keep their files, now under their own attempt's directory, and their PhysicalCopy paths follow.
        """
        products_dir = item.layout.products_dir
        if not products_dir.is_dir():
            return
        with session_scope(self.engine) as session:
            copies = session.execute(
                select(m.PhysicalCopy, m.DataProduct)
                .join(m.DataProduct, m.PhysicalCopy.data_product_id == m.DataProduct.id)
                .where(m.DataProduct.reduction_step_id == item.plan.step_id)
                .where(m.DataProduct.sub_group_key == item.plan.sub_group_key)
                .where(m.PhysicalCopy.data_location_id == self.config.processing_location_id)
            ).all()
            for copy, product in copies:
                source = Path(copy.path)
                if not source.is_relative_to(products_dir) or not source.exists():
                    continue
                previous = contract.attempt_layout(
                    base_dir=self.config.pipeline_base_dir,
                    pipeline=item.layout.pipeline,
                    sub_group_key=item.layout.sub_group_key,
                    step=item.layout.step,
                    attempt_id=str(product.executed_reduction_step_id),
                    is_final=item.layout.is_final,
                )
                target = previous.attempt_dir / "products" / product.relative_path
                target.parent.mkdir(parents=True, exist_ok=True)
                source.rename(target)
                copy.path = str(target)

    def _layout(self, step: _StepSnapshot, sub_group_key: str, attempt_id: int) -> contract.AttemptLayout:
        return contract.attempt_layout(
            base_dir=self.config.pipeline_base_dir,
            pipeline=step.pipeline_name,
            sub_group_key=sub_group_key,
            step=step.step_name,
            attempt_id=str(attempt_id),
            is_final=step.is_final,
        )

    def _poll(self, job_ids: list[str]) -> dict[str, JobInfo]:
        """One status query for all jobs; a job the scheduler no longer knows is reported failed, not fatal."""
        if not job_ids:
            return {}
        began = time.monotonic()
        try:
            return self._status(job_ids)
        finally:
            self.status_query_seconds += time.monotonic() - began

    def _status(self, job_ids: list[str]) -> dict[str, JobInfo]:
        try:
            return self.backend.status_many(job_ids)
        except UnknownJobError as error:
            unknown = set(error.job_ids)
            known = [j for j in job_ids if j not in unknown]
            infos = self.backend.status_many(known) if known else {}
            for job_id in unknown:
                infos[job_id] = JobInfo(job_id=job_id, state=JobState.FAILED, reason="job unknown to the scheduler")
            return infos

    def _report_waiting(self, active: list[_Active], infos: dict[str, JobInfo]) -> None:
        """Say what the batch waits for: when the job states change, and at least every WAIT_REPORT_SECONDS."""
        if not active:
            return
        counts: Counter[str] = Counter()
        for item in active:
            info = infos.get(item.job_id) if item.job_id else None
            if info is not None and info.is_terminal:
                continue  # finished in this poll: being collected, not waited for
            label = info.state.value.upper() if info else "UNKNOWN"
            if info is not None and info.state is JobState.PENDING and info.reason:
                label += f" ({info.reason})"
            counts[label] += 1
        summary = ", ".join(f"{n} {label}" for label, n in sorted(counts.items()))
        now = time.monotonic()
        # A change is reported, but at most every progress_report_seconds (a batch of hundreds of jobs changes
        # state on nearly every poll, and each line is an event-log write); no change, every WAIT_REPORT_SECONDS.
        changed = summary != self._last_wait[0]
        if now - self._last_wait[1] < (self.config.progress_report_seconds if changed else WAIT_REPORT_SECONDS):
            return
        self._last_wait = (summary, now)
        if summary:
            self.report(f"waiting for {sum(counts.values())} {self.backend.name} job(s): {summary}")

    def _staging_progress(self, message: str) -> None:
        """Every staging message to the Python log; to the run log at most every ``progress_report_seconds``,
        so a long staging wait says what it waits for without one line per package."""
        log.info(message)
        now = time.monotonic()
        if now - self._last_staging_report >= self.config.progress_report_seconds:
            self._last_staging_report = now
            self.report(message)

    def _note_running(self, items: list[_Active], infos: dict[str, JobInfo]) -> None:
        """Record RUNNING for the jobs that started since the last poll, all in one transaction."""
        started = [
            a
            for a in items
            if a.job_id and infos[a.job_id].state is JobState.RUNNING and a.last_state is not JobState.RUNNING
        ]
        if not started:
            return
        with session_scope(self.engine) as session:
            attempts = _attempts_by_id(session, [a.attempt_id for a in started])
            for item in started:
                item.last_state = JobState.RUNNING
                attempt = attempts[item.attempt_id]
                if attempt.status is RunStatus.SUBMITTED:
                    transition(session, attempt, RunStatus.RUNNING, message=f"job {item.job_id} started")
                log.debug(
                    "attempt %s [%s]: submitted → running (job %s)",
                    item.attempt_id,
                    item.plan.sub_group_key,
                    item.job_id,
                )

    def _finish_many(
        self, finished: list[tuple[_Active, JobInfo]], step: _StepSnapshot
    ) -> list[tuple[_Active, SubGroupOutcome, int | None]]:
        """Jobs that ended in one poll: collect the successful ones, fail (and maybe retry) the others.

        The successful ones enter COLLECTING_RESULTS together, then are registered together (``_collect_round``).
        """
        results: list[tuple[_Active, SubGroupOutcome, int | None]] = []
        succeeded = [(a, i) for a, i in finished if i.state is JobState.COMPLETED and i.exit_code in (0, None)]
        if succeeded:
            with session_scope(self.engine) as session:
                attempts = _attempts_by_id(session, [a.attempt_id for a, _ in succeeded])
                for item, info in succeeded:
                    attempt = attempts[item.attempt_id]
                    _apply_metrics(attempt, info)
                    if attempt.status is RunStatus.SUBMITTED:
                        transition(session, attempt, RunStatus.RUNNING, message="job finished between two polls")
                    transition(session, attempt, RunStatus.COLLECTING_RESULTS, message=f"exit code {info.exit_code}")
            results.extend((item, outcome, None) for item, outcome in self._collect_round(succeeded, step))
        for item, info in finished:
            if info.state is JobState.COMPLETED and info.exit_code in (0, None):
                continue
            outcome, retry = self._finish_failed(item, info, step)
            results.append((item, outcome, retry))
        return results

    def _finish_failed(self, item: _Active, info: JobInfo, step: _StepSnapshot) -> tuple[SubGroupOutcome, int | None]:
        """A job that did not succeed: fail the attempt and say whether to queue a retry."""
        metrics = {
            "exit_code": info.exit_code,
            "wall_time_seconds": info.wall_time_seconds,
            "cpu_hours": info.cpu_hours,
            "peak_memory_gb": info.peak_memory_gb,
        }
        if info.state is JobState.CANCELLED:
            outcome = self._fail(
                item,
                f"job {item.job_id} was cancelled outside ccat-dagster",
                info=info,
                status=RunStatus.CANCELLED,
            )
            return outcome, None
        error = _failure_message(info, self.backend.logs(item.job_id, tail_lines=30) if item.job_id else "")
        outcome = self._fail(item, error, info=info)
        if item.retry < step.max_retries and not self._cancel.is_set():
            self.report(
                f"attempt {item.attempt_id} failed ({error.splitlines()[0]}); "
                f"retry {item.retry + 1} of {step.max_retries}"
            )
            return outcome, item.retry + 1
        outcome.metadata.update({k: v for k, v in metrics.items() if v is not None})
        return outcome, None

    def _collect_round(
        self, succeeded: list[tuple[_Active, JobInfo]], step: _StepSnapshot
    ) -> list[tuple[_Active, SubGroupOutcome]]:
        """Register the products, lineage and COMPLETED of a round's successful attempts in one transaction, each
        attempt in its own savepoint: an attempt whose results are refused rolls back alone (all or nothing per
        sub-group) and fails; the lineage aggregates of the others are written in one go. A round costs one
        commit and four aggregate statements instead of one each per sub-group (issue 7). Should anything
        unexpected break the round, it is collected again one transaction per sub-group, as before."""
        try:
            return self._register_round(succeeded, step)
        except Exception:  # noqa: BLE001 - fall back to per-sub-group transactions, which isolate the culprit
            log.warning("collecting %s sub-group(s) together failed; one by one instead", len(succeeded), exc_info=True)
        outcomes = []
        for item, info in succeeded:
            try:
                outcome = self._collect(item, info, step)
            except CcatError as error:
                outcome = self._fail(item, f"output collection refused: {error}", info=info)
            outcomes.append((item, outcome))
        return outcomes

    def _register_round(
        self, succeeded: list[tuple[_Active, JobInfo]], step: _StepSnapshot
    ) -> list[tuple[_Active, SubGroupOutcome]]:
        registered: dict[int, tuple[int, int]] = {}
        refused: dict[int, CcatError] = {}
        with session_scope(self.engine) as session:
            attempts = _attempts_by_id(session, [item.attempt_id for item, _ in succeeded])
            for item, _info in succeeded:
                try:
                    discovered = discover_products(layout=item.layout)
                    with session.begin_nested():
                        products = self._register(session, attempts[item.attempt_id], discovered, aggregates=False)
                except CcatError as error:
                    refused[item.attempt_id] = error
                    continue
                registered[item.attempt_id] = (len(products), sum(p.size_bytes for p in products))
            record_lineage_aggregates(session, attempt_id=list(registered))
        outcomes = []
        for item, info in succeeded:
            if item.attempt_id in refused:
                error = refused[item.attempt_id]
                outcomes.append((item, self._fail(item, f"output collection refused: {error}", info=info)))
            else:
                outcomes.append((item, self._completed(item, info, step, *registered[item.attempt_id])))
        return outcomes

    def _register(
        self, session: Session, attempt: m.ExecutedReductionStep, discovered: list, *, aggregates: bool
    ) -> list[m.DataProduct]:
        return register_attempt_results(
            session,
            attempt=attempt,
            discovered=discovered,
            processing_location_id=self.config.processing_location_id,
            # The input lineage and its closure were recorded when the attempt was created (_create_attempts).
            input_package_ids=[],
            input_product_ids=[],
            lineage_aggregates=aggregates,
        )

    def _collect(self, item: _Active, info: JobInfo, step: _StepSnapshot) -> SubGroupOutcome:
        """Register the attempt's products, lineage and COMPLETED in one transaction (all or nothing)."""
        discovered = discover_products(layout=item.layout)
        with session_scope(self.engine) as session:
            attempt = session.get(m.ExecutedReductionStep, item.attempt_id)
            products = self._register(session, attempt, discovered, aggregates=True)
            product_count, product_bytes = len(products), sum(p.size_bytes for p in products)
        return self._completed(item, info, step, product_count, product_bytes)

    def _completed(
        self, item: _Active, info: JobInfo, step: _StepSnapshot, product_count: int, product_bytes: int
    ) -> SubGroupOutcome:
        log.debug("attempt %s [%s]: completed, %s product(s)", item.attempt_id, item.plan.sub_group_key, product_count)
        return SubGroupOutcome(
            item.plan.sub_group_key,
            OutcomeKind.COMPLETED,
            attempt_id=item.attempt_id,
            attempts=item.attempt_number,
            fingerprint=item.plan.fingerprint,
            metadata={
                "ops_db_attempt_id": item.attempt_id,
                "attempt": item.attempt_number,
                "product_count": product_count,
                "product_bytes": product_bytes,
                "hpc_backend": self.backend.name,
                "hpc_job_id": item.job_id,
                "wall_time_seconds": info.wall_time_seconds,
                "cpu_hours": info.cpu_hours,
                "peak_memory_gb": info.peak_memory_gb,
                "software_version": f"{step.software_name}=={step.software_version}",
                "image_digest": step.image_digest or "",
                "input_fingerprint": item.plan.fingerprint,
                "sub_group_members": len(item.plan.package_ids) or len(item.plan.upstream_products),
                "products_dir": str(item.layout.products_dir),
            },
        )

    def _fail(
        self, item: _Active, error: str, *, info: JobInfo | None = None, status: RunStatus = RunStatus.FAILED
    ) -> SubGroupOutcome:
        with session_scope(self.engine) as session:
            attempt = session.get(m.ExecutedReductionStep, item.attempt_id)
            if info is not None:
                _apply_metrics(attempt, info)
            attempt.error = error
            if attempt.status not in TERMINAL_RUN_STATUSES:
                transition(session, attempt, status, message=error[:500])
        self.report(f"attempt {item.attempt_id} [{item.plan.sub_group_key}]: {status.value}: {error}")
        kind = OutcomeKind.CANCELLED if status is RunStatus.CANCELLED else OutcomeKind.FAILED
        return SubGroupOutcome(
            item.plan.sub_group_key,
            kind,
            attempt_id=item.attempt_id,
            attempts=item.attempt_number,
            fingerprint=item.plan.fingerprint,
            detail=error,
        )

    def _abort(self, item: _Active, reason: str, *, cancelled: bool) -> None:
        if item.job_id:
            try:
                self.backend.cancel(item.job_id)
            except CcatError as error:  # the attempt still ends; say what could not be cancelled
                reason += f" (cancelling job {item.job_id} failed: {error})"
        self._fail(item, reason, status=RunStatus.CANCELLED if cancelled else RunStatus.FAILED)

    def _adopt(self, plan: SubGroupPlan, step: _StepSnapshot, run_id: str) -> _Active | None:
        """Reattach to an in-flight attempt whose Dagster run is gone (re-execution, restarted worker)."""
        with session_scope(self.engine) as session:
            attempt = session.scalars(
                select(m.ExecutedReductionStep)
                .where(m.ExecutedReductionStep.reduction_step_id == plan.step_id)
                .where(m.ExecutedReductionStep.sub_group_key == plan.sub_group_key)
                .where(m.ExecutedReductionStep.status.not_in(list(TERMINAL_RUN_STATUSES)))
            ).one_or_none()
            if attempt is None:
                return None
            owner = attempt.dagster_run_id
            if owner and owner != run_id and self.is_run_alive(owner):
                return None
            if attempt.input_fingerprint != plan.fingerprint or not attempt.hpc_job_id:
                # Nothing to reattach to (it never reached the backend) or it ran with other inputs: end it.
                attempt.error = f"abandoned by Dagster run {owner}; superseded by run {run_id}"
                transition(session, attempt, RunStatus.FAILED, message=attempt.error)
                return None
            attempt.dagster_run_id = run_id
            layout = self._layout(step, plan.sub_group_key, attempt.id)
            self.report(
                f"attempt {attempt.id} [{plan.sub_group_key}]: reattached to {attempt.hpc_backend} "
                f"job {attempt.hpc_job_id} left by run {owner}"
            )
            return _Active(
                plan=plan,
                attempt_id=attempt.id,
                attempt_number=attempt.attempt,
                layout=layout,
                resources=_resources(step.resources),
                job_id=attempt.hpc_job_id,
                last_state=JobState.RUNNING if attempt.status is RunStatus.RUNNING else None,
                retry=attempt.retry_count,
            )


class _Cancelled(Exception):
    pass


@dataclass(frozen=True)
class _StepSnapshot:
    """The step's settings read once per batch, so the loop never touches ORM objects of a closed session."""

    pipeline_name: str
    step_name: str
    is_final: bool
    software_name: str
    software_version: str
    image_ref: str
    image_digest: str | None
    entrypoint: tuple[str, ...]
    config: dict[str, Any]
    resources: dict[str, Any]
    max_retries: int

    @property
    def asset_label(self) -> str:
        return f"{self.pipeline_name}/{self.step_name}"

    @classmethod
    def of(
        cls, pipeline: m.Pipeline, step: m.ReductionStep, version: m.ReductionSoftwareVersion, is_final: bool
    ) -> _StepSnapshot:
        return cls(
            pipeline_name=pipeline.name,
            step_name=step.name,
            is_final=is_final,
            software_name=step.software.name,
            software_version=version.version,
            image_ref=version.image_ref,
            image_digest=version.image_digest,
            entrypoint=tuple(version.entrypoint or []),
            config=dict(step.config.parameters or {}),
            resources=dict(step.resources or {}),
            max_retries=step.max_retries,
        )


def _resources(raw: dict[str, Any]) -> JobResources:
    return JobResources(
        cpu=int(raw.get("cpu", 1)),
        memory_gb=float(raw.get("memory_gb", 2.0)),
        time_hours=float(raw.get("time_hours", 1.0)),
        gpus=int(raw.get("gpus", 0)),
    )


def _scaled_resources(raw: dict[str, Any], retry: int, session: Session, plan: SubGroupPlan) -> JobResources:
    """Scale memory / time with the attempt number after an out-of-memory or timeout failure."""
    base = _resources(raw)
    if retry == 0:
        return base
    last = session.scalars(
        select(m.ExecutedReductionStep)
        .where(m.ExecutedReductionStep.reduction_step_id == plan.step_id)
        .where(m.ExecutedReductionStep.sub_group_key == plan.sub_group_key)
        .where(m.ExecutedReductionStep.status == RunStatus.FAILED)
        .order_by(m.ExecutedReductionStep.attempt.desc())
        .limit(1)
    ).one_or_none()
    error = (last.error or "") if last else ""
    factor = retry + 1
    memory = base.memory_gb * factor if "out of memory" in error else base.memory_gb
    time_hours = base.time_hours * factor if "time limit" in error else base.time_hours
    return JobResources(cpu=base.cpu, memory_gb=memory, time_hours=time_hours, gpus=base.gpus)


def _apply_metrics(attempt: m.ExecutedReductionStep, info: JobInfo) -> None:
    attempt.exit_code = info.exit_code
    attempt.wall_time_seconds = info.wall_time_seconds
    attempt.cpu_hours = info.cpu_hours
    attempt.peak_memory_gb = info.peak_memory_gb


def _failure_message(info: JobInfo, log_tail: str) -> str:
    reason = (info.reason or "").upper()
    if info.exit_code == 137 or "OUT_OF_MEMORY" in reason or "OOM" in reason:
        head = f"job killed (exit code {info.exit_code}): out of memory or killed by signal 9"
    elif "TIMEOUT" in reason or "PRE-WALLTIME" in reason:
        # A payload killed by the pre-walltime warning (bubblewrap does not pass it on) hit its limit too.
        head = f"job exceeded its time limit (exit code {info.exit_code})"
    else:
        shown = info.reason if info.reason and info.reason != f"exit code {info.exit_code}" else None
        head = f"job failed with exit code {info.exit_code}" + (f" ({shown})" if shown else "")
    return head + (f"\n--- last log lines ---\n{log_tail.rstrip()}" if log_tail.strip() else "")


def _job_name(step: _StepSnapshot, key: str, attempt_id: int) -> str:
    digest = contract.short_hash(key)
    return f"ccat-{step.pipeline_name}-{step.step_name}-{attempt_id}-{digest}"[:120]


def _attempts_by_id(session: Session, attempt_ids: list[int]) -> dict[int, m.ExecutedReductionStep]:
    """The attempts of a round in one query (not one ``session.get`` each).

    Their transitions are loaded with them (one more query): ``transition`` appends to that collection, and a
    lazy load per attempt would also flush the previous attempt's changes one statement at a time.
    """
    rows = session.scalars(
        select(m.ExecutedReductionStep)
        .where(m.ExecutedReductionStep.id.in_(attempt_ids))
        .options(selectinload(m.ExecutedReductionStep.transitions))
    )
    return {row.id: row for row in rows}


class _Progress:
    """Counts finished sub-groups; reports failures at once and "N of M done" at most every few seconds."""

    def __init__(self, total: int, report: Reporter, *, every_seconds: float) -> None:
        self.total = total
        self.report = report
        self.every_seconds = every_seconds
        self.counts: dict[OutcomeKind, int] = {}
        self._last = time.monotonic()

    def done(self, outcome: SubGroupOutcome) -> None:
        self.counts[outcome.kind] = self.counts.get(outcome.kind, 0) + 1
        if outcome.kind is OutcomeKind.SKIPPED:  # failures were reported where they happened
            self.report(f"{outcome.sub_group_key}: {outcome.kind.value}: {outcome.detail.partition(chr(10))[0]}")
        now = time.monotonic()
        if now - self._last >= self.every_seconds:
            self._last = now
            self.report(self._line())

    def finish(self) -> None:
        self.report(self._line())

    def _line(self) -> str:
        finished = sum(self.counts.values())
        kinds = ", ".join(f"{count} {kind.value}" for kind, count in sorted(self.counts.items()))
        return f"{finished} of {self.total} sub-groups done" + (f" ({kinds})" if kinds else "")
