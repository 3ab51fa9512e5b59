"""The attempt store's contract, run against ops-db on PostgreSQL and SQLite and against the in-memory store
the loop tests use (so the fake is held to what ops-db does), and migration 0003 on both dialects."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import inspect, select, text
from sqlalchemy.orm import Session

from ccat_dagster.execution.attempts import (
    Adoption,
    AttemptStore,
    InMemoryAttemptStore,
    OpsDbAttemptStore,
    Registered,
)
from ccat_dagster.execution.discovery import DiscoveredProduct
from ccat_dagster.execution.hpc.base import JobInfo, JobState
from ccat_dagster.execution.planning import Readiness, SubGroupPlan
from ccat_dagster.opsdb import models as m
from ccat_dagster.opsdb.engine import make_engine
from ccat_dagster.opsdb.enums import FailureKind, RunStatus
from ccat_dagster.opsdb.migrate import alembic_config, upgrade

from .conftest import create_pg_database, drop_pg_database
from .opsdb_factories import make_attempt, make_world

S = RunStatus


@dataclass
class Subject:
    store: AttemptStore
    step_id: int
    package_ids: tuple[int, ...]
    location_id: int
    status: Callable[[int], tuple]
    """attempt id → (status, failure_kind, error, job id, run id)"""
    version_id: int = 1
    config_id: int = 1

    def plan(self, key: str, fingerprint: str = "f" * 64) -> SubGroupPlan:
        return SubGroupPlan(
            step_id=self.step_id,
            step_name="calibrate",
            sub_group_key=key,
            readiness=Readiness.GAP,
            package_ids=self.package_ids,
            software_version_id=self.version_id,
            config_id=self.config_id,
            fingerprint=fingerprint,
        )


def _ops_db_subject(url: str) -> tuple[Subject, object]:
    engine = make_engine(url)
    with Session(engine) as session, session.begin():
        world = make_world(session)
        ids = (world.step.id, world.package.id, world.processing.id, world.software_version.id, world.config.id)

    def status(attempt_id: int):
        with Session(engine) as session:
            row = session.get(m.ExecutedReductionStep, attempt_id)
            return row.status, row.failure_kind, row.error, row.hpc_job_id, row.dagster_run_id

    return Subject(OpsDbAttemptStore(engine), ids[0], (ids[1],), ids[2], status, ids[3], ids[4]), engine


@pytest.fixture(params=["postgresql", "sqlite", "memory"])
def subject(request, tmp_path) -> Iterator[Subject]:
    if request.param == "memory":
        store = InMemoryAttemptStore(processing_location_id=7)

        def status(attempt_id: int):
            row = store.rows[attempt_id]
            return row.status, row.failure_kind, row.error, row.job_id, row.run_id

        yield Subject(store, 1, (1,), 7, status)
        return
    url = create_pg_database() if request.param == "postgresql" else f"sqlite:///{tmp_path / 'opsdb.sqlite'}"
    upgrade(url)
    subject, engine = _ops_db_subject(url)
    yield subject
    engine.dispose()
    if request.param == "postgresql":
        drop_pg_database(url)


def _dir(key: str, attempt_id: int) -> str:
    return f"/base/{key}/{attempt_id}"


def _product(tmp_path: Path) -> DiscoveredProduct:
    return DiscoveredProduct("science/map.txt", "science", 5, "a" * 64, tmp_path / "science" / "map.txt")


def test_an_attempt_walks_the_state_machine_and_completes_in_the_collection_transaction(subject, tmp_path):
    store = subject.store
    (ref,), conflicts = store.create_round([(subject.plan("k1"), 0)], run_id="r1", backend="slurm", attempt_dir_of=_dir)
    assert conflicts == [] and ref.sub_group_key == "k1" and ref.attempt_number == 1
    assert subject.status(ref.attempt_id)[0] is S.STAGING_DATA
    store.mark_submitted([(ref.attempt_id, "42")], backend="slurm")
    store.mark_submitted([(ref.attempt_id, "42")], backend="slurm")  # a repeated call changes nothing
    assert subject.status(ref.attempt_id)[0] is S.SUBMITTED and subject.status(ref.attempt_id)[3] == "42"
    assert (
        store.count_in_flight(processing_location_id=subject.location_id, backend="slurm", excluding_run_id="r2") == 1
    )
    assert (
        store.count_in_flight(processing_location_id=subject.location_id, backend="slurm", excluding_run_id="r1") == 0
    )
    store.mark_running([ref.attempt_id])
    info = JobInfo("42", JobState.COMPLETED, exit_code=0, wall_time_seconds=3.0)
    store.mark_collecting([(ref.attempt_id, info)])
    store.mark_collecting([(ref.attempt_id, info)])
    assert subject.status(ref.attempt_id)[0] is S.COLLECTING_RESULTS
    result = store.register_round([(ref.attempt_id, [_product(tmp_path)])], processing_location_id=subject.location_id)
    assert result == {ref.attempt_id: Registered(1, 5)}
    # Registering again (a retry whose first commit was not confirmed) registers nothing twice.
    again = store.register_round([(ref.attempt_id, [_product(tmp_path)])], processing_location_id=subject.location_id)
    assert again == {ref.attempt_id: Registered(1, 5)}
    assert subject.status(ref.attempt_id)[0] is S.COMPLETED


def test_a_second_attempt_of_a_sub_group_in_flight_is_a_conflict_not_an_error(subject):
    store = subject.store
    (first,), _ = store.create_round([(subject.plan("k1"), 0)], run_id="r1", backend="local", attempt_dir_of=_dir)
    created, conflicts = store.create_round(
        [(subject.plan("k1"), 0), (subject.plan("k2"), 0)], run_id="r2", backend="local", attempt_dir_of=_dir
    )
    assert conflicts == ["k1"] and [ref.sub_group_key for ref in created] == ["k2"]


def test_fail_records_the_kind_once_and_last_failures_reads_it(subject):
    store = subject.store
    (ref,), _ = store.create_round([(subject.plan("k1"), 0)], run_id="r1", backend="local", attempt_dir_of=_dir)
    store.mark_submitted([(ref.attempt_id, "j1")], backend="local")
    store.fail(ref.attempt_id, error="job killed: out of memory", kind=FailureKind.OOM)
    store.fail(ref.attempt_id, error="second call", kind=FailureKind.LOST)  # terminal: unchanged
    assert subject.status(ref.attempt_id)[:3] == (S.FAILED, FailureKind.OOM, "job killed: out of memory")
    assert store.last_failures(subject.step_id, [("k1", "f" * 64)]) == {"k1": FailureKind.OOM}
    assert store.last_failures(subject.step_id, [("k1", "0" * 64)]) == {}  # other inputs
    (retry,), _ = store.create_round([(subject.plan("k1"), 1)], run_id="r1", backend="local", attempt_dir_of=_dir)
    assert retry.attempt_number == 2 and retry.retry == 1
    store.fail(retry.attempt_id, error="cancelled by a person", kind=FailureKind.CANCELLED, cancelled=True)
    assert subject.status(retry.attempt_id)[:2] == (S.CANCELLED, FailureKind.CANCELLED)
    assert store.last_failures(subject.step_id, [("k1", "f" * 64)]) == {}  # newest one was cancelled


def test_adoption_takes_over_only_what_no_live_run_watches(subject):
    store = subject.store
    refs, _ = store.create_round(
        [(subject.plan("k1"), 0), (subject.plan("k2"), 0)], run_id="dead", backend="local", attempt_dir_of=_dir
    )
    store.mark_submitted([(refs[0].attempt_id, "j1")], backend="local")  # k2 never reached the backend
    alive = store.adopt(subject.plan("k1"), run_id="new", is_run_alive=lambda run_id: True)
    assert alive.outcome is Adoption.OWNED_ELSEWHERE and subject.status(refs[0].attempt_id)[4] == "dead"
    adopted = store.adopt(subject.plan("k1"), run_id="new", is_run_alive=lambda run_id: False)
    assert adopted.outcome is Adoption.ADOPTED and adopted.attempt.job_id == "j1"
    assert adopted.attempt.owner_run_id == "dead" and subject.status(refs[0].attempt_id)[4] == "new"
    ended = store.adopt(subject.plan("k2"), run_id="new", is_run_alive=lambda run_id: False)
    assert ended.outcome is Adoption.ENDED
    assert subject.status(refs[1].attempt_id)[:2] == (S.FAILED, FailureKind.LOST)
    assert store.adopt(subject.plan("k3"), run_id="new", is_run_alive=lambda run_id: False).outcome is Adoption.NONE


@pytest.mark.parametrize("dialect", ["postgresql", "sqlite"])
def test_migration_0003_adds_failure_kind_backfills_old_failures_and_downgrades(dialect, tmp_path):
    url = create_pg_database() if dialect == "postgresql" else f"sqlite:///{tmp_path / 'opsdb.sqlite'}"
    try:
        upgrade(url)
        engine = make_engine(url)
        old_errors = {
            "oom": "job killed (exit code 137): out of memory or killed by signal 9",
            "walltime": "job exceeded its time limit (exit code 143)",
            "contract": "output collection refused: science/pipe: named pipe (FIFO)",
            "staging": "staging failed: checksum mismatch",
            "exit_code": "job failed with exit code 3",
            None: "something nobody classified",
        }
        with Session(engine) as session, session.begin():
            world = make_world(session)
            ids = {}
            for number, (kind, error) in enumerate(old_errors.items(), start=1):
                row = make_attempt(session, world, key=f"k{number}", status=S.FAILED)
                row.error = error
                ids[row.id] = kind
            done = make_attempt(session, world, key="ok", status=S.COMPLETED)
            ids[done.id] = None
        engine.dispose()
        command.downgrade(alembic_config(url), "0002")
        engine = make_engine(url)
        columns = {c["name"] for c in inspect(engine).get_columns("executed_reduction_step")}
        engine.dispose()
        assert "failure_kind" not in columns
        upgrade(url)
        engine = make_engine(url)
        with Session(engine) as session:
            rows = session.execute(select(m.ExecutedReductionStep.id, m.ExecutedReductionStep.failure_kind)).all()
            found = {attempt_id: kind for attempt_id, kind in rows}
        engine.dispose()
        assert found == {attempt_id: FailureKind(kind) if kind else None for attempt_id, kind in ids.items()}
    finally:
        if dialect == "postgresql":
            drop_pg_database(url)


def test_observers_hear_the_failure_kind_with_the_failed_transition(db_url):
    from ccat_dagster.opsdb.states import observe_transitions

    subject, engine = _ops_db_subject(db_url)
    heard = []
    with observe_transitions(heard.append):
        (ref,), _ = subject.store.create_round(
            [(subject.plan("k1"), 0)], run_id="r1", backend="local", attempt_dir_of=_dir
        )
        subject.store.fail(ref.attempt_id, error="staging failed: bad tar", kind=FailureKind.STAGING)
    engine.dispose()
    assert [(t.to_status, t.failure_kind) for t in heard] == [(S.STAGING_DATA, None), (S.FAILED, FailureKind.STAGING)]


class _RacingAdopters:
    """``is_run_alive`` for two runs adopting the same attempt of the dead run ``dead`` at once.

    The first adopter to ask about ``dead`` waits until the other one is either blocked by the store (the row
    lock: ``other_is_blocked``) or asks about ``dead`` too (it read the row unlocked: two winners), or until
    ``patience`` runs out; the runs ``r1`` and ``r2`` themselves are alive.
    """

    def __init__(self, other_is_blocked: Callable[[], bool], patience: float) -> None:
        self.other_is_blocked = other_is_blocked
        self.patience = patience
        self.asked_about_dead = 0
        self._lock = threading.Lock()

    def is_run_alive(self, run_id: str) -> bool:
        if run_id != "dead":
            return True
        with self._lock:
            self.asked_about_dead += 1
        deadline = time.monotonic() + self.patience
        while time.monotonic() < deadline and self.asked_about_dead < 2 and not self.other_is_blocked():
            time.sleep(0.005)
        return False


def _lock_waiters(url: str) -> Callable[[], bool]:
    watcher = make_engine(url)

    def blocked() -> bool:
        with watcher.connect() as connection:
            return bool(
                connection.scalar(
                    text(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                        "AND wait_event_type = 'Lock'"
                    )
                )
            )

    blocked.engine = watcher  # type: ignore[attr-defined]
    return blocked


@pytest.mark.parametrize("dialect", ["postgresql", "sqlite"])
def test_two_runs_adopting_at_once_have_exactly_one_winner(dialect, pg_url, tmp_path):
    if dialect == "postgresql":
        url, suffix = pg_url, f"-{uuid.uuid4().hex[:8]}"
    else:
        url, suffix = f"sqlite:///{tmp_path / 'opsdb.sqlite'}", ""
        upgrade(url)
    engine = make_engine(url)
    with Session(engine) as session, session.begin():
        world = make_world(session, suffix=suffix)
        ids = (world.step.id, world.package.id, world.processing.id, world.software_version.id, world.config.id)
    subject = Subject(OpsDbAttemptStore(engine), ids[0], (ids[1],), ids[2], lambda _: (), ids[3], ids[4])
    plan = subject.plan("k1")
    (ref,), _ = subject.store.create_round([(plan, 0)], run_id="dead", backend="slurm", attempt_dir_of=_dir)
    subject.store.mark_submitted([(ref.attempt_id, "4711")], backend="slurm")
    blocked = _lock_waiters(url) if dialect == "postgresql" else (lambda: False)
    racers = _RacingAdopters(blocked, patience=10.0 if dialect == "postgresql" else 0.5)
    results: dict[str, object] = {}

    def adopt(run_id: str) -> None:
        results[run_id] = subject.store.adopt(plan, run_id=run_id, is_run_alive=racers.is_run_alive)

    threads = [threading.Thread(target=adopt, args=(run_id,)) for run_id in ("r1", "r2")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    try:
        outcomes = sorted(result.outcome.value for result in results.values())
        assert outcomes == [Adoption.ADOPTED.value, Adoption.OWNED_ELSEWHERE.value], results
        (winner,) = [run for run, result in results.items() if result.outcome is Adoption.ADOPTED]
        assert results[winner].attempt.attempt_id == ref.attempt_id and results[winner].attempt.job_id == "4711"
        with Session(engine) as session:
            row = session.get(m.ExecutedReductionStep, ref.attempt_id)
            assert (row.dagster_run_id, row.status) == (winner, S.SUBMITTED)
        assert racers.asked_about_dead == 1  # the loser never saw the dead owner
    finally:
        engine.dispose()
        if dialect == "postgresql":
            blocked.engine.dispose()
