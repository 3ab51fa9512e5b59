"""The demo observatory: deterministic, realistic, real files whose checksums match ops-db."""

from __future__ import annotations

import hashlib
import tarfile

from sqlalchemy import select
from sqlalchemy.orm import Session

from ccat_dagster.demo.seed import archive_waiting_packages, seed_demo
from ccat_dagster.opsdb import models as m
from ccat_dagster.opsdb.engine import make_engine
from ccat_dagster.opsdb.enums import PackageState
from ccat_dagster.opsdb.migrate import upgrade


def _snapshot(url: str, data_dir) -> list[tuple]:
    engine = make_engine(url)
    with Session(engine) as session, session.begin():
        seed_demo(session, data_dir=data_dir, scans=12, seed=7)
    with Session(engine) as session:
        rows = [
            (
                p.name,
                p.checksum,
                p.size_bytes,
                p.state.value,
                str(p.executed_obs_unit_id),
                tuple((f.relative_path, f.checksum, str(f.id)) for f in p.files),
            )
            for p in session.scalars(select(m.RawDataPackage).order_by(m.RawDataPackage.name))
        ]
    engine.dispose()
    return rows


def test_seed_is_deterministic_across_dialects(pg_url, tmp_path):
    # pg_url is shared by the session: seed into a fresh SQLite twice and compare with a fresh PostgreSQL db.
    from .conftest import create_pg_database, drop_pg_database

    first = f"sqlite:///{tmp_path / 'a.sqlite'}"
    upgrade(first)
    pg = create_pg_database()
    try:
        upgrade(pg)
        assert _snapshot(first, tmp_path / "a") == _snapshot(pg, tmp_path / "b")
    finally:
        drop_pg_database(pg)
    assert (tmp_path / "a" / "archive").is_dir()


def test_seed_writes_real_tars_matching_ops_db(sqlite_url, tmp_path):
    engine = make_engine(sqlite_url)
    with Session(engine) as session, session.begin():
        summary = seed_demo(session, data_dir=tmp_path, scans=12)
        assert summary.packages == 12
        assert set(summary.packages_by_state) == {"archived", "transferring", "waiting", "failed"}
        modules = {p.instrument_module.name for p in session.scalars(select(m.RawDataPackage))}
        assert modules == {"LFA", "HFA", "PCAM280"}
        for package in session.scalars(select(m.RawDataPackage)):
            tar_path = tmp_path / "archive" / f"{package.name}.tar"
            assert hashlib.sha256(tar_path.read_bytes()).hexdigest() == package.checksum
            with tarfile.open(tar_path) as tar:
                for raw_file in package.files:
                    content = tar.extractfile(f"{package.name}/{raw_file.relative_path}").read()
                    assert hashlib.sha256(content).hexdigest() == raw_file.checksum
                    assert len(content) == raw_file.size_bytes
        nights = {e.start_time.date() for e in session.scalars(select(m.ExecutedObsUnit))}
        assert len(nights) >= 3
    # Seeding again changes nothing.
    with Session(engine) as session, session.begin():
        assert seed_demo(session, data_dir=tmp_path, scans=12).already_seeded
    engine.dispose()


def test_archive_moves_waiting_packages_and_registers_copies(sqlite_url, tmp_path):
    engine = make_engine(sqlite_url)
    with Session(engine) as session, session.begin():
        seed_demo(session, data_dir=tmp_path, scans=12)
    with Session(engine) as session, session.begin():
        names = archive_waiting_packages(session, limit=2)
    with Session(engine) as session:
        for name in names:
            package = session.scalars(select(m.RawDataPackage).where(m.RawDataPackage.name == name)).one()
            assert package.state is PackageState.ARCHIVED
            copies = session.scalars(select(m.PhysicalCopy).where(m.PhysicalCopy.raw_data_package_id == package.id))
            assert len(copies.all()) == 1
    engine.dispose()
