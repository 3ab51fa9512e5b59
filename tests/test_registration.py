"""The collection transaction: products, copies, lineage, supersession and COMPLETED, all or
nothing, on PostgreSQL and SQLite."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ccat_dagster.execution import registration
from ccat_dagster.execution.discovery import DiscoveredProduct
from ccat_dagster.execution.registration import (
    RegistrationError,
    record_input_lineage,
    register_attempt_results,
)
from ccat_dagster.opsdb import models as m
from ccat_dagster.opsdb.engine import make_engine, session_scope
from ccat_dagster.opsdb.enums import DataProductType, PhysicalCopyStatus, RunStatus
from ccat_dagster.opsdb.states import IllegalTransitionError, transition

from .execution_factories import add_product, make_staging_world, make_step_attempt, write_product

INTER = DataProductType.INTERMEDIATE


def _setup(engine, tmp_path, *, status=RunStatus.COLLECTING_RESULTS):
    """A world with 2 packages, an upstream product, and an attempt of the final step in ``status``."""
    with session_scope(engine) as session:
        sw = make_staging_world(session, tmp_path, n_packages=2)
        upstream_attempt = make_step_attempt(session, sw.world, key="all", status=RunStatus.COMPLETED)
        upstream, _ = add_product(
            session,
            upstream_attempt,
            sw.world.processing,
            path=tmp_path / "ws" / "calibrate" / "cal.dat",
            relative_path="cal.dat",
        )
        attempt = make_step_attempt(session, sw.world, step=sw.world.final_step, key="all", status=status)
        return sw, attempt.id, upstream.id


def _counts(engine) -> dict[str, int]:
    with Session(engine) as session:

        def count(what) -> int:
            return session.scalar(select(func.count()).select_from(what))

        return {
            "products": count(m.DataProduct),
            "product_copies": session.scalar(
                select(func.count()).select_from(m.PhysicalCopy).where(m.PhysicalCopy.data_product_id.is_not(None))
            ),
            "input_packages": count(m.run_input_package),
            "input_products": count(m.run_input_product),
            "ancestor_runs": count(m.run_ancestor_run),
            "ancestor_packages": count(m.run_ancestor_package),
        }


def _status(engine, attempt_id: int) -> RunStatus:
    with Session(engine) as session:
        return session.get(m.ExecutedReductionStep, attempt_id).status


def test_register_writes_products_copies_lineage_and_completes(engine, tmp_path):
    sw, attempt_id, upstream_id = _setup(engine, tmp_path)
    out = tmp_path / "out"
    science = write_product(out, "science/map.fits", b"map", "science")
    plot = write_product(out, "plots/map.png", b"png", "plot")
    # The real discovery dataclass satisfies the protocol registration codes against.
    real = DiscoveredProduct(
        relative_path=plot.relative_path,
        product_type=plot.product_type,
        size=plot.size,
        sha256=plot.sha256,
        host_path=plot.host_path,
    )
    with session_scope(engine) as session:
        attempt = session.get(m.ExecutedReductionStep, attempt_id)
        products = register_attempt_results(
            session,
            attempt=attempt,
            discovered=[science, real],
            processing_location_id=sw.world.processing.id,
            input_package_ids=sw.package_ids,
            input_product_ids=[upstream_id],
            metrics={"exit_code": 0, "wall_time_seconds": 12.5, "cpu_hours": None},
        )
        assert [p.relative_path for p in products] == ["science/map.fits", "plots/map.png"]
        assert all(p.id is not None for p in products)
    with Session(engine) as session:
        attempt = session.get(m.ExecutedReductionStep, attempt_id)
        assert attempt.status is RunStatus.COMPLETED and attempt.finished_at is not None
        assert attempt.exit_code == 0 and attempt.wall_time_seconds == 12.5 and attempt.cpu_hours is None
        assert attempt.transitions[-1].from_status is RunStatus.COLLECTING_RESULTS
        assert sorted(p.id for p in attempt.input_packages) == sw.package_ids
        assert [p.id for p in attempt.input_products] == [upstream_id]
        rows = {p.relative_path: p for p in attempt.products}
        assert rows["science/map.fits"].product_type is DataProductType.SCIENCE
        assert rows["plots/map.png"].sha256 == plot.sha256 and rows["plots/map.png"].size_bytes == 3
        assert rows["science/map.fits"].reduction_step_id == sw.world.final_step.id
        assert rows["science/map.fits"].sub_group_key == "all"
        for discovered in (science, plot):
            [copy] = rows[discovered.relative_path].physical_copies
            assert (copy.status, copy.path, copy.checksum, copy.data_location_id) == (
                PhysicalCopyStatus.PRESENT,
                str(discovered.host_path),
                discovered.sha256,
                sw.world.processing.id,
            )


def test_input_lineage_is_recorded_at_creation_and_is_idempotent(engine, tmp_path):
    sw, attempt_id, upstream_id = _setup(engine, tmp_path, status=RunStatus.PENDING)
    with session_scope(engine) as session:
        attempt = session.get(m.ExecutedReductionStep, attempt_id)
        record_input_lineage(session, attempt=attempt, package_ids=sw.package_ids[:1], product_ids=[upstream_id])
    with session_scope(engine) as session:
        attempt = session.get(m.ExecutedReductionStep, attempt_id)
        record_input_lineage(
            session,
            attempt=attempt,
            package_ids=[*sw.package_ids, sw.package_ids[0]],
            product_ids=[upstream_id, upstream_id],
        )
    assert _counts(engine)["input_packages"] == 2 and _counts(engine)["input_products"] == 1
    with session_scope(engine) as session:
        attempt = session.get(m.ExecutedReductionStep, attempt_id)
        for status in (
            RunStatus.STAGING_DATA,
            RunStatus.SUBMITTED,
            RunStatus.RUNNING,
            RunStatus.COLLECTING_RESULTS,
        ):
            transition(session, attempt, status)
        register_attempt_results(
            session,
            attempt=attempt,
            discovered=[],
            processing_location_id=sw.world.processing.id,
            input_package_ids=sw.package_ids,
            input_product_ids=[upstream_id],
        )
    assert _counts(engine)["input_packages"] == 2 and _counts(engine)["input_products"] == 1
    assert _status(engine, attempt_id) is RunStatus.COMPLETED
    # The closure grew with the second call's extra package and was not duplicated by the later ones.
    assert _closure(engine, attempt_id) == ({_producer(engine, upstream_id)}, set(sw.package_ids))


def _closure(engine, attempt_id: int) -> tuple[set[int], set[int]]:
    with Session(engine) as session:
        runs = session.scalars(
            select(m.run_ancestor_run.c.ancestor_run_id).where(
                m.run_ancestor_run.c.executed_reduction_step_id == attempt_id
            )
        )
        packages = session.scalars(
            select(m.run_ancestor_package.c.raw_data_package_id).where(
                m.run_ancestor_package.c.executed_reduction_step_id == attempt_id
            )
        )
        return set(runs), set(packages)


def _producer(engine, product_id: int) -> int:
    with Session(engine) as session:
        return session.get(m.DataProduct, product_id).executed_reduction_step_id


def test_the_closure_reaches_through_upstream_attempts(engine, tmp_path):
    """A dependent attempt linked to upstream products only derives from the packages of their producers."""
    sw, attempt_id, upstream_id = _setup(engine, tmp_path, status=RunStatus.PENDING)
    producer = _producer(engine, upstream_id)
    with session_scope(engine) as session:
        record_input_lineage(
            session,
            attempt=session.get(m.ExecutedReductionStep, producer),
            package_ids=sw.package_ids,
            product_ids=[],
        )
    with session_scope(engine) as session:
        attempt = session.get(m.ExecutedReductionStep, attempt_id)
        record_input_lineage(session, attempt=attempt, package_ids=[], product_ids=[upstream_id])
    assert _closure(engine, producer) == (set(), set(sw.package_ids))
    assert _closure(engine, attempt_id) == ({producer}, set(sw.package_ids))


def test_lineage_refuses_unknown_ids(engine, tmp_path):
    sw, attempt_id, upstream_id = _setup(engine, tmp_path, status=RunStatus.PENDING)
    with session_scope(engine) as session:
        attempt = session.get(m.ExecutedReductionStep, attempt_id)
        with pytest.raises(RegistrationError, match=r"package id\(s\) \[999999\]"):
            record_input_lineage(session, attempt=attempt, package_ids=[999999], product_ids=[])
        with pytest.raises(RegistrationError, match=r"product id\(s\) \[888888\]"):
            record_input_lineage(session, attempt=attempt, package_ids=[], product_ids=[888888])


def _complete_attempt(session, sw, tmp_path, *, number, key, files, step=None):
    """An attempt of ``step`` for ``key`` whose products are registered through the real collection code."""
    attempt = make_step_attempt(
        session,
        sw.world,
        step=step,
        key=key,
        attempt=number,
        status=RunStatus.COLLECTING_RESULTS,
        fingerprint=f"{number}" * 64,
    )
    root = tmp_path / f"attempt-{key}-{number}"
    discovered = [write_product(root, rel, f"{rel} v{number}".encode(), ptype) for rel, ptype in files]
    products = register_attempt_results(
        session,
        attempt=attempt,
        discovered=discovered,
        processing_location_id=sw.world.processing.id,
        input_package_ids=[],
        input_product_ids=[],
    )
    return attempt, {p.relative_path: p for p in products}


def test_supersession_by_path_then_type_then_first(engine, tmp_path):
    with session_scope(engine) as session:
        sw = make_staging_world(session, tmp_path, n_packages=0)
        old_files = [
            ("a.dat", INTER),
            ("b.dat", INTER),
            ("science/old.fits", "science"),
            ("plots/q.png", "plot"),
        ]
        _, old = _complete_attempt(session, sw, tmp_path, number=1, key="all", files=old_files)
        _, other_key = _complete_attempt(session, sw, tmp_path, number=1, key="scan-9", files=[("a.dat", INTER)])
        _, new = _complete_attempt(
            session,
            sw,
            tmp_path,
            number=2,
            key="all",
            files=[("c.dat", INTER), ("a.dat", INTER), ("science/new.fits", "science")],
        )
        ids = {
            "old": {k: v.id for k, v in old.items()},
            "new": {k: v.id for k, v in new.items()},
            "other": other_key["a.dat"].id,
        }
    with Session(engine) as session:

        def product(pid):
            return session.get(m.DataProduct, pid)

        superseded_by = {rel: product(pid).superseded_by_id for rel, pid in ids["old"].items()}
        assert superseded_by == {
            "a.dat": ids["new"]["a.dat"],  # same path
            "b.dat": ids["new"]["a.dat"],  # same type, first by path
            "science/old.fits": ids["new"]["science/new.fits"],  # same type
            "plots/q.png": ids["new"]["a.dat"],  # no new plot: first new product of any type
        }
        assert all(product(pid).superseded_by_id is None for pid in ids["new"].values())
        assert product(ids["other"]).superseded_by_id is None
        statuses = {rel: product(pid).physical_copies[0].status for rel, pid in ids["old"].items()}
        assert statuses == {
            "a.dat": PhysicalCopyStatus.DELETION_POSSIBLE,
            "b.dat": PhysicalCopyStatus.DELETION_POSSIBLE,
            "science/old.fits": PhysicalCopyStatus.PRESENT,
            "plots/q.png": PhysicalCopyStatus.PRESENT,
        }
        assert "superseded by product" in product(ids["old"]["a.dat"]).physical_copies[0].status_reason
        assert product(ids["other"]).physical_copies[0].status is PhysicalCopyStatus.PRESENT


def test_supersession_ignores_products_already_superseded(engine, tmp_path):
    with session_scope(engine) as session:
        sw = make_staging_world(session, tmp_path, n_packages=0)
        _, first = _complete_attempt(session, sw, tmp_path, number=1, key="all", files=[("a.dat", INTER)])
        _, second = _complete_attempt(session, sw, tmp_path, number=2, key="all", files=[("a.dat", INTER)])
        _, third = _complete_attempt(session, sw, tmp_path, number=3, key="all", files=[("a.dat", INTER)])
        assert first["a.dat"].superseded_by_id == second["a.dat"].id
        assert second["a.dat"].superseded_by_id == third["a.dat"].id
        assert third["a.dat"].superseded_by_id is None


def _assert_nothing_written(engine, attempt_id, before, superseded_candidate_id):
    assert _counts(engine) == before
    assert _status(engine, attempt_id) is RunStatus.COLLECTING_RESULTS
    with Session(engine) as session:
        old = session.get(m.DataProduct, superseded_candidate_id)
        assert old.superseded_by_id is None
        assert old.physical_copies[0].status is PhysicalCopyStatus.PRESENT
        assert (
            session.scalar(
                select(func.count())
                .select_from(m.RunStatusTransition)
                .where(m.RunStatusTransition.executed_reduction_step_id == attempt_id)
                .where(m.RunStatusTransition.to_status == RunStatus.COMPLETED)
            )
            == 0
        )


def _failure_setup(engine, tmp_path):
    """An older completed attempt of the final step with a product that a new registration would supersede,
    and a new attempt in COLLECTING_RESULTS."""
    with session_scope(engine) as session:
        sw = make_staging_world(session, tmp_path, n_packages=2)
        _, old = _complete_attempt(
            session,
            sw,
            tmp_path,
            number=1,
            key="all",
            step=sw.world.final_step,
            files=[("science/map.fits", "science"), ("work.dat", INTER)],
        )
        attempt = make_step_attempt(
            session,
            sw.world,
            step=sw.world.final_step,
            key="all",
            attempt=2,
            status=RunStatus.COLLECTING_RESULTS,
            fingerprint="2" * 64,
        )
        return sw, attempt.id, old["work.dat"].id


def test_database_failure_in_the_middle_leaves_nothing(engine, tmp_path):
    sw, attempt_id, old_id = _failure_setup(engine, tmp_path)
    with session_scope(engine) as session:
        # A product row of this attempt already exists (committed earlier): the flush of the new one collides.
        attempt = session.get(m.ExecutedReductionStep, attempt_id)
        add_product(
            session,
            attempt,
            sw.world.processing,
            path=tmp_path / "pre" / "map.fits",
            relative_path="science/map.fits",
            product_type=DataProductType.SCIENCE,
        )
    before = _counts(engine)
    discovered = [
        write_product(tmp_path / "new", rel, b"new", t)
        for rel, t in [("work.dat", INTER), ("science/map.fits", "science")]
    ]
    with pytest.raises(RegistrationError, match="ops-db refused"):
        with session_scope(engine) as session:
            attempt = session.get(m.ExecutedReductionStep, attempt_id)
            register_attempt_results(
                session,
                attempt=attempt,
                discovered=discovered,
                processing_location_id=sw.world.processing.id,
                input_package_ids=sw.package_ids,
                input_product_ids=[old_id],
            )
    _assert_nothing_written(engine, attempt_id, before, old_id)


def test_exception_after_products_are_added_leaves_nothing(engine, tmp_path, monkeypatch):
    sw, attempt_id, old_id = _failure_setup(engine, tmp_path)
    before = _counts(engine)
    seen: dict[str, int] = {}

    def crash(session, attempt, to_status, **kwargs):
        # Everything but the transition is written by now: prove it, then die like a crashed process would.
        session.flush()
        seen["products"] = session.scalar(select(func.count()).select_from(m.DataProduct))
        seen["superseded"] = session.get(m.DataProduct, old_id).superseded_by_id
        seen["closure"] = session.scalar(select(func.count()).select_from(m.run_ancestor_package))
        raise RuntimeError("worker killed")

    monkeypatch.setattr(registration, "transition", crash)
    discovered = [write_product(tmp_path / "new", "work.dat", b"new", INTER)]
    with pytest.raises(RuntimeError, match="worker killed"):
        with session_scope(engine) as session:
            attempt = session.get(m.ExecutedReductionStep, attempt_id)
            register_attempt_results(
                session,
                attempt=attempt,
                discovered=discovered,
                processing_location_id=sw.world.processing.id,
                input_package_ids=sw.package_ids,
                input_product_ids=[old_id],
            )
    assert seen["products"] == before["products"] + 1 and seen["superseded"] is not None
    assert seen["closure"] > before["ancestor_packages"]  # written in the same transaction, rolled back with it
    _assert_nothing_written(engine, attempt_id, before, old_id)


def test_duplicate_relative_path_is_refused_before_anything_is_written(engine, tmp_path):
    sw, attempt_id, old_id = _failure_setup(engine, tmp_path)
    before = _counts(engine)
    entry = write_product(tmp_path / "new", "work.dat", b"new", INTER)
    with pytest.raises(RegistrationError, match="'work.dat' is listed twice"):
        with session_scope(engine) as session:
            attempt = session.get(m.ExecutedReductionStep, attempt_id)
            register_attempt_results(
                session,
                attempt=attempt,
                discovered=[entry, entry],
                processing_location_id=sw.world.processing.id,
                input_package_ids=sw.package_ids,
                input_product_ids=[],
            )
    _assert_nothing_written(engine, attempt_id, before, old_id)


def test_attempt_not_collecting_results_is_refused(engine, tmp_path):
    sw, attempt_id, _ = _setup(engine, tmp_path, status=RunStatus.RUNNING)
    before = _counts(engine)
    with pytest.raises(IllegalTransitionError, match="running → completed"):
        with session_scope(engine) as session:
            attempt = session.get(m.ExecutedReductionStep, attempt_id)
            register_attempt_results(
                session,
                attempt=attempt,
                discovered=[write_product(tmp_path / "o", "x.dat", b"x", INTER)],
                processing_location_id=sw.world.processing.id,
                input_package_ids=sw.package_ids,
                input_product_ids=[],
            )
    assert _counts(engine) == before and _status(engine, attempt_id) is RunStatus.RUNNING


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"product_type": "science_map"}, "product type 'science_map'; allowed: science"),
        ({"sha256": "abc"}, "sha256 'abc'; expected 64 hexadecimal digits"),
        ({"size": -1}, "size -1"),
        ({"host_path": Path("relative/x.dat")}, "host path 'relative/x.dat'; expected an absolute path"),
        ({"relative_path": "/abs/x.dat"}, "must be non-empty and relative"),
    ],
)
def test_bad_discovered_entries_are_refused(sqlite_url, tmp_path, change, expected):
    engine = make_engine(sqlite_url)
    sw, attempt_id, _ = _setup(engine, tmp_path)
    good = write_product(tmp_path / "o", "x.dat", b"x", INTER)
    bad = DiscoveredProduct(**{**good.__dict__, **change})
    with pytest.raises(RegistrationError, match=expected.replace("(", r"\(")):
        with session_scope(engine) as session:
            attempt = session.get(m.ExecutedReductionStep, attempt_id)
            register_attempt_results(
                session,
                attempt=attempt,
                discovered=[bad],
                processing_location_id=sw.world.processing.id,
                input_package_ids=[],
                input_product_ids=[],
            )
    assert _status(engine, attempt_id) is RunStatus.COLLECTING_RESULTS
    engine.dispose()


def test_unknown_metric_and_location_are_refused(sqlite_url, tmp_path):
    engine = make_engine(sqlite_url)
    sw, attempt_id, _ = _setup(engine, tmp_path)
    with Session(engine) as session:
        attempt = session.get(m.ExecutedReductionStep, attempt_id)
        with pytest.raises(RegistrationError, match=r"unknown metric\(s\) \['gpu_hours'\]"):
            register_attempt_results(
                session,
                attempt=attempt,
                discovered=[],
                metrics={"gpu_hours": 1.0},
                processing_location_id=sw.world.processing.id,
                input_package_ids=[],
                input_product_ids=[],
            )
        with pytest.raises(RegistrationError, match="processing location id 777777"):
            register_attempt_results(
                session,
                attempt=attempt,
                discovered=[],
                processing_location_id=777777,
                input_package_ids=[],
                input_product_ids=[],
            )
        session.rollback()
    engine.dispose()
