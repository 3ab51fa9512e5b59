"""``ccat-dagster attempts``: what an operator reads about failed attempts, failure kind first."""

from __future__ import annotations

import json

from sqlalchemy.orm import Session

from ccat_dagster.cli import main
from ccat_dagster.opsdb.engine import make_engine
from ccat_dagster.opsdb.enums import FailureKind, RunStatus

from .opsdb_factories import make_attempt, make_world


def test_attempts_lists_status_failure_kind_job_and_error(db_url, monkeypatch, capsys, tmp_path):
    engine = make_engine(db_url)
    with Session(engine) as session, session.begin():
        world = make_world(session)
        failed = make_attempt(session, world, key="scan=1", status=RunStatus.FAILED)
        failed.failure_kind = FailureKind.OOM
        failed.error = "job killed (exit code 137): out of memory\n--- last log lines ---\nallocating"
        failed.hpc_backend, failed.hpc_job_id, failed.exit_code = "slurm", "4711", 137
        make_attempt(session, world, key="scan=2", status=RunStatus.COMPLETED)
        pipeline = world.pipeline.name
    engine.dispose()
    monkeypatch.setenv("CCAT_OPS_DB_URL", db_url)
    monkeypatch.setenv("CCAT_DAGSTER_DATA_DIR", str(tmp_path))
    assert main(["attempts", pipeline]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert lines[1].endswith(
        "calibrate[scan=1] attempt 1: failed (oom) slurm job 4711 exit 137: job killed (exit code 137): out of memory"
    )
    assert main(["attempts", pipeline, "--failed", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert (row["sub_group_key"], row["failure_kind"], row["hpc_job_id"]) == ("scan=1", "oom", "4711")
    assert main(["attempts", "no-such-pipeline"]) == 2
    assert "pipeline 'no-such-pipeline' is not in ops-db" in capsys.readouterr().err
