"""The ops-db invariant checker: a consistent ops-db has no violation, and each kind of damage is found and named."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from ccat_dagster.execution.registration import record_input_lineage
from ccat_dagster.opsdb import models as m
from ccat_dagster.opsdb.enums import PhysicalCopyStatus, RunStatus
from ccat_dagster.opsdb.invariants import InvariantKind, check_invariants

from .opsdb_factories import make_attempt, make_product, make_world


def _completed(session: Session, world, tmp_path: Path, *, key: str = "all", attempt: int = 1, path: str = "a.fits"):  # type: ignore[no-untyped-def]
    """A COMPLETED attempt with one product whose copy's file exists, and its input lineage."""
    row = make_attempt(session, world, key=key, attempt=attempt, status=RunStatus.COMPLETED)
    record_input_lineage(session, attempt=row, package_ids=[world.package.id], product_ids=[])
    product = make_product(session, row, path=path)
    host = tmp_path / f"{row.id}-{Path(path).name}"
    host.write_bytes(b"x")
    session.add(
        m.PhysicalCopy(
            location=world.processing, data_product=product, path=str(host), status=PhysicalCopyStatus.PRESENT
        )
    )
    session.flush()
    return row, product, host


def _kinds(session: Session, **kwargs) -> list[InvariantKind]:  # type: ignore[no-untyped-def]
    return [v.kind for v in check_invariants(session, **kwargs)]


def test_a_consistent_ops_db_has_no_violation(engine, tmp_path):
    with Session(engine) as session, session.begin():
        world = make_world(session)
        _completed(session, world, tmp_path, key="a")
        _completed(session, world, tmp_path, key="b")
        make_attempt(session, world, key="c", status=RunStatus.RUNNING)
        make_attempt(session, world, key="c", attempt=2, status=RunStatus.FAILED)
        assert check_invariants(session, reruns_allowed=False) == []


def test_two_attempts_in_flight_for_one_sub_group_are_named(engine, tmp_path):
    with Session(engine) as session, session.begin():
        # The partial unique index forbids it; without the index the checker still finds it.
        session.execute(text("DROP INDEX uq_executed_reduction_step_one_active"))
        world = make_world(session)
        first = make_attempt(session, world, key="k", status=RunStatus.RUNNING)
        second = make_attempt(session, world, key="k", attempt=2, status=RunStatus.SUBMITTED)
        (violation,) = check_invariants(session)
        assert violation.kind is InvariantKind.ONE_ACTIVE_ATTEMPT
        assert violation.rows == (("executed_reduction_step", first.id), ("executed_reduction_step", second.id))
        assert "'k'" in violation.message


def test_a_completed_attempt_without_products_is_found(engine, tmp_path):
    with Session(engine) as session, session.begin():
        world = make_world(session)
        row = make_attempt(session, world, status=RunStatus.COMPLETED)
        record_input_lineage(session, attempt=row, package_ids=[world.package.id], product_ids=[])
        (violation,) = check_invariants(session)
        assert violation.kind is InvariantKind.COMPLETED_WITHOUT_PRODUCTS
        assert violation.rows == (("executed_reduction_step", row.id),)


def test_a_completed_attempt_without_lineage_is_found(engine, tmp_path):
    with Session(engine) as session, session.begin():
        world = make_world(session)
        row, _, _ = _completed(session, world, tmp_path)
        session.execute(m.run_input_package.delete())
        session.execute(m.run_ancestor_package.delete())
        (violation,) = check_invariants(session)
        assert violation.kind is InvariantKind.COMPLETED_WITHOUT_LINEAGE
        assert violation.rows == (("executed_reduction_step", row.id),)
        assert "no input links and no lineage closure" in violation.message


def test_a_product_without_a_copy_row_is_found(engine, tmp_path):
    with Session(engine) as session, session.begin():
        world = make_world(session)
        row, product, _ = _completed(session, world, tmp_path)
        session.execute(m.PhysicalCopy.__table__.delete())
        (violation,) = check_invariants(session)
        assert violation.kind is InvariantKind.PRODUCT_WITHOUT_COPY
        assert violation.rows == (("data_product", product.id), ("executed_reduction_step", row.id))


@pytest.mark.parametrize("status", [PhysicalCopyStatus.PRESENT, PhysicalCopyStatus.STAGED])
def test_a_copy_whose_file_is_gone_is_found_and_a_deleted_one_is_not(engine, tmp_path, status):
    with Session(engine) as session, session.begin():
        world = make_world(session)
        _, product, host = _completed(session, world, tmp_path)
        copy = product.physical_copies[0]
        copy.status = status
        host.unlink()
        session.flush()
        (violation,) = check_invariants(session)
        assert violation.kind is InvariantKind.COPY_WITHOUT_FILE
        assert violation.rows == (("physical_copy", copy.id),)
        assert str(host) in violation.message
        assert _kinds(session, check_files=False) == []
        copy.status = PhysicalCopyStatus.DELETED
        session.flush()
        assert check_invariants(session) == []


def test_a_relative_copy_path_is_resolved_against_its_location_root(engine, tmp_path):
    with Session(engine) as session, session.begin():
        world = make_world(session)
        world.processing.root_path = str(tmp_path)
        _, product, host = _completed(session, world, tmp_path)
        product.physical_copies[0].path = host.name
        session.flush()
        assert check_invariants(session) == []
        host.unlink()
        assert _kinds(session) == [InvariantKind.COPY_WITHOUT_FILE]


def test_a_product_registered_twice_is_a_duplicate(engine, tmp_path):
    with Session(engine) as session, session.begin():
        world = make_world(session)
        _, first, _ = _completed(session, world, tmp_path, key="k", attempt=1, path="science/map.fits")
        _, second, _ = _completed(session, world, tmp_path, key="k", attempt=2, path="science/map.fits")
        violations = check_invariants(session)
        assert [v.kind for v in violations] == [InvariantKind.DUPLICATE_CURRENT_PRODUCT]
        assert violations[0].rows == (("data_product", first.id), ("data_product", second.id))
        # Superseding the older product (what registration does) makes it consistent.
        first.superseded_by_id = second.id
        session.flush()
        assert check_invariants(session) == []
        # ...but the same inputs were completed twice: a re-run, which the fault suite forbids.
        assert _kinds(session, reruns_allowed=False) == [InvariantKind.DUPLICATE_COMPLETED_ATTEMPT]
