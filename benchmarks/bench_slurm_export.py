"""How long slurmd takes to start a batch job: `--export=NONE` (the login environment loaded on the node) against
sbatch run with a clean environment and `--export=ALL` (what SlurmBackend does).

With `--export=NONE` Slurm loads the user's login environment on the node before the batch script starts (as
with `--get-user-env`: a login shell is run and its environment read back). Each job here prints its own start
time (`date +%s.%N`); latency = job start − sbatch return, one job at a time on the single node, alternating the
two ways so that both see the same load. Both scripts export the same job environment; only the way the
environment reaches the node differs.

Run:  .venv/bin/python benchmarks/bench_slurm_export.py [--jobs 10] [--write-docs]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_common import machine, write_section  # noqa: E402

from ccat_dagster.execution.hpc.slurm.submit_script import sbatch_environment  # noqa: E402

SECTION = "## Slurm job start: --export=NONE against a clean environment"
WAYS = {
    "--export=NONE (login environment on the node)": "NONE",
    "clean sbatch environment, --export=ALL (SlurmBackend)": "ALL",
}


def script(export: str, out: Path) -> str:
    return (
        "#!/bin/bash\n"
        "#SBATCH --job-name=ccat-bench-export\n#SBATCH --ntasks=1\n#SBATCH --cpus-per-task=1\n#SBATCH --mem=1G\n"
        f"#SBATCH --time=00:05:00\n#SBATCH --output={out}.log\n#SBATCH --export={export}\n"
        "export CCAT_JOB=bench\n"
        f"exec date +%s.%N > {out}\n"
    )


def one_job(work: Path, index: int, export: str) -> float:
    out = work / f"job-{export}-{index}"
    path = work / f"job-{export}-{index}.sbatch"
    path.write_text(script(export, out))
    env = sbatch_environment(os.environ) if export == "ALL" else dict(os.environ)
    result = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True, env=env, check=True)
    submitted = time.time()
    deadline = submitted + 120
    while not (out.exists() and out.read_text().strip()):
        if time.time() > deadline:
            raise RuntimeError(f"job {result.stdout.strip()} did not start within 120 s")
        time.sleep(0.02)
    return float(out.read_text()) - submitted


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=10, help="jobs per way")
    parser.add_argument("--write-docs", action="store_true", help="write the results into docs/benchmarks.md")
    args = parser.parse_args()
    load_before = os.getloadavg()
    latencies: dict[str, list[float]] = {name: [] for name in WAYS}
    with tempfile.TemporaryDirectory(prefix="ccat-bench-export-") as temp:
        work = Path(temp)
        for index in range(args.jobs):
            for name, export in WAYS.items():
                latencies[name].append(one_job(work, index, export))
    load_after = os.getloadavg()
    rows = [
        f"| {name} | {len(values)} | **{statistics.median(values) * 1000:.0f} ms** | "
        f"{min(values) * 1000:.0f} ms | {max(values) * 1000:.0f} ms |"
        for name, values in latencies.items()
    ]
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    report = (
        f"{SECTION}\n\n"
        f"Run on {now} with `.venv/bin/python benchmarks/bench_slurm_export.py --jobs {args.jobs} --write-docs` "
        f"(load average before / after: {' '.join(f'{x:.2f}' for x in load_before)} / "
        f"{' '.join(f'{x:.2f}' for x in load_after)}; the machine and its Slurm are shared with other work).\n\n"
        f"{machine()}\n"
        "- The single-node Slurm of scripts/slurm-single-node.sh; one job at a time, the two ways alternating. "
        "Latency = the job's own start time (`date +%s.%N`) − the return of sbatch.\n\n"
        "| way | jobs | start latency median | min | max |\n|---|---:|---:|---:|---:|\n" + "\n".join(rows) + "\n\n"
        "Notes:\n"
        "- With `--export=NONE` Slurm loads the user's login environment on the node before the script starts "
        "(sbatch(1): as if `--get-user-env` were given); the clean way skips that. The job's environment is the "
        "same in both: Slurm's SLURM_* variables, PATH (and SLURM_CONF), and what the script exports.\n"
    )
    print(report)
    if args.write_docs:
        write_section(SECTION, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
