"""Retention of intermediate products (SPEC §8): present → deletion_possible → deleted.

Two steps, run by a schedule or from the CLI:

1. ``mark_deletable_intermediates`` (caller's transaction) moves present copies of ``intermediate``
   products to ``deletion_possible`` when the product is superseded, or when its consumers are done and the
   retention period has passed.
2. ``delete_deletable_copies`` (its own short transactions) removes the files of ``deletion_possible``
   intermediate copies and records ``deleted`` / ``deletion_failed``. Final products (science, qa_metric,
   plot, statistics, log) are never deleted here, whatever their copy status.

Nothing in this project moves a copy from ``deletion_possible`` back to ``present``; an operator who wants to
keep a file sets the copy's status back by hand before the cleanup runs.
"""

from __future__ import annotations

import datetime as dt
import enum
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from ccat_dagster.execution.staging import resolve_copy_path
from ccat_dagster.opsdb.engine import session_scope
from ccat_dagster.opsdb.enums import TERMINAL_RUN_STATUSES, DataProductType, PhysicalCopyStatus, RunStatus
from ccat_dagster.opsdb.models import (
    DataLocation,
    DataProduct,
    ExecutedReductionStep,
    PhysicalCopy,
    run_input_product,
)


class DeletionAction(enum.StrEnum):
    WOULD_DELETE = "would_delete"
    DELETED = "deleted"
    FAILED = "failed"


@dataclass(frozen=True)
class DeletionOutcome:
    """What happened (or, in a dry run, would happen) to one copy; ``reason`` is a human sentence."""

    copy_id: int
    path: Path
    action: DeletionAction
    reason: str


def mark_deletable_intermediates(session: Session, *, now: dt.datetime, retention_days: float) -> list[int]:
    """Move present copies of intermediate products to ``deletion_possible``; returns the copy ids, sorted.

    A copy is marked when its product is ``intermediate`` and either

    (a) the product is superseded (``superseded_by`` set), or
    (b) the attempts that consumed it (``run_input_product``) are all finished (none pending/in flight), at
        least one exists, every consuming (step, sub_group_key) has a COMPLETED attempt among them, and the
        newest ``finished_at`` of all of them is more than ``retention_days`` before ``now``.

    (b) counts a FAILED or CANCELLED consumer as done only when a COMPLETED attempt of the same step and
    sub-group also consumed the product (the usual failure-then-retry); a consumer whose only attempts failed
    keeps the product, because its retry will need it. Unconsumed intermediates are never marked by (b).

    ``now`` must be timezone-aware; ``retention_days`` ≥ 0. Caller's transaction; nothing is committed.
    """
    if now.tzinfo is None:
        raise ValueError(f"now={now!r} is naive: give an aware UTC datetime")
    if retention_days < 0:
        raise ValueError(f"retention_days={retention_days!r} is invalid: give a number of days ≥ 0")
    cutoff = now - dt.timedelta(days=retention_days)
    marked: dict[int, str] = {}

    superseded = session.execute(
        select(PhysicalCopy.id, DataProduct.id, DataProduct.superseded_by_id)
        .join(DataProduct, PhysicalCopy.data_product_id == DataProduct.id)
        .where(DataProduct.product_type == DataProductType.INTERMEDIATE)
        .where(PhysicalCopy.status == PhysicalCopyStatus.PRESENT)
        .where(DataProduct.superseded_by_id.is_not(None))
    ).all()
    for copy_id, product_id, superseded_by in superseded:
        marked[copy_id] = f"product {product_id} is superseded by product {superseded_by}"

    consumers = session.execute(
        select(
            PhysicalCopy.id,
            ExecutedReductionStep.reduction_step_id,
            ExecutedReductionStep.sub_group_key,
            ExecutedReductionStep.status,
            ExecutedReductionStep.finished_at,
        )
        .join(DataProduct, PhysicalCopy.data_product_id == DataProduct.id)
        .join(run_input_product, run_input_product.c.data_product_id == DataProduct.id)
        .join(ExecutedReductionStep, run_input_product.c.executed_reduction_step_id == ExecutedReductionStep.id)
        .where(DataProduct.product_type == DataProductType.INTERMEDIATE)
        .where(PhysicalCopy.status == PhysicalCopyStatus.PRESENT)
        .where(DataProduct.superseded_by_id.is_(None))
    ).all()
    by_copy: dict[int, list[tuple[int, str, RunStatus, dt.datetime | None]]] = defaultdict(list)
    for copy_id, step_id, key, status, finished_at in consumers:
        by_copy[copy_id].append((step_id, key, status, finished_at))
    for copy_id, rows in by_copy.items():
        if any(status not in TERMINAL_RUN_STATUSES or finished is None for _, _, status, finished in rows):
            continue
        completed_pairs = {(step, key) for step, key, status, _ in rows if status is RunStatus.COMPLETED}
        if {(step, key) for step, key, _, _ in rows} - completed_pairs:
            continue
        newest = max(finished for _, _, _, finished in rows if finished is not None)
        if newest < cutoff:
            marked[copy_id] = (
                f"all {len(rows)} consuming attempt(s) finished (newest {newest.isoformat()}) and the "
                f"retention period of {retention_days:g} day(s) has passed"
            )

    if not marked:
        return []
    for copy in session.scalars(select(PhysicalCopy).where(PhysicalCopy.id.in_(list(marked)))):
        copy.status = PhysicalCopyStatus.DELETION_POSSIBLE
        copy.status_reason = marked[copy.id]
    session.flush()
    return sorted(marked)


def delete_deletable_copies(engine: Engine, *, dry_run: bool, allowed_roots: Sequence[Path]) -> list[DeletionOutcome]:
    """Delete the files of ``deletion_possible`` copies of intermediate products; one outcome per copy.

    - removed → ``deleted``; the file was already gone → ``deleted`` (reason says so);
    - the file cannot be removed, is a directory, or its real path (symlinks resolved) is not strictly inside
      one of ``allowed_roots`` (pass the processing location root and PIPELINE_BASE_DIR) → ``deletion_failed``
      with the reason in ``PhysicalCopy.status_reason``; fix the cause and set the status back to
      ``deletion_possible`` to retry.

    ``dry_run=True`` writes nothing and deletes nothing: outcomes are ``would_delete`` or ``failed`` (with
    the reason the real run would record). Copies of final products and of raw packages are never touched.
    Each status change is its own short transaction, applied only if the copy is still ``deletion_possible``.
    """
    roots = [Path(os.path.realpath(root)) for root in allowed_roots]
    with session_scope(engine) as session:
        rows = session.execute(
            select(PhysicalCopy.id, PhysicalCopy.path, DataLocation.root_path)
            .join(DataProduct, PhysicalCopy.data_product_id == DataProduct.id)
            .join(DataLocation, PhysicalCopy.data_location_id == DataLocation.id)
            .where(PhysicalCopy.status == PhysicalCopyStatus.DELETION_POSSIBLE)
            .where(DataProduct.product_type == DataProductType.INTERMEDIATE)
            .order_by(PhysicalCopy.id)
        ).all()
    outcomes: list[DeletionOutcome] = []
    for copy_id, copy_path, location_root in rows:
        path = resolve_copy_path(location_root=location_root, copy_path=copy_path)
        refusal = _refusal(path, roots)
        if refusal is not None:
            outcome = DeletionOutcome(copy_id, path, DeletionAction.FAILED, refusal)
        elif dry_run:
            outcome = DeletionOutcome(copy_id, path, DeletionAction.WOULD_DELETE, "deletion_possible intermediate")
        else:
            outcome = _remove(copy_id, path)
        if not dry_run:
            outcome = _record(engine, outcome)
        outcomes.append(outcome)
    return outcomes


def _refusal(path: Path, roots: Sequence[Path]) -> str | None:
    if not path.is_absolute():
        return f"path {str(path)!r} is not absolute; refusing to guess where it is"
    real = Path(os.path.realpath(path))
    if not any(real != root and real.is_relative_to(root) for root in roots):
        allowed = ", ".join(str(r) for r in roots) or "none given"
        return f"{real} is outside the allowed roots ({allowed}); refusing to delete it"
    if real.is_dir():
        return f"{path} is a directory, not a product file; refusing to delete it"
    return None


def _remove(copy_id: int, path: Path) -> DeletionOutcome:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return DeletionOutcome(copy_id, path, DeletionAction.DELETED, "the file was already gone")
    except OSError as error:
        return DeletionOutcome(copy_id, path, DeletionAction.FAILED, f"cannot remove {path}: {error.strerror or error}")
    return DeletionOutcome(copy_id, path, DeletionAction.DELETED, "removed")


def _record(engine: Engine, outcome: DeletionOutcome) -> DeletionOutcome:
    status = (
        PhysicalCopyStatus.DELETED if outcome.action is DeletionAction.DELETED else PhysicalCopyStatus.DELETION_FAILED
    )
    with session_scope(engine) as session:
        result = session.execute(
            update(PhysicalCopy)
            .where(PhysicalCopy.id == outcome.copy_id)
            .where(PhysicalCopy.status == PhysicalCopyStatus.DELETION_POSSIBLE)
            .values(status=status, status_reason=outcome.reason)
        )
    if result.rowcount == 0:  # type: ignore[attr-defined]
        return DeletionOutcome(
            outcome.copy_id,
            outcome.path,
            outcome.action,
            f"{outcome.reason} (ops-db status changed meanwhile; left as it is)",
        )
    return outcome
