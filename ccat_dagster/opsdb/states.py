"""The ONE place that decides which RunStatus transitions are legal, and records them.

pending → staging_data → submitted → running → collecting_results → completed, and failed / cancelled from
every non-terminal state (collecting_results cannot be cancelled: products are being written in one
transaction). submitted → collecting_results covers a job that finished between two polls. Terminal states
never change: a retry is a new attempt row. ``observe_transitions`` lets a caller (the Dagster asset) hear
of each transition once it is committed, without this package knowing who listens.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from sqlalchemy import event
from sqlalchemy.orm import Session, SessionTransaction

from ccat_dagster.opsdb.enums import FailureKind, RunStatus
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
    observers = _observers.get()
    if observers:
        if attempt.id is None:
            session.flush([attempt])
        _defer(
            session,
            observers,
            ObservedTransition(
                attempt_id=attempt.id,
                reduction_step_id=attempt.reduction_step_id,
                sub_group_key=attempt.sub_group_key,
                attempt=attempt.attempt,
                from_status=from_status,
                to_status=to_status,
                at=now,
                message=message,
                hpc_job_id=attempt.hpc_job_id,
                failure_kind=attempt.failure_kind if to_status in (S.FAILED, S.CANCELLED) else None,
            ),
        )
    return row


@dataclass(frozen=True)
class ObservedTransition:
    """One committed RunStatus transition, as ``observe_transitions`` callbacks receive it."""

    attempt_id: int
    reduction_step_id: int
    sub_group_key: str
    attempt: int
    from_status: RunStatus
    to_status: RunStatus
    at: dt.datetime
    message: str | None
    hpc_job_id: str | None
    failure_kind: FailureKind | None = None
    """Why the attempt failed, for a transition to failed / cancelled (set before the transition)."""


TransitionObserver = Callable[[ObservedTransition], None]
_observers: contextvars.ContextVar[tuple[TransitionObserver, ...]] = contextvars.ContextVar(
    "ccat_transition_observers", default=()
)
_PENDING_KEY = "ccat_pending_transitions"


@contextlib.contextmanager
def observe_transitions(callback: TransitionObserver) -> Iterator[None]:
    """Call ``callback`` for every transition made in this context (thread / task), once it is committed.

    A transition whose transaction rolls back is never reported. The callback runs right after the commit,
    in the committing thread; an exception from it propagates to the code that committed.
    """
    token = _observers.set((*_observers.get(), callback))
    try:
        yield
    finally:
        _observers.reset(token)


def _defer(session: Session, observers: tuple[TransitionObserver, ...], item: ObservedTransition) -> None:
    pending = session.info.get(_PENDING_KEY)
    if pending is None:
        pending = session.info[_PENDING_KEY] = []
        if not event.contains(session, "after_commit", _dispatch):
            # Listeners stay for the session's life: removing one while SQLAlchemy dispatches it is an error.
            event.listen(session, "after_commit", _dispatch)
            event.listen(session, "after_soft_rollback", _discard)
    pending.append((observers, item))


def _dispatch(session: Session) -> None:
    for observers, item in session.info.pop(_PENDING_KEY, []):
        for callback in observers:
            callback(item)


def _discard(session: Session, previous_transaction: SessionTransaction) -> None:
    if previous_transaction.parent is None:  # not a savepoint: nothing of it will ever be committed
        session.info.pop(_PENDING_KEY, None)
