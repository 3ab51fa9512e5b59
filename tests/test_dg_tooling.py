"""Dagster's project tooling from the repository root, and a code location that loads quietly and on an empty ops-db.

``dg check defs`` and ``dg launch --assets … --partition …`` run as subprocesses from the repository root (the
``[tool.dg]`` section of pyproject.toml), against one module-scoped demo world on SQLite (ops-db and Dagster
instance) so the test pays the seeding once.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import dagster as dg
import pytest
from sqlalchemy import select

from ccat_dagster.assets.partitions import sync_partitions
from ccat_dagster.definitions import defs, setup_hint_definitions
from ccat_dagster.demo.seed import seed_demo
from ccat_dagster.opsdb import models as m
from ccat_dagster.opsdb.engine import make_engine, session_scope
from ccat_dagster.opsdb.enums import RunStatus
from ccat_dagster.opsdb.migrate import upgrade
from ccat_dagster.pipelines.apply import apply_pipeline_spec
from ccat_dagster.pipelines.spec import load_pipeline_spec
from ccat_dagster.settings import default_container_runtime

from .dagster_fixtures import EXAMPLE, PER_SCAN, PIPELINE, REPO, require_bwrap_and_numpy

VENV_BIN = Path(sys.executable).parent


def _environment(data_dir: Path, home: Path, ops_db_url: str) -> dict[str, str]:
    return {
        "CCAT_DAGSTER_DATA_DIR": str(data_dir),
        "CCAT_OPS_DB_URL": ops_db_url,
        "DAGSTER_HOME": str(home),
        "CCAT_WORKFLOW_MANAGER_POLL_INTERVAL_SECONDS": "1",
    }


def _dagster_home(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A seeded ops-db with the CHAI example applied and its partitions in a SQLite Dagster instance."""
    tmp = tmp_path_factory.mktemp("dg")
    url = f"sqlite:///{tmp / 'opsdb.sqlite'}"
    upgrade(url)
    home = _dagster_home(tmp / "dagster-home")
    engine = make_engine(url)
    with session_scope(engine) as session:
        seed_demo(session, data_dir=tmp / "data", scans=8)
        apply_pipeline_spec(session, load_pipeline_spec(EXAMPLE), source_path=EXAMPLE)
    instance = dg.DagsterInstance.from_config(str(home))
    with session_scope(engine) as session:
        sync_partitions(instance, session, PIPELINE)
    key = sorted(instance.get_dynamic_partitions(PER_SCAN))[0]
    instance.dispose()
    engine.dispose()
    return {"env": _environment(tmp / "data", home, url), "partition": key, "url": url}


def _use(monkeypatch, env: dict[str, str]) -> None:
    for name in [n for n in os.environ if n.startswith(("CCAT_", "DAGSTER_HOME"))]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def test_the_code_location_loads_without_a_warning(world, monkeypatch):
    _use(monkeypatch, world["env"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # BetaWarning, SupersessionWarning, UserWarning, ... all fail the test
        repository = defs().get_repository_def()
        repository.load_all_definitions()
    keys = {key.to_user_string() for key in repository.asset_graph.get_all_asset_keys()}
    assert {f"{PIPELINE}/calibrate", f"{PIPELINE}/baseline", f"{PIPELINE}/grid_map"} <= keys


@pytest.mark.parametrize("schema", [False, True], ids=["no-schema", "no-processing-location"])
def test_an_empty_ops_db_loads_with_one_hint_asset(schema, tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'opsdb.sqlite'}"
    if schema:
        upgrade(url)
    _use(monkeypatch, _environment(tmp_path / "data", _dagster_home(tmp_path / "home"), url))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        repository = defs().get_repository_def()
    specs = list(repository.assets_defs_by_key.values())
    assert [key.to_user_string() for key in repository.asset_graph.get_all_asset_keys()] == [
        "ccat_setup/getting_started"
    ]
    description = specs[0].specs_by_key[dg.AssetKey(["ccat_setup", "getting_started"])].description
    expected = "ccat-dagster db upgrade" if not schema else "ccat-dagster demo seed"
    assert expected in description and "reload this code location" in description


def test_the_hint_names_the_problem():
    from ccat_dagster.definitions import OpsDbNotReady

    hint = setup_hint_definitions(OpsDbNotReady("ops-db has no processing location yet: run X"))
    (asset,) = hint.assets or []
    assert asset.description == "ccat-dagster has nothing to run yet. ops-db has no processing location yet: run X"


def test_default_container_runtime_prefers_apptainer():
    installed = {"apptainer": "/usr/bin/apptainer", "bwrap": "/usr/bin/bwrap"}
    assert default_container_runtime(installed.get) == "apptainer"
    assert default_container_runtime({"bwrap": "/usr/bin/bwrap"}.get) == "bubblewrap"
    assert default_container_runtime({}.get) == "apptainer"  # and the runtime's own error says what is missing


@pytest.mark.slow
def test_dg_check_defs_and_dg_launch_from_the_repository_root(world):
    """The commands the README gives, as an operator types them (the project's venv active, no extra variables)."""
    require_bwrap_and_numpy()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CCAT_", "DAGSTER_"))}
    env.update(world["env"], VIRTUAL_ENV=str(VENV_BIN.parent), PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}")
    check = subprocess.run(
        [str(VENV_BIN / "dg"), "check", "defs"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "All definitions loaded successfully" in check.stdout + check.stderr
    assert "Warning" not in check.stdout + check.stderr and "WARNING" not in check.stdout + check.stderr

    launch = subprocess.run(
        [str(VENV_BIN / "dg"), "launch", "--assets", f"{PIPELINE}/calibrate", "--partition", world["partition"]],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = launch.stdout + launch.stderr
    assert launch.returncode == 0, output
    assert "RUN_SUCCESS" in output and "Warning" not in output
    engine = make_engine(world["url"])
    with session_scope(engine) as session:
        statuses = session.scalars(
            select(m.ExecutedReductionStep.status).where(m.ExecutedReductionStep.sub_group_key == world["partition"])
        ).all()
    engine.dispose()
    assert statuses == [RunStatus.COMPLETED]
