"""What the default demo prints, and what it costs: lines by kind and the CPU time of each command.

Runs ``ccat-dagster db upgrade``, ``demo seed`` and ``demo run`` (the installed entry point of this venv) in a
fresh temporary directory with no CCAT_* or DAGSTER_* variables, as a new user would, and reports for
``demo run``: total lines, lines with a log level (DEBUG / INFO / WARNING / ERROR), Python warnings, run state
lines, progress-bar lines; and wall and CPU seconds (user + system of the command and its children) per command.

    .venv/bin/python benchmarks/bench_demo_output.py [--scans 20]
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLI = Path(sys.executable).parent / "ccat-dagster"


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scans", type=int, default=20)
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CCAT_", "DAGSTER_"))}
    with tempfile.TemporaryDirectory() as work:
        output = ""
        for command in (["db", "upgrade"], ["demo", "seed", "--scans", str(args.scans)], ["demo", "run"]):
            wall, cpu = time.monotonic(), _cpu()
            result = subprocess.run([str(CLI), *command], cwd=work, env=env, capture_output=True, text=True)
            print(
                f"{' '.join(command)}: exit {result.returncode}, {time.monotonic() - wall:.1f} s wall, "
                f"{_cpu() - cpu:.1f} s CPU"
            )
            output = result.stdout + result.stderr
    lines = output.splitlines()
    levels = {
        level: sum(1 for line in lines if f" - {level} - " in line) for level in ("DEBUG", "INFO", "WARNING", "ERROR")
    }
    print(
        f"demo run: {len(lines)} lines; by log level {levels}; "
        f"Python warnings {sum(1 for line in lines if re.search(r'Warning: ', line))}; "
        f"run state lines {sum(1 for line in lines if re.match(r'  run [0-9a-f]{8} ', line))}; "
        f"progress bars {sum(1 for line in lines if '━' in line)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
