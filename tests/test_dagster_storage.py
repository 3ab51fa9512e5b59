"""``PooledPostgresStorage``: the Dagster instance storage that keeps a connection pool in every process.

On a fresh PostgreSQL database: dagster.yaml loads with it (URL or postgres_db block, with and without the pool
keys), its run, event-log and schedule engines pool, a partitioned run plus 50 events open a handful of
connections where the stock ``storage: postgres`` opens one or two per storage call, a connection the server
killed is replaced instead of failing the next call, bad pool values fail with the key named, and the
repository's own dagster.yaml loads with it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.storage.event_log import EventLogStorage
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG
from dagster._serdes import ConfigurableClassData
from sqlalchemy import create_engine, event, make_url, pool, text

from ccat_dagster.dagster_storage import (
    DEFAULT_POOL_MAX_OVERFLOW,
    DEFAULT_POOL_RECYCLE_SECONDS,
    DagsterStorageConfigError,
    PooledPostgresStorage,
)

from .conftest import PG_ADMIN_URL, PRODUCTION_DAGSTER_YAML, create_pg_database, drop_pg_database

pytestmark = pytest.mark.postgres

PARTITION_KEYS = [f"p{index:03d}" for index in range(50)]
EVENTS = 50
# A pooled process opens about one connection per sub-storage, plus an overflow one per batch of asset events with
# indexed tags (dagster-postgres checks for the tags table on a second connection while the first is held).
MAX_POOLED_CONNECTS = 6


@pytest.fixture(scope="module")
def dagster_pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for the Dagster instance (dagster-postgres wants a URL without +driver)."""
    url = create_pg_database("ccat_test_dagster_storage")
    yield url.replace("+psycopg2", "")
    drop_pg_database(url)


def pooled_yaml(connection: str, *, pool_keys: str = "") -> str:
    return (
        "storage:\n  custom:\n    module: ccat_dagster.dagster_storage\n    class: PooledPostgresStorage\n"
        f"    config:\n{connection}{pool_keys}telemetry:\n  enabled: false\n"
    )


def plain_yaml(dagster_pg_url: str) -> str:
    return f"storage:\n  postgres:\n    postgres_url: {dagster_pg_url}\ntelemetry:\n  enabled: false\n"


def load_instance(home: Path, dagster_yaml: str) -> dg.DagsterInstance:
    home.mkdir(exist_ok=True)
    (home / "dagster.yaml").write_text(dagster_yaml)
    return dg.DagsterInstance.from_config(str(home))


def storages(instance: dg.DagsterInstance) -> dict:
    return {
        "runs": instance.run_storage,
        "event log": instance.event_log_storage,
        "schedules": instance.schedule_storage,
    }


@dataclass
class ConnectCounter:
    """New DBAPI connections the instance's three storage engines open (SQLAlchemy's pool "connect" event)."""

    by_storage: dict[str, int] = field(default_factory=dict)

    @classmethod
    def attach(cls, instance: dg.DagsterInstance) -> ConnectCounter:
        counter = cls()
        for name, storage in storages(instance).items():
            counter.by_storage[name] = 0
            # dagster-postgres keeps its engine in _engine; optimize_for_webserver rebinds the same attribute.
            event.listen(storage._engine, "connect", counter._counting(name))
        return counter

    def _counting(self, name: str):  # type: ignore[no-untyped-def]
        def count(dbapi_connection, connection_record) -> None:  # type: ignore[no-untyped-def]
            self.by_storage[name] += 1

        return count

    @property
    def total(self) -> int:
        return sum(self.by_storage.values())


@dg.asset(
    partitions_def=dg.StaticPartitionsDefinition(PARTITION_KEYS),
    backfill_policy=dg.BackfillPolicy.single_run(),
)
def many_partitions() -> None:
    """One run over all partitions: Dagster writes an ASSET_MATERIALIZATION_PLANNED event per partition."""


def storage_workload(instance: dg.DagsterInstance) -> None:
    """What the daemon and a run worker do: create a run over 50 partitions, run it, store events, read back."""
    result = dg.materialize(
        [many_partitions],
        instance=instance,
        tags={ASSET_PARTITION_RANGE_START_TAG: PARTITION_KEYS[0], ASSET_PARTITION_RANGE_END_TAG: PARTITION_KEYS[-1]},
    )
    assert result.success
    for index in range(EVENTS):
        instance.report_runless_asset_event(dg.AssetMaterialization("ccat_storage_probe", metadata={"index": index}))
    instance.all_instigator_state()
    assert instance.get_runs_count() >= 1
    assert instance.get_latest_materialization_event(dg.AssetKey("ccat_storage_probe")) is not None


def measured_connects(home: Path, dagster_yaml: str, monkeypatch: pytest.MonkeyPatch) -> ConnectCounter:
    # As in production: ccat_dagster.assets.factory sets it for the run workers (docs/configuration.md).
    monkeypatch.setenv("DAGSTER_EVENT_BATCH_SIZE", "1000")
    instance = load_instance(home, dagster_yaml)
    try:
        counter = ConnectCounter.attach(instance)
        storage_workload(instance)
        return counter
    finally:
        instance.dispose()


def test_the_instance_uses_a_queue_pool_for_runs_event_log_and_schedules(tmp_path, dagster_pg_url):
    instance = load_instance(tmp_path / "home", pooled_yaml(f"      postgres_url: {dagster_pg_url}\n"))
    try:
        for name, storage in storages(instance).items():
            engine = storage._engine
            assert isinstance(engine.pool, pool.QueuePool), f"{name}: {type(engine.pool).__name__}"
            # SQLAlchemy keeps the pool settings private; these are what optimize_for_webserver was given.
            assert engine.pool.size() == 1
            assert engine.pool._max_overflow == DEFAULT_POOL_MAX_OVERFLOW
            assert engine.pool._recycle == DEFAULT_POOL_RECYCLE_SECONDS
            with engine.connect() as connection:
                assert connection.execute(text("SHOW statement_timeout")).scalar() == "0"
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
    finally:
        instance.dispose()


def test_postgres_db_block_and_pool_keys(tmp_path, dagster_pg_url, monkeypatch):
    url = make_url(dagster_pg_url)
    monkeypatch.setenv("CCAT_TEST_POOL_OVERFLOW", "2")
    connection = (
        "      postgres_db:\n"
        f"        username: {url.username}\n"
        f"        hostname: {url.host}\n"
        f"        port: {url.port}\n"
        f"        db_name: {url.database}\n"
    )
    pool_keys = "      pool_max_overflow: {env: CCAT_TEST_POOL_OVERFLOW}\n      pool_recycle_seconds: 600\n"
    instance = load_instance(tmp_path / "home", pooled_yaml(connection, pool_keys=pool_keys))
    try:
        for storage in storages(instance).values():
            assert storage._engine.pool._max_overflow == 2
            assert storage._engine.pool._recycle == 600
        assert instance.get_runs_count() == instance.get_runs_count()
    finally:
        instance.dispose()


def test_pooled_storage_opens_a_handful_of_connections(tmp_path, dagster_pg_url, monkeypatch):
    counter = measured_connects(tmp_path / "home", pooled_yaml(f"      postgres_url: {dagster_pg_url}\n"), monkeypatch)
    print(f"pooled: {counter.total} connections {counter.by_storage}")
    assert counter.total <= MAX_POOLED_CONNECTS, counter.by_storage


def test_the_stock_postgres_storage_opens_connections_per_call(tmp_path, dagster_pg_url, monkeypatch):
    """The control: the same workload and counter on `storage: postgres` (NullPool), the problem being fixed."""
    counter = measured_connects(tmp_path / "home", plain_yaml(dagster_pg_url), monkeypatch)
    print(f"NullPool: {counter.total} connections {counter.by_storage}")
    # At least two per planned event and two per stored event.
    assert counter.total >= 2 * (len(PARTITION_KEYS) + EVENTS), counter.by_storage


def test_dagster_webserver_settings_still_win_in_the_webserver(tmp_path, dagster_pg_url):
    """dagster-webserver re-creates the engines with its own settings after loading the instance."""
    instance = load_instance(tmp_path / "home", pooled_yaml(f"      postgres_url: {dagster_pg_url}\n"))
    try:
        instance.optimize_for_webserver(statement_timeout=15000, pool_recycle=3600, max_overflow=20)
        for storage in storages(instance).values():
            assert storage._engine.pool._max_overflow == 20
            with storage._engine.connect() as connection:
                assert connection.execute(text("SHOW statement_timeout")).scalar() == "15s"
        assert instance.get_runs_count() >= 0
    finally:
        instance.dispose()


def test_a_connection_the_server_closed_is_replaced_not_raised(tmp_path, dagster_pg_url):
    instance = load_instance(tmp_path / "home", pooled_yaml(f"      postgres_url: {dagster_pg_url}\n"))
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        instance.get_runs_count()
        instance.report_runless_asset_event(dg.AssetMaterialization("ccat_storage_probe"))
        instance.all_instigator_state()
        counter = ConnectCounter.attach(instance)
        with admin.connect() as connection:
            killed = connection.execute(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = :database AND pid <> pg_backend_pid()"
                ),
                {"database": make_url(dagster_pg_url).database},
            ).scalar()
        assert killed >= 3
        instance.get_runs_count()
        instance.report_runless_asset_event(dg.AssetMaterialization("ccat_storage_probe"))
        instance.all_instigator_state()
        assert counter.total >= 3, counter.by_storage
    finally:
        admin.dispose()
        instance.dispose()


def test_dropping_the_instance_closes_its_event_log_and_schedule_connections(tmp_path, dagster_pg_url):
    instance = load_instance(tmp_path / "home", pooled_yaml(f"      postgres_url: {dagster_pg_url}\n"))
    instance.report_runless_asset_event(dg.AssetMaterialization("ccat_storage_probe"))
    instance.all_instigator_state()
    engines = [instance.event_log_storage._engine, instance.schedule_storage._engine]
    assert all(engine.pool.checkedin() == 1 for engine in engines)
    instance.dispose()
    del instance
    assert all(engine.pool.checkedin() == 0 for engine in engines)


@pytest.mark.parametrize(
    ("pool_keys", "message"),
    [
        ("      pool_max_overflow: -1\n", "config.pool_max_overflow is -1: expected a whole number from 0 to 100"),
        (
            "      pool_recycle_seconds: 0\n",
            "config.pool_recycle_seconds is 0: expected a whole number from 1 to 86400",
        ),
        (
            "      pool_recycle_seconds: 99999999999999999999\n",
            "config.pool_recycle_seconds is 99999999999999999999: expected a whole number from 1 to 86400",
        ),
        ("      pool_max_overflow: x\n", 'path root:pool_max_overflow. Value "x"'),
        ("      pool_recycle_seconds: 1.5\n", "path root:pool_recycle_seconds. Value"),
    ],
)
def test_a_bad_pool_value_names_the_key(tmp_path, dagster_pg_url, pool_keys, message):
    with pytest.raises((DagsterStorageConfigError, dg.DagsterInvalidConfigError)) as raised:
        load_instance(tmp_path / "home", pooled_yaml(f"      postgres_url: {dagster_pg_url}\n", pool_keys=pool_keys))
    assert message in str(raised.value)


def test_a_bad_pool_value_in_code_names_the_key():
    with pytest.raises(
        DagsterStorageConfigError, match=r"pool_max_overflow is True: expected a whole number from 0 to 100"
    ):
        PooledPostgresStorage("postgresql://nowhere/none", pool_max_overflow=True)


def test_the_per_storage_class_data_leaves_out_the_pool_keys(tmp_path, dagster_pg_url):
    config_yaml = f"postgres_url: {dagster_pg_url}\npool_max_overflow: 2\n"
    storage = PooledPostgresStorage.from_config_value(
        ConfigurableClassData("ccat_dagster.dagster_storage", "PooledPostgresStorage", config_yaml),
        {"postgres_url": dagster_pg_url, "pool_max_overflow": 2},
    )
    data = storage.event_storage_data
    assert data is not None and data.class_name == "PostgresEventLogStorage"
    assert "pool_max_overflow" not in data.config_yaml
    assert type(data.rehydrate(as_type=EventLogStorage)).__name__ == "PostgresEventLogStorage"


def test_dagster_instance_info_reads_the_file(tmp_path, dagster_pg_url):
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text(pooled_yaml(f"      postgres_url: {dagster_pg_url}\n"))
    completed = subprocess.run(
        [str(Path(sys.executable).with_name("dagster")), "instance", "info"],
        env={**os.environ, "DAGSTER_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    # The CLI lists the sub-storages (the stock dagster-postgres classes) and their schema state.
    assert "run_storage: PostgresRunStorage" in completed.stdout
    assert "Storage schema state:" in completed.stdout


def test_the_repository_dagster_yaml_loads_with_the_pooled_storage(tmp_path, dagster_pg_url, monkeypatch):
    monkeypatch.setenv("DAGSTER_PG_URL", dagster_pg_url)
    instance = load_instance(tmp_path / "home", PRODUCTION_DAGSTER_YAML.read_text())
    try:
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        assert instance.get_concurrency_config().run_queue_config.max_concurrent_runs == 16
        for name, storage in storages(instance).items():
            assert isinstance(storage._engine.pool, pool.QueuePool), name
        assert instance.get_runs_count() >= 0
    finally:
        instance.dispose()
