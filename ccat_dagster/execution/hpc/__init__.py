"""HPC backends: run one command per job on a compute resource and report its state.

`base` is the interface (HpcBackend, JobSpec, JobInfo, ...); `local` runs jobs as subprocesses on
this machine, `slurm` submits them to a Slurm cluster. Nothing here knows Dagster or containers.
"""

from ccat_dagster.execution.hpc.base import (
    HpcBackend,
    HpcError,
    InvalidJobSpecError,
    JobInfo,
    JobResources,
    JobSpec,
    JobState,
    JobSubmissionError,
    SchedulerCommandError,
    UnknownJobError,
)
from ccat_dagster.execution.hpc.local import LocalBackend
from ccat_dagster.execution.hpc.slurm import SlurmBackend

__all__ = [
    "HpcBackend",
    "HpcError",
    "InvalidJobSpecError",
    "JobInfo",
    "JobResources",
    "JobSpec",
    "JobState",
    "JobSubmissionError",
    "LocalBackend",
    "SchedulerCommandError",
    "SlurmBackend",
    "UnknownJobError",
]
