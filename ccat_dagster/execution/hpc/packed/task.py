"""The body of every packed task, run by a worker inside an allocation: the job wrapper, which records the task.

The worker forks, and the child runs the job wrapper (``local_wrapper``) on the task's spec: a process of its own
for the wrapper's signal handlers, its payload's process group and its file descriptors, without the ~40 ms of
a new interpreter and its imports per task, which was most of a short task's cost. The wrapper's module needs
the standard library only, imported once per worker.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback


def run_task(state_dir: str, job_id: str) -> int:
    """Run the job wrapper for task ``job_id`` of ``state_dir`` in a forked child; its exit status.

    What the task did is in its status record (the wrapper writes it); the status returned here only says whether
    the wrapper itself ran to its end."""
    from ccat_dagster.execution.hpc import local_wrapper

    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the worker's code
        code = 1
        try:
            _reset_child_process()
            code = local_wrapper.main(["--state-dir", state_dir, "--job-id", job_id])
        except BaseException:  # noqa: BLE001 - the child must end here whatever happened
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _pid, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _reset_child_process() -> None:
    """What a fresh wrapper process would have: stdin from /dev/null, default signal dispositions, no signal
    blocked (the worker's own settings are not the wrapper's)."""
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # as Python starts; the payload gets the default back
