"""Drive the demo through real Dagster: sensor ticks, the runs they request, until nothing is left to do.

Each tick evaluates the pipeline's real sensor against a real DagsterInstance (its dynamic partitions, its
cursor), then executes each requested run in process with the run's tags and config, exactly as the daemon
would launch it. ``dagster dev`` shows the same instance afterwards (DAGSTER_HOME).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
from sqlalchemy import select

from ccat_dagster.opsdb import models as m
from ccat_dagster.opsdb.engine import make_engine, session_scope
from ccat_dagster.sensors.gaps import sensor_name
from ccat_dagster.settings import Settings


@dataclass
class DemoRunLog:
    ticks: int = 0
    runs: list[tuple[str, str, bool]] = field(default_factory=list)  # (step, partition or batch, success)


def execute_run_request(
    defs: dg.Definitions, instance: dg.DagsterInstance, request: dg.RunRequest, **tags: str
) -> dg.ExecuteInProcessResult:
    """Execute a sensor's run request in process, as the daemon would launch it: the implicit asset job with the
    request's one step selected, its partition (or partition-range tags) and run config."""
    return defs.resolve_implicit_global_asset_job_def().execute_in_process(
        instance=instance,
        asset_selection=request.asset_selection,
        partition_key=request.partition_key,
        run_config=request.run_config or None,
        tags={**request.tags, **tags},
        raise_on_error=False,
    )


def run_sensor_until_idle(
    *,
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    pipeline: str,
    max_ticks: int = 10,
    echo: Callable[[str], None] = print,
) -> DemoRunLog:
    sensor = defs.get_sensor_def(sensor_name(pipeline))
    log = DemoRunLog()
    cursor: str | None = None
    for _ in range(max_ticks):
        context = dg.build_sensor_context(instance=instance, cursor=cursor, definitions=defs)
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
            outcome = execute_run_request(defs, instance, request, **{"dagster/sensor_name": sensor.name})
            label = request.partition_key or f"{request.tags.get('ccat/sub_groups', '?')} sub-groups"
            step = "/".join(request.asset_selection[0].path) if request.asset_selection else "?"
            log.runs.append((step, label, outcome.success))
            echo(f"  run {outcome.run_id[:8]} {step} [{label}]: {'success' if outcome.success else 'FAILED'}")
    return log


DEMO_PIPELINE = "chai_ngc253_co43"
DAGSTER_YAML_FOR_DEMO = """# The first-run demo instance: Dagster's embedded SQLite storage under this directory.
# Production uses the repository's dagster.yaml (PostgreSQL) instead.
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


def run_demo(settings: Settings, *, example: Path, echo: Callable[[str], None] = print) -> int:
    """Apply the example pipeline and let its sensor drive it to completion; print the final products."""
    from ccat_dagster.definitions import build_definitions
    from ccat_dagster.pipelines.apply import apply_pipeline_spec
    from ccat_dagster.pipelines.spec import load_pipeline_spec

    engine = make_engine(settings.ops_db_url)
    with session_scope(engine) as session:
        result = apply_pipeline_spec(session, load_pipeline_spec(example), source_path=example)
        echo(f"pipeline {result.pipeline_name}: {result.outcome.value}")
    home = Path(os.environ.get("DAGSTER_HOME") or settings.data_dir / "dagster-home")
    prepare_demo_dagster_home(home)
    os.environ["DAGSTER_HOME"] = str(home)
    instance = dg.DagsterInstance.get()
    log = run_sensor_until_idle(defs=build_definitions(settings), instance=instance, pipeline=DEMO_PIPELINE, echo=echo)
    with session_scope(engine) as session:
        products = session.scalars(
            select(m.DataProduct)
            .join(m.ReductionStep, m.DataProduct.reduction_step_id == m.ReductionStep.id)
            .join(m.Pipeline, m.ReductionStep.pipeline_id == m.Pipeline.id)
            .where(m.Pipeline.name == DEMO_PIPELINE, m.ReductionStep.name == "grid_map")
            .where(m.DataProduct.superseded_by_id.is_(None))
            .order_by(m.DataProduct.relative_path)
        ).all()
        echo(f"\nfinal products of {DEMO_PIPELINE}/grid_map ({len(products)}):")
        for product in products:
            copy = product.physical_copies[0].path if product.physical_copies else "-"
            echo(f"  #{product.id:<4} {product.product_type.value:<10} {product.size_bytes:>9} B  {copy}")
    engine.dispose()
    failed = [run for run in log.runs if not run[2]]
    echo(f"\n{len(log.runs)} run(s) in {log.ticks} sensor tick(s), {len(failed)} failed; Dagster home: {home}")
    return 1 if failed or not products else 0
