"""Pure parsing of what Slurm says about jobs: squeue, sacct, `scontrol show job` and the jobcomp file.

Nothing here runs a command. The argument lists for the queries are built here too, so that each
output format sits next to the parser that reads it. Tested on output recorded from a real Slurm
22.05 (tests/data/slurm/).

Slurm reports exit codes as "<status>:<signal>"; a non-zero signal becomes 128 + signal, the shell
convention (0:9 -> 137). sacct (not scontrol or the jobcomp file) prints a status of 128 and above less 128:
a payload's `exit 143` reads "15:0" there. Memory is converted to GiB.

Every terminal JobInfo that did not complete carries a FailureKind (`slurm_failure_kind`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from ccat_dagster.execution.hpc.base import HpcError, JobInfo, JobState, describe_exit_code
from ccat_dagster.opsdb.enums import FailureKind

__all__ = [
    "SACCT_FIELDS",
    "SQUEUE_FORMAT",
    "SlurmOutputError",
    "accounting_disabled",
    "is_valid_job_id",
    "job_ids_by_name_command",
    "map_slurm_state",
    "parse_duration_seconds",
    "parse_exit_code",
    "parse_job_ids_by_name",
    "parse_jobcomp",
    "parse_memory_gib",
    "parse_sacct",
    "parse_scontrol_show_job",
    "parse_squeue",
    "sacct_command",
    "scontrol_show_jobs_command",
    "slurm_failure_kind",
    "squeue_command",
    "squeue_reports_no_such_job",
]

# %i job id (array tasks as 123_4), %T long state, %r reason, %M time used.
SQUEUE_FORMAT = "%i|%T|%r|%M"
SACCT_FIELDS: tuple[str, ...] = (
    "JobID",
    "State",
    "ExitCode",
    "Elapsed",
    "TotalCPU",
    "MaxRSS",
    "ReqMem",
    "AllocCPUS",
    "Reason",
    # The job's time limit: a SIGTERM death near it is the pre-walltime signal (see slurm_failure_kind).
    "Timelimit",
)

_JOB_ID = re.compile(r"^\d+(?:_\d+)?$")
_KEY_VALUE = re.compile(r"(?:^|\s)([A-Za-z][A-Za-z0-9_:/]*)=")


class SlurmOutputError(HpcError):
    """Slurm printed something this parser does not understand (a format change, or a new state)."""


def is_valid_job_id(job_id: str) -> bool:
    """Slurm job ids are digits, array tasks `<job>_<task>`; anything else is not passed to a command."""
    return bool(_JOB_ID.fullmatch(job_id))


# --- command lines --------------------------------------------------------------------------------


def squeue_command(squeue: str, job_ids: Sequence[str]) -> list[str]:
    """squeue for the given jobs; it lists only jobs that are not finished (pending, running, completing)."""
    return [squeue, f"--jobs={','.join(job_ids)}", "--noheader", f"--format={SQUEUE_FORMAT}"]


def sacct_command(sacct: str, job_ids: Sequence[str]) -> list[str]:
    """sacct for the given jobs, one line per job and per step (the batch step carries MaxRSS)."""
    return [
        sacct,
        "--parsable2",
        "--noheader",
        f"--jobs={','.join(job_ids)}",
        f"--format={','.join(SACCT_FIELDS)}",
    ]


def scontrol_show_jobs_command(scontrol: str) -> list[str]:
    """All jobs slurmctld still holds (finished ones for MinJobAge seconds), one line each."""
    return [scontrol, "--oneliner", "show", "job"]


def job_ids_by_name_command(squeue: str, job_name: str) -> list[str]:
    """squeue for this user's jobs called `job_name`, in any state slurmctld still holds (MinJobAge)."""
    return [squeue, "--noheader", "--me", "--states=all", f"--name={job_name}", "--format=%i"]


def parse_job_ids_by_name(text: str) -> list[str]:
    """Output of `job_ids_by_name_command` -> job ids, oldest first."""
    ids = [line.strip() for line in text.splitlines() if line.strip()]
    bad = [job_id for job_id in ids if not is_valid_job_id(job_id)]
    if bad:
        raise SlurmOutputError(f"squeue printed {bad!r} where job ids were expected")
    return sorted(ids, key=lambda job_id: [int(part) for part in job_id.split("_")])


def squeue_reports_no_such_job(stderr: str) -> bool:
    """squeue exits 1 with this when every id it was given is unknown (purged or never existed)."""
    return "Invalid job id specified" in stderr


def accounting_disabled(stderr: str) -> bool:
    """sacct's answer when the cluster runs without slurmdbd."""
    return "accounting storage is disabled" in stderr.lower()


# --- value parsing ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ExitStatus:
    exit_code: int
    signal: int


def parse_exit_code(text: str) -> ExitStatus | None:
    """ "3:0" -> exit 3; "0:9" -> 137 (killed by signal 9). Empty -> None."""
    text = text.strip()
    if not text:
        return None
    match = re.fullmatch(r"(\d+):(\d+)", text)
    if not match:
        raise SlurmOutputError(f"exit code {text!r} is not '<status>:<signal>'")
    status, signal = int(match.group(1)), int(match.group(2))
    return ExitStatus(exit_code=128 + signal if signal else status, signal=signal)


def parse_duration_seconds(text: str) -> float | None:
    """Slurm durations: "MM:SS", "MM:SS.mmm", "HH:MM:SS", "D-HH:MM:SS", "D-HH", "D-HH:MM".

    Returns None for empty, "INVALID", "UNLIMITED", "Partition_Limit", "N/A".
    """
    text = text.strip()
    if not text or text.upper() in {"INVALID", "UNLIMITED", "PARTITION_LIMIT", "N/A", "NONE"}:
        return None
    days = 0
    if "-" in text:
        day_text, text = text.split("-", 1)
        if not day_text.isdigit():
            raise SlurmOutputError(f"duration {day_text}-{text!r}: bad day count")
        days = int(day_text)
        parts = text.split(":")
        # With a day count the first field is hours: D-HH, D-HH:MM, D-HH:MM:SS.
        while len(parts) < 3:
            parts.append("0")
    else:
        parts = text.split(":")
        while len(parts) < 3:
            parts.insert(0, "0")
    if len(parts) != 3:
        raise SlurmOutputError(f"duration {text!r} has too many ':' fields")
    try:
        hours, minutes, seconds = int(parts[0]), int(parts[1]), float(parts[2])
    except ValueError as exc:
        raise SlurmOutputError(f"duration {text!r} is not a Slurm time") from exc
    return days * 86400 + hours * 3600 + minutes * 60 + seconds


_MEMORY_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4, "P": 1024**5}


def parse_memory_gib(text: str) -> float | None:
    """Slurm memory ("219832K", "1.5G", "1024M", "0") in GiB. Slurm's K/M/G are powers of 1024.

    A bare number is bytes for MaxRSS (sacct). Empty -> None. A trailing per-node/per-cpu marker
    ("4000Mc", "4000Mn" in older ReqMem output) is stripped; the caller handles per-cpu.
    """
    text = text.strip()
    if not text:
        return None
    match = re.fullmatch(r"([0-9]*\.?[0-9]+)([KMGTP]?)[nc]?", text)
    if not match:
        raise SlurmOutputError(f"memory value {text!r} is not a Slurm size like '219832K'")
    return float(match.group(1)) * _MEMORY_UNITS[match.group(2)] / 1024**3


def _parse_time(text: str) -> datetime | None:
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None  # "Unknown", "None", "N/A"


# --- states ---------------------------------------------------------------------------------------

_STATE_MAP: dict[str, tuple[JobState, str | None]] = {
    "PENDING": (JobState.PENDING, None),
    # Resources are allocated but nodes are still booting: the payload has not started.
    "CONFIGURING": (JobState.PENDING, "CONFIGURING"),
    "REQUEUED": (JobState.PENDING, "REQUEUED"),
    "REQUEUE_HOLD": (JobState.PENDING, "REQUEUE_HOLD"),
    "REQUEUE_FED": (JobState.PENDING, "REQUEUE_FED"),
    "RESV_DEL_HOLD": (JobState.PENDING, "RESV_DEL_HOLD"),
    "RUNNING": (JobState.RUNNING, None),
    # The payload has ended, Slurm is cleaning up: not final yet (the state can still become TIMEOUT).
    "COMPLETING": (JobState.RUNNING, "COMPLETING"),
    "SIGNALING": (JobState.RUNNING, "SIGNALING"),
    "STAGE_OUT": (JobState.RUNNING, "STAGE_OUT"),
    "RESIZING": (JobState.RUNNING, "RESIZING"),
    "SUSPENDED": (JobState.RUNNING, "SUSPENDED"),
    "STOPPED": (JobState.RUNNING, "STOPPED"),
    "COMPLETED": (JobState.COMPLETED, None),
    "FAILED": (JobState.FAILED, None),
    "CANCELLED": (JobState.CANCELLED, None),
    "REVOKED": (JobState.CANCELLED, "REVOKED"),
    "TIMEOUT": (JobState.FAILED, "TIMEOUT"),
    "OUT_OF_MEMORY": (JobState.FAILED, "OUT_OF_MEMORY"),
    "NODE_FAIL": (JobState.FAILED, "NODE_FAIL"),
    "BOOT_FAIL": (JobState.FAILED, "BOOT_FAIL"),
    "DEADLINE": (JobState.FAILED, "DEADLINE"),
    "PREEMPTED": (JobState.FAILED, "PREEMPTED"),
    "SPECIAL_EXIT": (JobState.FAILED, "SPECIAL_EXIT"),
}


def map_slurm_state(raw: str) -> tuple[JobState, str | None]:
    """A Slurm job state ("RUNNING", "CANCELLED by 0", "COMPLETING+", "CD") -> (JobState, reason).

    The reason is the Slurm state name when it explains a failure (TIMEOUT, OUT_OF_MEMORY, ...).
    """
    # sacct writes "CANCELLED by <uid>"; squeue may append flags such as "+" (e.g. "COMPLETING+").
    name = raw.strip().split(" ", 1)[0].rstrip("+*").upper()
    try:
        return _STATE_MAP[name]
    except KeyError:
        raise SlurmOutputError(
            f"unknown Slurm job state {raw!r}; add it to ccat_dagster.execution.hpc.slurm.job_status"
        ) from None


# Slurm's state names that say by themselves why a job did not complete.
_KIND_BY_STATE: dict[str, FailureKind] = {
    "OUT_OF_MEMORY": FailureKind.OOM,
    "TIMEOUT": FailureKind.WALLTIME,
    # The job's --deadline passed: ended by a time limit, one set as a date.
    "DEADLINE": FailureKind.WALLTIME,
    "NODE_FAIL": FailureKind.NODE_FAILURE,
    "BOOT_FAIL": FailureKind.NODE_FAILURE,
    "PREEMPTED": FailureKind.NODE_FAILURE,
    "CANCELLED": FailureKind.CANCELLED,
    "REVOKED": FailureKind.CANCELLED,
}
# slurmctld checks time limits (and sends --signal) on a timer: Slurm documents that the signal may come up to
# 60 s before the requested lead time.
SIGNAL_RESOLUTION_SECONDS = 60.0
_SIGTERM = 15
_LAST_SIGNAL = 64


def slurm_failure_kind(
    *,
    raw_state: str,
    exit_code: int | None,
    signal: int,
    wall_time_seconds: float | None,
    time_limit_seconds: float | None,
    over_memory: bool = False,
    exit_code_less_128: bool = False,
) -> FailureKind | None:
    """Why a finished Slurm job did not complete, from what Slurm recorded; None for a completed or live job.

    The state decides where it can (TIMEOUT, OUT_OF_MEMORY, NODE_FAIL, ...). A FAILED job ended by SIGTERM
    (signal 15, or exit code 143 from a shell or container runtime that reports its child's death) in the second
    half of its time limit was ended by the pre-walltime signal, which the backend never sends earlier than half the
    limit (less Slurm's signal resolution): walltime. Other signal deaths are `signal` (SIGKILL above the requested
    memory: `oom`, see `over_memory`); any other non-zero exit is `exit_code`.
    """
    name = raw_state.strip().split(" ", 1)[0].rstrip("+*").upper()
    state, _reason = map_slurm_state(raw_state)
    if state is JobState.COMPLETED or state not in (JobState.FAILED, JobState.CANCELLED):
        return None
    if name in _KIND_BY_STATE:
        return _KIND_BY_STATE[name]
    if over_memory:
        return FailureKind.OOM
    died_of = signal or (exit_code - 128 if exit_code is not None and 128 < exit_code <= 128 + _LAST_SIGNAL else 0)
    maybe_term = died_of == _SIGTERM or (exit_code_less_128 and not signal and exit_code == _SIGTERM)
    if maybe_term and _near_time_limit(wall_time_seconds, time_limit_seconds):
        return FailureKind.WALLTIME
    if died_of:
        return FailureKind.SIGNAL
    return FailureKind.EXIT_CODE


def _near_time_limit(wall_time_seconds: float | None, time_limit_seconds: float | None) -> bool:
    if wall_time_seconds is None or time_limit_seconds is None:
        return False
    return wall_time_seconds >= time_limit_seconds / 2 - SIGNAL_RESOLUTION_SECONDS


def _job_info(
    *,
    job_id: str,
    raw_state: str,
    exit_status: ExitStatus | None,
    wall_time_seconds: float | None,
    cpu_seconds: float | None = None,
    peak_memory_gib: float | None = None,
    requested_memory_gib: float | None = None,
    pending_reason: str | None = None,
    time_limit_seconds: float | None = None,
    exit_code_less_128: bool = False,
) -> JobInfo:
    state, reason = map_slurm_state(raw_state)
    exit_code = exit_status.exit_code if exit_status else None
    signal = exit_status.signal if exit_status else 0
    if state is not JobState.COMPLETED and exit_code == 0:
        # Slurm reports 0:0 for jobs it ended itself (TIMEOUT, CANCELLED before start, NODE_FAIL):
        # there is no payload exit code to speak of.
        exit_code = None
    # Without cgroups, Slurm's memory enforcement (JobAcctGatherParams=OverMemoryKill) SIGKILLs the
    # step and leaves the job FAILED 0:9 instead of OUT_OF_MEMORY: recognise it by the peak usage.
    over_memory = (
        state is JobState.FAILED
        and reason is None
        and signal == 9
        and peak_memory_gib is not None
        and requested_memory_gib is not None
        and peak_memory_gib > requested_memory_gib
    )
    failure_kind = slurm_failure_kind(
        raw_state=raw_state,
        exit_code=exit_code,
        signal=signal,
        wall_time_seconds=wall_time_seconds,
        time_limit_seconds=time_limit_seconds,
        over_memory=over_memory,
        exit_code_less_128=exit_code_less_128,
    )
    if state is JobState.FAILED and reason is None:
        if over_memory:
            reason = "OUT_OF_MEMORY"
        elif failure_kind is FailureKind.WALLTIME:
            reason = (
                f"ended by the pre-walltime signal (SIGTERM) after {wall_time_seconds:.0f} s of its "
                f"{time_limit_seconds:.0f} s time limit ({describe_exit_code(exit_code, signal_number=signal or None)})"
            )
        else:
            reason = describe_exit_code(exit_code, signal_number=signal or None)
    elif state is JobState.CANCELLED and reason is None and signal:
        reason = describe_exit_code(exit_code, signal_number=signal)
    elif state is JobState.PENDING and pending_reason:
        reason = pending_reason
    elif state is JobState.RUNNING and reason is None and pending_reason:
        reason = pending_reason
    terminal = state in (JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED)
    return JobInfo(
        job_id=job_id,
        state=state,
        exit_code=exit_code if terminal else None,
        wall_time_seconds=None if state is JobState.PENDING else wall_time_seconds,
        # TotalCPU only counts finished steps; for a live job it would read as a misleading 0.
        cpu_hours=cpu_seconds / 3600 if (cpu_seconds is not None and terminal) else None,
        peak_memory_gb=peak_memory_gib,
        reason=reason,
        failure_kind=failure_kind if terminal else None,
    )


def _clean_reason(text: str) -> str | None:
    text = text.strip()
    return None if text in {"", "None", "(null)"} else text


# --- squeue ---------------------------------------------------------------------------------------


def parse_squeue(text: str) -> dict[str, JobInfo]:
    """Output of `squeue_command` -> JobInfo per job id (exit codes are not known to squeue)."""
    infos: dict[str, JobInfo] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        fields = line.split("|")
        if len(fields) != 4:
            raise SlurmOutputError(f"squeue line {line!r} does not have the 4 fields of {SQUEUE_FORMAT!r}")
        job_id, raw_state, raw_reason, time_used = (field.strip() for field in fields)
        state, reason = map_slurm_state(raw_state)
        infos[job_id] = JobInfo(
            job_id=job_id,
            state=state,
            wall_time_seconds=parse_duration_seconds(time_used) if state is not JobState.PENDING else None,
            # squeue's own reason ("Resources", "Dependency", "TimeLimit" while completing) says more.
            reason=_clean_reason(raw_reason) or reason,
        )
    return infos


# --- sacct ----------------------------------------------------------------------------------------


def parse_sacct(text: str, *, fields: Sequence[str] = SACCT_FIELDS) -> dict[str, JobInfo]:
    """Output of `sacct_command` -> JobInfo per job id.

    The job's own line gives state, exit code, elapsed and total CPU; its steps (`<id>.batch`,
    `<id>.extern`, `<id>.0`, ...) give the peak RSS, and the batch step's exit code when the job line
    has none (a cancelled job: job 0:0, batch 0:15).
    """
    index = {name: position for position, name in enumerate(fields)}
    for required in ("JobID", "State", "ExitCode"):
        if required not in index:
            raise ValueError(f"sacct fields {tuple(fields)} lack {required!r}")
    job_rows: dict[str, dict[str, str]] = {}
    step_rows: dict[str, list[dict[str, str]]] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        values = line.split("|")
        if len(values) != len(fields):
            raise SlurmOutputError(
                f"sacct line {line!r} has {len(values)} fields, expected {len(fields)} ({','.join(fields)})"
            )
        row = {name: values[position] for name, position in index.items()}
        job_id, _, step = row["JobID"].partition(".")
        if step:
            step_rows.setdefault(job_id, []).append(row | {"Step": step})
        else:
            job_rows[job_id] = row

    infos: dict[str, JobInfo] = {}
    for job_id, row in job_rows.items():
        steps = step_rows.get(job_id, [])
        exit_status = parse_exit_code(row["ExitCode"])
        if exit_status is not None and exit_status.exit_code == 0:
            batch = next((step for step in steps if step["Step"] == "batch"), None)
            batch_status = parse_exit_code(batch["ExitCode"]) if batch else None
            if batch_status is not None and batch_status.exit_code != 0:
                exit_status = batch_status
        peaks = [parse_memory_gib(step.get("MaxRSS", "")) for step in steps]
        peaks_known = [peak for peak in peaks if peak is not None]
        infos[job_id] = _job_info(
            job_id=job_id,
            raw_state=row["State"],
            exit_status=exit_status,
            wall_time_seconds=parse_duration_seconds(row.get("Elapsed", "")),
            cpu_seconds=parse_duration_seconds(row.get("TotalCPU", "")),
            peak_memory_gib=max(peaks_known) if peaks_known else None,
            requested_memory_gib=_requested_memory(row),
            pending_reason=_clean_reason(row.get("Reason", "")),
            time_limit_seconds=parse_duration_seconds(row.get("Timelimit", "")),
            exit_code_less_128=True,
        )
    return infos


def _requested_memory(row: dict[str, str]) -> float | None:
    text = row.get("ReqMem", "").strip()
    try:
        memory = parse_memory_gib(text)
    except SlurmOutputError:
        # Seen from slurmdbd 22.05 before a job's start record arrives: ReqMem "16?". Only used to
        # recognise out-of-memory kills, so unknown is fine.
        return None
    if memory is not None and text.endswith("c"):
        cpus = row.get("AllocCPUS", "").strip()
        return memory * int(cpus) if cpus.isdigit() else None
    return memory


# --- scontrol show job / jobcomp file ---------------------------------------------------------


def _key_values(line: str) -> dict[str, str]:
    """`Key=value Key2=value with spaces` -> dict; a value runs until the next ` Key=`."""
    matches = list(_KEY_VALUE.finditer(line))
    result: dict[str, str] = {}
    for position, match in enumerate(matches):
        end = matches[position + 1].start() if position + 1 < len(matches) else len(line)
        result[match.group(1)] = line[match.end() : end].strip()
    return result


def parse_scontrol_show_job(text: str) -> dict[str, JobInfo]:
    """Output of `scontrol --oneliner show job [id]` -> JobInfo per job id.

    slurmctld keeps finished jobs for MinJobAge seconds; this is the fallback when sacct is disabled.
    """
    infos: dict[str, JobInfo] = {}
    for line in text.splitlines():
        if not line.startswith("JobId="):
            continue
        values = _key_values(line)
        job_id = values["JobId"]
        if values.get("ArrayTaskId") and values.get("ArrayJobId"):
            job_id = f"{values['ArrayJobId']}_{values['ArrayTaskId']}"
        infos[job_id] = _job_info(
            job_id=job_id,
            raw_state=values.get("JobState", ""),
            exit_status=parse_exit_code(values.get("ExitCode", "")),
            wall_time_seconds=parse_duration_seconds(values.get("RunTime", "")),
            pending_reason=_clean_reason(values.get("Reason", "")),
            time_limit_seconds=parse_duration_seconds(values.get("TimeLimit", "")),
        )
    return infos


def parse_jobcomp(lines: Iterable[str], *, job_ids: Iterable[str] | None = None) -> dict[str, JobInfo]:
    """Lines of the jobcomp/filetxt file -> JobInfo per job id (the last record of a job wins).

    The file has state and exit code but no CPU or memory figures; wall time comes from Start/End.
    """
    wanted = set(job_ids) if job_ids is not None else None
    infos: dict[str, JobInfo] = {}
    for line in lines:
        if not line.startswith("JobId="):
            continue
        job_id = line[len("JobId=") :].split(" ", 1)[0]
        if wanted is not None and job_id not in wanted:
            continue
        values = _key_values(line.rstrip("\n"))
        start, end = _parse_time(values.get("StartTime", "")), _parse_time(values.get("EndTime", ""))
        infos[job_id] = _job_info(
            job_id=job_id,
            raw_state=values.get("JobState", ""),
            exit_status=parse_exit_code(values.get("ExitCode", "")),
            wall_time_seconds=(end - start).total_seconds() if start and end else None,
            time_limit_seconds=_jobcomp_time_limit(values.get("TimeLimit", "")),
        )
    return infos


def _jobcomp_time_limit(text: str) -> float | None:
    """The jobcomp file writes the time limit in whole minutes ("1"), or "UNLIMITED"."""
    text = text.strip()
    return float(text) * 60 if text.isdigit() else None
