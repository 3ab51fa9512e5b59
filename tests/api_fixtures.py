"""The REST API under test: a seeded ops-db (demo observatory, the CHAI example pipeline, a few attempts and
products with their lineage), tokens of both scopes, and a real uvicorn server on a free 127.0.0.1 port."""

from __future__ import annotations

import datetime as dt
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import uvicorn
from sqlalchemy import select
from sqlalchemy.orm import Session

from ccat_dagster.api.app import create_app
from ccat_dagster.api.auth import create_token, revoke_token
from ccat_dagster.demo.seed import seed_demo
from ccat_dagster.execution.registration import record_input_lineage, record_lineage_aggregates
from ccat_dagster.grouping.engine import resolve
from ccat_dagster.opsdb import models as m
from ccat_dagster.opsdb.engine import make_engine, session_scope
from ccat_dagster.opsdb.enums import DataProductType, RunStatus
from ccat_dagster.pipelines.apply import apply_pipeline_spec
from ccat_dagster.pipelines.spec import load_pipeline_spec
from ccat_dagster.settings import Settings

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "pipelines" / "chai_ngc253_co43.yaml"
PIPELINE = "chai_ngc253_co43"


@dataclass
class FakeLauncher:
    """Records what the API asks Dagster to do (the real GraphQL launcher is tested against a webserver)."""

    launched: list[tuple[tuple[str, ...], dict[str, str]]] = field(default_factory=list)
    terminated: list[str] = field(default_factory=list)

    def launch(self, *, asset_path, tags) -> str:  # type: ignore[no-untyped-def]
        self.launched.append((tuple(asset_path), dict(tags)))
        return f"run-{len(self.launched)}"

    def terminate(self, run_id: str) -> None:
        self.terminated.append(run_id)


@dataclass
class ApiWorld:
    base_url: str
    ops_db_url: str
    read_token: str
    write_token: str
    revoked_token: str
    launcher: FakeLauncher
    # ids of the seeded rows the tests look at
    attempts: dict[str, int]
    products: dict[str, int]
    package_id: int
    calibrate_keys: list[str]

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=30)

    def reader(self) -> httpx.Client:
        return self.client(self.read_token)

    def writer(self) -> httpx.Client:
        return self.client(self.write_token)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def seed_api_world(ops_db_url: str, data_dir: Path) -> dict[str, object]:
    """Demo observatory + the CHAI pipeline + attempts: two completed calibrations and a grid_map that read
    them (products and lineage registered), one failed calibration, one running."""
    engine = make_engine(ops_db_url)
    with session_scope(engine) as session:
        seed_demo(session, data_dir=data_dir, scans=4)
        apply_pipeline_spec(session, load_pipeline_spec(EXAMPLE), source_path=EXAMPLE)
        pipeline = session.scalars(select(m.Pipeline).where(m.Pipeline.name == PIPELINE)).one()
        steps = {s.name: s for s in pipeline.steps}
        groups = resolve(
            session,
            filter_rules=pipeline.data_grouping.filter_rules,
            group_by=steps["calibrate"].group_by,
            instrument_module_id=pipeline.data_grouping.instrument_module_id,
        )
        assert len(groups) >= 2, "the demo grouping should resolve to several scans"
        version = session.scalars(select(m.ReductionSoftwareVersion)).first()
        now = m.utcnow()
        attempts: dict[str, int] = {}
        products: dict[str, int] = {}

        def attempt(step: str, key: str, status: RunStatus, **extra: object) -> m.ExecutedReductionStep:
            row = m.ExecutedReductionStep(
                step=steps[step],
                sub_group_key=key,
                status=status,
                input_fingerprint="f" * 64,
                reduction_software_version_id=version.id,
                config=steps[step].config,
                created_at=now - dt.timedelta(hours=2),
                **extra,
            )
            session.add(row)
            session.flush()
            return row

        calibrated = []
        for index, group in enumerate(groups[:2]):
            row = attempt(
                "calibrate",
                group.key,
                RunStatus.COMPLETED,
                cpu_hours=0.5,
                finished_at=now - dt.timedelta(hours=1),
                dagster_run_id=f"dagster-cal-{index}",
            )
            record_input_lineage(session, attempt=row, package_ids=list(group.package_ids), product_ids=[])
            product = m.DataProduct(
                executed_reduction_step=row,
                reduction_step_id=row.reduction_step_id,
                sub_group_key=row.sub_group_key,
                product_type=DataProductType.INTERMEDIATE,
                relative_path=f"calibrate/{group.key}.npz",
                size_bytes=100 + index,
                sha256=f"{index}" * 64,
            )
            session.add(product)
            session.flush()
            calibrated.append(product)
            attempts[f"cal{index}"] = row.id
            products[f"cal{index}"] = product.id
        grid = attempt(
            "grid_map", "all", RunStatus.COMPLETED, cpu_hours=2.0, finished_at=now, dagster_run_id="dagster-grid"
        )
        record_input_lineage(session, attempt=grid, package_ids=[], product_ids=[p.id for p in calibrated])
        science = m.DataProduct(
            executed_reduction_step=grid,
            reduction_step_id=grid.reduction_step_id,
            sub_group_key="all",
            product_type=DataProductType.SCIENCE,
            relative_path="science/map.fits",
            size_bytes=4096,
            sha256="a" * 64,
        )
        session.add(science)
        session.flush()
        record_lineage_aggregates(session, attempt_id=[*attempts.values(), grid.id])
        attempts["grid"], products["map"] = grid.id, science.id
        failed = attempt(
            "calibrate",
            groups[2 % len(groups)].key if len(groups) > 2 else groups[0].key,
            RunStatus.FAILED,
            attempt=2 if len(groups) <= 2 else 1,
            error="exit code 3: calibration failed\ntraceback …",
            dagster_run_id="dagster-failed",
            finished_at=now,
        )
        attempts["failed"] = failed.id
        running = attempt(
            "baseline", groups[0].key, RunStatus.RUNNING, dagster_run_id="dagster-running", hpc_job_id="4242"
        )
        attempts["running"] = running.id
        package_id = groups[0].package_ids[0]
        read, read_secret = create_token(session, name="ui", scope="read")
        _write, write_secret = create_token(session, name="ops", scope="write")
        _revoked, revoked_secret = create_token(session, name="old", scope="write")
        revoke_token(session, "old")
        keys = [g.key for g in groups]
    engine.dispose()
    return {
        "attempts": attempts,
        "products": products,
        "package_id": package_id,
        "read": read_secret,
        "write": write_secret,
        "revoked": revoked_secret,
        "keys": keys,
        "read_id": read.id,
    }


class ServerThread:
    """uvicorn serving ``app`` on 127.0.0.1:``port`` in a thread of the test process."""

    def __init__(self, app: object, port: int) -> None:
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def api_world(ops_db_url: str, tmp_dir: Path) -> Iterator[ApiWorld]:
    """Seed ``ops_db_url`` (migrated) and serve the API over it until the generator is closed."""
    import dagster as dg

    seeded = seed_api_world(ops_db_url, tmp_dir / "data")
    settings = Settings.from_env(
        {
            "CCAT_OPS_DB_URL": ops_db_url,
            "CCAT_DAGSTER_DATA_DIR": str(tmp_dir / "data"),
            "CCAT_WORKFLOW_MANAGER_API_MAX_BODY_BYTES": "65536",
        }
    )
    launcher = FakeLauncher()
    engine = make_engine(ops_db_url)
    instance = dg.DagsterInstance.ephemeral()
    app = create_app(settings, engine=engine, launcher=launcher, dagster_instance=instance)
    port = free_port()
    with ServerThread(app, port):
        yield ApiWorld(
            base_url=f"http://127.0.0.1:{port}",
            ops_db_url=ops_db_url,
            read_token=seeded["read"],  # type: ignore[arg-type]
            write_token=seeded["write"],  # type: ignore[arg-type]
            revoked_token=seeded["revoked"],  # type: ignore[arg-type]
            launcher=launcher,
            attempts=seeded["attempts"],  # type: ignore[arg-type]
            products=seeded["products"],  # type: ignore[arg-type]
            package_id=seeded["package_id"],  # type: ignore[arg-type]
            calibrate_keys=seeded["keys"],  # type: ignore[arg-type]
        )
    engine.dispose()
    instance.dispose()


def count_rows(ops_db_url: str, model: type) -> int:
    from sqlalchemy import func

    engine = make_engine(ops_db_url)
    with Session(engine) as session:
        value = session.scalar(select(func.count()).select_from(model))
    engine.dispose()
    return int(value or 0)
