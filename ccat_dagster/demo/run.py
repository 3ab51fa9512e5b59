"""Drive the demo through real Dagster: sensor ticks, the runs they request, until nothing is left to do.

Each tick evaluates the pipeline's real sensor against a real DagsterInstance (its dynamic partitions, its
cursor), then executes each requested run in process with the run's tags and config, exactly as the daemon
would launch it. ``dagster dev`` / ``dg dev`` shows the same instance afterwards (DAGSTER_HOME).

The demo is quiet: Dagster's own run log goes to the instance (the UI shows it) and only warnings and errors
reach the terminal; the demo prints one line per tick and per run state change, a progress bar per batched
run (rich), then the final products, their lineage down to the scans, and the command that opens the UI.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError

from ccat_dagster.errors import CcatError
from ccat_dagster.opsdb import models as m
from ccat_dagster.opsdb.engine import make_engine, session_scope
from ccat_dagster.opsdb.enums import TERMINAL_RUN_STATUSES, TriggerType
from ccat_dagster.sensors.gaps import sensor_name
from ccat_dagster.settings import Settings

# Progress: (sub-groups finished, sub-groups in the run) → None.
ProgressUpdate = Callable[[int, int], None]
ProgressFactory = Callable[[str, int], Any]  # (description, total) → context manager yielding a ProgressUpdate

# What the terminal shows of Dagster's run log during the demo: warnings and errors only.
QUIET_LOGGERS = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
PROGRESS_POLL_SECONDS = 0.5


class DemoError(CcatError, ValueError):
    """A pipeline the demo cannot drive (e.g. not CONTINUOUS); the message says how to run it instead."""


@dataclass
class DemoRunLog:
    ticks: int = 0
    runs: list[tuple[str, str, bool]] = field(default_factory=list)  # (step, partition or batch, success)


def execute_run_request(
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    request: dg.RunRequest,
    *,
    run_id: str | None = None,
    quiet: bool = False,
    **tags: str,
) -> dg.ExecuteInProcessResult:
    """Execute a sensor's run request in process, as the daemon would launch it: the implicit asset job with the
    request's one step selected, its partition (or partition-range tags) and run config. ``quiet`` keeps
    Dagster's console log to warnings and errors (the instance still stores every event)."""
    run_config = dict(request.run_config or {})
    if quiet:
        run_config = {**QUIET_LOGGERS, **run_config}
    return defs.resolve_implicit_global_asset_job_def().execute_in_process(
        instance=instance,
        asset_selection=request.asset_selection,
        partition_key=request.partition_key,
        run_config=run_config or None,
        tags={**request.tags, **tags},
        run_id=run_id,
        raise_on_error=False,
    )


@contextmanager
def _no_progress(_description: str, _total: int) -> Iterator[ProgressUpdate]:
    yield lambda _done, _total: None


class _AttemptWatcher(threading.Thread):
    """Reads from ops-db how many sub-groups of one Dagster run have finished, while the run executes."""

    def __init__(self, engine: Engine, run_id: str, total: int, update: ProgressUpdate) -> None:
        super().__init__(name=f"demo-progress-{run_id[:8]}", daemon=True)
        self.engine, self.run_id, self.total, self.update = engine, run_id, total, update
        self.stopped = threading.Event()

    def finished_sub_groups(self) -> int:
        with session_scope(self.engine) as session:
            rows = session.execute(
                select(m.ExecutedReductionStep.sub_group_key, m.ExecutedReductionStep.status).where(
                    m.ExecutedReductionStep.dagster_run_id == self.run_id
                )
            ).all()
        open_keys = {key for key, status in rows if status not in TERMINAL_RUN_STATUSES}
        return len({key for key, status in rows if status in TERMINAL_RUN_STATUSES} - open_keys)

    def run(self) -> None:
        while not self.stopped.wait(PROGRESS_POLL_SECONDS):
            try:
                self.update(self.finished_sub_groups(), self.total)
            except OperationalError:  # SQLite busy while the run writes: try again at the next poll
                continue

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=5)
        try:
            self.update(self.finished_sub_groups(), self.total)
        except OperationalError:
            pass


def run_sensor_until_idle(
    *,
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    pipeline: str,
    max_ticks: int = 10,
    echo: Callable[[str], None] = print,
    progress: ProgressFactory = _no_progress,
    ops_db: Engine | None = None,
) -> DemoRunLog:
    """Tick the pipeline's sensor and execute the runs it requests until a tick requests none.

    One ``echo`` line per tick and per run state change (started, success/FAILED); with ``ops_db`` a
    ``progress`` bar per run follows its sub-groups as they finish.
    """
    sensor = defs.resolve_sensor_def(sensor_name(pipeline))
    log = DemoRunLog()
    cursor: str | None = None
    for _ in range(max_ticks):
        context = dg.build_sensor_context(instance=instance, cursor=cursor, definitions=defs)
        # The tick line below carries the sensor's summary; its own INFO log would say it twice.
        context.log.setLevel(logging.WARNING)
        # Called directly, the sensor returns its SensorResult as written; the daemon would now add the
        # partitions, then validate and launch the runs, which is what this loop does.
        result = sensor(context)
        log.ticks += 1
        cursor = result.cursor
        for request in result.dynamic_partitions_requests or []:
            instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
        if not result.run_requests:
            echo(f"tick {log.ticks}: {result.skip_reason.skip_message if result.skip_reason else 'no run requested'}")
            break
        echo(f"tick {log.ticks}: {len(result.run_requests)} run(s) requested")
        for request in result.run_requests:
            step = "/".join(request.asset_selection[0].path) if request.asset_selection else "?"
            label = request.partition_key or f"{request.tags.get('ccat/sub_groups', '?')} sub-groups"
            total = 1 if request.partition_key else int(request.tags.get("ccat/sub_groups", "1") or 1)
            run_id = str(uuid.uuid4())
            echo(f"  run {run_id[:8]} {step} [{label}]: started")
            started = time.monotonic()
            with progress(f"  {step}", total) as update:
                watcher = _AttemptWatcher(ops_db, run_id, total, update) if ops_db is not None else None
                if watcher is not None:
                    watcher.start()
                try:
                    outcome = execute_run_request(
                        defs, instance, request, run_id=run_id, quiet=True, **{"dagster/sensor_name": sensor.name}
                    )
                finally:
                    if watcher is not None:
                        watcher.stop()
            log.runs.append((step, label, outcome.success))
            state = "success" if outcome.success else "FAILED (the Dagster UI shows its log)"
            echo(f"  run {run_id[:8]} {step} [{label}]: {state} in {time.monotonic() - started:.1f} s")
    return log


DEMO_PIPELINE = "chai_ngc253_co43"
DAGSTER_YAML_FOR_DEMO = """# The first-run demo instance: Dagster's embedded SQLite storage under this directory.
# Production uses deploy/dagster.yaml (PostgreSQL) instead.
telemetry:
  enabled: false
run_coordinator:
  module: dagster.core.run_coordinator
  class: QueuedRunCoordinator
  config:
    max_concurrent_runs: 2
"""


def prepare_demo_dagster_home(home: Path) -> Path:
    """A DAGSTER_HOME with the demo's instance config (an existing dagster.yaml is kept)."""
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists():
        config.write_text(DAGSTER_YAML_FOR_DEMO)
    return home


def run_demo(
    settings: Settings,
    *,
    example: Path,
    echo: Callable[[str], None] = print,
    progress: ProgressFactory = _no_progress,
) -> int:
    """Apply a pipeline and let its sensor drive it to completion; print the final products, their lineage down
    to the scans, and the command that opens the UI. Exit code 1 when a run failed or nothing was produced."""
    from ccat_dagster.definitions import build_definitions
    from ccat_dagster.pipelines.apply import apply_pipeline_spec
    from ccat_dagster.pipelines.spec import load_pipeline_spec

    engine = make_engine(settings.ops_db_url)
    try:
        with session_scope(engine) as session:
            result = apply_pipeline_spec(session, load_pipeline_spec(example), source_path=example)
            pipeline = session.get(m.Pipeline, result.pipeline_id)
            assert pipeline is not None
            if pipeline.trigger_type is not TriggerType.CONTINUOUS or not pipeline.enabled:
                raise DemoError(
                    f"pipeline {result.pipeline_name!r} is {pipeline.trigger_type.value}"
                    f"{'' if pipeline.enabled else ', disabled'}: the demo drives an enabled CONTINUOUS pipeline "
                    f"through its sensor; run this one with `dg launch --assets {result.pipeline_name}/STEP "
                    "--partition KEY`"
                )
            steps = " → ".join(s.name for s in sorted(pipeline.steps, key=lambda s: s.position))
        echo(f"pipeline {result.pipeline_name} ({steps}): {result.outcome.value}")
        home = Path(os.environ.get("DAGSTER_HOME") or settings.data_dir / "dagster-home")
        prepare_demo_dagster_home(home)
        os.environ["DAGSTER_HOME"] = str(home)
        instance = dg.DagsterInstance.get()
        log = run_sensor_until_idle(
            defs=build_definitions(settings),
            instance=instance,
            pipeline=result.pipeline_name,
            echo=echo,
            progress=progress,
            ops_db=engine,
        )
        with session_scope(engine) as session:
            products = _final_products(session, result.pipeline_name)
            for line in _product_report(session, result.pipeline_name, products):
                echo(line)
    finally:
        engine.dispose()
    failed = [run for run in log.runs if not run[2]]
    echo(f"{len(log.runs)} run(s) in {log.ticks} sensor tick(s), {len(failed)} failed; Dagster home: {home}")
    echo(f"open the UI: {ui_command(home, settings)}")
    return 1 if failed or not products else 0


def _final_products(session: Any, pipeline: str) -> list[m.DataProduct]:
    """The current products of the pipeline's last step (highest position)."""
    last_step = session.scalars(
        select(m.ReductionStep)
        .join(m.Pipeline, m.ReductionStep.pipeline_id == m.Pipeline.id)
        .where(m.Pipeline.name == pipeline)
        .order_by(m.ReductionStep.position.desc())
        .limit(1)
    ).one()
    return list(
        session.scalars(
            select(m.DataProduct)
            .where(m.DataProduct.reduction_step_id == last_step.id)
            .where(m.DataProduct.superseded_by_id.is_(None))
            .order_by(m.DataProduct.relative_path)
        ).all()
    )


def _product_report(session: Any, pipeline: str, products: list[m.DataProduct]) -> list[str]:
    from ccat_dagster.opsdb.lineage import lineage_summary

    if not products:
        return [f"no final products of {pipeline}"]
    step = products[0].step.name
    lines = [f"final products of {pipeline}/{step} ({len(products)}; `ccat-dagster products list` lists them):"]
    for product in products:
        copy = product.physical_copies[0].path if product.physical_copies else "-"
        lines.append(f"  #{product.id:<4} {product.product_type.value:<10} {product.size_bytes:>9} B  {copy}")
    science = next((p for p in products if p.product_type.value == "science"), products[0])
    summary = lineage_summary(session, product_id=science.id, package_limit=3)
    lines.append(f"lineage of #{science.id} ({Path(science.relative_path).name}), `ccat-dagster lineage {science.id}`:")
    for entry in summary.steps:
        lines.append(
            f"  {entry.step.name}: {entry.attempts} attempt(s) over {entry.sub_groups} sub-group(s), "
            f"{entry.software.software} {entry.software.version}"
        )
    names = ", ".join(p.name for p in summary.packages)
    more = summary.package_count - len(summary.packages)
    lines.append(
        f"  from {summary.package_count} scan(s) ({summary.package_bytes} B, {summary.file_count} raw files): "
        f"{names}{f', … {more} more' if more > 0 else ''}"
    )
    return lines


def ui_command(home: Path, settings: Settings, *, cwd: Path | None = None) -> str:
    """The command that opens the Dagster UI on the demo's instance and ops-db: ``dg dev`` in a checkout (the
    ``[tool.dg]`` project), else ``dagster dev`` on the installed module. CCAT_OPS_DB_URL, when set, is
    already in the environment and is not repeated (it may hold a password)."""
    env = f"DAGSTER_HOME={home} CCAT_DAGSTER_DATA_DIR={settings.data_dir}"
    pyproject = (cwd or Path.cwd()) / "pyproject.toml"
    if pyproject.is_file() and "[tool.dg]" in pyproject.read_text(errors="replace"):
        return f"{env} dg dev"
    return f"{env} dagster dev -m ccat_dagster.definitions"
