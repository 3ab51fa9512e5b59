"""Invariants of ops-db that must hold after anything (a crash, a restart, an outage), checked in a few queries.

``check_invariants(session)`` returns every violation it finds, each naming the rows involved, or ``[]``:

- ``one_active_attempt``: at most one non-terminal attempt per (step, sub-group). The partial unique index
  guarantees it; the check proves it on a database where the index was lost or never created.
- ``completed_without_products`` / ``completed_without_lineage``: a COMPLETED attempt has products, the input
  links of what it consumed (raw packages or upstream products) and its lineage closure (ancestor packages);
  all are written in the collection transaction, so a missing one means a torn write.
- ``product_without_copy``: every data product has a PhysicalCopy row.
- ``copy_without_file``: a PhysicalCopy that says its data exists (present, staged, or not yet deleted) has
  its file or directory on disk. Paths are absolute or relative to the location's root_path.
- ``duplicate_current_product``: at most one current (not superseded) product per step, sub-group and relative
  path: a product registered twice is a duplicate.
- ``duplicate_completed_attempt`` (only with ``reruns_allowed=False``): at most one COMPLETED attempt per step,
  sub-group and input fingerprint. A manual forced re-run makes a legitimate second one, so callers that know
  no re-run was asked for (the fault suite) turn it on to prove that no work was done twice.

No Dagster imports: the CLI, the tests and the fault suite use it alike.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import exists, func, or_, select
from sqlalchemy.orm import Session

from ccat_dagster.opsdb import models as m
from ccat_dagster.opsdb.enums import TERMINAL_RUN_STATUSES, PhysicalCopyStatus, RunStatus

# Copy states in which the data is still supposed to be on disk.
_ON_DISK = (
    PhysicalCopyStatus.PRESENT,
    PhysicalCopyStatus.STAGED,
    PhysicalCopyStatus.DELETION_SCHEDULED,
    PhysicalCopyStatus.DELETION_POSSIBLE,
    PhysicalCopyStatus.DELETION_FAILED,
)


class InvariantKind(enum.StrEnum):
    ONE_ACTIVE_ATTEMPT = "one_active_attempt"
    COMPLETED_WITHOUT_PRODUCTS = "completed_without_products"
    COMPLETED_WITHOUT_LINEAGE = "completed_without_lineage"
    PRODUCT_WITHOUT_COPY = "product_without_copy"
    COPY_WITHOUT_FILE = "copy_without_file"
    DUPLICATE_CURRENT_PRODUCT = "duplicate_current_product"
    DUPLICATE_COMPLETED_ATTEMPT = "duplicate_completed_attempt"


@dataclass(frozen=True)
class Violation:
    """One broken invariant: its kind, the rows involved as (table, id) pairs, and a sentence saying what."""

    kind: InvariantKind
    rows: tuple[tuple[str, int], ...]
    message: str

    def __str__(self) -> str:
        return f"{self.kind.value}: {self.message}"


def check_invariants(session: Session, *, check_files: bool = True, reruns_allowed: bool = True) -> list[Violation]:
    """Every violation of the invariants in the module docstring (empty when ops-db is consistent).

    Seven queries whatever the size of ops-db, plus one ``stat`` per on-disk copy when ``check_files``.
    """
    violations: list[Violation] = []
    violations += _one_active_attempt(session)
    violations += _completed_without_products(session)
    violations += _completed_without_lineage(session)
    violations += _product_without_copy(session)
    if check_files:
        violations += _copy_without_file(session)
    violations += _duplicate_current_product(session)
    if not reruns_allowed:
        violations += _duplicate_completed_attempt(session)
    return violations


def _attempt_ids(session: Session, step_id: int, key: str, *conditions) -> tuple[tuple[str, int], ...]:  # type: ignore[no-untyped-def]
    ids = session.scalars(
        select(m.ExecutedReductionStep.id)
        .where(m.ExecutedReductionStep.reduction_step_id == step_id, m.ExecutedReductionStep.sub_group_key == key)
        .where(*conditions)
        .order_by(m.ExecutedReductionStep.id)
    )
    return tuple(("executed_reduction_step", i) for i in ids)


def _one_active_attempt(session: Session) -> list[Violation]:
    attempt = m.ExecutedReductionStep
    groups = session.execute(
        select(attempt.reduction_step_id, attempt.sub_group_key)
        .where(attempt.status.not_in(list(TERMINAL_RUN_STATUSES)))
        .group_by(attempt.reduction_step_id, attempt.sub_group_key)
        .having(func.count() > 1)
    ).all()
    out = []
    for step_id, key in groups:
        rows = _attempt_ids(session, step_id, key, attempt.status.not_in(list(TERMINAL_RUN_STATUSES)))
        out.append(
            Violation(
                InvariantKind.ONE_ACTIVE_ATTEMPT,
                rows,
                f"step {step_id} sub-group {key!r} has {len(rows)} attempts in flight: {[i for _, i in rows]}",
            )
        )
    return out


def _completed_without_products(session: Session) -> list[Violation]:
    attempt = m.ExecutedReductionStep
    ids = session.scalars(
        select(attempt.id)
        .where(attempt.status == RunStatus.COMPLETED)
        .where(~exists().where(m.DataProduct.executed_reduction_step_id == attempt.id))
        .order_by(attempt.id)
    ).all()
    return [
        Violation(
            InvariantKind.COMPLETED_WITHOUT_PRODUCTS,
            (("executed_reduction_step", i),),
            f"attempt {i} is COMPLETED but has no data product",
        )
        for i in ids
    ]


def _completed_without_lineage(session: Session) -> list[Violation]:
    attempt = m.ExecutedReductionStep
    has_inputs = or_(
        exists().where(m.run_input_package.c.executed_reduction_step_id == attempt.id),
        exists().where(m.run_input_product.c.executed_reduction_step_id == attempt.id),
    )
    has_closure = exists().where(m.run_ancestor_package.c.executed_reduction_step_id == attempt.id)
    rows = session.execute(
        select(attempt.id, has_inputs, has_closure)
        .where(attempt.status == RunStatus.COMPLETED)
        .where(or_(~has_inputs, ~has_closure))
        .order_by(attempt.id)
    ).all()
    out = []
    for attempt_id, inputs, closure in rows:
        missing = [what for what, ok in (("input links", inputs), ("lineage closure", closure)) if not ok]
        out.append(
            Violation(
                InvariantKind.COMPLETED_WITHOUT_LINEAGE,
                (("executed_reduction_step", attempt_id),),
                f"attempt {attempt_id} is COMPLETED but has no {' and no '.join(missing)}",
            )
        )
    return out


def _product_without_copy(session: Session) -> list[Violation]:
    product = m.DataProduct
    rows = session.execute(
        select(product.id, product.executed_reduction_step_id, product.relative_path)
        .where(~exists().where(m.PhysicalCopy.data_product_id == product.id))
        .order_by(product.id)
    ).all()
    return [
        Violation(
            InvariantKind.PRODUCT_WITHOUT_COPY,
            (("data_product", pid), ("executed_reduction_step", aid)),
            f"data product {pid} ({path}, attempt {aid}) has no PhysicalCopy row",
        )
        for pid, aid, path in rows
    ]


def _copy_without_file(session: Session) -> list[Violation]:
    copy = m.PhysicalCopy
    rows = session.execute(
        select(copy.id, copy.path, copy.status, m.DataLocation.root_path)
        .join(m.DataLocation, m.DataLocation.id == copy.data_location_id)
        .where(copy.status.in_(list(_ON_DISK)))
        .order_by(copy.id)
    ).all()
    out = []
    for copy_id, path, status, root in rows:
        host = Path(path) if Path(path).is_absolute() else Path(root) / path
        if not host.exists():
            out.append(
                Violation(
                    InvariantKind.COPY_WITHOUT_FILE,
                    (("physical_copy", copy_id),),
                    f"physical copy {copy_id} is {PhysicalCopyStatus(status).value} but {host} does not exist",
                )
            )
    return out


def _duplicate_current_product(session: Session) -> list[Violation]:
    product = m.DataProduct
    groups = session.execute(
        select(product.reduction_step_id, product.sub_group_key, product.relative_path, func.count())
        .where(product.superseded_by_id.is_(None))
        .group_by(product.reduction_step_id, product.sub_group_key, product.relative_path)
        .having(func.count() > 1)
    ).all()
    out = []
    for step_id, key, path, count in groups:
        ids = session.scalars(
            select(product.id)
            .where(product.reduction_step_id == step_id, product.sub_group_key == key)
            .where(product.relative_path == path, product.superseded_by_id.is_(None))
            .order_by(product.id)
        ).all()
        out.append(
            Violation(
                InvariantKind.DUPLICATE_CURRENT_PRODUCT,
                tuple(("data_product", i) for i in ids),
                f"step {step_id} sub-group {key!r}: {count} current products at {path}: {list(ids)}",
            )
        )
    return out


def _duplicate_completed_attempt(session: Session) -> list[Violation]:
    attempt = m.ExecutedReductionStep
    groups = session.execute(
        select(attempt.reduction_step_id, attempt.sub_group_key, attempt.input_fingerprint)
        .where(attempt.status == RunStatus.COMPLETED)
        .group_by(attempt.reduction_step_id, attempt.sub_group_key, attempt.input_fingerprint)
        .having(func.count() > 1)
    ).all()
    out = []
    for step_id, key, fingerprint in groups:
        rows = _attempt_ids(
            session,
            step_id,
            key,
            attempt.status == RunStatus.COMPLETED,
            attempt.input_fingerprint == fingerprint,
        )
        out.append(
            Violation(
                InvariantKind.DUPLICATE_COMPLETED_ATTEMPT,
                rows,
                f"step {step_id} sub-group {key!r} was completed {len(rows)} times with the same inputs "
                f"({fingerprint[:12]}…): attempts {[i for _, i in rows]}",
            )
        )
    return out
