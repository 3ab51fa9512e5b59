"""Retention: which intermediates become deletion_possible, and the cleanup that deletes only them,
only inside the allowed roots, with a dry run that changes nothing."""

from __future__ import annotations

import datetime as dt
import os

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from ccat_dagster.execution.registration import record_input_lineage
from ccat_dagster.execution.retention import (
    DeletionAction,
    delete_deletable_copies,
    mark_deletable_intermediates,
)
from ccat_dagster.opsdb import models as m
from ccat_dagster.opsdb.engine import make_engine, session_scope
from ccat_dagster.opsdb.enums import DataProductType, PhysicalCopyStatus, RunStatus, StepRetention

from .execution_factories import add_product, make_staging_world, make_step_attempt

NOW = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
OLD = NOW - dt.timedelta(days=10)
RECENT = NOW - dt.timedelta(days=1)
P = PhysicalCopyStatus


def _statuses(engine) -> dict[str, PhysicalCopyStatus]:
    with Session(engine) as session:
        rows = session.execute(
            select(m.DataProduct.relative_path, m.PhysicalCopy.status).join(
                m.PhysicalCopy, m.PhysicalCopy.data_product_id == m.DataProduct.id
            )
        ).all()
    return dict(rows)


def test_mark_deletable_intermediates(engine, tmp_path):
    ws = tmp_path / "ws"
    with session_scope(engine) as session:
        world = make_staging_world(session, tmp_path, n_packages=0).world
        # A step whose consumed intermediates may go (the fan-in reading them would keep them under auto).
        world.step.retention = StepRetention.RECREATE
        upstream = make_step_attempt(session, world, key="scan-1", status=RunStatus.COMPLETED, at=OLD)
        copy_ids = {}

        def product(name, product_type=DataProductType.INTERMEDIATE):
            row, copy = add_product(
                session,
                upstream,
                world.processing,
                path=ws / name,
                relative_path=name,
                product_type=product_type,
            )
            copy_ids[name] = copy.id
            return row

        def consumer(key, status, at, *inputs, attempt=1):
            row = make_step_attempt(
                session, world, step=world.final_step, key=key, status=status, at=at, attempt=attempt
            )
            record_input_lineage(session, attempt=row, package_ids=[], product_ids=[p.id for p in inputs])
            return row

        superseded = product("superseded.dat")
        newer = product("newer.dat")
        superseded.superseded_by = newer
        consumed_long_ago = product("consumed-long-ago.dat")
        consumer("k1", RunStatus.COMPLETED, OLD, consumed_long_ago)
        consumed_recently = product("consumed-recently.dat")
        consumer("k2", RunStatus.COMPLETED, OLD, consumed_recently)
        consumer("k3", RunStatus.COMPLETED, RECENT, consumed_recently)
        in_flight = product("in-flight.dat")
        consumer("k4", RunStatus.COMPLETED, OLD, in_flight)
        consumer("k5", RunStatus.RUNNING, OLD, in_flight)
        unconsumed = product("unconsumed.dat")  # noqa: F841 - must stay present
        retried = product("retried.dat")
        consumer("k6", RunStatus.FAILED, OLD, retried)
        consumer("k6", RunStatus.COMPLETED, OLD, retried, attempt=2)
        only_failed = product("only-failed.dat")
        consumer("k7", RunStatus.FAILED, OLD, only_failed)
        science = product("science.fits", DataProductType.SCIENCE)
        consumer("k8", RunStatus.COMPLETED, OLD, science)
        science.superseded_by = newer
        session.flush()

    with session_scope(engine) as session:
        marked = mark_deletable_intermediates(session, now=NOW, retention_days=7)
    assert marked == sorted(copy_ids[n] for n in ("superseded.dat", "consumed-long-ago.dat", "retried.dat"))
    statuses = _statuses(engine)
    assert {name for name, status in statuses.items() if status is P.DELETION_POSSIBLE} == {
        "superseded.dat",
        "consumed-long-ago.dat",
        "retried.dat",
    }
    with Session(engine) as session:
        reasons = {c.id: c.status_reason for c in session.scalars(select(m.PhysicalCopy))}
    assert "superseded by product" in reasons[copy_ids["superseded.dat"]]
    assert "retention period of 7 day(s)" in reasons[copy_ids["consumed-long-ago.dat"]]

    # Marking again finds nothing new; a longer "now" releases the recently consumed one.
    with session_scope(engine) as session:
        assert mark_deletable_intermediates(session, now=NOW, retention_days=7) == []
        later = mark_deletable_intermediates(session, now=NOW + dt.timedelta(days=30), retention_days=7)
    assert later == [copy_ids["consumed-recently.dat"]]
    assert _statuses(engine)["in-flight.dat"] is P.PRESENT
    assert _statuses(engine)["only-failed.dat"] is P.PRESENT
    assert _statuses(engine)["science.fits"] is P.PRESENT


def test_mark_refuses_bad_arguments(sqlite_url):
    with pytest.raises(ValueError, match="naive"):
        mark_deletable_intermediates(None, now=dt.datetime(2026, 1, 1), retention_days=1)
    with pytest.raises(ValueError, match="retention_days=-1"):
        mark_deletable_intermediates(None, now=NOW, retention_days=-1)


def _cleanup_world(engine, tmp_path):
    """Copies in every situation the cleanup must handle; returns copy ids by name and the allowed root."""
    root = tmp_path / "pipelines"
    outside = tmp_path / "elsewhere"
    with session_scope(engine) as session:
        world = make_staging_world(session, tmp_path, n_packages=1)
        attempt = make_step_attempt(session, world.world, key="k", status=RunStatus.COMPLETED, at=OLD)
        location = world.world.processing
        ids = {}

        def copy(name, path, product_type=DataProductType.INTERMEDIATE, status=P.DELETION_POSSIBLE):
            _, row = add_product(
                session,
                attempt,
                location,
                path=path,
                relative_path=name,
                product_type=product_type,
                copy_status=status,
            )
            ids[name] = row.id

        copy("plain", root / "ws" / "plain.dat")
        copy("gone", root / "ws" / "gone.dat")
        copy("outside", outside / "precious.dat")
        copy("escape", root / "ws" / ".." / ".." / "elsewhere" / "escape.dat")
        copy("final", root / "output" / "science" / "map.fits", product_type=DataProductType.SCIENCE)
        copy("still-present", root / "ws" / "present.dat", status=P.PRESENT)
        copy("stuck", root / "ws" / "stuck.dat")
        copy("a-directory", root / "ws" / "dir.dat")
        # Symlinked directory inside the root that points outside it.
        (root / "link").symlink_to(outside, target_is_directory=True)
        copy("via-link", root / "link" / "linked.dat")
        # The raw package's archive copy marked deletion_possible must never be touched here.
        raw_copy = session.scalars(
            select(m.PhysicalCopy).where(m.PhysicalCopy.raw_data_package_id == world.package_ids[0])
        ).one()
        raw_copy.status = P.DELETION_POSSIBLE
        ids["raw"] = raw_copy.id
    (root / "ws" / "gone.dat").unlink()
    (root / "ws" / "dir.dat").unlink()
    (root / "ws" / "dir.dat").mkdir()
    # A path whose parent is a file: unlink fails with ENOTDIR even for root, like an unremovable file.
    stuck = root / "ws" / "stuck.dat"
    stuck.unlink()
    stuck.write_bytes(b"i am a file")
    with session_scope(engine) as session:
        session.get(m.PhysicalCopy, ids["stuck"]).path = str(stuck / "child.dat")
    return ids, root, outside


def test_dry_run_lists_and_changes_nothing(engine, tmp_path):
    ids, root, outside = _cleanup_world(engine, tmp_path)
    before = _statuses(engine)
    outcomes = {o.copy_id: o for o in delete_deletable_copies(engine, dry_run=True, allowed_roots=[root])}
    assert set(outcomes) == {ids[n] for n in ("plain", "gone", "outside", "escape", "stuck", "a-directory", "via-link")}
    would = {n for n, i in ids.items() if i in outcomes and outcomes[i].action is DeletionAction.WOULD_DELETE}
    assert would == {"plain", "gone", "stuck"}
    assert _statuses(engine) == before
    assert (root / "ws" / "plain.dat").exists() and (outside / "precious.dat").exists()


def test_cleanup_deletes_only_intermediates_inside_the_allowed_roots(engine, tmp_path):
    ids, root, outside = _cleanup_world(engine, tmp_path)
    outcomes = {o.copy_id: o for o in delete_deletable_copies(engine, dry_run=False, allowed_roots=[root])}
    by_name = {n: outcomes.get(i) for n, i in ids.items()}
    assert by_name["plain"].action is DeletionAction.DELETED and by_name["plain"].reason == "removed"
    assert by_name["gone"].action is DeletionAction.DELETED and "already gone" in by_name["gone"].reason
    assert by_name["stuck"].action is DeletionAction.FAILED and "cannot remove" in by_name["stuck"].reason
    for name in ("outside", "escape", "via-link"):
        assert by_name[name].action is DeletionAction.FAILED
        assert "outside the allowed roots" in by_name[name].reason
    assert "is a directory" in by_name["a-directory"].reason
    assert by_name["final"] is None and by_name["still-present"] is None and by_name["raw"] is None

    assert not (root / "ws" / "plain.dat").exists()
    assert (outside / "precious.dat").exists() and (outside / "escape.dat").exists()
    assert (outside / "linked.dat").exists() and (root / "output" / "science" / "map.fits").exists()
    assert (root / "ws" / "present.dat").exists() and (root / "ws" / "dir.dat").is_dir()
    with Session(engine) as session:
        copies = {c.id: c for c in session.scalars(select(m.PhysicalCopy))}
    expected = {
        "plain": P.DELETED,
        "gone": P.DELETED,
        "stuck": P.DELETION_FAILED,
        "outside": P.DELETION_FAILED,
        "escape": P.DELETION_FAILED,
        "via-link": P.DELETION_FAILED,
        "a-directory": P.DELETION_FAILED,
        "final": P.DELETION_POSSIBLE,
        "still-present": P.PRESENT,
        "raw": P.DELETION_POSSIBLE,
    }
    assert {n: copies[i].status for n, i in ids.items()} == expected
    assert "outside the allowed roots" in copies[ids["outside"]].status_reason

    # A second run has nothing left to do.
    assert delete_deletable_copies(engine, dry_run=False, allowed_roots=[root]) == []


def test_no_allowed_roots_refuses_everything(sqlite_url, tmp_path):
    engine = make_engine(sqlite_url)
    ids, root, _ = _cleanup_world(engine, tmp_path)
    outcomes = delete_deletable_copies(engine, dry_run=False, allowed_roots=[])
    assert outcomes and all(o.action is DeletionAction.FAILED for o in outcomes)
    assert all("none given" in o.reason for o in outcomes)
    assert (root / "ws" / "plain.dat").exists()
    engine.dispose()


def test_an_allowed_root_itself_is_never_deleted(sqlite_url, tmp_path):
    engine = make_engine(sqlite_url)
    ids, root, _ = _cleanup_world(engine, tmp_path)
    plain = root / "ws" / "plain.dat"
    outcomes = {o.copy_id: o for o in delete_deletable_copies(engine, dry_run=True, allowed_roots=[plain])}
    assert outcomes[ids["plain"]].action is DeletionAction.FAILED
    assert os.path.exists(plain)
    engine.dispose()
