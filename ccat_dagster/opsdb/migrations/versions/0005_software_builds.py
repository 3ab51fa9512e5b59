"""image builds per software version and the image digest of each attempt

Revision ID: 0005
Revises: 0002
Create Date: 2026-12-02 18:50:00.000000

``reduction_software_build`` records the digest of a software version's image when it is first used and every
change registered as a new build since; ``executed_reduction_step.image_digest`` records the digest an attempt
was submitted with, so ``ccat-dagster reproduce`` can check it runs the same software.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import ccat_dagster.opsdb.models

revision = "0005"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "reduction_software_build",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("reduction_software_version_id", sa.Integer(), nullable=False),
        sa.Column("build", sa.Integer(), nullable=False),
        sa.Column("image_digest", sa.String(length=128), nullable=False),
        sa.Column("image_kind", sa.String(length=32), nullable=False),
        sa.Column("image_path", sa.String(length=2048), nullable=False),
        sa.Column("recorded_at", ccat_dagster.opsdb.models.UtcDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["reduction_software_version_id"],
            ["reduction_software_version.id"],
            name=op.f("fk_reduction_software_build_reduction_software_version_id_reduction_software_version"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reduction_software_build")),
        sa.UniqueConstraint(
            "reduction_software_version_id",
            "build",
            name=op.f("uq_reduction_software_build_reduction_software_version_id_build"),
        ),
    )
    op.create_index(
        op.f("ix_reduction_software_build_reduction_software_version_id"),
        "reduction_software_build",
        ["reduction_software_version_id"],
        unique=False,
    )
    # Plain ADD / DROP COLUMN on both dialects (SQLite has both since 3.35): a batch table rebuild on SQLite would
    # drop and recreate executed_reduction_step, which the foreign keys of every lineage table refuse.
    op.add_column("executed_reduction_step", sa.Column("image_digest", sa.String(length=128), nullable=True))


def downgrade() -> None:
    op.drop_column("executed_reduction_step", "image_digest")
    op.drop_index(
        op.f("ix_reduction_software_build_reduction_software_version_id"), table_name="reduction_software_build"
    )
    op.drop_table("reduction_software_build")
