"""The wrapper launcher of a pilot worker: a small process that forks the job wrapper for each packed task.

A Parsl worker process holds Parsl, ZeroMQ and its threads (~80 MB); forking it costs ~8 ms a task, more than
the wrapper's own work (~2.5 ms for a trivial payload). This process imports the wrapper's module only, so its
fork costs a fraction of a millisecond. ``task.run_task`` starts one per worker (per thread) on its first task
and keeps it; the wrapper it forks is the same process as ever (its own signal handlers, payload process
group, status record).

Protocol, one task at a time: a JSON line ``[state_dir, job_id]`` on stdin, answered by a line with the
wrapper's pid as soon as it is forked, then a line with its exit status once it has ended. Should the launcher
die in between, the worker still knows which process to wait for (the wrapper outlives it and records the
task). End of stdin (the worker is gone) ends the launcher.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback

from ccat_dagster.execution.hpc import local_wrapper


def run_wrapper(state_dir: str, job_id: str, *, stdout_fd: int = 2, on_fork=lambda _pid: None) -> int:  # type: ignore[no-untyped-def]
    """Fork, run the wrapper on task ``job_id`` in the child, tell ``on_fork`` its pid, wait for it; its exit status.

    The child gets stdin from /dev/null and ``stdout_fd`` as its stdout, so that it holds no end of a pipe its
    parent talks through (an orphaned wrapper must not keep the launcher's channel open)."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the caller's code
        code = 1
        try:
            _reset_child_process(stdout_fd)
            code = local_wrapper.main(["--state-dir", state_dir, "--job-id", job_id])
        except BaseException:  # noqa: BLE001 - the child must end here whatever happened
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    on_fork(pid)
    _pid, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _reset_child_process(stdout_fd: int) -> None:
    """What a fresh wrapper process would have: stdin from /dev/null, default signal dispositions, no signal
    blocked (the parent's own settings are not the wrapper's)."""
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    if stdout_fd != 1:
        os.dup2(stdout_fd, 1)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # as Python starts; the payload gets the default back


def serve(requests, replies) -> None:  # type: ignore[no-untyped-def]
    """Answer each request line of ``requests`` (binary) with the wrapper's exit status on ``replies``."""

    def reply(value: int) -> None:
        replies.write(f"{value}\n".encode())
        replies.flush()

    for line in requests:
        state_dir, job_id = json.loads(line)
        reply(run_wrapper(str(state_dir), str(job_id), on_fork=reply))


if __name__ == "__main__":
    serve(sys.stdin.buffer, sys.stdout.buffer)
