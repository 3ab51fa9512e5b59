"""``ccat-dagster groupings preview`` / ``presets`` on the demo observatory (SQLite)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from sqlalchemy.orm import Session

from ccat_dagster.cli import main
from ccat_dagster.demo.seed import seed_demo
from ccat_dagster.opsdb import models as m
from ccat_dagster.opsdb.engine import make_engine
from ccat_dagster.opsdb.migrate import upgrade


@pytest.fixture
def demo_env(tmp_path, monkeypatch):
    """A seeded demo ops-db (20 scans, 16 archived packages), selected through the environment."""
    data_dir = tmp_path / ".data"
    url = f"sqlite:///{data_dir / 'opsdb.sqlite'}"
    upgrade(url)
    engine = make_engine(url)
    with Session(engine) as session, session.begin():
        seed_demo(session, data_dir=data_dir, scans=20)
        lfa = session.query(m.InstrumentModule).filter_by(name="LFA").one()
        session.add(
            m.DataGrouping(
                name="ngc253-co43",
                filter_rules=[
                    {"table": "Source", "column": "name", "operator": "eq", "value": "NGC253"},
                    {"table": "ObsUnit", "column": "line_id", "operator": "eq", "value": "CO43"},
                ],
                instrument_module=lfa,
            )
        )
        session.add(
            m.DataGrouping(
                name="broken",
                filter_rules=[{"table": "Source", "column": "name", "operator": "equals", "value": "x"}],
            )
        )
    engine.dispose()
    monkeypatch.setenv("CCAT_OPS_DB_URL", url)
    monkeypatch.setenv("CCAT_DAGSTER_DATA_DIR", str(data_dir))
    return tmp_path


def run(capsys, *argv):
    code = main(["groupings", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_preview_preset_per_source_line(demo_env, capsys):
    code, out, err = run(capsys, "preview", "--preset", "per-source-line")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].startswith("preset per-source-line; 0 rule(s); group_by [source, line]; archived packages only")
    assert lines[1].split() == ["SUB-GROUP", "KEY", "PACKAGES", "SIZE"]
    rows = {line.split()[0]: int(line.split()[1]) for line in lines[2:-1]}
    assert rows == {
        "source=E-COSMOS+line=~": 1,
        "source=Jupiter+line=~": 1,
        "source=NGC253+line=CII": 1,
        "source=NGC253+line=CO43": 8,
        "source=Orion-KL+line=CII": 1,
        "source=Orion-KL+line=CO43": 4,
    }
    assert lines[-1].startswith("6 sub-group(s), 16 package(s), ")


def test_preview_json_with_rules_file(demo_env, capsys):
    rules_file = demo_env / "rules.yaml"
    rules_file.write_text(
        "- {table: InstrumentModule, column: name, operator: in, value: [LFA, HFA]}\n"
        "- {table: RawDataPackage, column: metadata, json_path: observation.frequency_ghz,\n"
        "   operator: gt, value: 1000}\n"
    )
    code, out, _ = run(capsys, "preview", "--rules", str(rules_file), "--group-by", "source,obs_date", "--json")
    assert code == 0
    document = json.loads(out)
    assert document["group_by"] == ["source", "obs_date"]
    assert document["filter_rules"][1]["json_path"] == "observation.frequency_ghz"
    keys = [g["key"] for g in document["sub_groups"]]
    assert keys and all(k.startswith(("source=NGC253+obs_date=", "source=Orion-KL+obs_date=")) for k in keys)
    assert keys == sorted(keys)
    assert document["package_count"] == sum(g["package_count"] for g in document["sub_groups"]) == 2
    for group in document["sub_groups"]:
        assert len(group["package_ids"]) == group["package_count"]
        assert [d["dimension"] for d in group["dimensions"]] == ["source", "obs_date"]


def test_preview_json_rules_file_as_mapping_with_group_by(demo_env, capsys):
    rules_file = demo_env / "grouping.json"
    rules_file.write_text(json.dumps({"filter_rules": [], "group_by": ["instrument"]}))
    code, out, _ = run(capsys, "preview", "--rules", str(rules_file), "--json", "--limit", "1")
    document = json.loads(out)
    assert code == 0 and document["sub_group_count"] == 2 and document["truncated"] is True
    assert [g["key"] for g in document["sub_groups"]] == ["instrument=CHAI"]


def test_preview_stored_grouping(demo_env, capsys):
    code, out, _ = run(capsys, "preview", "ngc253-co43", "--group-by", "line")
    assert code == 0
    assert "grouping ngc253-co43; 2 rule(s); group_by [line]" in out and "instrument module" in out
    assert "line=CO43" in out and "8 package(s)" in out.splitlines()[-1]
    code, out2, _ = run(capsys, "preview", "--grouping", "ngc253-co43", "--preset", "per-scan", "--limit", "3")
    assert code == 0 and "group_by [executed_obs_unit]" in out2
    assert "… 5 more sub-group(s) not shown" in out2 and "8 sub-group(s), 8 package(s)" in out2


def test_preview_everything_and_unarchived(demo_env, capsys):
    code, out, _ = run(capsys, "preview", "--group-by", "", "--include-unarchived")
    assert (
        code == 0 and "all" in out.splitlines()[2] and out.splitlines()[-1].startswith("1 sub-group(s), 20 package(s)")
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["preview", "--group-by", "source,night"], "group_by[1] 'night' is not a dimension"),
        (["preview", "nosuch"], "no data grouping 'nosuch' in ops-db; stored groupings: broken, ngc253-co43"),
        (["preview", "broken"], "grouping 'broken': filter_rules[0]"),
        (
            ["preview", "--preset", "per-scna"],
            "no grouping preset 'per-scna' in ops-db; available presets: everything",
        ),
        (["preview", "--rules", "missing.yaml"], "cannot read rules file missing.yaml"),
        (["preview", "--limit", "-1"], "--limit -1 is invalid"),
    ],
)
def test_preview_errors_exit_non_zero_with_a_clear_message(demo_env, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(demo_env)
    code, out, err = run(capsys, *argv)
    assert code != 0 and out == ""
    assert err.startswith("ccat-dagster: error: ") and message in err


def test_bad_rules_file_lists_every_problem(demo_env, capsys):
    rules_file = demo_env / "bad.yaml"
    rules_file.write_text(
        "- {table: Sourse, column: name, operator: eq, value: NGC253}\n"
        "- {table: ObsUnit, column: line_id, operator: in, value: []}\n"
        "- {table: Source, column: name, operator: eq, value: x, json_path: a.b}\n"
    )
    code, out, err = run(capsys, "preview", "--rules", str(rules_file), "--group-by", "source,lines")
    assert code == 2 and out == ""
    assert "4 problems" in err
    assert f"--rules {rules_file}: filter_rules[0]" in err and 'unknown table "Sourse"' in err
    assert "filter_rules[1]" in err and "non-empty list" in err
    assert "filter_rules[2]" in err and "json_path is only valid on a JSON column" in err
    assert "'lines' is not a dimension (did you mean 'line'?)" in err
    rules_file.write_text("- [unclosed\n")
    code, _, err = run(capsys, "preview", "--rules", str(rules_file))
    assert code == 2 and "is not valid YAML" in err


def test_presets_command(demo_env, capsys):
    code, out, _ = run(capsys, "presets")
    assert code == 0 and "holds no grouping presets" in out
    code, out, _ = run(capsys, "presets", "--install")
    assert code == 0 and "installed/updated 7 built-in preset(s)" in out
    code, out, _ = run(capsys, "presets", "--json")
    presets = {p["name"]: p for p in json.loads(out)}
    assert presets["per-source-line"]["group_by"] == ["source", "line"]
    assert {"per-scan", "per-source-line", "per-night", "everything"} <= set(presets)


def test_console_script_is_wired(demo_env):
    env = {**os.environ}
    result = subprocess.run(
        [sys.executable, "-m", "ccat_dagster.cli", "groupings", "preview", "--group-by", "bogus"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert result.returncode == 2 and "'bogus' is not a dimension" in result.stderr
    result = subprocess.run(
        [sys.executable, "-m", "ccat_dagster.cli", "groupings", "preview", "--preset", "per-night", "--json"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert [g["key"] for g in json.loads(result.stdout)["sub_groups"]][:1] == ["obs_date=2026-10-01"]
