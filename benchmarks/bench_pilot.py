"""Side by side on the single-node Slurm: the sbatch floor, ccat-dagster one job per sub-group, ccat-dagster
packed, and Parsl's HighThroughputExecutor on its own, for the same trivial payload (`/bin/true`).

Ways, interleaved within each N (same load for all):
- floor, loop: N × `sbatch --wrap true`, then `squeue` once a second until none is left;
- floor, array: one `sbatch --array=1-N --wrap true`, the same wait;
- ccat-dagster one job per sub-group: StepRunner + SlurmBackend at the default pacing (20 calls per minute);
- ccat-dagster packed: StepRunner + PackedBackend + ParslEngine (PACKED_* defaults: 2 allocations of 2 cores);
- Parsl HTEX alone: the same engine settings driven by Parsl directly, in a venv of its own (the peers' venv,
  created and filled from PyPI on first use; `--peers-venv`).

The StepRunner ways use the in-memory attempt store and no container (the loop and the backend are measured,
not ops-db or Apptainer). squeue, sacct and scontrol are shims on PATH that log every call, for all ways.
Snakemake + its Slurm executor plugin and dagster-slurm are not run by this script (see docs/benchmarks.md).

Run:  .venv/bin/python benchmarks/bench_pilot.py [--items 50 200] [--rounds 1] [--write-docs]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_common import machine, write_section  # noqa: E402
from bench_slurm_polling import TruePreparation, calls_since, floor, runner_batch, shims  # noqa: E402

from ccat_dagster.execution.attempts import InMemoryAttemptStore  # noqa: E402
from ccat_dagster.execution.hpc.packed.backend import PackedBackend  # noqa: E402
from ccat_dagster.execution.hpc.packed.engine import ParslEngine, PilotSettings  # noqa: E402
from ccat_dagster.execution.runner import OutcomeKind, RunnerConfig, StepRunner  # noqa: E402
from tests.loop_fakes import STEP, plan  # noqa: E402

SECTION = "## Many sub-groups per allocation: packed execution against the floor and Parsl"
SMALL = STEP.__class__(**{**STEP.__dict__, "resources": STEP.resources.__class__(cpu=1, memory_gb=0.5, time_hours=0.1)})
PARSL_ALONE = textwrap.dedent(
    """
    import subprocess, sys, time
    import parsl
    from parsl.config import Config
    from parsl.dataflow.dflow import DataFlowKernel
    from parsl.executors import HighThroughputExecutor
    from parsl.launchers import SingleNodeLauncher
    from parsl.providers import SlurmProvider

    def run_task(argv):
        import subprocess
        return subprocess.run(argv, check=False).returncode

    n, run_dir = int(sys.argv[1]), sys.argv[2]
    began = time.time()
    provider = SlurmProvider(nodes_per_block=1, cores_per_node=2, init_blocks=0, min_blocks=0, max_blocks=2,
                             walltime="00:30:00", exclusive=False, scheduler_options="#SBATCH --mem=1280M",
                             launcher=SingleNodeLauncher(), cmd_timeout=60)
    config = Config(executors=[HighThroughputExecutor(label="peer", address="127.0.0.1", cores_per_worker=1,
                                                      max_workers_per_node=2, provider=provider)],
                    strategy="htex_auto_scale", strategy_period=1.0, max_idletime=60.0, run_dir=run_dir,
                    initialize_logging=False)
    dfk = DataFlowKernel(config=config)
    app = parsl.python_app(run_task, executors=["peer"], data_flow_kernel=dfk)
    codes = [f.result() for f in [app(["/bin/true"]) for _ in range(n)]]
    dfk.cleanup()
    assert codes.count(0) == n, codes
    print(time.time() - began)
    """
)


def array_floor(work: Path, jobs: int, index: int) -> float:
    began = time.time()
    out = subprocess.run(
        ["sbatch", "--parsable", f"--array=1-{jobs}", "--mem=256M", "--time=5", f"--output={work}/array-{index}-%a.out"]
        + ["--wrap", "true"],
        capture_output=True,
        text=True,
        check=True,
    )
    job_id = out.stdout.strip().split(";")[0]
    while subprocess.run(
        ["squeue", "--noheader", f"--jobs={job_id}", "--format=%i"], capture_output=True, text=True
    ).stdout.strip():
        time.sleep(1.0)
    return time.time() - began


def packed_batch(work: Path, jobs: int, index: int) -> float:
    name = f"packed-{jobs}-{index}"
    engine = ParslEngine(PilotSettings(address="127.0.0.1", run_dir=work / name / "runinfo"))
    backend = PackedBackend(work / name / "tasks", engine, max_task_hours=1)
    runner = StepRunner(
        engine=None,
        backend=backend,
        runtime=None,
        stager=None,
        config=RunnerConfig(pipeline_base_dir=work, processing_location_id=1, sif_cache_dir=work, max_in_flight=jobs),
        store=InMemoryAttemptStore(),
        preparation=TruePreparation(work / name, name),
    )
    began = time.time()
    try:
        outcomes = runner.execute(
            step=SMALL, plans=[plan(f"{name}-item-{i}") for i in range(jobs)], dagster_run_id=f"bench-{name}"
        )
    finally:
        backend.close()
    elapsed = time.time() - began
    bad = [o for o in outcomes.values() if o.kind is not OutcomeKind.COMPLETED]
    if bad:
        raise SystemExit(f"{len(bad)} packed task(s) did not complete: {bad[0]}")
    return elapsed


def peers_python(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    if subprocess.run([str(python), "-c", "import parsl"], capture_output=True).returncode != 0:
        subprocess.run([str(python), "-m", "pip", "install", "-q", "parsl"], check=True)
    return python


def parsl_alone(python: Path, work: Path, jobs: int, index: int) -> float:
    env = {**os.environ, "PATH": f"{python.parent}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run(
        [str(python), "-c", PARSL_ALONE, str(jobs), str(work / f"parsl-{jobs}-{index}")],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"Parsl alone failed: {out.stderr[-2000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, nargs="+", default=[50, 200])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--peers-venv", type=Path, default=Path(tempfile.gettempdir()) / "ccat-bench-peers-venv")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    python = peers_python(args.peers_venv)
    load_before = os.getloadavg()
    ways = {
        "sbatch floor, loop": lambda w, n, i: floor(w, n, i),
        "sbatch floor, array": array_floor,
        "ccat-dagster, one job per sub-group": lambda w, n, i: runner_batch(w, n, i + 100 * n, budget=20),
        "ccat-dagster, packed (Parsl HTEX)": packed_batch,
        "Parsl HTEX alone (own venv)": lambda w, n, i: parsl_alone(python, w, n, i),
    }
    results: dict[tuple[int, str], list[tuple[float, int]]] = {}
    with tempfile.TemporaryDirectory(prefix="ccat-bench-pilot-", dir="/tmp") as temp:
        work = Path(temp)
        log = work / "calls.log"
        shims(work / "bin", log)
        os.environ["PATH"] = f"{work / 'bin'}{os.pathsep}{os.environ['PATH']}"
        for items in args.items:
            for index in range(args.rounds):
                for name, way in ways.items():
                    began = time.time()
                    elapsed = way(work, items, index)
                    calls = len(calls_since(log, began))
                    results.setdefault((items, name), []).append((elapsed, calls))
                    print(f"N={items} round {index}: {name}: {elapsed:.1f} s, {calls} scheduler calls", flush=True)
    load_after = os.getloadavg()
    rows = []
    for items in args.items:
        wall = {name: statistics.median(e for e, _ in results[(items, name)]) for name in ways}
        floor_wall = min(wall["sbatch floor, loop"], wall["sbatch floor, array"])
        parsl_wall = wall["Parsl HTEX alone (own venv)"]
        for name in ways:
            values = results[(items, name)]
            calls = statistics.median(c for _, c in values)
            rows.append(
                f"| {items} | {name} | {wall[name]:.1f} s | {wall[name] / items * 1000:.0f} ms | "
                f"{wall[name] / floor_wall:.2f}× | {wall[name] / parsl_wall:.2f}× | {calls:.0f} | "
                f"{calls / wall[name] * 60:.1f} |"
            )
    targets = []
    for items in args.items:
        wall = {name: statistics.median(e for e, _ in results[(items, name)]) for name in ways}
        floor_wall = min(wall["sbatch floor, loop"], wall["sbatch floor, array"])
        packed, one_job = wall["ccat-dagster, packed (Parsl HTEX)"], wall["ccat-dagster, one job per sub-group"]
        one_job_rate = statistics.median(c / e * 60 for e, c in results[(items, "ccat-dagster, one job per sub-group")])

        def verdict(ok: bool) -> str:
            return "**met**" if ok else "**not met**"

        peer = wall["Parsl HTEX alone (own venv)"]
        targets.append(
            f"- N = {items}: packed at or below Parsl alone ({packed:.1f} s vs {peer:.1f} s):"
            f" {verdict(packed <= peer)}; packed ≥ 10× faster than the floor "
            f"({floor_wall / packed:.1f}×): {verdict(floor_wall / packed >= 10)}; one job per sub-group within 1.2× "
            f"of the floor ({one_job / floor_wall:.2f}×): {verdict(one_job / floor_wall <= 1.2)}; ≤ 20 scheduler "
            f"calls per minute on the one-job path ({one_job_rate:.1f}): {verdict(one_job_rate <= 20)}."
        )
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    report = (
        f"{SECTION}\n\n"
        f"Run on {now} with `.venv/bin/python benchmarks/bench_pilot.py --items {' '.join(map(str, args.items))} "
        f"--rounds {args.rounds} --write-docs` (load average before / after: "
        f"{' '.join(f'{x:.2f}' for x in load_before)} / {' '.join(f'{x:.2f}' for x in load_after)}; the machine "
        "and its Slurm are shared with other work: compare rows of one N with each other).\n\n"
        f"{machine()}\n"
        "- The single-node Slurm of scripts/slurm-single-node.sh (2 CPUs); payload `/bin/true`; ways interleaved "
        "per N; wall = first submission to last result (packed and Parsl include starting their engine and "
        "releasing the allocations); calls = squeue + sacct + scontrol counted by shims on PATH.\n\n"
        "| N | way | wall | per item | × floor | × Parsl alone | scheduler calls | calls per minute |\n"
        "|---:|---|---:|---:|---:|---:|---:|---:|\n" + "\n".join(rows) + "\n\n"
        "Targets (computed from the table above):\n" + "\n".join(targets) + "\n\n"
        "Not measured by this script yet: Snakemake + snakemake-executor-plugin-slurm (default and group jobs) "
        "and dagster-slurm. A batch shorter than a minute reads high in calls "
        "per minute: the first poll right after submitting counts for the whole batch.\n"
    )
    print(report)
    if args.write_docs:
        write_section(SECTION, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
