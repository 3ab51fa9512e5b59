"""initial ops-db schema

Revision ID: 0001
Revises:
Create Date: 2026-11-23 09:05:46.393891
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy import Text
from sqlalchemy.dialects import postgresql

import ccat_dagster.opsdb.models

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table(
        "grouping_preset",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column(
            "filter_rules",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column(
            "group_by",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=Text()), "postgresql"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_grouping_preset")),
        sa.UniqueConstraint("name", name=op.f("uq_grouping_preset_name")),
    )
    op.create_table(
        "instrument",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("available", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_instrument")),
        sa.UniqueConstraint("name", name=op.f("uq_instrument_name")),
    )
    op.create_table(
        "observing_program",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("short_name", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=256), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_observing_program")),
        sa.UniqueConstraint("short_name", name=op.f("uq_observing_program_short_name")),
    )
    op.create_table(
        "reduction_software",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reduction_software")),
        sa.UniqueConstraint("name", name=op.f("uq_reduction_software_name")),
    )
    op.create_table(
        "reduction_step_config",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=256), nullable=False),
        sa.Column(
            "parameters",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("parameters_sha256", sa.String(length=64), nullable=False),
        sa.Column("created_at", ccat_dagster.opsdb.models.UtcDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reduction_step_config")),
        sa.UniqueConstraint("name", "parameters_sha256", name=op.f("uq_reduction_step_config_name_parameters_sha256")),
    )
    op.create_table(
        "site",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("short_name", sa.String(length=32), nullable=False),
        sa.Column("location", sa.String(length=256), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_site")),
        sa.UniqueConstraint("name", name=op.f("uq_site_name")),
        sa.UniqueConstraint("short_name", name=op.f("uq_site_short_name")),
    )
    op.create_table(
        "source",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column(
            "kind",
            sa.Enum("fixed", "solar_system", "constant_elevation", name="sourcekind", native_enum=False, length=32),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_source")),
        sa.UniqueConstraint("name", name=op.f("uq_source_name")),
    )
    op.create_table(
        "data_location",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("site_id", sa.Integer(), nullable=False),
        sa.Column(
            "location_type",
            sa.Enum(
                "source",
                "buffer",
                "long_term_archive",
                "processing",
                name="locationtype",
                native_enum=False,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column(
            "storage_type",
            sa.Enum("disk", "s3", "tape", name="storagetype", native_enum=False, length=32),
            nullable=False,
        ),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("root_path", sa.String(length=1024), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(["site_id"], ["site.id"], name=op.f("fk_data_location_site_id_site")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_data_location")),
        sa.UniqueConstraint("name", name=op.f("uq_data_location_name")),
    )
    op.create_table(
        "instrument_module",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("instrument_id", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["instrument_id"], ["instrument.id"], name=op.f("fk_instrument_module_instrument_id_instrument")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_instrument_module")),
        sa.UniqueConstraint("instrument_id", "name", name=op.f("uq_instrument_module_instrument_id_name")),
    )
    op.create_table(
        "obs_unit",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("source_id", sa.Integer(), nullable=False),
        sa.Column("observing_program_id", sa.Integer(), nullable=False),
        sa.Column("line_id", sa.String(length=64), nullable=True),
        sa.ForeignKeyConstraint(
            ["observing_program_id"],
            ["observing_program.id"],
            name=op.f("fk_obs_unit_observing_program_id_observing_program"),
        ),
        sa.ForeignKeyConstraint(["source_id"], ["source.id"], name=op.f("fk_obs_unit_source_id_source")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_obs_unit")),
        sa.UniqueConstraint("name", name=op.f("uq_obs_unit_name")),
    )
    op.create_table(
        "reduction_software_version",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("reduction_software_id", sa.Integer(), nullable=False),
        sa.Column("version", sa.String(length=64), nullable=False),
        sa.Column("image_ref", sa.String(length=1024), nullable=False),
        sa.Column("image_digest", sa.String(length=128), nullable=True),
        sa.Column(
            "entrypoint",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("created_at", ccat_dagster.opsdb.models.UtcDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["reduction_software_id"],
            ["reduction_software.id"],
            name=op.f("fk_reduction_software_version_reduction_software_id_reduction_software"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reduction_software_version")),
        sa.UniqueConstraint(
            "reduction_software_id",
            "version",
            name=op.f("uq_reduction_software_version_reduction_software_id_version"),
        ),
    )
    op.create_table(
        "data_grouping",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column(
            "filter_rules",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("instrument_module_id", sa.Integer(), nullable=True),
        sa.Column("created_at", ccat_dagster.opsdb.models.UtcDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", ccat_dagster.opsdb.models.UtcDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["instrument_module_id"],
            ["instrument_module.id"],
            name=op.f("fk_data_grouping_instrument_module_id_instrument_module"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_data_grouping")),
        sa.UniqueConstraint("name", name=op.f("uq_data_grouping_name")),
    )
    op.create_table(
        "executed_obs_unit",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("obs_unit_id", sa.Integer(), nullable=False),
        sa.Column("start_time", ccat_dagster.opsdb.models.UtcDateTime(timezone=True), nullable=False),
        sa.Column("end_time", ccat_dagster.opsdb.models.UtcDateTime(timezone=True), nullable=True),
        sa.Column(
            "status",
            sa.Enum(
                "pending",
                "scheduled",
                "in_progress",
                "completed",
                "failed",
                name="obsstatus",
                native_enum=False,
                length=32,
            ),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["obs_unit_id"], ["obs_unit.id"], name=op.f("fk_executed_obs_unit_obs_unit_id_obs_unit")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_executed_obs_unit")),
    )
    with op.batch_alter_table("executed_obs_unit", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_executed_obs_unit_obs_unit_id"), ["obs_unit_id"], unique=False)

    op.create_table(
        "staging_job",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("target_location_id", sa.Integer(), nullable=False),
        sa.Column(
            "status",
            sa.Enum(
                "pending",
                "in_progress",
                "completed",
                "failed",
                name="stagingjobstatus",
                native_enum=False,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column("retry_count", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", ccat_dagster.opsdb.models.UtcDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", ccat_dagster.opsdb.models.UtcDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["target_location_id"],
            ["data_location.id"],
            name=op.f("fk_staging_job_target_location_id_data_location"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_staging_job")),
    )
    op.create_table(
        "pipeline",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("data_grouping_id", sa.Integer(), nullable=False),
        sa.Column("processing_location_id", sa.Integer(), nullable=False),
        sa.Column(
            "trigger_type",
            sa.Enum("continuous", "cron", "manual", name="triggertype", native_enum=False, length=32),
            nullable=False,
        ),
        sa.Column(
            "trigger_config",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("spec_sha256", sa.String(length=64), nullable=False),
        sa.Column("created_at", ccat_dagster.opsdb.models.UtcDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", ccat_dagster.opsdb.models.UtcDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["data_grouping_id"],
            ["data_grouping.id"],
            name=op.f("fk_pipeline_data_grouping_id_data_grouping"),
        ),
        sa.ForeignKeyConstraint(
            ["processing_location_id"],
            ["data_location.id"],
            name=op.f("fk_pipeline_processing_location_id_data_location"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pipeline")),
        sa.UniqueConstraint("name", name=op.f("uq_pipeline_name")),
    )
    with op.batch_alter_table("pipeline", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_pipeline_processing_location_id"), ["processing_location_id"], unique=False
        )

    op.create_table(
        "raw_data_package",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=256), nullable=False),
        sa.Column("executed_obs_unit_id", sa.Uuid(), nullable=False),
        sa.Column("instrument_module_id", sa.Integer(), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("checksum", sa.String(length=64), nullable=False),
        sa.Column(
            "state",
            sa.Enum(
                "waiting",
                "transferring",
                "archived",
                "failed",
                name="packagestate",
                native_enum=False,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column(
            "metadata",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("invalidated_reason", sa.Text(), nullable=True),
        sa.Column("created_at", ccat_dagster.opsdb.models.UtcDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", ccat_dagster.opsdb.models.UtcDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["executed_obs_unit_id"],
            ["executed_obs_unit.id"],
            name=op.f("fk_raw_data_package_executed_obs_unit_id_executed_obs_unit"),
        ),
        sa.ForeignKeyConstraint(
            ["instrument_module_id"],
            ["instrument_module.id"],
            name=op.f("fk_raw_data_package_instrument_module_id_instrument_module"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_raw_data_package")),
        sa.UniqueConstraint("name", name=op.f("uq_raw_data_package_name")),
    )
    with op.batch_alter_table("raw_data_package", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_raw_data_package_executed_obs_unit_id"), ["executed_obs_unit_id"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_raw_data_package_instrument_module_id"), ["instrument_module_id"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_raw_data_package_state"), ["state"], unique=False)
        batch_op.create_index("ix_raw_data_package_updated_at_id", ["updated_at", "id"], unique=False)

    op.create_table(
        "raw_data_file",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("raw_data_package_id", sa.Integer(), nullable=False),
        sa.Column("relative_path", sa.String(length=1024), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("checksum", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(
            ["raw_data_package_id"],
            ["raw_data_package.id"],
            name=op.f("fk_raw_data_file_raw_data_package_id_raw_data_package"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_raw_data_file")),
        sa.UniqueConstraint(
            "raw_data_package_id",
            "relative_path",
            name=op.f("uq_raw_data_file_raw_data_package_id_relative_path"),
        ),
    )
    op.create_table(
        "reduction_step",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("pipeline_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column(
            "group_by",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("cooldown_seconds", sa.Integer(), nullable=False),
        sa.Column("reduction_software_id", sa.Integer(), nullable=False),
        sa.Column(
            "version_policy",
            sa.Enum("exact", "compatible", "latest", name="versionpolicy", native_enum=False, length=32),
            nullable=False,
        ),
        sa.Column("version_spec", sa.String(length=64), nullable=False),
        sa.Column("reduction_step_config_id", sa.Integer(), nullable=False),
        sa.Column(
            "resources",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("max_retries", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["pipeline_id"],
            ["pipeline.id"],
            name=op.f("fk_reduction_step_pipeline_id_pipeline"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["reduction_software_id"],
            ["reduction_software.id"],
            name=op.f("fk_reduction_step_reduction_software_id_reduction_software"),
        ),
        sa.ForeignKeyConstraint(
            ["reduction_step_config_id"],
            ["reduction_step_config.id"],
            name=op.f("fk_reduction_step_reduction_step_config_id_reduction_step_config"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reduction_step")),
        sa.UniqueConstraint("pipeline_id", "name", name=op.f("uq_reduction_step_pipeline_id_name")),
    )
    op.create_table(
        "staging_job_package",
        sa.Column("staging_job_id", sa.Integer(), nullable=False),
        sa.Column("raw_data_package_id", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["raw_data_package_id"],
            ["raw_data_package.id"],
            name=op.f("fk_staging_job_package_raw_data_package_id_raw_data_package"),
        ),
        sa.ForeignKeyConstraint(
            ["staging_job_id"],
            ["staging_job.id"],
            name=op.f("fk_staging_job_package_staging_job_id_staging_job"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("staging_job_id", "raw_data_package_id", name=op.f("pk_staging_job_package")),
    )
    op.create_table(
        "executed_reduction_step",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("reduction_step_id", sa.Integer(), nullable=False),
        sa.Column("sub_group_key", sa.String(length=512), nullable=False),
        sa.Column(
            "status",
            sa.Enum(
                "pending",
                "staging_data",
                "submitted",
                "running",
                "collecting_results",
                "completed",
                "failed",
                "cancelled",
                name="runstatus",
                native_enum=False,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("retry_count", sa.Integer(), nullable=False),
        sa.Column("input_fingerprint", sa.String(length=64), nullable=False),
        sa.Column("reduction_software_version_id", sa.Integer(), nullable=False),
        sa.Column("reduction_step_config_id", sa.Integer(), nullable=False),
        sa.Column("dagster_run_id", sa.String(length=64), nullable=True),
        sa.Column("hpc_backend", sa.String(length=32), nullable=True),
        sa.Column("hpc_job_id", sa.String(length=128), nullable=True),
        sa.Column("exit_code", sa.Integer(), nullable=True),
        sa.Column("wall_time_seconds", sa.Float(), nullable=True),
        sa.Column("cpu_hours", sa.Float(), nullable=True),
        sa.Column("peak_memory_gb", sa.Float(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("attempt_dir", sa.String(length=2048), nullable=True),
        sa.Column("created_at", ccat_dagster.opsdb.models.UtcDateTime(timezone=True), nullable=False),
        sa.Column("started_at", ccat_dagster.opsdb.models.UtcDateTime(timezone=True), nullable=True),
        sa.Column("finished_at", ccat_dagster.opsdb.models.UtcDateTime(timezone=True), nullable=True),
        sa.Column("status_changed_at", ccat_dagster.opsdb.models.UtcDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["reduction_software_version_id"],
            ["reduction_software_version.id"],
            name=op.f("fk_executed_reduction_step_reduction_software_version_id_reduction_software_version"),
        ),
        sa.ForeignKeyConstraint(
            ["reduction_step_config_id"],
            ["reduction_step_config.id"],
            name=op.f("fk_executed_reduction_step_reduction_step_config_id_reduction_step_config"),
        ),
        sa.ForeignKeyConstraint(
            ["reduction_step_id"],
            ["reduction_step.id"],
            name=op.f("fk_executed_reduction_step_reduction_step_id_reduction_step"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_executed_reduction_step")),
        sa.UniqueConstraint(
            "reduction_step_id",
            "sub_group_key",
            "attempt",
            name=op.f("uq_executed_reduction_step_reduction_step_id_sub_group_key_attempt"),
        ),
    )
    with op.batch_alter_table("executed_reduction_step", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_executed_reduction_step_dagster_run_id"), ["dagster_run_id"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_executed_reduction_step_input_fingerprint"), ["input_fingerprint"], unique=False
        )
        batch_op.create_index(
            "ix_executed_reduction_step_step_key",
            ["reduction_step_id", "sub_group_key", "status"],
            unique=False,
        )
        batch_op.create_index(
            "uq_executed_reduction_step_one_active",
            ["reduction_step_id", "sub_group_key"],
            unique=True,
            postgresql_where=sa.text("status NOT IN ('completed', 'failed', 'cancelled')"),
            sqlite_where=sa.text("status NOT IN ('completed', 'failed', 'cancelled')"),
        )

    op.create_table(
        "reduction_step_dependency",
        sa.Column("step_id", sa.Integer(), nullable=False),
        sa.Column("upstream_step_id", sa.Integer(), nullable=False),
        sa.CheckConstraint("step_id <> upstream_step_id", name=op.f("ck_reduction_step_dependency_no_self_dependency")),
        sa.ForeignKeyConstraint(
            ["step_id"],
            ["reduction_step.id"],
            name=op.f("fk_reduction_step_dependency_step_id_reduction_step"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["upstream_step_id"],
            ["reduction_step.id"],
            name=op.f("fk_reduction_step_dependency_upstream_step_id_reduction_step"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("step_id", "upstream_step_id", name=op.f("pk_reduction_step_dependency")),
    )
    op.create_table(
        "data_product",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("executed_reduction_step_id", sa.Integer(), nullable=False),
        sa.Column("reduction_step_id", sa.Integer(), nullable=False),
        sa.Column("sub_group_key", sa.String(length=512), nullable=False),
        sa.Column(
            "product_type",
            sa.Enum(
                "science",
                "qa_metric",
                "plot",
                "statistics",
                "log",
                "intermediate",
                name="dataproducttype",
                native_enum=False,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column("relative_path", sa.String(length=1024), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column(
            "metadata",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("superseded_by_id", sa.Integer(), nullable=True),
        sa.Column("created_at", ccat_dagster.opsdb.models.UtcDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["executed_reduction_step_id"],
            ["executed_reduction_step.id"],
            name=op.f("fk_data_product_executed_reduction_step_id_executed_reduction_step"),
        ),
        sa.ForeignKeyConstraint(
            ["reduction_step_id"],
            ["reduction_step.id"],
            name=op.f("fk_data_product_reduction_step_id_reduction_step"),
        ),
        sa.ForeignKeyConstraint(
            ["superseded_by_id"],
            ["data_product.id"],
            name=op.f("fk_data_product_superseded_by_id_data_product"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_data_product")),
        sa.UniqueConstraint(
            "executed_reduction_step_id",
            "relative_path",
            name=op.f("uq_data_product_executed_reduction_step_id_relative_path"),
        ),
    )
    with op.batch_alter_table("data_product", schema=None) as batch_op:
        batch_op.create_index("ix_data_product_step_key", ["reduction_step_id", "sub_group_key"], unique=False)
        batch_op.create_index(batch_op.f("ix_data_product_superseded_by_id"), ["superseded_by_id"], unique=False)

    op.create_table(
        "run_input_package",
        sa.Column("executed_reduction_step_id", sa.Integer(), nullable=False),
        sa.Column("raw_data_package_id", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["executed_reduction_step_id"],
            ["executed_reduction_step.id"],
            name=op.f("fk_run_input_package_executed_reduction_step_id_executed_reduction_step"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["raw_data_package_id"],
            ["raw_data_package.id"],
            name=op.f("fk_run_input_package_raw_data_package_id_raw_data_package"),
        ),
        sa.PrimaryKeyConstraint("executed_reduction_step_id", "raw_data_package_id", name=op.f("pk_run_input_package")),
    )
    with op.batch_alter_table("run_input_package", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_run_input_package_raw_data_package_id"), ["raw_data_package_id"], unique=False
        )

    op.create_table(
        "run_status_transition",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("executed_reduction_step_id", sa.Integer(), nullable=False),
        sa.Column(
            "from_status",
            sa.Enum(
                "pending",
                "staging_data",
                "submitted",
                "running",
                "collecting_results",
                "completed",
                "failed",
                "cancelled",
                name="runstatus",
                native_enum=False,
                length=32,
            ),
            nullable=True,
        ),
        sa.Column(
            "to_status",
            sa.Enum(
                "pending",
                "staging_data",
                "submitted",
                "running",
                "collecting_results",
                "completed",
                "failed",
                "cancelled",
                name="runstatus",
                native_enum=False,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column("at", ccat_dagster.opsdb.models.UtcDateTime(timezone=True), nullable=False),
        sa.Column("message", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["executed_reduction_step_id"],
            ["executed_reduction_step.id"],
            name=op.f("fk_run_status_transition_executed_reduction_step_id_executed_reduction_step"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_run_status_transition")),
    )
    with op.batch_alter_table("run_status_transition", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_run_status_transition_executed_reduction_step_id"),
            ["executed_reduction_step_id"],
            unique=False,
        )

    op.create_table(
        "physical_copy",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("data_location_id", sa.Integer(), nullable=False),
        sa.Column("raw_data_package_id", sa.Integer(), nullable=True),
        sa.Column("data_product_id", sa.Integer(), nullable=True),
        sa.Column("path", sa.String(length=2048), nullable=False),
        sa.Column(
            "status",
            sa.Enum(
                "present",
                "staged",
                "deletion_scheduled",
                "deletion_in_progress",
                "deletion_possible",
                "deleted",
                "deletion_failed",
                name="physicalcopystatus",
                native_enum=False,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column("checksum", sa.String(length=64), nullable=True),
        sa.Column("status_reason", sa.Text(), nullable=True),
        sa.Column("created_at", ccat_dagster.opsdb.models.UtcDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", ccat_dagster.opsdb.models.UtcDateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "(raw_data_package_id IS NULL) <> (data_product_id IS NULL)",
            name=op.f("ck_physical_copy_exactly_one_subject"),
        ),
        sa.ForeignKeyConstraint(
            ["data_location_id"],
            ["data_location.id"],
            name=op.f("fk_physical_copy_data_location_id_data_location"),
        ),
        sa.ForeignKeyConstraint(
            ["data_product_id"],
            ["data_product.id"],
            name=op.f("fk_physical_copy_data_product_id_data_product"),
        ),
        sa.ForeignKeyConstraint(
            ["raw_data_package_id"],
            ["raw_data_package.id"],
            name=op.f("fk_physical_copy_raw_data_package_id_raw_data_package"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_physical_copy")),
        sa.UniqueConstraint(
            "data_location_id",
            "data_product_id",
            name=op.f("uq_physical_copy_data_location_id_data_product_id"),
        ),
        sa.UniqueConstraint(
            "data_location_id",
            "raw_data_package_id",
            name=op.f("uq_physical_copy_data_location_id_raw_data_package_id"),
        ),
    )
    with op.batch_alter_table("physical_copy", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_physical_copy_data_location_id"), ["data_location_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_physical_copy_data_product_id"), ["data_product_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_physical_copy_raw_data_package_id"), ["raw_data_package_id"], unique=False)

    op.create_table(
        "run_input_product",
        sa.Column("executed_reduction_step_id", sa.Integer(), nullable=False),
        sa.Column("data_product_id", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["data_product_id"],
            ["data_product.id"],
            name=op.f("fk_run_input_product_data_product_id_data_product"),
        ),
        sa.ForeignKeyConstraint(
            ["executed_reduction_step_id"],
            ["executed_reduction_step.id"],
            name=op.f("fk_run_input_product_executed_reduction_step_id_executed_reduction_step"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("executed_reduction_step_id", "data_product_id", name=op.f("pk_run_input_product")),
    )
    with op.batch_alter_table("run_input_product", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_run_input_product_data_product_id"), ["data_product_id"], unique=False)


def downgrade() -> None:

    with op.batch_alter_table("run_input_product", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_run_input_product_data_product_id"))

    op.drop_table("run_input_product")
    with op.batch_alter_table("physical_copy", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_physical_copy_raw_data_package_id"))
        batch_op.drop_index(batch_op.f("ix_physical_copy_data_product_id"))
        batch_op.drop_index(batch_op.f("ix_physical_copy_data_location_id"))

    op.drop_table("physical_copy")
    with op.batch_alter_table("run_status_transition", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_run_status_transition_executed_reduction_step_id"))

    op.drop_table("run_status_transition")
    with op.batch_alter_table("run_input_package", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_run_input_package_raw_data_package_id"))

    op.drop_table("run_input_package")
    with op.batch_alter_table("data_product", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_data_product_superseded_by_id"))
        batch_op.drop_index("ix_data_product_step_key")

    op.drop_table("data_product")
    op.drop_table("reduction_step_dependency")
    with op.batch_alter_table("executed_reduction_step", schema=None) as batch_op:
        batch_op.drop_index(
            "uq_executed_reduction_step_one_active",
            postgresql_where=sa.text("status NOT IN ('completed', 'failed', 'cancelled')"),
            sqlite_where=sa.text("status NOT IN ('completed', 'failed', 'cancelled')"),
        )
        batch_op.drop_index("ix_executed_reduction_step_step_key")
        batch_op.drop_index(batch_op.f("ix_executed_reduction_step_input_fingerprint"))
        batch_op.drop_index(batch_op.f("ix_executed_reduction_step_dagster_run_id"))

    op.drop_table("executed_reduction_step")
    op.drop_table("staging_job_package")
    op.drop_table("reduction_step")
    op.drop_table("raw_data_file")
    with op.batch_alter_table("raw_data_package", schema=None) as batch_op:
        batch_op.drop_index("ix_raw_data_package_updated_at_id")
        batch_op.drop_index(batch_op.f("ix_raw_data_package_state"))
        batch_op.drop_index(batch_op.f("ix_raw_data_package_instrument_module_id"))
        batch_op.drop_index(batch_op.f("ix_raw_data_package_executed_obs_unit_id"))

    op.drop_table("raw_data_package")
    with op.batch_alter_table("pipeline", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_pipeline_processing_location_id"))

    op.drop_table("pipeline")
    op.drop_table("staging_job")
    with op.batch_alter_table("executed_obs_unit", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_executed_obs_unit_obs_unit_id"))

    op.drop_table("executed_obs_unit")
    op.drop_table("data_grouping")
    op.drop_table("reduction_software_version")
    op.drop_table("obs_unit")
    op.drop_table("instrument_module")
    op.drop_table("data_location")
    op.drop_table("source")
    op.drop_table("site")
    op.drop_table("reduction_step_config")
    op.drop_table("reduction_software")
    op.drop_table("observing_program")
    op.drop_table("instrument")
    op.drop_table("grouping_preset")
