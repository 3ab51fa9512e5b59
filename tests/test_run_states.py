"""The RunStatus transition table: every legal transition passes, every other one raises naming both states."""

from __future__ import annotations

import itertools

import pytest
from sqlalchemy.orm import Session

from ccat_dagster.opsdb.enums import RunStatus
from ccat_dagster.opsdb.states import (
    LEGAL_TRANSITIONS,
    IllegalTransitionError,
    check_transition,
    observe_transitions,
    transition,
)

from .opsdb_factories import make_attempt, make_world

S = RunStatus
EXPECTED_LEGAL = {
    (S.PENDING, S.STAGING_DATA),
    (S.PENDING, S.FAILED),
    (S.PENDING, S.CANCELLED),
    (S.STAGING_DATA, S.SUBMITTED),
    (S.STAGING_DATA, S.FAILED),
    (S.STAGING_DATA, S.CANCELLED),
    (S.SUBMITTED, S.RUNNING),
    (S.SUBMITTED, S.COLLECTING_RESULTS),
    (S.SUBMITTED, S.FAILED),
    (S.SUBMITTED, S.CANCELLED),
    (S.RUNNING, S.COLLECTING_RESULTS),
    (S.RUNNING, S.FAILED),
    (S.RUNNING, S.CANCELLED),
    (S.COLLECTING_RESULTS, S.COMPLETED),
    (S.COLLECTING_RESULTS, S.FAILED),
}


@pytest.mark.parametrize("pair", sorted(itertools.product(S, S)), ids=lambda p: f"{p[0].value}->{p[1].value}")
def test_transition_table(pair):
    from_status, to_status = pair
    if pair in EXPECTED_LEGAL:
        check_transition(from_status, to_status)
    else:
        with pytest.raises(IllegalTransitionError) as raised:
            check_transition(from_status, to_status, attempt_id=7)
        assert from_status.value in str(raised.value) and to_status.value in str(raised.value)
        assert "attempt 7" in str(raised.value)


def test_table_covers_every_status():
    assert set(LEGAL_TRANSITIONS) == set(S)


def test_transition_writes_audit_rows_and_timestamps(engine):
    with Session(engine) as session, session.begin():
        attempt = make_attempt(session, make_world(session))
        for status in (S.STAGING_DATA, S.SUBMITTED, S.RUNNING, S.COLLECTING_RESULTS, S.COMPLETED):
            transition(session, attempt, status, message=f"to {status.value}")
        session.flush()
        assert [t.to_status for t in attempt.transitions] == [
            S.STAGING_DATA,
            S.SUBMITTED,
            S.RUNNING,
            S.COLLECTING_RESULTS,
            S.COMPLETED,
        ]
        assert attempt.transitions[0].from_status is S.PENDING
        assert attempt.started_at is not None and attempt.finished_at is not None
        assert attempt.finished_at >= attempt.started_at
        with pytest.raises(IllegalTransitionError):
            transition(session, attempt, S.RUNNING)
        assert attempt.status is S.COMPLETED


def test_observers_see_committed_transitions_only(engine):
    seen: list = []
    with Session(engine) as session, session.begin():
        attempt = make_attempt(session, make_world(session), key="k")
        attempt_id = attempt.id
    with observe_transitions(seen.append):
        with Session(engine) as session, session.begin():
            attempt = session.get(type(attempt), attempt_id)
            transition(session, attempt, S.STAGING_DATA, message="staging")
            attempt.hpc_job_id = "42"
            transition(session, attempt, S.SUBMITTED, message="job 42")
            assert seen == []  # not before the commit
        assert [(t.from_status, t.to_status, t.message, t.hpc_job_id) for t in seen] == [
            (S.PENDING, S.STAGING_DATA, "staging", None),
            (S.STAGING_DATA, S.SUBMITTED, "job 42", "42"),
        ]
        assert {(t.attempt_id, t.sub_group_key, t.attempt) for t in seen} == {(attempt_id, "k", 1)}
        with pytest.raises(RuntimeError), Session(engine) as session, session.begin():
            transition(session, session.get(type(attempt), attempt_id), S.RUNNING)
            session.flush()
            raise RuntimeError("rolled back")
        assert len(seen) == 2
        with Session(engine) as session, session.begin():
            transition(session, session.get(type(attempt), attempt_id), S.RUNNING)
        assert [t.to_status for t in seen] == [S.STAGING_DATA, S.SUBMITTED, S.RUNNING]
    with Session(engine) as session, session.begin():
        transition(session, session.get(type(attempt), attempt_id), S.COLLECTING_RESULTS)
    assert len(seen) == 3  # outside the context: not observed
