"""Code-location load time: 50 pipelines × 4 steps in ops-db (PostgreSQL).

Builds a fresh ops-db ``ccat_bench_code_location`` (the demo observatory plus 50 pipelines applied with the
pipeline apply API, shaped like examples/pipelines/chai_ngc253_co43.yaml with a fourth step, all CONTINUOUS)
and times, each in a fresh Python process as a code server starts:

- the phases in-process: importing the package (and Dagster), ``build_definitions`` (ops-db read + assets,
  jobs, sensors, schedules), ``Definitions.get_repository_def()`` (Dagster resolves the asset graph and the
  asset jobs) and ``RepositorySnap.from_def`` (the snapshot a code server sends to the webserver and daemon);
- ``dagster definitions validate -m ccat_dagster.definitions``: Dagster's own load and validation, in process;
- the same with ``--load-with-grpc``: Dagster starts a code server (``dagster api grpc``) and loads the
  location from it over gRPC, as the webserver and daemon do (two processes: the CLI's and the server's);
- a reload in a running ``dagster-webserver`` (the GraphQL mutation behind the UI's "Reload" button, what an
  operator does after ``pipelines apply``): the webserver starts a new code server and reads its snapshot;
  timed from the request until the location is loaded again.

Run:  .venv/bin/python benchmarks/bench_code_location.py [--repeat 5] [--write-docs]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Only the standard library is imported above (a few ms): the "import" phase of a load counts from here.
PROCESS_STARTED = time.perf_counter()

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Code location load"
EXAMPLE = REPO / "examples" / "pipelines" / "chai_ngc253_co43.yaml"
DATABASE = "ccat_bench_code_location"
PIPELINES = 50
TARGET_SECONDS = 5.0


# -------------------------------------------------------------------------------------------- set-up


def pipeline_specs() -> list[dict[str, Any]]:
    """50 variations of the example: own names and groupings, 4 steps (a per-scan QA step added)."""
    import yaml

    example = yaml.safe_load(EXAMPLE.read_text())
    specs = []
    for index in range(PIPELINES):
        spec = copy.deepcopy(example)
        spec["pipeline"] = f"bench_pipeline_{index:02d}"
        spec["grouping"]["name"] = f"bench-grouping-{index:02d}"
        qa = copy.deepcopy(spec["steps"][1])
        qa.update(name="qa_plots", description="QA plots of each baselined scan", depends_on=["baseline"])
        qa["config"] = {"plots": ["spectrum", "rms"], "variant": index}
        spec["steps"].append(qa)
        specs.append(spec)
    return specs


def build_ops_db(data_dir: Path) -> str:
    from bench_common import recreate_database
    from sqlalchemy.orm import Session

    from ccat_dagster.demo.seed import seed_demo
    from ccat_dagster.opsdb.engine import make_engine
    from ccat_dagster.opsdb.migrate import upgrade
    from ccat_dagster.pipelines.apply import apply_pipeline_spec
    from ccat_dagster.pipelines.spec import parse_pipeline_spec

    url = recreate_database(DATABASE)
    upgrade(url)
    engine = make_engine(url)
    with Session(engine) as session, session.begin():
        seed_demo(session, data_dir=data_dir, scans=20)
        for spec in pipeline_specs():
            parsed = parse_pipeline_spec(spec, origin=spec["pipeline"], base_dir=EXAMPLE.parent)
            apply_pipeline_spec(session, parsed, source_path=EXAMPLE)
    engine.dispose()
    return url


# ------------------------------------------------------------------------------------------- measuring


def child_phases() -> None:
    """Runs in a fresh interpreter: time each phase of a code-location load, print them as JSON."""
    started = PROCESS_STARTED
    import dagster as dg  # noqa: F401 - the import is part of what is timed
    from dagster._core.remote_representation.external_data import RepositorySnap

    from ccat_dagster.definitions import build_definitions
    from ccat_dagster.settings import Settings

    phases: dict[str, float] = {"import": time.perf_counter() - started}
    mark = time.perf_counter()
    defs = build_definitions(Settings.from_env())
    phases["build_definitions"] = time.perf_counter() - mark
    mark = time.perf_counter()
    repository = defs.get_repository_def()
    jobs = repository.get_all_jobs()
    phases["get_repository_def"] = time.perf_counter() - mark
    mark = time.perf_counter()
    snapshot = RepositorySnap.from_def(repository)
    phases["repository_snapshot"] = time.perf_counter() - mark
    phases["total"] = time.perf_counter() - started
    counts = {
        "assets": len(list(defs.resolve_asset_graph().get_all_asset_keys())),
        "jobs": len(jobs),
        "sensors": len(snapshot.sensors),
        "schedules": len(snapshot.schedules),
    }
    print(json.dumps({"phases": phases, "counts": counts}))


LOCATION = "ccat_dagster"
LOCATION_QUERY = (
    '{ workspaceLocationEntryOrError(name: "LOCATION") { __typename ... on WorkspaceLocationEntry { loadStatus '
    "locationOrLoadError { __typename ... on PythonError { message } } } } }"
).replace("LOCATION", LOCATION)
RELOAD_MUTATION = (
    'mutation { reloadRepositoryLocation(repositoryLocationName: "LOCATION") { __typename '
    "... on WorkspaceLocationEntry { loadStatus } ... on PythonError { message } } }"
).replace("LOCATION", LOCATION)


def graphql(port: int, query: str) -> dict[str, Any]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql",
        data=json.dumps({"query": query}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def wait_loaded(port: int, deadline_seconds: float = 180.0) -> None:
    deadline = time.monotonic() + deadline_seconds
    while time.monotonic() < deadline:
        try:
            entry = graphql(port, LOCATION_QUERY)["data"]["workspaceLocationEntryOrError"]
        except (urllib.error.URLError, ConnectionError, TimeoutError, KeyError, TypeError):
            time.sleep(0.05)
            continue
        if entry.get("loadStatus") == "LOADED":
            loaded = entry.get("locationOrLoadError") or {}
            if loaded.get("__typename") != "RepositoryLocation":
                raise SystemExit(f"code location failed to load in the webserver: {loaded}")
            return
        time.sleep(0.05)
    raise SystemExit(f"the webserver did not load {LOCATION!r} within {deadline_seconds:.0f} s")


@contextlib.contextmanager
def webserver(env: dict[str, str], scratch: Path) -> Iterator[int]:
    """``dagster-webserver`` on a free port with the repository's workspace.yaml (its own code server)."""
    import signal
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = (scratch / "webserver.log").open("w")
    command = [str(Path(sys.executable).with_name("dagster-webserver")), "-w", str(REPO / "workspace.yaml")]
    process = subprocess.Popen(
        [*command, "-h", "127.0.0.1", "-p", str(port)],
        env=env,
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_loaded(port)
        yield port
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


def timed_reload(port: int) -> float:
    started = time.perf_counter()
    answer = graphql(port, RELOAD_MUTATION)["data"]["reloadRepositoryLocation"]
    if answer.get("__typename") != "WorkspaceLocationEntry":
        raise SystemExit(f"reload failed: {answer}")
    wait_loaded(port)
    return time.perf_counter() - started


def timed(command: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    started = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return elapsed, done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--write-docs", action="store_true", help="write the results into docs/benchmarks.md")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_phases()
        return 0

    from bench_common import machine, write_section

    started_at = dt.datetime.now(dt.UTC)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="ccat-bench-code-location-") as scratch:
        data_dir = Path(scratch) / "data"
        home = Path(scratch) / "dagster-home"
        home.mkdir()
        (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
        setup_started = time.perf_counter()
        url = build_ops_db(data_dir)
        setup_seconds = time.perf_counter() - setup_started
        env = {
            **os.environ,
            "CCAT_OPS_DB_URL": url,
            "CCAT_DAGSTER_DATA_DIR": str(data_dir),
            "DAGSTER_HOME": str(home),
            "PYTHONPATH": str(REPO / "benchmarks"),
        }
        python = sys.executable
        dagster_cli = str(Path(python).with_name("dagster"))
        commands = {
            "python -c 'import dagster' (fixed cost, for reference)": [python, "-c", "import dagster"],
            "phases": [python, str(Path(__file__).resolve()), "--child"],
            "dagster definitions validate": [dagster_cli, "definitions", "validate", "-m", "ccat_dagster.definitions"],
            "dagster definitions validate --load-with-grpc": [
                dagster_cli,
                "definitions",
                "validate",
                "--load-with-grpc",
                "-m",
                "ccat_dagster.definitions",
            ],
        }
        seconds: dict[str, list[float]] = {label: [] for label in commands}
        phases: list[dict[str, float]] = []
        counts: dict[str, int] = {}
        timed(commands["phases"], env)  # warm-up: page cache, .pyc files
        for _ in range(args.repeat):
            for label, command in commands.items():
                elapsed, done = timed(command, env)
                seconds[label].append(elapsed)
                if label == "phases":
                    measured = json.loads(done.stdout.strip().splitlines()[-1])
                    phases.append(measured["phases"])
                    counts = measured["counts"]
        reload_label = 'reload in a running `dagster-webserver` (UI "Reload", until loaded)'
        with webserver(env, Path(scratch)) as port:
            timed_reload(port)  # warm-up
            seconds[reload_label] = [timed_reload(port) for _ in range(args.repeat)]
    load_after = os.getloadavg()

    def med(values: list[float]) -> float:
        return statistics.median(values)

    lines = [
        SECTION,
        "",
        f"Run on {started_at:%Y-%m-%d %H:%M} UTC with "
        f"`.venv/bin/python benchmarks/bench_code_location.py{''.join(f' {a}' for a in (argv or sys.argv[1:]))}` "
        f"(repeat {args.repeat} after one warm-up; every figure is a fresh process, as a code server starts; load "
        f"average before / after: {' '.join(f'{x:.2f}' for x in load_before)} / "
        f"{' '.join(f'{x:.2f}' for x in load_after)}).",
        "",
        machine(),
        f"- ops-db: the demo observatory and {PIPELINES} pipelines × 4 steps (calibrate → baseline → grid_map, "
        "baseline → qa_plots; all CONTINUOUS: a sensor each), applied with "
        f"`apply_pipeline_spec` (set-up {setup_seconds:.1f} s). The location holds {counts.get('assets', 0)} assets, "
        f"{counts.get('jobs', 0)} jobs (Dagster's implicit asset job and the retention job), "
        f"{counts.get('sensors', 0)} sensors (one per pipeline, plus the location's "
        f"reconcile sensors) and {counts.get('schedules', 0)} schedule(s) (retention).",
        "",
        "| measurement | median | min | max |",
        "|---|---:|---:|---:|",
    ]
    for label, values in seconds.items():
        name = label if label.startswith("reload") else f"`{label}`"
        if label == "phases":
            name = "in-process load, all phases (fresh process, wall time)"
        lines.append(f"| {name} | {med(values):.2f} s | {min(values):.2f} s | {max(values):.2f} s |")
    for phase in ("import", "build_definitions", "get_repository_def", "repository_snapshot"):
        values = [p[phase] for p in phases]
        lines.append(f"| — phase `{phase}` | {med(values):.2f} s | {min(values):.2f} s | {max(values):.2f} s |")
    grpc = med(seconds["dagster definitions validate --load-with-grpc"])
    in_process = med(seconds["dagster definitions validate"])
    reload = med(seconds[reload_label])
    worst = max(reload, in_process)
    lines += [
        "",
        f"Target: code-location load with {PIPELINES} pipelines × 4 steps ≤ {TARGET_SECONDS:.0f} s: "
        f"{'met' if worst <= TARGET_SECONDS else 'MISSED'}: a reload in the running webserver takes {reload:.2f} s "
        f"and `dagster definitions validate` {in_process:.2f} s (whole CLI process). "
        f"`--load-with-grpc` ({grpc:.2f} s) adds a second cold process to the CLI's: it starts a code server, "
        "imports and builds everything in it, then reads the snapshot over gRPC.",
        "",
        *NOTES,
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.write_docs:
        write_section(SECTION, report)
    return 0


NOTES = [
    "Notes (where the time goes, from pyinstrument / cProfile of a load):",
    "- Runs of a step are runs of Dagster's implicit asset job with that step selected (what the UI's Materialize "
    "and backfills launch): the location defines no job per step. Each such job cost ~10-15 ms per load to build "
    "its run-config schema and snapshot (five configurable resources and an op config); with one per step (200 "
    "here) that was most of a load. On 2026-11-23 at 14:02 UTC, with a job per step, the same benchmark measured "
    "3.85 s in process, 5.03 s for `dagster definitions validate` and 8.59 s with `--load-with-grpc`; the phases "
    "`get_repository_def` and `repository_snapshot` took 0.55 s and 0.70 s.",
    "- Earlier fixes: Dagster calls the `@dg.definitions` function twice per load, so `defs` reuses what it built "
    "while ops-db is unchanged (a reload after `pipelines apply` still rebuilds: "
    "tests/test_code_location_reload.py); reading the pipelines takes 6 queries instead of ~250 lazy loads.",
    "- What remains is mostly fixed cost: `import dagster` (~1 s) and our modules (SQLAlchemy, the ORM models), "
    "then ~2 ms per step asset in the `@asset` decorator and the pipelines' sensors.",
    "- The webserver reload is what an operator waits for after `pipelines apply`: a new code-server process "
    "(import, ops-db read, build) and the snapshot read over gRPC; the webserver and the daemon keep running.",
    "- All 50 pipelines are CONTINUOUS; a CRON pipeline loads the same assets and one `<pipeline>__cron` sensor "
    "instead of `<pipeline>__new_data`, so it costs the same.",
]


if __name__ == "__main__":
    sys.exit(main())
