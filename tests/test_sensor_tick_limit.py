"""A sensor tick stays bounded under a huge change set: 200,000 packages archived in ONE statement (so
all share one ``updated_at``) are read ``batch_limit`` at a time in watermark order, the cursor carries the rest
to the next tick, every package is delivered exactly once, no sub-group is requested twice, a row committing
late behind the watermark is still caught, and the cursor's window of seen packages holds at most one overlap
window's worth of ids, not the backlog. PostgreSQL only (the volume is the point).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import pytest
from sqlalchemy import select, text, update
from sqlalchemy.orm import Session

from ccat_dagster.execution.triggers import RECENT_MEMO_LIMIT, TickCursor, evaluate_tick
from ccat_dagster.opsdb import models as m
from ccat_dagster.opsdb.engine import make_engine
from ccat_dagster.opsdb.migrate import upgrade

from .conftest import create_pg_database, drop_pg_database
from .opsdb_factories import make_world

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

SCANS = 20_000  # × 10 packages
BATCH_LIMIT = 5_000
OVERLAP_SECONDS = 300
TICK_INTERVAL = dt.timedelta(seconds=30)  # the sensor's minimum_interval_seconds


@pytest.fixture(scope="module")
def big_change() -> Iterator[tuple[str, dt.datetime]]:
    """An ops-db with 200,000 transferring packages of one pipeline's grouping, then all archived at once."""
    url = create_pg_database("ccat_test_tick_limit")
    upgrade(url)
    engine = make_engine(url)
    with Session(engine) as session, session.begin():
        world = make_world(session)
        session.delete(world.final_step)  # one per-scan step: the tick's cost is the watermark, not a fan-in
        world.package.updated_at = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)  # not part of the change
        session.flush()
        obs_unit_id = world.package.executed_obs_unit.obs_unit_id
        module_id = world.module.id
        session.execute(
            text(
                """
                WITH scans AS (
                    INSERT INTO executed_obs_unit (id, obs_unit_id, start_time, end_time, status)
                    SELECT gen_random_uuid(), :unit, timestamptz '2026-10-02' + g * interval '1 hour',
                           timestamptz '2026-10-02' + g * interval '1 hour' + interval '40 minutes', 'completed'
                    FROM generate_series(1, :scans) AS g
                    RETURNING id
                )
                INSERT INTO raw_data_package (name, executed_obs_unit_id, instrument_module_id, size_bytes, checksum,
                                              state, metadata, created_at, updated_at)
                SELECT 'bulk-' || scans.id || '-' || p, scans.id, :module, 1024, md5(scans.id || '-' || p),
                       'transferring', '{}', now() - interval '1 day', now() - interval '1 day'
                FROM scans CROSS JOIN generate_series(0, 9) AS p
                ORDER BY scans.id, p
                """
            ),
            {"unit": obs_unit_id, "module": module_id, "scans": SCANS},
        )
    started = dt.datetime.now(dt.UTC)
    with Session(engine) as session, session.begin():
        session.execute(
            text("UPDATE raw_data_package SET state = 'archived', updated_at = now() WHERE name LIKE 'bulk-%'")
        )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text("VACUUM ANALYZE raw_data_package"))
    engine.dispose()
    yield url, started
    drop_pg_database(url)


def test_a_huge_change_set_is_worked_off_in_bounded_ticks(big_change):
    url, started = big_change
    engine = make_engine(url)
    cursor = TickCursor(package_ts=started - dt.timedelta(hours=1), package_read_ts=started - dt.timedelta(hours=1))
    now = dt.datetime.now(dt.UTC)
    delivered: list[int] = []
    requested: set[tuple[str, str, str | None]] = set()
    window_sizes, memo_sizes = [], []
    late_id: int | None = None
    more = True
    ticks = 0
    while more:
        ticks += 1
        assert ticks <= SCANS * 10 // BATCH_LIMIT + 3, "the backlog is not shrinking"
        with Session(engine) as session, session.begin():
            pipeline = session.scalars(select(m.Pipeline)).one()
            result = evaluate_tick(
                session, pipeline, cursor, now=now, batch_limit=BATCH_LIMIT, overlap_seconds=OVERLAP_SECONDS
            )
        cursor = TickCursor.loads(result.cursor.dumps())  # as Dagster stores and hands it back
        window_sizes.append(len(cursor.package_window))
        memo_sizes.append(len(cursor.recent))
        delivered.extend(_package_ids(engine, result.requests))
        for request in result.requests:
            for plan in request.plans:
                key = (request.step_name, plan.sub_group_key, plan.fingerprint)
                assert key not in requested, f"{key} requested twice"
                requested.add(key)
        assert result.changed_packages <= BATCH_LIMIT + (1 if late_id else 0)
        more = result.more_pending
        if ticks == 3:
            # A transaction that started before the watermark passed commits now: its row is behind the watermark,
            # among thousands already seen there; the next tick must still find it.
            with Session(engine) as session, session.begin():
                late_id = _add_late_package(session, updated_at=cursor.package_ts - dt.timedelta(seconds=5))
            more = True
        now += TICK_INTERVAL
    engine.dispose()

    assert late_id is not None and late_id in delivered
    assert len(delivered) == len(set(delivered)) == SCANS * 10 + 1, "every package exactly once"
    assert len({key for _step, key, _fp in requested}) == SCANS + 1
    # The cursor remembers the packages of one overlap window at most (ticks 30 s apart, ≤ batch_limit each), not
    # the backlog; once the backlog is older than the overlap nothing of it is kept.
    window_ticks = OVERLAP_SECONDS // TICK_INTERVAL.seconds + 1
    assert max(window_sizes) <= window_ticks * BATCH_LIMIT + 1, window_sizes
    assert window_sizes[-1] == 0, window_sizes
    # The memo of requested sub-groups is capped too (the backlog requests ~20,000 sub-groups).
    assert max(memo_sizes) <= RECENT_MEMO_LIMIT < len(requested), (max(memo_sizes), len(requested))


def _add_late_package(session: Session, *, updated_at: dt.datetime) -> int:
    """A package of a new scan, archived with an ``updated_at`` behind the watermark (as if committed late)."""
    scan = session.scalars(select(m.ExecutedObsUnit)).first()
    assert scan is not None
    late_scan = m.ExecutedObsUnit(obs_unit_id=scan.obs_unit_id, start_time=dt.datetime(2027, 1, 1, tzinfo=dt.UTC))
    module = session.scalars(select(m.InstrumentModule)).one()
    package = m.RawDataPackage(
        name="late-one", executed_obs_unit=late_scan, instrument_module=module, state="archived", checksum="0" * 64
    )
    session.add(package)
    session.flush()
    session.execute(update(m.RawDataPackage).where(m.RawDataPackage.id == package.id).values(updated_at=updated_at))
    return package.id


def _package_ids(engine, requests) -> list[int]:  # type: ignore[no-untyped-def]
    """The packages of the requested sub-groups that changed (each sub-group of the bulk change is one scan)."""
    ids: list[int] = []
    for request in requests:
        for plan in request.plans:
            ids.extend(plan.package_ids)
    return ids
