"""The ONE place that decides which RunStatus transitions are legal, and records them.

pending → staging_data → submitted → running → collecting_results → completed, and failed / cancelled from
every non-terminal state (collecting_results cannot be cancelled: products are being written in one
transaction). submitted → collecting_results covers a job that finished between two polls. Terminal states
never change: a retry is a new attempt row.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy.orm import Session

from ccat_dagster.opsdb.enums import RunStatus
from ccat_dagster.opsdb.models import ExecutedReductionStep, RunStatusTransition, utcnow

S = RunStatus

LEGAL_TRANSITIONS: dict[RunStatus, frozenset[RunStatus]] = {
    S.PENDING: frozenset({S.STAGING_DATA, S.FAILED, S.CANCELLED}),
    S.STAGING_DATA: frozenset({S.SUBMITTED, S.FAILED, S.CANCELLED}),
    S.SUBMITTED: frozenset({S.RUNNING, S.COLLECTING_RESULTS, S.FAILED, S.CANCELLED}),
    S.RUNNING: frozenset({S.COLLECTING_RESULTS, S.FAILED, S.CANCELLED}),
    S.COLLECTING_RESULTS: frozenset({S.COMPLETED, S.FAILED}),
    S.COMPLETED: frozenset(),
    S.FAILED: frozenset(),
    S.CANCELLED: frozenset(),
}


class IllegalTransitionError(ValueError):
    """An attempt was asked to move between two states the RunStatus machine does not connect."""

    def __init__(self, *, attempt_id: int | None, from_status: RunStatus, to_status: RunStatus) -> None:
        allowed = ", ".join(sorted(s.value for s in LEGAL_TRANSITIONS[from_status])) or "none (terminal)"
        super().__init__(
            f"illegal RunStatus transition {from_status.value} → {to_status.value} for attempt {attempt_id}; "
            f"from {from_status.value} the allowed next states are: {allowed}"
        )
        self.from_status = from_status
        self.to_status = to_status


def check_transition(from_status: RunStatus, to_status: RunStatus, *, attempt_id: int | None = None) -> None:
    if to_status not in LEGAL_TRANSITIONS[from_status]:
        raise IllegalTransitionError(attempt_id=attempt_id, from_status=from_status, to_status=to_status)


def transition(
    session: Session,
    attempt: ExecutedReductionStep,
    to_status: RunStatus,
    *,
    message: str | None = None,
    at: dt.datetime | None = None,
) -> RunStatusTransition:
    """Move ``attempt`` to ``to_status``, stamping started/finished times and writing the audit row.

    The caller owns the transaction; nothing is committed here.
    """
    from_status = RunStatus(attempt.status)
    check_transition(from_status, to_status, attempt_id=attempt.id)
    now = at or utcnow()
    attempt.status = to_status
    attempt.status_changed_at = now
    if to_status is S.STAGING_DATA and attempt.started_at is None:
        attempt.started_at = now
    if to_status.is_terminal:
        attempt.finished_at = now
    row = RunStatusTransition(from_status=from_status, to_status=to_status, at=now, message=message)
    attempt.transitions.append(row)
    session.add(row)
    return row
