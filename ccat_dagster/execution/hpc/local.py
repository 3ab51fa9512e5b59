"""LocalBackend: each job is a subprocess on this machine, with a bound on how many run at once.

All state lives in files under `state_dir`, one writer per file, so any process (a restarted
orchestrator, a CLI) can ask about, cancel or read the logs of a job it did not start:

    <job_id>.spec.json    written by submit: what to run (the queue entry)
    <job_id>.launch.json  written when a slot frees up and the wrapper is started: wrapper pid
    <job_id>.json         written by the wrapper (local_wrapper.py): payload pid/pgid, exit status, usage
    <job_id>.cancel.json  written by cancel
    active/<job_id>       empty; from submit until the wrapper records the end (or a queued job is cancelled),
                          so scheduling reads the unfinished jobs only, not every job of a long-lived state_dir
    queued/<seq>          empty, named `<time_ns>-<job_id>`; from submit until the job is started or cancelled:
                          the queue in order, read from the names alone

Jobs beyond `max_concurrent_jobs` stay PENDING; every `submit`/`status_many`/`cancel` call, and every
wrapper whose job has ended, starts queued jobs (oldest first) while slots are free, under a file lock so
two processes never start the same job (``local_wrapper.start_queued_jobs``, shared with the wrappers). Nothing
runs in the background except the wrappers themselves.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ccat_dagster
from ccat_dagster.execution.hpc.base import (
    HpcBackend,
    InvalidJobSpecError,
    JobInfo,
    JobSpec,
    JobState,
    JobSubmissionError,
    UnknownJobError,
    read_log_tail,
    require_host_command,
)
from ccat_dagster.execution.hpc.local_wrapper import (
    ACTIVE_DIR,
    JOB_ID_PATTERN,
    QUEUE_DIR,
    active_marker_path,
    cancel_marker_path,
    file_system_full,
    launch_record_path,
    process_alive,
    queue_marker_path,
    read_json,
    scheduler_lock,
    spec_path,
    start_queued_jobs,
    status_path,
    wrapper_alive,
    wrapper_pid,
    write_json_atomically,
)
from ccat_dagster.opsdb.enums import FailureKind

__all__ = ["LocalBackend", "finished_job_info", "job_record", "local_failure_kind"]

_KIB_PER_GIB = 1024 * 1024


@dataclass
class _JobFiles:
    job_id: str
    spec: dict[str, Any] | None
    launch: dict[str, Any] | None
    status: dict[str, Any] | None
    cancel: dict[str, Any] | None

    @property
    def finished(self) -> bool:
        return self.status is not None and self.status.get("state") == "finished"


class LocalBackend(HpcBackend):
    """Runs jobs as subprocesses of this machine (for the demo, tests and small deployments).

    `state_dir`: where job records live (keep it across restarts to re-attach to jobs).
    `max_concurrent_jobs`: how many jobs run at once; the rest wait, PENDING.
    `kill_grace_seconds`: between SIGTERM and SIGKILL on cancel and at the time limit.
    Resources other than the time limit are not enforced; the job's stdout/stderr go to
    `<log_dir>/job.out` and `<log_dir>/job.err`. The job's environment is exactly `spec.env` plus PATH
    (this process's PATH unless `spec.env` sets one).
    """

    name = "local"

    def __init__(self, state_dir: Path, max_concurrent_jobs: int = 2, *, kill_grace_seconds: float = 10.0) -> None:
        if max_concurrent_jobs < 1:
            raise ValueError(f"max_concurrent_jobs={max_concurrent_jobs}: must be >= 1")
        if kill_grace_seconds < 0:
            raise ValueError(f"kill_grace_seconds={kill_grace_seconds}: must be >= 0")
        self.state_dir = Path(state_dir).absolute()
        self.max_concurrent_jobs = max_concurrent_jobs
        self.kill_grace_seconds = kill_grace_seconds
        (self.state_dir / ACTIVE_DIR).mkdir(parents=True, exist_ok=True)
        if not (self.state_dir / QUEUE_DIR).is_dir():
            start_queued_jobs(self.state_dir, 0, env={})  # limit 0: only indexes the queue of an older version
        # Wrappers this process started: polled so they do not linger as zombies.
        self._children: list[subprocess.Popen[bytes]] = []

    # --- submission -----------------------------------------------------------------------------

    def submit(self, spec: JobSpec) -> str:
        job_id = self._queue(spec)
        self._schedule()
        return job_id

    def submit_many(self, specs: Sequence[JobSpec]) -> list[str]:
        """Queues all jobs, then starts what the free slots allow once (not once per job)."""
        job_ids: list[str] = []
        try:
            for spec in specs:
                job_ids.append(self._queue(spec))
        except JobSubmissionError:
            for job_id in job_ids:  # queued, never started: cancelled, so they never start
                self.cancel(job_id)
            raise
        self._schedule()
        return job_ids

    def _queue(self, spec: JobSpec) -> str:
        require_host_command(spec, backend=self.name)
        job_id = uuid.uuid4().hex
        record = job_record(spec, job_id, kill_grace_seconds=self.kill_grace_seconds)
        # The wrapper starts the next queued jobs when this one ends, within this limit.
        record["max_concurrent_jobs"] = self.max_concurrent_jobs
        try:
            write_json_atomically(spec_path(self.state_dir, job_id), record)
            # After the spec: a scheduler that sees a marker can always read what to run.
            active_marker_path(self.state_dir, job_id).touch()
            queue_marker_path(self.state_dir, record["sequence"]).touch()
        except OSError as exc:
            raise JobSubmissionError(f"cannot queue job {spec.job_name!r} in {self.state_dir}: {exc}") from exc
        return job_id

    # --- status ---------------------------------------------------------------------------------

    def status_many(self, job_ids: Sequence[str]) -> dict[str, JobInfo]:
        """One look at each job's records: a finished job costs its status and cancel records, a queued one
        its launch record too; only a job with none of them has its spec read (to tell it from an unknown id)."""
        wanted = list(dict.fromkeys(job_ids))
        _check_job_ids(wanted)
        self._schedule()
        files = {job_id: self._read(job_id, spec=False) for job_id in wanted}
        unknown = []
        for job_id, record in files.items():
            if record.status is None and record.launch is None and record.cancel is None:
                record.spec = read_json(spec_path(self.state_dir, job_id))
                if record.spec is None:
                    unknown.append(job_id)
        if unknown:
            raise UnknownJobError(
                f"no local jobs {unknown!r} in {self.state_dir} (wrong state_dir, or never submitted)",
                job_ids=unknown,
            )
        return {job_id: self._job_info(record) for job_id, record in files.items()}

    def _job_info(self, files: _JobFiles) -> JobInfo:
        status = files.status or {}
        if files.cancel is not None and (
            not files.finished or status.get("finished_at", 0) >= files.cancel["cancelled_at"]
        ):
            return JobInfo(
                job_id=files.job_id,
                state=JobState.CANCELLED,
                exit_code=status.get("exit_code") if files.finished else None,
                wall_time_seconds=status.get("wall_time_seconds"),
                cpu_hours=_cpu_hours(status),
                peak_memory_gb=_peak_memory(status),
                reason="cancelled",
                failure_kind=FailureKind.CANCELLED,
            )
        if files.finished:
            return finished_job_info(files.job_id, status)
        if files.launch is None:
            return JobInfo(
                job_id=files.job_id,
                state=JobState.PENDING,
                reason=f"queued: max_concurrent_jobs={self.max_concurrent_jobs} jobs already running",
            )
        if wrapper_alive(files.launch, files.status):
            started_at = status.get("started_at")
            return JobInfo(
                job_id=files.job_id,
                state=JobState.RUNNING,
                wall_time_seconds=time.time() - started_at if started_at else None,
            )
        # The wrapper is gone; it may have written its final record since we read the files.
        status = read_json(status_path(self.state_dir, files.job_id)) or {}
        if status.get("state") == "finished":
            return finished_job_info(files.job_id, status)
        pid = wrapper_pid(files.launch, files.status)
        full = self._full_file_system(files.job_id)
        if full is not None:
            return JobInfo(
                job_id=files.job_id,
                state=JobState.FAILED,
                reason=(
                    f"no space left on device (ENOSPC): the file system of {full} is full, and the wrapper process "
                    f"(pid {pid}) "
                    "ended without recording an exit status (it could not write it)"
                ),
                failure_kind=FailureKind.DISK_FULL,
            )
        return JobInfo(
            job_id=files.job_id,
            state=JobState.FAILED,
            reason=f"the wrapper process (pid {pid}) ended without recording an exit status (killed, or the machine "
            "restarted)",
            failure_kind=FailureKind.LOST,
        )

    def _full_file_system(self, job_id: str) -> str | None:
        """The state directory or the job's log directory, whichever is on a full file system (else None)."""
        spec = read_json(spec_path(self.state_dir, job_id)) or {}
        for path in (self.state_dir, spec.get("log_dir")):
            if path and file_system_full(path):
                return str(path)
        return None

    # --- cancel / logs --------------------------------------------------------------------------

    def cancel(self, job_id: str) -> None:
        """Queued: never starts. Running: SIGTERM to the job's process group, SIGKILL after the grace
        period (done by the wrapper, so this returns at once). Finished: no-op."""
        _check_job_ids([job_id])
        with scheduler_lock(self.state_dir):
            files = self._read(job_id)
            if files.spec is None:
                raise UnknownJobError(f"no local job {job_id!r} in {self.state_dir}", job_ids=[job_id])
            if files.finished:
                return
            if files.cancel is None:
                write_json_atomically(cancel_marker_path(self.state_dir, job_id), {"cancelled_at": time.time()})
            if files.launch is None:  # will never start
                queue_marker_path(self.state_dir, files.spec.get("sequence", "")).unlink(missing_ok=True)
                active_marker_path(self.state_dir, job_id).unlink(missing_ok=True)
                return
            pid = wrapper_pid(files.launch, files.status)
            if pid is not None and wrapper_alive(files.launch, files.status):
                # A wrapper may run several jobs one after the other: it ends its current job on SIGUSR1 only
                # if that job has a cancel marker (local_wrapper._Wrapper); wrappers of older versions on SIGTERM.
                cancel_signal = signal.SIGUSR1 if (files.launch or {}).get("cancel_signal") == "SIGUSR1" else None
                try:
                    os.kill(pid, cancel_signal or signal.SIGTERM)
                    return
                except ProcessLookupError:
                    pass
            # No wrapper left to escalate: kill the payload's group ourselves.
            pgid = (files.status or {}).get("pgid")
            if pgid and process_alive(pgid, None):
                for signum in (signal.SIGTERM, signal.SIGKILL):
                    try:
                        os.killpg(pgid, signum)
                    except ProcessLookupError:
                        break
                    time.sleep(0.1)
        self._schedule()

    def logs(self, job_id: str, *, tail_lines: int = 50) -> str:
        _check_job_ids([job_id])
        return wrapper_job_logs(self.state_dir, job_id, what="local job", tail_lines=tail_lines)

    # --- scheduling -----------------------------------------------------------------------------

    def _schedule(self) -> None:
        """Start queued jobs, oldest first, while fewer than max_concurrent_jobs are running."""
        self._children = [child for child in self._children if child.poll() is None]
        self._children += start_queued_jobs(self.state_dir, self.max_concurrent_jobs, env=_wrapper_environment())

    # --- state files ----------------------------------------------------------------------------

    def _read(self, job_id: str, *, spec: bool = True) -> _JobFiles:
        return _JobFiles(
            job_id=job_id,
            spec=read_json(spec_path(self.state_dir, job_id)) if spec else None,
            launch=read_json(launch_record_path(self.state_dir, job_id)),
            status=read_json(status_path(self.state_dir, job_id)),
            cancel=read_json(cancel_marker_path(self.state_dir, job_id)),
        )


def job_record(spec: JobSpec, job_id: str, *, kill_grace_seconds: float) -> dict[str, Any]:
    """What the job wrapper runs (``<job_id>.spec.json``); the packed backend's tasks use the same record."""
    if spec.workdir is not None and not spec.workdir.is_dir():
        raise InvalidJobSpecError(f"workdir={str(spec.workdir)!r} does not exist: create it before submitting")
    return {
        "job_id": job_id,
        "job_name": spec.job_name,
        "command": list(spec.command),
        "env": dict(spec.env),
        "path": os.environ.get("PATH", os.defpath),
        "log_dir": str(spec.log_dir.absolute()),
        # Like sbatch: without a workdir the job runs where it was submitted from.
        "workdir": str((spec.workdir or Path.cwd()).absolute()),
        "time_limit_seconds": spec.resources.time_limit_seconds,
        "pre_walltime_signal_seconds": min(spec.pre_walltime_signal_seconds, spec.resources.time_limit_seconds // 2),
        "kill_grace_seconds": kill_grace_seconds,
        "resources": {
            "cpu": spec.resources.cpu,
            "memory_gb": spec.resources.memory_gb,
            "time_hours": spec.resources.time_hours,
            "gpus": spec.resources.gpus,
        },
        "submitted_at": time.time(),
        # Queue order; time_ns alone could tie between two quick submissions.
        "sequence": f"{time.time_ns():020d}-{job_id}",
    }


def _check_job_ids(job_ids: Sequence[str]) -> None:
    invalid = [job_id for job_id in job_ids if not JOB_ID_PATTERN.fullmatch(job_id)]
    if invalid:
        raise UnknownJobError(f"{invalid!r} are not local job ids (32 hex digits)", job_ids=invalid)


def finished_job_info(job_id: str, status: dict[str, Any]) -> JobInfo:
    """The JobInfo of a job whose wrapper recorded its end."""
    exit_code = status.get("exit_code")
    completed = exit_code == 0 and not status.get("disk_full")
    return JobInfo(
        job_id=job_id,
        state=JobState.COMPLETED if completed else JobState.FAILED,
        exit_code=exit_code,
        wall_time_seconds=status.get("wall_time_seconds"),
        cpu_hours=_cpu_hours(status),
        peak_memory_gb=_peak_memory(status),
        reason=status.get("reason"),
        failure_kind=None if completed else local_failure_kind(status),
    )


def local_failure_kind(status: dict[str, Any]) -> FailureKind:
    """Why a finished local job did not complete, from its wrapper's record (see local_wrapper).

    The wrapper's own actions first: its time limit (walltime), a cancel (cancelled), then a non-zero end after
    its pre-walltime SIGTERM (walltime: the payload was told its time was up). Then the evidence: a file it could
    not write, or a full file system under a failed job (disk_full); the kernel's OOM killer during the job
    together with a SIGKILL nobody here sent (oom); any other signal death, also as exit 128+N from a shell or
    container runtime (signal); else exit_code. Records of older wrappers lack the evidence fields: their reason
    ("TIMEOUT", "cancelled") stands in.
    """
    reason = status.get("reason") or ""
    exit_code = status.get("exit_code")
    signal_number = status.get("signal") or 0
    if status.get("timed_out") or reason == "TIMEOUT":
        return FailureKind.WALLTIME
    if status.get("cancel_requested") or reason.startswith("cancelled"):
        return FailureKind.CANCELLED
    if status.get("warning_sent_at") is not None and exit_code != 0:
        return FailureKind.WALLTIME
    if status.get("disk_full"):
        return FailureKind.DISK_FULL
    if status.get("oom_killed"):
        return FailureKind.OOM
    if signal_number or (exit_code is not None and 128 < exit_code <= 128 + 64):
        return FailureKind.SIGNAL
    return FailureKind.EXIT_CODE


def _cpu_hours(status: dict[str, Any]) -> float | None:
    cpu_seconds = status.get("cpu_seconds")
    return cpu_seconds / 3600 if cpu_seconds is not None else None


def _peak_memory(status: dict[str, Any]) -> float | None:
    max_rss_kib = status.get("max_rss_kib")
    return max_rss_kib / _KIB_PER_GIB if max_rss_kib is not None else None


def _wrapper_environment() -> dict[str, str]:
    """This process's environment, with the directory holding ccat_dagster on PYTHONPATH so the wrapper
    imports the same code even when the package is not installed."""
    env = dict(os.environ)
    package_root = str(Path(ccat_dagster.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    return env


def wrapper_job_logs(state_dir: Path, job_id: str, *, what: str, tail_lines: int) -> str:
    """The tail of stdout and stderr of a job run by the job wrapper (local jobs and packed tasks alike)."""
    spec = read_json(spec_path(state_dir, job_id))
    if spec is None:
        raise UnknownJobError(f"no {what} {job_id!r} in {state_dir}", job_ids=[job_id])
    log_dir = Path(spec["log_dir"])
    return read_log_tail([log_dir / "job.out", log_dir / "job.err"], tail_lines=tail_lines)
