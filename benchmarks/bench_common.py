"""What every benchmark here shares: the PostgreSQL server it builds its databases on, the machine description
that goes with each figure, and writing its section of docs/benchmarks.md."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

from sqlalchemy import create_engine, text

ADMIN_URL = os.environ.get("CCAT_BENCH_PG_ADMIN_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")
REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "benchmarks.md"


def db_url(name: str) -> str:
    return ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"


def database_exists(name: str) -> bool:
    admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        found = connection.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}).first()
    admin.dispose()
    return found is not None


def recreate_database(name: str) -> str:
    """Drop (with its connections) and create database ``name``; returns its URL."""
    admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return db_url(name)


def machine() -> str:
    """CPU, memory and the PostgreSQL server's version and settings, as Markdown list items."""
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = subprocess.run(["free", "-g"], capture_output=True, text=True, check=False).stdout.rstrip()
    engine = create_engine(ADMIN_URL)
    with engine.connect() as connection:
        version = connection.execute(text("SHOW server_version")).scalar_one()
        settings = {
            name: connection.execute(text(f"SHOW {name}")).scalar_one()
            for name in ("shared_buffers", "work_mem", "max_parallel_workers_per_gather")
        }
    engine.dispose()
    return (
        f"- CPU: {cpu}; `nproc` = {os.cpu_count()}\n"
        f"- `free -g`:\n\n```\n{memory}\n```\n"
        f"- PostgreSQL {version} on the same machine, default configuration "
        f"({', '.join(f'{k}={v}' for k, v in settings.items())}); Python {platform.python_version()}, "
        f"SQLAlchemy + psycopg2"
    )


def write_section(section: str, report: str) -> None:
    """Replace (or append) the section headed ``section`` of docs/benchmarks.md, leaving the others alone."""
    existing = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n\n"
    start = existing.find(section)
    if start == -1:
        updated = existing.rstrip("\n") + "\n\n" + report
    else:
        end = existing.find("\n## ", start + len(section))
        updated = existing[:start] + report + ("" if end == -1 else existing[end:])
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    DOCS.write_text(updated)
