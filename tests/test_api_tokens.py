"""API tokens and migration 0007: the secret is never stored, revocation is idempotent, bad names and scopes are
refused with the fix; 0007 creates and drops its table and indexes on PostgreSQL and SQLite. The launch planner
(shared by ``pipelines run`` and the API trigger) refuses what it cannot run, naming it."""

from __future__ import annotations

import uuid

import pytest
from alembic import command
from sqlalchemy import inspect, select
from sqlalchemy.orm import Session

from ccat_dagster.api.auth import TokenError, create_token, hash_token, list_tokens, revoke_token
from ccat_dagster.launch import LaunchError, plan_step_launch
from ccat_dagster.opsdb import models as m
from ccat_dagster.opsdb.engine import make_engine
from ccat_dagster.opsdb.enums import RunStatus
from ccat_dagster.opsdb.migrate import alembic_config, upgrade

from .opsdb_factories import make_attempt, make_world

READ_INDEXES = {
    "ix_executed_reduction_step_step_id",
    "ix_executed_reduction_step_status_id",
    "ix_executed_reduction_step_key_id",
    "ix_executed_reduction_step_created_at",
    "ix_data_product_type_id",
    "ix_data_product_step_id",
}


def _indexes(engine) -> set[str]:  # type: ignore[no-untyped-def]
    inspector = inspect(engine)
    return {
        index["name"] for table in ("executed_reduction_step", "data_product") for index in inspector.get_indexes(table)
    }


def test_migration_0007_adds_and_removes_the_token_table_and_read_indexes(db_url):
    engine = make_engine(db_url)
    assert "api_token" in inspect(engine).get_table_names() and READ_INDEXES <= _indexes(engine)
    engine.dispose()
    command.downgrade(alembic_config(db_url), "0006")
    engine = make_engine(db_url)
    assert "api_token" not in inspect(engine).get_table_names() and not READ_INDEXES & _indexes(engine)
    engine.dispose()
    upgrade(db_url)
    engine = make_engine(db_url)
    assert "api_token" in inspect(engine).get_table_names() and READ_INDEXES <= _indexes(engine)
    engine.dispose()


@pytest.fixture
def shared_engine(pg_url):
    """The session's shared PostgreSQL ops-db (these tests only add rows with names of their own)."""
    engine = make_engine(pg_url)
    yield engine
    engine.dispose()


def test_tokens_store_only_a_hash_and_revoke_idempotently(shared_engine):
    suffix = uuid.uuid4().hex[:8]
    with Session(shared_engine) as session, session.begin():
        info, secret = create_token(session, name=f"ops-db-ui-{suffix}", scope="read")
        row = session.get(m.ApiToken, info.id)
        assert secret.startswith("ccat_") and len(secret) > 40
        assert row.token_sha256 == hash_token(secret) and secret not in (row.prefix, row.token_sha256, row.name)
        assert secret.startswith(row.prefix)
        with pytest.raises(TokenError, match="exists already"):
            create_token(session, name=f"ops-db-ui-{suffix}", scope="write")
        with pytest.raises(TokenError, match="give read or write"):
            create_token(session, name="other", scope="admin")
        with pytest.raises(TokenError, match="1 to 128 characters"):
            create_token(session, name="  ", scope="read")
        first = revoke_token(session, f"ops-db-ui-{suffix}").revoked_at
        assert first is not None and revoke_token(session, str(info.id)).revoked_at == first
        with pytest.raises(TokenError, match="tokens list"):
            revoke_token(session, "nobody")
        assert f"ops-db-ui-{suffix}" in [t.name for t in list_tokens(session)]
        assert "other" not in [t.name for t in list_tokens(session)]


def test_the_launch_planner_names_what_it_cannot_run(shared_engine):
    with Session(shared_engine) as session, session.begin():
        world = make_world(session, suffix=uuid.uuid4().hex[:8])
        # Only this world's scan: the shared database holds other tests' NGC253 packages too.
        source = world.package.executed_obs_unit.obs_unit.source.name
        world.grouping.filter_rules = [{"table": "Source", "column": "name", "operator": "eq", "value": source}]
        session.flush()
        name = world.pipeline.name
        with pytest.raises(LaunchError, match="no step 'nope'; its steps: calibrate, grid_map"):
            plan_step_launch(session, pipeline_name=name, step_name="nope")
        with pytest.raises(LaunchError, match="'missing' is empty"):
            plan_step_launch(session, pipeline_name=name, step_name="calibrate", sub_group_keys=["missing"])
        key = f"executed_obs_unit={world.package.executed_obs_unit_id}"
        make_attempt(session, world, key=key, status=RunStatus.RUNNING)
        with pytest.raises(LaunchError, match="is in_flight"):
            plan_step_launch(session, pipeline_name=name, step_name="calibrate", sub_group_keys=[key])
        world.pipeline.enabled = False
        session.flush()
        with pytest.raises(LaunchError, match="is disabled"):
            plan_step_launch(session, pipeline_name=name, step_name="calibrate")
        assert session.scalar(select(m.Pipeline.enabled).where(m.Pipeline.name == name)) is False


def test_the_tokens_cli_shows_the_secret_once(sqlite_url, monkeypatch, capsys):
    from ccat_dagster.cli import main

    monkeypatch.setenv("CCAT_OPS_DB_URL", sqlite_url)
    assert main(["api", "tokens", "create", "ops-db-ui", "--scope", "write"]) == 0
    secret = capsys.readouterr().out.splitlines()[-1]
    assert secret.startswith("ccat_")
    assert main(["api", "tokens", "list", "--json"]) == 0
    listed = capsys.readouterr().out
    assert '"ops-db-ui"' in listed and '"write"' in listed and secret not in listed
    assert main(["api", "tokens", "revoke", "ops-db-ui"]) == 0
    assert "revoked" in capsys.readouterr().out
    assert (
        main(["api", "tokens", "create", "x", "--scope", "read"]) == 0
        and main(["api", "tokens", "revoke", "nope"]) == 2
    )
    assert "tokens list" in capsys.readouterr().err
