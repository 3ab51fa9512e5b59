"""Side by side on the single-node Slurm: the sbatch floor, ccat-dagster one job per sub-group, ccat-dagster
packed, Parsl's HighThroughputExecutor on its own, Snakemake's Slurm executor and dagster-slurm, for the same
trivial payload (`/bin/true`).

Ways, interleaved within each N (same load for all):
- floor, loop: N × `sbatch --wrap true`, then `squeue` once a second until none is left;
- floor, array: one `sbatch --array=1-N --wrap true`, the same wait;
- ccat-dagster one job per sub-group: StepRunner + SlurmBackend at the default pacing (20 calls per minute);
- ccat-dagster packed: StepRunner + PackedBackend + ParslEngine (PACKED_* defaults: 2 allocations of 2 cores);
- Parsl HTEX alone: the same engine settings driven by Parsl directly;
- Snakemake 9 + snakemake-executor-plugin-slurm, one Slurm job per item: a generated Snakefile of N instances of
  a rule running `true`, `--executor slurm` at the plugin's default pacing (first status query 40 s after
  submitting, then every 40 s, longer while nothing finishes);
- Snakemake, group jobs: the same with `--groups` / `--group-components`, 20 items per Slurm job;
- dagster-slurm: reaches Slurm only over SSH to a login node; where this host has no SSH server, its row says
  "not run" and why.

The peers (Parsl, Snakemake and its plugin, dagster-slurm) live in a venv of their own, created and filled from
PyPI on first use (`--peers-venv`). Snakemake and dagster-slurm take seconds per item, so they run only up to
`--slow-peers-max-items` (50); their rows for a bigger N say "not run".

The StepRunner ways use the in-memory attempt store and no container (the loop and the backend are measured,
not ops-db or Apptainer). squeue, sacct and scontrol are shims on PATH that log every call, for all ways (the
peers run with the shims ahead of their venv and of the real commands).

Run:  .venv/bin/python benchmarks/bench_pilot.py [--items 50 200] [--rounds 1] [--slow-peers-max-items 50]
      [--write-docs]
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
    began = time.time()  # importing Parsl is part of a batch's cost, as it is in ccat-dagster's packed way
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
    provider = SlurmProvider(nodes_per_block=1, cores_per_node=2, init_blocks=0, min_blocks=0, max_blocks=2,
                             walltime="00:30:00", exclusive=False, scheduler_options="#SBATCH --mem=1280M",
                             launcher=SingleNodeLauncher(), cmd_timeout=60)
    config = Config(executors=[HighThroughputExecutor(label="peer", address="127.0.0.1", cores_per_worker=1,
                                                      max_workers_per_node=2, provider=provider)],
                    strategy="htex_auto_scale", strategy_period=0.2, max_idletime=60.0, run_dir=run_dir,
                    initialize_logging=False)
    dfk = DataFlowKernel(config=config)
    app = parsl.python_app(run_task, executors=["peer"], data_flow_kernel=dfk)
    codes = [f.result() for f in [app(["/bin/true"]) for _ in range(n)]]
    dfk.cleanup()
    assert codes.count(0) == n, codes
    print(time.time() - began)
    """
)
SNAKEFILE = textwrap.dedent(
    """
    localrules: all

    rule all:
        input: expand("done/{{i}}", i=range({items}))

    rule item:
        output: touch("done/{{i}}")
        shell: "true"
    """
)
SNAKEMAKE_DEFAULT = "Snakemake 9 + Slurm plugin, one job per item"
SNAKEMAKE_GROUP_SIZE = 20
SNAKEMAKE_GROUPED = f"Snakemake 9 + Slurm plugin, group jobs of {SNAKEMAKE_GROUP_SIZE} items"
DAGSTER_SLURM = "dagster-slurm"
SLOW_PEERS = (SNAKEMAKE_DEFAULT, SNAKEMAKE_GROUPED, DAGSTER_SLURM)
PARSL_ALONE_WAY = "Parsl HTEX alone (own venv)"
PEER_WAYS = (PARSL_ALONE_WAY, *SLOW_PEERS)
PEERS = {
    "parsl": "parsl",
    "snakemake": "snakemake>=9,<10",
    "snakemake_executor_plugin_slurm": "snakemake-executor-plugin-slurm",
    "dagster_slurm": "dagster-slurm",
}


class NotRun(Exception):
    """A way that cannot run on this machine; its message says why, and the table shows it instead of a figure."""


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
    """The peers' interpreter: a venv of their own, so that none of them shares the project's dependencies."""
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    missing = [
        requirement
        for module, requirement in PEERS.items()
        if subprocess.run([str(python), "-c", f"import {module}"], capture_output=True).returncode != 0
    ]
    if missing:
        subprocess.run([str(python), "-m", "pip", "install", "-q", *missing], check=True)
    return python


def peers_env(python: Path) -> dict[str, str]:
    """The environment a peer runs in: its venv's bin first (its jobs inherit it, Slurm exports the submitter's
    environment), then PATH as it is, so the squeue / sacct / scontrol shims stay ahead of the real commands."""
    return {**os.environ, "PATH": f"{python.parent}{os.pathsep}{os.environ['PATH']}"}


def parsl_alone(python: Path, work: Path, jobs: int, index: int) -> float:
    out = subprocess.run(
        [str(python), "-c", PARSL_ALONE, str(jobs), str(work / f"parsl-{jobs}-{index}")],
        capture_output=True,
        text=True,
        env=peers_env(python),
        check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"Parsl alone failed: {out.stderr[-2000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def snakemake_batch(python: Path, work: Path, jobs: int, index: int, *, group_size: int | None = None) -> float:
    """N instances of one rule running `true`, through Snakemake's Slurm executor at its default pacing; with
    ``group_size``, the instances are grouped so that one Slurm job runs up to that many of them."""
    name = f"snakemake-{'grouped' if group_size else 'default'}-{jobs}-{index}"
    run_dir = work / name
    run_dir.mkdir(parents=True)
    (run_dir / "Snakefile").write_text(SNAKEFILE.format(items=jobs))
    argv = [
        str(python.parent / "snakemake"),
        "--snakefile",
        str(run_dir / "Snakefile"),
        "--directory",
        str(run_dir),
        "--executor",
        "slurm",
        "--jobs",
        str(jobs),
        "--default-resources",
        "slurm_partition=debug",
        "mem_mb=256",
        "runtime=1",
        "--slurm-no-account",
    ]
    if group_size:
        # A group job asks for the sum of its members' CPUs (20 on a 2-CPU node, which sbatch refuses); --cores 1
        # makes Snakemake stack them in series within one CPU instead, so two group jobs run side by side.
        argv += ["--groups", "item=items", "--group-components", f"items={group_size}", "--cores", "1"]
    began = time.time()
    out = subprocess.run(argv, capture_output=True, text=True, env=peers_env(python), check=False)
    elapsed = time.time() - began
    (run_dir / "snakemake.log").write_text(out.stdout + out.stderr)
    done = len(list((run_dir / "done").glob("*"))) if (run_dir / "done").exists() else 0
    if out.returncode != 0 or done != jobs:
        raise SystemExit(f"Snakemake ({name}) failed, {done} of {jobs} done: {out.stderr[-2000:]}")
    return elapsed


def dagster_slurm_batch(python: Path, work: Path, jobs: int, index: int) -> float:
    """dagster-slurm reaches Slurm only through SSH to a login node: its SlurmResource requires an
    SSHConnectionResource and runs sbatch, squeue and sacct over it (its "local" mode runs the payload as a plain
    subprocess, without Slurm, so it measures nothing comparable). On a host without an SSH server it cannot run;
    the way says so instead of showing a figure."""
    probe = subprocess.run(
        ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", "localhost", "true"],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        detail = (probe.stderr.strip().splitlines() or [f"exit {probe.returncode}"])[-1]
        raise NotRun(
            "dagster-slurm submits to Slurm only over SSH to a login node (its SlurmResource needs an "
            f"SSHConnectionResource) and `ssh localhost` fails here ({detail})"
        )
    raise NotRun(
        "dagster-slurm submits to Slurm only over SSH to a login node; SSH to this host works, but this script "
        "does not drive dagster-slurm over it"
    )


def median_walls(results: dict[tuple[int, str], list[tuple[float, int]]], items: int) -> dict[str, float]:
    """Median wall seconds of each way that ran at N = ``items``."""
    return {name: statistics.median(e for e, _ in values) for (n, name), values in results.items() if n == items}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, nargs="+", default=[50, 200])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--peers-venv", type=Path, default=Path(tempfile.gettempdir()) / "ccat-bench-peers-venv")
    parser.add_argument(
        "--slow-peers-max-items",
        type=int,
        default=50,
        help="largest N at which Snakemake and dagster-slurm run (seconds per item: a bigger N takes long)",
    )
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    python = peers_python(args.peers_venv)
    load_before = os.getloadavg()
    ways = {
        "sbatch floor, loop": lambda w, n, i: floor(w, n, i),
        "sbatch floor, array": array_floor,
        "ccat-dagster, one job per sub-group": lambda w, n, i: runner_batch(w, n, i + 100 * n, budget=20),
        "ccat-dagster, packed (Parsl HTEX)": packed_batch,
        PARSL_ALONE_WAY: lambda w, n, i: parsl_alone(python, w, n, i),
        SNAKEMAKE_DEFAULT: lambda w, n, i: snakemake_batch(python, w, n, i),
        SNAKEMAKE_GROUPED: lambda w, n, i: snakemake_batch(python, w, n, i, group_size=SNAKEMAKE_GROUP_SIZE),
        DAGSTER_SLURM: lambda w, n, i: dagster_slurm_batch(python, w, n, i),
    }
    results: dict[tuple[int, str], list[tuple[float, int]]] = {}
    not_run: dict[tuple[int, str], str] = {}
    with tempfile.TemporaryDirectory(prefix="ccat-bench-pilot-", dir="/tmp") as temp:
        work = Path(temp)
        log = work / "calls.log"
        shims(work / "bin", log)
        os.environ["PATH"] = f"{work / 'bin'}{os.pathsep}{os.environ['PATH']}"
        for items in args.items:
            for index in range(args.rounds):
                for name, way in ways.items():
                    if name in SLOW_PEERS and items > args.slow_peers_max_items:
                        not_run[(items, name)] = f"not run (N > {args.slow_peers_max_items})"
                        continue
                    if (items, name) in not_run:
                        continue
                    began = time.time()
                    try:
                        elapsed = way(work, items, index)
                    except NotRun as reason:
                        not_run[(items, name)] = f"not run: {reason}"
                        print(f"N={items} round {index}: {name}: not run: {reason}", flush=True)
                        continue
                    calls = len(calls_since(log, began))
                    results.setdefault((items, name), []).append((elapsed, calls))
                    print(f"N={items} round {index}: {name}: {elapsed:.1f} s, {calls} scheduler calls", flush=True)
    load_after = os.getloadavg()
    rows = []
    for items in args.items:
        wall = median_walls(results, items)
        floor_wall = min(wall["sbatch floor, loop"], wall["sbatch floor, array"])
        parsl_wall = wall[PARSL_ALONE_WAY]
        for name in ways:
            if (items, name) in not_run:
                rows.append(f"| {items} | {name} | {not_run[(items, name)]} | — | — | — | — | — |")
                continue
            values = results[(items, name)]
            calls = statistics.median(c for _, c in values)
            rows.append(
                f"| {items} | {name} | {wall[name]:.1f} s | {wall[name] / items * 1000:.0f} ms | "
                f"{wall[name] / floor_wall:.2f}× | {wall[name] / parsl_wall:.2f}× | {calls:.0f} | "
                f"{calls / wall[name] * 60:.1f} |"
            )
    targets = []
    for items in args.items:
        wall = median_walls(results, items)
        floor_wall = min(wall["sbatch floor, loop"], wall["sbatch floor, array"])
        packed, one_job = wall["ccat-dagster, packed (Parsl HTEX)"], wall["ccat-dagster, one job per sub-group"]
        one_job_rate = statistics.median(c / e * 60 for e, c in results[(items, "ccat-dagster, one job per sub-group")])

        def verdict(ok: bool) -> str:
            return "**met**" if ok else "**not met**"

        parsl_wall = wall[PARSL_ALONE_WAY]
        peers = {name: wall[name] for name in PEER_WAYS if name in wall and (items, name) not in not_run}
        fastest = min(peers, key=peers.__getitem__)
        own_ms = (packed - parsl_wall) / items * 1000  # what packing adds to the engine it runs on
        targets.append(
            f"- N = {items}: packed at or below the fastest peer ({fastest}: {packed:.1f} s vs {peers[fastest]:.1f} s):"
            f" {verdict(packed <= peers[fastest])}; ccat-dagster's own cost per sub-group (packed − Parsl alone, "
            f"÷ N: {own_ms:.1f} ms) ≤ 30 ms: {verdict(own_ms <= 30)}; packed ≥ 10× faster than the floor "
            f"({floor_wall / packed:.1f}×): {verdict(floor_wall / packed >= 10)}; one job per sub-group within 1.2× "
            f"of the floor ({one_job / floor_wall:.2f}×): {verdict(one_job / floor_wall <= 1.2)}; ≤ 20 scheduler "
            f"calls per minute on the one-job path ({one_job_rate:.1f}): {verdict(one_job_rate <= 20)}."
        )
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    report = (
        f"{SECTION}\n\n"
        f"Run on {now} with `.venv/bin/python benchmarks/bench_pilot.py --items {' '.join(map(str, args.items))} "
        f"--rounds {args.rounds} --slow-peers-max-items {args.slow_peers_max_items} --write-docs` "
        "(load average before / after: "
        f"{' '.join(f'{x:.2f}' for x in load_before)} / {' '.join(f'{x:.2f}' for x in load_after)}; the machine "
        "and its Slurm are shared with other work: compare rows of one N with each other).\n\n"
        f"{machine()}\n"
        "- The single-node Slurm of scripts/slurm-single-node.sh (2 CPUs); payload `/bin/true`; ways interleaved "
        "per N; wall = first submission to last result (packed and Parsl include importing Parsl, starting its "
        "engine and releasing the allocations, Snakemake is the `snakemake` process from start to exit); calls = "
        "squeue + sacct + scontrol counted by shims on PATH.\n\n"
        "| N | way | wall | per item | × floor | × Parsl alone | scheduler calls | calls per minute |\n"
        "|---:|---|---:|---:|---:|---:|---:|---:|\n" + "\n".join(rows) + "\n\n"
        "Targets (computed from the table above):\n" + "\n".join(targets) + "\n\n"
        f"Snakemake and dagster-slurm run only up to N = {args.slow_peers_max_items} (seconds per item); Snakemake "
        "at its Slurm plugin's default pacing (first status query 40 s after submitting), its group jobs with "
        f"{SNAKEMAKE_GROUP_SIZE} items each and `--cores 1`, so that a group job asks for one CPU. A row that says "
        '"not run" gives the reason found on this machine. A batch shorter than a minute reads high in calls '
        "per minute: the first poll right after submitting counts for the whole batch.\n"
    )
    print(report)
    if args.write_docs:
        write_section(SECTION, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
