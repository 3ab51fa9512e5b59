"""``demo run --pipeline``: a file or the name of a bundled example; the sensor is found by the applied pipeline's
name; a pipeline the demo cannot drive is refused in one line with the command that runs it, and nothing of it
is stored."""

from __future__ import annotations

import os

import pytest
from sqlalchemy import func, select

from ccat_dagster.cli import main
from ccat_dagster.demo.examples import ExampleNotFound, example_pipeline, examples_dir
from ccat_dagster.demo.seed import seed_demo
from ccat_dagster.opsdb import models as m
from ccat_dagster.opsdb.engine import make_engine, session_scope


def test_example_pipeline_takes_a_file_or_a_bundled_name(tmp_path):
    bundled = examples_dir() / "pipelines" / "chai_ngc253_co43.yaml"
    assert example_pipeline() == bundled.resolve()
    assert example_pipeline("chai_ngc253_co43") == example_pipeline("chai_ngc253_co43.yaml") == bundled.resolve()
    own = tmp_path / "chai_ngc253_co43.yaml"  # a file of the same name wins over the bundled one
    own.write_text("pipeline: x\n")
    assert example_pipeline(own) == own.resolve()
    with pytest.raises(ExampleNotFound, match=r"--pipeline nested/none.yaml: no such file"):
        example_pipeline("nested/none.yaml")


def test_demo_run_refuses_a_manual_pipeline_and_stores_nothing(sqlite_url, tmp_path, capsys, monkeypatch):
    engine = make_engine(sqlite_url)
    with session_scope(engine) as session:
        seed_demo(session, data_dir=tmp_path / "data", scans=1)
    text = (examples_dir() / "pipelines" / "chai_ngc253_co43.yaml").read_text()
    software = (examples_dir() / "software" / "chai").resolve()
    spec = tmp_path / "other.yaml"
    spec.write_text(
        text.replace("pipeline: chai_ngc253_co43", "pipeline: chai_other")
        .replace("trigger: {type: continuous}", "trigger: {type: manual}")
        .replace("image_ref: ../software/chai", f"image_ref: {software}")
    )
    for name in [n for n in os.environ if n.startswith(("CCAT_", "DAGSTER_HOME"))]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("CCAT_OPS_DB_URL", sqlite_url)
    monkeypatch.setenv("CCAT_DAGSTER_DATA_DIR", str(tmp_path / "data"))
    assert main(["demo", "run", "--pipeline", str(spec)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "ccat-dagster: error: pipeline 'chai_other' is manual: the demo drives an enabled CONTINUOUS pipeline "
        "through its sensor; run this one with `dg launch --assets chai_other/STEP --partition KEY`"
    ]
    with session_scope(engine) as session:
        assert session.scalar(select(func.count()).select_from(m.Pipeline)) == 0
    engine.dispose()
