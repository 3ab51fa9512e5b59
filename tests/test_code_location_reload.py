"""The code location's ``defs``: Dagster calls it more than once per load, so it reuses what it built while ops-db
is unchanged (to keep load time down), and a reload after a pipeline change still builds afresh."""

from __future__ import annotations

from sqlalchemy.orm import Session

from ccat_dagster import definitions
from ccat_dagster.opsdb.engine import make_engine
from ccat_dagster.pipelines.apply import set_pipeline_enabled
from ccat_dagster.sensors.gaps import sensor_name

from .dagster_fixtures import PIPELINE, demo_world  # noqa: F401


def _sensor_names(defs) -> set[str]:  # type: ignore[no-untyped-def]
    return {s.name for s in defs.sensors or []}


def test_defs_is_built_once_per_ops_db_state(demo_world):
    first = definitions.defs()
    assert definitions.defs() is first, "an unchanged ops-db must not rebuild the definitions"
    assert sensor_name(PIPELINE) in _sensor_names(first)

    engine = make_engine(demo_world.ops_db_url)
    with Session(engine) as session, session.begin():
        assert set_pipeline_enabled(session, PIPELINE, enabled=False)
    engine.dispose()
    reloaded = definitions.defs()
    assert reloaded is not first
    assert sensor_name(PIPELINE) not in _sensor_names(reloaded)
