"""LocalBackend: each job is a subprocess on this machine, with a bound on how many run at once.

All state lives in files under `state_dir`, one writer per file, so any process (a restarted
orchestrator, a CLI) can ask about, cancel or read the logs of a job it did not start:

    <job_id>.spec.json    written by submit: what to run (the queue entry)
    <job_id>.launch.json  written when a slot frees up and the wrapper is started: wrapper pid
    <job_id>.json         written by the wrapper (local_wrapper.py): payload pid/pgid, exit status, usage
    <job_id>.cancel.json  written by cancel
    active/<job_id>       empty; from submit until the wrapper records the end (or a queued job is cancelled),
                          so scheduling reads the unfinished jobs only, not every job of a long-lived state_dir

Jobs beyond `max_concurrent_jobs` stay PENDING; every `submit`/`status_many`/`cancel` call, and every
wrapper whose job has ended, starts queued jobs (oldest first) while slots are free, under a file lock so
two processes never start the same job. Nothing runs in the background except the wrappers themselves.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
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
)
from ccat_dagster.execution.hpc.local_wrapper import (
    ACTIVE_DIR,
    JOB_ID_PATTERN,
    active_marker_path,
    cancel_marker_path,
    launch_record_path,
    read_json,
    spec_path,
    status_path,
    write_json_atomically,
)

__all__ = ["LocalBackend"]

_WRAPPER_MODULE = "ccat_dagster.execution.hpc.local_wrapper"
# A launch record without a wrapper pid older than this means the launching process died mid-launch.
_LAUNCH_GRACE_SECONDS = 60.0
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
        # Wrappers this process started: polled so they do not linger as zombies.
        self._children: list[subprocess.Popen[bytes]] = []
        # Jobs seen finished (a final state): the scheduler never reads their files again, so a state_dir
        # with thousands of finished jobs does not make every submit / poll slower.
        self._finished: set[str] = set()

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
        job_id = uuid.uuid4().hex
        record = {
            "job_id": job_id,
            "job_name": spec.job_name,
            "command": list(spec.command),
            "env": dict(spec.env),
            "path": os.environ.get("PATH", os.defpath),
            "log_dir": str(spec.log_dir.absolute()),
            # Like sbatch: without a workdir the job runs where it was submitted from.
            "workdir": str((spec.workdir or Path.cwd()).absolute()),
            "time_limit_seconds": spec.resources.time_limit_seconds,
            "pre_walltime_signal_seconds": min(
                spec.pre_walltime_signal_seconds, spec.resources.time_limit_seconds // 2
            ),
            "kill_grace_seconds": self.kill_grace_seconds,
            # The wrapper starts the next queued jobs when this one ends, within this limit.
            "max_concurrent_jobs": self.max_concurrent_jobs,
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
        if spec.workdir is not None and not spec.workdir.is_dir():
            raise InvalidJobSpecError(f"workdir={str(spec.workdir)!r} does not exist: create it before submitting")
        try:
            write_json_atomically(spec_path(self.state_dir, job_id), record)
            # After the spec: a scheduler that sees the marker can always read what to run.
            active_marker_path(self.state_dir, job_id).touch()
        except OSError as exc:
            raise JobSubmissionError(f"cannot queue job {spec.job_name!r} in {self.state_dir}: {exc}") from exc
        return job_id

    # --- status ---------------------------------------------------------------------------------

    def status_many(self, job_ids: Sequence[str]) -> dict[str, JobInfo]:
        wanted = list(dict.fromkeys(job_ids))
        _check_job_ids(wanted)
        self._schedule()
        files = {job_id: self._read(job_id) for job_id in wanted}
        unknown = [job_id for job_id, record in files.items() if record.spec is None]
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
            )
        if files.finished:
            return _finished_info(files.job_id, status)
        if files.launch is None:
            return JobInfo(
                job_id=files.job_id,
                state=JobState.PENDING,
                reason=f"queued: max_concurrent_jobs={self.max_concurrent_jobs} jobs already running",
            )
        if self._wrapper_alive(files):
            started_at = status.get("started_at")
            return JobInfo(
                job_id=files.job_id,
                state=JobState.RUNNING,
                wall_time_seconds=time.time() - started_at if started_at else None,
            )
        # The wrapper is gone; it may have written its final record since we read the files.
        status = read_json(status_path(self.state_dir, files.job_id)) or {}
        if status.get("state") == "finished":
            return _finished_info(files.job_id, status)
        return JobInfo(
            job_id=files.job_id,
            state=JobState.FAILED,
            reason=(
                f"the wrapper process (pid {_wrapper_pid(files)}) ended without recording an exit status "
                "(killed, or the machine restarted)"
            ),
        )

    # --- cancel / logs --------------------------------------------------------------------------

    def cancel(self, job_id: str) -> None:
        """Queued: never starts. Running: SIGTERM to the job's process group, SIGKILL after the grace
        period (done by the wrapper, so this returns at once). Finished: no-op."""
        _check_job_ids([job_id])
        with self._scheduler_lock():
            files = self._read(job_id)
            if files.spec is None:
                raise UnknownJobError(f"no local job {job_id!r} in {self.state_dir}", job_ids=[job_id])
            if files.finished:
                return
            if files.cancel is None:
                write_json_atomically(cancel_marker_path(self.state_dir, job_id), {"cancelled_at": time.time()})
            if files.launch is None:
                active_marker_path(self.state_dir, job_id).unlink(missing_ok=True)  # will never start
                return
            wrapper_pid = _wrapper_pid(files)
            if wrapper_pid is not None and self._wrapper_alive(files):
                try:
                    os.kill(wrapper_pid, signal.SIGTERM)
                    return
                except ProcessLookupError:
                    pass
            # No wrapper left to escalate: kill the payload's group ourselves.
            pgid = (files.status or {}).get("pgid")
            if pgid and _process_alive(pgid, None):
                for signum in (signal.SIGTERM, signal.SIGKILL):
                    try:
                        os.killpg(pgid, signum)
                    except ProcessLookupError:
                        break
                    time.sleep(0.1)
        self._schedule()

    def logs(self, job_id: str, *, tail_lines: int = 50) -> str:
        _check_job_ids([job_id])
        spec = read_json(spec_path(self.state_dir, job_id))
        if spec is None:
            raise UnknownJobError(f"no local job {job_id!r} in {self.state_dir}", job_ids=[job_id])
        log_dir = Path(spec["log_dir"])
        return read_log_tail([log_dir / "job.out", log_dir / "job.err"], tail_lines=tail_lines)

    # --- scheduling -----------------------------------------------------------------------------

    def _schedule(self) -> None:
        """Start queued jobs, oldest first, while fewer than max_concurrent_jobs are running."""
        self._reap_children()
        with self._scheduler_lock():
            running = 0
            queued: list[_JobFiles] = []
            for files in self._unfinished_jobs():
                if files.finished or files.spec is None:
                    continue
                if files.launch is None:
                    if files.cancel is None:
                        queued.append(files)
                elif self._wrapper_alive(files):
                    running += 1
            queued.sort(key=lambda files: files.spec["sequence"] if files.spec else "")
            for files in queued[: max(0, self.max_concurrent_jobs - running)]:
                self._launch(files.job_id)

    def _launch(self, job_id: str) -> None:
        launch_path = launch_record_path(self.state_dir, job_id)
        # Recorded before the start so that a crash right after Popen cannot make the job look queued
        # (and be started a second time by another process).
        write_json_atomically(launch_path, {"launched_at": time.time(), "wrapper_pid": None}, durable=False)
        wrapper_log = (self.state_dir / f"{job_id}.wrapper.log").open("ab")
        try:
            process = subprocess.Popen(
                # -S: the wrapper needs only the standard library and ccat_dagster (on PYTHONPATH), and
                # skipping site-packages saves tens of ms per job.
                [sys.executable, "-S", "-m", _WRAPPER_MODULE, "--state-dir", str(self.state_dir), "--job-id", job_id],
                stdin=subprocess.DEVNULL,
                stdout=wrapper_log,
                stderr=subprocess.STDOUT,
                # Own session: the job survives this process, and signals to our group do not reach it.
                start_new_session=True,
                env=_wrapper_environment(),
                cwd="/",
            )
        except OSError as exc:
            write_json_atomically(
                status_path(self.state_dir, job_id),
                {
                    "state": "finished",
                    "finished_at": time.time(),
                    "exit_code": None,
                    "signal": 0,
                    "reason": f"could not start the local job wrapper: {exc}",
                },
            )
            return
        finally:
            wrapper_log.close()
        self._children.append(process)
        write_json_atomically(
            launch_path,
            {"launched_at": time.time(), "wrapper_pid": process.pid, "wrapper_start_ticks": _start_ticks(process.pid)},
            durable=False,
        )

    @contextmanager
    def _scheduler_lock(self) -> Iterator[None]:
        with (self.state_dir / ".scheduler.lock").open("a") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def _reap_children(self) -> None:
        self._children = [child for child in self._children if child.poll() is None]

    # --- state files ----------------------------------------------------------------------------

    def _read(self, job_id: str) -> _JobFiles:
        return _JobFiles(
            job_id=job_id,
            spec=read_json(spec_path(self.state_dir, job_id)),
            launch=read_json(launch_record_path(self.state_dir, job_id)),
            status=read_json(status_path(self.state_dir, job_id)),
            cancel=read_json(cancel_marker_path(self.state_dir, job_id)),
        )

    def _unfinished_jobs(self) -> Iterator[_JobFiles]:
        for path in (self.state_dir / ACTIVE_DIR).iterdir():
            job_id = path.name
            if job_id in self._finished or not JOB_ID_PATTERN.fullmatch(job_id):
                continue
            # A wrapper that was killed before removing its marker: its final record says it ended.
            status = read_json(status_path(self.state_dir, job_id))
            if status is not None and status.get("state") == "finished":
                self._finished.add(job_id)
                path.unlink(missing_ok=True)
                continue
            files = self._read(job_id)
            if files.spec is None:  # the marker of a submission that failed half-way
                path.unlink(missing_ok=True)
                continue
            yield files

    def _wrapper_alive(self, files: _JobFiles) -> bool:
        launch = files.launch or {}
        pid = _wrapper_pid(files)
        if pid is None:
            return time.time() - launch.get("launched_at", 0) < _LAUNCH_GRACE_SECONDS
        return _process_alive(pid, launch.get("wrapper_start_ticks"))


def _check_job_ids(job_ids: Sequence[str]) -> None:
    invalid = [job_id for job_id in job_ids if not JOB_ID_PATTERN.fullmatch(job_id)]
    if invalid:
        raise UnknownJobError(f"{invalid!r} are not local job ids (32 hex digits)", job_ids=invalid)


def _wrapper_pid(files: _JobFiles) -> int | None:
    return (files.launch or {}).get("wrapper_pid") or (files.status or {}).get("wrapper_pid")


def _finished_info(job_id: str, status: dict[str, Any]) -> JobInfo:
    exit_code = status.get("exit_code")
    return JobInfo(
        job_id=job_id,
        state=JobState.COMPLETED if exit_code == 0 else JobState.FAILED,
        exit_code=exit_code,
        wall_time_seconds=status.get("wall_time_seconds"),
        cpu_hours=_cpu_hours(status),
        peak_memory_gb=_peak_memory(status),
        reason=status.get("reason"),
    )


def _cpu_hours(status: dict[str, Any]) -> float | None:
    cpu_seconds = status.get("cpu_seconds")
    return cpu_seconds / 3600 if cpu_seconds is not None else None


def _peak_memory(status: dict[str, Any]) -> float | None:
    max_rss_kib = status.get("max_rss_kib")
    return max_rss_kib / _KIB_PER_GIB if max_rss_kib is not None else None


def _start_ticks(pid: int) -> int | None:
    """Process start time in clock ticks since boot (field 22 of /proc/<pid>/stat): tells a live
    process from a later one that got the same pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[19])


def _process_alive(pid: int, start_ticks: int | None) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        # No /proc (not Linux): fall back to a signal-0 probe.
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in {"Z", "X"}:
        return False  # exited; only its parent has not collected it yet
    return start_ticks is None or int(fields[19]) == start_ticks


def _wrapper_environment() -> dict[str, str]:
    """This process's environment, with the directory holding ccat_dagster on PYTHONPATH so the wrapper
    imports the same code even when the package is not installed."""
    env = dict(os.environ)
    package_root = str(Path(ccat_dagster.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    return env
