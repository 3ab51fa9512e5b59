"""The body of every packed task, run by a worker inside an allocation: the job wrapper, which records the task.

Its own module with nothing but the standard library: a worker imports it to run its first task, and on a
busy node importing the backend's modules (ops-db enums, SQLAlchemy) would delay the first task by seconds.
"""

from __future__ import annotations

import subprocess


def run_task(argv: list[str]) -> int:
    return subprocess.run(argv, check=False, stdin=subprocess.DEVNULL).returncode
