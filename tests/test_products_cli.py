"""``ccat-dagster products list`` (filters, --all, --json) and ``lineage --json`` on a small hand-built lineage.

SQLite keeps this cheap: the queries are plain joins the PostgreSQL lineage tests already exercise.
"""

from __future__ import annotations

import json
import os

import pytest

from ccat_dagster.cli import main
from ccat_dagster.execution.registration import record_input_lineage
from ccat_dagster.opsdb.engine import make_engine, session_scope
from ccat_dagster.opsdb.enums import DataProductType, RunStatus
from ccat_dagster.opsdb.migrate import upgrade

from .execution_factories import add_product, make_staging_world, make_step_attempt


@pytest.fixture(scope="module")
def lineage_db(tmp_path_factory):
    """Two scans → calibrate (one old, superseded product) → grid_map (all): (URL, ids by name), built once."""
    tmp_path = tmp_path_factory.mktemp("products")
    sqlite_url = f"sqlite:///{tmp_path / 'opsdb.sqlite'}"
    upgrade(sqlite_url)
    engine = make_engine(sqlite_url)
    ids: dict[str, int] = {}
    with session_scope(engine) as session:
        sw = make_staging_world(session, tmp_path, n_packages=2)
        world = sw.world
        ws = tmp_path / "ws"
        calibrated = []
        for index, package in enumerate(sw.package_ids):
            run = make_step_attempt(session, world, key=f"scan-{index}", status=RunStatus.COMPLETED)
            record_input_lineage(session, attempt=run, package_ids=[package], product_ids=[])
            product, _ = add_product(
                session, run, world.processing, path=ws / f"c{index}" / "cal.f32", relative_path="cal.f32"
            )
            calibrated.append(product)
            ids[f"c{index}"] = product.id
        old_run = make_step_attempt(session, world, key="scan-0", status=RunStatus.COMPLETED, attempt=2)
        old, _ = add_product(session, old_run, world.processing, path=ws / "old" / "cal.f32", relative_path="cal.f32")
        old.superseded_by_id = ids["c0"]
        ids["old"] = old.id
        grid = make_step_attempt(session, world, step=world.final_step, key="all", status=RunStatus.COMPLETED)
        record_input_lineage(session, attempt=grid, package_ids=sw.package_ids, product_ids=[p.id for p in calibrated])
        for name, path, kind in (
            ("map", "science/map.fits", DataProductType.SCIENCE),
            ("plot", "plots/mom0.png", DataProductType.PLOT),
        ):
            product, _ = add_product(
                session, grid, world.processing, path=ws / path, relative_path=path, product_type=kind
            )
            ids[name] = product.id
        ids["pipeline"] = world.pipeline.name  # type: ignore[assignment]
        ids["packages"] = sw.package_ids  # type: ignore[assignment]
    engine.dispose()
    return sqlite_url, ids


@pytest.fixture
def products_db(lineage_db, monkeypatch):
    url, ids = lineage_db
    for name in [n for n in os.environ if n.startswith("CCAT_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("CCAT_OPS_DB_URL", url)
    return ids


def _json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_products_list_filters_combine(products_db, capsys):
    pipeline = products_db["pipeline"]
    every = _json(capsys, ["products", "list", "--json"])
    assert [p["id"] for p in every] == [products_db[n] for n in ("c0", "c1", "plot", "map")]  # step, key, path
    assert every[3]["step"] == "grid_map" and every[3]["sha256"] and every[3]["copies"][0]["status"] == "present"
    assert [p["id"] for p in _json(capsys, ["products", "list", "--step", "grid_map", "--type", "plot", "--json"])] == [
        products_db["plot"]
    ]
    assert [p["id"] for p in _json(capsys, ["products", "list", "--sub-group", "scan-0", "--all", "--json"])] == [
        products_db["c0"],
        products_db["old"],
    ]
    assert _json(capsys, ["products", "list", "--pipeline", pipeline, "--type", "log", "--json"]) == []
    assert main(["products", "list", "--pipeline", pipeline, "--step", "calibrate"]) == 0
    text = capsys.readouterr().out.splitlines()
    assert text[0] == "2 data product(s):" and "[scan-0] intermediate" in text[1]


def test_products_list_names_an_unknown_pipeline(products_db, capsys):
    assert main(["products", "list", "--pipeline", "chai_typo"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"ccat-dagster: error: --pipeline 'chai_typo' is not in ops-db (pipelines: {products_db['pipeline']})"
    ]


def test_lineage_json_reaches_the_scans(products_db, capsys):
    document = _json(capsys, ["lineage", str(products_db["map"]), "--json"])
    assert document["root"]["id"] == products_db["map"] and document["root"]["product_type"] == "science"
    assert [s["step"]["name"] for s in document["steps"]] == ["calibrate", "grid_map"]
    assert document["package_count"] == 2 and document["packages_complete"] is True
    assert sorted(p["id"] for p in document["packages"]) == sorted(products_db["packages"])
    assert document["generated_by"]["status"] == "completed"
