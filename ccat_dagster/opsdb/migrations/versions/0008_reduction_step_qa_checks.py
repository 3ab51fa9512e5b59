"""reduction_step.qa_checks

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03 10:15:00

``reduction_step.qa_checks`` (JSON, default ``{}``): the thresholds a final step's QA metrics are checked
against, metric → ``{min, max, severity, description}`` (docs/pipeline-yaml.md, ``qa_checks``). Existing
steps get ``{}``: no checks, as before.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    json_type = sa.JSON().with_variant(JSONB(), "postgresql")
    with op.batch_alter_table("reduction_step", schema=None) as batch_op:
        batch_op.add_column(sa.Column("qa_checks", json_type, nullable=False, server_default="{}"))


def downgrade() -> None:
    # Native DROP COLUMN (SQLite >= 3.35), as in 0006: batch mode's table rebuild would break foreign keys.
    with op.batch_alter_table("reduction_step", schema=None, recreate="never") as batch_op:
        batch_op.drop_column("qa_checks")
