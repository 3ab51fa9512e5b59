"""``ccat-dagster doctor``: every check on a real deployment (SQLite and PostgreSQL ops-db, a Dagster
instance, the real bubblewrap and Slurm where present), each failure with the line that names it, the exit
code."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import dagster as dg
import pytest
from sqlalchemy.orm import Session

from ccat_dagster import doctor
from ccat_dagster.cli import main
from ccat_dagster.demo.run import prepare_demo_dagster_home
from ccat_dagster.demo.seed import seed_demo
from ccat_dagster.doctor import (
    CheckStatus,
    DoctorError,
    SlurmPartition,
    evaluate_slurm_partitions,
    parse_sinfo_partitions,
    run_checks,
)
from ccat_dagster.opsdb.engine import make_engine
from ccat_dagster.opsdb.migrate import upgrade
from ccat_dagster.pipelines.apply import apply_pipeline_spec
from ccat_dagster.pipelines.spec import load_pipeline_spec
from ccat_dagster.settings import Settings

from .conftest import PRODUCTION_DAGSTER_YAML, create_pg_database, drop_pg_database

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "pipelines" / "chai_ngc253_co43.yaml"
ALL_CHECKS = [
    "ops-db",
    "ops-db schema",
    "processing location",
    "dagster instance",
    "dagster daemon",
    "pipeline base dir",
    "SIF cache",
    "hpc backend",
    "container runtime",
    "code location",
]


def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("CCAT_", "DAGSTER_")):
            monkeypatch.delenv(name)


def _world(tmp_path: Path, *, apply_pipeline: bool = True, ops_db_url: str | None = None) -> dict[str, str]:
    """A migrated, seeded ops-db (SQLite in tmp unless given), the demo pipeline, a DAGSTER_HOME."""
    data_dir = tmp_path / "data"
    url = ops_db_url or f"sqlite:///{tmp_path / 'opsdb.sqlite'}"
    upgrade(url)
    engine = make_engine(url)
    with Session(engine) as session, session.begin():
        seed_demo(session, data_dir=data_dir, scans=4)
        if apply_pipeline:
            apply_pipeline_spec(session, load_pipeline_spec(EXAMPLE), source_path=EXAMPLE)
    engine.dispose()
    home = prepare_demo_dagster_home(tmp_path / "dagster-home")
    return {
        "CCAT_DAGSTER_DATA_DIR": str(data_dir),
        "CCAT_OPS_DB_URL": url,
        "CCAT_WORKFLOW_MANAGER_CONTAINER_RUNTIME": "bubblewrap",
        "DAGSTER_HOME": str(home),
    }


def _by_name(results: list[doctor.CheckResult]) -> dict[str, doctor.CheckResult]:
    names = [r.name for r in results]
    assert names == ALL_CHECKS, names
    return {r.name: r for r in results}


def _require_bwrap() -> None:
    if shutil.which("bwrap") is None:
        message = "needs bubblewrap (bwrap): run scripts/setup.sh"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


# --------------------------------------------------------------------------------------------- whole command


def test_doctor_passes_on_a_ready_deployment(tmp_path, monkeypatch, capsys):
    _require_bwrap()
    _clean_environment(monkeypatch)
    for name, value in _world(tmp_path).items():
        monkeypatch.setenv(name, value)

    code = main(["doctor"])

    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "ccat-dagster doctor: backend local, runtime bubblewrap, stager local"
    assert lines[-1] == "all checks passed", out
    assert code == 0, out
    body = {line[6:26].strip(): line for line in lines[1:-1]}
    assert list(body) == ALL_CHECKS, out
    for name, line in body.items():
        expected = "warn" if name == "dagster daemon" else "ok"
        assert line.startswith(f"{expected:<4}  "), line
    assert "at migration head" in body["ops-db schema"]
    assert "ramses-processing, 1 enabled pipeline(s)" in body["processing location"]
    assert "SqliteRunStorage, QueuedRunCoordinator, 0 run(s)" in body["dagster instance"]
    assert "no daemon has ever run" in body["dagster daemon"]
    assert "bubblewrap: a test sandbox started" in body["container runtime"]
    assert "1 pipeline(s) (chai_ngc253_co43), 4 asset(s)" in body["code location"]


def test_doctor_json_lists_every_check(tmp_path, monkeypatch, capsys):
    _require_bwrap()
    _clean_environment(monkeypatch)
    for name, value in _world(tmp_path, apply_pipeline=False).items():
        monkeypatch.setenv(name, value)

    code = main(["doctor", "--json"])

    results = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in results] == ALL_CHECKS
    assert {r["status"] for r in results} <= {"ok", "warn"}
    assert code == 0
    assert "0 pipeline(s) (none)" in results[-1]["detail"]


def test_every_failure_has_its_line_and_the_exit_code_is_1(tmp_path, monkeypatch, capsys):
    _clean_environment(monkeypatch)
    empty_db = tmp_path / "empty.sqlite"
    empty_db.touch()
    not_a_dir = tmp_path / "a-file"
    not_a_dir.write_text("")
    monkeypatch.setenv("CCAT_DAGSTER_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("CCAT_OPS_DB_URL", f"sqlite:///{empty_db}")
    monkeypatch.setenv("CCAT_WORKFLOW_MANAGER_PIPELINE_BASE_DIR", str(not_a_dir / "pipelines"))
    monkeypatch.setenv("CCAT_WORKFLOW_MANAGER_HPC_BACKEND", "slurm")
    monkeypatch.setenv("CCAT_WORKFLOW_MANAGER_CONTAINER_RUNTIME", "apptainer")
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))  # no apptainer and no Slurm commands on this PATH

    code = main(["doctor"])

    out = capsys.readouterr().out
    assert code == 1, out
    lines = {line[6:26].strip(): line for line in out.splitlines()[1:-1]}
    assert lines["ops-db"].startswith("ok")
    assert lines["ops-db schema"].startswith("FAIL") and "run `ccat-dagster db upgrade`" in lines["ops-db schema"]
    assert lines["processing location"].startswith("skip")
    assert lines["dagster instance"].startswith("FAIL") and "DAGSTER_HOME is not set" in lines["dagster instance"]
    assert lines["dagster daemon"].startswith("skip")
    assert lines["pipeline base dir"].startswith("FAIL") and f"{not_a_dir} is not a directory" in out
    assert lines["SIF cache"].startswith("ok")
    assert lines["hpc backend"].startswith("FAIL") and "not on PATH" in lines["hpc backend"]
    assert lines["container runtime"].startswith("FAIL") and "install Apptainer" in lines["container runtime"]
    assert lines["code location"].startswith("skip")
    assert out.splitlines()[-1] == "5 check(s) failed"


def test_a_missing_sqlite_file_is_reported_not_created(tmp_path):
    url = f"sqlite:///{tmp_path / 'nowhere' / 'opsdb.sqlite'}"
    settings = Settings.from_env({"CCAT_DAGSTER_DATA_DIR": str(tmp_path), "CCAT_OPS_DB_URL": url})

    ops_db, schema, location = doctor.check_ops_db(settings=settings)

    assert ops_db.status is CheckStatus.FAIL
    assert "the SQLite file does not exist; create it with `ccat-dagster db upgrade`" in ops_db.detail
    assert (schema.status, location.status) == (CheckStatus.SKIP, CheckStatus.SKIP)
    assert not (tmp_path / "nowhere").exists()


def test_an_unreachable_postgres_ops_db_names_the_url_without_its_password(tmp_path):
    url = "postgresql://ccat:secret@127.0.0.1:1/opsdb"  # port 1: nothing listens
    settings = Settings.from_env({"CCAT_DAGSTER_DATA_DIR": str(tmp_path), "CCAT_OPS_DB_URL": url})

    ops_db = doctor.check_ops_db(settings=settings)[0]

    assert ops_db.status is CheckStatus.FAIL
    assert ops_db.detail.startswith("cannot connect to postgresql://ccat:***@127.0.0.1:1/opsdb: ")
    assert "secret" not in ops_db.detail


def test_a_wrong_processing_location_lists_the_real_ones(tmp_path):
    env = _world(tmp_path, apply_pipeline=False)
    settings = Settings.from_env({**env, "CCAT_WORKFLOW_MANAGER_PROCESSING_LOCATION_ID": "999"})

    location = doctor.check_ops_db(settings=settings)[2]

    assert location.status is CheckStatus.FAIL
    assert location.detail.startswith("CCAT_WORKFLOW_MANAGER_PROCESSING_LOCATION_ID=999 is not a processing")
    assert "ramses-processing" in location.detail


def test_a_code_location_dagster_refuses_is_a_failure(tmp_path, monkeypatch):
    """The same validation the code server runs: two jobs whose ops clash by name cannot load."""

    def clashing_definitions(settings):  # type: ignore[no-untyped-def]
        @dg.op(name="calibrate")
        def first() -> None: ...

        @dg.op(name="calibrate")
        def second() -> None: ...

        @dg.job(name="one")
        def one() -> None:
            first()

        @dg.job(name="two")
        def two() -> None:
            second()

        return dg.Definitions(jobs=[one, two])

    monkeypatch.setattr("ccat_dagster.definitions.build_definitions", clashing_definitions)
    settings = Settings.from_env(_world(tmp_path, apply_pipeline=False))

    result = doctor.check_code_location(settings=settings)

    assert result.status is CheckStatus.FAIL
    assert result.detail.startswith("does not load: Conflicting definitions found in repository")


def test_dagster_instance_failures(tmp_path):
    missing = doctor.check_dagster_instance(environ={"DAGSTER_HOME": str(tmp_path / "absent")})
    assert missing[0].status is CheckStatus.FAIL and "is not a directory" in missing[0].detail
    broken = tmp_path / "broken-home"
    broken.mkdir()
    (broken / "dagster.yaml").write_text("storage:\n  nosuchstorage: {}\n")
    loaded = doctor.check_dagster_instance(environ={"DAGSTER_HOME": str(broken)})
    assert loaded[0].status is CheckStatus.FAIL
    assert loaded[0].detail.startswith(f"{broken}/dagster.yaml cannot be loaded: ")
    assert loaded[1].status is CheckStatus.SKIP


def test_writable_directory_that_does_not_exist_yet(tmp_path):
    result = doctor.check_writable_directory(name="pipeline base dir", variable="X", path=tmp_path / "a" / "b")
    assert result.status is CheckStatus.OK
    assert f"does not exist yet, will be created under {tmp_path}" in result.detail
    assert not (tmp_path / "a").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ccat-doctor-")]


@pytest.mark.postgres
def test_postgres_ops_db_and_the_production_dagster_yaml(tmp_path, monkeypatch):
    """The repository's dagster.yaml (PostgreSQL storage from DAGSTER_PG_URL) is a loadable instance."""
    ops_url = create_pg_database("ccat_test_doctor_ops")
    dagster_url = create_pg_database("ccat_test_doctor_dagster")
    try:
        env = _world(tmp_path, apply_pipeline=False, ops_db_url=ops_url)
        shutil.copy(PRODUCTION_DAGSTER_YAML, Path(env["DAGSTER_HOME"]) / "dagster.yaml")
        monkeypatch.setenv("DAGSTER_PG_URL", dagster_url.replace("+psycopg2", ""))
        results = doctor.check_ops_db(settings=Settings.from_env(env)) + doctor.check_dagster_instance(environ=env)
    finally:
        drop_pg_database(ops_url)
        drop_pg_database(dagster_url)

    ops_db, schema, location, instance, daemon = results
    assert ops_db.status is CheckStatus.OK and "(postgresql " in ops_db.detail
    assert "secret" not in ops_db.detail
    assert schema.status is CheckStatus.OK and location.status is CheckStatus.OK
    assert instance.status is CheckStatus.OK, instance.detail
    assert "PostgresRunStorage, QueuedRunCoordinator, 0 run(s)" in instance.detail
    assert daemon.status is CheckStatus.WARN


# --------------------------------------------------------------------------------------------- Slurm


# `sinfo --noheader --format=%P|%a` as recorded on the single-node cluster of scripts/slurm-single-node.sh,
# and on a cluster with a default partition listed once per node state, a drained and a down partition.
SINFO_SINGLE_NODE = "debug*|up\n"
SINFO_CLUSTER = "cpu*|up\ncpu*|up\ngpu|up\nlong|drain\nold|down\n"


def test_parse_sinfo_partitions():
    assert parse_sinfo_partitions(SINFO_SINGLE_NODE) == [SlurmPartition("debug", True, "up")]
    assert parse_sinfo_partitions(SINFO_CLUSTER) == [
        SlurmPartition("cpu", True, "up"),
        SlurmPartition("gpu", False, "up"),
        SlurmPartition("long", False, "drain"),
        SlurmPartition("old", False, "down"),
    ]
    with pytest.raises(DoctorError, match="unexpected sinfo line 'debug\\* up'"):
        parse_sinfo_partitions("debug* up\n")


def test_evaluate_slurm_partitions():
    partitions = parse_sinfo_partitions(SINFO_CLUSTER)
    default = evaluate_slurm_partitions(partitions, wanted="")
    assert (default.status, default.detail) == (
        CheckStatus.OK,
        "slurm: partition 'cpu' (the cluster default) is up",
    )
    assert evaluate_slurm_partitions(partitions, wanted="gpu").status is CheckStatus.OK
    missing = evaluate_slurm_partitions(partitions, wanted="fast")
    assert missing.status is CheckStatus.FAIL
    assert "'fast' does not exist; partitions: cpu*, gpu, long, old" in missing.detail
    drained = evaluate_slurm_partitions(partitions, wanted="long")
    assert drained.status is CheckStatus.FAIL and "partition 'long' is drain" in drained.detail
    no_default = evaluate_slurm_partitions([SlurmPartition("gpu", False, "up")], wanted="")
    assert no_default.status is CheckStatus.FAIL and "no default partition" in no_default.detail


def test_slurm_commands_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    settings = Settings.from_env({"CCAT_DAGSTER_DATA_DIR": str(tmp_path), "CCAT_WORKFLOW_MANAGER_HPC_BACKEND": "slurm"})

    result = doctor.check_hpc_backend(settings=settings)

    assert result.status is CheckStatus.FAIL
    assert result.detail.startswith("slurm: sbatch, squeue, sacct, scancel, sinfo not on PATH")


@pytest.mark.slurm
def test_slurm_against_the_real_cluster(tmp_path):
    if shutil.which("sinfo") is None:
        message = "Slurm client commands not installed (sinfo not found); run scripts/slurm-single-node.sh as root"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, check=False)
    if "is UP" not in ping.stdout:
        pytest.fail(f"slurmctld does not answer ({ping.stdout.strip()}): run scripts/slurm-single-node.sh")
    base = {"CCAT_DAGSTER_DATA_DIR": str(tmp_path), "CCAT_WORKFLOW_MANAGER_HPC_BACKEND": "slurm"}

    default = doctor.check_hpc_backend(settings=Settings.from_env(base))
    absent = doctor.check_hpc_backend(
        settings=Settings.from_env({**base, "CCAT_WORKFLOW_MANAGER_SLURM_PARTITION": "no_such_partition"})
    )

    assert default.status is CheckStatus.OK, default.detail
    assert "(the cluster default) is up" in default.detail
    assert absent.status is CheckStatus.FAIL
    assert "'no_such_partition' does not exist" in absent.detail


def test_run_checks_never_raises(tmp_path, monkeypatch):
    """A check that blows up is reported as a failure; the others still run."""

    def explode(*, settings):  # type: ignore[no-untyped-def]
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(doctor, "check_sif_cache", explode)
    env = {"CCAT_DAGSTER_DATA_DIR": str(tmp_path), "CCAT_OPS_DB_URL": f"sqlite:///{tmp_path / 'x.sqlite'}"}

    results = _by_name(run_checks(settings=Settings.from_env(env), environ=env))

    assert results["SIF cache"].status is CheckStatus.FAIL
    assert results["SIF cache"].detail == "RuntimeError: disk on fire"
    assert results["hpc backend"].status is CheckStatus.OK
