"""HPC backends: run one command per job on a compute resource and report its state.

`base` is the interface (HpcBackend, JobSpec, JobInfo, ...); `local` runs jobs as subprocesses on
this machine, `slurm` submits them to a Slurm cluster. Nothing here knows Dagster or containers.
"""

from __future__ import annotations

import importlib

# Loaded on first use (PEP 562): the local backend's job wrapper lives in this package and starts once per
# job, so importing the package must not pull in both backends (tens of ms per job on a busy host).
_EXPORTS = {
    "HpcBackend": "base",
    "HpcError": "base",
    "InvalidJobSpecError": "base",
    "JobInfo": "base",
    "JobResources": "base",
    "JobSpec": "base",
    "JobState": "base",
    "JobSubmissionError": "base",
    "SchedulerCommandError": "base",
    "UnknownJobError": "base",
    "LocalBackend": "local",
    "SlurmBackend": "slurm",
}


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


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
