"""lineage closure tables and their aggregates, backfilled from the link tables

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 12:16:11.765211

Every attempt gets one row per attempt it transitively derives from (``run_ancestor_run``) and one row per raw
data package it transitively derives from (``run_ancestor_package``), so lineage reads are index lookups, plus
their aggregates (``run_lineage_step``: ancestor attempts per step, software version and config;
``run_lineage_total``: counts of products, packages, bytes, files) for summaries of huge lineages. From now on
``execution.registration.record_input_lineage`` writes them with the links; the upgrade computes them once for
the attempts that exist (the same SQL on PostgreSQL and SQLite).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import ccat_dagster.opsdb.models

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# The attempt-ancestor closure of every existing attempt: the producers of the products it used, then theirs.
# UNION (not UNION ALL) makes each (attempt, ancestor) pair appear once, whatever the number of paths.
_BACKFILL_RUNS = """
WITH RECURSIVE walk(run_id, ancestor_id) AS (
    SELECT rip.executed_reduction_step_id, dp.executed_reduction_step_id
    FROM run_input_product rip JOIN data_product dp ON dp.id = rip.data_product_id
    UNION
    SELECT walk.run_id, dp.executed_reduction_step_id
    FROM walk
    JOIN run_input_product rip ON rip.executed_reduction_step_id = walk.ancestor_id
    JOIN data_product dp ON dp.id = rip.data_product_id
)
INSERT INTO run_ancestor_run (executed_reduction_step_id, ancestor_run_id)
SELECT run_id, ancestor_id FROM walk
"""

# Its own input packages and those of every ancestor attempt.
_BACKFILL_PACKAGES = """
INSERT INTO run_ancestor_package (executed_reduction_step_id, raw_data_package_id)
SELECT executed_reduction_step_id, raw_data_package_id FROM run_input_package
UNION
SELECT rar.executed_reduction_step_id, rpk.raw_data_package_id
FROM run_ancestor_run rar JOIN run_input_package rpk ON rpk.executed_reduction_step_id = rar.ancestor_run_id
"""

_BACKFILL_STEPS = """
INSERT INTO run_lineage_step (
    executed_reduction_step_id, reduction_step_id, reduction_software_version_id, reduction_step_config_id,
    attempts, sub_groups, first_finished_at, last_finished_at
)
SELECT rar.executed_reduction_step_id, e.reduction_step_id, e.reduction_software_version_id,
       e.reduction_step_config_id, count(*), count(DISTINCT e.sub_group_key), min(e.finished_at), max(e.finished_at)
FROM run_ancestor_run rar JOIN executed_reduction_step e ON e.id = rar.ancestor_run_id
GROUP BY rar.executed_reduction_step_id, e.reduction_step_id, e.reduction_software_version_id,
         e.reduction_step_config_id
"""

_BACKFILL_TOTALS = """
INSERT INTO run_lineage_total (executed_reduction_step_id, products, packages, package_bytes, files)
SELECT e.id, coalesce(products.n, 0), coalesce(packages.n, 0), coalesce(packages.bytes, 0), coalesce(files.n, 0)
FROM executed_reduction_step e
LEFT JOIN (
    SELECT sources.run_id, count(DISTINCT rip.data_product_id) AS n
    FROM (
        SELECT id AS run_id, id AS source_id FROM executed_reduction_step
        UNION ALL
        SELECT executed_reduction_step_id, ancestor_run_id FROM run_ancestor_run
    ) sources
    JOIN run_input_product rip ON rip.executed_reduction_step_id = sources.source_id
    GROUP BY sources.run_id
) products ON products.run_id = e.id
LEFT JOIN (
    SELECT rap.executed_reduction_step_id AS run_id, count(*) AS n, sum(p.size_bytes) AS bytes
    FROM run_ancestor_package rap JOIN raw_data_package p ON p.id = rap.raw_data_package_id
    GROUP BY rap.executed_reduction_step_id
) packages ON packages.run_id = e.id
LEFT JOIN (
    SELECT rap.executed_reduction_step_id AS run_id, count(*) AS n
    FROM run_ancestor_package rap JOIN raw_data_file f ON f.raw_data_package_id = rap.raw_data_package_id
    GROUP BY rap.executed_reduction_step_id
) files ON files.run_id = e.id
"""


def upgrade() -> None:
    op.create_table(
        "run_ancestor_package",
        sa.Column("executed_reduction_step_id", sa.Integer(), nullable=False),
        sa.Column("raw_data_package_id", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["executed_reduction_step_id"],
            ["executed_reduction_step.id"],
            name=op.f("fk_run_ancestor_package_executed_reduction_step_id_executed_reduction_step"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["raw_data_package_id"],
            ["raw_data_package.id"],
            name=op.f("fk_run_ancestor_package_raw_data_package_id_raw_data_package"),
        ),
        sa.PrimaryKeyConstraint(
            "executed_reduction_step_id", "raw_data_package_id", name=op.f("pk_run_ancestor_package")
        ),
    )
    with op.batch_alter_table("run_ancestor_package", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_run_ancestor_package_raw_data_package_id"), ["raw_data_package_id"], unique=False
        )

    op.create_table(
        "run_ancestor_run",
        sa.Column("executed_reduction_step_id", sa.Integer(), nullable=False),
        sa.Column("ancestor_run_id", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["ancestor_run_id"],
            ["executed_reduction_step.id"],
            name=op.f("fk_run_ancestor_run_ancestor_run_id_executed_reduction_step"),
        ),
        sa.ForeignKeyConstraint(
            ["executed_reduction_step_id"],
            ["executed_reduction_step.id"],
            name=op.f("fk_run_ancestor_run_executed_reduction_step_id_executed_reduction_step"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("executed_reduction_step_id", "ancestor_run_id", name=op.f("pk_run_ancestor_run")),
    )
    with op.batch_alter_table("run_ancestor_run", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_run_ancestor_run_ancestor_run_id"), ["ancestor_run_id"], unique=False)

    op.create_table(
        "run_lineage_step",
        sa.Column("executed_reduction_step_id", sa.Integer(), nullable=False),
        sa.Column("reduction_step_id", sa.Integer(), nullable=False),
        sa.Column("reduction_software_version_id", sa.Integer(), nullable=False),
        sa.Column("reduction_step_config_id", sa.Integer(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("sub_groups", sa.Integer(), nullable=False),
        sa.Column("first_finished_at", ccat_dagster.opsdb.models.UtcDateTime(timezone=True), nullable=True),
        sa.Column("last_finished_at", ccat_dagster.opsdb.models.UtcDateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["executed_reduction_step_id"],
            ["executed_reduction_step.id"],
            name=op.f("fk_run_lineage_step_executed_reduction_step_id_executed_reduction_step"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["reduction_software_version_id"],
            ["reduction_software_version.id"],
            name=op.f("fk_run_lineage_step_reduction_software_version_id_reduction_software_version"),
        ),
        sa.ForeignKeyConstraint(
            ["reduction_step_config_id"],
            ["reduction_step_config.id"],
            name=op.f("fk_run_lineage_step_reduction_step_config_id_reduction_step_config"),
        ),
        sa.ForeignKeyConstraint(
            ["reduction_step_id"],
            ["reduction_step.id"],
            name=op.f("fk_run_lineage_step_reduction_step_id_reduction_step"),
        ),
        sa.PrimaryKeyConstraint(
            "executed_reduction_step_id",
            "reduction_step_id",
            "reduction_software_version_id",
            "reduction_step_config_id",
            name=op.f("pk_run_lineage_step"),
        ),
    )
    op.create_table(
        "run_lineage_total",
        sa.Column("executed_reduction_step_id", sa.Integer(), nullable=False),
        sa.Column("products", sa.BigInteger(), nullable=False),
        sa.Column("packages", sa.BigInteger(), nullable=False),
        sa.Column("package_bytes", sa.BigInteger(), nullable=False),
        sa.Column("files", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["executed_reduction_step_id"],
            ["executed_reduction_step.id"],
            name=op.f("fk_run_lineage_total_executed_reduction_step_id_executed_reduction_step"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("executed_reduction_step_id", name=op.f("pk_run_lineage_total")),
    )

    op.execute(sa.text(_BACKFILL_RUNS))
    op.execute(sa.text(_BACKFILL_PACKAGES))
    op.execute(sa.text(_BACKFILL_STEPS))
    op.execute(sa.text(_BACKFILL_TOTALS))


def downgrade() -> None:
    op.drop_table("run_lineage_total")
    op.drop_table("run_lineage_step")
    with op.batch_alter_table("run_ancestor_run", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_run_ancestor_run_ancestor_run_id"))
    op.drop_table("run_ancestor_run")
    with op.batch_alter_table("run_ancestor_package", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_run_ancestor_package_raw_data_package_id"))
    op.drop_table("run_ancestor_package")
