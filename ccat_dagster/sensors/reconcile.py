"""Mirror Dagster run failures and terminations into ops-db, and reconcile attempts whose run died.

The step asset ends its own attempts on every path it controls; these sensors cover what it cannot: a run
worker killed by the OS, a run terminated before the asset body started, a code server restart.
"""

from __future__ import annotations

import os

import dagster as dg

from ccat_dagster.execution.reconcile import end_attempts_of_runs, orphaned_attempt_runs
from ccat_dagster.opsdb.engine import session_scope, shared_engine
from ccat_dagster.settings import Settings

# Dagster processes only 5 finished runs per run-status tick by default; a busy night finishes far more.
os.environ.setdefault("DAGSTER_RUN_STATUS_SENSOR_PROCESS_LIMIT", "200")


def build_reconcile_sensors(*, settings: Settings, backend_factory) -> list[dg.SensorDefinition]:  # type: ignore[no-untyped-def]
    @dg.run_status_sensor(
        name="ccat_run_failures_to_opsdb",
        run_status=dg.DagsterRunStatus.FAILURE,
        monitor_all_code_locations=False,
        default_status=dg.DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=15,
        description="Marks ops-db attempts of a failed Dagster run FAILED and cancels their HPC jobs.",
    )
    def run_failures(context: dg.RunStatusSensorContext) -> None:
        _end(
            context.dagster_run.run_id,
            cancelled=False,
            settings=settings,
            backend_factory=backend_factory,
            log=context.log,
        )

    @dg.run_status_sensor(
        name="ccat_run_cancellations_to_opsdb",
        run_status=dg.DagsterRunStatus.CANCELED,
        monitor_all_code_locations=False,
        default_status=dg.DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=15,
        description="Marks ops-db attempts of a terminated Dagster run CANCELLED and cancels their HPC jobs.",
    )
    def run_cancellations(context: dg.RunStatusSensorContext) -> None:
        _end(
            context.dagster_run.run_id,
            cancelled=True,
            settings=settings,
            backend_factory=backend_factory,
            log=context.log,
        )

    @dg.sensor(
        name="ccat_orphaned_attempts",
        minimum_interval_seconds=120,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Finds in-flight ops-db attempts whose Dagster run is gone or finished, and ends them.",
    )
    def orphaned(context: dg.SensorEvaluationContext) -> dg.SkipReason:
        engine = shared_engine(settings.ops_db_url)
        with session_scope(engine) as session:
            run_ids = orphaned_attempt_runs(session, limit=500)
        dead = []
        for run_id in run_ids:
            run = context.instance.get_run_by_id(run_id)
            if run is None or run.is_finished:
                dead.append((run_id, run is not None and run.status == dg.DagsterRunStatus.CANCELED))
        for run_id, cancelled in dead:
            _end(
                run_id,
                cancelled=cancelled,
                settings=settings,
                backend_factory=backend_factory,
                log=context.log,
            )
        return dg.SkipReason(f"checked {len(run_ids)} run(s) with in-flight attempts; ended attempts of {len(dead)}")

    return [run_failures, run_cancellations, orphaned]


def _end(run_id: str, *, cancelled: bool, settings: Settings, backend_factory, log) -> None:  # type: ignore[no-untyped-def]
    engine = shared_engine(settings.ops_db_url)
    ended = end_attempts_of_runs(engine, run_ids=[run_id], cancelled=cancelled, backend=backend_factory())
    if ended:
        log.info(f"run {run_id}: ended {len(ended)} ops-db attempt(s) as {'cancelled' if cancelled else 'failed'}")
