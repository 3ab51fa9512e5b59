"""The step runner's own cost per sub-group: the loop alone, on the in-memory attempt store and a scripted backend.

No database, no files, no processes: ``StepRunner.execute`` with tests/loop_fakes.py (in-memory store, scripted
backend, fake clock), so what is measured is the loop's bookkeeping — rounds, polls, outcome building, retry
decisions, the ops-db retry wrapper — per sub-group, for batches of 1,000 and 10,000 sub-groups. Scenarios: all
succeed; 10 % run out of memory once (escalated retry); the scheduler does not answer for 50 polls in a row.
The real store's cost per round is in the "Scale" section (benchmarks/bench_scale.py).

Run:  .venv/bin/python benchmarks/bench_runner_loop.py [--repeat 3] [--write-docs]
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_common import write_section  # noqa: E402

from ccat_dagster.execution.hpc.base import SchedulerCommandError  # noqa: E402
from tests.loop_fakes import ScriptedBackend, make_loop  # noqa: E402

SECTION = "## Runner loop"


def scenario(name: str, sub_groups: int) -> tuple[float, int, int]:
    """(CPU seconds, status queries, attempts) of one batch."""
    keys = [f"scan={i:05d}" for i in range(sub_groups)]
    script = {k: ["oom", "ok"] for k in keys[::10]} if name == "10 % oom once" else {}
    backend = ScriptedBackend(script, polls=3)
    queries = 0

    def count() -> None:
        nonlocal queries
        queries += 1

    backend.on_status = count
    if name == "scheduler away for 50 polls":
        backend.status_errors = [
            SchedulerCommandError("Unable to contact slurm controller", command=["squeue"], returncode=1, stderr="")
            for _ in range(50)
        ]
    loop = make_loop(backend, max_in_flight=sub_groups, scheduler_tolerance_seconds=86_400)
    began = time.process_time()  # CPU time: the shared machine's load would swamp wall time
    outcomes = loop.run(keys)
    elapsed = time.process_time() - began
    assert all(o.kind.value == "completed" for o in outcomes.values()), "the benchmark's batch must succeed"
    return elapsed, queries, len(loop.store.rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--write-docs", action="store_true", help="write the results into docs/benchmarks.md")
    args = parser.parse_args(argv)
    logging.getLogger("ccat_dagster").setLevel(logging.ERROR)  # the scheduler scenario warns on every query
    load_before = os.getloadavg()
    rows = []
    for name in ("all succeed", "10 % oom once", "scheduler away for 50 polls"):
        for size in (1_000, 10_000):
            runs = [scenario(name, size) for _ in range(args.repeat)]
            wall = statistics.median(r[0] for r in runs)
            rows.append((name, size, runs[0][2], runs[0][1], wall, wall / size * 1e6))
            print(f"{name:28} {size:>6} sub-groups: {wall:.3f} s CPU, {wall / size * 1e6:.0f} µs per sub-group")
    load_after = os.getloadavg()
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        "unknown CPU",
    )
    lines = [
        SECTION,
        "",
        f"Run on {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC with `.venv/bin/python benchmarks/bench_runner_loop.py "
        f"--repeat {args.repeat} --write-docs` (load average before / after: "
        f"{' '.join(f'{x:.2f}' for x in load_before)} / {' '.join(f'{x:.2f}' for x in load_after)}; the machine is "
        "shared with other work).",
        "",
        f"- CPU: {cpu}; `nproc` = {os.cpu_count()}; one Python process, no database (the in-memory attempt store)",
        "- `StepRunner.execute` on tests/loop_fakes.py: every job runs for 3 polls; `max_in_flight` = the batch, so "
        "one submission round; the fake clock makes every wait free. Figures are the process's CPU time "
        "(`time.process_time`), the loop's own work, less swayed by the shared machine's load than wall time.",
        "",
        "| scenario | sub-groups | attempts | status queries | CPU time (median) | per sub-group |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, size, attempts, queries, wall, per in rows:
        lines.append(f"| {name} | {size:,} | {attempts:,} | {queries} | {wall * 1000:.0f} ms | {per:.0f} µs |")
    lines += [
        "",
        "Notes:",
        "- Compare the per-sub-group column between 1,000 and 10,000 to see whether the loop stays linear.",
        "- A scheduler that does not answer costs queries, not work: each failed query is one log line (throttled "
        "in the run log) and a longer pause.",
        "",
    ]
    print("\n".join(lines))
    if args.write_docs:
        write_section(SECTION, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
