"""Shared fixtures: throwaway ops-db databases on PostgreSQL (the real server) and SQLite.

PostgreSQL is required: where the server is down the fixture starts it; in CI (``CI`` set) a missing server
fails the run instead of skipping, so the PostgreSQL tests can never silently disappear.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine

from ccat_dagster.opsdb.engine import make_engine
from ccat_dagster.opsdb.migrate import upgrade

# The production Dagster instance configuration; every test that reads it goes through this one name.
PRODUCTION_DAGSTER_YAML = Path(__file__).resolve().parents[1] / "deploy" / "dagster.yaml"

PG_ADMIN_URL = os.environ.get("CCAT_TEST_PG_ADMIN_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")


def _pg_available() -> bool:
    engine = create_engine(PG_ADMIN_URL)
    try:
        with engine.connect():
            return True
    except Exception:  # noqa: BLE001 - any connection failure means "not available"
        return False
    finally:
        engine.dispose()


def _ensure_pg() -> None:
    if _pg_available():
        return
    if shutil.which("pg_ctlcluster"):
        versions = sorted(os.listdir("/etc/postgresql")) if os.path.isdir("/etc/postgresql") else []
        for version in versions:
            subprocess.run(
                ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "start"],
                check=False,
                capture_output=True,
            )
    if not _pg_available():
        message = f"PostgreSQL is not reachable at {PG_ADMIN_URL} and could not be started"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def create_pg_database(prefix: str = "ccat_test") -> str:
    """Create an empty database with a unique name; returns its URL."""
    _ensure_pg()
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"


def drop_pg_database(url: str) -> None:
    name = url.rsplit("/", 1)[1]
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A migrated PostgreSQL ops-db shared by the session (tests must not depend on each other's rows)."""
    url = create_pg_database()
    upgrade(url)
    yield url
    drop_pg_database(url)


@pytest.fixture
def fresh_pg_url() -> Iterator[str]:
    """An empty (unmigrated) PostgreSQL database for one test."""
    url = create_pg_database()
    yield url
    drop_pg_database(url)


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    url = f"sqlite:///{tmp_path / 'opsdb.sqlite'}"
    upgrade(url)
    return url


@pytest.fixture(params=["postgresql", "sqlite"])
def db_url(request, tmp_path) -> Iterator[str]:
    """A fresh migrated ops-db, once per dialect."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'opsdb.sqlite'}"
        upgrade(url)
        yield url
        return
    url = create_pg_database()
    upgrade(url)
    yield url
    drop_pg_database(url)


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


def xdist_group_of(test_file: str, *, root: Path) -> str:
    """The pytest-xdist work unit of a test file (``scripts/test`` runs the suite on several workers).

    One unit per test file, so that a module's expensive fixtures (daemons, webservers, PostgreSQL clusters)
    start once. Every file with a test on the single-node Slurm is one unit: the node has two CPUs, the Slurm
    tests measure job starts and the fault suite stops slurmctld, so they must not overlap each other. The other
    fault modules are one unit too: each starts a whole Dagster deployment, and two at once starve both.
    """
    path = root / test_file
    try:
        uses_slurm = "pytest.mark.slurm" in path.read_text(encoding="utf-8")
    except OSError:
        uses_slurm = False
    if uses_slurm:
        return "slurm"
    if path.parent.name == "faults":
        return "faults"
    return test_file


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist, absent with -p no:xdist
def pytest_xdist_make_scheduler(config, log):  # type: ignore[no-untyped-def]
    """``--dist loadgroup`` with the units of ``xdist_group_of``.

    pytest-xdist 3.8 groups by appending ``@group`` to ``item._nodeid``, which pytest 9 no longer reads (a node id
    is built from ``item._id``): its loadgroup silently ran every test as a unit of its own, so Slurm tests
    overlapped and every worker started its own fault world. This scheduler decides the units from the node ids
    alone, on the controller; ``tests/test_xdist_units.py`` checks it on a real ``pytest -n`` run.
    """
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    root = Path(str(config.rootpath))
    units: dict[str, str] = {}

    class FileGroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            test_file = nodeid.split("::", 1)[0]
            if test_file not in units:
                units[test_file] = xdist_group_of(test_file, root=root)
            return units[test_file]

    return FileGroupScheduling(config, log)


# Figures of the fault suite's scenarios handed over by the pytest-xdist workers that ran them.
_fault_outcomes_from_workers: list[dict] = []


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    from tests.faults.harness import OUTCOMES_KEY

    _fault_outcomes_from_workers.extend(getattr(node, "workeroutput", {}).get(OUTCOMES_KEY, []))


def pytest_sessionfinish(session, exitstatus) -> None:
    if _fault_outcomes_from_workers:
        from tests.faults.conftest import Outcome, write_reliability

        write_reliability([Outcome(**figures) for figures in _fault_outcomes_from_workers])


def _nothing_may_be_skipped() -> bool:
    return bool(os.environ.get("CI") or os.environ.get("CCAT_REQUIRE_ALL_BACKENDS"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under ``CI`` or ``CCAT_REQUIRE_ALL_BACKENDS`` (``scripts/test`` exports it) a skipped test fails.

    The suite's real parts (PostgreSQL, Slurm, bubblewrap, the registry, Chromium) are installed by the test
    command itself: a test that skips there has lost the thing it proves, and must not pass quietly.
    """
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail") and _nothing_may_be_skipped():
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped where nothing may be skipped (CI / CCAT_REQUIRE_ALL_BACKENDS): {reason}"


def require_slurm() -> None:
    """The single-node Slurm of ``scripts/slurm-single-node.sh``: skipped where it is not installed (a skip fails
    under CI, see above), failed where it is installed but slurmctld does not answer."""
    if shutil.which("sinfo") is None or shutil.which("scontrol") is None:
        pytest.skip("Slurm client commands not installed (sinfo not found); run scripts/slurm-single-node.sh as root")
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30, check=False)
    if "is UP" not in ping.stdout:
        pytest.fail(f"Slurm is installed but slurmctld does not answer ({ping.stdout.strip()})")
