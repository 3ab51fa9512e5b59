"""The Dagster code location, built from ops-db when it loads.

For every enabled pipeline of ``PROCESSING_LOCATION_ID``: one asset per step, the raw-data external asset, and a
sensor (CONTINUOUS) or a schedule (CRON). Applying a changed pipeline needs only a code-location reload. A
pipeline row that cannot be built is skipped; its error is logged and shown in the UI as the description of a
``<pipeline>/load_error`` asset, so one broken row never takes the whole location down.

An ops-db without a processing location (a first ``docker compose up``) or without the schema still loads: the
location then holds one ``ccat_setup/getting_started`` asset whose description says what to run; a reload
after that builds the real definitions.
"""

from __future__ import annotations

import logging
import sys
import warnings

import dagster as dg
from sqlalchemy import inspect, select

from ccat_dagster.assets.factory import build_pipeline_assets
from ccat_dagster.assets.partitions import build_partitions_sensor
from ccat_dagster.assets.retention import build_retention_definitions
from ccat_dagster.assets.snapshot import PipelineSnapshot, load_pipeline_snapshots
from ccat_dagster.errors import CcatError
from ccat_dagster.opsdb import models as m
from ccat_dagster.opsdb.engine import session_scope, shared_engine
from ccat_dagster.opsdb.enums import LocationType
from ccat_dagster.resources import HpcBackendResource, resources_from_settings
from ccat_dagster.sensors.gaps import build_pipeline_cron_sensor, build_pipeline_sensor
from ccat_dagster.sensors.reconcile import build_reconcile_sensors
from ccat_dagster.settings import Settings, SettingsError

log = logging.getLogger("ccat_dagster")

# The start of Dagster's BetaWarning for ``@asset(backfill_policy=...)`` (a regular expression).
BACKFILL_POLICY_BETA = r"Parameter `backfill_policy` of function `asset` is currently in beta"


class LocationError(CcatError):
    """The processing location of this code location cannot be determined."""


class OpsDbNotReady(LocationError):
    """ops-db has no schema or no processing location yet: the code location shows how to set it up."""


def resolve_processing_location_id(session, settings: Settings) -> int:  # type: ignore[no-untyped-def]
    if settings.processing_location_id is not None:
        location = session.get(m.DataLocation, settings.processing_location_id)
        if location is None or location.location_type is not LocationType.PROCESSING:
            raise LocationError(
                f"CCAT_WORKFLOW_MANAGER_PROCESSING_LOCATION_ID={settings.processing_location_id} is not a "
                "processing DataLocation in ops-db; list them with `ccat-dagster doctor`"
            )
        return location.id
    ids = session.scalars(
        select(m.DataLocation.id).where(m.DataLocation.location_type == LocationType.PROCESSING)
    ).all()
    if not ids and settings.processing_location_id is None:
        raise OpsDbNotReady(
            "ops-db has no processing location yet: create one (the demo: `ccat-dagster demo seed`), apply a "
            "pipeline (`ccat-dagster pipelines apply FILE.yaml`), then reload this code location"
        )
    if len(ids) != 1:
        raise LocationError(
            f"ops-db has {len(ids)} processing locations; set CCAT_WORKFLOW_MANAGER_PROCESSING_LOCATION_ID "
            "to the one this deployment serves" + ("" if ids else " (or seed/create one: `ccat-dagster demo seed`)")
        )
    return ids[0]


def settings_or_exit() -> Settings:
    """The settings of this code location; an invalid one ends the process with one line and exit code 2.

    A code server must not come up (and serve a load error for as long as nobody looks) with a setting that can
    never work; a restart with the setting fixed is the only remedy. This is unlike ops-db being unreachable or
    empty, which a later reload can mend. ``SystemExit`` passes Dagster's loader, which only catches Exception.
    """
    try:
        return Settings.from_env()
    except SettingsError as error:
        print(f"ccat-dagster code location: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def build_definitions(settings: Settings | None = None) -> dg.Definitions:
    settings = settings or Settings.from_env()
    location_id, snapshots = read_pipelines(settings)
    return _definitions(settings, location_id, snapshots)


def read_pipelines(settings: Settings) -> tuple[int, list[tuple[str, PipelineSnapshot | Exception]]]:
    """Everything the code location is built from: this location's id and its enabled pipelines (one read).

    Raises ``OpsDbNotReady`` for an ops-db without schema or processing location.
    """
    engine = shared_engine(settings.ops_db_url)
    if not inspect(engine).has_table(m.DataLocation.__tablename__):
        raise OpsDbNotReady(
            f"ops-db at {settings.redacted_ops_db_url} has no ccat-dagster schema yet: run `ccat-dagster db upgrade`"
            ", then `ccat-dagster demo seed` (or create the processing location) and reload this code location"
        )
    with session_scope(engine) as session:
        location_id = resolve_processing_location_id(session, settings)
        return location_id, load_pipeline_snapshots(session, processing_location_id=location_id)


def setup_hint_definitions(problem: OpsDbNotReady) -> dg.Definitions:
    """The code location of an ops-db that is not set up yet: one asset whose description says what to do."""
    return dg.Definitions(
        assets=[
            dg.AssetSpec(
                key=dg.AssetKey(["ccat_setup", "getting_started"]),
                group_name="ccat_setup",
                description=f"ccat-dagster has nothing to run yet. {problem}",
            )
        ]
    )


def _definitions(
    settings: Settings, location_id: int, snapshots: list[tuple[str, PipelineSnapshot | Exception]]
) -> dg.Definitions:
    assets: list = []
    sensors: list = []
    schedules: list = []
    for name, snapshot in snapshots:
        try:
            if isinstance(snapshot, Exception):
                raise snapshot
            with warnings.catch_warnings():
                # A step's run covers a batch of sub-groups through BackfillPolicy, which Dagster marks beta;
                # the pinned Dagster release is tested with it, so the note is for upgrades, not for every load.
                warnings.filterwarnings("ignore", message=BACKFILL_POLICY_BETA, category=dg.BetaWarning)
                pipeline_assets = build_pipeline_assets(
                    snapshot,
                    backend=settings.hpc_backend,
                    runtime=settings.container_runtime,
                    max_partitions_per_run=settings.max_partitions_per_run,
                )
            pipeline_sensors = []
            if snapshot.trigger_type == "continuous":
                pipeline_sensors.append(build_pipeline_sensor(snapshot, settings=settings))
            elif snapshot.trigger_type == "cron":
                pipeline_sensors.append(build_pipeline_cron_sensor(snapshot, settings=settings))
            if snapshot.trigger_type in ("cron", "manual"):
                # Run by hand too: their partitions follow new data without a run-requesting sensor.
                pipeline_sensors.append(build_partitions_sensor(snapshot, settings=settings))
        except Exception as error:  # noqa: BLE001 - isolate one broken pipeline from the others
            log.error("pipeline %r skipped: %s", name, error)
            assets.append(
                dg.AssetSpec(
                    key=dg.AssetKey([_safe(name), "load_error"]),
                    group_name="load_errors",
                    description=f"Pipeline {name!r} could not be loaded and is skipped: {error}",
                )
            )
            continue
        assets.extend(pipeline_assets)
        sensors.extend(pipeline_sensors)

    resources = resources_from_settings(settings, processing_location_id=location_id)
    hpc: HpcBackendResource = resources["hpc"]
    sensors.extend(build_reconcile_sensors(settings=settings, backend_factory=hpc.get))
    retention_jobs, retention_schedules = build_retention_definitions(settings)
    schedules.extend(retention_schedules)
    return dg.Definitions(
        assets=assets,
        sensors=sensors,
        schedules=schedules,
        jobs=retention_jobs,
        resources=resources,
        # A run executes one step (one asset, many sub-groups): the default multiprocess executor would start a
        # second Python process per run and load this code location again in it, seconds per run.
        executor=dg.in_process_executor,
    )


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c == "_" else "_" for c in name) or "pipeline"


# The last definitions built by ``defs`` and what they were built from.
_built: tuple[tuple[Settings, int, list], dg.Definitions] | None = None


@dg.definitions
def defs() -> dg.Definitions:
    """Loaded lazily by Dagster (so importing this module never touches ops-db).

    Dagster calls this more than once per code-location load (to find the definitions, then to build the
    repository): building them is most of a load, so it is done again only when ops-db changed since the last
    call. A reload after ``pipelines apply`` therefore still sees the change.
    """
    global _built
    settings = settings_or_exit()
    try:
        source = (settings, *read_pipelines(settings))
    except OpsDbNotReady as problem:
        log.warning("%s", problem)
        _built = None
        return setup_hint_definitions(problem)
    if _built is None or _built[0] != source:
        _built = (source, _definitions(settings, source[1], source[2]))
    return _built[1]
