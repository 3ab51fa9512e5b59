"""The suite's pytest-xdist units on a real ``pytest -n 2 --dist loadgroup`` run (tests/conftest.py).

A canary for the scheduler the suite installs: pytest-xdist's own loadgroup stopped grouping under pytest 9, and
nothing failed, the Slurm tests merely overlapped. Here two files that use the Slurm mark must run on one
worker, and the tests of one plain file on one worker too."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SLURM_FILE = """import time

import pytest

pytestmark = [pytest.mark.slurm]


def test_one():
    time.sleep(0.2)


def test_two():
    time.sleep(0.2)
"""
PLAIN_FILE = SLURM_FILE.replace("pytestmark = [pytest.mark.slurm]\n", "")


def test_slurm_files_share_one_worker_and_a_file_stays_on_one(tmp_path):
    (tmp_path / "conftest.py").write_text(
        "import pytest\n"
        "from tests.conftest import pytest_xdist_make_scheduler  # noqa: F401\n\n\n"
        "def pytest_configure(config):\n"
        "    config.addinivalue_line('markers', 'slurm: test on the single-node Slurm')\n"
    )
    for name in ("test_slurm_a.py", "test_slurm_b.py"):
        (tmp_path / name).write_text(SLURM_FILE)
    for name in ("test_plain_a.py", "test_plain_b.py"):
        (tmp_path / name).write_text(PLAIN_FILE)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-n",
            "2",
            "--dist",
            "loadgroup",
            "-v",
            "-p",
            "no:cacheprovider",
            "-c",
            "/dev/null",
        ]
        + ["--rootdir", str(tmp_path), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    workers: dict[str, set[str]] = {}
    for worker, test_file in re.findall(r"\[(gw\d+)\] \[ *\d+%\] PASSED \S*?(test_\w+\.py)::", done.stdout):
        workers.setdefault(test_file, set()).add(worker)
    assert len(workers) == 4, done.stdout
    assert all(len(ran_on) == 1 for ran_on in workers.values()), workers
    assert workers["test_slurm_a.py"] == workers["test_slurm_b.py"], workers


def test_fault_figures_travel_from_a_worker_to_the_page_the_controller_writes(monkeypatch):
    """A worker's fault figures reach the controller's writer of docs/reliability.md, under the key both sides use.

    The hooks run as pytest-xdist calls them: the worker's session finish with ``config.workeroutput``, the
    controller's node-down with the node's ``workeroutput``, then the controller's session finish."""
    from types import SimpleNamespace

    import tests.conftest as root
    import tests.faults.conftest as faults
    from tests.faults.harness import OUTCOMES, Outcome

    written: list[list[Outcome]] = []
    monkeypatch.setattr(faults, "write_reliability", written.append)
    monkeypatch.setattr(root, "_fault_outcomes_from_workers", [])
    figures = Outcome("worker_sigkill_local", survived=True, recovery_seconds=12.5, note="reattached")
    saved = list(OUTCOMES)
    OUTCOMES[:] = [figures]
    try:
        worker_config = SimpleNamespace(workeroutput={})
        faults.pytest_sessionfinish(SimpleNamespace(config=worker_config), 0)
        assert written == [], "a worker must not write the page itself"

        root.pytest_testnodedown(SimpleNamespace(workeroutput=worker_config.workeroutput), None)
        root.pytest_sessionfinish(SimpleNamespace(config=SimpleNamespace()), 0)
    finally:
        OUTCOMES[:] = saved
    assert written == [[figures]]
