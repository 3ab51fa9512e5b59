"""Mirror Dagster run failures and terminations into ops-db, detect dead run workers, and adopt their jobs.

The step asset ends its own attempts on every path it controls; these sensors cover what it cannot: a run
worker killed by the OS, a run terminated before the asset body started, a code server or daemon restart.

- A terminated run (CANCELED, asked by a person or by Dagster's run termination): its jobs are cancelled and its
  in-flight attempts end CANCELLED.
- A run that died (FAILED, vanished, or STARTED with its worker process gone): jobs are NOT cancelled. Attempts
  that never reached the backend end FAILED; those with a job id stay in flight, and ``ccat_orphaned_attempts``
  requests one run per step (run key per set of attempts, so once) that adopts them by job id and collects them
  (``execution.reconcile``, ``StepRunner._adopt``).
- An automatic run (sensor or schedule) that failed before it created any attempt (its launch failed while
  PostgreSQL was away, or its worker was killed first) left nothing in ops-db that a later tick would follow:
  ``ccat_orphaned_attempts`` launches it again with the same sub-groups, up to ``MAX_RELAUNCHES`` in a row. A
  STARTED step run with no attempt whose worker is gone is marked failed first.
- The default run launcher has no worker health check, so Dagster's run monitoring never notices a run worker
  that was killed while STARTED: ``ccat_orphaned_attempts`` does, by the worker process ids Dagster records in
  the run's engine events ("Started process for run (pid: …)"), and marks the run failed, which also lets run
  monitoring free its pool slots (``free_slots_after_run_end_seconds`` in dagster.yaml).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import time

import dagster as dg
from dagster._core.storage.tags import (  # the same tags the gap sensors set (sensors/gaps.py)
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
    PARTITION_NAME_TAG,
)

from ccat_dagster.assets.factory import BACKEND_TAG, PIPELINE_TAG, STEP_TAG, TRIGGER_TAG, step_asset_key
from ccat_dagster.execution.reconcile import (
    MAX_RELAUNCHES,
    AdoptionRequest,
    cancel_attempts_of_runs,
    give_up,
    orphaned_attempt_runs,
    plan_adoptions,
    release_attempts_of_dead_runs,
    runs_with_attempts,
    workers_gone,
)
from ccat_dagster.opsdb.engine import session_scope, shared_engine
from ccat_dagster.settings import Settings

# Dagster processes only DAGSTER_RUN_STATUS_SENSOR_PROCESS_LIMIT (default 5) finished runs per run-status tick,
# and with monitor_all_code_locations=False it reads only DAGSTER_RUN_STATUS_SENSOR_FETCH_LIMIT (default 25) runs
# per tick to find them: the fetch limit must be at least the process limit, or the process limit is never
# reached. Read by the code server at every tick; a deployment may set both.
os.environ.setdefault("DAGSTER_RUN_STATUS_SENSOR_PROCESS_LIMIT", "200")
os.environ.setdefault("DAGSTER_RUN_STATUS_SENSOR_FETCH_LIMIT", os.environ["DAGSTER_RUN_STATUS_SENSOR_PROCESS_LIMIT"])

ADOPTION_TAG = "ccat/adoption"
"""On an adoption run: how many adoptions in a row led to it (1 for the first)."""
ADOPTED_FROM_TAG = "ccat/adopted_from"
"""On an adoption run: the dead run(s) whose attempts it adopts."""
RELAUNCH_TAG = "ccat/relaunch"
"""On a relaunched run: how many runs in a row failed before creating an attempt (1 for the first relaunch)."""
RELAUNCHED_FROM_TAG = "ccat/relaunched_from"
"""On a relaunched run: the failed run it repeats."""
# How far back the first tick (no cursor yet) looks for failed runs to launch again; later ticks follow the cursor.
RELAUNCH_LOOKBACK_SECONDS = 3600
# Failed runs examined per tick, the least recently updated first; the rest wait for the next tick.
FAILED_RUNS_PER_TICK = 200
# The partition tags of a run that targets one sub-group or a range of them (what a relaunch repeats).
PARTITION_TAG = PARTITION_NAME_TAG
RANGE_TAGS = (ASSET_PARTITION_RANGE_START_TAG, ASSET_PARTITION_RANGE_END_TAG)
# The tag in which the default run launcher records the code server a run was launched on (host, port).
GRPC_INFO_TAG = ".dagster/grpc_info"
# A run's worker is judged only this long after it recorded its first process id: the evidence is complete
# once the worker has recorded itself (later step processes start from it), so a short margin suffices.
WORKER_CHECK_GRACE_SECONDS = 5
# In-flight attempts' runs examined per tick (the oldest first in ops-db order); the rest wait for later ticks.
RUNS_PER_TICK = 500


def build_reconcile_sensors(*, settings: Settings, backend_factory) -> list[dg.SensorDefinition]:  # type: ignore[no-untyped-def]
    @dg.run_status_sensor(
        name="ccat_run_failures_to_opsdb",
        run_status=dg.DagsterRunStatus.FAILURE,
        monitor_all_code_locations=False,
        default_status=dg.DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=15,
        description=(
            "A failed Dagster run: ends its ops-db attempts that have no HPC job yet; attempts whose job was "
            "submitted keep running, for ccat_orphaned_attempts to adopt. Never cancels a job."
        ),
    )
    def run_failures(context: dg.RunStatusSensorContext) -> None:
        engine = shared_engine(settings.ops_db_url)
        ended, adoptable = release_attempts_of_dead_runs(engine, run_ids=[context.dagster_run.run_id])
        if ended or adoptable:
            context.log.info(
                f"run {context.dagster_run.run_id}: ended {len(ended)} attempt(s) that had no job; "
                f"{len(adoptable)} job(s) left running for adoption"
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
        engine = shared_engine(settings.ops_db_url)
        ended = cancel_attempts_of_runs(engine, run_ids=[context.dagster_run.run_id], backend=backend_factory())
        if ended:
            context.log.info(f"run {context.dagster_run.run_id}: cancelled {len(ended)} attempt(s) and their jobs")

    @dg.sensor(
        name="ccat_orphaned_attempts",
        minimum_interval_seconds=settings.sensor_interval_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING,
        # Adoption runs target the step assets of any pipeline of this code location.
        asset_selection=dg.AssetSelection.all(),
        description=(
            "Finds in-flight ops-db attempts whose Dagster run is gone, finished or has a dead worker; marks such "
            "runs failed, ends attempts that never reached the backend, and requests one run per step that "
            "adopts the jobs still running or finished, by job id."
        ),
    )
    def orphaned(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        return _reconcile(context, settings=settings, backend_factory=backend_factory)

    return [run_failures, run_cancellations, orphaned]


def _reconcile(context: dg.SensorEvaluationContext, *, settings: Settings, backend_factory) -> dg.SensorResult:  # type: ignore[no-untyped-def]
    engine = shared_engine(settings.ops_db_url)
    instance = context.instance
    with session_scope(engine) as session:
        run_ids = orphaned_attempt_runs(session, limit=RUNS_PER_TICK)
    runs = {run.run_id: run for run in instance.get_runs(filters=dg.RunsFilter(run_ids=run_ids))} if run_ids else {}
    cancelled: list[str] = []
    dead: list[str] = []
    for run_id in run_ids:
        run = runs.get(run_id)
        if run is None or (run.is_finished and run.status != dg.DagsterRunStatus.CANCELED):
            dead.append(run_id)
        elif run.status == dg.DagsterRunStatus.CANCELED:
            cancelled.append(run_id)
        elif run.status == dg.DagsterRunStatus.STARTED and _worker_dead(instance, run):
            if _fail_dead_worker_run(context, run, "its HPC jobs are adopted"):
                dead.append(run_id)  # else it finished by itself meanwhile; judged again next tick
    _fail_dead_runs_without_attempts(context, exclude=set(run_ids))
    if cancelled:
        cancel_attempts_of_runs(engine, run_ids=cancelled, backend=backend_factory())
    ended, adoptable = release_attempts_of_dead_runs(engine, run_ids=dead) if dead else ([], [])
    requests, abandoned = plan_adoptions(
        adoptable, generation_of=lambda rid: int(runs[rid].tags.get(ADOPTION_TAG, "0")) if rid in runs else 0
    )
    if abandoned:
        given_up = give_up(engine, attempt_ids=[a.attempt_id for a in abandoned], backend=backend_factory())
        context.log.warning(f"gave up adopting {len(given_up)} attempt(s) after repeated deaths: {given_up}")
    known = set(context.repository_def.assets_defs_by_key) if context.repository_def is not None else set()
    run_requests = []
    for request in requests:
        key = step_asset_key(request.pipeline_name, request.step_name)
        if key not in known:
            context.log.info(f"{request.pipeline_name}/{request.step_name} is not loaded here; not adopted now")
            continue
        run_requests.append(_run_request(request, key, settings=settings))
    summary = (
        f"{len(run_ids)} run(s) own in-flight attempts: {len(dead)} dead, {len(cancelled)} terminated; "
        f"{len(ended)} attempt(s) without a job ended, {len(adoptable)} job(s) to adopt in {len(run_requests)} run(s)"
    )
    relaunches, cursor = _relaunch_requests(context, engine, known)
    if relaunches:
        summary += f"; {len(relaunches)} run(s) that failed before creating an attempt launched again"
    run_requests.extend(relaunches)
    context.log.info(summary)
    return dg.SensorResult(run_requests=run_requests, cursor=cursor, skip_reason=None if run_requests else summary)


def _fail_dead_runs_without_attempts(context: dg.SensorEvaluationContext, *, exclude: set[str]) -> None:
    """Marks failed the STARTED step runs that own no in-flight attempt and whose worker is gone (killed before it
    created one): nothing else would, and such a run would hold its pool slot and its sub-groups for good."""
    instance = context.instance
    started = instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED]), limit=RUNS_PER_TICK)
    for run in started:
        if run.run_id in exclude or PIPELINE_TAG not in run.tags or not _worker_dead(instance, run):
            continue
        _fail_dead_worker_run(context, run, "it had created no attempt")


def _fail_dead_worker_run(context: dg.SensorEvaluationContext, run: dg.DagsterRun, what_next: str) -> bool:
    """Marks failed a STARTED run whose worker is gone, unless it ended by itself meanwhile; whether it did."""
    latest = context.instance.get_run_by_id(run.run_id)
    if latest is None or latest.status != dg.DagsterRunStatus.STARTED:
        return False
    message = (
        f"the run worker of run {run.run_id} is gone (its processes no longer exist on {socket.gethostname()}); "
        f"marked failed by ccat_orphaned_attempts, {what_next}"
    )
    context.instance.report_run_failed(run, message=message)
    context.log.warning(message)
    return True


def _relaunch_requests(
    context: dg.SensorEvaluationContext,
    engine,
    known: set[dg.AssetKey],  # type: ignore[no-untyped-def]
) -> tuple[list[dg.RunRequest], str]:
    """Runs again the automatic step runs that failed since the cursor without creating an attempt, and the
    next cursor (the last failed run's update time).

    The run key names the failed run, so a repeated tick (or a lost cursor) requests each relaunch once."""
    since = float(context.cursor) if context.cursor else time.time() - RELAUNCH_LOOKBACK_SECONDS
    records = context.instance.get_run_records(
        filters=dg.RunsFilter(
            statuses=[dg.DagsterRunStatus.FAILURE],
            tags={TRIGGER_TAG: ["sensor", "schedule"]},
            updated_after=dt.datetime.fromtimestamp(since, tz=dt.UTC),
        ),
        limit=FAILED_RUNS_PER_TICK,
        order_by="update_timestamp",
        ascending=True,
    )
    if not records:
        return [], str(since)
    cursor = str(max(r.update_timestamp.timestamp() for r in records))
    candidates = {
        r.dagster_run.run_id: r.dagster_run
        for r in records
        if ADOPTION_TAG not in r.dagster_run.tags
        and step_asset_key(r.dagster_run.tags.get(PIPELINE_TAG, ""), r.dagster_run.tags.get(STEP_TAG, "")) in known
    }
    with session_scope(engine) as session:
        created = runs_with_attempts(session, list(candidates))
    requests = []
    for run_id, run in candidates.items():
        if run_id in created:
            continue
        generation = int(run.tags.get(RELAUNCH_TAG, "0")) + 1
        pipeline, step = run.tags[PIPELINE_TAG], run.tags[STEP_TAG]
        if generation > MAX_RELAUNCHES:
            context.log.warning(
                f"run {run_id} of {pipeline}/{step} failed before creating an attempt, the {generation}th in a row; "
                "not launched again: see its log, then `ccat-dagster pipelines gaps` and `pipelines run`"
            )
            continue
        tags = {k: v for k, v in run.tags.items() if k.startswith("ccat/") or k in (*RANGE_TAGS, "dagster/priority")}
        tags.update({RELAUNCH_TAG: str(generation), RELAUNCHED_FROM_TAG: run_id})
        requests.append(
            dg.RunRequest(
                run_key=f"relaunch:{run_id}",
                asset_selection=[step_asset_key(pipeline, step)],
                partition_key=run.tags.get(PARTITION_TAG),
                tags=tags,
            )
        )
        context.log.info(f"run {run_id} of {pipeline}/{step} failed before creating an attempt: launched again")
    return requests, cursor


def _run_request(request: AdoptionRequest, key: dg.AssetKey, *, settings: Settings) -> dg.RunRequest:
    return dg.RunRequest(
        run_key=request.run_key,
        asset_selection=[key],
        run_config=dg.RunConfig(
            ops={key.to_python_identifier(): {"config": {"sub_group_keys": list(request.sub_group_keys)}}}
        ),
        tags={
            # "sensor": an automatic run, so up-to-date sub-groups are skipped, not redone.
            TRIGGER_TAG: "sensor",
            PIPELINE_TAG: request.pipeline_name,
            STEP_TAG: request.step_name,
            BACKEND_TAG: settings.hpc_backend,
            ADOPTION_TAG: str(request.generation),
            ADOPTED_FROM_TAG: ",".join(request.dead_run_ids)[:255],
        },
    )


def _worker_dead(instance: dg.DagsterInstance, run: dg.DagsterRun) -> bool:
    """A STARTED run whose recorded worker processes all ended, on this host (where its code server runs).

    Only runs launched by a code server on this host are judged (the default run launcher starts run workers
    as children of the code server, which is also where this sensor is evaluated); any other run, or one that
    recorded no process, is left to Dagster's run monitoring.
    """
    if not _launched_here(run):
        return False
    records = instance.get_records_for_run(run.run_id, of_type=dg.DagsterEventType.ENGINE_EVENT, limit=100).records
    pids: list[tuple[int, float]] = []
    for record in records:
        event = record.event_log_entry.dagster_event
        if event is None:
            continue
        pid = event.engine_event_data.metadata.get("pid")
        if pid is not None and str(pid.value).isdigit():
            pids.append((int(str(pid.value)), record.event_log_entry.timestamp))
    if not pids or time.time() - min(at for _, at in pids) < WORKER_CHECK_GRACE_SECONDS:
        return False
    return workers_gone(pids)


def _launched_here(run: dg.DagsterRun) -> bool:
    raw = run.tags.get(GRPC_INFO_TAG)
    if not raw:
        return False
    try:
        host = str(json.loads(raw).get("host", ""))
    except (ValueError, AttributeError):
        return False
    return host in {"localhost", "127.0.0.1", "::1", "0.0.0.0", socket.gethostname(), socket.getfqdn()}
