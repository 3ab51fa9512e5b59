"""Run one step for a batch of sub-groups: attempts, staging, container command, HPC jobs, collection.

The path of the data, top to bottom: plan (gap evaluation) → attempt rows → staging → manifest + command →
backend submit (all jobs of the batch, bounded by ``max_in_flight``) → one status poll for all jobs →
collection (products + lineage + COMPLETED in one transaction). Each sub-group has its own attempt and its
own outcome: one failing sub-group fails only itself; a failed attempt is retried as a new attempt while
``max_retries`` allows, with more memory/time after an out-of-memory or timeout failure.

Job ids are committed to ops-db before waiting, so a run that dies can be re-executed and will reattach to
its jobs instead of submitting them again.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ccat_dagster.errors import CcatError
from ccat_dagster.execution import contract
from ccat_dagster.execution.discovery import discover_products
from ccat_dagster.execution.hpc.base import HpcBackend, JobInfo, JobResources, JobSpec, JobState, UnknownJobError
from ccat_dagster.execution.images import resolve_image
from ccat_dagster.execution.planning import Planner, Readiness, SubGroupPlan, load_pipeline
from ccat_dagster.execution.registration import record_input_lineage, register_attempt_results
from ccat_dagster.execution.runtimes import ContainerInvocation, ContainerRuntime
from ccat_dagster.execution.staging import StagedPackage, Stager, require_present_products
from ccat_dagster.opsdb import models as m
from ccat_dagster.opsdb.engine import session_scope
from ccat_dagster.opsdb.enums import TERMINAL_RUN_STATUSES, RunStatus
from ccat_dagster.opsdb.models import utcnow
from ccat_dagster.opsdb.states import transition

Reporter = Callable[[str], None]


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


@dataclass(frozen=True)
class RunnerConfig:
    pipeline_base_dir: Path
    processing_location_id: int
    sif_cache_dir: Path
    max_in_flight: int = 4
    poll_interval_seconds: float = 2.0
    staging_timeout_seconds: float = 3600.0
    pre_walltime_signal_seconds: int = 120


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
    ) -> None:
        self.engine = engine
        self.backend = backend
        self.runtime = runtime
        self.stager = stager
        self.config = config
        self.report = report
        self.is_run_alive = is_run_alive
        self._cancel = threading.Event()

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
    ) -> list[SubGroupOutcome]:
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
            if plan.readiness is Readiness.GAP:
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
        retries: dict[str, int] = {}
        done = 0
        try:
            while queue or active:
                if self._cancel.is_set():
                    raise _Cancelled()
                free = self.config.max_in_flight - sum(1 for a in active if a.job_id)
                if free > 0 and queue:
                    batch, queue = queue[:free], queue[free:]
                    started, failed = self._start(batch, step, run_id, retries)
                    active.extend(started)
                    for outcome in failed:
                        outcomes[outcome.sub_group_key] = outcome
                        done += 1
                        self.report(f"{done} of {total} sub-groups done ({outcome.sub_group_key}: failed)")
                if not active:
                    continue
                infos = self._poll([a.job_id for a in active if a.job_id])
                still: list[_Active] = []
                for item in active:
                    info = infos.get(item.job_id) if item.job_id else None
                    if info is None or not info.is_terminal:
                        self._note_running(item, info)
                        still.append(item)
                        continue
                    outcome, retry = self._finish(item, info, step)
                    if retry is not None:
                        queue.append((item.plan, retry))
                        continue
                    outcomes[item.plan.sub_group_key] = outcome
                    done += 1
                    self.report(f"{done} of {total} sub-groups done ({item.plan.sub_group_key}: {outcome.kind.value})")
                active = still
                if active and not (queue and self.config.max_in_flight > sum(1 for a in active if a.job_id)):
                    self._cancel.wait(self.config.poll_interval_seconds)
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
            if not isinstance(error, _Cancelled):
                raise
        return outcomes

    # ------------------------------------------------------------------ phases

    def _start(
        self, batch: list[tuple[SubGroupPlan, int]], step: _StepSnapshot, run_id: str, retries: dict[str, int]
    ) -> tuple[list[_Active], list[SubGroupOutcome]]:
        """Create attempts, stage inputs, write manifests, submit all jobs of the batch together."""
        created: list[_Active] = []
        failed: list[SubGroupOutcome] = []
        for plan, retry in batch:
            try:
                created.append(self._create_attempt(plan, step, run_id, retry))
            except IntegrityError:
                failed.append(
                    SubGroupOutcome(
                        plan.sub_group_key,
                        OutcomeKind.SKIPPED,
                        fingerprint=plan.fingerprint,
                        detail="another run started this sub-group at the same moment",
                    )
                )
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
                    progress=self.report,
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
            job_ids = self.backend.submit_many([a.spec for a in ready if a.spec is not None])
            with session_scope(self.engine) as session:
                for item, job_id in zip(ready, job_ids, strict=True):
                    item.job_id = job_id
                    attempt = session.get(m.ExecutedReductionStep, item.attempt_id)
                    attempt.hpc_job_id = job_id
                    attempt.hpc_backend = self.backend.name
                    transition(session, attempt, RunStatus.SUBMITTED, message=f"{self.backend.name} job {job_id}")
            self.report(
                f"submitted {len(ready)} job(s) to {self.backend.name}: {', '.join(job_ids[:10])}"
                + (" …" if len(job_ids) > 10 else "")
            )
        return ready, failed

    def _create_attempt(self, plan: SubGroupPlan, step: _StepSnapshot, run_id: str, retry: int) -> _Active:
        with session_scope(self.engine) as session:
            previous = session.scalar(
                select(m.ExecutedReductionStep.attempt)
                .where(m.ExecutedReductionStep.reduction_step_id == plan.step_id)
                .where(m.ExecutedReductionStep.sub_group_key == plan.sub_group_key)
                .order_by(m.ExecutedReductionStep.attempt.desc())
                .limit(1)
            )
            attempt = m.ExecutedReductionStep(
                reduction_step_id=plan.step_id,
                sub_group_key=plan.sub_group_key,
                attempt=(previous or 0) + 1,
                retry_count=retry,
                status=RunStatus.PENDING,
                input_fingerprint=plan.fingerprint,
                reduction_software_version_id=plan.software_version_id,
                reduction_step_config_id=plan.config_id,
                dagster_run_id=run_id,
                hpc_backend=self.backend.name,
            )
            session.add(attempt)
            session.flush()
            record_input_lineage(
                session,
                attempt=attempt,
                package_ids=list(plan.package_ids),
                product_ids=[p.product_id for p in plan.upstream_products],
            )
            transition(
                session,
                attempt,
                RunStatus.STAGING_DATA,
                message=f"{len(plan.package_ids)} package(s), {len(plan.upstream_products)} upstream product(s)",
            )
            layout = contract.attempt_layout(
                base_dir=self.config.pipeline_base_dir,
                pipeline=step.pipeline_name,
                sub_group_key=plan.sub_group_key,
                step=step.step_name,
                attempt_id=str(attempt.id),
                is_final=step.is_final,
            )
            attempt.attempt_dir = str(layout.attempt_dir)
            resources = _scaled_resources(step.resources, retry, session, plan)
            self.report(
                f"attempt {attempt.id} ({step.step_name}[{plan.sub_group_key}] #{attempt.attempt}): "
                f"pending → staging_data"
            )
            return _Active(
                plan=plan,
                attempt_id=attempt.id,
                attempt_number=attempt.attempt,
                layout=layout,
                resources=resources,
            )

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

    def _poll(self, job_ids: list[str]) -> dict[str, JobInfo]:
        """One status query for all jobs; a job the scheduler no longer knows is reported failed, not fatal."""
        if not job_ids:
            return {}
        try:
            return self.backend.status_many(job_ids)
        except UnknownJobError as error:
            unknown = set(error.job_ids)
            known = [j for j in job_ids if j not in unknown]
            infos = self.backend.status_many(known) if known else {}
            for job_id in unknown:
                infos[job_id] = JobInfo(job_id=job_id, state=JobState.FAILED, reason="job unknown to the scheduler")
            return infos

    def _note_running(self, item: _Active, info: JobInfo | None) -> None:
        if info is None or info.state is not JobState.RUNNING or item.last_state is JobState.RUNNING:
            return
        item.last_state = JobState.RUNNING
        with session_scope(self.engine) as session:
            attempt = session.get(m.ExecutedReductionStep, item.attempt_id)
            if attempt.status is RunStatus.SUBMITTED:
                transition(session, attempt, RunStatus.RUNNING, message=f"job {item.job_id} started")
        self.report(f"attempt {item.attempt_id} [{item.plan.sub_group_key}]: submitted → running (job {item.job_id})")

    def _finish(self, item: _Active, info: JobInfo, step: _StepSnapshot) -> tuple[SubGroupOutcome, int | None]:
        """A job ended: collect its products, or fail the attempt (and maybe queue a retry)."""
        metrics = {
            "exit_code": info.exit_code,
            "wall_time_seconds": info.wall_time_seconds,
            "cpu_hours": info.cpu_hours,
            "peak_memory_gb": info.peak_memory_gb,
        }
        if info.state is JobState.COMPLETED and info.exit_code in (0, None):
            try:
                return self._collect(item, info, step), None
            except CcatError as error:
                return self._fail(item, f"output collection refused: {error}", info=info), None
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
        retry_index = self._retry_index(item)
        if retry_index < step.max_retries and not self._cancel.is_set():
            self.report(
                f"attempt {item.attempt_id} failed ({error.splitlines()[0]}); retry "
                f"{retry_index + 1} of {step.max_retries}"
            )
            return outcome, retry_index + 1
        outcome.metadata.update({k: v for k, v in metrics.items() if v is not None})
        return outcome, None

    def _retry_index(self, item: _Active) -> int:
        with session_scope(self.engine) as session:
            return session.get(m.ExecutedReductionStep, item.attempt_id).retry_count

    def _collect(self, item: _Active, info: JobInfo, step: _StepSnapshot) -> SubGroupOutcome:
        with session_scope(self.engine) as session:
            attempt = session.get(m.ExecutedReductionStep, item.attempt_id)
            _apply_metrics(attempt, info)
            if attempt.status is RunStatus.SUBMITTED:
                transition(session, attempt, RunStatus.RUNNING, message="job finished between two polls")
            transition(session, attempt, RunStatus.COLLECTING_RESULTS, message=f"exit code {info.exit_code}")
        discovered = discover_products(layout=item.layout)
        with session_scope(self.engine) as session:
            attempt = session.get(m.ExecutedReductionStep, item.attempt_id)
            products = register_attempt_results(
                session,
                attempt=attempt,
                discovered=discovered,
                processing_location_id=self.config.processing_location_id,
                input_package_ids=list(item.plan.package_ids),
                input_product_ids=[p.product_id for p in item.plan.upstream_products],
            )
            product_count, product_bytes = len(products), sum(p.size_bytes for p in products)
        self.report(f"attempt {item.attempt_id} [{item.plan.sub_group_key}]: completed, {product_count} product(s)")
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
            layout = contract.attempt_layout(
                base_dir=self.config.pipeline_base_dir,
                pipeline=step.pipeline_name,
                sub_group_key=plan.sub_group_key,
                step=step.step_name,
                attempt_id=str(attempt.id),
                is_final=step.is_final,
            )
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
    elif "TIMEOUT" in reason:
        head = f"job exceeded its time limit (exit code {info.exit_code})"
    else:
        head = f"job failed with exit code {info.exit_code}" + (f" ({info.reason})" if info.reason else "")
    return head + (f"\n--- last log lines ---\n{log_tail.rstrip()}" if log_tail.strip() else "")


def _job_name(step: _StepSnapshot, key: str, attempt_id: int) -> str:
    digest = contract.short_hash(key)
    return f"ccat-{step.pipeline_name}-{step.step_name}-{attempt_id}-{digest}"[:120]
