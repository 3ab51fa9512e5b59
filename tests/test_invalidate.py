"""Invalidating a raw data package: one transaction that marks the package and what derives from it, retires
the sub-groups left empty, and makes the next sensor tick re-run exactly the affected sub-groups without it.
The demo chain test also checks the Dagster side of provenance (data version = input fingerprint,
materialization metadata, what Dagster shows as stale)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.definitions.data_version import StaleStatus
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from ccat_dagster.cli import main
from ccat_dagster.execution.registration import record_input_lineage, register_attempt_results
from ccat_dagster.execution.triggers import TickCursor, _packages_covered_by_consumers, evaluate_tick
from ccat_dagster.grouping.engine import resolve
from ccat_dagster.opsdb import models as m
from ccat_dagster.opsdb.engine import make_engine, session_scope
from ccat_dagster.opsdb.enums import PackageState, PhysicalCopyStatus, RunStatus, VersionPolicy
from ccat_dagster.opsdb.lineage import LineageError, ancestor_package_ids, ancestors
from ccat_dagster.opsdb.states import transition
from ccat_dagster.provenance import invalidate as invalidate_module
from ccat_dagster.provenance.invalidate import InvalidationError, invalidate_package
from ccat_dagster.provenance.prov import lineage_to_prov_json, validate_prov_json

from .dagster_fixtures import (  # noqa: F401
    PIPELINE,
    demo_world,
    execute_request,
    request_step,
    require_bwrap_and_numpy,
)
from .execution_factories import HAPPY_PATH, sha256, write_product
from .opsdb_factories import T0, make_world
from .test_lineage import build_graph

NOW = dt.datetime(2026, 12, 1, 12, tzinfo=dt.UTC)


def _copy_status(session: Session, product_id: int) -> PhysicalCopyStatus:
    return session.scalars(select(m.PhysicalCopy.status).where(m.PhysicalCopy.data_product_id == product_id)).one()


def test_invalidate_marks_derived_products_and_retires_empty_sub_groups(engine, tmp_path):
    with session_scope(engine) as session:
        graph = build_graph(session, tmp_path)
    p0, p1, p2 = graph.packages
    products = graph.products
    with session_scope(engine) as session:
        result = invalidate_package(session, package=graph.package_names[2], reason="bad pointing", now=NOW)
    assert not result.already_invalidated and result.package_id == p2
    assert set(result.marked_product_ids) == {products[n] for n in ("c2", "g_cube", "g_log", "mosaic")}
    groups = {(g.step, g.sub_group_key): g for g in result.affected}
    assert set(groups) == {("calibrate", "scan-2"), ("grid_map", "all"), ("mosaic", "all")}
    assert not groups[("calibrate", "scan-2")].reruns
    assert groups[("grid_map", "all")].remaining_package_ids == (p0, p1)
    assert groups[("mosaic", "all")].reruns
    assert result.in_flight_run_ids == ()

    with Session(engine) as session:
        package = session.get(m.RawDataPackage, p2)
        assert package.invalidated_reason == "bad pointing" and package.updated_at == NOW
        # No other package is touched: the sensor finds the consumers through the lineage closure.
        assert session.get(m.RawDataPackage, p0).updated_at != NOW
        assert session.get(m.RawDataPackage, p1).updated_at != NOW
        cube = session.get(m.DataProduct, products["g_cube"])
        mark = cube.metadata_["invalidated"]
        assert mark["reason"] == "bad pointing" and mark["packages"][0]["id"] == p2
        assert cube.superseded_by_id is None  # superseded by the re-run, not here
        assert "invalidated" not in session.get(m.DataProduct, products["g_pair"]).metadata_
        assert _copy_status(session, products["c2"]) is PhysicalCopyStatus.DELETION_POSSIBLE
        assert (
            "invalidated: bad pointing"
            in session.scalars(
                select(m.PhysicalCopy.status_reason).where(m.PhysicalCopy.data_product_id == products["c2"])
            ).one()
        )
        assert _copy_status(session, products["g_cube"]) is PhysicalCopyStatus.PRESENT
        # The grouping engine no longer counts it as a member.
        members = {p for g in resolve(session, filter_rules=[], group_by=[]) for p in g.package_ids}
        assert p2 not in members and {p0, p1} <= members
        # Lineage stays readable: the old mosaic still derives from the invalidated scan.
        assert p2 in ancestor_package_ids(session, product_id=products["mosaic"])

    with session_scope(engine) as session:
        again = invalidate_package(session, package=p2, reason="other reason", now=NOW + dt.timedelta(hours=1))
    assert again.already_invalidated and again.reason == "bad pointing" and again.affected == ()


def test_a_second_invalidation_adds_to_the_mark(engine, tmp_path):
    with session_scope(engine) as session:
        graph = build_graph(session, tmp_path)
    with session_scope(engine) as session:
        invalidate_package(session, package=graph.packages[2], reason="bad pointing", now=NOW)
    with session_scope(engine) as session:
        second = invalidate_package(session, package=graph.packages[1], reason="wind", now=NOW)
    with Session(engine) as session:
        mark = session.get(m.DataProduct, graph.products["g_cube"]).metadata_["invalidated"]
    assert [p["id"] for p in mark["packages"]] == [graph.packages[2], graph.packages[1]]
    assert mark["reason"] == "wind"
    groups = {(g.step, g.sub_group_key): g for g in second.affected}
    assert groups[("grid_map", "all")].remaining_package_ids == (graph.packages[0],)
    assert groups[("grid_map", "pair")].remaining_package_ids == (graph.packages[0],)


def test_invalidation_is_all_or_nothing(engine, tmp_path, monkeypatch):
    with session_scope(engine) as session:
        graph = build_graph(session, tmp_path)

    def explode(*_args, **_kwargs):
        raise RuntimeError("crash after marking")

    monkeypatch.setattr(invalidate_module, "_retire_intermediate_copies", explode)
    with pytest.raises(RuntimeError, match="crash after marking"):
        with session_scope(engine) as session:
            invalidate_package(session, package=graph.packages[2], reason="bad", now=NOW)
    with Session(engine) as session:
        assert session.get(m.RawDataPackage, graph.packages[2]).invalidated_reason is None
        assert "invalidated" not in session.get(m.DataProduct, graph.products["g_cube"]).metadata_
        assert _copy_status(session, graph.products["c2"]) is PhysicalCopyStatus.PRESENT


def test_bad_requests_are_refused(engine, tmp_path):
    with session_scope(engine) as session:
        graph = build_graph(session, tmp_path)
    with session_scope(engine) as session:
        with pytest.raises(InvalidationError, match="the reason is empty"):
            invalidate_package(session, package=graph.packages[0], reason="   ")
        with pytest.raises(InvalidationError, match="keep it under"):
            invalidate_package(session, package=graph.packages[0], reason="x" * 5000)
        with pytest.raises(LineageError, match="'nope' is not in ops-db"):
            invalidate_package(session, package="nope", reason="bad")


def test_cli_dry_run_writes_nothing(db_url, engine, tmp_path, monkeypatch, capsys):
    with session_scope(engine) as session:
        graph = build_graph(session, tmp_path)
    monkeypatch.setenv("CCAT_OPS_DB_URL", db_url)
    monkeypatch.setenv("CCAT_DAGSTER_DATA_DIR", str(tmp_path / "data"))
    package = graph.package_names[2]
    assert main(["invalidate", package, "--reason", "bad pointing", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("DRY RUN, nothing written") and "would mark 4 current product(s)" in out
    with Session(engine) as session:
        assert session.get(m.RawDataPackage, graph.packages[2]).invalidated_reason is None
        assert _copy_status(session, graph.products["c2"]) is PhysicalCopyStatus.PRESENT
    assert main(["invalidate", package, "--reason", "bad pointing"]) == 0
    out = capsys.readouterr().out
    assert "invalidated: bad pointing" in out and "marked 4 current product(s)" in out
    assert "grid_map [all]: 2 remaining member(s)" in out
    assert main(["invalidate", package, "--reason", "again"]) == 0
    assert "already invalidated" in capsys.readouterr().out
    assert main(["invalidate", package, "--reason", ""]) == 2
    assert "the reason is empty" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- sensor ticks


SCANS_PER_NIGHT = 3


def _four_step_pipeline(session: Session) -> tuple[int, list[int]]:
    """calibrate (per scan) → baseline (per scan) → grid (per night) → mosaic (all) over 2 nights of 3 scans,
    plus the factory world's own scan (night 1). Returns the pipeline id and the package ids."""
    world = make_world(session)
    world.pipeline.steps.clear()  # the factory's 2-step pipeline is replaced by a 4-step one
    session.flush()
    obs_unit = world.package.executed_obs_unit.obs_unit
    packages = [world.package]
    for index in range(2 * SCANS_PER_NIGHT):
        start = T0 + dt.timedelta(days=index // SCANS_PER_NIGHT, minutes=10 * (index + 1))
        packages.append(
            m.RawDataPackage(
                name=f"chai-lfa-tick-{index}",
                executed_obs_unit=m.ExecutedObsUnit(obs_unit=obs_unit, start_time=start),
                instrument_module=world.module,
                size_bytes=1024,
                checksum=sha256(f"tick-{index}".encode()),
                state=PackageState.ARCHIVED,
            )
        )
    session.add_all(packages)
    steps: list[m.ReductionStep] = []
    for position, (name, group_by) in enumerate(
        (
            ("calibrate", ["executed_obs_unit"]),
            ("baseline", ["executed_obs_unit"]),
            ("grid", ["obs_date"]),
            ("mosaic", []),
        )
    ):
        steps.append(
            m.ReductionStep(
                pipeline=world.pipeline, name=name, position=position, group_by=group_by,
                software=world.software_version.software, version_policy=VersionPolicy.EXACT, version_spec="1.0.0",
                config=world.config, depends_on=steps[-1:],
            )
        )  # fmt: skip
    session.add_all(steps)
    session.flush()
    return world.pipeline.id, [p.id for p in packages]


def _execute_plans(session: Session, result, base: Path) -> None:
    """What the runner does for each requested sub-group, without a container: create the attempt with its
    links (and closure), walk it to COLLECTING_RESULTS, register one product whose content is the
    fingerprint (so downstream fingerprints change when inputs do)."""
    location = session.scalars(select(m.DataLocation).where(m.DataLocation.name == "processing")).one()
    for request in result.requests:
        for plan in request.plans:
            previous = session.scalar(
                select(func.max(m.ExecutedReductionStep.attempt)).where(
                    m.ExecutedReductionStep.reduction_step_id == plan.step_id,
                    m.ExecutedReductionStep.sub_group_key == plan.sub_group_key,
                )
            )
            attempt = m.ExecutedReductionStep(
                reduction_step_id=plan.step_id, sub_group_key=plan.sub_group_key, attempt=(previous or 0) + 1,
                input_fingerprint=plan.fingerprint, reduction_software_version_id=plan.software_version_id,
                reduction_step_config_id=plan.config_id,
            )  # fmt: skip
            session.add(attempt)
            session.flush()
            upstream = [u.product_id for u in plan.upstream_products]
            record_input_lineage(session, attempt=attempt, package_ids=plan.package_ids, product_ids=upstream)
            for status in HAPPY_PATH[:-1]:
                transition(session, attempt, status)
            product = write_product(
                base / str(attempt.id), f"{plan.step_name}.out", plan.fingerprint.encode(), "intermediate"
            )
            register_attempt_results(
                session, attempt=attempt, discovered=[product], processing_location_id=location.id,
                input_package_ids=plan.package_ids, input_product_ids=upstream,
            )  # fmt: skip


def _tick_until_idle(engine, pipeline_id: int, cursor: TickCursor, base: Path) -> tuple[TickCursor, list[set]]:
    """Ticks (each followed by running what it requested) until a tick requests nothing; the requested
    (step, sub_group_key) of each tick."""
    ticks = []
    for _ in range(10):
        with session_scope(engine) as session:
            result = evaluate_tick(session, session.get(m.Pipeline, pipeline_id), cursor, now=m.utcnow())
            cursor = result.cursor
            requested = {(r.step_name, plan.sub_group_key) for r in result.requests for plan in r.plans}
            if not requested:
                return cursor, ticks
            ticks.append(requested)
            _execute_plans(session, result, base)
    raise AssertionError(f"the sensor did not become idle: {ticks}")


def test_the_next_ticks_rerun_exactly_the_affected_sub_groups_at_every_step(engine, tmp_path):
    with session_scope(engine) as session:
        pipeline_id, packages = _four_step_pipeline(session)
    cursor, ticks = _tick_until_idle(engine, pipeline_id, TickCursor(), tmp_path)
    everything = set().union(*ticks)
    assert {step for step, _ in everything} == {"calibrate", "baseline", "grid", "mosaic"}
    assert len(everything) == 2 * len(packages) + 2 + 1  # 7 scans × 2 per-scan steps, 2 nights, all

    bad = packages[2]  # a scan of night 1, which keeps other scans
    with Session(engine) as session:
        night_of = {
            package: key
            for key, package in session.execute(
                select(m.ExecutedReductionStep.sub_group_key, m.run_ancestor_package.c.raw_data_package_id)
                .join(m.run_ancestor_package)
                .join(m.ReductionStep)
                .where(m.ReductionStep.name == "grid")
            )
        }
        before = {p.id: p.updated_at for p in session.scalars(select(m.RawDataPackage))}
    with session_scope(engine) as session:
        result = invalidate_package(session, package=bad, reason="pointing off")
    assert {(g.step, g.sub_group_key, g.reruns) for g in result.affected} == {
        ("calibrate", result.affected[0].sub_group_key, False),
        ("baseline", result.affected[0].sub_group_key, False),
        ("grid", night_of[bad], True),
        ("mosaic", "all", True),
    }
    with Session(engine) as session:
        after = {p.id: p.updated_at for p in session.scalars(select(m.RawDataPackage))}
        assert {p for p in after if after[p] != before[p]} == {bad}  # nothing else touched
        # The sensor's way from the bad package to its consumers: one member per consuming attempt, at any step.
        pipeline = session.get(m.Pipeline, pipeline_id)
        covered = _packages_covered_by_consumers(session, pipeline, [bad])
        # calibrate/baseline [bad scan] have no valid member left; grid [night 1] and mosaic [all] both give
        # their lowest valid member, the factory's scan of night 1.
        assert covered == {packages[0]} and night_of[packages[0]] == night_of[bad]

    cursor, ticks = _tick_until_idle(engine, pipeline_id, cursor, tmp_path)
    # The night re-runs first (the mosaic waits for it), then the mosaic; nothing per scan, not the other night.
    assert ticks == [{("grid", night_of[bad])}, {("mosaic", "all")}]
    with Session(engine) as session:
        assert bad not in ancestor_package_ids(session, product_id=_current_product(session, "mosaic"))
        assert set(ancestor_package_ids(session, product_id=_current_product(session, "mosaic"))) == set(packages) - {
            bad
        }


def _current_product(session: Session, step: str) -> int:
    return session.scalars(
        select(m.DataProduct.id)
        .join(m.ReductionStep)
        .where(m.ReductionStep.name == step, m.DataProduct.superseded_by_id.is_(None))
    ).one()


# ---------------------------------------------------------------------------------------------- the demo


def _tick(defs, instance, cursor):
    from ccat_dagster.sensors.gaps import sensor_name

    context = dg.build_sensor_context(instance=instance, cursor=cursor, definitions=defs)
    result = defs.get_sensor_def(sensor_name(PIPELINE))(context)
    for request in result.dynamic_partitions_requests or []:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    return result


def _requested(instance, result) -> set[tuple[str, str]]:
    """(step, sub_group_key) of every run request of a tick."""
    from ccat_dagster.assets.factory import partitions_name

    requested = set()
    for request in result.run_requests:
        step = request_step(request)
        if request.partition_key:
            requested.add((step, request.partition_key))
            continue
        keys = instance.get_dynamic_partitions(partitions_name(PIPELINE, ("scan",)))
        start = keys.index(request.tags["dagster/asset_partition_range_start"])
        end = keys.index(request.tags["dagster/asset_partition_range_end"])
        requested.update((step, key) for key in keys[start : end + 1])
    return requested


def _execute(defs, instance, result) -> None:
    for request in result.run_requests:
        outcome = execute_request(defs, instance, request)
        assert outcome.success, f"{request_step(request)} failed"


def _until_idle(defs, instance, cursor, max_ticks=8):
    runs = []
    for _ in range(max_ticks):
        result = _tick(defs, instance, cursor)
        cursor = result.cursor
        if not result.run_requests:
            return cursor, runs, result
        runs.extend(sorted(_requested(instance, result)))
        _execute(defs, instance, result)
    raise AssertionError("the sensor did not become idle")


def _stale(instance, defs, step, partition):
    # Dagster's own staleness resolver (what the UI's "stale" badge shows); private API, tests only.
    from dagster._core.definitions.data_version import CachingStaleStatusResolver
    from dagster._core.loader import LoadingContextForTest

    resolver = CachingStaleStatusResolver(instance, defs.resolve_asset_graph(), LoadingContextForTest(instance))
    key = dg.AssetKey([PIPELINE, step])
    return resolver.get_status(key, partition), [c.reason for c in resolver.get_stale_causes(key, partition)]


def _grid_map_event(instance):
    return instance.get_latest_materialization_event(dg.AssetKey([PIPELINE, "grid_map"])).asset_materialization


def _set_grid_map_cooldown(url: str, seconds: int) -> None:
    engine = make_engine(url)
    with session_scope(engine) as session:
        session.execute(
            update(m.ReductionStep).where(m.ReductionStep.name == "grid_map").values(cooldown_seconds=seconds)
        )
    engine.dispose()


def test_invalidating_a_scan_reruns_exactly_the_affected_sub_groups(demo_world, capsys):  # noqa: F811
    from ccat_dagster.definitions import build_definitions
    from ccat_dagster.demo.seed import archive_waiting_packages

    require_bwrap_and_numpy()
    defs = build_definitions(demo_world.settings())
    instance = demo_world.instance()
    cursor, runs, _ = _until_idle(defs, instance, None)
    scan_keys = {key for step, key in runs if step == "calibrate"}
    assert {step for step, _ in runs} == {"calibrate", "baseline", "grid_map"} and len(scan_keys) >= 3

    # Data version = input fingerprint; the metadata docs/provenance.md lists.
    engine = make_engine(demo_world.ops_db_url)
    with Session(engine) as session:
        old_attempt = session.scalars(
            select(m.ExecutedReductionStep).join(m.ReductionStep).where(m.ReductionStep.name == "grid_map")
        ).one()
        old_cube = session.scalars(
            select(m.DataProduct).where(
                m.DataProduct.executed_reduction_step_id == old_attempt.id,
                m.DataProduct.relative_path.like("science/%cube%"),
            )
        ).one()
        scans_in_map = ancestor_package_ids(session, product_id=old_cube.id)
        old_cube_path = old_cube.physical_copies[0].path
    event = _grid_map_event(instance)
    metadata = {k: getattr(v, "value", v) for k, v in event.metadata.items()}
    assert event.tags["dagster/data_version"] == metadata["input_fingerprint"] == old_attempt.input_fingerprint
    assert metadata["sub_group_members"] == len(scans_in_map) == len(scan_keys)
    assert metadata["ops_db_attempt_id"] == old_attempt.id and metadata["hpc_job_id"]
    assert metadata["product_count"] >= 5 and metadata["product_bytes"] > 0
    assert metadata["software_version"] == "chai-gridding==1.0.0"
    assert Path(metadata["products_dir"], "science").is_dir()
    assert Path(old_cube_path).is_relative_to(metadata["products_dir"])
    assert _stale(instance, defs, "grid_map", "all") == (StaleStatus.FRESH, [])

    # Invalidate one scan: the CLI, one transaction.
    bad_package = scans_in_map[0]
    assert main(["invalidate", str(bad_package), "--reason", "pointing off by 30 arcsec"]) == 0
    assert "grid_map [all]" in capsys.readouterr().out
    with Session(engine) as session:
        bad_key = session.scalars(
            select(m.ExecutedReductionStep.sub_group_key)
            .join(m.ReductionStep)
            .join(m.ExecutedReductionStep.input_packages)
            .where(m.ReductionStep.name == "calibrate", m.RawDataPackage.id == bad_package)
        ).one()

    # Next tick with grid_map's one-day cooldown: nothing runs now, grid_map [all] is deferred.
    deferred = _tick(defs, instance, cursor)
    assert deferred.run_requests == []
    assert "cooldown 1" in deferred.skip_reason.skip_message
    # The same tick with the cooldown at 0 (the test's pipeline copy): exactly grid_map [all].
    _set_grid_map_cooldown(demo_world.ops_db_url, 0)
    tick = _tick(defs, instance, cursor)
    assert _requested(instance, tick) == {("grid_map", "all")}
    assert ("calibrate", bad_key) not in _requested(instance, tick)
    _execute(defs, instance, tick)
    cursor, later_runs, idle = _until_idle(defs, instance, tick.cursor)
    assert later_runs == [], idle.skip_reason

    with Session(engine) as session:
        new_attempt = session.scalars(
            select(m.ExecutedReductionStep)
            .join(m.ReductionStep)
            .where(m.ReductionStep.name == "grid_map", m.ExecutedReductionStep.attempt == 2)
        ).one()
        assert new_attempt.status is RunStatus.COMPLETED
        assert bad_package not in {p.id for p in new_attempt.input_packages}
        new_cube = session.scalars(
            select(m.DataProduct).where(
                m.DataProduct.executed_reduction_step_id == new_attempt.id,
                m.DataProduct.relative_path == old_cube.relative_path,
            )
        ).one()
        old_cube = session.get(m.DataProduct, old_cube.id)
        assert old_cube.superseded_by_id == new_cube.id and old_cube.metadata_["invalidated"]
        assert "invalidated" not in new_cube.metadata_
        new_scans = ancestor_package_ids(session, product_id=new_cube.id)
        assert new_scans == [p for p in scans_in_map if p != bad_package]
        validate_prov_json(lineage_to_prov_json(ancestors(session, product_id=new_cube.id)))

    # Dagster sees the change as a new data version of the `all` partition.
    event = _grid_map_event(instance)
    assert event.tags["dagster/data_version"] == new_attempt.input_fingerprint != old_attempt.input_fingerprint
    assert event.metadata["sub_group_members"].value == len(scans_in_map) - 1
    assert _stale(instance, defs, "grid_map", "all") == (StaleStatus.FRESH, [])

    # New scans join the `all` sub-group: their calibrate/baseline run, grid_map waits for its cooldown, and
    # Dagster marks the grid_map partition stale because upstream partitions have new materializations.
    _set_grid_map_cooldown(demo_world.ops_db_url, 86400)
    with session_scope(engine) as session:
        archived = archive_waiting_packages(session)
    engine.dispose()
    assert archived
    cursor, runs, idle = _until_idle(defs, instance, cursor)
    assert {step for step, _ in runs} == {"calibrate", "baseline"}
    assert "cooldown 1" in idle.skip_reason.skip_message
    status, causes = _stale(instance, defs, "grid_map", "all")
    assert status is StaleStatus.STALE and "has a new dependency materialization" in causes
