"""Many sub-groups per Dagster run, partial failures, retries, sensor / backfill chunking, limits.

Real Dagster on a PostgreSQL instance, real ops-db on PostgreSQL, the local backend running a trivial payload
in bubblewrap (tests/scale_fixtures.py).
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.definitions.automation_tick_evaluation_context import build_run_requests_with_backfill_policies
from dagster._core.definitions.events import AssetKeyPartitionKey
from dagster._core.definitions.partitions.context import partition_loading_context
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
    PARENT_RUN_ID_TAG,
    ROOT_RUN_ID_TAG,
)
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ccat_dagster.assets.factory import step_asset_key
from ccat_dagster.definitions import build_definitions
from ccat_dagster.execution.hpc.local_wrapper import read_json
from ccat_dagster.opsdb import models as m
from ccat_dagster.opsdb.engine import make_engine
from ccat_dagster.opsdb.enums import RunStatus
from ccat_dagster.opsdb.migrate import upgrade
from ccat_dagster.sensors.gaps import sensor_name
from ccat_dagster.settings import Settings

from .conftest import create_pg_database, drop_pg_database
from .scale_fixtures import PARTITIONS, PIPELINE, STEP, dagster_yaml, scale_environment, seed_scale_world

ASSET = step_asset_key(PIPELINE, STEP)


@dataclass
class Scale:
    data_dir: Path
    ops_url: str
    env: dict[str, str]
    keys: list[str]
    instance: dg.DagsterInstance

    def settings(self) -> Settings:
        return Settings.from_env(self.env)

    def attempts(self) -> list[m.ExecutedReductionStep]:
        engine = make_engine(self.ops_url)
        with Session(engine) as session:
            rows = list(session.scalars(select(m.ExecutedReductionStep).order_by(m.ExecutedReductionStep.id)))
            for row in rows:
                _ = row.transitions, row.products, row.input_packages
        engine.dispose()
        return rows


@pytest.fixture
def make_scale(tmp_path, monkeypatch):
    if shutil.which("bwrap") is None:
        pytest.skip("needs bubblewrap: run scripts/setup.sh")
    urls: list[str] = []

    def make(
        scans: int, *, fail: tuple[int, ...] = (), sleep_seconds: float = 0.0, add_partitions: bool = True, **extra: str
    ) -> Scale:
        ops_url, dagster_url = create_pg_database("ccat_test_scale_ops"), create_pg_database("ccat_test_scale_dg")
        urls.extend([ops_url, dagster_url])
        upgrade(ops_url)
        engine = make_engine(ops_url)
        with Session(engine) as session, session.begin():
            world = seed_scale_world(
                session, data_dir=tmp_path / "data", scans=scans, fail=fail, sleep_seconds=sleep_seconds
            )
        engine.dispose()
        home = tmp_path / "dagster-home"
        home.mkdir()
        (home / "dagster.yaml").write_text(dagster_yaml(dagster_url))
        env = scale_environment(data_dir=tmp_path / "data", ops_db_url=ops_url, dagster_home=home)
        env.update({f"CCAT_WORKFLOW_MANAGER_{name.upper()}": value for name, value in extra.items()})
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        instance = dg.DagsterInstance.from_config(str(home))
        if add_partitions:
            instance.add_dynamic_partitions(PARTITIONS, world.keys)
        return Scale(world.data_dir, ops_url, env, world.keys, instance)

    yield make
    for url in urls:
        drop_pg_database(url)


def _run_range(scale: Scale, keys: list[str], **tags: str) -> dg.ExecuteInProcessResult:
    job = build_definitions(scale.settings()).resolve_implicit_global_asset_job_def()
    range_tags = {ASSET_PARTITION_RANGE_START_TAG: keys[0], ASSET_PARTITION_RANGE_END_TAG: keys[-1]}
    return job.execute_in_process(
        instance=scale.instance,
        asset_selection=[step_asset_key(PIPELINE, STEP)],
        tags={**range_tags, **tags},
        raise_on_error=False,
    )


def _failure_message(scale: Scale, run_id: str) -> str:
    failures = scale.instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_FAILURE)
    assert len(failures) == 1
    return failures[0].dagster_event.step_failure_data.error.message


def test_one_batched_run_fails_only_the_failing_sub_groups_and_a_retry_reruns_only_them(make_scale):
    failing = (3, 14, 25)
    scale = make_scale(30, fail=failing)
    bad = {scale.keys[i] for i in failing}
    good = set(scale.keys) - bad

    first = _run_range(scale, scale.keys)
    assert not first.success
    message = _failure_message(scale, first.run_id)
    assert "3 of 30 sub-group(s)" in message
    assert {k for k in scale.keys if k in message} == bad

    # Each completed sub-group is its own materialization, on its own partition, tagged with its data version.
    assert scale.instance.get_materialized_partitions(ASSET) == good
    records = scale.instance.fetch_materializations(ASSET, limit=100).records
    assert len(records) == 27
    assert all(r.asset_materialization.metadata["product_count"].value == 1 for r in records)

    attempts = scale.attempts()
    assert len(attempts) == 30  # one attempt row per sub-group
    by_key = {a.sub_group_key: a for a in attempts}
    for key in good:
        attempt = by_key[key]
        assert attempt.status is RunStatus.COMPLETED and attempt.dagster_run_id == first.run_id
        assert [t.to_status for t in attempt.transitions][-1] is RunStatus.COMPLETED
        assert len(attempt.transitions) >= 4  # staging_data, submitted, (running,) collecting_results, completed
        assert [p.relative_path for p in attempt.products] == ["statistics/touch.txt"]
        assert len(attempt.input_packages) == 1
    for key in bad:
        attempt = by_key[key]
        assert attempt.status is RunStatus.FAILED and "exit code 3" in attempt.error
        assert attempt.products == []

    # The input is repaired; a re-execution of the failed run (same partition range, parent run tag, as the UI's
    # "re-execute" and Dagster's run retries create it) runs the three failed sub-groups and nothing else.
    for index in failing:
        (scale.data_dir / "processing" / "raw" / f"scale-{index:06d}" / "FAIL").unlink()
    retry = _run_range(scale, scale.keys, **{PARENT_RUN_ID_TAG: first.run_id, ROOT_RUN_ID_TAG: first.run_id})
    assert retry.success
    attempts = scale.attempts()
    new = [a for a in attempts if a.dagster_run_id == retry.run_id]
    assert {a.sub_group_key for a in new} == bad
    assert all(a.status is RunStatus.COMPLETED and a.attempt == 2 for a in new)
    assert len(attempts) == 33  # no new attempt for the 27 that were done
    assert scale.instance.get_materialized_partitions(ASSET) == set(scale.keys)

    # A sensor-style run over the same range finds nothing to do.
    again = _run_range(scale, scale.keys, **{"ccat/trigger": "sensor"})
    assert again.success
    assert len(scale.attempts()) == 33


def test_jobs_in_flight_and_local_jobs_running_stay_within_their_limits(make_scale):
    scale = make_scale(12, sleep_seconds=0.3, max_concurrent_jobs="5", local_max_running="2")
    result = _run_range(scale, scale.keys)
    assert result.success
    records = [
        read_json(path)
        for path in (scale.data_dir / "pipelines" / ".local-jobs").glob("*.json")
        if path.name.count(".") == 1
    ]
    assert len(records) == 12
    intervals = [(r["started_at"], r["finished_at"]) for r in records]
    assert _max_overlap(intervals) == 2  # LOCAL_MAX_RUNNING: running at once
    # MAX_CONCURRENT_JOBS: ops-db never had more than 5 attempts between SUBMITTED and their end.
    in_flight = []
    for attempt in scale.attempts():
        submitted = next(t.at for t in attempt.transitions if t.to_status is RunStatus.SUBMITTED)
        in_flight.append((submitted.timestamp(), attempt.finished_at.timestamp()))
    assert 2 < _max_overlap(in_flight) <= 5


def _max_overlap(intervals: list[tuple[float, float]]) -> int:
    points = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    current = peak = 0
    for _, change in points:
        current += change
        peak = max(peak, current)
    return peak


def test_a_sensor_tick_with_500_gaps_requests_a_handful_of_runs(make_scale):
    scale = make_scale(500, add_partitions=False)
    settings = scale.settings()
    defs = build_definitions(settings)
    context = dg.build_sensor_context(instance=scale.instance, definitions=defs)
    result = defs.get_sensor_def(sensor_name(PIPELINE))(context)
    for request in result.dynamic_partitions_requests or []:
        scale.instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    requests = result.run_requests
    assert 1 <= len(requests) <= math.ceil(500 / settings.max_partitions_per_run)
    partitions = scale.instance.get_dynamic_partitions(PARTITIONS)
    covered: list[str] = []
    for request in requests:
        start = partitions.index(request.tags[ASSET_PARTITION_RANGE_START_TAG])
        end = partitions.index(request.tags[ASSET_PARTITION_RANGE_END_TAG])
        assert end - start + 1 <= settings.max_partitions_per_run
        covered += partitions[start : end + 1]
    assert sorted(covered) == sorted(scale.keys)


def test_a_backfill_of_10000_partitions_is_cut_into_runs_of_the_configured_size(make_scale):
    scale = make_scale(1, add_partitions=False, max_partitions_per_run="250")
    keys = [f"executed_obs_unit=00000000-0000-0000-0000-{i:012d}" for i in range(10_000)]
    scale.instance.add_dynamic_partitions(PARTITIONS, keys)
    graph = build_definitions(scale.settings()).resolve_asset_graph()
    assert graph.get(ASSET).backfill_policy == dg.BackfillPolicy.multi_run(max_partitions_per_run=250)
    # The function Dagster's asset backfills and automation use to turn partitions into runs.
    with partition_loading_context(dynamic_partitions_store=scale.instance):
        requests = build_run_requests_with_backfill_policies(
            asset_partitions=[AssetKeyPartitionKey(ASSET, key) for key in keys],
            asset_graph=graph,
            dynamic_partitions_store=scale.instance,
        )
    assert len(requests) == 40
    sizes = [
        keys.index(r.tags[ASSET_PARTITION_RANGE_END_TAG]) - keys.index(r.tags[ASSET_PARTITION_RANGE_START_TAG]) + 1
        for r in requests
    ]
    assert sizes == [250] * 40


def test_attempt_numbers_stay_per_sub_group_with_one_transaction_per_round(make_scale):
    """The batched attempt creation keeps attempt numbers per sub-group (a second run numbers them 2)."""
    scale = make_scale(8)
    assert _run_range(scale, scale.keys).success
    assert _run_range(scale, scale.keys).success  # a manual run redoes up-to-date sub-groups
    engine = make_engine(scale.ops_url)
    with Session(engine) as session:
        numbers = session.execute(
            select(m.ExecutedReductionStep.sub_group_key, func.array_agg(m.ExecutedReductionStep.attempt)).group_by(
                m.ExecutedReductionStep.sub_group_key
            )
        ).all()
    engine.dispose()
    assert len(numbers) == 8 and all(sorted(attempts) == [1, 2] for _key, attempts in numbers)
