"""failure_kind on executed_reduction_step: why an attempt failed, as a type

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 18:55:00.000000

A nullable lower-case string of ``FailureKind`` (no native enum, like every enum column here, so the same
migration runs on PostgreSQL and SQLite; both add and drop the column in place). Attempts that ended before this
column existed get the kind their error text recorded then (the only evidence there is); any other ended attempt
keeps NULL.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_KINDS = (
    "oom",
    "walltime",
    "exit_code",
    "signal",
    "cancelled",
    "node_failure",
    "lost",
    "staging",
    "contract",
    "scheduler_unavailable",
    "disk_full",
)

# (kind, SQL condition on the old rows), first match wins; the phrases are the runner's messages before 0003.
_BACKFILL = (
    ("cancelled", "status = 'cancelled'"),
    ("oom", "error LIKE 'job killed (exit code %' OR error LIKE '%out of memory%'"),
    ("walltime", "error LIKE 'job exceeded its time limit%'"),
    ("contract", "error LIKE 'output collection refused:%'"),
    ("staging", "error LIKE 'staging failed:%'"),
    ("lost", "error LIKE 'abandoned by Dagster run%' OR error LIKE '%job unknown to the scheduler%'"),
    ("exit_code", "error LIKE 'job failed with exit code%'"),
)


def upgrade() -> None:
    with op.batch_alter_table("executed_reduction_step") as batch:
        batch.add_column(
            sa.Column(
                "failure_kind",
                sa.Enum(*_KINDS, name="failurekind", native_enum=False, length=32),
                nullable=True,
            )
        )
    for kind, condition in _BACKFILL:
        op.execute(
            sa.text(
                "UPDATE executed_reduction_step SET failure_kind = :kind "
                f"WHERE failure_kind IS NULL AND status IN ('failed', 'cancelled') AND ({condition})"
            ).bindparams(kind=kind)
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        # SQLite (>= 3.35) drops an unconstrained column in place; batch mode would copy the table, which the
        # foreign keys pointing at it forbid while they are enforced.
        op.execute("ALTER TABLE executed_reduction_step DROP COLUMN failure_kind")
    else:
        op.drop_column("executed_reduction_step", "failure_kind")
