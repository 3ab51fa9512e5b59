"""Orchestration cost per sub-group: batched Dagster runs on the local backend and on real Slurm.

World (tests/scale_fixtures.py): N pre-staged scans, one per-scan step whose software (a shell script run by
the bubblewrap runtime) writes one small file: the payload is trivial, so what is measured is ccat-dagster
plus Dagster plus the backend. Fresh ops-db and Dagster databases on PostgreSQL for each backend.

Runs are launched the way the daemon launches them: a separate process per run that loads the code location,
creates the run and executes it with Dagster's default (multiprocess) executor, i.e. one more process for the
step. The command is ``python benchmarks/execute_run.py <pipeline>/<step> <tags>`` (what ``dagster job execute``
does, on the implicit asset job with the step selected, as sensor and backfill runs are), with the partition
range tags a sensor / backfill puts on a batched run, or ``dagster/partition`` for a single-partition run; the
same code path for both.

(a) ``--sub-groups`` sub-groups through batched runs of ``MAX_PARTITIONS_PER_RUN`` partitions, one after the
    other. Payload time = sum of the jobs' wall times / job slots; overhead per sub-group = (wall time −
    payload time) / sub-groups. On Slurm the time spent waiting for Slurm (pauses between polls, squeue /
    sacct / sbatch calls) is reported apart from ccat-dagster's own time.
(b) The same ``--single`` sub-groups as one run each, then as one batched run; the ratio of wall times.
``--profile`` adds a cProfile of one batched run of 200 sub-groups executed in process (the step's work).

Usage: .venv/bin/python benchmarks/bench_scale.py [--sub-groups 1000] [--single 50] [--backends local,slurm]
       [--profile] [--write-docs]
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import json
import os
import platform
import pstats
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import dagster as dg  # noqa: E402
from bench_common import write_section  # noqa: E402
from sqlalchemy import func, select  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

from ccat_dagster.opsdb import models as m  # noqa: E402
from ccat_dagster.opsdb.engine import make_engine  # noqa: E402
from ccat_dagster.opsdb.enums import RunStatus  # noqa: E402
from ccat_dagster.opsdb.migrate import upgrade  # noqa: E402
from tests.conftest import create_pg_database, drop_pg_database  # noqa: E402
from tests.scale_fixtures import (  # noqa: E402
    PARTITIONS,
    PIPELINE,
    STEP,
    dagster_yaml,
    scale_environment,
    seed_scale_world,
)

ASSET = f"{PIPELINE}/{STEP}"
RANGE_START, RANGE_END = "dagster/asset_partition_range_start", "dagster/asset_partition_range_end"
RUNNER_STATS = re.compile(
    r"([\d.]+) s waiting for jobs between polls, ([\d.]+) s in status queries, ([\d.]+) s submitting"
)
SECTION = "## Scale"


@dataclass
class World:
    backend: str
    root: Path
    env: dict[str, str]
    keys: list[str]
    ops_url: str
    dagster_url: str
    slots: int

    def instance(self) -> dg.DagsterInstance:
        return dg.DagsterInstance.from_config(self.env["DAGSTER_HOME"])


@dataclass
class Batch:
    """What a set of runs cost."""

    label: str
    sub_groups: int
    runs: int
    wall_seconds: float
    job_wall_seconds: float = 0.0
    slots: int = 1
    waited_seconds: float = 0.0
    status_seconds: float = 0.0
    submit_seconds: float = 0.0
    completed: int = 0
    failed_runs: int = 0
    run_walls: list[float] = field(default_factory=list)

    @property
    def payload_seconds(self) -> float:
        return self.job_wall_seconds / self.slots

    @property
    def overhead_ms(self) -> float:
        return (self.wall_seconds - self.payload_seconds) / self.sub_groups * 1000

    @property
    def scheduler_seconds(self) -> float:
        """Time the runs spent waiting for the backend: pauses between polls and the backend's commands."""
        return self.waited_seconds + self.status_seconds + self.submit_seconds

    @property
    def orchestration_ms(self) -> float:
        """Busy time per sub-group: each run's wall time minus its waiting for the backend, summed over runs
        (runs that overlap each count their own time, so this is independent of how many ran at once)."""
        return (sum(self.run_walls) - self.scheduler_seconds) / self.sub_groups * 1000


def make_world(backend: str, scans: int, *, max_in_flight: int, local_running: int) -> World:
    root = Path(tempfile.mkdtemp(prefix=f"ccat-bench-scale-{backend}-"))
    ops_url = create_pg_database("ccat_bench_scale_ops")
    dagster_url = create_pg_database("ccat_bench_scale_dagster")
    upgrade(ops_url)
    engine = make_engine(ops_url)
    with Session(engine) as session, session.begin():
        world = seed_scale_world(session, data_dir=root / "data", scans=scans)
    engine.dispose()
    home = root / "dagster-home"
    home.mkdir()
    (home / "dagster.yaml").write_text(dagster_yaml(dagster_url))
    env = {
        **os.environ,
        **scale_environment(data_dir=root / "data", ops_db_url=ops_url, dagster_home=home, backend=backend),
        "CCAT_WORKFLOW_MANAGER_MAX_CONCURRENT_JOBS": str(max_in_flight),
        "CCAT_WORKFLOW_MANAGER_LOCAL_MAX_RUNNING": str(local_running),
    }
    instance = dg.DagsterInstance.from_config(str(home))
    instance.add_dynamic_partitions(PARTITIONS, world.keys)
    # Jobs that run at once: the local backend's limit, or the single Slurm node's CPUs (1 CPU per job).
    slots = min(max_in_flight, local_running if backend == "local" else os.cpu_count() or 1)
    return World(backend, root, env, world.keys, ops_url, dagster_url, slots)


def launch(world: World, tags: dict[str, str]) -> tuple[float, int]:
    """One run in its own process, as the daemon's run launcher would; (wall seconds, exit code)."""
    command = [sys.executable, str(REPO / "benchmarks" / "execute_run.py"), ASSET, json.dumps(tags)]
    began = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, env=world.env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - began
    if result.returncode != 0:
        sys.stderr.write(result.stderr[-3000:])
    return wall, result.returncode


def account(world: World, batch: Batch, run_ids: list[str]) -> Batch:
    """Job wall times from ops-db and the runner's own timing line from each run's log."""
    engine = make_engine(world.ops_url)
    with Session(engine) as session:
        completed, job_wall = session.execute(
            select(func.count(m.ExecutedReductionStep.id), func.sum(m.ExecutedReductionStep.wall_time_seconds))
            .where(m.ExecutedReductionStep.dagster_run_id.in_(run_ids))
            .where(m.ExecutedReductionStep.status == RunStatus.COMPLETED)
        ).one()
    engine.dispose()
    batch.completed, batch.job_wall_seconds, batch.slots = int(completed), float(job_wall or 0.0), world.slots
    instance = world.instance()
    for run_id in run_ids:
        for entry in instance.all_logs(run_id):
            found = RUNNER_STATS.search(entry.user_message or "")
            if found:
                batch.waited_seconds += float(found[1])
                batch.status_seconds += float(found[2])
                batch.submit_seconds += float(found[3])
    return batch


def new_run_ids(world: World, before: set[str]) -> list[str]:
    return [r.run_id for r in world.instance().get_runs() if r.run_id not in before]


def run_batched(world: World, keys: list[str], per_run: int, label: str, *, parallel: int = 1) -> Batch:
    """Runs of at most ``per_run`` sub-groups, ``parallel`` at a time (as the run queue's limits allow)."""
    before = {r.run_id for r in world.instance().get_runs()}
    batch = Batch(label, len(keys), 0, 0.0)
    chunks = [keys[start : start + per_run] for start in range(0, len(keys), per_run)]
    began = time.perf_counter()
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        for wall, code in pool.map(lambda c: launch(world, {RANGE_START: c[0], RANGE_END: c[-1]}), chunks):
            batch.runs += 1
            batch.failed_runs += code != 0
            batch.run_walls.append(wall)
            print(f"  {label}: run {batch.runs} of {len(chunks)} {wall:.1f} s", flush=True)
    batch.wall_seconds = time.perf_counter() - began
    return account(world, batch, new_run_ids(world, before))


def run_single(world: World, keys: list[str], label: str) -> Batch:
    before = {r.run_id for r in world.instance().get_runs()}
    batch = Batch(label, len(keys), 0, 0.0)
    began = time.perf_counter()
    for key in keys:
        wall, code = launch(world, {"dagster/partition": key})
        batch.runs += 1
        batch.failed_runs += code != 0
        batch.run_walls.append(wall)
        if batch.runs % 10 == 0:
            print(f"  {label}: {batch.runs} runs, last {wall:.1f} s", flush=True)
    batch.wall_seconds = time.perf_counter() - began
    return account(world, batch, new_run_ids(world, before))


PROFILE_ROWS = [
    ("Dagster: create the run (one ASSET_MATERIALIZATION_PLANNED event per partition)", "run_domain.py", "create_run"),
    ("Dagster: event-log writes (all events of the run)", "event_methods.py", "handle_new_event"),
    ("runner: submission rounds (attempt rows, staging check, manifests, submit)", "runner.py", "_start"),
    ("  of which attempt rows + input lineage (one transaction per round)", "runner.py", "_create_attempts"),
    ("  of which manifests, directories, container commands", "runner.py", "_prepare"),
    ("  of which backend submit (local: queue files + wrapper processes)", "local.py", "submit_many"),
    (
        "runner: collection (COLLECTING_RESULTS per round, products + lineage per sub-group)",
        "runner.py",
        "_finish_many",
    ),
    ("  of which registration (products, lineage, COMPLETED)", "registration.py", "register_attempt_results"),
    ("runner: RUNNING transitions (one transaction per poll)", "runner.py", "_note_running"),
    ("runner: status polls (one backend call each)", "runner.py", "_poll"),
    ("asset: writing the round's events (batched)", "factory.py", "flush"),
    ("runner: pauses between polls", "threading.py", "wait"),
    (
        "ops-db: all SQL statements (psycopg2 execute, ops-db and Dagster)",
        "~",
        "<method 'execute' of 'psycopg2.extensions.cursor' objects>",
    ),
]


def profile_batched(world: World, keys: list[str], out: Path) -> tuple[float, list[tuple[str, float, int]]]:
    """cProfile of one batched run executed in this process (the run worker's and the step's work)."""
    os.environ.update(world.env)
    from ccat_dagster.definitions import build_definitions
    from ccat_dagster.settings import Settings

    defs = build_definitions(Settings.from_env(world.env))
    job = defs.resolve_implicit_global_asset_job_def()
    instance = world.instance()
    profiler = cProfile.Profile()
    began = time.perf_counter()
    profiler.enable()
    result = job.execute_in_process(
        instance=instance,
        asset_selection=[dg.AssetKey([PIPELINE, STEP])],
        tags={RANGE_START: keys[0], RANGE_END: keys[-1]},
    )
    profiler.disable()
    wall = time.perf_counter() - began
    assert result.success
    profiler.dump_stats(out)
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    rows = []
    for label, filename, function in PROFILE_ROWS:
        total, calls = 0.0, 0
        for (path, _line, name), (_cc, nc, _tt, ct, _callers) in stats.items():
            if name == function and (filename == "~" or path.endswith(filename)):
                total += ct
                calls += nc
        rows.append((label, total, calls))
    return wall, rows


def drop(world: World) -> None:
    for url in (world.ops_url, world.dagster_url):
        drop_pg_database(url)
    shutil.rmtree(world.root, ignore_errors=True)


def machine() -> list[str]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    memory = next(line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
    gib = int(memory.split()[1]) / 1024 / 1024
    slurm = subprocess.run(["sinfo", "--version"], capture_output=True, text=True, check=False).stdout.strip()
    postgres = subprocess.run(
        ["psql", "-h", "127.0.0.1", "-U", "postgres", "-Atc", "show server_version"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return [
        f"- CPU: {cpu}; `nproc` = {os.cpu_count()}; memory {gib:.0f} GiB",
        f"- PostgreSQL {postgres or '15'} on the same machine (ops-db and the Dagster instance), default configuration",
        f"- {slurm or 'Slurm'} single node (2 CPUs, `select/cons_tres`, slurmdbd accounting); container runtime "
        "bubblewrap; Python " + platform.python_version() + ", dagster " + dg.__version__,
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sub-groups", type=int, default=1000)
    parser.add_argument("--single", type=int, default=50)
    parser.add_argument("--backends", default="local,slurm")
    parser.add_argument("--per-run", type=int, default=200, help="MAX_PARTITIONS_PER_RUN (the default setting)")
    parser.add_argument("--in-flight", type=int, default=100, help="MAX_CONCURRENT_JOBS (the default setting)")
    parser.add_argument(
        "--local-running", type=int, default=os.cpu_count() or 1, help="LOCAL_MAX_RUNNING (default: CPUs)"
    )
    parser.add_argument(
        "--concurrent-runs",
        default="local=2,slurm=8",
        help="runs of (a) at a time per backend (dagster.yaml's run-queue limits for ccat/backend)",
    )
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    started = dt.datetime.now(dt.UTC)
    load_start = os.getloadavg()
    results: list[Batch] = []
    ratios: list[tuple[str, Batch, Batch]] = []
    profile: tuple[float, list[tuple[str, float, int]]] | None = None
    for backend in args.backends.split(","):
        world = make_world(
            backend, args.sub_groups + args.single, max_in_flight=args.in_flight, local_running=args.local_running
        )
        try:
            print(f"{backend}: (a) {args.sub_groups} sub-groups, batched", flush=True)
            parallel = dict(item.split("=") for item in args.concurrent_runs.split(",")).get(backend, "1")
            results.append(
                run_batched(
                    world, world.keys[: args.sub_groups], args.per_run, f"{backend} batched", parallel=int(parallel)
                )
            )
            same = world.keys[args.sub_groups : args.sub_groups + args.single]
            print(f"{backend}: (b) {args.single} sub-groups, one run each, then one batched run", flush=True)
            single = run_single(world, same, f"{backend} one run per sub-group")
            batched = run_batched(world, same, args.per_run, f"{backend} batched, same sub-groups")
            ratios.append((backend, single, batched))
            if args.profile and backend == "local":
                extra = make_world(
                    backend, min(200, args.sub_groups), max_in_flight=args.in_flight, local_running=args.local_running
                )
                try:
                    profile = profile_batched(extra, extra.keys, Path(tempfile.gettempdir()) / "bench_scale.prof")
                finally:
                    drop(extra)
        finally:
            drop(world)
    load_end = os.getloadavg()
    lines = report(args, started, load_start, load_end, results, ratios, profile)
    print("\n".join(lines))
    if args.write_docs:
        write_section(SECTION, "\n".join(lines) + "\n")


def report(args, started, load_start, load_end, results, ratios, profile) -> list[str]:  # type: ignore[no-untyped-def]
    command = "`.venv/bin/python benchmarks/bench_scale.py " + " ".join(sys.argv[1:]) + "`"
    lines = [
        SECTION,
        "",
        f"Run on {started:%Y-%m-%d %H:%M} UTC with {command}.",
        "",
        *machine(),
        f"- load average (1, 5, 15 min) at start: {', '.join(f'{v:.2f}' for v in load_start)}; at end: "
        f"{', '.join(f'{v:.2f}' for v in load_end)} — the 2 cores were shared with other work, so compare the "
        "figures of one run with each other rather than across runs",
        f"- World: pre-staged scans, one per-scan step, payload = a shell script in bubblewrap writing one small file; "
        f"`MAX_PARTITIONS_PER_RUN` = {args.per_run}, `MAX_CONCURRENT_JOBS` = {args.in_flight}, "
        f"`LOCAL_MAX_RUNNING` = {args.local_running}, `POLL_INTERVAL_SECONDS` = 2 (polls start at 0.2 s and back "
        "off)",
        "- Each run is its own process (`benchmarks/execute_run.py`: `dagster job execute` on the implicit asset "
        "job with the step selected; the code location's executor runs the step in that "
        f"process), as the daemon launches runs. (a): runs {args.concurrent_runs} at a time (the run queue's "
        "`ccat/backend` limits in dagster.yaml); (b): one after the other",
        "",
        "(a) Batched runs",
        "",
        "| backend | sub-groups | runs | wall time | payload time (job wall / slots) | overhead per sub-group "
        "| runs waiting for the backend (Σ over runs) | busy per sub-group (Σ run wall − waiting) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for b in results:
        lines.append(
            f"| {b.label} | {b.sub_groups:,} ({b.completed:,} completed) | {b.runs} | {b.wall_seconds:.1f} s "
            f"| {b.payload_seconds:.1f} s ({b.job_wall_seconds:.1f} s / {b.slots}) | {b.overhead_ms:.1f} ms "
            f"| {b.scheduler_seconds:.1f} s | {b.orchestration_ms:.1f} ms |"
        )
    lines += [
        "",
        "(b) The same sub-groups, one Dagster run each vs one batched run (same session)",
        "",
        "| backend | sub-groups | one run per sub-group | batched | ratio | per sub-group: single / batched |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for backend, single, batched in ratios:
        lines.append(
            f"| {backend} | {single.sub_groups} | {single.wall_seconds:.1f} s ({single.runs} runs, "
            f"{single.completed} completed) | {batched.wall_seconds:.1f} s ({batched.runs} run) "
            f"| {single.wall_seconds / batched.wall_seconds:.1f}× "
            f"| {single.wall_seconds / single.sub_groups * 1000:.0f} ms / "
            f"{batched.wall_seconds / batched.sub_groups * 1000:.0f} ms |"
        )
    lines += ["", "Targets:"]
    for b in results:
        target = b.overhead_ms <= 50
        lines.append(
            f"- {b.label}, {b.sub_groups:,} sub-groups: overhead {b.overhead_ms:.1f} ms per sub-group "
            f"(target ≤ 50 ms: {'met' if target else 'NOT met'})"
            + (
                f"; without the time spent waiting for Slurm {b.orchestration_ms:.1f} ms "
                f"({'met' if b.orchestration_ms <= 50 else 'NOT met'})"
                if "slurm" in b.label
                else ""
            )
        )
    for backend, single, batched in ratios:
        ratio = single.wall_seconds / batched.wall_seconds
        lines.append(
            f"- {backend}: batched {ratio:.1f}× faster than one run per sub-group "
            f"(target ≥ 10×: {'met' if ratio >= 10 else 'NOT met'})"
        )
    if profile is not None:
        wall, rows = profile
        lines += [
            "",
            f"Profile (cProfile, one batched run of {min(200, args.sub_groups)} sub-groups on the local backend, "
            f"executed in process; {wall:.1f} s under the profiler). Cumulative times overlap (nested rows):",
            "",
            "| where | cumulative | calls |",
            "|---|---:|---:|",
            *[f"| {label} | {seconds:.1f} s | {calls:,} |" for label, seconds, calls in rows],
        ]
    return lines


if __name__ == "__main__":
    main()
