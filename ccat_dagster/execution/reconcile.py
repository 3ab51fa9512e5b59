"""End ops-db attempts whose Dagster run is gone (failed, terminated, worker died). No Dagster imports."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from ccat_dagster.errors import CcatError
from ccat_dagster.execution.hpc.base import HpcBackend
from ccat_dagster.opsdb import models as m
from ccat_dagster.opsdb.engine import session_scope
from ccat_dagster.opsdb.enums import TERMINAL_RUN_STATUSES, RunStatus
from ccat_dagster.opsdb.states import transition


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


def end_attempts_of_runs(
    engine: Engine, *, run_ids: Sequence[str], cancelled: bool, backend: HpcBackend | None
) -> list[int]:
    """Cancel the HPC jobs of the runs' in-flight attempts and end them FAILED or CANCELLED. Idempotent."""
    ended: list[int] = []
    with session_scope(engine) as session:
        attempts = session.scalars(
            select(m.ExecutedReductionStep)
            .where(m.ExecutedReductionStep.dagster_run_id.in_(list(run_ids)))
            .where(m.ExecutedReductionStep.status.not_in(list(TERMINAL_RUN_STATUSES)))
        ).all()
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
            attempt.error = (
                f"Dagster run {attempt.dagster_run_id} was {'terminated' if cancelled else 'lost or failed'} "
                f"while the attempt was {attempt.status.value}{note}"
            )
            transition(session, attempt, status, message=attempt.error)
            ended.append(attempt.id)
    return ended
