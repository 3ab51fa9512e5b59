"""The interface every HPC backend implements, and the value types it speaks.

A backend runs one command per job with given resources and environment and answers, for any job id
it handed out, in which state the job is. It knows nothing of Dagster, container runtimes or ops-db (it shares
only ops-db's plain ``FailureKind`` enum, to say why a job failed): the caller builds the command (e.g. an
`apptainer exec ...` argument list) and records the outcome. A backend that starts containers itself
(Kubernetes) can instead be given the job's image and mounts (``JobSpec.container``); the command is then the
process inside that image.

Memory is counted in GiB throughout (`memory_gb`, `peak_memory_gb`), as Slurm's `--mem=<n>G` does.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from ccat_dagster.errors import CcatError
from ccat_dagster.execution.hpc.exit_codes import describe_exit_code
from ccat_dagster.opsdb.enums import FailureKind

__all__ = [
    "HpcBackend",
    "HpcError",
    "InvalidJobSpecError",
    "JobContainer",
    "JobInfo",
    "JobMount",
    "JobResources",
    "JobSpec",
    "JobState",
    "JobSubmissionError",
    "SchedulerCommandError",
    "UnknownJobError",
    "describe_exit_code",
    "read_log_tail",
]

# Job names end up in scheduler options, file names and process titles: keep them boring.
JOB_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
ENV_NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class HpcError(CcatError):
    """Base class of every error an HPC backend raises."""


class JobSubmissionError(HpcError):
    """The scheduler refused the job (or could not be asked); nothing is left running for it."""


class InvalidJobSpecError(JobSubmissionError, ValueError):
    """A JobSpec / JobResources value cannot be submitted as given (bad name, resource or path)."""


class UnknownJobError(HpcError):
    """The backend has no record of these job ids (never submitted here, or purged since)."""

    def __init__(self, message: str, *, job_ids: Sequence[str], known: dict[str, JobInfo] | None = None) -> None:
        super().__init__(message)
        self.job_ids: tuple[str, ...] = tuple(job_ids)
        self.known = known
        """The answer about the other asked jobs, when the backend has it (then nobody asks again)."""


class SchedulerCommandError(HpcError):
    """A scheduler command (squeue, sacct, ...) failed in a way that says nothing about the job."""

    def __init__(self, message: str, *, command: Sequence[str], returncode: int | None, stderr: str) -> None:
        super().__init__(message)
        self.command: tuple[str, ...] = tuple(command)
        self.returncode = returncode
        self.stderr = stderr


@dataclass(frozen=True)
class JobResources:
    """What one job asks the scheduler for. `memory_gb` is GiB for the whole job."""

    cpu: int = 1
    memory_gb: float = 2.0
    time_hours: float = 1.0
    gpus: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.cpu, bool) or not isinstance(self.cpu, int) or self.cpu < 1:
            raise InvalidJobSpecError(f"JobResources.cpu={self.cpu!r}: must be an integer >= 1")
        if isinstance(self.gpus, bool) or not isinstance(self.gpus, int) or self.gpus < 0:
            raise InvalidJobSpecError(f"JobResources.gpus={self.gpus!r}: must be an integer >= 0")
        if not self.memory_gb > 0:
            raise InvalidJobSpecError(f"JobResources.memory_gb={self.memory_gb!r}: must be > 0 (GiB)")
        if not self.time_hours > 0:
            raise InvalidJobSpecError(f"JobResources.time_hours={self.time_hours!r}: must be > 0 (hours)")

    @property
    def time_limit_seconds(self) -> int:
        """The wall-time limit in whole seconds (rounded up, at least 1)."""
        # round() first so 0.1 h is 360 s, not 361 s from a float tail.
        return max(1, math.ceil(round(self.time_hours * 3600, 6)))


@dataclass(frozen=True)
class JobMount:
    """A host directory or file (absolute) that the job's container sees at ``container`` (absolute)."""

    host: Path
    container: str
    read_only: bool


@dataclass(frozen=True)
class JobContainer:
    """The image a job runs in when the backend starts the container itself (``CONTAINER_RUNTIME=oci``).

    ``image`` is a registry reference pinned by digest (``registry/repository@sha256:…``); the JobSpec's
    ``command`` is the entrypoint inside it and its ``env`` the container's environment; ``mounts`` are all
    the container sees of the host's files, ``workdir`` its working directory. Everything else of the image's
    file system is read-only, with an empty writable ``/tmp``.
    """

    image: str
    mounts: tuple[JobMount, ...]
    workdir: str

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[^\s@]+@sha256:[0-9a-f]{64}", self.image):
            raise InvalidJobSpecError(
                f"JobContainer.image={self.image!r}: must be pinned by digest (registry/repository@sha256:<64 hex>)"
            )
        targets = [mount.container for mount in self.mounts]
        if len(set(targets)) != len(targets):
            raise InvalidJobSpecError(f"JobContainer.mounts: several mounts target one path ({targets!r})")


@dataclass(frozen=True)
class JobSpec:
    """One job: an argument list (never a shell string), its resources and its complete environment.

    `env` is the job's whole environment (backends add only PATH when `env` has none); `log_dir` is a
    directory owned by this job (one per attempt) where the backend writes its stdout/stderr files.
    `pre_walltime_signal_seconds`: how long before the time limit the payload gets SIGTERM, so it can
    write what it has (Slurm `--signal=B:TERM@<s>`; backends clamp it to half the time limit).
    """

    command: list[str]
    resources: JobResources
    env: dict[str, str]
    job_name: str
    log_dir: Path
    workdir: Path | None = None
    pre_walltime_signal_seconds: int = 120
    container: JobContainer | None = None

    def __post_init__(self) -> None:
        if (
            not isinstance(self.command, list | tuple)
            or not self.command
            or not all(isinstance(arg, str) for arg in self.command)
        ):
            raise InvalidJobSpecError(
                f"JobSpec.command={self.command!r}: must be a non-empty list of strings (an argument list)"
            )
        if any("\0" in arg for arg in self.command):
            raise InvalidJobSpecError(f"JobSpec.command={self.command!r}: arguments cannot contain NUL bytes")
        if not isinstance(self.job_name, str) or not JOB_NAME_PATTERN.fullmatch(self.job_name):
            raise InvalidJobSpecError(
                f"JobSpec.job_name={self.job_name!r}: use 1-128 characters from A-Z a-z 0-9 _ . - "
                "starting with a letter or digit"
            )
        for name, value in self.env.items():
            if not isinstance(name, str) or not ENV_NAME_PATTERN.fullmatch(name):
                raise InvalidJobSpecError(
                    f"JobSpec.env name {name!r}: environment variable names must match [A-Za-z_][A-Za-z0-9_]*"
                )
            if not isinstance(value, str) or "\0" in value:
                raise InvalidJobSpecError(f"JobSpec.env[{name!r}]={value!r}: values must be strings without NUL bytes")
        if self.pre_walltime_signal_seconds < 0:
            raise InvalidJobSpecError(
                f"JobSpec.pre_walltime_signal_seconds={self.pre_walltime_signal_seconds!r}: must be >= 0"
            )


class JobState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL_STATES = frozenset({JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED})


@dataclass(frozen=True)
class JobInfo:
    """What a backend knows about one job right now.

    `exit_code` follows the shell convention: 128 + N when the payload was killed by signal N (so 137
    is SIGKILL, which is also how the kernel's or the scheduler's out-of-memory killer shows up).
    `reason` says why a job is not simply running or completed: e.g. "TIMEOUT", "OUT_OF_MEMORY",
    "killed by signal 9", a scheduler pending reason such as "Resources".
    """

    job_id: str
    state: JobState
    exit_code: int | None = None
    wall_time_seconds: float | None = None
    cpu_hours: float | None = None
    peak_memory_gb: float | None = None
    reason: str | None = None
    failure_kind: FailureKind | None = None
    """Set by the backend from its own evidence (scheduler state, pod reason, wait status) for a job that did
    not complete; None while the job is not terminal or when it completed."""
    deferred: bool = False
    """The backend knows more is to be asked about this job but the poll's scheduler calls did not allow it
    (``status_within``): the state is the last one known, and the next poll needs one call more."""

    @property
    def is_terminal(self) -> bool:
        """True once the job can no longer change state (completed, failed or cancelled)."""
        return self.state in TERMINAL_STATES

    @property
    def out_of_memory(self) -> bool:
        """True when the job was (most likely) killed for exceeding its memory."""
        return self.failure_kind is FailureKind.OOM or self.reason == "OUT_OF_MEMORY"


def read_log_tail(paths: Sequence[Path], *, tail_lines: int) -> str:
    """The last `tail_lines` lines of each existing file, each under a `==> name <==` header."""
    if tail_lines < 0:
        raise ValueError(f"tail_lines={tail_lines}: must be >= 0")
    parts: list[str] = []
    for path in paths:
        if not path.is_file():
            continue
        lines = _tail(path, tail_lines)
        parts.append(f"==> {path.name} <==\n" + "".join(lines))
    return "\n".join(parts)


def _tail(path: Path, count: int) -> list[str]:
    if count == 0:
        return []
    # Read backwards in blocks so a multi-GB log does not get loaded whole.
    block = 64 * 1024
    with path.open("rb") as handle:
        handle.seek(0, 2)
        end = handle.tell()
        data = b""
        while end > 0 and data.count(b"\n") <= count:
            start = max(0, end - block)
            handle.seek(start)
            data = handle.read(end - start) + data
            end = start
    lines = data.decode("utf-8", errors="replace").splitlines(keepends=True)
    return lines[-count:]


def require_host_command(spec: JobSpec, *, backend: str) -> None:
    """Refuse a JobSpec that needs the backend to start its container (``container`` set): this one cannot."""
    if spec.container is not None:
        raise InvalidJobSpecError(
            f"job {spec.job_name!r} asks the {backend} backend to run the image {spec.container.image} itself, "
            "which only HPC_BACKEND=kubernetes does; set CONTAINER_RUNTIME=apptainer (or bubblewrap) for this backend"
        )


class HpcBackend(ABC):
    """Runs jobs on some compute resource. Every method is safe to call from a process other than
    the one that submitted the job (a restarted orchestrator re-attaches by job id)."""

    name: str
    shares_a_scheduler: bool = False
    """True when status queries load a scheduler other users share (Slurm's controller): the runner then paces
    its polls to a budget of calls per minute and shares one query among all runs of a location."""

    @property
    def scheduler_queries(self) -> int:
        """Status queries this backend has sent to a shared scheduler so far (each retry counted).

        The runner paces its polls by it (``execution.polling``); 0 for a backend whose status costs no shared
        scheduler anything (the local backend asks its own process table)."""
        return 0

    @abstractmethod
    def submit(self, spec: JobSpec) -> str:
        """Queue one job and return its id. Raises JobSubmissionError when it was not accepted."""

    def submit_many(self, specs: Sequence[JobSpec]) -> list[str]:
        """Queue several jobs; all or nothing (already queued ones are cancelled when one fails).

        Returns the ids in the order of `specs`.
        """
        job_ids: list[str] = []
        try:
            for spec in specs:
                job_ids.append(self.submit(spec))
        except HpcError:
            for job_id in job_ids:
                try:
                    self.cancel(job_id)
                except HpcError:
                    pass  # best effort: the submission error is what the caller must see
            raise
        return job_ids

    @abstractmethod
    def status_many(self, job_ids: Sequence[str]) -> dict[str, JobInfo]:
        """The state of every given job, keyed by job id, from as few scheduler queries as possible.

        Raises UnknownJobError (naming the ids) when any of them is unknown to the backend: the backend cannot
        tell a job it forgot from one never submitted to it, so the caller, which knows it submitted the id,
        records such a job as FailureKind.LOST. Raises SchedulerCommandError when the scheduler could not be
        asked (after the backend's own short retries): that says nothing about the jobs.
        """

    def status_within(self, job_ids: Sequence[str], *, max_calls: int) -> dict[str, JobInfo]:
        """``status_many`` that sends the scheduler at most ``max_calls`` status calls (``scheduler_queries``).

        What a shared scheduler's budget allows: a backend whose answer takes several calls (Slurm: squeue,
        then sacct for the jobs that left the queue) reports a job it could not settle within them as not
        finished yet, and the next poll settles it. This default makes one call, or none."""
        return self.status_many(job_ids)

    def status(self, job_id: str) -> JobInfo:
        return self.status_many([job_id])[job_id]

    @abstractmethod
    def cancel(self, job_id: str) -> None:
        """Stop the job (pending or running); it ends CANCELLED. Cancelling a finished job is a no-op."""

    @abstractmethod
    def logs(self, job_id: str, *, tail_lines: int = 50) -> str:
        """The last lines of the job's stdout and stderr."""

    def prepare_for(self, resources: JobResources) -> None:  # noqa: B027 - an optional hook, like close
        """A batch of jobs of ``resources`` is about to be staged and submitted: start what they will need, so that
        it comes up while the data is staged (the packed backend asks for its first allocation). Must not raise for
        a problem that submitting would report anyway."""

    def close(self) -> None:  # noqa: B027 - an optional hook, a no-op for backends that hold nothing
        """The batch is over: release what the backend holds for it (the packed backend's allocations)."""
