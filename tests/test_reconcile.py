"""Recovery after the orchestrator's own death: dead runs' jobs are left for adoption, never cancelled.

Fast tests of the pure parts (adoption planning, dead-worker evidence) and tests of the sensors on a
PostgreSQL ops-db and Dagster instance with fabricated attempts and runs (the end-to-end paths with real
processes are in tests/faults/).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import dagster as dg
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from ccat_dagster.definitions import build_definitions
from ccat_dagster.execution import reconcile as rec
from ccat_dagster.opsdb import models as m
from ccat_dagster.opsdb.engine import make_engine
from ccat_dagster.opsdb.enums import RunStatus
from ccat_dagster.sensors import reconcile as sensors

from .conftest import PRODUCTION_DAGSTER_YAML
from .dagster_fixtures import PIPELINE, demo_world  # noqa: F401 - fixture

# ------------------------------------------------------------------ pure parts, milliseconds


def _adoptable(attempt_id: int, run_id: str, step: str = "calibrate", key: str | None = None) -> rec.AdoptableAttempt:
    return rec.AdoptableAttempt(attempt_id, "p", step, key or f"k{attempt_id}", f"job-{attempt_id}", run_id)


def test_adoptions_are_one_run_per_step_with_a_stable_run_key():
    attempts = [_adoptable(3, "r1"), _adoptable(1, "r2"), _adoptable(2, "r1", step="baseline")]
    requests, abandoned = rec.plan_adoptions(attempts, generation_of=lambda _run: 0)
    assert abandoned == []
    assert [(r.step_name, r.sub_group_keys, r.attempt_ids, r.generation) for r in requests] == [
        ("baseline", ("k2",), (2,), 1),
        ("calibrate", ("k1", "k3"), (1, 3), 1),
    ]
    assert requests[1].dead_run_ids == ("r1", "r2")
    again, _ = rec.plan_adoptions(list(reversed(attempts)), generation_of=lambda _run: 0)
    assert [r.run_key for r in again] == [r.run_key for r in requests]
    # The adopting run died too: same attempts, new owner, a new run key (else Dagster would skip it).
    later, _ = rec.plan_adoptions([_adoptable(1, "r9"), _adoptable(3, "r9")], generation_of=lambda _run: 1)
    assert later[0].run_key != requests[1].run_key and later[0].generation == 2


def test_adoption_gives_up_after_max_adoptions_in_a_row():
    generations = {"fresh": 0, "tired": rec.MAX_ADOPTIONS}
    requests, abandoned = rec.plan_adoptions(
        [_adoptable(1, "fresh"), _adoptable(2, "tired")], generation_of=generations.__getitem__
    )
    assert [r.attempt_ids for r in requests] == [(1,)]
    assert [a.attempt_id for a in abandoned] == [2]


def test_workers_are_gone_only_when_every_recorded_process_is_gone():
    alive = {10: True, 11: False, 12: False}
    probe = lambda pid, _at: alive[pid]  # noqa: E731
    assert not rec.workers_gone([(10, 0.0), (11, 0.0)], alive=probe)
    assert rec.workers_gone([(11, 0.0), (12, 0.0)], alive=probe)
    assert not rec.workers_gone([], alive=probe)  # no evidence, no verdict


def test_process_alive_knows_a_live_a_dead_and_a_reused_pid():
    import time

    me = os.getpid()
    assert rec.process_alive(me, started_by=time.time())
    # This process existed long before; a record from before it was created means the pid was reused.
    assert not rec.process_alive(me, started_by=0.0)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert not rec.process_alive(child.pid, started_by=time.time())


def test_the_run_status_sensors_fetch_as_many_runs_as_they_process():
    # Canary on a private Dagster function: with monitor_all_code_locations=False a tick reads the FETCH limit.
    from dagster._core.definitions.run_status_sensor_definition import (
        _get_run_status_sensor_fetch_limit,
        _get_run_status_sensor_process_limit,
    )

    assert _get_run_status_sensor_process_limit() == int(os.environ["DAGSTER_RUN_STATUS_SENSOR_PROCESS_LIMIT"])
    assert _get_run_status_sensor_fetch_limit(False) >= _get_run_status_sensor_process_limit() >= 200


def test_the_grpc_info_tag_is_where_dagster_records_the_code_server():
    from dagster._core.storage.tags import GRPC_INFO_TAG

    assert sensors.GRPC_INFO_TAG == GRPC_INFO_TAG


def test_the_production_instance_frees_dead_runs_slots_and_retries_launches(tmp_path):
    text = PRODUCTION_DAGSTER_YAML.read_text()
    home = tmp_path / "home"
    home.mkdir()
    # The production file with its storage replaced: everything else is loaded and validated as deployed.
    (home / "dagster.yaml").write_text(
        f"storage:\n  sqlite:\n    base_dir: {tmp_path}\n" + text[text.index("# Runs wait") :]
    )
    instance = dg.DagsterInstance.from_config(str(home))
    try:
        assert instance.run_monitoring_enabled
        assert instance.run_monitoring_settings["free_slots_after_run_end_seconds"] > 0
        queue = instance.get_concurrency_config().run_queue_config
        assert queue.max_user_code_failure_retries > 0 and queue.user_code_failure_retry_delay > 0
    finally:
        instance.dispose()


# ------------------------------------------------------------------ the sensors on PostgreSQL


class _RecordingBackend:
    """Stands in for the HPC backend: the reconcile code only ever cancels (the real ones are tested elsewhere)."""

    name = "local"

    def __init__(self) -> None:
        self.cancelled: list[str] = []

    def cancel(self, job_id: str) -> None:
        self.cancelled.append(job_id)


def _attempts(ops_db_url: str, owners: dict[str, list[tuple[str, RunStatus, str | None]]]) -> dict[str, int]:
    """Fabricated attempts of the example's calibrate step: {run id: [(sub-group key, status, job id)]}."""
    engine = make_engine(ops_db_url)
    ids = {}
    with Session(engine) as session, session.begin():
        step = session.scalars(
            select(m.ReductionStep)
            .join(m.Pipeline)
            .where(m.Pipeline.name == PIPELINE, m.ReductionStep.name == "calibrate")
        ).one()
        version = session.scalars(select(m.ReductionSoftwareVersion)).first()
        for run_id, rows in owners.items():
            for key, status, job_id in rows:
                attempt = m.ExecutedReductionStep(
                    step=step,
                    sub_group_key=key,
                    status=status,
                    input_fingerprint="f" * 64,
                    software_version=version,
                    config=step.config,
                    dagster_run_id=run_id,
                    hpc_backend="local" if job_id else None,
                    hpc_job_id=job_id,
                )
                session.add(attempt)
                session.flush()
                ids[key] = attempt.id
    engine.dispose()
    return ids


def _statuses(ops_db_url: str) -> dict[str, RunStatus]:
    engine = make_engine(ops_db_url)
    with Session(engine) as session:
        rows = {
            k: s
            for k, s in session.execute(select(m.ExecutedReductionStep.sub_group_key, m.ExecutedReductionStep.status))
        }
    engine.dispose()
    return rows


def _add_run(instance: dg.DagsterInstance, status: dg.DagsterRunStatus, **tags: str) -> dg.DagsterRun:
    run = dg.DagsterRun(job_name="__ASSET_JOB", run_id=str(uuid.uuid4()), status=status, tags=tags)
    return instance.add_run(run)


def _orphan_tick(world, backend, cursor=None):  # type: ignore[no-untyped-def]
    defs = build_definitions(world.settings())
    instance = world.instance()
    sensor = [s for s in sensors.build_reconcile_sensors(settings=world.settings(), backend_factory=lambda: backend)][2]
    context = dg.build_sensor_context(instance=instance, definitions=defs, cursor=cursor)
    return sensor(context), instance


@pytest.mark.postgres
def test_a_failed_runs_jobs_are_left_running_and_adopted_once(demo_world):  # noqa: F811
    backend = _RecordingBackend()
    instance = demo_world.instance()
    failed = _add_run(instance, dg.DagsterRunStatus.FAILURE)
    _attempts(
        demo_world.ops_db_url,
        {
            failed.run_id: [
                ("a", RunStatus.RUNNING, "101"),
                ("b", RunStatus.SUBMITTED, "102"),
                ("c", RunStatus.STAGING_DATA, None),
            ],
            "vanished-run": [("d", RunStatus.COLLECTING_RESULTS, "104")],
        },
    )
    result, _ = _orphan_tick(demo_world, backend)
    assert backend.cancelled == []  # the orchestrator's death never cancels a job
    assert _statuses(demo_world.ops_db_url) == {
        "a": RunStatus.RUNNING,
        "b": RunStatus.SUBMITTED,
        "c": RunStatus.FAILED,  # never submitted: nothing to adopt, planned again
        "d": RunStatus.COLLECTING_RESULTS,
    }
    (request,) = result.run_requests
    key = dg.AssetKey([PIPELINE, "calibrate"])
    assert request.asset_selection == [key]
    assert request.run_config["ops"][key.to_python_identifier()]["config"]["sub_group_keys"] == ["a", "b", "d"]
    assert request.tags["ccat/trigger"] == "sensor" and request.tags[sensors.ADOPTION_TAG] == "1"
    assert set(request.tags[sensors.ADOPTED_FROM_TAG].split(",")) == {failed.run_id, "vanished-run"}
    again, _ = _orphan_tick(demo_world, backend)
    assert [r.run_key for r in again.run_requests] == [request.run_key]  # Dagster launches a run_key once


@pytest.mark.postgres
def test_an_automatic_run_that_failed_before_creating_an_attempt_is_launched_again(demo_world):  # noqa: F811
    instance = demo_world.instance()
    step_tags = {"ccat/trigger": "sensor", "ccat/pipeline": PIPELINE, "ccat/step": "calibrate", "ccat/backend": "local"}
    died = _add_run(instance, dg.DagsterRunStatus.FAILURE, **step_tags, **{"dagster/partition": "scan-1"})
    ranged = _add_run(
        instance,
        dg.DagsterRunStatus.FAILURE,
        **step_tags,
        **{"dagster/asset_partition_range_start": "scan-2", "dagster/asset_partition_range_end": "scan-4"},
    )
    worked = _add_run(instance, dg.DagsterRunStatus.FAILURE, **step_tags, **{"dagster/partition": "scan-5"})
    tired = _add_run(
        instance,
        dg.DagsterRunStatus.FAILURE,
        **step_tags,
        **{"dagster/partition": "scan-6", sensors.RELAUNCH_TAG: str(rec.MAX_RELAUNCHES)},
    )
    by_hand = _add_run(instance, dg.DagsterRunStatus.FAILURE, **{**step_tags, "ccat/trigger": "manual"})
    _attempts(demo_world.ops_db_url, {worked.run_id: [("scan-5", RunStatus.FAILED, None)]})

    result, _ = _orphan_tick(demo_world, _RecordingBackend())
    relaunched = {r.tags[sensors.RELAUNCHED_FROM_TAG]: r for r in result.run_requests}
    # The one with an attempt is retried by the gap sensor; a person's run is the person's; the third death stays.
    assert set(relaunched) == {died.run_id, ranged.run_id}
    assert {worked.run_id, tired.run_id, by_hand.run_id}.isdisjoint(relaunched)
    one, many = relaunched[died.run_id], relaunched[ranged.run_id]
    assert one.run_key == f"relaunch:{died.run_id}" and one.partition_key == "scan-1"
    assert one.asset_selection == [dg.AssetKey([PIPELINE, "calibrate"])]
    assert one.tags[sensors.RELAUNCH_TAG] == "1" and one.tags["ccat/trigger"] == "sensor"
    assert many.partition_key is None
    assert (many.tags["dagster/asset_partition_range_start"], many.tags["dagster/asset_partition_range_end"]) == (
        "scan-2",
        "scan-4",
    )
    # The next tick follows the cursor: the same failures are not looked at again; a lost cursor repeats run keys.
    later, _ = _orphan_tick(demo_world, _RecordingBackend(), cursor=result.cursor)
    assert later.run_requests == []
    again, _ = _orphan_tick(demo_world, _RecordingBackend())
    assert sorted(r.run_key for r in again.run_requests) == sorted(r.run_key for r in result.run_requests)


@pytest.mark.postgres
def test_a_terminated_runs_jobs_are_cancelled(demo_world):  # noqa: F811
    backend = _RecordingBackend()
    instance = demo_world.instance()
    cancelled = _add_run(instance, dg.DagsterRunStatus.CANCELED)
    alive = _add_run(instance, dg.DagsterRunStatus.STARTED)
    _attempts(
        demo_world.ops_db_url,
        {cancelled.run_id: [("a", RunStatus.RUNNING, "201")], alive.run_id: [("b", RunStatus.RUNNING, "202")]},
    )
    result, _ = _orphan_tick(demo_world, backend)
    assert backend.cancelled == ["201"]
    assert _statuses(demo_world.ops_db_url) == {"a": RunStatus.CANCELLED, "b": RunStatus.RUNNING}
    assert result.run_requests == []


@pytest.mark.postgres
def test_a_started_run_whose_worker_is_gone_is_failed_and_its_jobs_adopted(demo_world, monkeypatch):  # noqa: F811
    from dagster._core.events import EngineEventData

    monkeypatch.setattr(sensors, "WORKER_CHECK_GRACE_SECONDS", 0)
    backend = _RecordingBackend()
    instance = demo_world.instance()
    grpc = {sensors.GRPC_INFO_TAG: json.dumps({"host": "localhost", "port": 4266})}
    dead_worker = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_worker.wait()
    runs = {}
    for name, pid, tags in [
        ("dead", dead_worker.pid, grpc),
        ("alive", os.getpid(), grpc),
        ("elsewhere", dead_worker.pid, {sensors.GRPC_INFO_TAG: json.dumps({"host": "node-17", "port": 4266})}),
    ]:
        runs[name] = _add_run(instance, dg.DagsterRunStatus.STARTED, **tags)
        instance.report_engine_event(
            f"Started process for run (pid: {pid}).",
            runs[name],
            EngineEventData(metadata={"pid": dg.MetadataValue.text(str(pid))}),
        )
    _attempts(
        demo_world.ops_db_url,
        {runs[name].run_id: [(name, RunStatus.RUNNING, f"job-{name}")] for name in runs},
    )
    result, _ = _orphan_tick(demo_world, backend)
    assert instance.get_run_by_id(runs["dead"].run_id).status == dg.DagsterRunStatus.FAILURE
    assert instance.get_run_by_id(runs["alive"].run_id).status == dg.DagsterRunStatus.STARTED
    # A worker on another host cannot be judged from here: left to Dagster's run monitoring.
    assert instance.get_run_by_id(runs["elsewhere"].run_id).status == dg.DagsterRunStatus.STARTED
    (request,) = result.run_requests
    assert request.tags[sensors.ADOPTED_FROM_TAG] == runs["dead"].run_id
    assert backend.cancelled == []
