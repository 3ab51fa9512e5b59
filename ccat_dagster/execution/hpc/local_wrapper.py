"""The process that runs one local job: `python -m ccat_dagster.execution.hpc.local_wrapper --state-dir D --job-id J`.

LocalBackend starts it in its own session; it reads `<D>/<J>.spec.json`, runs the command in its own
process group with exactly the job's environment (plus PATH), sends stdout/stderr to
`<log_dir>/job.out` / `job.err`, enforces the time limit, and records the outcome in `<D>/<J>.json`
(written atomically, so a reader in any process sees either the old or the new record). The wrapper
outlives the process that started it, which is what lets a restarted orchestrator re-attach.

Status record (`<J>.json`): {"state": "running"|"finished", "wrapper_pid", "pid", "pgid", "started_at",
"finished_at", "exit_code", "signal", "wall_time_seconds", "cpu_seconds", "max_rss_kib", "reason"}, and the
evidence LocalBackend classifies a failure by: "timed_out", "cancel_requested", "warning_sent_at" (the
pre-walltime SIGTERM), "oom_killed" (the kernel's OOM killer ran while the job did and the payload died of a
SIGKILL nobody here sent; or, for a spec with "enforce_memory", the wrapper's own watchdog found the payload's
processes over the spec's memory_gb and killed them) and "disk_full" (the path that could not be written:
ENOSPC / EDQUOT).

A full file system does not lose the job's end: when the final record cannot be written whole (no space for the
temporary file), it is written over the job's existing "running" record, whose space is already allocated.

This module is also the local backend's scheduler (``start_queued_jobs``), so a finishing wrapper hands its slot
to the next queued job at once. One wrapper starts per job: it imports only the standard library modules it
needs (no typing, dataclasses, argparse, tempfile, nothing of ccat_dagster but ``exit_codes``). That keeps a
wrapper at ~20 ms of CPU instead of ~85 ms, which on a busy host was most of a trivial job's cost.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from ccat_dagster.execution.hpc.exit_codes import describe_exit_code

__all__ = [
    "JOB_ID_PATTERN",
    "cancel_marker_path",
    "launch_record_path",
    "main",
    "queue_marker_path",
    "read_json",
    "spec_path",
    "start_queued_jobs",
    "take_queued_job",
    "status_path",
    "write_json_atomically",
]

POLL_SECONDS = 0.2
CANCEL_MARKER_POLL_SECONDS = 1.0
# LocalBackend's cancel of a job a wrapper runs (see _Wrapper); launch records of such wrappers say so.
CANCEL_SIGNAL = signal.SIGUSR1
CANCEL_BY = {"cancel_signal": "SIGUSR1"}
ACTIVE_DIR = "active"
QUEUE_DIR = "queued"
# The first exit checks come sooner, so a short job does not hold its slot for a whole POLL_SECONDS (where the
# kernel offers a pidfd, the wrapper wakes at the payload's exit anyway; the pause bounds the other checks).
FIRST_POLL_SECONDS = 0.005
# A spec with "enforce_memory" (a packed task: its allocation's --mem covers all its tasks, so Slurm cannot hold
# one of them to its own memory_gb) has the resident memory of its payload's processes summed this often.
MEMORY_CHECK_SECONDS = 1.0
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


def queue_marker_path(state_dir: Path, sequence: str) -> Path:
    """An empty file per queued job, named by its queue position (``<time_ns>-<job_id>``): the scheduler takes
    the queue in order from the names alone, without reading a spec."""
    return state_dir / QUEUE_DIR / sequence


def write_json_atomically(path: Path, record: dict, *, durable: bool = True) -> None:
    """Write to a temporary file in the same directory, fsync, rename over `path`.

    `durable=False` skips the fsync, for records that mean nothing after the machine restarts (a launch
    record names processes that a restart ended anyway): readers still see the old or the new record whole.
    """
    temp_name = f"{path.parent}/.{path.name}.{os.getpid()}.{os.urandom(6).hex()}.tmp"
    fd = os.open(temp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(record, handle, sort_keys=True)
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.replace(temp_name, path)
    except BaseException:
        try:
            os.unlink(temp_name)
        except FileNotFoundError:
            pass
        raise


def read_json(path: Path) -> dict | None:
    """The record at `path`, or None when it does not exist (yet).

    A record being written in place (see `write_json_in_place`) may be read half-written: read again.
    """
    for pause in (0.01, 0.05, 0.2, None):
        try:
            with path.open(encoding="utf-8") as handle:
                return json.load(handle)
        except FileNotFoundError:
            return None
        except ValueError:
            if pause is None:
                raise
            time.sleep(pause)
    return None


# ENOSPC: no space left on device; EDQUOT: the user's quota is used up. Both mean "the disk is full" to a job.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# A file system with less free space than this is full for a job that failed on it (writes come in blocks).
DISK_FULL_FREE_BYTES = 1024 * 1024


def is_disk_full_error(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS


def file_system_full(path: str | Path) -> bool:
    """True when the file system holding `path` has (almost) no space left for this user."""
    try:
        stats = os.statvfs(path)
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize < DISK_FULL_FREE_BYTES


def write_json_in_place(path: Path, record: dict) -> None:
    """Overwrite the existing file `path` with `record` without allocating space: for a full file system.

    The text is padded with spaces to the old length (JSON allows trailing white space), so the file never
    shrinks under a reader; it must fit into the space the file already has (a block holds a few KiB).
    """
    text = json.dumps(record, sort_keys=True).encode()
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        old_size = os.fstat(fd).st_size
        os.pwrite(fd, text.ljust(old_size), 0)
        os.fsync(fd)
    finally:
        os.close(fd)


class _Job:
    """State of the payload this wrapper runs now."""

    def __init__(self, *, state_dir: Path, job_id: str, spec: dict) -> None:
        self.state_dir = state_dir
        self.job_id = job_id
        self.spec = spec
        self.pid: int | None = None
        self.terminate_requested = False
        self.timed_out = False
        self.warning_sent_at: float | None = None
        self.kill_at: float | None = None  # monotonic time of the SIGKILL after a SIGTERM
        self.over_memory_kib: int | None = None  # the resident memory that made the watchdog end the payload
        self.started_at = time.time()
        self.started_monotonic = time.monotonic()
        self.oom_kills_at_start = kernel_oom_kills()

    def record(self, **fields: object) -> None:
        """Write the status record. A "running" record that finds the disk full is skipped (the wrapper keeps the
        job's state itself); a final one is then written over the running record and says the disk is full."""
        path = status_path(self.state_dir, self.job_id)
        record = {"job_id": self.job_id, "wrapper_pid": os.getpid(), "started_at": self.started_at} | fields
        running = fields.get("state") == "running"
        try:
            # Only the final record must survive a restart; a "running" one names processes a restart ends.
            write_json_atomically(path, record, durable=not running)
            return
        except OSError as exc:
            if not is_disk_full_error(exc):
                raise
            if running:
                return
            error = exc
        record["disk_full"] = str(path)
        record["reason"] = (
            f"no space left on device (ENOSPC): cannot write {path}; the job: {record.get('reason') or 'done'}"
        )
        try:
            write_json_in_place(path, record)
        except OSError as exc:
            # No running record to write over either: LocalBackend finds the file system full when it looks.
            raise error from exc

    def terminate(self) -> None:
        self.terminate_requested = True
        self.terminate_group()

    def terminate_group(self) -> None:
        if self.pid is None:
            return
        if self.kill_at is None:
            self.kill_at = time.monotonic() + float(self.spec["kill_grace_seconds"])
        _signal_group(self.pid, signal.SIGTERM)


class _Wrapper:
    """One wrapper process: runs its job, then (while the queue has jobs and no shutdown was asked for) takes
    the next queued job itself instead of starting a new wrapper, so a long queue pays one interpreter start
    per slot, not per job.

    Signals: SIGTERM / SIGINT / SIGHUP (a shutdown, or a cancel sent to a wrapper of an older version) end the
    current job and take no more; SIGUSR1 is LocalBackend's cancel: it ends the current job only if that job has
    a cancel marker, so a cancel meant for the job this wrapper ran before never reaches the next one.
    """

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.job: _Job | None = None
        self.stopping = False
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self.on_terminate)
        signal.signal(CANCEL_SIGNAL, self.on_cancel)

    def on_terminate(self, _signum: int, _frame: object) -> None:
        self.stopping = True
        if self.job is not None:
            self.job.terminate()

    def on_cancel(self, _signum: int, _frame: object) -> None:
        job = self.job
        if job is not None and cancel_marker_path(self.state_dir, job.job_id).exists():
            job.terminate()

    def serve(self, job_id: str) -> int:
        code = self.run(job_id)
        while not self.stopping:
            spec = self.job.spec if self.job is not None else {}
            limit = spec.get("max_concurrent_jobs")
            if not limit:
                break  # queued by an older version: its submitter's next poll starts the next job
            try:
                job_id = take_queued_job(self.state_dir, int(limit), env=dict(os.environ))
            except OSError as exc:  # the job is recorded; the next poll of any process starts the queue instead
                print(f"local_wrapper: could not start queued jobs: {exc}", file=sys.stderr)
                break
            if job_id is None:
                break
            _redirect_output(wrapper_log_path(self.state_dir, job_id))
            code = self.run(job_id)
        return code

    def run(self, job_id: str) -> int:
        state_dir = self.state_dir
        spec = read_json(spec_path(state_dir, job_id))
        if spec is None:
            print(f"local_wrapper: no job spec {spec_path(state_dir, job_id)}", file=sys.stderr)
            self.job = None
            return 2
        job = self.job = _Job(state_dir=state_dir, job_id=job_id, spec=spec)
        if cancel_marker_path(state_dir, job_id).exists() or self.stopping:
            job.record(
                state="finished", finished_at=time.time(), exit_code=None, signal=0, reason="cancelled before start"
            )
            _unlink(active_marker_path(state_dir, job_id))
            return 0
        try:
            job.pid = _spawn(spec)
        except OSError as exc:
            exit_code = 127 if isinstance(exc, FileNotFoundError) else 126
            job.record(
                state="finished",
                finished_at=time.time(),
                exit_code=exit_code,
                signal=0,
                wall_time_seconds=0.0,
                reason=f"could not start {spec['command'][0]!r}: {exc}",
                # _spawn creates the log files: a full disk there is named by the error itself.
                disk_full=(exc.filename or spec["log_dir"]) if is_disk_full_error(exc) else None,
            )
            _unlink(active_marker_path(state_dir, job_id))
            return 0
        pid = job.pid
        job.record(state="running", pid=pid, pgid=pid)
        if job.terminate_requested:  # a cancel that arrived while the payload was being started
            job.terminate_group()

        time_limit = float(spec["time_limit_seconds"])
        warning_lead = float(spec["pre_walltime_signal_seconds"])
        # A job run on another node (a packed task in a pilot allocation) cannot be signalled by its submitter:
        # its cancel is the marker file alone, looked for about once a second.
        watch_cancel_marker = bool(spec.get("cancel_by_marker"))
        next_marker_look = 0.0
        memory_limit_kib = int(float(spec["resources"]["memory_gb"]) * 1024 * 1024) if spec.get("enforce_memory") else 0
        next_memory_check = MEMORY_CHECK_SECONDS
        exit_signal = _exit_notifier(pid)
        pause = FIRST_POLL_SECONDS
        while not _exit_observed(pid):
            elapsed = time.monotonic() - job.started_monotonic
            if watch_cancel_marker and not job.terminate_requested and elapsed >= next_marker_look:
                next_marker_look = elapsed + CANCEL_MARKER_POLL_SECONDS
                if cancel_marker_path(state_dir, job_id).exists():
                    job.terminate()
            if memory_limit_kib and job.over_memory_kib is None and elapsed >= next_memory_check:
                next_memory_check = elapsed + MEMORY_CHECK_SECONDS
                tree, resident_kib = payload_tree(pid)
                if resident_kib > memory_limit_kib:
                    # Like Slurm's OverMemoryKill: the whole payload at once (every process of the tree before
                    # its parents die and orphan them); the retry gets more memory.
                    job.over_memory_kib = resident_kib
                    _kill_all(tree)
                    _signal_group(pid, signal.SIGKILL)
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
            _wait_for_exit(exit_signal, pause)
            pause = min(pause * 2, POLL_SECONDS)
        if exit_signal is not None:
            os.close(exit_signal)

        finished_at = time.time()
        wall_time_seconds = time.monotonic() - job.started_monotonic
        # The job is over: nothing it started may outlive it (Slurm does the same at job end).
        _signal_group(pid, signal.SIGKILL)
        # wait4: this payload's own usage (this wrapper may have run other jobs before it).
        _pid, wait_status, usage = os.wait4(pid, 0)
        returncode = os.waitstatus_to_exitcode(wait_status)
        exit_code, signal_number = (returncode, 0) if returncode >= 0 else (128 - returncode, -returncode)
        described = describe_exit_code(exit_code, signal_number=signal_number or None)
        # The kernel's OOM killer SIGKILLs; a shell or container runtime reports that as exit 137.
        oom_killed = job.over_memory_kib is not None or (
            (signal_number == signal.SIGKILL or exit_code == 128 + signal.SIGKILL)
            and not job.timed_out
            and not job.terminate_requested
            and kernel_oom_kills() > job.oom_kills_at_start >= 0
        )
        disk_full = None
        if job.timed_out:
            reason: str | None = "TIMEOUT"
        elif job.terminate_requested:
            reason = "cancelled"
        elif exit_code != 0 and job.warning_sent_at is not None:
            reason = f"ended after the pre-walltime signal (SIGTERM {warning_lead:.0f} s before the limit): {described}"
        elif job.over_memory_kib is not None:
            reason = (
                f"{described}: out of memory, {job.over_memory_kib / 1048576:.2f} GiB resident against the task's "
                f"memory_gb={spec['resources']['memory_gb']} (the wrapper's memory watchdog ended it)"
            )
        elif oom_killed:
            reason = f"{described}; the kernel's OOM killer ran meanwhile: out of memory"
        elif exit_code != 0 and file_system_full(spec["log_dir"]):
            disk_full = spec["log_dir"]
            reason = f"{described}; no space left on device (ENOSPC): the file system of {disk_full} is full"
        else:
            reason = described
        job.record(
            state="finished",
            pid=pid,
            pgid=pid,
            finished_at=finished_at,
            exit_code=exit_code,
            signal=signal_number,
            wall_time_seconds=wall_time_seconds,
            cpu_seconds=usage.ru_utime + usage.ru_stime,
            # The watchdog's sum covers processes that left the payload's tree of waited-for children.
            max_rss_kib=max(usage.ru_maxrss, job.over_memory_kib or 0),
            warning_sent_at=job.warning_sent_at,
            timed_out=job.timed_out,
            cancel_requested=job.terminate_requested,
            oom_killed=oom_killed,
            disk_full=disk_full,
            reason=reason,
        )
        _unlink(active_marker_path(state_dir, job_id))
        return 0


def kernel_oom_kills() -> int:
    """How many processes the kernel's OOM killer has killed since boot (/proc/vmstat oom_kill); -1 if unknown."""
    try:
        with open("/proc/vmstat", "rb") as handle:
            for line in handle:
                if line.startswith(b"oom_kill "):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass  # the group is already gone


def _exit_notifier(pid: int) -> int | None:
    """A pidfd of the payload (readable once it exits), so the wrapper wakes at its end, not at its next look;
    None where the kernel or Python has none (the looks alone then see the end)."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _wait_for_exit(pidfd: int | None, seconds: float) -> None:
    if pidfd is None:
        time.sleep(seconds)
        return
    select.select([pidfd], [], [], seconds)


def _proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, resident pages) of every process this wrapper can see in /proc."""
    table: dict[int, tuple[int, int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as handle:
                stat = handle.read()
        except OSError:
            continue  # ended meanwhile
        # After the command name (which may hold spaces and parentheses): state, ppid, ..., rss is the 22nd.
        fields = stat[stat.rfind(b")") + 2 :].split()
        table[int(name)] = (int(fields[1]), int(fields[21]))
    return table


def _descendants(pid: int, table: dict[int, tuple[int, int]]) -> list[int]:
    """``pid`` and every process below it, whatever session, group or PID namespace they moved to (a container
    runtime's sandbox starts one of its own)."""
    children: dict[int, list[int]] = {}
    for child, (parent, _rss) in table.items():
        children.setdefault(parent, []).append(child)
    found, pending = [], [pid]
    while pending:
        current = pending.pop()
        if current in table:
            found.append(current)
        pending.extend(children.get(current, ()))
    return found


def payload_tree(pid: int) -> tuple[list[int], int]:
    """The processes of ``pid``'s tree and their resident memory in KiB (pages they share count for each)."""
    table = _proc_table()
    page_kib = os.sysconf("SC_PAGE_SIZE") // 1024
    tree = _descendants(pid, table)
    return tree, sum(table[p][1] for p in tree) * page_kib


def _kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _exit_observed(pid: int) -> bool:
    """True once the payload has exited; WNOWAIT leaves it a zombie, so its pid (= the group id) cannot
    be reused until we have killed what is left of the group."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def run(*, state_dir: Path, job_id: str) -> int:
    """Run job ``job_id``, then the queued jobs this wrapper takes over (see ``_Wrapper``)."""
    return _Wrapper(state_dir).serve(job_id)


def _spawn(spec: dict) -> int:
    """Start the payload in its own process group with exactly the job's environment (plus PATH), stdin from
    /dev/null and stdout/stderr to ``job.out`` / ``job.err``; its pid. OSError when it cannot start."""
    env = dict(spec["env"])
    env.setdefault("PATH", spec["path"])
    log_dir = spec["log_dir"]
    os.makedirs(log_dir, exist_ok=True)
    executable = _which(spec["command"][0], env["PATH"])
    out = os.open(f"{log_dir}/job.out", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    err = os.open(f"{log_dir}/job.err", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    # posix_spawn has no working-directory action here: change this process's, which only serves its jobs.
    os.chdir(spec["workdir"])
    try:
        return os.posix_spawn(
            executable,
            list(spec["command"]),
            env,
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, out, 1),
                (os.POSIX_SPAWN_DUP2, err, 2),
            ],
            setpgroup=0,
            # Python ignores SIGPIPE and SIGXFSZ; the payload gets the defaults, as with subprocess.
            setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),
        )
    finally:
        os.close(out)
        os.close(err)
        os.chdir("/")


def _which(command: str, path: str) -> str:
    """``command`` resolved like execvp does, against the job's PATH (not this process's)."""
    if "/" in command:
        return command
    for directory in path.split(os.pathsep):
        candidate = os.path.join(directory or ".", command)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise FileNotFoundError(2, f"No such file or directory (not on PATH={path!r})", command)


def _redirect_output(path: Path) -> None:
    """This wrapper's own stdout/stderr to the wrapper log of the job it takes over."""
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def wrapper_log_path(state_dir: Path, job_id: str) -> Path:
    return state_dir / f"{job_id}.wrapper.log"


# ------------------------------------------------------------------------------------------- scheduling

# A launch record without a wrapper pid older than this means the launching process died mid-launch.
LAUNCH_GRACE_SECONDS = 60.0


def start_queued_jobs(state_dir: Path, limit: int, *, env: dict[str, str]) -> list[subprocess.Popen]:
    """Start queued jobs, oldest first, while fewer than ``limit`` are running; the started wrappers.

    Under the state directory's lock, so two processes never start the same job. Reads the names in
    ``queued/`` (the queue, in order) and the launch / status records of the jobs in ``active/`` that are not
    queued (the running ones): a long queue costs a directory listing, not a read of every queued spec.
    ``env`` is the wrappers' environment (it must let them import ccat_dagster).
    """
    return _schedule(state_dir, limit, env=env, adopt=False)[1]


def take_queued_job(state_dir: Path, limit: int, *, env: dict[str, str]) -> str | None:
    """For a wrapper whose job ended: claim the oldest queued job for this process (its launch record names this
    process) and start wrappers for any further free slots, as ``start_queued_jobs``; the claimed job id."""
    return _schedule(state_dir, limit, env=env, adopt=True)[0]


def _schedule(state_dir: Path, limit: int, *, env: dict[str, str], adopt: bool) -> tuple[str | None, list]:
    adopted: str | None = None
    started: list[subprocess.Popen] = []
    with scheduler_lock(state_dir):
        queue_dir = state_dir / QUEUE_DIR
        if not queue_dir.is_dir():
            _index_queue(state_dir)
        queued = sorted(os.listdir(queue_dir))
        if not queued:
            return adopted, started
        queued_ids = {name.rpartition("-")[2] for name in queued}
        running = 0
        for job_id in os.listdir(state_dir / ACTIVE_DIR):
            if job_id in queued_ids or not JOB_ID_PATTERN.fullmatch(job_id):
                continue
            status = read_json(status_path(state_dir, job_id)) or {}
            if status.get("state") == "finished":
                # A wrapper that was killed before removing its marker: its final record says it ended.
                _unlink(active_marker_path(state_dir, job_id))
                continue
            launch = read_json(launch_record_path(state_dir, job_id))
            if launch is not None and wrapper_alive(launch, status):
                running += 1
        for name in queued:
            if running >= limit:
                break
            job_id = name.rpartition("-")[2]
            _unlink(queue_dir / name)
            if not JOB_ID_PATTERN.fullmatch(job_id) or not spec_path(state_dir, job_id).exists():
                continue  # the marker of a submission that failed half-way
            if cancel_marker_path(state_dir, job_id).exists():
                _unlink(active_marker_path(state_dir, job_id))  # cancelled while queued: never starts
                continue
            running += 1
            if adopt and adopted is None:
                pid = os.getpid()
                record = {"launched_at": time.time(), "wrapper_pid": pid, "wrapper_start_ticks": start_ticks(pid)}
                write_json_atomically(launch_record_path(state_dir, job_id), record | CANCEL_BY, durable=False)
                adopted = job_id
                continue
            process = _launch(state_dir, job_id, env)
            if process is not None:
                started.append(process)
    return adopted, started


def _index_queue(state_dir: Path) -> None:
    """Build ``queued/`` for a state directory written before it existed: every active job not yet launched."""
    queue_dir = state_dir / QUEUE_DIR
    temp_dir = state_dir / f".{QUEUE_DIR}.{os.getpid()}"
    temp_dir.mkdir(exist_ok=True)
    for job_id in os.listdir(state_dir / ACTIVE_DIR):
        if not JOB_ID_PATTERN.fullmatch(job_id) or launch_record_path(state_dir, job_id).exists():
            continue
        spec = read_json(spec_path(state_dir, job_id))
        if spec is not None and spec.get("sequence"):
            (temp_dir / spec["sequence"]).touch()
    os.rename(temp_dir, queue_dir)


def _launch(state_dir: Path, job_id: str, env: dict[str, str]) -> subprocess.Popen | None:
    launch_path = launch_record_path(state_dir, job_id)
    # Recorded before the start so that a crash right after Popen cannot make the job look queued
    # (and be started a second time by another process).
    write_json_atomically(launch_path, {"launched_at": time.time(), "wrapper_pid": None}, durable=False)
    wrapper_log = open(wrapper_log_path(state_dir, job_id), "ab")  # noqa: SIM115 - closed below
    try:
        process = subprocess.Popen(
            # -S: the wrapper needs only the standard library and ccat_dagster (on PYTHONPATH), and skipping
            # site-packages saves tens of ms per job.
            [sys.executable, "-S", "-m", WRAPPER_MODULE, "--state-dir", str(state_dir), "--job-id", job_id],
            stdin=subprocess.DEVNULL,
            stdout=wrapper_log,
            stderr=subprocess.STDOUT,
            # Own session: the job survives this process, and signals to our group do not reach it.
            start_new_session=True,
            env=env,
            cwd="/",
        )
    except OSError as exc:
        write_json_atomically(
            status_path(state_dir, job_id),
            {
                "state": "finished",
                "finished_at": time.time(),
                "exit_code": None,
                "signal": 0,
                "reason": f"could not start the local job wrapper: {exc}",
            },
        )
        return None
    finally:
        wrapper_log.close()
    write_json_atomically(
        launch_path,
        {"launched_at": time.time(), "wrapper_pid": process.pid, "wrapper_start_ticks": start_ticks(process.pid)}
        | CANCEL_BY,
        durable=False,
    )
    return process


WRAPPER_MODULE = "ccat_dagster.execution.hpc.local_wrapper"


class scheduler_lock:  # noqa: N801 - used as a context manager, like a function
    """The state directory's exclusive lock (``.scheduler.lock``): held while queueing decisions are made."""

    def __init__(self, state_dir: Path) -> None:
        self.path = f"{state_dir}/.scheduler.lock"
        self.fd = -1

    def __enter__(self) -> None:
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *_exc: object) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def wrapper_pid(launch: dict | None, status: dict | None) -> int | None:
    return (launch or {}).get("wrapper_pid") or (status or {}).get("wrapper_pid")


def wrapper_alive(launch: dict | None, status: dict | None) -> bool:
    """Whether the wrapper named by a job's launch record (or status record) still runs."""
    pid = wrapper_pid(launch, status)
    if pid is None:
        return time.time() - (launch or {}).get("launched_at", 0) < LAUNCH_GRACE_SECONDS
    return process_alive(pid, (launch or {}).get("wrapper_start_ticks"))


def start_ticks(pid: int) -> int | None:
    """Process start time in clock ticks since boot (field 22 of /proc/<pid>/stat): tells a live
    process from a later one that got the same pid."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            stat = handle.read()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[19])


def process_alive(pid: int, start_ticks_expected: int | None) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            stat = handle.read()
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
    return start_ticks_expected is None or int(fields[19]) == start_ticks_expected


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    usage = "usage: python -m ccat_dagster.execution.hpc.local_wrapper --state-dir DIR --job-id JOB_ID"
    if len(args) != 4 or args[0] != "--state-dir" or args[2] != "--job-id":
        print(f"{usage}\n(got {args!r})", file=sys.stderr)
        return 2
    state_dir, job_id = Path(args[1]), args[3]
    if not JOB_ID_PATTERN.fullmatch(job_id):
        print(f"{usage}\n--job-id {job_id!r} is not a local job id", file=sys.stderr)
        return 2
    return run(state_dir=state_dir, job_id=job_id)


if __name__ == "__main__":
    sys.exit(main())
