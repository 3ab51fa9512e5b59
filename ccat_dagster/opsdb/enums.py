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


class FailureKind(enum.StrEnum):
    """Why an attempt failed, as a type: what a retry does follows from it, never from the message text."""

    OOM = "oom"
    """Killed for exceeding its memory (sacct OUT_OF_MEMORY, pod OOMKilled, the kernel's OOM killer)."""
    WALLTIME = "walltime"
    """Ended by its time limit (sacct TIMEOUT, the pre-walltime signal, pod DeadlineExceeded)."""
    EXIT_CODE = "exit_code"
    """The payload exited non-zero by itself."""
    SIGNAL = "signal"
    """The payload was killed by a signal nobody in ccat-dagster sent (not OOM, not walltime)."""
    CANCELLED = "cancelled"
    """A person or Dagster's run termination cancelled it, or it was scancelled from outside."""
    NODE_FAILURE = "node_failure"
    """The node (or pod) it ran on failed or it was preempted: nothing wrong with the attempt itself."""
    LOST = "lost"
    """The scheduler forgot the job, or the orchestrator lost track of it."""
    STAGING = "staging"
    """Its inputs could not be staged."""
    CONTRACT = "contract"
    """Its outputs were refused by the container contract (writes outside, symlinks, too many products)."""
    SCHEDULER_UNAVAILABLE = "scheduler_unavailable"
    """The scheduler could not be asked for longer than the configured tolerance."""
    DISK_FULL = "disk_full"
    """A filesystem it needed was full (ENOSPC)."""


class DataProductType(enum.StrEnum):
    SCIENCE = "science"
    QA_METRIC = "qa_metric"
    PLOT = "plot"
    STATISTICS = "statistics"
    LOG = "log"
    INTERMEDIATE = "intermediate"


class StepRetention(enum.StrEnum):
    """What the retention cleanup may do with a step's intermediate products (docs/provenance.md).

    ``keep``: never delete them (unless superseded). ``recreate``: delete them after the retention period; a
    consumer that needs one again first re-runs the sub-group that produced it. ``auto`` (default): ``keep``
    for a step that a fan-in step (a consumer whose sub-groups span several of its sub-groups) reads in a
    CONTINUOUS or CRON pipeline, ``recreate`` otherwise.
    """

    AUTO = "auto"
    KEEP = "keep"
    RECREATE = "recreate"
