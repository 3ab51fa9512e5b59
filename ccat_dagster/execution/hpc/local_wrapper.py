"""The process that runs one local job: `python -m ccat_dagster.execution.hpc.local_wrapper --state-dir D --job-id J`.

LocalBackend starts it in its own session; it reads `<D>/<J>.spec.json`, runs the command in its own
process group with exactly the job's environment (plus PATH), sends stdout/stderr to
`<log_dir>/job.out` / `job.err`, enforces the time limit, and records the outcome in `<D>/<J>.json`
(written atomically, so a reader in any process sees either the old or the new record). The wrapper
outlives the process that started it, which is what lets a restarted orchestrator re-attach.

Status record (`<J>.json`): {"state": "running"|"finished", "wrapper_pid", "pid", "pgid", "started_at",
"finished_at", "exit_code", "signal", "wall_time_seconds", "cpu_seconds", "max_rss_kib", "reason"}.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ccat_dagster.execution.hpc.base import describe_exit_code

__all__ = [
    "JOB_ID_PATTERN",
    "cancel_marker_path",
    "launch_record_path",
    "main",
    "read_json",
    "spec_path",
    "status_path",
    "write_json_atomically",
]

POLL_SECONDS = 0.2
ACTIVE_DIR = "active"
# The first exit checks come sooner, so a short job does not hold its slot for a whole POLL_SECONDS.
FIRST_POLL_SECONDS = 0.005
# Job ids name files in the state directory: nothing that could leave it.
JOB_ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")


def spec_path(state_dir: Path, job_id: str) -> Path:
    return state_dir / f"{job_id}.spec.json"


def launch_record_path(state_dir: Path, job_id: str) -> Path:
    return state_dir / f"{job_id}.launch.json"


def status_path(state_dir: Path, job_id: str) -> Path:
    return state_dir / f"{job_id}.json"


def cancel_marker_path(state_dir: Path, job_id: str) -> Path:
    return state_dir / f"{job_id}.cancel.json"


def active_marker_path(state_dir: Path, job_id: str) -> Path:
    """An empty file per job that has not finished: scheduling lists these, not every job ever run."""
    return state_dir / ACTIVE_DIR / job_id


def write_json_atomically(path: Path, record: dict[str, Any], *, durable: bool = True) -> None:
    """Write to a temporary file in the same directory, fsync, rename over `path`.

    `durable=False` skips the fsync, for records that mean nothing after the machine restarts (a launch
    record names processes that a restart ended anyway): readers still see the old or the new record whole.
    """
    fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(record, handle, sort_keys=True)
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def read_json(path: Path) -> dict[str, Any] | None:
    """The record at `path`, or None when it does not exist (yet)."""
    try:
        with path.open(encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        return None


class _Job:
    """State of the one payload this wrapper runs."""

    def __init__(self, *, state_dir: Path, job_id: str, spec: dict[str, Any]) -> None:
        self.state_dir = state_dir
        self.job_id = job_id
        self.spec = spec
        self.process: subprocess.Popen[bytes] | None = None
        self.terminate_requested = False
        self.timed_out = False
        self.warning_sent_at: float | None = None
        self.kill_at: float | None = None  # monotonic time of the SIGKILL after a SIGTERM
        self.started_at = time.time()
        self.started_monotonic = time.monotonic()

    def record(self, **fields: Any) -> None:
        base = {"job_id": self.job_id, "wrapper_pid": os.getpid(), "started_at": self.started_at}
        # Only the final record must survive a restart; a "running" one names processes a restart ends.
        durable = fields.get("state") != "running"
        write_json_atomically(status_path(self.state_dir, self.job_id), base | fields, durable=durable)

    def on_terminate(self, signum: int, _frame: object) -> None:
        # Cancel (or shutdown) of the wrapper: pass it on to the payload's group, escalate later.
        self.terminate_requested = True
        self.terminate_group()

    def terminate_group(self) -> None:
        if self.process is None:
            return
        if self.kill_at is None:
            self.kill_at = time.monotonic() + float(self.spec["kill_grace_seconds"])
        _signal_group(self.process.pid, signal.SIGTERM)


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass  # the group is already gone


def _exit_observed(pid: int) -> bool:
    """True once the payload has exited; WNOWAIT leaves it a zombie, so its pid (= the group id) cannot
    be reused until we have killed what is left of the group."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def run(*, state_dir: Path, job_id: str) -> int:
    spec = read_json(spec_path(state_dir, job_id))
    if spec is None:
        print(f"local_wrapper: no job spec {spec_path(state_dir, job_id)}", file=sys.stderr)
        return 2
    job = _Job(state_dir=state_dir, job_id=job_id, spec=spec)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, job.on_terminate)

    if cancel_marker_path(state_dir, job_id).exists() or job.terminate_requested:
        job.record(state="finished", finished_at=time.time(), exit_code=None, signal=0, reason="cancelled before start")
        return 0

    env = dict(spec["env"])
    env.setdefault("PATH", spec["path"])
    log_dir = Path(spec["log_dir"])
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
        stdout = (log_dir / "job.out").open("wb")
        stderr = (log_dir / "job.err").open("wb")
        job.process = subprocess.Popen(
            spec["command"],
            env=env,
            cwd=spec["workdir"],
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            process_group=0,
            close_fds=True,
        )
    except OSError as exc:
        exit_code = 127 if isinstance(exc, FileNotFoundError) else 126
        job.record(
            state="finished",
            finished_at=time.time(),
            exit_code=exit_code,
            signal=0,
            wall_time_seconds=0.0,
            reason=f"could not start {spec['command'][0]!r}: {exc}",
        )
        return 0
    stdout.close()
    stderr.close()
    pid = job.process.pid
    job.record(state="running", pid=pid, pgid=pid)
    if job.terminate_requested:  # a cancel that arrived while the payload was being started
        job.terminate_group()

    time_limit = float(spec["time_limit_seconds"])
    warning_lead = float(spec["pre_walltime_signal_seconds"])
    pause = FIRST_POLL_SECONDS
    while not _exit_observed(pid):
        elapsed = time.monotonic() - job.started_monotonic
        if warning_lead > 0 and job.warning_sent_at is None and elapsed >= time_limit - warning_lead:
            # Like Slurm's --signal=B:TERM@<s>: the payload's main process only, so it can save its work.
            job.warning_sent_at = time.time()
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        if not job.timed_out and elapsed >= time_limit:
            job.timed_out = True
            job.terminate_group()
        if job.kill_at is not None and time.monotonic() >= job.kill_at:
            _signal_group(pid, signal.SIGKILL)
        time.sleep(pause)
        pause = min(pause * 2, POLL_SECONDS)

    finished_at = time.time()
    wall_time_seconds = time.monotonic() - job.started_monotonic
    # The job is over: nothing it started may outlive it (Slurm does the same at job end).
    _signal_group(pid, signal.SIGKILL)
    returncode = job.process.wait()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    exit_code, signal_number = (returncode, 0) if returncode >= 0 else (128 - returncode, -returncode)
    if job.timed_out:
        reason: str | None = "TIMEOUT"
    elif job.terminate_requested:
        reason = "cancelled"
    elif signal_number == signal.SIGTERM and job.warning_sent_at is not None:
        reason = "killed by signal 15 (the pre-walltime warning; the payload did not handle it)"
    else:
        reason = describe_exit_code(exit_code, signal_number=signal_number or None)
    job.record(
        state="finished",
        pid=pid,
        pgid=pid,
        finished_at=finished_at,
        exit_code=exit_code,
        signal=signal_number,
        wall_time_seconds=wall_time_seconds,
        cpu_seconds=usage.ru_utime + usage.ru_stime,
        max_rss_kib=usage.ru_maxrss,
        warning_sent_at=job.warning_sent_at,
        reason=reason,
    )
    active_marker_path(state_dir, job_id).unlink(missing_ok=True)
    _start_queued_jobs(state_dir, spec)
    return 0


def _start_queued_jobs(state_dir: Path, spec: dict[str, Any]) -> None:
    """Hand this job's slot to the next queued job at once, instead of at the orchestrator's next poll."""
    limit = spec.get("max_concurrent_jobs")
    if not limit:
        return  # queued by an older version: its submitter's next poll starts the next job
    from ccat_dagster.execution.hpc.local import LocalBackend  # here: only a finishing wrapper needs it

    try:
        LocalBackend(state_dir, max_concurrent_jobs=int(limit))._schedule()
    except OSError as exc:  # the job is recorded; the next poll of any process starts the queue instead
        print(f"local_wrapper: could not start queued jobs: {exc}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--job-id", required=True)
    args = parser.parse_args(argv)
    if not JOB_ID_PATTERN.fullmatch(args.job_id):
        parser.error(f"--job-id {args.job_id!r} is not a local job id")
    return run(state_dir=args.state_dir, job_id=args.job_id)


if __name__ == "__main__":
    sys.exit(main())
