"""``ccat-dagster pipelines …``: exit codes and output, in-process, against PostgreSQL and SQLite."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ccat_dagster.cli import main
from ccat_dagster.demo.seed import seed_demo
from ccat_dagster.opsdb.engine import make_engine, session_scope

from .test_pipeline_apply import snapshot
from .test_pipeline_spec import EXAMPLE, base_spec


@pytest.fixture
def cli_env(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Settings pointing at a fresh, seeded ops-db."""
    monkeypatch.setenv("CCAT_OPS_DB_URL", db_url)
    monkeypatch.setenv("CCAT_DAGSTER_DATA_DIR", str(tmp_path / "data"))
    engine = make_engine(db_url)
    with session_scope(engine) as session:
        seed_demo(session, data_dir=tmp_path / "data", scans=4)
    engine.dispose()
    return db_url


def write(tmp_path: Path, name: str, data: dict) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["pipelines", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_validate_offline_needs_no_database(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CCAT_OPS_DB_URL", "postgresql+psycopg2://nobody@127.0.0.1:1/none")
    code, out, err = run(capsys, "validate", "--offline", str(EXAMPLE))
    assert (code, err) == (0, "")
    assert "valid: pipeline chai_ngc253_co43 (3 steps)" in out

    bad = base_spec()
    bad["steps"][1]["resources"] = {"memory_gb": -2}
    path = write(tmp_path, "bad.yaml", bad)
    code, out, err = run(capsys, "validate", "--offline", str(path), str(EXAMPLE))
    assert code == 1
    assert f"rejected {path}: 1 problem(s)" in err
    assert "steps[1].resources.memory_gb: -2 is invalid: expected a number of GB greater than 0" in err
    assert "valid: pipeline chai_ngc253_co43" in out


def test_validate_checks_ops_db_without_writing(cli_env, tmp_path, capsys):
    engine = make_engine(cli_env)
    before = snapshot(engine)
    code, out, err = run(capsys, "validate", str(EXAMPLE))
    assert (code, err) == (0, "")
    assert "would be created: pipeline chai_ngc253_co43 from" in out
    unknown = write(tmp_path, "loc.yaml", dict(base_spec(), processing_location="nowhere"))
    code, out, err = run(capsys, "validate", str(unknown))
    assert code == 1
    assert "processing_location: 'nowhere' is not a DataLocation; processing locations: ramses-processing" in err
    assert snapshot(engine) == before
    engine.dispose()


def test_apply_list_show_disable_enable(cli_env, tmp_path, capsys):
    code, out, err = run(capsys, "apply", str(EXAMPLE))
    assert (code, err) == (0, "")
    assert out.startswith("created: pipeline chai_ngc253_co43 (id ")
    assert "software chai-gridding 1.0.0 registered" in out

    code, out, _ = run(capsys, "apply", str(EXAMPLE))
    assert code == 0 and out.startswith("unchanged: pipeline chai_ngc253_co43")

    code, out, _ = run(capsys, "list")
    assert code == 0
    assert "chai_ngc253_co43" in out and "calibrate → baseline → grid_map" in out and "ramses-processing" in out

    code, out, _ = run(capsys, "list", "--json")
    listed = json.loads(out)
    assert [(p["name"], p["enabled"], p["steps"]) for p in listed] == [
        ("chai_ngc253_co43", True, ["calibrate", "baseline", "grid_map"])
    ]

    code, out, _ = run(capsys, "show", "chai_ngc253_co43")
    assert code == 0 and out.startswith("# pipeline id ")
    shown = yaml.safe_load(out)
    assert shown["grouping"]["instrument_module"] == "CHAI/LFA"
    assert [s["software"]["entrypoint"][-1] for s in shown["steps"]] == [
        "/opt/software/bin/chai_calibrate.py",
        "/opt/software/bin/chai_baseline.py",
        "/opt/software/bin/chai_grid_map.py",
    ]
    # What `show` prints is a pipeline file: applying it changes nothing.
    shown_path = tmp_path / "shown.yaml"
    shown_path.write_text(out, encoding="utf-8")
    code, out, _ = run(capsys, "apply", str(shown_path))
    assert code == 0 and out.startswith("unchanged:")

    code, out, _ = run(capsys, "show", "chai_ngc253_co43", "--json")
    assert json.loads(out) == shown

    assert run(capsys, "disable", "chai_ngc253_co43")[:2] == (0, "pipeline chai_ngc253_co43 disabled\n")
    assert run(capsys, "disable", "chai_ngc253_co43")[:2] == (
        0,
        "pipeline chai_ngc253_co43 was already disabled\n",
    )
    assert json.loads(run(capsys, "list", "--json")[1])[0]["enabled"] is False
    assert run(capsys, "enable", "chai_ngc253_co43")[:2] == (0, "pipeline chai_ngc253_co43 enabled\n")

    code, _, err = run(capsys, "enable", "nope")
    assert code == 1 and "no pipeline 'nope' in ops-db; stored pipelines: chai_ngc253_co43" in err
    code, _, err = run(capsys, "show", "nope")
    assert code == 1 and "no pipeline 'nope'" in err


def test_apply_applies_good_files_and_fails_on_bad_ones(cli_env, tmp_path, capsys):
    bad = dict(base_spec(), pipeline="bad_pipe")
    bad["steps"][2]["group_by"] = {"preset": "no-such-preset"}
    bad_path = write(tmp_path, "bad.yaml", bad)
    good_path = write(tmp_path, "good.yaml", base_spec())
    code, out, err = run(capsys, "apply", str(bad_path), str(good_path))
    assert code == 1
    assert f"rejected {bad_path}" in err and "no grouping preset 'no-such-preset'" in err
    assert "created: pipeline demo_pipe" in out
    listed = json.loads(run(capsys, "list", "--json")[1])
    assert [p["name"] for p in listed] == ["demo_pipe"]


def test_the_same_pipeline_twice_in_one_command_is_refused(cli_env, tmp_path, capsys):
    first = write(tmp_path, "a.yaml", base_spec())
    second = write(tmp_path, "b.yaml", dict(base_spec(), description="other"))
    code, out, err = run(capsys, "apply", str(first), str(second))
    assert code == 1
    assert "created: pipeline demo_pipe" in out
    assert f"'demo_pipe' is also defined by {first}" in err


def test_unusable_ops_db_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CCAT_OPS_DB_URL", f"sqlite:///{tmp_path / 'empty.sqlite'}")  # never migrated
    code, _, err = run(capsys, "list")
    assert code == 2
    assert "cannot use ops-db at sqlite:///" in err and "ccat-dagster db upgrade" in err
    code, _, err = run(capsys, "apply", str(EXAMPLE))
    assert code == 2


def test_console_script_help_lists_the_commands():
    result = subprocess.run(
        [sys.executable, "-m", "ccat_dagster.cli", "pipelines", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0
    for command in ("validate", "apply", "list", "show", "disable", "enable"):
        assert command in result.stdout
