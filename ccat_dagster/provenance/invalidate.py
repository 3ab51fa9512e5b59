"""Invalidate a raw data package: mark it bad, mark what derives from it, and let the sensor redo the rest.

``invalidate_package`` does, in the CALLER's transaction (all or nothing):

1. ``RawDataPackage.invalidated_reason`` = the reason and ``updated_at`` = now. From then on the grouping
   engine never counts the package as a member of any sub-group, so every sub-group that held it has a new
   membership and therefore a new input fingerprint.
2. Every *current* (not superseded) product derived from the package, at any depth
   (``descendants_of_package``), gets ``metadata["invalidated"]``: which package, when, why. Such a product
   stays current until its sub-group's next attempt completes; registration's supersession rule then sets its
   ``superseded_by`` to the new products (and moves its intermediate copies to ``deletion_possible``). That is
   what "the affected products are superseded" means here: marked at once, superseded by the re-run, never
   deleted or unlinked, so their lineage stays readable.
3. A sub-group whose last attempt used no other valid package (e.g. the per-scan sub-groups of the bad scan)
   will never run again: its products cannot be superseded (there is nothing to supersede them with), so they
   stay marked, and the present copies of its intermediate products become ``deletion_possible`` (the
   retention cleanup removes them; final products are never deleted).
4. Nothing else is written: no other package is touched. (For a CONTINUOUS pipeline; a CRON pipeline re-runs
   them at its next cron tick, a MANUAL one only when someone materializes them: ``what_happens_next``.)
   The continuous sensor reads the bad package as
   changed (its ``updated_at``) and finds every sub-group that consumed it, at any step, through the lineage
   closure that registration records (``run_ancestor_package``; ``execution.triggers.
   _packages_covered_by_consumers``). Those sub-groups now have a new membership, so a new input fingerprint,
   and re-run after their cooldown; dependent ones once their re-run upstream sub-groups completed. The bad
   scan's own per-scan sub-groups have no member left and are not planned.

An attempt that is in flight while the package is invalidated is not cancelled; its products register as
usual and are not marked. ``InvalidationResult.in_flight_run_ids`` lists such attempts so the caller can warn.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from ccat_dagster.errors import CcatError
from ccat_dagster.opsdb import models as m
from ccat_dagster.opsdb.enums import TERMINAL_RUN_STATUSES, DataProductType, PhysicalCopyStatus
from ccat_dagster.opsdb.lineage import ImpactedSubGroup, descendants_of_package, find_package

MAX_REASON_LENGTH = 2000


class InvalidationError(CcatError, ValueError):
    """An invalidation request that cannot be carried out (e.g. an empty reason)."""


@dataclass(frozen=True, slots=True)
class AffectedSubGroup:
    """One (step, sub-group) whose current products derive from the invalidated package.

    ``remaining_package_ids``: the valid packages its current products' attempts used besides the bad one.
    ``reruns`` is true when there are any: the sub-group's membership changed and it re-runs without the
    package; false: the sub-group is retired (no member left).
    """

    pipeline: str
    step: str
    sub_group_key: str
    marked_product_ids: tuple[int, ...]
    remaining_package_ids: tuple[int, ...]
    # What brings the re-run about, by the pipeline's trigger type (``what_happens_next``).
    next_run: str = ""

    @property
    def reruns(self) -> bool:
        return bool(self.remaining_package_ids)


@dataclass(frozen=True, slots=True)
class InvalidationResult:
    package_id: int
    package_name: str
    reason: str
    already_invalidated: bool
    affected: tuple[AffectedSubGroup, ...] = ()
    retired_copy_ids: tuple[int, ...] = ()
    in_flight_run_ids: tuple[int, ...] = ()

    @property
    def marked_product_ids(self) -> tuple[int, ...]:
        return tuple(sorted(p for group in self.affected for p in group.marked_product_ids))


def invalidate_package(
    session: Session, *, package: str | int, reason: str, now: dt.datetime | None = None
) -> InvalidationResult:
    """Invalidate raw data package ``package`` (id or name) for ``reason``, in the caller's transaction.

    See the module docstring for exactly what changes. A package that is already invalidated is left as it is
    (``already_invalidated`` = True, nothing written). Raises ``InvalidationError`` for an empty or overlong
    reason and ``LineageError`` for an unknown package. Nothing is committed here.
    """
    reason = (reason or "").strip()
    if not reason:
        raise InvalidationError("the reason is empty: say why the package is bad, e.g. --reason 'bad pointing'")
    if len(reason) > MAX_REASON_LENGTH:
        raise InvalidationError(
            f"the reason has {len(reason)} characters; keep it under {MAX_REASON_LENGTH} (link to a ticket)"
        )
    now = now or m.utcnow()
    if now.tzinfo is None:
        raise InvalidationError(f"now={now!r} is naive: give an aware UTC datetime")
    row = find_package(session, package)
    if row.invalidated_reason is not None:
        return InvalidationResult(row.id, row.name, row.invalidated_reason, already_invalidated=True)

    impact = descendants_of_package(session, package_id=row.id)
    row.invalidated_reason = reason
    row.updated_at = now
    mark = {"id": row.id, "name": row.name, "reason": reason, "at": now.isoformat()}

    affected: list[AffectedSubGroup] = []
    retired_products: list[int] = []
    notes = pipeline_next_run_notes(session, {g.pipeline for g in impact.sub_groups})
    for group in impact.sub_groups:
        if not group.needs_redo:
            continue
        producing_runs = sorted({impact.products[p].run_id for p in group.current_product_ids})
        remaining = _remaining_members(session, producing_runs, bad_package_id=row.id)
        affected.append(
            AffectedSubGroup(
                pipeline=group.pipeline,
                step=group.step,
                sub_group_key=group.sub_group_key,
                marked_product_ids=group.current_product_ids,
                remaining_package_ids=remaining,
                next_run=notes.get(group.pipeline, ""),
            )
        )
        if not remaining:
            retired_products.extend(group.current_product_ids)
    _mark_products(session, [p for g in affected for p in g.marked_product_ids], mark)
    retired_copies = _retire_intermediate_copies(session, retired_products, row)
    in_flight = sorted(r.id for r in impact.runs.values() if r.status not in TERMINAL_RUN_STATUSES)
    session.flush()
    return InvalidationResult(
        package_id=row.id,
        package_name=row.name,
        reason=reason,
        already_invalidated=False,
        affected=tuple(affected),
        retired_copy_ids=tuple(retired_copies),
        in_flight_run_ids=tuple(in_flight),
    )


def _remaining_members(session: Session, run_ids: Sequence[int], *, bad_package_id: int) -> tuple[int, ...]:
    """Valid packages (not invalidated) the given attempts derive from, without the bad one."""
    rpk = m.run_ancestor_package
    rows = session.scalars(
        select(m.RawDataPackage.id)
        .join(rpk, rpk.c.raw_data_package_id == m.RawDataPackage.id)
        .where(rpk.c.executed_reduction_step_id.in_(list(run_ids)))
        .where(m.RawDataPackage.id != bad_package_id)
        .where(m.RawDataPackage.invalidated_reason.is_(None))
        .distinct()
        .order_by(m.RawDataPackage.id)
    )
    return tuple(rows)


def _mark_products(session: Session, product_ids: Sequence[int], mark: dict[str, object]) -> None:
    for start in range(0, len(product_ids), 1000):
        chunk = list(product_ids[start : start + 1000])
        for product in session.scalars(select(m.DataProduct).where(m.DataProduct.id.in_(chunk))):
            metadata = dict(product.metadata_ or {})
            previous = metadata.get("invalidated") if isinstance(metadata.get("invalidated"), dict) else {}
            packages = [p for p in previous.get("packages", []) if p.get("id") != mark["id"]] + [mark]
            # A new dict, so SQLAlchemy sees the JSON column change.
            metadata["invalidated"] = {"reason": mark["reason"], "at": mark["at"], "packages": packages}
            product.metadata_ = metadata


def _retire_intermediate_copies(session: Session, product_ids: Sequence[int], package: m.RawDataPackage) -> list[int]:
    copies: list[int] = []
    for start in range(0, len(product_ids), 1000):
        chunk = list(product_ids[start : start + 1000])
        for copy in session.scalars(
            select(m.PhysicalCopy)
            .join(m.DataProduct, m.DataProduct.id == m.PhysicalCopy.data_product_id)
            .where(m.DataProduct.id.in_(chunk))
            .where(m.DataProduct.product_type == DataProductType.INTERMEDIATE)
            .where(m.PhysicalCopy.status == PhysicalCopyStatus.PRESENT)
        ):
            copy.status = PhysicalCopyStatus.DELETION_POSSIBLE
            copy.status_reason = (
                f"derived only from raw data package {package.id} ({package.name}), invalidated: "
                f"{package.invalidated_reason}"
            )
            copies.append(copy.id)
    return sorted(copies)


def what_happens_next(trigger_type: str, *, enabled: bool) -> str:
    """When a sub-group of a pipeline with this trigger type is re-run after its inputs changed."""
    if not enabled:
        return "not re-run while the pipeline is disabled (`ccat-dagster pipelines enable` it)"
    return {
        "continuous": "re-run at the pipeline sensor's next tick, after its cooldown",
        "cron": "re-run at the pipeline's next cron tick (CRON trigger)",
    }.get(
        trigger_type,
        "NOT re-run automatically (MANUAL pipeline): materialize it by hand (`ccat-dagster pipelines gaps` lists it)",
    )


def pipeline_next_run_notes(session: Session, names: set[str]) -> dict[str, str]:
    """Pipeline name → ``what_happens_next`` for its trigger type and enabled flag."""
    if not names:
        return {}
    rows = session.execute(
        select(m.Pipeline.name, m.Pipeline.trigger_type, m.Pipeline.enabled).where(m.Pipeline.name.in_(sorted(names)))
    ).all()
    return {name: what_happens_next(trigger.value, enabled=enabled) for name, trigger, enabled in rows}


def describe_affected(groups: Sequence[AffectedSubGroup | ImpactedSubGroup]) -> list[str]:
    """One line per sub-group: ``pipeline/step [key]``."""
    return [f"{g.pipeline}/{g.step} [{g.sub_group_key}]" for g in groups]
