"""ops-db schema: migrations from empty, model round-trips and the constraints that keep data safe."""

from __future__ import annotations

import pytest
from alembic import command
from sqlalchemy import inspect, select
from sqlalchemy.exc import IntegrityError, StatementError
from sqlalchemy.orm import Session

from ccat_dagster.execution.registration import record_lineage_aggregates
from ccat_dagster.opsdb import models as m
from ccat_dagster.opsdb.engine import make_engine
from ccat_dagster.opsdb.enums import PackageState, PhysicalCopyStatus, RunStatus
from ccat_dagster.opsdb.migrate import alembic_config, current_revision, head_revision, upgrade

from .opsdb_factories import copy_of, make_attempt, make_product, make_world


def test_migrations_create_every_model_table_from_empty(fresh_pg_url, tmp_path):
    for url in (fresh_pg_url, f"sqlite:///{tmp_path / 'empty.sqlite'}"):
        upgrade(url)
        upgrade(url)  # a second run is harmless
        assert current_revision(url) == head_revision()
        engine = make_engine(url)
        tables = set(inspect(engine).get_table_names())
        engine.dispose()
        assert set(m.Base.metadata.tables) <= tables, set(m.Base.metadata.tables) - tables


def test_migrated_schema_matches_the_models(db_url):
    """Alembic autogenerate finds nothing to add: the migrations and the models describe the same schema."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    engine = make_engine(db_url)
    with engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), m.Base.metadata)
    engine.dispose()
    assert diff == []


def _closure_rows(engine) -> tuple[set[tuple], ...]:
    """The closure and aggregate rows: (run_ancestor_run, run_ancestor_package, run_lineage_step,
    run_lineage_total)."""
    tables = (m.run_ancestor_run, m.run_ancestor_package, m.RunLineageStep.__table__, m.RunLineageTotal.__table__)
    with engine.connect() as connection:
        return tuple(set(connection.execute(select(table)).tuples()) for table in tables)


def test_migration_0002_backfills_the_closure_registration_writes(db_url, tmp_path):
    """Down to 0001 drops the closure tables; up again recomputes them from the link tables (what an existing
    ops-db gets), and the result equals what registration wrote attempt by attempt."""
    from .test_lineage import build_graph

    engine = make_engine(db_url)
    with Session(engine) as session, session.begin():
        graph = build_graph(session, tmp_path)
        for run_id in graph.runs.values():  # what registration adds when each attempt completes
            record_lineage_aggregates(session, attempt_id=run_id)
    written = _closure_rows(engine)
    engine.dispose()
    mosaic, packages = graph.runs["mosaic"], set(graph.packages)
    assert {a for r, a in written[0] if r == mosaic} == {
        graph.runs[n] for n in ("cal0", "cal1", "cal2", "grid_all", "grid_pair")
    }
    assert {p for r, p in written[1] if r == mosaic} == packages
    assert {(row[1], row[4], row[5]) for row in written[2] if row[0] == mosaic} == {
        (graph_step, attempts, attempts) for graph_step, attempts in _ancestor_steps(engine_url=db_url, graph=graph)
    }
    assert {row[1:] for row in written[3] if row[0] == mosaic} == {(5, 3, sum_bytes(db_url, packages), 9)}

    command.downgrade(alembic_config(db_url), "0001")
    engine = make_engine(db_url)
    assert not {"run_ancestor_run", "run_ancestor_package"} & set(inspect(engine).get_table_names())
    engine.dispose()
    upgrade(db_url)
    engine = make_engine(db_url)
    assert _closure_rows(engine) == written
    engine.dispose()


def _ancestor_steps(*, engine_url, graph) -> set[tuple[int, int]]:
    """(step id, number of attempts) among the mosaic's ancestors in ``build_graph``: 3 calibrate, 2 grid."""
    engine = make_engine(engine_url)
    with Session(engine) as session:
        step_of = {
            name: session.get(m.ExecutedReductionStep, run).reduction_step_id for name, run in graph.runs.items()
        }
    engine.dispose()
    return {(step_of["cal0"], 3), (step_of["grid_all"], 2)}


def sum_bytes(engine_url, package_ids) -> int:
    engine = make_engine(engine_url)
    with Session(engine) as session:
        total = sum(session.get(m.RawDataPackage, p).size_bytes for p in package_ids)
    engine.dispose()
    return total


def test_every_model_round_trips(engine):
    with Session(engine) as session, session.begin():
        world = make_world(session)
        attempt = make_attempt(session, world)
        attempt.input_packages.append(world.package)
        product = make_product(session, attempt)
        session.add(copy_of(product, world.processing))
        session.add(m.StagingJob(target_location=world.processing, packages=[world.package]))
        session.add(m.GroupingPreset(name="per-scan", group_by=["executed_obs_unit"]))
        package_id, product_id = world.package.id, product.id

    with Session(engine) as session:
        package = session.get(m.RawDataPackage, package_id)
        assert package.state is PackageState.ARCHIVED
        assert package.metadata_ == {"observation": {"frequency_ghz": 461.04}}
        assert package.executed_obs_unit.obs_unit.source.name == "NGC253"
        assert package.instrument_module.instrument.name == "CHAI"
        assert package.files[0].relative_path == "scan.json"
        assert package.executed_obs_unit.start_time.tzinfo is not None
        product = session.get(m.DataProduct, product_id)
        run = product.executed_reduction_step
        assert run.status is RunStatus.PENDING
        assert [p.id for p in run.input_packages] == [package_id]
        assert run.step.pipeline.data_grouping.filter_rules[0]["value"] == "NGC253"
        final = session.scalars(select(m.ReductionStep).where(m.ReductionStep.name == "grid_map")).one()
        assert [s.name for s in final.depends_on] == ["calibrate"]
        assert product.physical_copies[0].status is PhysicalCopyStatus.PRESENT
        staging = session.scalars(select(m.StagingJob)).one()
        assert staging.packages[0].id == package_id
        assert session.scalars(select(m.GroupingPreset)).one().group_by == ["executed_obs_unit"]
        # Enums are stored as their lower-case values.
        raw = session.execute(select(m.RawDataPackage.__table__.c.state)).scalar_one()
        assert raw == "archived"


@pytest.mark.parametrize(
    "duplicate",
    ["pipeline_name", "package_name", "product_path", "attempt_number", "copy_per_location", "step_name"],
)
def test_constraints_reject_duplicates(engine, duplicate):
    with Session(engine) as session, session.begin():
        world = make_world(session)
        attempt = make_attempt(session, world, status=RunStatus.FAILED)
        product = make_product(session, attempt)
        session.add(copy_of(product, world.processing))
    with pytest.raises(IntegrityError), Session(engine) as session, session.begin():
        world = session.merge(world.pipeline)
        if duplicate == "pipeline_name":
            session.add(
                m.Pipeline(
                    name=world.name,
                    data_grouping_id=world.data_grouping_id,
                    processing_location_id=world.processing_location_id,
                )
            )
        elif duplicate == "package_name":
            package = session.scalars(select(m.RawDataPackage)).one()
            session.add(
                m.RawDataPackage(
                    name=package.name,
                    executed_obs_unit_id=package.executed_obs_unit_id,
                    instrument_module_id=package.instrument_module_id,
                )
            )
        elif duplicate == "product_path":
            existing = session.scalars(select(m.DataProduct)).one()
            session.add(
                m.DataProduct(
                    executed_reduction_step_id=existing.executed_reduction_step_id,
                    reduction_step_id=existing.reduction_step_id,
                    sub_group_key="all",
                    product_type="science",
                    relative_path=existing.relative_path,
                    size_bytes=1,
                    sha256="2" * 64,
                )
            )
        elif duplicate == "attempt_number":
            existing = session.scalars(select(m.ExecutedReductionStep)).one()
            session.add(
                m.ExecutedReductionStep(
                    reduction_step_id=existing.reduction_step_id,
                    sub_group_key=existing.sub_group_key,
                    attempt=existing.attempt,
                    status=RunStatus.FAILED,
                    input_fingerprint="x",
                    reduction_software_version_id=existing.reduction_software_version_id,
                    reduction_step_config_id=existing.reduction_step_config_id,
                )
            )
        elif duplicate == "copy_per_location":
            existing = session.scalars(select(m.PhysicalCopy)).one()
            session.add(
                m.PhysicalCopy(
                    data_location_id=existing.data_location_id,
                    data_product_id=existing.data_product_id,
                    path="again",
                    status=PhysicalCopyStatus.PRESENT,
                )
            )
        elif duplicate == "step_name":
            step = session.scalars(select(m.ReductionStep).where(m.ReductionStep.name == "calibrate")).one()
            session.add(
                m.ReductionStep(
                    pipeline_id=step.pipeline_id,
                    name="calibrate",
                    version_spec="1",
                    reduction_software_id=step.reduction_software_id,
                    reduction_step_config_id=step.reduction_step_config_id,
                )
            )
        session.flush()


def test_only_one_attempt_in_flight_per_step_and_sub_group(engine):
    with Session(engine) as session, session.begin():
        world = make_world(session)
        make_attempt(session, world, key="scan-1", attempt=1, status=RunStatus.FAILED)
        make_attempt(session, world, key="scan-1", attempt=2, status=RunStatus.RUNNING)
        make_attempt(session, world, key="scan-2", attempt=1, status=RunStatus.PENDING)  # other sub-group: fine
    with pytest.raises(IntegrityError), Session(engine) as session, session.begin():
        world_step = session.scalars(select(m.ReductionStep).where(m.ReductionStep.name == "calibrate")).one()
        first = session.scalars(select(m.ExecutedReductionStep)).first()
        session.add(
            m.ExecutedReductionStep(
                reduction_step_id=world_step.id,
                sub_group_key="scan-1",
                attempt=3,
                status=RunStatus.PENDING,
                input_fingerprint="y",
                reduction_software_version_id=first.reduction_software_version_id,
                reduction_step_config_id=first.reduction_step_config_id,
            )
        )
        session.flush()


def test_physical_copy_is_of_exactly_one_thing(engine):
    with Session(engine) as session, session.begin():
        world = make_world(session)
        location_id = world.processing.id
    with pytest.raises(IntegrityError), Session(engine) as session, session.begin():
        session.add(m.PhysicalCopy(data_location_id=location_id, path="x", status=PhysicalCopyStatus.PRESENT))
        session.flush()


def test_foreign_keys_are_enforced(engine):
    with pytest.raises(IntegrityError), Session(engine) as session, session.begin():
        session.add(m.InstrumentModule(name="ghost", instrument_id=999_999))
        session.flush()


def test_invalid_enum_value_is_rejected(engine):
    with pytest.raises(StatementError, match="'lost' is not among the defined enum values"):
        with Session(engine) as session, session.begin():
            world = make_world(session)
            world.package.state = "lost"
            session.flush()
