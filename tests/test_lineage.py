"""Lineage queries: ancestors down to raw packages and files, descendants (impact), on PostgreSQL
and SQLite with a hand-built graph, and ``ccat-dagster lineage`` / ``impact`` on the demo chain."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from ccat_dagster.cli import main
from ccat_dagster.execution.registration import rebuild_lineage_aggregates, record_input_lineage
from ccat_dagster.opsdb import models as m
from ccat_dagster.opsdb.engine import make_engine, session_scope
from ccat_dagster.opsdb.enums import DataProductType, PackageState, RunStatus, VersionPolicy
from ccat_dagster.opsdb.lineage import (
    LineageError,
    _in_ids,
    ancestor_ids,
    ancestor_package_ids,
    ancestors,
    descendants_of_package,
    descendants_of_product,
    find_package,
    lineage_summary,
)

from .dagster_fixtures import PIPELINE, demo_world, require_bwrap_and_numpy  # noqa: F401
from .execution_factories import add_product, make_staging_world, make_step_attempt

INTER = DataProductType.INTERMEDIATE


@dataclass
class Graph:
    """Three scans P0..P2 → calibrate (per scan) → grid (all) → mosaic (all), plus an older calibrate attempt
    of P0 whose product is superseded, and a second grid sub-group ``pair`` over P0 and P1 (a diamond: mosaic
    uses both grid sub-groups, which share calibrate products)."""

    packages: list[int] = field(default_factory=list)
    runs: dict[str, int] = field(default_factory=dict)
    products: dict[str, int] = field(default_factory=dict)
    package_names: list[str] = field(default_factory=list)


def build_graph(session: Session, tmp_path: Path) -> Graph:
    sw = make_staging_world(session, tmp_path, n_packages=3)
    world = sw.world
    mosaic_step = m.ReductionStep(
        pipeline=world.pipeline,
        name="mosaic",
        position=2,
        group_by=[],
        software=world.step.software,
        version_policy=VersionPolicy.EXACT,
        version_spec="1.0.0",
        config=world.config,
        depends_on=[world.final_step],
    )
    session.add(mosaic_step)
    session.flush()
    graph = Graph(packages=sw.package_ids, package_names=[p.name for p in sw.packages])
    ws = tmp_path / "ws"

    def attempt(name, step, key, packages, products, number=1):
        run = make_step_attempt(session, world, step=step, key=key, status=RunStatus.COMPLETED, attempt=number)
        # The links and the closure rows, as the runner records them.
        record_input_lineage(
            session, attempt=run, package_ids=packages, product_ids=[graph.products[p] for p in products]
        )
        graph.runs[name] = run.id
        return run

    def product(name, run, relative_path, product_type=INTER):
        row, _copy = add_product(
            session, run, world.processing, path=ws / name / relative_path, relative_path=relative_path,
            product_type=product_type, content=name.encode(),
        )  # fmt: skip
        graph.products[name] = row.id
        return row

    p0, p1, p2 = graph.packages
    old = attempt("cal0_old", world.step, "scan-0", [p0], [], number=1)
    old_product = product("c0_old", old, "cal.f32")
    for index, package in enumerate(graph.packages):
        run = attempt(f"cal{index}", world.step, f"scan-{index}", [package], [], number=2 if index == 0 else 1)
        product(f"c{index}", run, "cal.f32")
    old_product.superseded_by_id = graph.products["c0"]
    grid = attempt("grid_all", world.final_step, "all", [p0, p1, p2], ["c0", "c1", "c2"])
    product("g_cube", grid, "grid/cube.f32")
    product("g_log", grid, "grid/log.txt", DataProductType.LOG)
    pair = attempt("grid_pair", world.final_step, "pair", [p0, p1], ["c0", "c1"])
    product("g_pair", pair, "grid/pair.f32")
    mosaic = attempt("mosaic", mosaic_step, "all", [p0, p1, p2], ["g_cube", "g_pair"])
    product("mosaic", mosaic, "science/mosaic.fits", DataProductType.SCIENCE)
    session.flush()
    return graph


def test_ancestors_reach_every_attempt_product_package_and_file(engine, tmp_path):
    with session_scope(engine) as session:
        graph = build_graph(session, tmp_path)
    with Session(engine) as session:
        lineage = ancestors(session, product_id=graph.products["mosaic"])
    runs, products = graph.runs, graph.products
    assert set(lineage.runs) == {runs[n] for n in ("cal0", "cal1", "cal2", "grid_all", "grid_pair", "mosaic")}
    assert set(lineage.products) == {products[n] for n in ("mosaic", "g_cube", "g_pair", "c0", "c1", "c2")}
    assert products["c0_old"] not in lineage.products and runs["cal0_old"] not in lineage.runs
    assert set(lineage.packages) == set(graph.packages)
    assert {f.relative_path for f in lineage.files[graph.packages[0]]} == {
        "scan.json",
        "sky.f32",
        "sub/hot.f32",
    }
    assert lineage.used_products[runs["mosaic"]] == tuple(sorted((products["g_cube"], products["g_pair"])))
    assert lineage.used_products[runs["grid_pair"]] == tuple(sorted((products["c0"], products["c1"])))
    assert lineage.used_packages[runs["cal1"]] == (graph.packages[1],)
    assert lineage.generated()[runs["grid_all"]] == [products["g_cube"]]  # g_log is not an ancestor
    assert lineage.root.id == products["mosaic"] and lineage.root.product_type is DataProductType.SCIENCE
    assert lineage.locations[products["c1"]].endswith("c1/cal.f32")
    assert {s.name for s in lineage.steps.values()} == {"calibrate", "grid_map", "mosaic"}
    assert [v.version for v in lineage.software.values()] == ["1.0.0"]
    assert list(lineage.configs.values())[0].parameters == {"calibration_mode": "hot_cold"}
    assert all(r.status is RunStatus.COMPLETED for r in lineage.runs.values())


def test_ancestor_ids_and_package_ids_agree_with_the_full_walk(engine, tmp_path):
    with session_scope(engine) as session:
        graph = build_graph(session, tmp_path)
    with Session(engine) as session:
        full = ancestors(session, product_id=graph.products["g_pair"], include_files=False)
        ids = ancestor_ids(session, product_id=graph.products["g_pair"])
        package_ids = ancestor_package_ids(session, product_id=graph.products["g_pair"])
    assert ids.run_ids == tuple(sorted(full.runs))
    assert set(ids.product_ids) == set(full.products) - {graph.products["g_pair"]}
    assert ids.package_ids == tuple(package_ids) == tuple(sorted(graph.packages[:2]))
    assert full.files == {} and not full.files_included


def test_the_summary_aggregates_the_lineage_per_step(engine, tmp_path):
    with session_scope(engine) as session:
        graph = build_graph(session, tmp_path)
        rebuild_lineage_aggregates(session)  # what registration stores as each attempt completes
    with Session(engine) as session:
        assert session.scalar(select(func.count()).select_from(m.RunLineageStep)) > 0
        summary = lineage_summary(session, product_id=graph.products["mosaic"])
        full = ancestors(session, product_id=graph.products["mosaic"])
        short = lineage_summary(session, product_id=graph.products["mosaic"], package_limit=2)
    assert summary.root == full.root and summary.generated_by == full.runs[graph.runs["mosaic"]]
    assert summary.location == full.locations[graph.products["mosaic"]]
    assert [(s.step.name, s.attempts, s.sub_groups) for s in summary.steps] == [
        ("calibrate", 3, 3),
        ("grid_map", 2, 2),
        ("mosaic", 1, 1),
    ]
    calibrate = summary.steps[0]
    assert (calibrate.software.version, calibrate.config.parameters) == ("1.0.0", {"calibration_mode": "hot_cold"})
    assert calibrate.first_finished_at <= calibrate.last_finished_at
    assert calibrate.last_finished_at == max(r.finished_at for r in full.runs.values() if r.step == "calibrate")
    assert summary.attempt_count == len(full.runs) == 6
    assert summary.product_count == len(full.products) - 1 == 5  # the root is not its own ancestor
    assert summary.package_count == 3 and summary.file_count == 9 and summary.complete
    assert summary.package_bytes == sum(p.size_bytes for p in full.packages.values())
    assert [p.id for p in summary.packages] == sorted(full.packages)
    assert (summary.used_product_count, summary.used_package_count) == (2, 3)
    assert summary.invalidated_packages == ()
    assert not short.complete and [p.id for p in short.packages] == sorted(full.packages)[:2]
    # Without the aggregates registration stores (links written by hand), the summary computes them: the same.
    with session_scope(engine) as session:
        for table in (m.RunLineageStep, m.RunLineageTotal):
            session.execute(delete(table))
    with Session(engine) as session:
        assert lineage_summary(session, product_id=graph.products["mosaic"]) == summary
    with session_scope(engine) as session:
        session.get(m.RawDataPackage, graph.packages[1]).invalidated_reason = "wind"
    with Session(engine) as session:
        summary = lineage_summary(session, product_id=graph.products["mosaic"], package_limit=1)
        with pytest.raises(LineageError, match="data product 999999 is not in ops-db"):
            lineage_summary(session, product_id=999999)
    assert [p.id for p in summary.invalidated_packages] == [graph.packages[1]]


def test_lineage_cli_summarizes_large_lineages(db_url, engine, tmp_path, monkeypatch, capsys):
    from ccat_dagster.provenance import cli as provenance_cli

    with session_scope(engine) as session:
        graph = build_graph(session, tmp_path)
    monkeypatch.setenv("CCAT_OPS_DB_URL", db_url)
    monkeypatch.setenv("CCAT_DAGSTER_DATA_DIR", str(tmp_path / "data"))
    mosaic = str(graph.products["mosaic"])
    assert main(["lineage", mosaic]) == 0
    tree = capsys.readouterr().out
    assert "(shown above)" in tree and "steps (software version and image, config):" in tree
    monkeypatch.setattr(provenance_cli, "TREE_MAX_ATTEMPTS", 5)
    monkeypatch.setattr(provenance_cli, "SUMMARY_PACKAGES", 2)
    assert main(["lineage", mosaic]) == 0
    summary = capsys.readouterr().out
    assert "lineage: 6 attempt(s) in 3 step(s), 5 upstream product(s), 3 raw data package(s)" in summary
    assert "calibrate: 3 attempt(s) over 3 sub-group(s), chai-calibration 1.0.0" in summary
    assert "(the first 2 by id; `--packages-only` lists all)" in summary and "… 1 more" in summary
    assert f" {graph.package_names[0]} (scan " in summary and graph.package_names[2] not in summary
    assert main(["lineage", mosaic, "--tree"]) == 0
    assert capsys.readouterr().out == tree
    assert main(["lineage", mosaic, "--summary", "--files"]) == 2
    assert "use it without --summary" in capsys.readouterr().err


def test_ancestors_of_a_first_step_product_is_its_scan(engine, tmp_path):
    with session_scope(engine) as session:
        graph = build_graph(session, tmp_path)
    with Session(engine) as session:
        lineage = ancestors(session, product_id=graph.products["c2"])
    assert set(lineage.runs) == {graph.runs["cal2"]}
    assert set(lineage.packages) == {graph.packages[2]}
    assert lineage.used_products == {}


def test_descendants_of_a_package_list_the_sub_groups_to_redo(engine, tmp_path):
    with session_scope(engine) as session:
        graph = build_graph(session, tmp_path)
    with Session(engine) as session:
        p0 = descendants_of_package(session, package_id=graph.packages[0])
        p2 = descendants_of_package(session, package_id=graph.packages[2])
    runs, products = graph.runs, graph.products
    assert set(p0.runs) == {runs[n] for n in ("cal0_old", "cal0", "grid_all", "grid_pair", "mosaic")}
    groups = {(g.step, g.sub_group_key): g for g in p0.sub_groups}
    assert list(groups) == [
        ("calibrate", "scan-0"),
        ("grid_map", "all"),
        ("grid_map", "pair"),
        ("mosaic", "all"),
    ]
    calibrate = groups[("calibrate", "scan-0")]
    assert calibrate.needs_redo
    assert calibrate.current_product_ids == (products["c0"],)
    assert calibrate.superseded_product_ids == (products["c0_old"],)
    assert groups[("grid_map", "all")].current_product_ids == tuple(sorted((products["g_cube"], products["g_log"])))
    assert {(g.step, g.sub_group_key) for g in p2.sub_groups} == {
        ("calibrate", "scan-2"),
        ("grid_map", "all"),
        ("mosaic", "all"),
    }
    assert products["g_pair"] not in p2.products


def test_descendants_of_a_product(engine, tmp_path):
    with session_scope(engine) as session:
        graph = build_graph(session, tmp_path)
    with Session(engine) as session:
        impact = descendants_of_product(session, product_id=graph.products["c1"])
        leaf = descendants_of_product(session, product_id=graph.products["mosaic"])
    assert set(impact.runs) == {graph.runs[n] for n in ("grid_all", "grid_pair", "mosaic")}
    assert graph.products["c1"] not in impact.products
    assert leaf.runs == {} and leaf.sub_groups == []


def test_a_sub_group_already_redone_needs_no_redo(engine, tmp_path):
    with session_scope(engine) as session:
        graph = build_graph(session, tmp_path)
        # The mosaic is redone without P0: its old product is superseded by the new one.
        world_step = session.get(m.ExecutedReductionStep, graph.runs["mosaic"])
        new_run = m.ExecutedReductionStep(
            reduction_step_id=world_step.reduction_step_id, sub_group_key="all", attempt=2,
            status=RunStatus.COMPLETED, input_fingerprint="e" * 64,
            reduction_software_version_id=world_step.reduction_software_version_id,
            reduction_step_config_id=world_step.reduction_step_config_id,
        )  # fmt: skip
        session.add(new_run)
        session.flush()
        new_product = m.DataProduct(
            executed_reduction_step_id=new_run.id, reduction_step_id=new_run.reduction_step_id,
            sub_group_key="all", product_type=DataProductType.SCIENCE, relative_path="science/mosaic.fits",
            size_bytes=1, sha256="2" * 64,
        )  # fmt: skip
        session.add(new_product)
        session.flush()
        session.get(m.DataProduct, graph.products["mosaic"]).superseded_by_id = new_product.id
    with Session(engine) as session:
        impact = descendants_of_package(session, package_id=graph.packages[2])
    mosaic = next(g for g in impact.sub_groups if g.step == "mosaic")
    assert not mosaic.needs_redo and mosaic.superseded_product_ids == (graph.products["mosaic"],)


def test_unknown_subjects_raise_lineage_error(engine, tmp_path):
    with session_scope(engine) as session:
        graph = build_graph(session, tmp_path)
    with Session(engine) as session:
        with pytest.raises(LineageError, match="data product 999999 is not in ops-db"):
            ancestors(session, product_id=999999)
        with pytest.raises(LineageError, match="raw data package 999999"):
            descendants_of_package(session, package_id=999999)
        with pytest.raises(LineageError, match="'no-such-scan' is not in ops-db"):
            find_package(session, "no-such-scan")
        assert find_package(session, graph.package_names[1]).id == graph.packages[1]
        assert find_package(session, str(graph.packages[2])).id == graph.packages[2]


def test_id_sets_are_one_parameter_whatever_their_size(engine, tmp_path):
    with session_scope(engine) as session:
        graph = build_graph(session, tmp_path)
    with Session(engine) as session:
        dialect = session.get_bind().dialect.name
        ids = list(range(1, 60_001))  # above SQLite's bound-variable limit (32,766)
        condition = _in_ids(m.RawDataPackage.id, ids, dialect)
        count = session.scalar(select(func.count()).select_from(m.RawDataPackage).where(condition))
    assert count == len(graph.packages) + 1  # the factory world's own package too


# ---------------------------------------------------------------------------------------------- the demo


def test_lineage_cli_of_the_final_map_shows_every_scan(demo_world, capsys):  # noqa: F811
    from ccat_dagster.definitions import build_definitions
    from ccat_dagster.demo.run import run_sensor_until_idle

    require_bwrap_and_numpy()
    log = run_sensor_until_idle(
        defs=build_definitions(demo_world.settings()),
        instance=demo_world.instance(),
        pipeline=PIPELINE,
        echo=lambda _m: None,
    )
    assert all(ok for _step, _label, ok in log.runs)
    engine = make_engine(demo_world.ops_db_url)
    with Session(engine) as session:
        cube = session.scalars(
            select(m.DataProduct)
            .join(m.ReductionStep)
            .where(m.ReductionStep.name == "grid_map", m.DataProduct.relative_path.like("science/%cube%"))
        ).one()
        # Every scan of the grouping: the archived NGC253 CO(4-3) LFA packages.
        scans = session.scalars(
            select(m.RawDataPackage.name)
            .join(m.ExecutedObsUnit)
            .join(m.ObsUnit)
            .join(m.InstrumentModule, m.InstrumentModule.id == m.RawDataPackage.instrument_module_id)
            .where(m.ObsUnit.name == "ngc253-co43", m.InstrumentModule.name == "LFA")
            .where(m.RawDataPackage.state == PackageState.ARCHIVED)
        ).all()
        other = session.scalars(select(m.RawDataPackage.name).where(m.RawDataPackage.name.not_in(scans))).all()
    engine.dispose()
    assert len(scans) >= 3

    assert main(["lineage", str(cube.id)]) == 0
    tree = capsys.readouterr().out
    for name in scans:
        assert f" {name} (scan " in tree, f"scan {name} missing from the lineage summary"
    assert not [name for name in other if name in tree]
    assert "generated by attempt" in tree and "grid_map [all]" in tree and "chai-calibration 1.0.0" in tree

    assert main(["lineage", str(cube.id), "--packages-only"]) == 0
    listed = capsys.readouterr().out
    assert f"raw data packages (scans) of product #{cube.id}: {len(scans)}" in listed

    assert main(["impact", scans[0]]) == 0
    impact = capsys.readouterr().out
    assert f"{PIPELINE}/grid_map [all]" in impact and f"{PIPELINE}/calibrate [scan=" in impact

    assert main(["lineage", "999999"]) == 2
    assert "data product 999999 is not in ops-db" in capsys.readouterr().err
