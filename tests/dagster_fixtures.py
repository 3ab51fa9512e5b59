"""A demo world for the Dagster layer: seeded ops-db + applied CHAI pipeline + a Dagster instance, all PostgreSQL."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from ccat_dagster.demo.run import execute_run_request as execute_request  # noqa: F401 - for the tests
from ccat_dagster.demo.seed import seed_demo
from ccat_dagster.grouping.engine import scan_label
from ccat_dagster.grouping.keys import encode_sub_group_key
from ccat_dagster.opsdb import models as m
from ccat_dagster.opsdb.engine import make_engine
from ccat_dagster.opsdb.enums import PackageState
from ccat_dagster.opsdb.migrate import upgrade
from ccat_dagster.pipelines.apply import apply_pipeline_spec
from ccat_dagster.pipelines.spec import load_pipeline_spec
from ccat_dagster.settings import Settings

from .conftest import create_pg_database, drop_pg_database

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "pipelines" / "chai_ngc253_co43.yaml"
PIPELINE = "chai_ngc253_co43"
# The partitions definition of the example pipeline's per-scan steps (calibrate, baseline).
PER_SCAN = f"{PIPELINE}__scan"


def require_bwrap_and_numpy() -> None:
    missing = [tool for tool in ("bwrap",) if shutil.which(tool) is None]
    if not Path("/usr/lib/python3/dist-packages/numpy").exists():
        missing.append("python3-numpy (Debian)")
    if missing:
        message = f"needs {', '.join(missing)}: run scripts/setup.sh"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def archived_example_scan_ids(session: Session) -> list:
    """ExecutedObsUnit ids with archived packages in the example pipeline's grouping (NGC253 CO(4-3), LFA)."""
    return list(
        session.scalars(
            select(m.ExecutedObsUnit.id)
            .join(m.RawDataPackage, m.RawDataPackage.executed_obs_unit_id == m.ExecutedObsUnit.id)
            .join(m.ObsUnit, m.ObsUnit.id == m.ExecutedObsUnit.obs_unit_id)
            .join(m.InstrumentModule, m.InstrumentModule.id == m.RawDataPackage.instrument_module_id)
            .where(m.ObsUnit.name == "ngc253-co43", m.InstrumentModule.name == "LFA")
            .where(m.RawDataPackage.state == PackageState.ARCHIVED)
        ).unique()
    )


def archived_example_scan_keys(session: Session) -> set[str]:
    """The sub_group_keys of the example pipeline's per-scan steps (group_by [scan]) for its archived scans."""
    rows = session.execute(
        select(m.ExecutedObsUnit.start_time, m.ExecutedObsUnit.id).where(
            m.ExecutedObsUnit.id.in_(archived_example_scan_ids(session))
        )
    ).all()
    return {encode_sub_group_key([("scan", scan_label(start, eou))]) for start, eou in rows}


@dataclass
class DemoWorld:
    data_dir: Path
    ops_db_url: str
    dagster_home: Path
    env: dict[str, str]

    def settings(self) -> Settings:
        return Settings.from_env(self.env)

    def instance(self) -> dg.DagsterInstance:
        return dg.DagsterInstance.from_config(str(self.dagster_home))


def make_world(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, scans: int = 12, instance_config: str = ""
) -> tuple[DemoWorld, list[str]]:
    """Seeded ops-db with the example pipeline applied, a Dagster home on PostgreSQL; ``instance_config`` is
    appended to its dagster.yaml."""
    ops_url = create_pg_database("ccat_test_ops")
    dagster_url = create_pg_database("ccat_test_dagster")
    upgrade(ops_url)
    data_dir = tmp_path / "data"
    engine = make_engine(ops_url)
    with Session(engine) as session, session.begin():
        seed_demo(session, data_dir=data_dir, scans=scans)
        apply_pipeline_spec(session, load_pipeline_spec(EXAMPLE), source_path=EXAMPLE)
    engine.dispose()
    home = tmp_path / "dagster-home"
    home.mkdir()
    (home / "dagster.yaml").write_text(
        f"storage:\n  postgres:\n    postgres_url: {dagster_url.replace('+psycopg2', '')}\n"
        "telemetry:\n  enabled: false\n" + instance_config
    )
    env = {
        "CCAT_DAGSTER_DATA_DIR": str(data_dir),
        "CCAT_OPS_DB_URL": ops_url,
        "CCAT_WORKFLOW_MANAGER_CONTAINER_RUNTIME": "bubblewrap",
        "CCAT_WORKFLOW_MANAGER_POLL_INTERVAL_SECONDS": "1",
        "DAGSTER_HOME": str(home),
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return DemoWorld(data_dir, ops_url, home, env), [ops_url, dagster_url]


@pytest.fixture
def demo_world(tmp_path, monkeypatch):
    world, urls = make_world(tmp_path, monkeypatch)
    yield world
    for url in urls:
        drop_pg_database(url)


def request_step(request: dg.RunRequest) -> str:
    """The step a sensor's run request targets (its one selected asset is ``[pipeline, step]``)."""
    (key,) = request.asset_selection
    return key.path[-1]
