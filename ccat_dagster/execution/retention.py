"""Retention of intermediate products (docs/provenance.md, Retention): present → deletion_possible → deleted.

Two steps, run by a schedule or from the CLI:

1. ``mark_deletable_intermediates`` (caller's transaction) moves present copies of ``intermediate``
   products to ``deletion_possible`` when the product is superseded, or when its consumers are done and the
   retention period has passed.
2. ``delete_deletable_copies`` (its own short transactions) removes the files of ``deletion_possible``
   intermediate copies and records ``deleted`` / ``deletion_failed``. Final products (science, qa_metric,
   plot, statistics, log) are never deleted here, whatever their copy status.

Each step's ``retention`` setting (``effective_retention``) decides whether its consumed intermediates may go
at all: ``keep`` steps lose only superseded ones. Where a deleted intermediate is needed again (a new scan
joins a fan-in, a consumer's config changed), the planner re-runs the sub-group that produced it first
(``planning.Planner.rebuilds``); ``recreation_costs`` says what that costs, from the attempts in ops-db.

Nothing in this project moves a copy from ``deletion_possible`` back to ``present``; an operator who wants to
keep a file sets the copy's status back by hand before the cleanup runs.
"""

from __future__ import annotations

import dataclasses
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
from ccat_dagster.opsdb.enums import (
    TERMINAL_RUN_STATUSES,
    DataProductType,
    PhysicalCopyStatus,
    RunStatus,
    StepRetention,
    TriggerType,
)
from ccat_dagster.opsdb.models import (
    DataLocation,
    DataProduct,
    ExecutedReductionStep,
    PhysicalCopy,
    ReductionStep,
    run_ancestor_run,
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
    # What re-creating the file would cost if a consumer needs it again: the producing attempt plus the
    # ancestor attempts whose intermediates are gone too, and their CPU hours as ops-db recorded them.
    recreate_attempts: int = 0
    recreate_cpu_hours: float | None = None


def effective_retention(step: ReductionStep) -> StepRetention:
    """``keep`` or ``recreate`` for a step: its own setting, or for ``auto`` ``keep`` when a fan-in step (a
    consumer with another group_by, so each of its sub-groups reads several of this step's) of a CONTINUOUS or
    CRON pipeline reads it (new data makes that fan-in read them all again), else ``recreate``."""
    if step.retention is not StepRetention.AUTO:
        return step.retention
    pipeline = step.pipeline
    standing = pipeline.trigger_type in (TriggerType.CONTINUOUS, TriggerType.CRON)
    fan_in = any(
        step in consumer.depends_on and list(consumer.group_by or []) != list(step.group_by or [])
        for consumer in pipeline.steps
    )
    return StepRetention.KEEP if standing and fan_in else StepRetention.RECREATE


def kept_step_ids(session: Session) -> set[int]:
    """Steps whose consumed intermediates retention keeps (``effective_retention`` is ``keep``)."""
    return {
        step.id for step in session.scalars(select(ReductionStep)) if effective_retention(step) is StepRetention.KEEP
    }


def mark_deletable_intermediates(session: Session, *, now: dt.datetime, retention_days: float) -> list[int]:
    """Move present copies of intermediate products to ``deletion_possible``; returns the copy ids, sorted.

    A copy is marked when its product is ``intermediate`` and either

    (a) the product is superseded (``superseded_by`` set), or
    (b) the attempts that consumed it (``run_input_product``) are all finished (none pending/in flight), at
        least one exists, every consuming (step, sub_group_key) has a COMPLETED attempt among them, and the
        newest ``finished_at`` of all of them is more than ``retention_days`` before ``now``.

    (b) counts a FAILED or CANCELLED consumer as done only when a COMPLETED attempt of the same step and
    sub-group also consumed the product (the usual failure-then-retry); a consumer whose only attempts failed
    keeps the product, because its retry will need it. Unconsumed intermediates are never marked by (b), nor
    are the products of steps whose retention is ``keep`` (``effective_retention``).

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
        .where(DataProduct.reduction_step_id.not_in(sorted(kept_step_ids(session)) or [-1]))
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
    if outcomes:
        with session_scope(engine) as session:
            costs = recreation_costs(session, [o.copy_id for o in outcomes])
        outcomes = [dataclasses.replace(o, **costs[o.copy_id]) if o.copy_id in costs else o for o in outcomes]
    return outcomes


def recreation_costs(session: Session, copy_ids: Sequence[int]) -> dict[int, dict[str, float | int | None]]:
    """Per copy of an intermediate product: the attempts that re-creating it would re-run and their CPU hours.

    Those are the attempt that produced it and each ancestor attempt (``run_ancestor_run``) with an intermediate
    product that has no present copy left (it would be re-created first). ``recreate_cpu_hours`` is None when
    ops-db recorded no CPU time for any of them (a backend that does not measure it). A fixed number of
    statements, read in the caller's transaction (a dry run sees the copies it just marked as gone).
    """
    producer: dict[int, int] = {}
    for start in range(0, len(copy_ids), 1000):
        chunk = list(copy_ids[start : start + 1000])
        producer.update(
            session.execute(
                select(PhysicalCopy.id, DataProduct.executed_reduction_step_id)
                .join(DataProduct, PhysicalCopy.data_product_id == DataProduct.id)
                .where(PhysicalCopy.id.in_(chunk))
            )
            .tuples()
            .all()
        )
    attempts = sorted(set(producer.values()))
    ancestors: dict[int, set[int]] = defaultdict(set)
    for start in range(0, len(attempts), 1000):
        chunk = attempts[start : start + 1000]
        for attempt_id, ancestor_id in session.execute(
            select(run_ancestor_run.c.executed_reduction_step_id, run_ancestor_run.c.ancestor_run_id).where(
                run_ancestor_run.c.executed_reduction_step_id.in_(chunk)
            )
        ):
            ancestors[attempt_id].add(ancestor_id)
    involved = sorted(set(attempts) | {a for ids in ancestors.values() for a in ids})
    cpu: dict[int, float | None] = {}
    gone: set[int] = set()
    for start in range(0, len(involved), 1000):
        chunk = involved[start : start + 1000]
        cpu.update(
            session.execute(
                select(ExecutedReductionStep.id, ExecutedReductionStep.cpu_hours).where(
                    ExecutedReductionStep.id.in_(chunk)
                )
            )
            .tuples()
            .all()
        )
        present = (
            select(PhysicalCopy.id)
            .where(PhysicalCopy.data_product_id == DataProduct.id)
            .where(PhysicalCopy.status == PhysicalCopyStatus.PRESENT)
            .exists()
        )
        gone.update(
            session.scalars(
                select(DataProduct.executed_reduction_step_id)
                .where(DataProduct.executed_reduction_step_id.in_(chunk))
                .where(DataProduct.product_type == DataProductType.INTERMEDIATE)
                .where(~present)
                .distinct()
            )
        )
    costs: dict[int, dict[str, float | int | None]] = {}
    for copy_id, attempt_id in producer.items():
        chain = [attempt_id, *sorted(a for a in ancestors.get(attempt_id, ()) if a in gone)]
        hours = [cpu.get(a) for a in chain]
        known = [h for h in hours if h is not None]
        costs[copy_id] = {
            "recreate_attempts": len(chain),
            "recreate_cpu_hours": round(sum(known), 4) if known else None,
        }
    return costs


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
