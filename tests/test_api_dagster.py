"""Trigger, cancel and retry end to end: a real ``dagster-webserver`` over PostgreSQL Dagster storage and ops-db,
the API's GraphQL launcher, real runs of real software under bubblewrap, and ``ccat-dagster pipelines run``.

- ``pipelines run --step calibrate --sub-group K`` launches the sensor's run through the webserver, waits with
  progress and ends with the attempt COMPLETED, the run a SUCCESS in the instance, tagged ``ccat/trigger=manual``.
- ``POST /pipelines/{id}/trigger`` starts a run of a step whose software sleeps; ``POST /pipelines/runs/{id}/cancel``
  terminates that Dagster run, which cancels the local job and leaves the attempt CANCELLED.
- ``POST /pipelines/runs/{id}/retry`` launches a new run of the cancelled sub-group.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import httpx
import pytest
import yaml
from sqlalchemy import select
from sqlalchemy.orm import Session

from ccat_dagster.api.app import create_app
from ccat_dagster.api.auth import create_token
from ccat_dagster.grouping.engine import resolve
from ccat_dagster.launch import GraphQLRunLauncher
from ccat_dagster.opsdb import models as m
from ccat_dagster.opsdb.engine import make_engine, session_scope
from ccat_dagster.opsdb.enums import RunStatus
from ccat_dagster.pipelines.apply import apply_pipeline_spec
from ccat_dagster.pipelines.spec import load_pipeline_spec

from .api_fixtures import ServerThread, free_port
from .conftest import drop_pg_database
from .dagster_fixtures import EXAMPLE, PIPELINE, REPO, make_world, require_bwrap_and_numpy

pytestmark = [pytest.mark.postgres, pytest.mark.bwrap]
SLEEPER = "api_sleeper"
TIMEOUT = 240


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def _sleeper_pipeline(tmp_path: Path) -> Path:
    """A MANUAL one-step pipeline over the same scans whose software sleeps: a run to cancel."""
    document = yaml.safe_load(EXAMPLE.read_text())
    step = document["steps"][0]
    step["software"] = {
        "name": "sleeper",
        "version": "1.0.0",
        "image_ref": str((EXAMPLE.parent / "../software/chai").resolve()),
        "entrypoint": ["/usr/bin/sleep", "300"],
    }
    step["max_retries"] = 0
    document.update(pipeline=SLEEPER, trigger={"type": "manual"}, steps=[step])
    document["grouping"]["name"] = "api-sleeper-scans"
    path = tmp_path / "sleeper.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def _wait(predicate, what: str, log: Path, timeout: float = TIMEOUT):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}\n{log.read_text()[-4000:]}")


def _attempt(url: str, run_id: str) -> m.ExecutedReductionStep | None:
    engine = make_engine(url)
    with Session(engine) as session:
        row = session.scalars(
            select(m.ExecutedReductionStep).where(m.ExecutedReductionStep.dagster_run_id == run_id)
        ).first()
    engine.dispose()
    return row


def test_trigger_cancel_and_retry_through_a_real_dagster_webserver(tmp_path, monkeypatch):
    require_bwrap_and_numpy()
    world, urls = make_world(tmp_path, monkeypatch, scans=3)
    engine = make_engine(world.ops_db_url)
    with session_scope(engine) as session:
        apply_pipeline_spec(session, load_pipeline_spec(_sleeper_pipeline(tmp_path)))
        pipeline = session.scalars(select(m.Pipeline).where(m.Pipeline.name == PIPELINE)).one()
        keys = [
            g.key
            for g in resolve(
                session,
                filter_rules=pipeline.data_grouping.filter_rules,
                group_by=next(step.group_by for step in pipeline.steps if step.name == "calibrate"),
                instrument_module_id=pipeline.data_grouping.instrument_module_id,
            )
        ]
        sleeper_id = session.scalars(select(m.Pipeline.id).where(m.Pipeline.name == SLEEPER)).one()
        _info, token = create_token(session, name="e2e", scope="write")
    workspace = tmp_path / "workspace.yaml"
    workspace.write_text(
        "load_from:\n  - python_module:\n      module_name: ccat_dagster.definitions\n      attribute: defs\n"
        f"      location_name: ccat_dagster\n      working_directory: {REPO}\n"
    )
    port = free_port()
    webserver_url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        **world.env,
        "PYTHONPATH": str(REPO),
        "CCAT_WORKFLOW_MANAGER_DAGSTER_WEBSERVER_URL": webserver_url,
    }
    monkeypatch.setenv("CCAT_WORKFLOW_MANAGER_DAGSTER_WEBSERVER_URL", webserver_url)
    log = tmp_path / "dagster.log"
    # The instance queues launched runs (Dagster's default run coordinator); the daemon dequeues and launches
    # them, as in production.
    with log.open("w") as out:
        processes = [
            subprocess.Popen(
                [_bin("dagster-webserver"), "-h", "127.0.0.1", "-p", str(port), "-w", str(workspace)],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            ),
            subprocess.Popen(
                [_bin("dagster-daemon"), "run", "-w", str(workspace)],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            ),
        ]
    instance = world.instance()
    try:
        launcher = GraphQLRunLauncher(webserver_url)

        def loaded() -> bool:
            assert all(p.poll() is None for p in processes), log.read_text()[-4000:]
            try:
                response = httpx.post(
                    f"{webserver_url}/graphql",
                    json={
                        "query": "query($k: AssetKeyInput!) { assetNodeOrError(assetKey: $k) { __typename } }",
                        "variables": {"k": {"path": [SLEEPER, "calibrate"]}},
                    },
                    timeout=5,
                )
            except httpx.HTTPError:
                return False
            return (
                response.status_code == 200 and response.json()["data"]["assetNodeOrError"]["__typename"] == "AssetNode"
            )

        _wait(loaded, "the webserver and its code location", log)

        # 1. The CLI: the sensor's run, launched by hand, waited for with progress.
        ran = subprocess.run(
            [_bin("ccat-dagster"), "pipelines", "run", PIPELINE, "--step", "calibrate", "--sub-group", keys[0]],
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
        assert ran.returncode == 0, ran.stdout + ran.stderr + log.read_text()[-3000:]
        assert "launched 1 run(s) for 1 sub-group(s)" in ran.stdout and "attempts" in ran.stdout
        (manual,) = instance.get_runs(filters=dg.RunsFilter(tags={"ccat/trigger": "manual"}))
        assert manual.status == dg.DagsterRunStatus.SUCCESS and manual.job_name == "__ASSET_JOB"
        assert manual.tags["ccat/pipeline"] == PIPELINE and manual.tags["ccat/step"] == "calibrate"
        assert manual.tags["dagster/partition"] == keys[0] and manual.tags["dagster/priority"] == "10"
        assert _attempt(world.ops_db_url, manual.run_id).status == RunStatus.COMPLETED

        # 2. The API: trigger a run that sleeps, cancel it once its job runs.
        app = create_app(world.settings(), launcher=launcher, dagster_instance=instance)
        with (
            ServerThread(app, api_port := free_port()),
            httpx.Client(
                base_url=f"http://127.0.0.1:{api_port}", headers={"Authorization": f"Bearer {token}"}, timeout=60
            ) as api,
        ):
            triggered = api.post(
                f"/pipelines/{sleeper_id}/trigger", json={"step": "calibrate", "sub_groups": [keys[1]]}
            )
            assert triggered.status_code == 202, triggered.text
            run_id = triggered.json()["runs"][0]["dagster_run_id"]
            run = instance.get_run_by_id(run_id)
            assert run is not None and run.tags["ccat/trigger"] == "api" and run.tags["ccat/pipeline"] == SLEEPER

            running = _wait(
                lambda: (a := _attempt(world.ops_db_url, run_id)) is not None and a.status == RunStatus.RUNNING and a,
                "the sleeping attempt to run",
                log,
            )
            cancelled = api.post(f"/pipelines/runs/{running.id}/cancel")
            assert cancelled.status_code == 202, cancelled.text
            _wait(lambda: instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.CANCELED, "run CANCELED", log)
            attempt = _wait(
                lambda: (a := _attempt(world.ops_db_url, run_id)) is not None and a.status.is_terminal and a,
                "the attempt to end",
                log,
            )
            assert attempt.status == RunStatus.CANCELLED, attempt.error

            # 3. Retry: a new run of the same sub-group, launched and visible in the instance.
            retried = api.post(f"/pipelines/runs/{attempt.id}/retry")
            assert retried.status_code == 202, retried.text
            retry_run = instance.get_run_by_id(retried.json()["dagster_run_id"])
            assert retry_run is not None and retry_run.tags["dagster/partition"] == keys[1]
            launcher.terminate(retry_run.run_id)
            _wait(lambda: instance.get_run_by_id(retry_run.run_id).is_finished, "the retry run to stop", log)
    finally:
        instance.dispose()
        engine.dispose()
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        for url in urls:
            drop_pg_database(url)
