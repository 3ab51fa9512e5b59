"""The body of every packed task, run by a worker inside an allocation: the job wrapper, which records the task.

A new interpreter per task (~40 ms with its imports) was most of a short task's cost, and so is a fork of the
worker itself (~8 ms: it holds Parsl, ZeroMQ and their threads). So each worker keeps a small launcher process
(``launcher``), started on its first task, which forks the wrapper for each task in ~1 ms. A launcher that has
died is replaced on the next task; the task it was running is not run again here: the worker waits for the
orphaned wrapper (the launcher names it as soon as it forks), which records the task's end as ever.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import threading
import time

_local = threading.local()  # one launcher per worker thread: a test's thread engine runs tasks side by side


def run_task(state_dir: str, job_id: str) -> int:
    """Run the job wrapper for task ``job_id`` of ``state_dir``; the wrapper's exit status (1: the launcher died).

    What the task did is in its status record; the status returned here only says whether the wrapper itself
    ran to its end."""
    launcher: subprocess.Popen | None = getattr(_local, "launcher", None)
    if launcher is None or launcher.poll() is not None:
        launcher = _local.launcher = _start_launcher()
    wrapper_pid = reply = b""
    try:
        launcher.stdin.write(json.dumps([state_dir, job_id]).encode() + b"\n")  # type: ignore[union-attr]
        launcher.stdin.flush()  # type: ignore[union-attr]
        wrapper_pid = launcher.stdout.readline()  # type: ignore[union-attr]
        reply = launcher.stdout.readline()  # type: ignore[union-attr]
    except OSError:
        pass
    if reply.strip():
        return int(reply)
    _local.launcher = None
    print(f"ccat packed task {job_id}: the wrapper launcher ended while the task ran", file=sys.stderr)
    if wrapper_pid.strip():
        # The orphaned wrapper still runs the task and will record it: the task is this worker's until then, or
        # the backend would call it lost and its retry would run beside it.
        _wait_for_process(int(wrapper_pid))
    return 1


def _wait_for_process(pid: int) -> None:
    """Until process ``pid`` (not a child of this one) has ended."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except (AttributeError, OSError):  # no pidfd here: look once a second
        while _alive(pid):
            time.sleep(1.0)
        return
    try:
        select.select([pidfd], [], [])
    finally:
        os.close(pidfd)


def _alive(pid: int) -> bool:
    """Running: not gone, and not a zombie its new parent has yet to collect."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] not in (b"Z", b"X")


def _start_launcher() -> subprocess.Popen:
    # The worker's own interpreter (the allocation's environment has the package); stderr is the worker's log.
    return subprocess.Popen(
        [sys.executable, "-m", "ccat_dagster.execution.hpc.packed.launcher"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        close_fds=True,
    )
