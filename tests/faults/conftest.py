"""Fixtures of the fault suite: one world (private PostgreSQL, code server, daemon) shared by every scenario.

Each scenario records its figures (survived, products lost, duplicated, recovery time); at the end of the
session they are written to docs/reliability.md (rows of scenarios that did not run keep their last figures).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import importlib.util
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from .harness import OUTCOMES, OUTCOMES_KEY, REPO, FaultWorld, Outcome, scenario_pipeline_spec


def _spec(**overrides):  # type: ignore[no-untyped-def]
    return lambda name, packages: scenario_pipeline_spec(name, packages, **overrides)


def _per_package(work: dict, first: dict, **overrides):  # type: ignore[no-untyped-def]
    """Work config with ``first`` for the scenario's first package."""

    def build(name, packages):  # type: ignore[no-untyped-def]
        return scenario_pipeline_spec(name, packages, work={**work, "by_package": {packages[0]: first}}, **overrides)

    return build


# Scenario -> (title in docs/reliability.md, pipeline spec builder, packages it uses).
SCENARIOS: dict[str, tuple[str, object, int]] = {
    "worker_sigkill_local": ("run worker SIGKILLed mid-job (local backend)", scenario_pipeline_spec, 2),
    "worker_sigkill_before_attempt": (
        "run worker SIGKILLed before it created an attempt",
        _spec(work={"sleep_seconds": 1}, fan_in=False),
        1,
    ),
    "dead_runs_fill_pool": ("more dead runs than the pool's slots, then new data", _spec(work={"sleep_seconds": 6}), 4),
    "two_launches": ("two launches of the same partition at once", _spec(work={"sleep_seconds": 1}, fan_in=False), 1),
    "payload_killed_local": ("the payload SIGKILLed (local backend)", scenario_pipeline_spec, 2),
    "bad_raw_tars": (
        "a corrupted and a missing raw tar beside a good package in one round",
        _spec(work={"sleep_seconds": 0}, fan_in=False),
        3,
    ),
    "disk_full_output_dir": (
        "one sub-group's output directory full (its own small tmpfs)",
        _spec(work={"sleep_seconds": 1, "write_mb": 8}, fan_in=False),
        2,
    ),
    "disk_full_base_dir": (
        "the whole PIPELINE_BASE_DIR full (a small tmpfs) while a round runs",
        _per_package({"sleep_seconds": 0}, {"sleep_seconds": 3, "write_mb": 16}, fan_in=False),
        2,
    ),
    "daemon_sigkill": ("dagster-daemon SIGKILLed with runs in flight, restarted", scenario_pipeline_spec, 2),
    "code_server_sigkill": ("code server SIGKILLed with runs in flight, restarted", scenario_pipeline_spec, 2),
    "pg_stop_sensor_tick": (
        "PostgreSQL stopped for 20 s during a sensor tick",
        _spec(work={"sleep_seconds": 1}, fan_in=False),
        1,
    ),
    "pg_stop_collection": ("PostgreSQL stopped for 20 s during collection", scenario_pipeline_spec, 2),
    "worker_sigkill_slurm": ("run worker SIGKILLed mid-job (Slurm)", scenario_pipeline_spec, 2),
    "scancel_outside": ("a job scancelled from outside", scenario_pipeline_spec, 1),
    "oom_escalation": (
        "a job over its memory on Slurm (OverMemoryKill), retried with more memory",
        _spec(work={"allocate_mb": 1400, "sleep_seconds": 3}, fan_in=False),
        1,
    ),
    "oom_cap": (
        "a job that needs more memory than the escalation's cap (Slurm)",
        _spec(work={"allocate_mb": 2600, "sleep_seconds": 3}, max_retries=1, fan_in=False),
        1,
    ),
    "walltime_escalation": (
        "a job over its time limit on Slurm (pre-walltime signal), retried with more time",
        _spec(
            work={"time_needed_seconds": 90, "sleep_seconds": 0}, work_resources={"time_hours": 1 / 60}, fan_in=False
        ),
        1,
    ),
    "slurmctld_outage": (
        "slurmctld restarted, then stopped for longer than one poll, during a batch",
        _spec(work={"sleep_seconds": 15}),
        2,
    ),
}


def _require_tools() -> None:
    missing = [tool for tool in ("bwrap", "runuser") if shutil.which(tool) is None]
    if not Path("/usr/lib/postgresql").exists():
        missing.append("postgresql (initdb, pg_ctl)")
    if missing:
        message = f"the fault suite needs {', '.join(missing)}: run scripts/setup.sh"
        if os.environ.get("CI") or os.environ.get("CCAT_REQUIRE_ALL_BACKENDS"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def fault_world(request, tmp_path_factory) -> Iterator[FaultWorld]:
    """A world for one test module, with the pipelines of the scenarios it names in ``WORLD_SCENARIOS``.

    One per module, stopped when the module ends: an idle world (its daemon ticking the sensors of every
    pipeline, its code server, its PostgreSQL) would otherwise take CPU from every later test of the session."""
    _require_tools()
    names = getattr(request.module, "WORLD_SCENARIOS", None)
    unknown = sorted(set(names or ()) - set(SCENARIOS))
    if not names or unknown:
        raise RuntimeError(
            f"{request.module.__name__}: WORLD_SCENARIOS must name scenarios of tests/faults/conftest.py "
            f"(unknown: {unknown})"
        )
    # CCAT_FAULTS_DIR keeps the world (logs of the code server and daemon, ops-db files) for a post-mortem.
    keep = os.environ.get("CCAT_FAULTS_DIR")
    module = request.module.__name__.rpartition(".")[2]
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    root = Path(keep) / f"{stamp}-{module}" if keep else tmp_path_factory.mktemp(f"faults-{module}")
    root.mkdir(parents=True, exist_ok=True)
    world = FaultWorld.create(
        root,
        {name: SCENARIOS[name][1] for name in names},  # type: ignore[misc]
        {name: SCENARIOS[name][2] for name in names},
    )
    try:
        world.start_services()
        yield world
    finally:
        world.stop()


@pytest.hookimpl(trylast=True)  # after pytest's own reordering
def pytest_collection_modifyitems(session, config, items):  # type: ignore[no-untyped-def]
    """Each module's check of its whole ops-db runs after the module's other tests, whatever pytest's ordering
    (it reorders tests by their parametrized fixtures)."""
    for check in [item for item in items if item.name == "test_ops_db_invariants_hold_after_every_scenario"]:
        items.remove(check)
        last = max(i for i, item in enumerate(items) if item.path == check.path)
        items.insert(last + 1, check)


def pytest_sessionfinish(session, exitstatus):  # type: ignore[no-untyped-def]
    """Writes docs/reliability.md at the end of a serial session.

    Under pytest-xdist each worker runs some of the scenarios and hands its figures to the controller
    (``workeroutput``); the controller, which never loads this file, writes the page (tests/conftest.py).
    """
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput[OUTCOMES_KEY] = [dataclasses.asdict(outcome) for outcome in OUTCOMES]
        return
    if OUTCOMES:
        write_reliability(OUTCOMES)


_ROW = re.compile(r"^\| `(?P<key>[a-z0-9_]+)` \|")


def write_reliability(outcomes: list[Outcome]) -> None:
    path = REPO / "docs" / "reliability.md"
    previous: dict[str, str] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            match = _ROW.match(line)
            if match:
                previous[match["key"]] = line
    today = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    rows = dict(previous)
    for outcome in outcomes:
        title = SCENARIOS.get(outcome.scenario, (outcome.scenario,))[0]
        recovery = "—" if outcome.recovery_seconds is None else f"{outcome.recovery_seconds:.0f} s"
        rows[outcome.scenario] = (
            f"| `{outcome.scenario}` | {title} | {'yes' if outcome.survived else '**no**'} | {outcome.products_lost} "
            f"| {outcome.duplicated} | {recovery} | {today} | {outcome.note.replace('|', '/')} |"
        )
    order = [*SCENARIOS, *sorted(k for k in rows if k not in SCENARIOS)]
    table = "\n".join(rows[k] for k in order if k in rows)
    path.write_text(
        _HEADER.format(machine=_machine())
        + "| scenario | fault | survived | products lost | duplicated | recovery | date | note |\n"
        + "|---|---|---|---|---|---|---|---|\n"
        + table
        + "\n"
        + _FOOTER
    )


def _machine() -> str:
    load = (
        "- load average (1, 5, 15 min) at the end of the run: {:.1f}, {:.1f}, {:.1f} (work of other processes on the "
    )
    load = (load + "machine lengthens the recovery times)\n").format(*os.getloadavg())
    return _benchmark_machine() + "\n" + load.rstrip()


def _benchmark_machine() -> str:
    try:
        spec = importlib.util.spec_from_file_location("bench_common", REPO / "benchmarks" / "bench_common.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.machine().rstrip()
    except Exception as error:  # noqa: BLE001 - the figures matter more than the machine line
        return f"- machine description unavailable ({error})"


_HEADER = """# Reliability: the fault suite's figures

Written by the fault suite (`tests/faults/`, part of `./scripts/test`) at the end of every run; do not edit by
hand. Each scenario injects one fault into real components (the dagster-daemon and run workers on a PostgreSQL
Dagster instance, a code server started with `dagster code-server start`, the local backend with bubblewrap,
and a PostgreSQL cluster the suite starts itself so that it may stop it), then checks that the pipeline
completes after recovery, that no product was lost or duplicated and that the ops-db invariants hold
(`ccat_dagster/opsdb/invariants.py`).

- *products lost*: sub-groups left without their products after recovery, plus products whose file or copy
  row is missing;
- *duplicated*: products registered twice, or a sub-group completed twice with the same inputs;
- *recovery*: from the fault to the pipeline's completion (includes the remaining work of the pipeline).

The intervals are those of the production `dagster.yaml` except run monitoring's poll interval, the delay
before a dead run's pool slots are freed and the launch-retry delay (2 s each here), and the sensors'
interval (`CCAT_WORKFLOW_MANAGER_SENSOR_INTERVAL_SECONDS=2`). See docs/operations.md, "Restarts", for what
happens on each kind of restart in production and which timeouts apply.

Scenarios that share nothing but the services run side by side (the local-backend ones, then the Slurm ones);
faults of a shared service (daemon, code server, PostgreSQL, the whole `PIPELINE_BASE_DIR`) run alone, and
one PostgreSQL outage serves both PostgreSQL scenarios. `PIPELINE_BASE_DIR` is a 256 MiB tmpfs that the
full-disk scenario shrinks to a few MiB more than it holds; the other full-disk scenario mounts a 4 MiB tmpfs
over one sub-group's output directory. Memory escalation is capped at 2 GiB
(`CCAT_WORKFLOW_MANAGER_MAX_MEMORY_GB=2`) so that a scenario reaches the cap; memory is enforced by the
single-node Slurm's `JobAcctGatherParams=OverMemoryKill` (sampled every second, `scripts/slurm-single-node.sh`).
The walltime scenario's payload reads its limit from `WORKFLOW_TIME_LIMIT_SECONDS` and, once the retry gives
it enough, finishes at once: the scenario costs the first attempt's pre-walltime signal (with a 1-minute limit
Slurm sends it within the first 30 s), not the escalated limit.

Machine of the last run (the PostgreSQL line describes the machine's main server; the suite's own cluster is
the same version with `fsync`, `synchronous_commit` and `full_page_writes` off):

{machine}

"""

_FOOTER = """
A row whose *survived* is **no** names the first line of the failure; the scenario's test shows the rest.
"""
