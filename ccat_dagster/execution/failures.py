"""Why an attempt failed, as a ``FailureKind``, and what a retry does about it.

``failure_kind_of`` is the one function that turns a finished job's ``JobInfo`` into a kind: the backend's own
``JobInfo.failure_kind`` when it set one (from sacct states, pod reasons, wait status), else a fallback read
from the exit code and the backend's reason; ``refine_with_log`` then turns a signal death that the job's log
shows as the scheduler's memory kill into oom. The runner adds the kinds only it can know (staging, contract,
disk_full, scheduler_unavailable, lost, cancelled).

Retry policy, one table (``RETRY``): memory grows after ``oom`` and time after ``walltime`` (by the step's
base request per retry, up to the configured caps); ``node_failure``, ``lost``, ``exit_code`` and ``signal``
are retried unchanged; ``contract``, ``cancelled``, ``staging``, ``disk_full`` and ``scheduler_unavailable``
are never retried inside a batch (a retry cannot fix them, or a job may still be running).
"""

from __future__ import annotations

import enum
import re
import subprocess
from dataclasses import dataclass, replace

from ccat_dagster.execution.hpc.base import InvalidJobSpecError, JobInfo, JobResources, JobState, SchedulerCommandError
from ccat_dagster.execution.hpc.exit_codes import SIGKILL_EXIT_CODE, describe_exit_code, signal_of
from ccat_dagster.opsdb.enums import FailureKind

K = FailureKind


class Retry(enum.Enum):
    NEVER = "never"
    UNCHANGED = "unchanged"
    MORE_MEMORY = "more memory"
    MORE_TIME = "more time"


RETRY: dict[FailureKind, Retry] = {
    K.OOM: Retry.MORE_MEMORY,
    K.WALLTIME: Retry.MORE_TIME,
    K.EXIT_CODE: Retry.UNCHANGED,
    K.SIGNAL: Retry.UNCHANGED,
    K.NODE_FAILURE: Retry.UNCHANGED,
    K.LOST: Retry.UNCHANGED,
    K.CANCELLED: Retry.NEVER,
    K.STAGING: Retry.NEVER,
    K.CONTRACT: Retry.NEVER,
    K.SCHEDULER_UNAVAILABLE: Retry.NEVER,
    K.DISK_FULL: Retry.NEVER,
}

_NODE_FAILURE_REASONS = ("NODE_FAIL", "PREEMPTED", "BOOT_FAIL")
_LOST_REASONS = ("UNKNOWN TO THE SCHEDULER", "THE MACHINE RESTARTED", "WITHOUT RECORDING AN EXIT STATUS")


def failure_kind_of(info: JobInfo) -> FailureKind:
    """The kind of a job that ended without success; the backend's own kind wins over the fallback."""
    if info.failure_kind is not None:
        return info.failure_kind
    reason = (info.reason or "").upper()
    if info.state is JobState.CANCELLED:
        return K.CANCELLED
    if info.out_of_memory or "OUT_OF_MEMORY" in reason or "OOM" in reason:
        return K.OOM
    if "TIMEOUT" in reason or "PRE-WALLTIME" in reason or "TIME LIMIT" in reason:
        return K.WALLTIME
    if any(word in reason for word in _NODE_FAILURE_REASONS):
        return K.NODE_FAILURE
    if any(words in reason for words in _LOST_REASONS):
        return K.LOST
    if info.exit_code == SIGKILL_EXIT_CODE:
        return K.OOM  # the kernel's and most schedulers' OOM killer: SIGKILL
    if signal_of(info.exit_code) is not None:
        return K.SIGNAL
    return K.EXIT_CODE


# What a scheduler's step daemon writes into the job's own log when it kills the job for its memory: Slurm's
# OverMemoryKill ("StepId=7.batch exceeded memory limit (1080520704 > 1073741824), being killed", "Exceeded job
# memory limit") and its cgroup plugin ("Detected 1 oom_kill event in StepId=7.batch").
_MEMORY_KILL_IN_LOG = re.compile(r"exceeded (?:job |step )?memory limit|detected \d+ oom[-_]kill event", re.IGNORECASE)


def refine_with_log(kind: FailureKind, log_tail: str) -> FailureKind:
    """``kind`` corrected by the job's log: a signal or exit-code death that the scheduler's step daemon logged as a
    memory kill is oom. Accounting alone cannot always tell (its memory samples may all be below the request)."""
    if kind in (K.SIGNAL, K.EXIT_CODE) and _MEMORY_KILL_IN_LOG.search(log_tail or ""):
        return K.OOM
    return kind


def failure_message(info: JobInfo, kind: FailureKind, log_tail: str = "") -> str:
    """The attempt's error text: what happened in words, then the tail of the job's log."""
    code = info.exit_code
    if kind is K.OOM:
        head = f"job killed (exit code {code}): out of memory or killed by signal 9"
        head += f" ({info.reason})" if info.reason else ""  # whose memory limit, and by how much, where known
    elif kind is K.WALLTIME:
        head = f"job exceeded its time limit (exit code {code})"
    elif kind is K.NODE_FAILURE:
        head = f"job ended by a node failure or preemption ({info.reason or 'no reason given'})"
    elif kind is K.LOST:
        head = f"job lost: {info.reason or 'the scheduler no longer knows it'}"
    else:
        described = describe_exit_code(code)
        shown = info.reason if info.reason and info.reason not in (f"exit code {code}", described) else None
        # "exit code 137 (killed by SIGKILL: killed, or out of memory)": the words say what the number means.
        head = f"job failed with {described or f'exit code {code}'}" + (f" ({shown})" if shown else "")
    return head + (f"\n--- last log lines ---\n{log_tail.rstrip()}" if log_tail.strip() else "")


@dataclass(frozen=True)
class ResourceCaps:
    """The most a retry may ask for, whatever the escalation: a step cannot grow without bound."""

    max_memory_gb: float = 512.0
    max_time_hours: float = 48.0


def retry_resources(
    previous: JobResources, kind: FailureKind, *, base: JobResources, caps: ResourceCaps
) -> JobResources | None:
    """The resources of the next attempt after a failure of ``kind``, or None when it must not be retried.

    An escalation adds the step's base request once per retry (1×, 2×, 3× …), capped; a retry that would ask
    for no more than the previous attempt already had (the cap reached) is not made.
    """
    policy = RETRY[kind]
    if policy is Retry.NEVER:
        return None
    if policy is Retry.MORE_MEMORY:
        memory = min(previous.memory_gb + base.memory_gb, max(caps.max_memory_gb, base.memory_gb))
        return replace(previous, memory_gb=memory) if memory > previous.memory_gb else None
    if policy is Retry.MORE_TIME:
        hours = min(previous.time_hours + base.time_hours, max(caps.max_time_hours, base.time_hours))
        return replace(previous, time_hours=hours) if hours > previous.time_hours else None
    return previous


def submission_failure_kind(error: BaseException) -> FailureKind:
    """A scheduler that could not be asked is scheduler_unavailable; a job it refused is contract (not retried)."""
    if isinstance(error, InvalidJobSpecError):
        return FailureKind.CONTRACT
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, SchedulerCommandError | TimeoutError | subprocess.TimeoutExpired):
            return FailureKind.SCHEDULER_UNAVAILABLE
        cause = cause.__cause__
    return FailureKind.CONTRACT


def describe_resource_change(before: JobResources, after: JobResources) -> str:
    if after.memory_gb != before.memory_gb:
        return f" with {after.memory_gb:g} GiB memory (was {before.memory_gb:g})"
    if after.time_hours != before.time_hours:
        return f" with {after.time_hours * 60:g} min time limit (was {before.time_hours * 60:g})"
    return " unchanged"
