"""API tokens; the indexes the REST API's list endpoints read through

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03 10:00:00

1. ``api_token``: bearer tokens of the REST API, stored as the sha256 of their secret (docs/api.md).
2. Indexes for the paginated listings (newest first within a filter): attempts by step, status, sub-group and
   creation time; products by type and step.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import ccat_dagster.opsdb.models

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

_INDEXES = (
    ("ix_executed_reduction_step_step_id", "executed_reduction_step", ["reduction_step_id", "id"]),
    ("ix_executed_reduction_step_status_id", "executed_reduction_step", ["status", "id"]),
    ("ix_executed_reduction_step_key_id", "executed_reduction_step", ["sub_group_key", "id"]),
    ("ix_executed_reduction_step_created_at", "executed_reduction_step", ["created_at"]),
    ("ix_data_product_type_id", "data_product", ["product_type", "id"]),
    ("ix_data_product_step_id", "data_product", ["reduction_step_id", "id"]),
)


def upgrade() -> None:
    op.create_table(
        "api_token",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("scope", sa.String(length=16), nullable=False),
        sa.Column("token_sha256", sa.String(length=64), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("created_at", ccat_dagster.opsdb.models.UtcDateTime(timezone=True), nullable=False),
        sa.Column("last_used_at", ccat_dagster.opsdb.models.UtcDateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", ccat_dagster.opsdb.models.UtcDateTime(timezone=True), nullable=True),
        sa.CheckConstraint("scope IN ('read', 'write')", name=op.f("ck_api_token_scope")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_token")),
        sa.UniqueConstraint("name", name=op.f("uq_api_token_name")),
        sa.UniqueConstraint("token_sha256", name=op.f("uq_api_token_token_sha256")),
    )
    for name, table, columns in _INDEXES:
        op.create_index(name, table, columns, unique=False)


def downgrade() -> None:
    for name, table, _columns in reversed(_INDEXES):
        op.drop_index(name, table_name=table)
    op.drop_table("api_token")
