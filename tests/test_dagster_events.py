"""Each attempt's RunStatus transitions are structured Dagster events of the run, on the partition."""

from __future__ import annotations

import dagster as dg
from sqlalchemy import select
from sqlalchemy.orm import Session

from ccat_dagster.assets.factory import TRANSITION_TAG, step_asset_key
from ccat_dagster.definitions import build_definitions
from ccat_dagster.opsdb import models as m
from ccat_dagster.opsdb.engine import make_engine

from .dagster_fixtures import PIPELINE, demo_world, require_bwrap_and_numpy  # noqa: F401
from .test_dagster_pipeline import PER_SCAN, _tick


def test_transitions_are_asset_observations_in_the_run_event_log(demo_world):
    require_bwrap_and_numpy()
    defs = build_definitions(demo_world.settings())
    instance = demo_world.instance()
    _tick(defs, instance)
    key = sorted(instance.get_dynamic_partitions(PER_SCAN))[0]
    job = defs.resolve_implicit_global_asset_job_def()
    result = job.execute_in_process(
        instance=instance, asset_selection=[step_asset_key(PIPELINE, "calibrate")], partition_key=key
    )
    assert result.success

    asset_key = step_asset_key(PIPELINE, "calibrate")
    records = instance.all_logs(result.run_id, of_type=dg.DagsterEventType.ASSET_OBSERVATION)
    observations = [r.dagster_event.asset_observation_data.asset_observation for r in records]
    assert observations and all(o.asset_key == asset_key and o.partition == key for o in observations)
    steps = [(o.metadata["status_from"].value, o.metadata["status_to"].value) for o in observations]
    assert [to for _from, to in steps if to != "running"] == [
        "staging_data",
        "submitted",
        "collecting_results",
        "completed",
    ]
    assert all(later[0] == earlier[1] for earlier, later in zip(steps, steps[1:], strict=False))
    assert [o.tags[TRANSITION_TAG] for o in observations] == [to for _from, to in steps]

    engine = make_engine(demo_world.ops_db_url)
    with Session(engine) as session:
        attempt = session.scalars(
            select(m.ExecutedReductionStep).where(m.ExecutedReductionStep.sub_group_key == key)
        ).one()
        audit = [(t.from_status.value, t.to_status.value) for t in attempt.transitions]
    engine.dispose()
    assert steps == audit
    assert {o.metadata["attempt_id"].value for o in observations} == {attempt.id}
    submitted = next(o for o in observations if o.metadata["status_to"].value == "submitted")
    assert submitted.metadata["hpc_job_id"].value == attempt.hpc_job_id
    assert attempt.hpc_job_id in submitted.metadata["message"].value

    # Visible per partition, as the UI's asset page reads them.
    stored = instance.fetch_observations(
        dg.AssetRecordsFilter(asset_key=asset_key, asset_partitions=[key]), limit=50
    ).records
    assert len(stored) == len(observations)

    messages = [r.user_message for r in instance.all_logs(result.run_id) if r.user_message]
    assert any(line.startswith("waiting for 1 local job(s): 1 ") for line in messages), messages
    assert any(line.startswith("1 of 1 sub-groups done") for line in messages)
    assert any(line.startswith("staging ") for line in messages), messages  # what the first wait was for
