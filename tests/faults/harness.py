"""The fault suite's world: real processes that the scenarios kill, stop and restart.

- a PostgreSQL cluster of its own (initdb/pg_ctl as the postgres user, on a free port from 55432, in a temporary
  directory) holding ops-db and the Dagster storage, so that a scenario may stop it;
- a Dagster instance configured from the repository's production dagster.yaml (storage through
  DAGSTER_PG_URL; only the run-monitoring and retry intervals are shortened so recoveries take seconds);
- a code server (``dagster code-server start``) and a ``dagster-daemon`` reaching it through a workspace file,
  both supervised like systemd's ``Restart=always`` would (a scenario kills one, the harness starts it again);
- one two-step pipeline per scenario (``work`` per scan, then ``combine`` over all scans) over packages no other
  scenario uses, whose payload (``software/bin/fault_step.py``) sleeps and writes products, so that each scenario
  starts by "new data arriving" (its packages archived) and is isolated from the others.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import yaml
from sqlalchemy import create_engine, delete, func, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from ccat_dagster.demo.seed import ARCHIVE_LOCATION, PROCESSING_LOCATION, seed_demo
from ccat_dagster.execution.planning import Planner, Readiness, load_pipeline
from ccat_dagster.grouping.keys import encode_sub_group_key
from ccat_dagster.opsdb import models as m
from ccat_dagster.opsdb.engine import make_engine
from ccat_dagster.opsdb.enums import PackageState, PhysicalCopyStatus, RunStatus
from ccat_dagster.opsdb.invariants import InvariantKind, Violation, check_invariants
from ccat_dagster.opsdb.migrate import upgrade
from ccat_dagster.pipelines.apply import apply_pipeline_spec
from ccat_dagster.pipelines.spec import parse_pipeline_spec

from ..conftest import PRODUCTION_DAGSTER_YAML
from ..runner_fixtures import pipeline_attempts, processes_mentioning

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SOFTWARE = HERE / "software"
LOCATION = "ccat_dagster"
PG_BIN = Path("/usr/lib/postgresql")
SEED_SCANS = 32
MEMORY_CAP_GB = 2
# PIPELINE_BASE_DIR's tmpfs: room for every scenario's attempts (a few KiB each) and the full-disk payloads.
BASE_TMPFS_MB = 256
ACTIVE_RUN_STATUSES = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]


def _free_port(start: int) -> int:
    for port in range(start, start + 200):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free TCP port in {start}..{start + 199}")


def _pg_bin(tool: str) -> str:
    versions = sorted(PG_BIN.iterdir(), key=lambda p: int(p.name) if p.name.isdigit() else 0) if PG_BIN.exists() else []
    for version in reversed(versions):
        if (version / "bin" / tool).exists():
            return str(version / "bin" / tool)
    found = shutil.which(tool)
    if found is None:
        raise RuntimeError(f"PostgreSQL's {tool} is not installed (apt-get install postgresql)")
    return found


class PrivatePostgres:
    """A PostgreSQL cluster only this suite uses: it may be stopped without harming anybody else."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "data"
        # Each pytest-xdist worker starts probing at its own port, so that two workers rarely meet.
        worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
        self.port = _free_port(55432 + 20 * (int(worker) if worker.isdigit() else 0))
        self.log = root / "postgres.log"

    def _as_postgres(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        command = list(argv) if os.geteuid() != 0 else ["runuser", "-u", "postgres", "--", *argv]
        return subprocess.run(command, capture_output=True, text=True, timeout=120, check=check)

    def init(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        self._as_postgres(_pg_bin("initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync")
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(
                f"port = {self.port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{self.root}'\n"
                "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nmax_connections = 300\n"
            )

    def start(self) -> None:
        """Starts the cluster; a port taken between the probe and the start (another suite's cluster, another
        pytest-xdist worker) moves it to the next free one."""
        for _ in range(10):
            started = self._as_postgres(
                _pg_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start", check=False
            )
            if started.returncode == 0:
                return
            if "Address already in use" not in self.log.read_text(errors="replace"):
                started.check_returncode()
            self.port = _free_port(self.port + 1)
            with (self.data / "postgresql.conf").open("a") as conf:
                conf.write(f"port = {self.port}\n")
            self.log.write_text("")
        raise RuntimeError(f"the fault suite's PostgreSQL found no free port; see {self.log}")

    def stop(self) -> None:
        self._as_postgres(_pg_bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop", check=False)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def running(self) -> bool:
        status = self._as_postgres(_pg_bin("pg_ctl"), "-D", str(self.data), "status", check=False)
        return status.returncode == 0

    def url(self, database: str) -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        admin = create_engine(self.url("postgres"), isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        admin.dispose()
        return self.url(name)


@dataclass
class Supervised:
    """One long-running Dagster process, restarted on demand (a scenario kills it; systemd would restart it)."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    cwd: Path
    process: subprocess.Popen | None = None
    restarts: int = 0

    def start(self) -> None:
        out = self.log.open("a")
        out.write(f"\n===== start {self.name} at {dt.datetime.now(dt.UTC):%H:%M:%S} =====\n")
        out.flush()
        self.process = subprocess.Popen(
            self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT, cwd=self.cwd, start_new_session=True
        )
        out.close()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self, sig: signal.Signals = signal.SIGKILL) -> None:
        """Send ``sig`` to the whole process group (its children too, as systemd's control-group kill does)."""
        if self.process is not None and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def restart(self) -> None:
        self.kill(signal.SIGTERM)
        self.restarts += 1
        self.start()

    def ensure_running(self) -> bool:
        """Start it again if it died; True if it had to."""
        if self.alive():
            return False
        self.restarts += 1
        self.start()
        return True

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


class Tmpfs:
    """A tmpfs mounted over a directory (root only): a file system of a size the scenario chooses."""

    def __init__(self, path: Path, size_mb: float) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        _mount("-t", "tmpfs", "-o", f"size={_kib(size_mb)}k,mode=0755", "tmpfs", str(path))

    def resize(self, size_mb: float) -> None:
        """Shrink (down to what is in use) or grow the file system; its files stay."""
        _mount("-o", f"remount,size={_kib(size_mb)}k", str(self.path))

    def used_mb(self) -> float:
        stats = os.statvfs(self.path)
        return (stats.f_blocks - stats.f_bfree) * stats.f_frsize / 2**20

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], capture_output=True, timeout=60, check=False)


def _kib(size_mb: float) -> int:
    return max(64, int(size_mb * 1024))


def _mount(*argv: str) -> None:
    done = subprocess.run(["mount", *argv], capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise OSError(f"mount {' '.join(argv)} failed: {(done.stderr or done.stdout).strip()}")


def scenario_pipeline_spec(
    name: str,
    packages: Sequence[str],
    *,
    work: dict[str, Any] | None = None,
    combine: dict[str, Any] | None = None,
    max_retries: int = 2,
    work_resources: dict[str, Any] | None = None,
    fan_in: bool = True,
) -> dict[str, Any]:
    """``work`` per scan, then (``fan_in``) ``combine`` over all scans: the fan-in a lost sub-group would block.
    Scenarios whose fault concerns one attempt's own outcome leave the fan-in out (one run fewer)."""
    software = {
        "name": "fault-step",
        "version": "1.0.0",
        "image_ref": str(SOFTWARE),
        "entrypoint": ["/usr/bin/python3", "/opt/software/bin/fault_step.py"],
    }
    return {
        "pipeline": name,
        "description": f"fault suite scenario {name}",
        "processing_location": PROCESSING_LOCATION,
        "trigger": {"type": "continuous"},
        "enabled": True,
        "grouping": {
            "name": f"{name}-packages",
            "rules": [{"table": "RawDataPackage", "column": "name", "operator": "in", "value": list(packages)}],
        },
        "steps": [
            {
                "name": "work",
                "software": software,
                "config": {"sleep_seconds": 4, **(work or {})},
                "group_by": ["executed_obs_unit"],
                "cooldown_seconds": 0,
                "resources": {"cpu": 1, "memory_gb": 1, "time_hours": 1, **(work_resources or {})},
                "max_retries": max_retries,
            },
            {
                "name": "combine",
                "depends_on": ["work"],
                "software": software,
                "config": {"sleep_seconds": 0, **(combine or {})},
                "group_by": [],
                "cooldown_seconds": 0,
                "resources": {"cpu": 1, "memory_gb": 1, "time_hours": 1},
                "max_retries": 1,
            },
        ][: 2 if fan_in else 1],
    }


@dataclass
class Outcome:
    """What a scenario measured: the figures of docs/reliability.md."""

    scenario: str
    survived: bool = False
    products_lost: int = 0
    duplicated: int = 0
    recovery_seconds: float | None = None
    note: str = ""


# Every scenario's figures, in the order they ended; conftest writes docs/reliability.md from them.
OUTCOMES: list[Outcome] = []
# The key under which a pytest-xdist worker hands OUTCOMES to the controller (``workeroutput``).
OUTCOMES_KEY = "fault_outcomes"


@contextlib.contextmanager
def record(world: FaultWorld, name: str) -> Iterator[tuple[str, Outcome]]:
    """``with record(world, name) as (pipeline, outcome):`` runs one scenario and records its figures."""
    outcome = Outcome(name)
    world.set_sensors([world.scenarios[name]], running=True)
    skipped = False
    try:
        yield world.scenarios[name], outcome
        outcome.survived = True
    except pytest.skip.Exception:
        skipped = True  # not run here: its row keeps its last figures
        raise
    except BaseException as error:
        outcome.note = str(error).partition("\n")[0][:160]
        with (world.root / "failures.txt").open("a") as out:
            out.write(f"===== {name}\n{error}\n")
        raise
    finally:
        if not skipped:
            OUTCOMES.append(outcome)
        with contextlib.suppress(Exception):  # only load spared; the scenario's own result stands
            world.set_sensors([world.scenarios[name]], running=False)


class Clock:
    """Recovery time: from the fault to the pipeline's completion."""

    def __init__(self) -> None:
        self.fault_at: float | None = None

    def fault(self) -> None:
        self.fault_at = time.monotonic()

    def since_fault(self) -> float:
        assert self.fault_at is not None
        return time.monotonic() - self.fault_at


Scenario = Callable[["FaultWorld", str, Outcome, Clock], None]


class SideBySide:
    """Scenarios that share nothing but the services, started together in threads; each test joins its own.

    Most of a scenario is waiting (for a payload, a sensor tick, a run launch, run monitoring): side by side, a
    group costs about its longest scenario instead of their sum.
    """

    def __init__(self, world: FaultWorld, scenarios: dict[str, Scenario]) -> None:
        self.world = world
        self.errors: dict[str, BaseException | None] = {}
        self.threads = {
            name: threading.Thread(target=self._run, args=(name, scenario), name=f"scenario-{name}", daemon=True)
            for name, scenario in scenarios.items()
        }
        for thread in self.threads.values():
            thread.start()

    def _run(self, name: str, scenario: Scenario) -> None:
        try:
            with record(self.world, name) as (pipeline, outcome):
                scenario(self.world, pipeline, outcome, Clock())
            self.errors[name] = None
        except BaseException as error:  # noqa: BLE001 - handed to the scenario's test
            self.errors[name] = error

    def result(self, name: str, timeout: float = 900) -> None:
        """Wait for scenario ``name``; raise what it raised."""
        self.threads[name].join(timeout)
        if self.threads[name].is_alive():
            raise AssertionError(f"scenario {name} did not end within {timeout:.0f} s")
        error = self.errors[name]
        if error is not None:
            raise error

    def join(self) -> None:
        self.world.stopping.set()
        for thread in self.threads.values():
            thread.join(60)
        self.world.stopping.clear()


@dataclass
class FaultWorld:
    root: Path
    pg: PrivatePostgres
    ops_db_url: str
    dagster_pg_url: str
    env: dict[str, str]
    home: Path
    workspace: Path
    packages: list[str]
    scenarios: dict[str, str] = field(default_factory=dict)  # scenario -> pipeline name
    code_server: Supervised | None = None
    daemon: Supervised | None = None
    _engine: Engine | None = None
    _local: threading.local = field(default_factory=threading.local)
    _service_lock: threading.Lock = field(default_factory=threading.Lock)
    active_statuses: tuple[dg.DagsterRunStatus, ...] = tuple(ACTIVE_RUN_STATUSES)
    # Set when the session ends: scenarios still waiting in their threads give up at once.
    stopping: threading.Event = field(default_factory=threading.Event)
    # PIPELINE_BASE_DIR is a tmpfs of its own, so that a scenario may fill it (None: mounting failed, see why).
    base_tmpfs: Tmpfs | None = None
    tmpfs_problem: str = ""
    mounts: list[Tmpfs] = field(default_factory=list)

    # ------------------------------------------------------------------ set-up

    @classmethod
    def create(
        cls, root: Path, scenarios: dict[str, Callable[[str, list[str]], dict[str, Any]]], per_scenario: dict[str, int]
    ) -> FaultWorld:
        # Outside pytest's temporary directory, which the postgres user may not enter.
        pg = PrivatePostgres(Path(tempfile.mkdtemp(prefix="ccat-faults-pg-")))
        pg.init()
        pg.start()
        ops_url = pg.create_database("ccat_ops")
        dagster_url = pg.create_database("dagster").replace("+psycopg2", "")
        upgrade(ops_url)
        data_dir = root / "data"
        engine = make_engine(ops_url)
        with Session(engine) as session, session.begin():
            seed_demo(session, data_dir=data_dir, scans=SEED_SCANS)
            # Nothing has arrived yet: each scenario starts by archiving its own packages ("new data").
            session.execute(delete(m.PhysicalCopy).where(m.PhysicalCopy.raw_data_package_id.is_not(None)))
            session.execute(m.RawDataPackage.__table__.update().values(state=PackageState.WAITING.value))
            packages = list(session.scalars(select(m.RawDataPackage.name).order_by(m.RawDataPackage.id)))
        home = root / "dagster-home"
        home.mkdir()
        (home / "dagster.yaml").write_text(yaml.safe_dump(instance_config()))
        env = {
            **os.environ,
            "CCAT_DAGSTER_DATA_DIR": str(data_dir),
            "CCAT_OPS_DB_URL": ops_url,
            "CCAT_WORKFLOW_MANAGER_CONTAINER_RUNTIME": "bubblewrap",
            "CCAT_WORKFLOW_MANAGER_HPC_BACKEND": "local",
            "CCAT_WORKFLOW_MANAGER_POLL_INTERVAL_SECONDS": "1",
            # Slurm's pacing (20 queries a minute in production, tests/test_slurm_polling.py) would stretch every
            # Slurm scenario by its 3-6 s pauses; the scenarios are about recovery, not about pacing.
            "CCAT_WORKFLOW_MANAGER_SCHEDULER_QUERIES_PER_MINUTE": "600",
            "CCAT_WORKFLOW_MANAGER_SENSOR_INTERVAL_SECONDS": "2",
            "CCAT_WORKFLOW_MANAGER_LOCAL_MAX_RUNNING": "8",
            # The memory escalation's cap, low enough that a scenario reaches it (the payloads ask for 1 GiB).
            "CCAT_WORKFLOW_MANAGER_MAX_MEMORY_GB": str(MEMORY_CAP_GB),
            "DAGSTER_HOME": str(home),
            "DAGSTER_PG_URL": dagster_url,
        }
        world = cls(root, pg, ops_url, dagster_url, env, home, root / "workspace.yaml", packages)
        offset = 0
        with Session(engine) as session, session.begin():
            for scenario, build in scenarios.items():
                count = per_scenario.get(scenario, 2)
                chosen = packages[offset : offset + count]
                offset += count
                if len(chosen) < count:
                    raise RuntimeError(f"the seed has too few packages for scenario {scenario}")
                name = f"f_{scenario}"
                apply_pipeline_spec(session, parse_pipeline_spec(build(name, chosen), origin=scenario))
                world.scenarios[scenario] = name
        engine.dispose()
        try:
            world.base_tmpfs = world.mount_tmpfs(world.pipeline_base_dir, BASE_TMPFS_MB)
        except OSError as error:
            world.tmpfs_problem = str(error)
        return world

    def start_services(self) -> None:
        worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
        port = _free_port(24100 + 20 * (int(worker) if worker.isdigit() else 0))
        self.workspace.write_text(
            yaml.safe_dump(
                {"load_from": [{"grpc_server": {"host": "localhost", "port": port, "location_name": LOCATION}}]}
            )
        )
        bindir = Path(sys.executable).parent
        self.code_server = Supervised(
            "code-server",
            [
                str(bindir / "dagster"),
                "code-server",
                "start",
                "-m",
                "ccat_dagster.definitions",
                "-a",
                "defs",
                "-h",
                "localhost",
                "-p",
                str(port),
                "--location-name",
                LOCATION,
            ],
            dict(self.env),
            self.root / "code-server.log",
            REPO,
        )
        self.daemon = Supervised(
            "dagster-daemon",
            [str(bindir / "dagster-daemon"), "run", "-w", str(self.workspace)],
            dict(self.env),
            self.root / "daemon.log",
            REPO,
        )
        self.code_server.start()
        self.wait_for_code_server()
        self.daemon.start()
        started = subprocess.run(
            [str(bindir / "dagster"), "sensor", "start", "--start-all", "-w", str(self.workspace)],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        if started.returncode != 0:
            raise RuntimeError(f"dagster sensor start --start-all failed:\n{started.stdout}{started.stderr}")
        # Each scenario turns its own pipeline's sensor on while it runs (``record``).
        self.set_sensors(self.scenarios.values(), running=False)

    def set_sensors(self, pipelines: Iterable[str], *, running: bool) -> None:
        """Turn the pipelines' new-data sensors on or off in the instance (the daemon reads the state every loop).

        Every running sensor costs the code server an evaluation per interval (2 s here); with every scenario's
        sensor on, the code server spent its time on idle ticks and launches waited behind them.
        """
        names = {f"{pipeline}__new_data" for pipeline in pipelines}
        instance = self.instance()
        for state in instance.all_instigator_state():
            if state.name in names:
                status = type(state.status)
                instance.update_instigator_state(state.with_status(status.RUNNING if running else status.STOPPED))

    def wait_for_code_server(self, timeout: float = 120) -> None:
        assert self.code_server is not None
        port = yaml.safe_load(self.workspace.read_text())["load_from"][0]["grpc_server"]["port"]
        bindir = Path(sys.executable).parent
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            probe = subprocess.run(
                [str(bindir / "dagster"), "api", "grpc-health-check", "-p", str(port), "-h", "localhost"],
                env=self.env,
                capture_output=True,
                timeout=60,
                check=False,
            )
            if probe.returncode == 0:
                return
            if not self.code_server.alive():
                raise RuntimeError(f"the code server exited:\n{self.code_server.tail()}")
            time.sleep(1)
        raise RuntimeError(f"the code server did not serve within {timeout} s:\n{self.code_server.tail()}")

    def mount_tmpfs(self, path: Path, size_mb: float) -> Tmpfs:
        mount = Tmpfs(path, size_mb)
        self.mounts.append(mount)
        return mount

    def require_tmpfs(self) -> Tmpfs:
        """The tmpfs under PIPELINE_BASE_DIR, or fail (in CI) / skip saying why."""
        if self.base_tmpfs is not None:
            return self.base_tmpfs
        message = f"the full-disk scenarios need to mount a tmpfs (as root): {self.tmpfs_problem}"
        if os.environ.get("CI") or os.environ.get("CCAT_REQUIRE_ALL_BACKENDS"):
            raise AssertionError(message)
        pytest.skip(message)

    def stop(self) -> None:
        self.stopping.set()
        for service in (self.daemon, self.code_server):
            if service is not None:
                service.kill(signal.SIGTERM)
        self.kill_stray_payloads()
        for mount in reversed(self.mounts):
            mount.unmount()
        if self._engine is not None:
            self._engine.dispose()
        self.pg.remove()

    def kill_stray_payloads(self) -> None:
        """Local jobs of the suite still running (a failed scenario): they belong to this run's data dir only."""
        for pid in processes_mentioning(str(self.root)):
            if pid != os.getpid():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    # ------------------------------------------------------------------ access

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = make_engine(self.ops_db_url)
        return self._engine

    def instance(self) -> dg.DagsterInstance:
        """This thread's Dagster instance (the scenarios of a module run in threads of their own)."""
        instance = getattr(self._local, "instance", None)
        if instance is None:
            os.environ["DAGSTER_PG_URL"] = self.dagster_pg_url
            instance = self._local.instance = dg.DagsterInstance.from_config(str(self.home))
        return instance

    @property
    def archive_dir(self) -> Path:
        return Path(self.env["CCAT_DAGSTER_DATA_DIR"]) / "archive"

    @property
    def pipeline_base_dir(self) -> Path:
        return Path(self.env["CCAT_DAGSTER_DATA_DIR"]) / "pipelines"

    def local_job_status(self, job_id: str) -> dict[str, Any]:
        """The local backend's status record of a job (payload pid and process group while it runs)."""
        path = self.pipeline_base_dir / ".local-jobs" / f"{job_id}.json"
        return self.wait_for(f"the status record of local job {job_id}", lambda: _read_json(path))

    def keys_of_packages(self, pipeline: str, packages: dict[str, str]) -> dict[str, str]:
        """{label: sub-group key of the work step holding that package}; known before the data arrives (the work
        step groups by executed_obs_unit, one package each)."""
        with Session(self.engine) as session:
            eou = dict(
                session.execute(select(m.RawDataPackage.name, m.RawDataPackage.executed_obs_unit_id)).tuples().all()
            )
        return {
            label: encode_sub_group_key([("executed_obs_unit", str(eou[name]))]) for label, name in packages.items()
        }

    def readiness(self, pipeline: str, step: str) -> dict[str, str]:
        """{sub-group key: what the planner says of it now} for the step's current sub-groups."""
        with Session(self.engine) as session:
            planner = Planner(session, load_pipeline(session, pipeline), now=m.utcnow())
            groups = planner.sub_groups(step)
            return {
                p.sub_group_key: p.readiness.value for p in planner.plan(step, groups.values(), respect_cooldown=False)
            }

    def attempts_by_key(self, pipeline: str, step: str) -> dict[str, list[m.ExecutedReductionStep]]:
        by_key: dict[str, list[m.ExecutedReductionStep]] = {}
        for attempt in self.attempts(pipeline, step):
            by_key.setdefault(attempt.sub_group_key, []).append(attempt)
        return by_key

    def set_pool_limit(self, pool: str, slots: int) -> None:
        """What `dagster instance concurrency set POOL SLOTS` does, without a CLI process (seconds of imports on a
        busy machine: one timed out after 120 s while every scenario ran)."""
        self.instance().event_log_storage.set_concurrency_slots(pool, slots)

    def packages_of(self, pipeline: str) -> list[str]:
        with Session(self.engine) as session:
            rules = load_pipeline(session, pipeline).data_grouping.filter_rules
        return list(rules[0]["value"])

    def arrive(self, pipeline: str, names: Sequence[str] | None = None) -> list[str]:
        """New data: the pipeline's packages (or ``names``) become archived, as data-transfer would report."""
        names = list(names if names is not None else self.packages_of(pipeline))
        with Session(self.engine) as session, session.begin():
            archive = session.scalars(select(m.DataLocation).where(m.DataLocation.name == ARCHIVE_LOCATION)).one()
            for package in session.scalars(select(m.RawDataPackage).where(m.RawDataPackage.name.in_(names))):
                package.state = PackageState.ARCHIVED
                package.updated_at = m.utcnow()
                session.add(
                    m.PhysicalCopy(
                        location=archive,
                        raw_data_package=package,
                        path=f"{package.name}.tar",
                        status=PhysicalCopyStatus.PRESENT,
                        checksum=package.checksum,
                    )
                )
        return names

    def attempts(self, pipeline: str, step: str | None = None) -> list[m.ExecutedReductionStep]:
        return pipeline_attempts(self.engine, pipeline, step=step, with_transitions=False)

    def runs(self, pipeline: str, statuses: Sequence[dg.DagsterRunStatus] | None = None) -> list[dg.DagsterRun]:
        filters = dg.RunsFilter(tags={"ccat/pipeline": pipeline}, statuses=list(statuses) if statuses else [])
        return list(self.instance().get_runs(filters=filters))

    def worker_pid(self, run_id: str) -> int | None:
        records = self.instance().get_records_for_run(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT, limit=50)
        for record in records.records:
            event = record.event_log_entry.dagster_event
            pid = event.engine_event_data.metadata.get("pid") if event is not None else None
            if pid is not None:
                return int(str(pid.value))
        return None

    # ------------------------------------------------------------------ waiting and checking

    def wait_for(
        self, what: str, predicate: Callable[[], Any], timeout: float = 300, interval: float = 1.0, pipeline: str = ""
    ) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.stopping.is_set():
                raise AssertionError(f"the session ended while waiting for {what}")
            value = predicate()
            if value:
                return value
            self.supervise()
            time.sleep(interval)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{self.diagnostics(pipeline)}")

    def timeline(self, pipeline: str) -> str:
        """The pipeline's runs, oldest first: status, step, adoption tags, and times relative to the first."""
        records = self.instance().get_run_records(filters=dg.RunsFilter(tags={"ccat/pipeline": pipeline}))
        records = sorted(records, key=lambda r: r.create_timestamp.timestamp())
        if not records:
            return f"(no run of {pipeline})"
        t0 = records[0].create_timestamp.timestamp()

        def at(value: float | None) -> str:
            return "-" if value is None else f"{value - t0:6.1f}"

        return "\n".join(
            f"{r.dagster_run.run_id[:8]} {r.dagster_run.status.value:<9} {r.dagster_run.tags.get('ccat/step', '?'):<8} "
            f"created {at(r.create_timestamp.timestamp())} started {at(r.start_time)} ended {at(r.end_time)} "
            f"adoption {r.dagster_run.tags.get('ccat/adoption', '-')} "
            f"from {r.dagster_run.tags.get('ccat/adopted_from', '-')[:8]}"
            for r in records
        )

    def supervise(self) -> None:
        """Restart a service that died, as systemd's Restart=always would (one thread at a time)."""
        with self._service_lock:
            for service in (self.code_server, self.daemon):
                if service is not None and service.ensure_running() and service is self.code_server:
                    self.wait_for_code_server()

    def diagnostics(self, pipeline: str = "") -> str:
        parts = [self.timeline(pipeline)] if pipeline else []
        for service in (self.daemon, self.code_server):
            if service is not None:
                parts.append(f"--- {service.name} (restarts {service.restarts}) ---\n{service.tail(3000)}")
        return "\n".join(parts)

    def complete(self, pipeline: str) -> bool:
        """Every sub-group of every step is up to date, nothing is in flight, and no run of it is active."""
        if self.runs(pipeline, ACTIVE_RUN_STATUSES):
            return False
        with Session(self.engine) as session:
            spec = load_pipeline(session, pipeline)
            planner = Planner(session, spec, now=m.utcnow())
            for step in spec.steps:
                groups = planner.sub_groups(step.name)
                if not groups:
                    return False
                plans = planner.plan(step.name, groups.values(), respect_cooldown=False)
                if any(p.readiness is not Readiness.UP_TO_DATE for p in plans):
                    return False
        return True

    def wait_complete(self, pipeline: str, timeout: float = 600, stuck_after: float = 150) -> None:
        """Until the pipeline is complete; fails early once it has been idle (no run active, no attempt in
        flight) for ``stuck_after`` seconds without being complete: nothing would ever finish it."""
        idle_since: list[float] = []

        def done() -> bool:
            if self.complete(pipeline):
                return True
            busy = self.runs(pipeline, ACTIVE_RUN_STATUSES) or any(
                not a.status.is_terminal for a in self.attempts(pipeline)
            )
            if busy:
                idle_since.clear()
            elif not idle_since:
                idle_since.append(time.monotonic())
            elif time.monotonic() - idle_since[0] > stuck_after:
                attempts = [
                    (a.id, a.sub_group_key[-8:], a.status.value, (a.error or "")[:200]) for a in self.attempts(pipeline)
                ]
                raise AssertionError(
                    f"pipeline {pipeline} is stuck: idle for {stuck_after:.0f} s and not complete; attempts: "
                    f"{attempts}\n{self.timeline(pipeline)}"
                )
            return False

        self.wait_for(f"pipeline {pipeline} to complete", done, timeout=timeout, pipeline=pipeline)

    def violations(self) -> list[Violation]:
        with Session(self.engine) as session:
            return check_invariants(session, reruns_allowed=False)

    def rows_of(self, pipeline: str) -> set[tuple[str, int]]:
        """The ops-db rows of one pipeline: its attempts, their products, those products' and its packages' copies."""
        with Session(self.engine) as session:
            step_ids = select(m.ReductionStep.id).join(m.Pipeline).where(m.Pipeline.name == pipeline)
            attempts = session.scalars(
                select(m.ExecutedReductionStep.id).where(m.ExecutedReductionStep.reduction_step_id.in_(step_ids))
            ).all()
            products = session.scalars(
                select(m.DataProduct.id).where(m.DataProduct.reduction_step_id.in_(step_ids))
            ).all()
            packages = select(m.RawDataPackage.id).where(m.RawDataPackage.name.in_(self.packages_of(pipeline)))
            copies = session.scalars(
                select(m.PhysicalCopy.id).where(
                    m.PhysicalCopy.data_product_id.in_(products) | m.PhysicalCopy.raw_data_package_id.in_(packages)
                )
            ).all()
        return (
            {("executed_reduction_step", i) for i in attempts}
            | {("data_product", i) for i in products}
            | {("physical_copy", i) for i in copies}
        )

    def violations_of(self, pipeline: str) -> list[Violation]:
        """The invariant violations that involve the pipeline's rows (scenarios run side by side)."""
        rows = self.rows_of(pipeline)
        return [v for v in self.violations() if rows.intersection(v.rows)]

    def measure(self, outcome: Outcome, pipeline: str) -> None:
        """Products lost and duplicated for the pipeline's data, and the invariants on its rows."""
        violations = self.violations_of(pipeline)
        outcome.duplicated = sum(
            1
            for v in violations
            if v.kind in (InvariantKind.DUPLICATE_CURRENT_PRODUCT, InvariantKind.DUPLICATE_COMPLETED_ATTEMPT)
        )
        lost = sum(
            1
            for v in violations
            if v.kind
            in (
                InvariantKind.COPY_WITHOUT_FILE,
                InvariantKind.PRODUCT_WITHOUT_COPY,
                InvariantKind.COMPLETED_WITHOUT_PRODUCTS,
            )
        )
        with Session(self.engine) as session:
            spec = load_pipeline(session, pipeline)
            planner = Planner(session, spec, now=m.utcnow())
            for step in spec.steps:
                groups = planner.sub_groups(step.name)
                plans = planner.plan(step.name, groups.values(), respect_cooldown=False)
                lost += sum(1 for p in plans if p.readiness is not Readiness.UP_TO_DATE)
        outcome.products_lost = lost
        assert violations == [], "ops-db invariants broken:\n" + "\n".join(map(str, violations))
        assert lost == 0, f"{lost} sub-group(s) of {pipeline} without their products"

    def fault_while_jobs_run(self, pipeline: str, outcome: Outcome, inject: Callable[[], None]) -> None:
        """New data; once its jobs run, ``inject()`` the fault; then the pipeline completes, the attempts that ran
        at the fault are collected once, nothing is lost or duplicated and the invariants hold on its rows."""
        self.arrive(pipeline)
        running = self.wait_for("work attempts running", lambda: self.running_attempts(pipeline), pipeline=pipeline)
        fault = time.monotonic()
        inject()
        self.wait_complete(pipeline)
        outcome.recovery_seconds = time.monotonic() - fault
        self.assert_collected_once(pipeline, running)
        self.measure(outcome, pipeline)

    def running_attempts(self, pipeline: str, step: str = "work") -> set[int]:
        return {a.id for a in self.attempts(pipeline, step) if a.status is RunStatus.RUNNING}

    def kill_run_worker_mid_job(self, pipeline: str) -> tuple[str, set[int]]:
        """SIGKILL the run worker of the pipeline's work run once its jobs run; its run id and those attempts."""
        running = self.wait_for("work attempts running", lambda: self.running_attempts(pipeline), pipeline=pipeline)
        (owner,) = {a.dagster_run_id for a in self.attempts(pipeline, "work") if a.id in running}
        pid = self.wait_for("the run worker's pid", lambda: self.worker_pid(owner))
        os.kill(pid, signal.SIGKILL)
        return owner, running

    def assert_adopted(self, pipeline: str, dead_run_id: str, attempt_ids: set[int]) -> None:
        """Dagster never noticed the death by itself (no worker health check): the reconcile sensor failed the
        run, and exactly one run adopted its jobs and collected them."""
        assert self.instance().get_run_by_id(dead_run_id).status == dg.DagsterRunStatus.FAILURE
        adopters = [r for r in self.runs(pipeline) if r.tags.get("ccat/adopted_from") == dead_run_id]
        assert len(adopters) == 1 and adopters[0].status == dg.DagsterRunStatus.SUCCESS, self.timeline(pipeline)
        self.assert_collected_once(pipeline, attempt_ids)

    def assert_collected_once(self, pipeline: str, attempt_ids: set[int]) -> None:
        """The attempts in flight at the fault ended COMPLETED themselves: their jobs were adopted, not redone."""
        by_id = {a.id: a for a in self.attempts(pipeline)}
        assert {i: by_id[i].status for i in attempt_ids} == {i: RunStatus.COMPLETED for i in attempt_ids}, [
            (a.id, a.sub_group_key, a.status.value, a.error) for a in by_id.values()
        ]
        assert set(self.completed_per_key(pipeline, "work").values()) == {1}

    def completed_per_key(self, pipeline: str, step: str) -> dict[str, int]:
        with Session(self.engine) as session:
            rows = session.execute(
                select(m.ExecutedReductionStep.sub_group_key, func.count())
                .join(m.ReductionStep)
                .join(m.Pipeline)
                .where(m.Pipeline.name == pipeline, m.ReductionStep.name == step)
                .where(m.ExecutedReductionStep.status == RunStatus.COMPLETED)
                .group_by(m.ExecutedReductionStep.sub_group_key)
            ).all()
        return {key: count for key, count in rows}


def assert_invariants_hold(world: FaultWorld) -> None:
    """The whole of the world's ops-db, every pipeline of its module, once its scenarios are over."""
    violations = world.violations()
    assert violations == [], "\n".join(map(str, violations))


def instance_config() -> dict[str, Any]:
    """The production dagster.yaml with the intervals of run monitoring and launch retries shortened."""
    config = yaml.safe_load(PRODUCTION_DAGSTER_YAML.read_text())
    config["run_monitoring"].update(
        {"poll_interval_seconds": 2, "free_slots_after_run_end_seconds": 2, "start_timeout_seconds": 120}
    )
    # The scenarios of a module run side by side: room for all their runs, dead ones included (each pipeline keeps
    # its own limits). With 16 runs and 12 per backend, runs of one scenario waited minutes for another's to end.
    config["concurrency"]["runs"]["max_concurrent_runs"] = 48
    for limit in config["concurrency"]["runs"]["tag_concurrency_limits"]:
        if limit.get("key") == "ccat/backend":
            limit["limit"] = 48
    config["run_coordinator"].setdefault("config", {}).update(
        {"user_code_failure_retry_delay": 2, "dequeue_interval_seconds": 1}
    )
    return config


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) and value.get("pgid") else None
