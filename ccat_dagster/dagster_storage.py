"""Dagster instance storage on PostgreSQL that keeps a small connection pool in every Dagster process.

Why: dagster-postgres builds its SQLAlchemy engines with ``NullPool``, so every storage call opens a fresh
PostgreSQL connection (~4-5 ms, plus a backend fork on the server) and closes it again. Only dagster-webserver
switches to a pool (``DagsterInstance.optimize_for_webserver``); the daemon, the run workers and the CLI do not.
The daemon writes one ASSET_MATERIALIZATION_PLANNED event per partition when it creates a run, two connections
each: a batched run of 200 sub-groups costs 400 connections before it starts. ``PooledPostgresStorage`` is
``DagsterPostgresStorage`` whose run, event-log and schedule storages get the webserver's pool in every process
(pool_size 1, ``pool_max_overflow`` more under concurrent use, reconnected after ``pool_recycle_seconds``), so a
process reuses one connection per sub-storage. Measured in tests/test_dagster_storage.py: creating and executing
a run over 50 partitions, then storing 50 more events, opens 5 connections pooled and 240 with ``storage:
postgres``. One case still opens a connection per call: an asset event with indexed tags written on its own
makes dagster-postgres open a second connection while it holds the first (its tags-table check), an overflow
connection closed again afterwards; batched writes (``DAGSTER_EVENT_BATCH_SIZE``, which
ccat_dagster.assets.factory sets for the run workers) pay it once per batch. Use it from dagster.yaml::

    storage:
      custom:
        module: ccat_dagster.dagster_storage
        class: PooledPostgresStorage
        config:
          postgres_url: {env: DAGSTER_PG_URL}   # or a postgres_db block, as for `storage: postgres`
          pool_max_overflow: 4                  # optional, default 4
          pool_recycle_seconds: 3600            # optional, default 3600

What it costs: each process holds up to 1 + ``pool_max_overflow`` connections per sub-storage, three sub-storages
per process. Idle, a process keeps one open connection per sub-storage it has used (at most 3); overflow
connections are closed as soon as they are returned. With dagster.yaml's 16 concurrent runs (in-process
executor: one run worker each) plus the daemon and the webserver that is at most 18 × 3 = 54 idle connections,
well under PostgreSQL's default ``max_connections`` of 100. Size it as: processes × 3 × (1 + pool_max_overflow)
at worst ≤ max_connections minus ops-db's and the admins' share; a process only opens overflow connections
while several of its threads (the daemon's sensor/schedule workers, the webserver's requests) query at once,
so lowering ``pool_max_overflow`` trades peak connections for threads waiting on each other.
dagster-webserver keeps its own pool settings (``--db-pool-max-overflow``, ``--db-statement-timeout``): it
re-creates the engines after the instance is loaded. A pgbouncer in front of PostgreSQL is the alternative: it
keeps Dagster's ``NullPool`` (cheap connections to a local pgbouncer) and bounds the server's connections for all
processes at once, at the price of one more service to run.

Two behaviours differ from ``storage: postgres``:

- New connections run ``SET statement_timeout = 0`` (what ``optimize_for_webserver`` does with 0: PostgreSQL's
  "no timeout", the server default). A statement_timeout configured on the role, the database or in the URL's
  ``options`` is overridden for Dagster's storage.
- A pooled connection is pinged (``SELECT 1``) when it is taken from the pool and replaced if the server has
  closed it (restart, failover, idle timeout), so the first storage call after a PostgreSQL restart does not
  fail a run or a daemon tick.

A sub-storage closes its pooled connections when it is garbage-collected (the instance dropped) and at process
exit. Dagster starts its run workers and step processes with ``spawn``, never ``fork``, so no pool is shared
between processes.

This module is imported by every Dagster process that reads dagster.yaml: it imports Dagster, dagster-postgres
and SQLAlchemy (all loaded by Dagster anyway) and nothing of ccat_dagster but its error type.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import sqlalchemy
import yaml
from dagster import Field, IntSource
from dagster._config.config_schema import UserConfigSchema
from dagster._serdes import ConfigurableClassData
from dagster_postgres import DagsterPostgresStorage
from dagster_postgres.utils import get_token_provider_from_config, pg_url_from_config

from ccat_dagster.errors import CcatError
from ccat_dagster.safe_yaml import safe_load

if TYPE_CHECKING:
    from dagster_postgres.auth import PgTokenProvider

DEFAULT_POOL_MAX_OVERFLOW = 4
DEFAULT_POOL_RECYCLE_SECONDS = 3600
# PostgreSQL's statement_timeout = 0: no timeout (what `storage: postgres` gets from a default server).
NO_STATEMENT_TIMEOUT = 0

# Upper bounds: more overflow connections than PostgreSQL's default max_connections (100) cannot all open; a
# connection older than a day is past any firewall's idle timeout.
MAX_POOL_MAX_OVERFLOW = 100
MAX_POOL_RECYCLE_SECONDS = 86_400

POOL_MAX_OVERFLOW_KEY = "pool_max_overflow"
POOL_RECYCLE_SECONDS_KEY = "pool_recycle_seconds"


class DagsterStorageConfigError(CcatError, ValueError):
    """A pool setting of ``PooledPostgresStorage`` in dagster.yaml that cannot be used; names the key and the fix."""


def _validated(key: str, value: Any, *, minimum: int, maximum: int, meaning: str) -> int:
    # bool is an int to Python, never a meaningful pool size.
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise DagsterStorageConfigError(
            f"dagster.yaml storage.custom.config.{key} is {value!r}: expected a whole number from {minimum} to "
            f"{maximum} ({meaning})"
        )
    return value


class PooledPostgresStorage(DagsterPostgresStorage):
    """``DagsterPostgresStorage`` with a small connection pool per sub-storage in every process.

    Configured like ``storage: postgres`` (``postgres_url`` or ``postgres_db``, ``should_autocreate_tables``,
    ``auth_provider``) plus ``pool_max_overflow`` and ``pool_recycle_seconds``; see the module docstring for
    the cost and how to size it.
    """

    def __init__(
        self,
        postgres_url: str,
        should_autocreate_tables: bool = True,
        inst_data: ConfigurableClassData | None = None,
        token_provider: PgTokenProvider | None = None,
        *,
        pool_max_overflow: int = DEFAULT_POOL_MAX_OVERFLOW,
        pool_recycle_seconds: int = DEFAULT_POOL_RECYCLE_SECONDS,
    ) -> None:
        self.pool_max_overflow = _validated(
            POOL_MAX_OVERFLOW_KEY,
            pool_max_overflow,
            minimum=0,
            maximum=MAX_POOL_MAX_OVERFLOW,
            meaning="connections each sub-storage may open beyond the one it keeps",
        )
        # 0 would make SQLAlchemy replace the connection on every checkout, i.e. no pool at all.
        self.pool_recycle_seconds = _validated(
            POOL_RECYCLE_SECONDS_KEY,
            pool_recycle_seconds,
            minimum=1,
            maximum=MAX_POOL_RECYCLE_SECONDS,
            meaning="age in seconds after which a pooled connection is replaced",
        )
        super().__init__(
            postgres_url,
            should_autocreate_tables=should_autocreate_tables,
            inst_data=inst_data,
            token_provider=token_provider,
        )
        for storage in (self._run_storage, self._event_log_storage, self._schedule_storage):
            storage.optimize_for_webserver(
                statement_timeout=NO_STATEMENT_TIMEOUT,
                pool_recycle=self.pool_recycle_seconds,
                max_overflow=self.pool_max_overflow,
            )
            engine = storage._engine  # the attribute optimize_for_webserver has just rebound to the pooled engine
            _replace_dead_connections_on_checkout(engine)
            # DagsterInstance.dispose() leaves the engines alone and a pool lives in a reference cycle: without
            # this, a short-lived instance (a sensor evaluation in the code server) would keep its connections
            # until the next full garbage collection.
            weakref.finalize(storage, engine.dispose)

    @classmethod
    def config_type(cls) -> UserConfigSchema:
        return {
            **DagsterPostgresStorage.config_type(),
            POOL_MAX_OVERFLOW_KEY: Field(
                IntSource,
                is_required=False,
                default_value=DEFAULT_POOL_MAX_OVERFLOW,
                description="Connections each sub-storage (runs, event log, schedules) may open beyond the one it "
                "keeps, while several threads of a process query at once.",
            ),
            POOL_RECYCLE_SECONDS_KEY: Field(
                IntSource,
                is_required=False,
                default_value=DEFAULT_POOL_RECYCLE_SECONDS,
                description="Age in seconds after which a pooled connection is closed and replaced.",
            ),
        }

    @classmethod
    def from_config_value(
        cls, inst_data: ConfigurableClassData | None, config_value: Mapping[str, Any]
    ) -> PooledPostgresStorage:
        return cls(
            postgres_url=pg_url_from_config(config_value),
            should_autocreate_tables=config_value.get("should_autocreate_tables", True),
            inst_data=inst_data,
            token_provider=get_token_provider_from_config(config_value),
            pool_max_overflow=config_value.get(POOL_MAX_OVERFLOW_KEY, DEFAULT_POOL_MAX_OVERFLOW),
            pool_recycle_seconds=config_value.get(POOL_RECYCLE_SECONDS_KEY, DEFAULT_POOL_RECYCLE_SECONDS),
        )

    # The per-storage class data DagsterPostgresStorage derives from its own config must not carry the pool keys:
    # PostgresRunStorage & co. reject unknown keys.
    @property
    def event_storage_data(self) -> ConfigurableClassData | None:
        return self._postgres_class_data("PostgresEventLogStorage")

    @property
    def run_storage_data(self) -> ConfigurableClassData | None:
        return self._postgres_class_data("PostgresRunStorage")

    @property
    def schedule_storage_data(self) -> ConfigurableClassData | None:
        return self._postgres_class_data("PostgresScheduleStorage")

    def _postgres_class_data(self, class_name: str) -> ConfigurableClassData | None:
        if self.inst_data is None:
            return None
        config = safe_load(self.inst_data.config_yaml, origin="dagster.yaml storage.custom.config") or {}
        for key in (POOL_MAX_OVERFLOW_KEY, POOL_RECYCLE_SECONDS_KEY):
            config.pop(key, None)
        return ConfigurableClassData("dagster_postgres", class_name, yaml.safe_dump(config, default_flow_style=False))


def _replace_dead_connections_on_checkout(engine: sqlalchemy.engine.Engine) -> None:
    """Ping a connection as it leaves the pool; one the server has closed is replaced instead of failing the call.

    The pool's documented pessimistic disconnect handling: raising ``DisconnectionError`` in a "checkout" listener
    makes SQLAlchemy discard that connection and connect again.
    """
    dialect = engine.dialect

    def ping(dbapi_connection: Any, connection_record: Any, connection_proxy: Any) -> None:
        try:
            dialect.do_ping(dbapi_connection)
        except dialect.loaded_dbapi.Error as error:
            raise sqlalchemy.exc.DisconnectionError(f"pooled Dagster storage connection is gone: {error}") from error

    sqlalchemy.event.listen(engine, "checkout", ping)
