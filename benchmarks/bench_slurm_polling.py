"""Scheduler calls and wall time of one batch of trivial Slurm jobs: the runner's pacing against the sbatch floor.

Three ways run the same N jobs of `/bin/true` on the single-node Slurm, interleaved in rounds so that all see
the same load:

- floor: N × `sbatch --wrap true`, then one `squeue` per second until none is left (the least any
  orchestrator can do with one job per item);
- short polls: the StepRunner on SlurmBackend with a budget so large it never binds (the former pacing: 0.2 s
  after every change, ×1.5 up to 2 s);
- budget 20/min: the StepRunner at the production pacing (SCHEDULER_QUERIES_PER_MINUTE=20).

The runner's attempts live in the in-memory store and the jobs are prepared without containers: what is
measured is the loop's traffic to slurmctld and its wall time, not ops-db. squeue, sacct and scontrol are shims
on PATH that log every call.

Run:  .venv/bin/python benchmarks/bench_slurm_polling.py [--jobs 50] [--rounds 2] [--write-docs]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_common import machine, write_section  # noqa: E402

from ccat_dagster.execution import contract  # noqa: E402
from ccat_dagster.execution.attempts import InMemoryAttemptStore  # noqa: E402
from ccat_dagster.execution.hpc.base import JobResources, JobSpec  # noqa: E402
from ccat_dagster.execution.hpc.slurm.backend import SlurmBackend  # noqa: E402
from ccat_dagster.execution.preparation import AttemptPreparation  # noqa: E402
from ccat_dagster.execution.runner import OutcomeKind, RunnerConfig, StepRunner  # noqa: E402
from tests.loop_fakes import STEP, plan  # noqa: E402

SECTION = "## Slurm status polling: scheduler calls per minute"
COMMANDS = ("squeue", "sacct", "scontrol")


class TruePreparation(AttemptPreparation):
    def __init__(self, base: Path, run_name: str) -> None:
        self.base = base
        self.run_name = run_name

    def layout(self, sub_group_key: str, attempt_id: int) -> contract.AttemptLayout:
        return contract.attempt_layout(
            base_dir=self.base,
            pipeline="p",
            sub_group_key=sub_group_key,
            step="s",
            attempt_id=attempt_id,
            is_final=True,
        )

    def stage(self, plans):
        return {p.sub_group_key: {} for p in plans}

    def prepare(self, plan, attempt, *, resources, staged, run_id):
        return JobSpec(
            command=["/bin/true"],
            resources=JobResources(cpu=1, memory_gb=0.25, time_hours=0.1),
            env={},
            job_name=f"ccat-bench-poll-{self.run_name}-{attempt.attempt_id}",
            log_dir=self.layout(plan.sub_group_key, attempt.attempt_id).attempt_dir / "logs",
        )

    def discover(self, layout):
        return []


def shims(directory: Path, log: Path) -> None:
    directory.mkdir(parents=True)
    for name in COMMANDS:
        real = shutil.which(name)
        if real is None:
            raise SystemExit(f"{name} not on PATH: this benchmark needs the Slurm client commands")
        shim = directory / name
        shim.write_text(f'#!/bin/sh\necho "$(date +%s.%N) {name}" >> "{log}"\nexec "{real}" "$@"\n')
        shim.chmod(0o755)


def calls_since(log: Path, began: float) -> list[float]:
    if not log.exists():
        return []
    return [float(line.split()[0]) for line in log.read_text().splitlines() if float(line.split()[0]) >= began]


def most_in_a_minute(times: list[float]) -> int:
    return max((sum(1 for u in times if t <= u < t + 60) for t in times), default=0)


def floor(work: Path, jobs: int, index: int) -> float:
    began = time.time()
    ids = []
    for i in range(jobs):
        out = subprocess.run(
            [
                "sbatch",
                "--parsable",
                "--mem=256M",
                "--time=5",
                f"--output={work}/floor-{index}-{i}.out",
                "--wrap",
                "true",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        ids.append(out.stdout.strip().split(";")[0])
    while subprocess.run(
        ["squeue", "--noheader", f"--jobs={','.join(ids)}", "--format=%i"], capture_output=True, text=True
    ).stdout.strip():
        time.sleep(1.0)
    return time.time() - began


def runner_batch(work: Path, jobs: int, index: int, *, budget: float) -> float:
    name = f"b{int(budget)}-{index}"
    runner = StepRunner(
        engine=None,
        backend=SlurmBackend(),
        runtime=None,
        stager=None,
        config=RunnerConfig(
            pipeline_base_dir=work,
            processing_location_id=1,
            sif_cache_dir=work,
            max_in_flight=jobs,
            scheduler_queries_per_minute=budget,
            status_cache_dir=work / name / "status-cache",  # a way of its own: the budget is per location
        ),
        store=InMemoryAttemptStore(),
        preparation=TruePreparation(work / name, name),
    )
    began = time.time()
    outcomes = runner.execute(
        step=STEP, plans=[plan(f"{name}-item-{i}") for i in range(jobs)], dagster_run_id=f"bench-{name}"
    )
    elapsed = time.time() - began
    bad = [o for o in outcomes.values() if o.kind is not OutcomeKind.COMPLETED]
    if bad:
        raise SystemExit(f"{len(bad)} job(s) did not complete: {bad[0]}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    ways = {
        "sbatch floor (N × sbatch --wrap, squeue each second)": lambda w, i: floor(w, args.jobs, i),
        "StepRunner, short polls (former pacing)": lambda w, i: runner_batch(w, args.jobs, i, budget=100_000),
        "StepRunner, budget 20 calls/min (default)": lambda w, i: runner_batch(w, args.jobs, i, budget=20),
    }
    results: dict[str, list[tuple[float, int, int]]] = {name: [] for name in ways}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="ccat-bench-poll-", dir="/tmp") as temp:
        work = Path(temp)
        log = work / "calls.log"
        shims(work / "bin", log)
        os.environ["PATH"] = f"{work / 'bin'}{os.pathsep}{os.environ['PATH']}"
        for index in range(args.rounds):
            for name, way in ways.items():
                began = time.time()
                elapsed = way(work, index)
                times = calls_since(log, began)
                results[name].append((elapsed, len(times), most_in_a_minute(times)))
                calls = len(times)
                print(f"round {index}: {name}: {elapsed:.1f} s, {calls} scheduler calls", flush=True)
    load_after = os.getloadavg()
    floor_wall = statistics.median(e for e, _, _ in results[next(iter(ways))])
    rows = []
    for name, values in results.items():
        wall = statistics.median(e for e, _, _ in values)
        rows.append(
            f"| {name} | {wall:.1f} s | {wall / floor_wall:.2f}× | {statistics.median(c for _, c, _ in values):.0f} | "
            f"{statistics.median(c / e * 60 for e, c, _ in values):.1f} | **{max(m for _, _, m in values)}** |"
        )
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    report = (
        f"{SECTION}\n\n"
        f"Run on {now} with `.venv/bin/python benchmarks/bench_slurm_polling.py --jobs {args.jobs} --rounds "
        f"{args.rounds} --write-docs` (load average before / after: {' '.join(f'{x:.2f}' for x in load_before)} / "
        f"{' '.join(f'{x:.2f}' for x in load_after)}; the machine and its Slurm are shared with other work, so "
        "compare the rows with each other, not with other runs).\n\n"
        f"{machine()}\n"
        f"- The single-node Slurm of scripts/slurm-single-node.sh (2 CPUs); {args.jobs} jobs of `/bin/true` per "
        f"way, the ways interleaved, {args.rounds} round(s), medians. Calls = squeue + sacct + scontrol, counted "
        "by shims on PATH (the floor's own once-a-second squeue included).\n\n"
        "| way | wall | × floor | scheduler calls | calls per minute of batch | most in any 60 s |\n"
        "|---|---:|---:|---:|---:|---:|\n"
        + "\n".join(rows)
        + "\n\nTarget: ≤ 20 scheduler calls per minute at steady state, one query for all jobs of a location. "
        "The budget costs latency at the end of a batch (a finished job is seen up to one pause, 3–6 s, late) "
        "and nothing while jobs are queued behind each other.\n"
    )
    print(report)
    if args.write_docs:
        write_section(SECTION, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
