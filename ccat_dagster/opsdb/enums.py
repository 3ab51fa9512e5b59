"""Enumerations of the ops-db models, named as in CCAT's ``ccat_ops_db``; stored as lower-case strings."""

from __future__ import annotations

import enum


class PackageState(enum.StrEnum):
    WAITING = "waiting"
    TRANSFERRING = "transferring"
    ARCHIVED = "archived"
    FAILED = "failed"


class ObsStatus(enum.StrEnum):
    """Status of an ExecutedObsUnit (the generic ops-db ``Status``)."""

    PENDING = "pending"
    SCHEDULED = "scheduled"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"


class SourceKind(enum.StrEnum):
    FIXED = "fixed"
    SOLAR_SYSTEM = "solar_system"
    CONSTANT_ELEVATION = "constant_elevation"


class LocationType(enum.StrEnum):
    SOURCE = "source"
    BUFFER = "buffer"
    LONG_TERM_ARCHIVE = "long_term_archive"
    PROCESSING = "processing"


class StorageType(enum.StrEnum):
    DISK = "disk"
    S3 = "s3"
    TAPE = "tape"


class PhysicalCopyStatus(enum.StrEnum):
    PRESENT = "present"
    STAGED = "staged"
    DELETION_SCHEDULED = "deletion_scheduled"
    DELETION_IN_PROGRESS = "deletion_in_progress"
    DELETION_POSSIBLE = "deletion_possible"
    DELETED = "deleted"
    DELETION_FAILED = "deletion_failed"


class StagingJobStatus(enum.StrEnum):
    PENDING = "pending"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"


class TriggerType(enum.StrEnum):
    CONTINUOUS = "continuous"
    CRON = "cron"
    MANUAL = "manual"


class VersionPolicy(enum.StrEnum):
    EXACT = "exact"
    COMPATIBLE = "compatible"
    LATEST = "latest"


class RunStatus(enum.StrEnum):
    PENDING = "pending"
    STAGING_DATA = "staging_data"
    SUBMITTED = "submitted"
    RUNNING = "running"
    COLLECTING_RESULTS = "collecting_results"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_RUN_STATUSES


TERMINAL_RUN_STATUSES = frozenset({RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED})


class DataProductType(enum.StrEnum):
    SCIENCE = "science"
    QA_METRIC = "qa_metric"
    PLOT = "plot"
    STATISTICS = "statistics"
    LOG = "log"
    INTERMEDIATE = "intermediate"
