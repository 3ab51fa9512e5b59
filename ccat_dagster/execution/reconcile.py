"""What happens to ops-db attempts whose Dagster run is gone, terminated or dead. No Dagster imports.

The orchestrator's own death (a killed run worker, a code-server or daemon restart, a run failed by Dagster) never
cancels an HPC job: the job keeps running and its attempt stays in flight with its job id, to be *adopted* by
the next run of its step, which reattaches by job id and collects it once (``StepRunner._adopt``). Attempts
that never reached the backend (no job id) end FAILED at once: nothing runs for them, and the next tick plans
the sub-group again. An automatic run that failed before it created any attempt is launched again, up to
``MAX_RELAUNCHES`` times in a row (``runs_with_attempts``). Jobs are cancelled only when a person or Dagster's
run termination asks for it (``cancel_attempts_of_runs``), or when adoption failed ``MAX_ADOPTIONS`` times in a
row (``give_up``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import psutil
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from ccat_dagster.errors import CcatError
from ccat_dagster.execution.hpc.base import HpcBackend
from ccat_dagster.opsdb import models as m
from ccat_dagster.opsdb.engine import session_scope
from ccat_dagster.opsdb.enums import TERMINAL_RUN_STATUSES, RunStatus
from ccat_dagster.opsdb.states import transition

# Runs that adopt the same attempts one after the other, each dying before it collected them: after this many
# the jobs are cancelled and the attempts failed, so that a job nobody can collect does not run forever.
MAX_ADOPTIONS = 3
# Automatic runs launched again one after the other, each failing before it created an attempt (its worker, or
# the storage it writes to, failed first): after this many the sub-groups wait for the next change or a person.
MAX_RELAUNCHES = 3


@dataclass(frozen=True)
class AdoptableAttempt:
    """An in-flight attempt with a job id whose Dagster run is dead: its job is left running for adoption."""

    attempt_id: int
    pipeline_name: str
    step_name: str
    sub_group_key: str
    hpc_job_id: str
    dagster_run_id: str


@dataclass(frozen=True)
class AdoptionRequest:
    """One run to request: the step's sub-groups whose attempts it adopts, and a run key that makes it once."""

    pipeline_name: str
    step_name: str
    sub_group_keys: tuple[str, ...]
    attempt_ids: tuple[int, ...]
    dead_run_ids: tuple[str, ...]
    generation: int
    run_key: str


def orphaned_attempt_runs(session: Session, *, limit: int) -> list[str]:
    """Dagster run ids that own in-flight attempts (the caller asks Dagster which of them are dead)."""
    return list(
        session.scalars(
            select(m.ExecutedReductionStep.dagster_run_id)
            .where(m.ExecutedReductionStep.status.not_in(list(TERMINAL_RUN_STATUSES)))
            .where(m.ExecutedReductionStep.dagster_run_id.is_not(None))
            .distinct()
            .limit(limit)
        )
    )


def runs_with_attempts(session: Session, run_ids: Sequence[str]) -> set[str]:
    """Those of the given Dagster runs that created at least one ops-db attempt.

    A failed automatic run that created none left no trace a later tick would follow (ticks follow new data and
    finished attempts), so the Dagster layer launches it again."""
    if not run_ids:
        return set()
    return set(
        session.scalars(
            select(m.ExecutedReductionStep.dagster_run_id)
            .where(m.ExecutedReductionStep.dagster_run_id.in_(list(run_ids)))
            .distinct()
        )
    )


def _in_flight_of_runs(session: Session, run_ids: Sequence[str]) -> list[m.ExecutedReductionStep]:
    return list(
        session.scalars(
            select(m.ExecutedReductionStep)
            .where(m.ExecutedReductionStep.dagster_run_id.in_(list(run_ids)))
            .where(m.ExecutedReductionStep.status.not_in(list(TERMINAL_RUN_STATUSES)))
            .order_by(m.ExecutedReductionStep.id)
        ).all()
    )


def release_attempts_of_dead_runs(
    engine: Engine, *, run_ids: Sequence[str]
) -> tuple[list[int], list[AdoptableAttempt]]:
    """The runs died without being asked to stop: end their attempts that have no job, keep the others.

    Returns the attempt ids ended FAILED (never submitted: nothing runs for them) and the attempts left in
    flight with their job id for the next run of their step to adopt. No job is cancelled. Idempotent.
    """
    ended: list[int] = []
    adoptable: list[AdoptableAttempt] = []
    with session_scope(engine) as session:
        for attempt in _in_flight_of_runs(session, run_ids):
            if attempt.hpc_job_id:
                adoptable.append(
                    AdoptableAttempt(
                        attempt_id=attempt.id,
                        pipeline_name=attempt.step.pipeline.name,
                        step_name=attempt.step.name,
                        sub_group_key=attempt.sub_group_key,
                        hpc_job_id=attempt.hpc_job_id,
                        dagster_run_id=attempt.dagster_run_id or "",
                    )
                )
                continue
            attempt.error = (
                f"Dagster run {attempt.dagster_run_id} died while the attempt was {attempt.status.value}, before "
                "its job was submitted; the sub-group is planned again"
            )
            transition(session, attempt, RunStatus.FAILED, message=attempt.error)
            ended.append(attempt.id)
    return ended, adoptable


def cancel_attempts_of_runs(engine: Engine, *, run_ids: Sequence[str], backend: HpcBackend | None) -> list[int]:
    """The runs were terminated (a person, Dagster's run termination): cancel their jobs, end the attempts.

    In-flight attempts end CANCELLED, except those collecting results (their transaction rolled back; the job
    has ended anyway): FAILED. Idempotent.
    """
    with session_scope(engine) as session:
        attempts = _in_flight_of_runs(session, run_ids)
        return _end(
            session,
            attempts,
            backend,
            lambda a: f"Dagster run {a.dagster_run_id} was terminated while the attempt was {a.status.value}",
            cancelled=True,
        )


def give_up(engine: Engine, *, attempt_ids: Sequence[int], backend: HpcBackend | None) -> list[int]:
    """Adoption of these attempts failed ``MAX_ADOPTIONS`` times: cancel their jobs and end them FAILED."""
    with session_scope(engine) as session:
        attempts = list(
            session.scalars(
                select(m.ExecutedReductionStep)
                .where(m.ExecutedReductionStep.id.in_(list(attempt_ids)))
                .where(m.ExecutedReductionStep.status.not_in(list(TERMINAL_RUN_STATUSES)))
            ).all()
        )
        return _end(
            session,
            attempts,
            backend,
            lambda a: (
                f"{MAX_ADOPTIONS} Dagster runs in a row died before collecting job {a.hpc_job_id} "
                f"(last: {a.dagster_run_id}); the job was cancelled and the sub-group is planned again"
            ),
            cancelled=False,
        )


def _end(
    session: Session,
    attempts: Iterable[m.ExecutedReductionStep],
    backend: HpcBackend | None,
    reason: Callable[[m.ExecutedReductionStep], str],
    *,
    cancelled: bool,
) -> list[int]:
    ended: list[int] = []
    for attempt in attempts:
        note = ""
        if attempt.hpc_job_id and backend is not None and attempt.hpc_backend == backend.name:
            try:
                backend.cancel(attempt.hpc_job_id)
            except CcatError as error:
                note = f" (cancelling job {attempt.hpc_job_id} failed: {error})"
        status = RunStatus.CANCELLED if cancelled else RunStatus.FAILED
        if status is RunStatus.CANCELLED and attempt.status is RunStatus.COLLECTING_RESULTS:
            status = RunStatus.FAILED  # collection cannot be cancelled half-way; its transaction rolled back
        attempt.error = reason(attempt) + note
        transition(session, attempt, status, message=attempt.error)
        ended.append(attempt.id)
    return ended


def plan_adoptions(
    adoptable: Sequence[AdoptableAttempt], *, generation_of: Callable[[str], int]
) -> tuple[list[AdoptionRequest], list[AdoptableAttempt]]:
    """One adoption run per (pipeline, step) for the attempts left by dead runs, and those to give up on.

    ``generation_of(run_id)`` says how many adoptions in a row led to that run (0 for a run started by a sensor,
    a schedule or a person). Its attempts are adopted by a run of generation + 1, or given up at
    ``MAX_ADOPTIONS``. The run key names the attempts and the runs that left them, so a repeated tick requests
    the same run once, while a later death of the adopting run leads to a new key.
    """
    by_step: dict[tuple[str, str, int], list[AdoptableAttempt]] = {}
    abandoned: list[AdoptableAttempt] = []
    for attempt in adoptable:
        generation = generation_of(attempt.dagster_run_id) + 1
        if generation > MAX_ADOPTIONS:
            abandoned.append(attempt)
            continue
        by_step.setdefault((attempt.pipeline_name, attempt.step_name, generation), []).append(attempt)
    requests = []
    for (pipeline, step, generation), attempts in sorted(by_step.items()):
        attempts = sorted(attempts, key=lambda a: a.attempt_id)
        digest = hashlib.sha256(
            "\n".join(f"{a.attempt_id}\0{a.dagster_run_id}" for a in attempts).encode()
        ).hexdigest()[:32]
        requests.append(
            AdoptionRequest(
                pipeline_name=pipeline,
                step_name=step,
                sub_group_keys=tuple(a.sub_group_key for a in attempts),
                attempt_ids=tuple(a.attempt_id for a in attempts),
                dead_run_ids=tuple(sorted({a.dagster_run_id for a in attempts})),
                generation=generation,
                run_key=f"adopt:{pipeline}:{step}:{len(attempts)}:{digest}",
            )
        )
    return requests, abandoned


def process_alive(pid: int, *, started_by: float) -> bool:
    """Whether process ``pid`` runs on this host and is the one that was running at ``started_by`` (a Unix time).

    A process created after ``started_by`` is a later process that reused the id; a zombie has exited.
    """
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        # create_time has a resolution of a clock tick; allow for it.
        return process.create_time() <= started_by + 1.0
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return False


def workers_gone(
    pids: Sequence[tuple[int, float]],
    *,
    alive: Callable[[int, float], bool] = lambda pid, at: process_alive(pid, started_by=at),
) -> bool:
    """True when a run recorded worker processes ``(pid, time recorded)`` and none of them is alive any more.

    No recorded process means no evidence: not gone.
    """
    return bool(pids) and not any(alive(pid, at) for pid, at in pids)
