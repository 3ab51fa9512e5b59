"""``ccat-dagster pipelines gaps`` and the messages that say, per trigger type, what happens next.
In-process, against PostgreSQL and SQLite."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ccat_dagster.assets.factory import _waiting_message
from ccat_dagster.cli import main
from ccat_dagster.demo.seed import seed_demo
from ccat_dagster.execution.runner import OutcomeKind, SubGroupOutcome
from ccat_dagster.opsdb.engine import make_engine, session_scope
from ccat_dagster.provenance.invalidate import AffectedSubGroup, InvalidationResult, what_happens_next
from ccat_dagster.provenance.report import render_invalidation

from .dagster_fixtures import EXAMPLE, PIPELINE, archived_example_scan_ids


@pytest.fixture
def applied(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    """A seeded ops-db with the example pipeline applied through the CLI; the number of archived scans."""
    monkeypatch.setenv("CCAT_OPS_DB_URL", db_url)
    monkeypatch.setenv("CCAT_DAGSTER_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    engine = make_engine(db_url)
    with session_scope(engine) as session:
        seed_demo(session, data_dir=tmp_path / "data", scans=3)
    assert main(["pipelines", "apply", str(EXAMPLE)]) == 0
    with session_scope(engine) as session:
        scans = len(archived_example_scan_ids(session))
    engine.dispose()
    return scans


def test_gaps_lists_what_would_run_and_why_without_running_anything(applied, capsys):
    capsys.readouterr()
    assert main(["pipelines", "gaps", PIPELINE, "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    steps = {s["step"]: s for s in document["steps"]}
    assert steps["calibrate"]["counts"] == {"gap": applied}
    assert {row["reason"] for row in steps["calibrate"]["not_up_to_date"]} == {"new"}
    assert steps["grid_map"]["counts"] == {"upstream_not_ready": 1}
    assert "sensor" in document["what_happens_next"]

    assert main(["pipelines", "gaps", PIPELINE, "--step", "grid_map"]) == 0
    text = capsys.readouterr().out
    assert "step grid_map: 1 sub-group(s): 1 upstream_not_ready" in text and "step calibrate" not in text
    # Nothing ran: the same gaps again.
    assert main(["pipelines", "gaps", PIPELINE, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"][0]["counts"] == {"gap": applied}


def test_gaps_names_an_unknown_step_and_the_known_ones(applied, capsys):
    assert main(["pipelines", "gaps", PIPELINE, "--step", "gridmap"]) == 1
    error = capsys.readouterr().err
    assert "no step 'gridmap'" in error and "calibrate, baseline, grid_map" in error


@pytest.mark.parametrize(
    ("trigger", "enabled", "expected"),
    [
        ("continuous", True, "sensor's next tick"),
        ("cron", True, "next cron tick"),
        ("manual", True, "NOT re-run automatically (MANUAL pipeline)"),
        ("continuous", False, "disabled"),
    ],
)
def test_invalidation_says_what_re_runs_the_sub_groups_per_trigger_type(trigger, enabled, expected):
    note = what_happens_next(trigger, enabled=enabled)
    assert expected in note
    result = InvalidationResult(
        package_id=7,
        package_name="scan-7",
        reason="bad pointing",
        already_invalidated=False,
        affected=(AffectedSubGroup("p", "grid_map", "all", (1,), (2, 3), next_run=note),),
    )
    text = "\n".join(render_invalidation(result, dry_run=False))
    assert f"p/grid_map [all]: 2 remaining member(s); {note}" in text
    assert "next sensor tick" not in text or trigger == "continuous"


@pytest.mark.parametrize(
    ("trigger", "expected"),
    [("continuous", "sensor requests them"), ("manual", "MANUAL: materialize the upstream partitions")],
)
def test_a_fan_in_run_that_waits_says_so(trigger, expected):
    waiting = [
        SubGroupOutcome("all", OutcomeKind.SKIPPED, detail="upstream_not_ready: 1 of 3 upstream sub-group(s) ...")
    ]
    message = _waiting_message("p", "grid_map", trigger, waiting, 1)
    assert message.startswith("nothing ran: 1 of 1 sub-group(s) of p/grid_map wait for upstream work")
    assert expected in message and "all: upstream_not_ready: 1 of 3" in message
