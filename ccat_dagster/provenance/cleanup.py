"""One retention cleanup (docs/provenance.md, Retention), as the CLI (``ccat-dagster retention run``) and the
Dagster job run it.

``run_retention_cleanup`` = ``execution.retention.mark_deletable_intermediates`` (present → deletion_possible
for superseded intermediates and for consumed ones past ``RETENTION_DAYS``), committed, then
``execution.retention.delete_deletable_copies`` (deletion_possible → deleted / deletion_failed). Only files
under the processing location's root or ``PIPELINE_BASE_DIR`` are ever removed; final products never.

With ``dry_run`` both steps run inside ONE transaction that is rolled back: the report lists the copies that
would be marked and the files that would be deleted (including those marked in the same run), and nothing in
ops-db or on disk changes.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from ccat_dagster.errors import CcatError
from ccat_dagster.execution.retention import (
    DeletionAction,
    DeletionOutcome,
    delete_deletable_copies,
    mark_deletable_intermediates,
)
from ccat_dagster.opsdb import models as m
from ccat_dagster.opsdb.enums import LocationType


class RetentionConfigError(CcatError):
    """The cleanup cannot tell which directories it may delete from."""


@dataclass(frozen=True, slots=True)
class MarkedCopy:
    copy_id: int
    product_id: int
    path: str
    reason: str


@dataclass(frozen=True)
class CleanupReport:
    dry_run: bool
    retention_days: float
    allowed_roots: tuple[Path, ...]
    marked: tuple[MarkedCopy, ...]
    outcomes: tuple[DeletionOutcome, ...]

    def count(self, action: DeletionAction) -> int:
        return sum(1 for o in self.outcomes if o.action is action)

    def summary(self) -> str:
        verb = "would mark" if self.dry_run else "marked"
        parts = [f"{verb} {len(self.marked)} intermediate copy(ies) deletion_possible"]
        if self.dry_run:
            parts.append(f"would delete {self.count(DeletionAction.WOULD_DELETE)} file(s)")
        else:
            parts.append(f"deleted {self.count(DeletionAction.DELETED)} file(s)")
        parts.append(f"{self.count(DeletionAction.FAILED)} refused/failed")
        return ", ".join(parts) + f" (retention {self.retention_days:g} day(s))"


def allowed_roots(session: Session, *, pipeline_base_dir: Path, processing_location_id: int | None) -> list[Path]:
    """``PIPELINE_BASE_DIR`` and the root of this deployment's processing location (the configured one, else
    the only one in ops-db)."""
    query = select(m.DataLocation).where(m.DataLocation.location_type == LocationType.PROCESSING)
    if processing_location_id is not None:
        query = query.where(m.DataLocation.id == processing_location_id)
    locations = session.scalars(query).all()
    if len(locations) != 1:
        raise RetentionConfigError(
            f"found {len(locations)} processing location(s) for the cleanup"
            + (f" with id {processing_location_id}" if processing_location_id is not None else "")
            + "; set CCAT_WORKFLOW_MANAGER_PROCESSING_LOCATION_ID to the processing DataLocation this "
            "deployment serves"
        )
    return [Path(pipeline_base_dir), Path(locations[0].root_path)]


def run_retention_cleanup(
    engine: Engine,
    *,
    pipeline_base_dir: Path,
    processing_location_id: int | None,
    retention_days: float,
    dry_run: bool,
    now: dt.datetime | None = None,
) -> CleanupReport:
    """Mark, then delete (see the module docstring). Returns what was (or would be) marked and deleted."""
    now = now or m.utcnow()
    with engine.connect() as connection:
        transaction = connection.begin()
        try:
            # The session joins the connection's transaction and never commits it (no savepoints: pysqlite
            # commits on RELEASE SAVEPOINT); this function alone decides between commit and rollback.
            with Session(bind=connection, join_transaction_mode="rollback_only") as session:
                roots = allowed_roots(
                    session,
                    pipeline_base_dir=pipeline_base_dir,
                    processing_location_id=processing_location_id,
                )
                copy_ids = mark_deletable_intermediates(session, now=now, retention_days=retention_days)
                marked = _describe_marked(session, copy_ids)
                session.flush()
            if dry_run:
                # Same transaction, so the copies marked above are listed too; rolled back afterwards.
                outcomes = delete_deletable_copies(cast(Engine, connection), dry_run=True, allowed_roots=roots)
                transaction.rollback()
            else:
                transaction.commit()
        except BaseException:
            if transaction.is_active:
                transaction.rollback()
            raise
    if not dry_run:
        outcomes = delete_deletable_copies(engine, dry_run=False, allowed_roots=roots)
    return CleanupReport(
        dry_run=dry_run,
        retention_days=retention_days,
        allowed_roots=tuple(roots),
        marked=tuple(marked),
        outcomes=tuple(outcomes),
    )


def _describe_marked(session: Session, copy_ids: list[int]) -> list[MarkedCopy]:
    if not copy_ids:
        return []
    rows = session.execute(
        select(
            m.PhysicalCopy.id,
            m.PhysicalCopy.data_product_id,
            m.PhysicalCopy.path,
            m.PhysicalCopy.status_reason,
        )
        .where(m.PhysicalCopy.id.in_(copy_ids))
        .order_by(m.PhysicalCopy.id)
    ).all()
    return [MarkedCopy(copy_id, product_id or 0, path, reason or "") for copy_id, product_id, path, reason in rows]
