"""The ops-db models this project owns and uses, as SQLAlchemy 2.0 typed declarative classes.

Names follow CCAT's ``ccat_ops_db.models`` so that package can replace this module. Enumerations are stored as
lower-case strings (VARCHAR), never as native database enums, so new members need no type migration.
"""

from __future__ import annotations

import datetime as dt
import enum
import uuid
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
    Uuid,
    text,
)
from sqlalchemy import Enum as SqlEnum
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from ccat_dagster.opsdb.enums import (
    DataProductType,
    FailureKind,
    LocationType,
    ObsStatus,
    PackageState,
    PhysicalCopyStatus,
    RunStatus,
    SourceKind,
    StagingJobStatus,
    StepRetention,
    StorageType,
    TriggerType,
    VersionPolicy,
)

# Deterministic constraint names, so Alembic migrations are identical on PostgreSQL and SQLite.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

JsonType = JSON().with_variant(JSONB(), "postgresql")


class UtcDateTime(TypeDecorator[dt.datetime]):
    """A timezone-aware UTC timestamp on every dialect (SQLite stores no offset: re-attach UTC on read)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r} given to ops-db: use an aware UTC datetime")
        value = value.astimezone(dt.UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def str_enum(enum_cls: type[enum.Enum]) -> SqlEnum:
    return SqlEnum(
        enum_cls,
        native_enum=False,
        create_constraint=False,
        length=32,
        values_callable=lambda members: [m.value for m in members],
        validate_strings=True,
    )


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dt.datetime: UtcDateTime(), dict[str, Any]: JsonType, list[Any]: JsonType}


class TimestampMixin:
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


# ---------------------------------------------------------------------------------------------- observatory


class Instrument(Base):
    __tablename__ = "instrument"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    available: Mapped[bool] = mapped_column(Boolean, default=True)
    modules: Mapped[list[InstrumentModule]] = relationship(back_populates="instrument")


class InstrumentModule(Base):
    __tablename__ = "instrument_module"
    __table_args__ = (UniqueConstraint("instrument_id", "name"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    instrument_id: Mapped[int] = mapped_column(ForeignKey("instrument.id"))
    instrument: Mapped[Instrument] = relationship(back_populates="modules")


class Source(Base):
    __tablename__ = "source"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    kind: Mapped[SourceKind] = mapped_column(str_enum(SourceKind))


class ObservingProgram(Base):
    __tablename__ = "observing_program"
    id: Mapped[int] = mapped_column(primary_key=True)
    short_name: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(256), default="")


class ObsUnit(Base):
    __tablename__ = "obs_unit"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    source_id: Mapped[int] = mapped_column(ForeignKey("source.id"))
    observing_program_id: Mapped[int] = mapped_column(ForeignKey("observing_program.id"))
    line_id: Mapped[str | None] = mapped_column(String(64))
    source: Mapped[Source] = relationship()
    observing_program: Mapped[ObservingProgram] = relationship()


class ExecutedObsUnit(Base):
    __tablename__ = "executed_obs_unit"
    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    obs_unit_id: Mapped[int] = mapped_column(ForeignKey("obs_unit.id"), index=True)
    start_time: Mapped[dt.datetime]
    end_time: Mapped[dt.datetime | None]
    status: Mapped[ObsStatus] = mapped_column(str_enum(ObsStatus), default=ObsStatus.COMPLETED)
    obs_unit: Mapped[ObsUnit] = relationship()


# ---------------------------------------------------------------------------------------------- data side


class Site(Base):
    __tablename__ = "site"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    short_name: Mapped[str] = mapped_column(String(32), unique=True)
    location: Mapped[str] = mapped_column(String(256), default="")


class DataLocation(Base):
    __tablename__ = "data_location"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    site_id: Mapped[int] = mapped_column(ForeignKey("site.id"))
    location_type: Mapped[LocationType] = mapped_column(str_enum(LocationType))
    storage_type: Mapped[StorageType] = mapped_column(str_enum(StorageType))
    priority: Mapped[int] = mapped_column(default=0)
    root_path: Mapped[str] = mapped_column(String(1024))
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    site: Mapped[Site] = relationship()


class RawDataPackage(TimestampMixin, Base):
    __tablename__ = "raw_data_package"
    # The continuous sensor's change watermark reads (updated_at, id): keep that scan indexed.
    __table_args__ = (Index("ix_raw_data_package_updated_at_id", "updated_at", "id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(256), unique=True)
    executed_obs_unit_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("executed_obs_unit.id"), index=True)
    instrument_module_id: Mapped[int] = mapped_column(ForeignKey("instrument_module.id"), index=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    checksum: Mapped[str] = mapped_column(String(64), default="")
    state: Mapped[PackageState] = mapped_column(str_enum(PackageState), default=PackageState.WAITING, index=True)
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", default=dict)
    invalidated_reason: Mapped[str | None] = mapped_column(Text)
    executed_obs_unit: Mapped[ExecutedObsUnit] = relationship()
    instrument_module: Mapped[InstrumentModule] = relationship()
    files: Mapped[list[RawDataFile]] = relationship(back_populates="package", order_by="RawDataFile.relative_path")


class RawDataFile(Base):
    __tablename__ = "raw_data_file"
    __table_args__ = (UniqueConstraint("raw_data_package_id", "relative_path"),)
    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    raw_data_package_id: Mapped[int] = mapped_column(ForeignKey("raw_data_package.id", ondelete="CASCADE"))
    relative_path: Mapped[str] = mapped_column(String(1024))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    checksum: Mapped[str] = mapped_column(String(64))
    package: Mapped[RawDataPackage] = relationship(back_populates="files")


class PhysicalCopy(TimestampMixin, Base):
    """Where one raw package or data product physically exists; exactly one of the two is set."""

    __tablename__ = "physical_copy"
    __table_args__ = (
        CheckConstraint("(raw_data_package_id IS NULL) <> (data_product_id IS NULL)", name="exactly_one_subject"),
        UniqueConstraint("data_location_id", "raw_data_package_id"),
        UniqueConstraint("data_location_id", "data_product_id"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    data_location_id: Mapped[int] = mapped_column(ForeignKey("data_location.id"), index=True)
    raw_data_package_id: Mapped[int | None] = mapped_column(ForeignKey("raw_data_package.id"), index=True)
    data_product_id: Mapped[int | None] = mapped_column(ForeignKey("data_product.id"), index=True)
    path: Mapped[str] = mapped_column(String(2048))
    status: Mapped[PhysicalCopyStatus] = mapped_column(str_enum(PhysicalCopyStatus))
    checksum: Mapped[str | None] = mapped_column(String(64))
    status_reason: Mapped[str | None] = mapped_column(Text)
    location: Mapped[DataLocation] = relationship()
    raw_data_package: Mapped[RawDataPackage | None] = relationship()
    data_product: Mapped[DataProduct | None] = relationship(back_populates="physical_copies")


staging_job_package = Table(
    "staging_job_package",
    Base.metadata,
    Column("staging_job_id", ForeignKey("staging_job.id", ondelete="CASCADE"), primary_key=True),
    Column("raw_data_package_id", ForeignKey("raw_data_package.id"), primary_key=True),
)


class StagingJob(TimestampMixin, Base):
    __tablename__ = "staging_job"
    id: Mapped[int] = mapped_column(primary_key=True)
    target_location_id: Mapped[int] = mapped_column(ForeignKey("data_location.id"))
    status: Mapped[StagingJobStatus] = mapped_column(str_enum(StagingJobStatus), default=StagingJobStatus.PENDING)
    retry_count: Mapped[int] = mapped_column(default=0)
    error: Mapped[str | None] = mapped_column(Text)
    packages: Mapped[list[RawDataPackage]] = relationship(secondary=staging_job_package)
    target_location: Mapped[DataLocation] = relationship()


# ---------------------------------------------------------------------------------------------- pipelines


class DataGrouping(TimestampMixin, Base):
    __tablename__ = "data_grouping"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    filter_rules: Mapped[list[Any]] = mapped_column(default=list)
    instrument_module_id: Mapped[int | None] = mapped_column(ForeignKey("instrument_module.id"))
    instrument_module: Mapped[InstrumentModule | None] = relationship()


class GroupingPreset(Base):
    """A named, stored template of filter rules and group_by, usable from pipeline YAML by name."""

    __tablename__ = "grouping_preset"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    filter_rules: Mapped[list[Any]] = mapped_column(default=list)
    group_by: Mapped[list[Any]] = mapped_column(default=list)


class ReductionSoftware(Base):
    __tablename__ = "reduction_software"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    versions: Mapped[list[ReductionSoftwareVersion]] = relationship(back_populates="software")


class ReductionSoftwareVersion(Base):
    __tablename__ = "reduction_software_version"
    __table_args__ = (UniqueConstraint("reduction_software_id", "version"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    reduction_software_id: Mapped[int] = mapped_column(ForeignKey("reduction_software.id"))
    version: Mapped[str] = mapped_column(String(64))
    image_ref: Mapped[str] = mapped_column(String(1024))
    image_digest: Mapped[str | None] = mapped_column(String(128))
    entrypoint: Mapped[list[Any]] = mapped_column(default=list)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    software: Mapped[ReductionSoftware] = relationship(back_populates="versions")


class ReductionSoftwareBuild(Base):
    """One image build of a software version: the digest its image had when first used (build 1), and each
    change since that was registered as a new build (``IMAGE_CHANGE_POLICY=new_build``). The newest build is
    the one every submit must match (``execution.images``)."""

    __tablename__ = "reduction_software_build"
    __table_args__ = (UniqueConstraint("reduction_software_version_id", "build"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    reduction_software_version_id: Mapped[int] = mapped_column(
        ForeignKey("reduction_software_version.id", ondelete="CASCADE"), index=True
    )
    build: Mapped[int]
    image_digest: Mapped[str] = mapped_column(String(128))
    image_kind: Mapped[str] = mapped_column(String(32))
    image_path: Mapped[str] = mapped_column(String(2048))
    recorded_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    software_version: Mapped[ReductionSoftwareVersion] = relationship()


class ReductionStepConfig(Base):
    """Step parameters. Rows are immutable: a changed config is a new row; old attempts keep theirs."""

    __tablename__ = "reduction_step_config"
    __table_args__ = (UniqueConstraint("name", "parameters_sha256"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(256))
    parameters: Mapped[dict[str, Any]] = mapped_column(default=dict)
    parameters_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Pipeline(TimestampMixin, Base):
    __tablename__ = "pipeline"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    data_grouping_id: Mapped[int] = mapped_column(ForeignKey("data_grouping.id"))
    processing_location_id: Mapped[int] = mapped_column(ForeignKey("data_location.id"), index=True)
    trigger_type: Mapped[TriggerType] = mapped_column(str_enum(TriggerType), default=TriggerType.MANUAL)
    trigger_config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    priority: Mapped[int] = mapped_column(default=0)
    spec_sha256: Mapped[str] = mapped_column(String(64), default="")
    data_grouping: Mapped[DataGrouping] = relationship()
    processing_location: Mapped[DataLocation] = relationship()
    steps: Mapped[list[ReductionStep]] = relationship(
        back_populates="pipeline", order_by="ReductionStep.position", cascade="all, delete-orphan"
    )


reduction_step_dependency = Table(
    "reduction_step_dependency",
    Base.metadata,
    Column("step_id", ForeignKey("reduction_step.id", ondelete="CASCADE"), primary_key=True),
    Column("upstream_step_id", ForeignKey("reduction_step.id", ondelete="CASCADE"), primary_key=True),
    CheckConstraint("step_id <> upstream_step_id", name="no_self_dependency"),
)


class ReductionStep(Base):
    __tablename__ = "reduction_step"
    __table_args__ = (UniqueConstraint("pipeline_id", "name"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    pipeline_id: Mapped[int] = mapped_column(ForeignKey("pipeline.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(64))
    description: Mapped[str] = mapped_column(Text, default="")
    position: Mapped[int] = mapped_column(default=0)
    group_by: Mapped[list[Any]] = mapped_column(default=list)
    cooldown_seconds: Mapped[int] = mapped_column(default=0)
    reduction_software_id: Mapped[int] = mapped_column(ForeignKey("reduction_software.id"))
    version_policy: Mapped[VersionPolicy] = mapped_column(str_enum(VersionPolicy), default=VersionPolicy.EXACT)
    version_spec: Mapped[str] = mapped_column(String(64))
    reduction_step_config_id: Mapped[int] = mapped_column(ForeignKey("reduction_step_config.id"))
    resources: Mapped[dict[str, Any]] = mapped_column(default=dict)
    max_retries: Mapped[int] = mapped_column(default=0)
    retention: Mapped[StepRetention] = mapped_column(
        str_enum(StepRetention), default=StepRetention.AUTO, server_default=StepRetention.AUTO.value
    )
    # Final steps: metric → {min, max, severity, description} on the qa/*.json reports (execution.qa).
    qa_checks: Mapped[dict[str, Any]] = mapped_column(default=dict, server_default="{}")
    pipeline: Mapped[Pipeline] = relationship(back_populates="steps")
    software: Mapped[ReductionSoftware] = relationship()
    config: Mapped[ReductionStepConfig] = relationship()
    depends_on: Mapped[list[ReductionStep]] = relationship(
        secondary=reduction_step_dependency,
        primaryjoin=lambda: ReductionStep.id == reduction_step_dependency.c.step_id,
        secondaryjoin=lambda: ReductionStep.id == reduction_step_dependency.c.upstream_step_id,
        order_by=lambda: ReductionStep.position,
    )


run_input_package = Table(
    "run_input_package",
    Base.metadata,
    Column(
        "executed_reduction_step_id",
        ForeignKey("executed_reduction_step.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("raw_data_package_id", ForeignKey("raw_data_package.id"), primary_key=True, index=True),
)

run_input_product = Table(
    "run_input_product",
    Base.metadata,
    Column(
        "executed_reduction_step_id",
        ForeignKey("executed_reduction_step.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("data_product_id", ForeignKey("data_product.id"), primary_key=True, index=True),
)

# Lineage closure (derived, never edited by hand): written by ``execution.registration.record_input_lineage``
# in the same transaction as the two link tables above, and backfilled by migration 0002. With them an
# ancestor or descendant query is an index lookup instead of a recursive walk (docs/provenance.md).
run_ancestor_run = Table(
    "run_ancestor_run",
    Base.metadata,
    # Every attempt that generated a product this attempt used, directly or through other attempts.
    Column(
        "executed_reduction_step_id",
        ForeignKey("executed_reduction_step.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("ancestor_run_id", ForeignKey("executed_reduction_step.id"), primary_key=True, index=True),
)

run_ancestor_package = Table(
    "run_ancestor_package",
    Base.metadata,
    # Every raw data package this attempt derives from: its own run_input_package rows and those of all its
    # ancestor attempts.
    Column(
        "executed_reduction_step_id",
        ForeignKey("executed_reduction_step.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("raw_data_package_id", ForeignKey("raw_data_package.id"), primary_key=True, index=True),
)

_NON_TERMINAL = "status NOT IN ('completed', 'failed', 'cancelled')"


class ExecutedReductionStep(Base):
    """One attempt of one step for one sub-group. A retry is a new row with ``attempt`` + 1."""

    __tablename__ = "executed_reduction_step"
    __table_args__ = (
        UniqueConstraint("reduction_step_id", "sub_group_key", "attempt"),
        # At most one attempt in flight per (step, sub-group): the database, not the code, guarantees it.
        Index(
            "uq_executed_reduction_step_one_active",
            "reduction_step_id",
            "sub_group_key",
            unique=True,
            postgresql_where=text(_NON_TERMINAL),
            sqlite_where=text(_NON_TERMINAL),
        ),
        Index("ix_executed_reduction_step_step_key", "reduction_step_id", "sub_group_key", "status"),
        # The API's attempt listing: newest first (id order) within a filter on step, status or sub-group, and
        # time ranges on created_at; each filter walks its index in id order and stops at the page size.
        Index("ix_executed_reduction_step_step_id", "reduction_step_id", "id"),
        Index("ix_executed_reduction_step_status_id", "status", "id"),
        Index("ix_executed_reduction_step_key_id", "sub_group_key", "id"),
        Index("ix_executed_reduction_step_created_at", "created_at"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    reduction_step_id: Mapped[int] = mapped_column(ForeignKey("reduction_step.id"))
    sub_group_key: Mapped[str] = mapped_column(String(512))
    status: Mapped[RunStatus] = mapped_column(str_enum(RunStatus), default=RunStatus.PENDING)
    attempt: Mapped[int] = mapped_column(default=1)
    retry_count: Mapped[int] = mapped_column(default=0)
    input_fingerprint: Mapped[str] = mapped_column(String(64), index=True)
    reduction_software_version_id: Mapped[int] = mapped_column(ForeignKey("reduction_software_version.id"))
    reduction_step_config_id: Mapped[int] = mapped_column(ForeignKey("reduction_step_config.id"))
    dagster_run_id: Mapped[str | None] = mapped_column(String(64), index=True)
    hpc_backend: Mapped[str | None] = mapped_column(String(32))
    hpc_job_id: Mapped[str | None] = mapped_column(String(128))
    exit_code: Mapped[int | None]
    wall_time_seconds: Mapped[float | None] = mapped_column(Float)
    cpu_hours: Mapped[float | None] = mapped_column(Float)
    peak_memory_gb: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)
    # Why it failed, as a type (what a retry does follows from it); None unless FAILED / CANCELLED.
    failure_kind: Mapped[FailureKind | None] = mapped_column(str_enum(FailureKind))
    attempt_dir: Mapped[str | None] = mapped_column(String(2048))
    image_digest: Mapped[str | None] = mapped_column(String(128))
    """The digest of the image this attempt was submitted with, checked just before the submit."""
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    started_at: Mapped[dt.datetime | None]
    finished_at: Mapped[dt.datetime | None]
    status_changed_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    step: Mapped[ReductionStep] = relationship()
    software_version: Mapped[ReductionSoftwareVersion] = relationship()
    config: Mapped[ReductionStepConfig] = relationship()
    input_packages: Mapped[list[RawDataPackage]] = relationship(secondary=run_input_package)
    input_products: Mapped[list[DataProduct]] = relationship(secondary=run_input_product)
    products: Mapped[list[DataProduct]] = relationship(
        back_populates="executed_reduction_step", foreign_keys="DataProduct.executed_reduction_step_id"
    )
    transitions: Mapped[list[RunStatusTransition]] = relationship(
        back_populates="executed_reduction_step", order_by="RunStatusTransition.id"
    )


class RunStatusTransition(Base):
    """Audit trail: every RunStatus change of an attempt, with its time."""

    __tablename__ = "run_status_transition"
    id: Mapped[int] = mapped_column(primary_key=True)
    executed_reduction_step_id: Mapped[int] = mapped_column(
        ForeignKey("executed_reduction_step.id", ondelete="CASCADE"), index=True
    )
    from_status: Mapped[RunStatus | None] = mapped_column(str_enum(RunStatus))
    to_status: Mapped[RunStatus] = mapped_column(str_enum(RunStatus))
    at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    message: Mapped[str | None] = mapped_column(Text)
    executed_reduction_step: Mapped[ExecutedReductionStep] = relationship(back_populates="transitions")


class DataProduct(Base):
    __tablename__ = "data_product"
    __table_args__ = (
        UniqueConstraint("executed_reduction_step_id", "relative_path"),
        Index("ix_data_product_step_key", "reduction_step_id", "sub_group_key"),
        # The API's product listing: newest first within a filter on product type or step.
        Index("ix_data_product_type_id", "product_type", "id"),
        Index("ix_data_product_step_id", "reduction_step_id", "id"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    executed_reduction_step_id: Mapped[int] = mapped_column(ForeignKey("executed_reduction_step.id"))
    reduction_step_id: Mapped[int] = mapped_column(ForeignKey("reduction_step.id"))
    sub_group_key: Mapped[str] = mapped_column(String(512))
    product_type: Mapped[DataProductType] = mapped_column(str_enum(DataProductType))
    relative_path: Mapped[str] = mapped_column(String(1024))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", default=dict)
    superseded_by_id: Mapped[int | None] = mapped_column(ForeignKey("data_product.id"), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    executed_reduction_step: Mapped[ExecutedReductionStep] = relationship(
        back_populates="products", foreign_keys=[executed_reduction_step_id]
    )
    step: Mapped[ReductionStep] = relationship()
    superseded_by: Mapped[DataProduct | None] = relationship(remote_side=[id])
    physical_copies: Mapped[list[PhysicalCopy]] = relationship(back_populates="data_product")


class RunLineageStep(Base):
    """Lineage aggregate of one attempt: its ancestor attempts of one step with one software version and config.

    Derived from ``run_ancestor_run`` by registration (``record_lineage_closure``) and migration 0002, never
    edited by hand. What it counts cannot change afterwards (an ancestor is COMPLETED, a terminal state, and its
    step, software version, config, sub-group and finish time are fixed), so ``lineage_summary`` reads a few rows
    instead of aggregating thousands of attempts.
    """

    __tablename__ = "run_lineage_step"
    executed_reduction_step_id: Mapped[int] = mapped_column(
        ForeignKey("executed_reduction_step.id", ondelete="CASCADE"), primary_key=True
    )
    reduction_step_id: Mapped[int] = mapped_column(ForeignKey("reduction_step.id"), primary_key=True)
    reduction_software_version_id: Mapped[int] = mapped_column(
        ForeignKey("reduction_software_version.id"), primary_key=True
    )
    reduction_step_config_id: Mapped[int] = mapped_column(ForeignKey("reduction_step_config.id"), primary_key=True)
    attempts: Mapped[int]
    # Distinct sub_group_key among these attempts.
    sub_groups: Mapped[int]
    first_finished_at: Mapped[dt.datetime | None]
    last_finished_at: Mapped[dt.datetime | None]


class RunLineageTotal(Base):
    """Lineage totals of one attempt: the upstream products its lineage used and the raw packages, bytes and
    raw files it derives from. Derived like ``RunLineageStep`` (immutable inputs: archived packages and their
    files, registered products)."""

    __tablename__ = "run_lineage_total"
    executed_reduction_step_id: Mapped[int] = mapped_column(
        ForeignKey("executed_reduction_step.id", ondelete="CASCADE"), primary_key=True
    )
    products: Mapped[int] = mapped_column(BigInteger)
    packages: Mapped[int] = mapped_column(BigInteger)
    package_bytes: Mapped[int] = mapped_column(BigInteger)
    files: Mapped[int] = mapped_column(BigInteger)


class ApiToken(Base):
    """A bearer token of the REST API (``ccat-dagster api tokens``). Only the sha256 of the secret is stored.

    The secret is 32 random bytes (``secrets.token_urlsafe``), so a plain sha256 cannot be reversed or guessed
    and a slow password hash (bcrypt, argon2) would only cost every request time; ``prefix`` (the first
    characters of the token, not secret enough to use) lets an operator tell tokens apart in listings.
    """

    __tablename__ = "api_token"
    __table_args__ = (CheckConstraint("scope IN ('read', 'write')", name="scope"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    scope: Mapped[str] = mapped_column(String(16))
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[dt.datetime | None]
    revoked_at: Mapped[dt.datetime | None]
