"""Attempt state: every read and write the step runner makes about ExecutedReductionStep rows, behind one seam.

``AttemptStore`` is the interface; ``OpsDbAttemptStore`` is ops-db (PostgreSQL / SQLite), ``InMemoryAttemptStore``
keeps the same state in dicts so the runner's loop is tested in milliseconds. Each method is one transaction
and is safe to call again after a connection failure (a transition already made is not made twice), which is
what lets ``execution.resilience`` retry them while ops-db is briefly unavailable. ``adopt`` is written once, here
in the interface; each store only holds the attempt exclusively while it decides (a row lock on PostgreSQL, a
write transaction from the start on SQLite, a lock in memory), so two runs adopting at once never both collect.

The COMPLETED transition is not here: it is written by ``register_round`` through
``execution.registration.register_attempt_results``, in the same transaction as the products and lineage.
"""

from __future__ import annotations

import abc
import enum
import itertools
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field

from sqlalchemy import Engine, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from ccat_dagster.errors import CcatError
from ccat_dagster.execution.discovery import DiscoveredProduct
from ccat_dagster.execution.hpc.base import JobInfo
from ccat_dagster.execution.planning import SubGroupPlan
from ccat_dagster.execution.registration import (
    record_input_lineage,
    record_lineage_aggregates,
    register_attempt_results,
)
from ccat_dagster.opsdb import models as m
from ccat_dagster.opsdb.engine import session_scope
from ccat_dagster.opsdb.enums import TERMINAL_RUN_STATUSES, FailureKind, RunStatus
from ccat_dagster.opsdb.states import transition

log = logging.getLogger(__name__)
S = RunStatus
IN_FLIGHT_STATUSES = (S.SUBMITTED, S.RUNNING)
# Attempt dir of a new attempt, from its sub-group key and id (the layout is the runner's business).
AttemptDirOf = Callable[[str, int], str]


@dataclass(frozen=True)
class AttemptRef:
    """What the loop keeps of one attempt it created or adopted."""

    attempt_id: int
    attempt_number: int
    sub_group_key: str
    retry: int
    job_id: str | None = None
    status: RunStatus = S.STAGING_DATA
    owner_run_id: str | None = None


class Adoption(enum.Enum):
    ADOPTED = "adopted"
    """The attempt's job is this run's now; the loop polls and collects it."""
    OWNED_ELSEWHERE = "owned elsewhere"
    """A live run watches it: leave it alone."""
    ENDED = "ended"
    """It could not be reattached (no job id, other inputs) and was failed as lost: plan a new attempt."""
    NONE = "none"
    """No attempt of the sub-group is in flight."""


@dataclass(frozen=True)
class AdoptionResult:
    outcome: Adoption
    attempt: AttemptRef | None = None
    detail: str = ""


@dataclass(frozen=True)
class Registered:
    product_count: int
    product_bytes: int


def decide_adoption(
    *, owner: str | None, run_id: str, is_run_alive: Callable[[str], bool], same_inputs: bool, job_id: str | None
) -> tuple[Adoption, str]:
    """Whether run ``run_id`` may take over an in-flight attempt owned by run ``owner``, and why not."""
    if owner and owner != run_id and is_run_alive(owner):
        return Adoption.OWNED_ELSEWHERE, f"run {owner} watches it"
    if not same_inputs or not job_id:
        # Nothing to reattach to (it never reached the backend) or it ran with other inputs: it is ended.
        return Adoption.ENDED, f"abandoned by Dagster run {owner}; superseded by run {run_id}"
    return Adoption.ADOPTED, ""


@dataclass(frozen=True)
class InFlightAttempt:
    """The in-flight attempt of a sub-group as ``adopt`` sees it, held by the store until the decision is made."""

    owner_run_id: str | None
    fingerprint: str | None
    job_id: str | None
    end_as_lost: Callable[[str], None]
    """Fail it as lost with this reason."""
    take_over: Callable[[str], AttemptRef]
    """Make this run id its owner; returns the attempt (with the previous owner)."""


class AttemptStore(abc.ABC):
    """Attempt rows of one processing location. Methods take and return plain values, never ORM objects."""

    @abc.abstractmethod
    def create_round(
        self, batch: Sequence[tuple[SubGroupPlan, int]], *, run_id: str, backend: str, attempt_dir_of: AttemptDirOf
    ) -> tuple[list[AttemptRef], list[str]]:
        """New attempts (PENDING → STAGING_DATA, input lineage recorded) for ``(plan, retry)`` pairs, in order.

        Returns the created attempts and the keys of sub-groups another run started at the same moment (the
        one-non-terminal-attempt constraint); only those are left out.
        """

    @abc.abstractmethod
    def mark_submitted(self, submitted: Sequence[tuple[int, str]], *, backend: str) -> None:
        """``(attempt_id, job_id)``: record the job ids (committed before anything waits on them)."""

    @abc.abstractmethod
    def mark_running(self, attempt_ids: Sequence[int]) -> None:
        """SUBMITTED → RUNNING for attempts whose jobs were seen running."""

    @abc.abstractmethod
    def mark_collecting(self, finished: Sequence[tuple[int, JobInfo]]) -> None:
        """→ COLLECTING_RESULTS with the job's accounting, for jobs that ended successfully."""

    @abc.abstractmethod
    def register_round(
        self, results: Sequence[tuple[int, list[DiscoveredProduct]]], *, processing_location_id: int
    ) -> dict[int, Registered | CcatError]:
        """Products, lineage and COMPLETED of each attempt, all or nothing per attempt; a refusal is its error."""

    @abc.abstractmethod
    def fail(
        self,
        attempt_id: int,
        *,
        error: str,
        kind: FailureKind,
        info: JobInfo | None = None,
        cancelled: bool = False,
    ) -> None:
        """End the attempt FAILED (CANCELLED when ``cancelled``) with its reason and kind; a terminal one stays."""

    def adopt(self, plan: SubGroupPlan, *, run_id: str, is_run_alive: Callable[[str], bool]) -> AdoptionResult:
        """Take over the in-flight attempt of ``plan``'s sub-group whose run is gone (or is ``run_id``).

        The attempt is held exclusively from the read to the write, so of two runs adopting at once exactly one
        wins; the other then sees the winner as the owner (alive: OWNED_ELSEWHERE).
        """
        with self._hold_in_flight(plan) as attempt:
            if attempt is None:
                return AdoptionResult(Adoption.NONE)
            decision, detail = decide_adoption(
                owner=attempt.owner_run_id,
                run_id=run_id,
                is_run_alive=is_run_alive,
                same_inputs=attempt.fingerprint == plan.fingerprint,
                job_id=attempt.job_id,
            )
            if decision is Adoption.ENDED:
                attempt.end_as_lost(detail)
            elif decision is Adoption.ADOPTED:
                return AdoptionResult(decision, attempt.take_over(run_id))
            return AdoptionResult(decision, detail=detail)

    @abc.abstractmethod
    def _hold_in_flight(self, plan: SubGroupPlan) -> AbstractContextManager[InFlightAttempt | None]:
        """The non-terminal attempt of ``plan``'s sub-group, held exclusively until the context ends (no other
        ``adopt`` reads it meanwhile); what the context's body did to it is then committed."""

    @abc.abstractmethod
    def count_in_flight(self, *, processing_location_id: int, backend: str, excluding_run_id: str) -> int:
        """Attempts with a job of ``backend`` in flight (SUBMITTED / RUNNING) at the location, other runs'."""

    @abc.abstractmethod
    def last_failures(self, step_id: int, keys: Sequence[tuple[str, str | None]]) -> dict[str, FailureKind]:
        """For ``(sub_group_key, fingerprint)`` pairs: the kind of each sub-group's newest attempt with these
        inputs, where that attempt failed (one query for a whole batch)."""


# ---------------------------------------------------------------------------------------------- ops-db


class OpsDbAttemptStore(AttemptStore):
    """Attempt state in ops-db: one short transaction per call, a whole round or poll at a time."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def create_round(self, batch, *, run_id, backend, attempt_dir_of):
        try:
            with session_scope(self.engine) as session:
                return self._insert(session, batch, run_id, backend, attempt_dir_of), []
        except IntegrityError:
            pass
        # Another run started one of these sub-groups at the same moment: one per transaction to find which.
        created: list[AttemptRef] = []
        conflicts: list[str] = []
        for item in batch:
            try:
                with session_scope(self.engine) as session:
                    created.extend(self._insert(session, [item], run_id, backend, attempt_dir_of))
            except IntegrityError:
                conflicts.append(item[0].sub_group_key)
        return created, conflicts

    def _insert(
        self,
        session: Session,
        batch: Sequence[tuple[SubGroupPlan, int]],
        run_id: str,
        backend: str,
        attempt_dir_of: AttemptDirOf,
    ) -> list[AttemptRef]:
        E = m.ExecutedReductionStep
        previous = {
            (step_id, key): number
            for step_id, key, number in session.execute(
                select(E.reduction_step_id, E.sub_group_key, func.max(E.attempt))
                .where(E.reduction_step_id.in_({plan.step_id for plan, _ in batch}))
                .where(E.sub_group_key.in_([plan.sub_group_key for plan, _ in batch]))
                .group_by(E.reduction_step_id, E.sub_group_key)
            ).tuples()
        }
        attempts = [
            E(
                reduction_step_id=plan.step_id,
                sub_group_key=plan.sub_group_key,
                attempt=(previous.get((plan.step_id, plan.sub_group_key)) or 0) + 1,
                retry_count=retry,
                status=S.PENDING,
                input_fingerprint=plan.fingerprint,
                reduction_software_version_id=plan.software_version_id,
                reduction_step_config_id=plan.config_id,
                dagster_run_id=run_id,
                hpc_backend=backend,
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
        # Only now the transitions: nothing below queries, so they reach ops-db in a few batched statements.
        refs = []
        for (plan, retry), attempt in zip(batch, attempts, strict=True):
            transition(
                session,
                attempt,
                S.STAGING_DATA,
                message=f"{len(plan.package_ids)} package(s), {len(plan.upstream_products)} upstream product(s)",
            )
            attempt.attempt_dir = attempt_dir_of(plan.sub_group_key, attempt.id)
            refs.append(AttemptRef(attempt.id, attempt.attempt, plan.sub_group_key, retry, owner_run_id=run_id))
        return refs

    def mark_submitted(self, submitted, *, backend):
        with session_scope(self.engine) as session:
            attempts = _attempts_by_id(session, [attempt_id for attempt_id, _ in submitted])
            for attempt_id, job_id in submitted:
                attempt = attempts[attempt_id]
                attempt.hpc_job_id = job_id
                attempt.hpc_backend = backend
                if attempt.status is S.STAGING_DATA:
                    transition(session, attempt, S.SUBMITTED, message=f"{backend} job {job_id}")

    def mark_running(self, attempt_ids):
        with session_scope(self.engine) as session:
            for attempt in _attempts_by_id(session, list(attempt_ids)).values():
                if attempt.status is S.SUBMITTED:
                    transition(session, attempt, S.RUNNING, message=f"job {attempt.hpc_job_id} started")

    def mark_collecting(self, finished):
        with session_scope(self.engine) as session:
            attempts = _attempts_by_id(session, [attempt_id for attempt_id, _ in finished])
            for attempt_id, info in finished:
                attempt = attempts[attempt_id]
                if attempt.status is S.COLLECTING_RESULTS:
                    continue  # adopted mid-collection: its job's accounting was recorded then
                _apply_metrics(attempt, info)
                if attempt.status is S.SUBMITTED:
                    transition(session, attempt, S.RUNNING, message="job finished between two polls")
                if attempt.status is S.RUNNING:
                    transition(session, attempt, S.COLLECTING_RESULTS, message=f"exit code {info.exit_code}")

    def register_round(self, results, *, processing_location_id):
        """One transaction, a savepoint per attempt: a refused attempt rolls back alone; the lineage aggregates
        of the others are written in one go. Should anything unexpected break the round, it is registered
        again one transaction per attempt, which isolates the culprit."""
        try:
            return self._register_together(results, processing_location_id)
        except Exception as error:  # noqa: BLE001 - fall back to per-attempt transactions
            if _is_connection_error(error):
                raise  # ops-db is away: the caller retries the whole round
            log.warning("registering %s attempt(s) together failed; one by one instead", len(results), exc_info=True)
        out: dict[int, Registered | CcatError] = {}
        for attempt_id, discovered in results:
            try:
                with session_scope(self.engine) as session:
                    attempt = session.get(m.ExecutedReductionStep, attempt_id)
                    out[attempt_id] = self._register(session, attempt, discovered, processing_location_id, True)
            except CcatError as error:
                out[attempt_id] = error
        return out

    def _register_together(self, results, processing_location_id) -> dict[int, Registered | CcatError]:
        out: dict[int, Registered | CcatError] = {}
        with session_scope(self.engine) as session:
            attempts = _attempts_by_id(session, [attempt_id for attempt_id, _ in results])
            for attempt_id, discovered in results:
                attempt = attempts[attempt_id]
                if attempt.status is S.COMPLETED:  # registered by an earlier try whose commit was not confirmed
                    out[attempt_id] = _registered(attempt.products)
                    continue
                try:
                    with session.begin_nested():
                        out[attempt_id] = self._register(session, attempt, discovered, processing_location_id, False)
                except CcatError as error:
                    out[attempt_id] = error
            record_lineage_aggregates(
                session, attempt_id=[a for a, r in out.items() if isinstance(r, Registered) and a in attempts]
            )
        return out

    @staticmethod
    def _register(session, attempt, discovered, processing_location_id, aggregates) -> Registered:
        products = register_attempt_results(
            session,
            attempt=attempt,
            discovered=discovered,
            processing_location_id=processing_location_id,
            # The input lineage and its closure were recorded when the attempt was created (create_round).
            input_package_ids=[],
            input_product_ids=[],
            lineage_aggregates=aggregates,
        )
        return _registered(products)

    def fail(self, attempt_id, *, error, kind, info=None, cancelled=False):
        with session_scope(self.engine) as session:
            attempt = session.get(m.ExecutedReductionStep, attempt_id)
            if attempt is None or attempt.status in TERMINAL_RUN_STATUSES:
                return
            if info is not None:
                _apply_metrics(attempt, info)
            attempt.error = error
            attempt.failure_kind = kind
            to_status = S.CANCELLED if cancelled and attempt.status is not S.COLLECTING_RESULTS else S.FAILED
            transition(session, attempt, to_status, message=error[:500])

    @contextmanager
    def _hold_in_flight(self, plan: SubGroupPlan) -> Iterator[InFlightAttempt | None]:
        E = m.ExecutedReductionStep
        with session_scope(self.engine) as session:
            if session.get_bind().dialect.name == "sqlite":
                # SQLite has no row locks and pysqlite begins a transaction only at the first write, so a second
                # adopter could read the row before this one writes it. A write transaction from the start makes
                # the second wait (busy_timeout) until this one has committed.
                session.connection().exec_driver_sql("BEGIN IMMEDIATE")
            # PostgreSQL: a second adopter waits on the row lock, then reads the row as this one committed it.
            attempt = session.scalars(
                select(E)
                .where(E.reduction_step_id == plan.step_id)
                .where(E.sub_group_key == plan.sub_group_key)
                .where(E.status.not_in(list(TERMINAL_RUN_STATUSES)))
                .with_for_update()
            ).one_or_none()
            if attempt is None:
                yield None
                return

            def end_as_lost(detail: str) -> None:
                attempt.error, attempt.failure_kind = detail, FailureKind.LOST
                transition(session, attempt, S.FAILED, message=detail)

            def take_over(run_id: str) -> AttemptRef:
                owner, attempt.dagster_run_id = attempt.dagster_run_id, run_id
                return _ref(attempt, owner)

            yield InFlightAttempt(
                attempt.dagster_run_id, attempt.input_fingerprint, attempt.hpc_job_id, end_as_lost, take_over
            )

    def count_in_flight(self, *, processing_location_id, backend, excluding_run_id):
        E = m.ExecutedReductionStep
        with session_scope(self.engine) as session:
            count = session.scalar(
                select(func.count(E.id))
                .join(m.ReductionStep, m.ReductionStep.id == E.reduction_step_id)
                .join(m.Pipeline, m.Pipeline.id == m.ReductionStep.pipeline_id)
                .where(m.Pipeline.processing_location_id == processing_location_id)
                .where(E.hpc_backend == backend)
                .where(E.status.in_(IN_FLIGHT_STATUSES))
                .where(E.hpc_job_id.is_not(None))
                .where((E.dagster_run_id != excluding_run_id) | E.dagster_run_id.is_(None))
            )
        return int(count or 0)

    def last_failures(self, step_id, keys):
        E = m.ExecutedReductionStep
        wanted = dict(keys)
        if not wanted:
            return {}
        newest = (
            select(E.sub_group_key, func.max(E.attempt).label("attempt"))
            .where(E.reduction_step_id == step_id)
            .where(E.sub_group_key.in_(list(wanted)))
            .group_by(E.sub_group_key)
            .subquery()
        )
        with session_scope(self.engine) as session:
            rows = session.execute(
                select(E.sub_group_key, E.input_fingerprint, E.status, E.failure_kind)
                .join(newest, (newest.c.sub_group_key == E.sub_group_key) & (newest.c.attempt == E.attempt))
                .where(E.reduction_step_id == step_id)
            ).all()
        return {
            row.sub_group_key: FailureKind(row.failure_kind)
            for row in rows
            if row.status is S.FAILED
            and row.failure_kind is not None
            and row.input_fingerprint == wanted[row.sub_group_key]
        }


def _ref(attempt: m.ExecutedReductionStep, owner: str | None) -> AttemptRef:
    return AttemptRef(
        attempt_id=attempt.id,
        attempt_number=attempt.attempt,
        sub_group_key=attempt.sub_group_key,
        retry=attempt.retry_count,
        job_id=attempt.hpc_job_id,
        status=attempt.status,
        owner_run_id=owner,
    )


def _registered(products: Sequence[m.DataProduct]) -> Registered:
    return Registered(len(products), sum(p.size_bytes for p in products))


def _apply_metrics(attempt: m.ExecutedReductionStep, info: JobInfo) -> None:
    attempt.exit_code = info.exit_code
    attempt.wall_time_seconds = info.wall_time_seconds
    attempt.cpu_hours = info.cpu_hours
    attempt.peak_memory_gb = info.peak_memory_gb


def _attempts_by_id(session: Session, attempt_ids: list[int]) -> dict[int, m.ExecutedReductionStep]:
    """The attempts of a round in one query, their transitions with them (``transition`` appends to that
    collection; a lazy load per attempt would also flush the previous attempt's changes one by one)."""
    rows = session.scalars(
        select(m.ExecutedReductionStep)
        .where(m.ExecutedReductionStep.id.in_(attempt_ids))
        .options(selectinload(m.ExecutedReductionStep.transitions))
    )
    return {row.id: row for row in rows}


def _is_connection_error(error: BaseException) -> bool:
    from ccat_dagster.execution.resilience import is_transient_db_error

    return is_transient_db_error(error)


# ---------------------------------------------------------------------------------------------- in memory


@dataclass
class MemoryAttempt:
    """One attempt row of ``InMemoryAttemptStore``; ``history`` is its RunStatus audit trail."""

    id: int
    step_id: int
    sub_group_key: str
    attempt: int
    retry: int
    fingerprint: str | None
    run_id: str | None
    backend: str
    status: RunStatus = S.STAGING_DATA
    job_id: str | None = None
    error: str | None = None
    failure_kind: FailureKind | None = None
    exit_code: int | None = None
    product_count: int = 0
    location_id: int = 0
    history: list[RunStatus] = field(default_factory=lambda: [S.STAGING_DATA])

    def move(self, status: RunStatus) -> None:
        from ccat_dagster.opsdb.states import check_transition

        check_transition(self.status, status, attempt_id=self.id)
        self.status = status
        self.history.append(status)


class InMemoryAttemptStore(AttemptStore):
    """The same state machine in dicts, for tests of the loop (no database, no transactions to fail)."""

    def __init__(self, *, processing_location_id: int = 0) -> None:
        self.rows: dict[int, MemoryAttempt] = {}
        self.location_id = processing_location_id
        self._ids = itertools.count(1)
        self._by_sub_group: dict[tuple[int, str], list[MemoryAttempt]] = {}
        self._adoption_lock = threading.Lock()

    def attempts_of(self, sub_group_key: str) -> list[MemoryAttempt]:
        return [row for row in self.rows.values() if row.sub_group_key == sub_group_key]

    def _of(self, step_id: int, key: str) -> list[MemoryAttempt]:
        return self._by_sub_group.get((step_id, key), [])

    def _active(self, step_id: int, key: str) -> MemoryAttempt | None:
        return next((r for r in self._of(step_id, key) if r.status not in TERMINAL_RUN_STATUSES), None)

    def add(self, plan: SubGroupPlan, *, run_id: str | None, backend: str, **values) -> MemoryAttempt:
        """A row as a test wants it (e.g. an attempt left in flight by a dead run)."""
        number = len(self._of(plan.step_id, plan.sub_group_key)) + 1
        row = MemoryAttempt(
            id=next(self._ids),
            step_id=plan.step_id,
            sub_group_key=plan.sub_group_key,
            attempt=number,
            retry=values.pop("retry", 0),
            fingerprint=plan.fingerprint,
            run_id=run_id,
            backend=backend,
            location_id=self.location_id,
            **values,
        )
        self.rows[row.id] = row
        self._by_sub_group.setdefault((row.step_id, row.sub_group_key), []).append(row)
        return row

    def create_round(self, batch, *, run_id, backend, attempt_dir_of):
        created, conflicts = [], []
        for plan, retry in batch:
            if self._active(plan.step_id, plan.sub_group_key) is not None:
                conflicts.append(plan.sub_group_key)
                continue
            row = self.add(plan, run_id=run_id, backend=backend, retry=retry)
            created.append(AttemptRef(row.id, row.attempt, row.sub_group_key, retry, owner_run_id=run_id))
        return created, conflicts

    def mark_submitted(self, submitted, *, backend):
        for attempt_id, job_id in submitted:
            row = self.rows[attempt_id]
            row.job_id, row.backend = job_id, backend
            if row.status is S.STAGING_DATA:
                row.move(S.SUBMITTED)

    def mark_running(self, attempt_ids):
        for attempt_id in attempt_ids:
            if self.rows[attempt_id].status is S.SUBMITTED:
                self.rows[attempt_id].move(S.RUNNING)

    def mark_collecting(self, finished):
        for attempt_id, info in finished:
            row = self.rows[attempt_id]
            if row.status is S.COLLECTING_RESULTS:
                continue
            row.exit_code = info.exit_code
            if row.status is S.SUBMITTED:
                row.move(S.RUNNING)
            if row.status is S.RUNNING:
                row.move(S.COLLECTING_RESULTS)

    def register_round(self, results, *, processing_location_id):
        out: dict[int, Registered | CcatError] = {}
        for attempt_id, discovered in results:
            row = self.rows[attempt_id]
            if row.status is not S.COMPLETED:
                row.move(S.COMPLETED)
                row.product_count = len(discovered)
            out[attempt_id] = Registered(row.product_count, sum(p.size for p in discovered))
        return out

    def fail(self, attempt_id, *, error, kind, info=None, cancelled=False):
        row = self.rows[attempt_id]
        if row.status in TERMINAL_RUN_STATUSES:
            return
        row.error, row.failure_kind = error, kind
        if info is not None:
            row.exit_code = info.exit_code
        row.move(S.CANCELLED if cancelled and row.status is not S.COLLECTING_RESULTS else S.FAILED)

    @contextmanager
    def _hold_in_flight(self, plan: SubGroupPlan) -> Iterator[InFlightAttempt | None]:
        with self._adoption_lock:
            row = self._active(plan.step_id, plan.sub_group_key)
            if row is None:
                yield None
                return

            def end_as_lost(detail: str) -> None:
                row.error, row.failure_kind = detail, FailureKind.LOST
                row.move(S.FAILED)

            def take_over(run_id: str) -> AttemptRef:
                owner, row.run_id = row.run_id, run_id
                return AttemptRef(row.id, row.attempt, row.sub_group_key, row.retry, row.job_id, row.status, owner)

            yield InFlightAttempt(row.run_id, row.fingerprint, row.job_id, end_as_lost, take_over)

    def count_in_flight(self, *, processing_location_id, backend, excluding_run_id):
        return sum(
            1
            for r in self.rows.values()
            if r.status in IN_FLIGHT_STATUSES
            and r.job_id
            and r.backend == backend
            and r.location_id == processing_location_id
            and r.run_id != excluding_run_id
        )

    def last_failures(self, step_id, keys):
        out: dict[str, FailureKind] = {}
        for key, fingerprint in keys:
            rows = self._of(step_id, key)
            newest = max(rows, key=lambda r: r.attempt) if rows else None
            if newest and newest.status is S.FAILED and newest.failure_kind and newest.fingerprint == fingerprint:
                out[key] = newest.failure_kind
        return out
