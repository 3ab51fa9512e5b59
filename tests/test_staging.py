"""Staging: LocalStager copies/verifies/unpacks safely, ExternalStager drives StagingJobs, upstream
products must be present. Run on PostgreSQL and SQLite where ops-db behaviour matters."""

from __future__ import annotations

import io
import tarfile
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ccat_dagster.execution import staging
from ccat_dagster.execution.staging import (
    ChecksumMismatch,
    ExternalStager,
    LocalStager,
    MissingUpstreamProduct,
    StagingError,
    StagingTimeout,
    UnsafeArchive,
    ensure_staging_jobs,
    require_present_products,
    safe_unpack,
)
from ccat_dagster.opsdb import models as m
from ccat_dagster.opsdb.engine import make_engine, session_scope
from ccat_dagster.opsdb.enums import DataProductType, PhysicalCopyStatus, RunStatus, StagingJobStatus

from .execution_factories import (
    StagingWorld,
    add_product,
    make_staging_world,
    make_step_attempt,
    package_tar,
    sha256,
)


@pytest.fixture
def sqlite_engine(sqlite_url):
    engine = make_engine(sqlite_url)
    yield engine
    engine.dispose()


def _world(engine, tmp_path, **kwargs) -> StagingWorld:
    with session_scope(engine) as session:
        return make_staging_world(session, tmp_path, **kwargs)


def _copies_at(engine, location_id: int) -> list[m.PhysicalCopy]:
    with Session(engine) as session:
        return list(
            session.scalars(
                select(m.PhysicalCopy)
                .where(m.PhysicalCopy.data_location_id == location_id)
                .where(m.PhysicalCopy.raw_data_package_id.is_not(None))
                .order_by(m.PhysicalCopy.id)
            )
        )


def _leftovers(raw_root: Path) -> list[str]:
    return sorted(p.name for p in raw_root.iterdir() if p.name.startswith(".")) if raw_root.exists() else []


# ---------------------------------------------------------------------------------------------- LocalStager


def test_local_stager_stages_verifies_and_registers(engine, tmp_path):
    sw = _world(engine, tmp_path)
    messages: list[str] = []
    staged = LocalStager().stage(
        engine=engine,
        package_ids=[*sw.package_ids, sw.package_ids[0]],
        processing_location_id=sw.world.processing.id,
        timeout_seconds=60,
        progress=messages.append,
    )
    assert list(staged) == sw.package_ids
    raw_root = sw.processing_root / "raw"
    for package in sw.packages:
        result = staged[package.id]
        assert result.package_name == package.name
        assert result.host_dir == raw_root / package.name
        expected = sw.contents[package.name]
        assert [f.relative_path for f in result.files] == sorted(expected)
        for raw_file_id, relative_path, size, digest in result.files:
            data = (result.host_dir / relative_path).read_bytes()
            assert data == expected[relative_path] and size == len(data) and digest == sha256(data)
            assert raw_file_id is not None
        assert not (result.host_dir / f"{package.name}.tar").exists()
    copies = _copies_at(engine, sw.world.processing.id)
    assert [(c.raw_data_package_id, c.status, c.path) for c in copies] == [
        (p.id, PhysicalCopyStatus.STAGED, str(raw_root / p.name)) for p in sw.packages
    ]
    assert _leftovers(raw_root) == []
    assert any("staging" in msg for msg in messages)


def test_already_staged_package_is_not_staged_again(engine, tmp_path):
    sw = _world(engine, tmp_path, n_packages=1)
    stager = LocalStager()
    args = dict(
        engine=engine,
        package_ids=sw.package_ids,
        processing_location_id=sw.world.processing.id,
        timeout_seconds=60,
    )
    first = stager.stage(**args)
    # With the archive tar gone, only the "already staged" path can succeed.
    (sw.archive_root / f"{sw.packages[0].name}.tar").unlink()
    messages: list[str] = []
    second = stager.stage(**args, progress=messages.append)
    assert second == first
    assert messages == ["1 package(s) already staged at processing"]
    assert len(_copies_at(engine, sw.world.processing.id)) == 1


def test_copy_row_whose_directory_vanished_is_restaged_in_place(engine, tmp_path):
    sw = _world(engine, tmp_path, n_packages=1)
    stager = LocalStager()
    args = dict(
        engine=engine,
        package_ids=sw.package_ids,
        processing_location_id=sw.world.processing.id,
        timeout_seconds=60,
    )
    host_dir = stager.stage(**args)[sw.package_ids[0]].host_dir
    for path in sorted(host_dir.rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    host_dir.rmdir()
    with session_scope(engine) as session:
        session.scalars(
            select(m.PhysicalCopy).where(m.PhysicalCopy.data_location_id == sw.world.processing.id)
        ).one().status = PhysicalCopyStatus.DELETED
    again = stager.stage(**args)[sw.package_ids[0]]
    assert (again.host_dir / "scan.json").is_file()
    copies = _copies_at(engine, sw.world.processing.id)
    assert [(c.status, c.path) for c in copies] == [(PhysicalCopyStatus.STAGED, str(host_dir))]


def test_tar_checksum_mismatch_stages_and_registers_nothing(engine, tmp_path):
    sw = _world(engine, tmp_path, n_packages=1)
    package = sw.packages[0]
    tar_path = sw.archive_root / f"{package.name}.tar"
    tampered = package_tar(package.name, {**sw.contents[package.name], "scan.json": b"tampered"})
    tar_path.write_bytes(tampered)
    with pytest.raises(ChecksumMismatch) as raised:
        LocalStager().stage(
            engine=engine,
            package_ids=sw.package_ids,
            processing_location_id=sw.world.processing.id,
            timeout_seconds=60,
        )
    message = str(raised.value)
    assert package.name in message and sha256(tampered) in message and package.checksum in message
    assert _copies_at(engine, sw.world.processing.id) == []
    assert not (sw.processing_root / "raw" / package.name).exists()
    assert _leftovers(sw.processing_root / "raw") == []


def test_file_checksum_mismatch_stages_and_registers_nothing(engine, tmp_path):
    sw = _world(engine, tmp_path, n_packages=1)
    with session_scope(engine) as session:
        row = session.scalars(select(m.RawDataFile).where(m.RawDataFile.relative_path == "sky.f32")).one()
        recorded = row.checksum = "0" * 64
    with pytest.raises(ChecksumMismatch) as raised:
        LocalStager().stage(
            engine=engine,
            package_ids=sw.package_ids,
            processing_location_id=sw.world.processing.id,
            timeout_seconds=60,
        )
    assert "sky.f32" in str(raised.value) and recorded in str(raised.value)
    assert sha256(sw.contents[sw.packages[0].name]["sky.f32"]) in str(raised.value)
    assert _copies_at(engine, sw.world.processing.id) == []
    assert not (sw.processing_root / "raw" / sw.packages[0].name).exists()


def test_file_listed_in_opsdb_but_missing_from_tar_is_refused(sqlite_engine, tmp_path):
    sw = _world(sqlite_engine, tmp_path, n_packages=1)
    with session_scope(sqlite_engine) as session:
        session.add(
            m.RawDataFile(
                raw_data_package_id=sw.package_ids[0],
                relative_path="cold.f32",
                size_bytes=1,
                checksum="1" * 64,
            )
        )
    with pytest.raises(StagingError, match="cold.f32"):
        LocalStager().stage(
            engine=sqlite_engine,
            package_ids=sw.package_ids,
            processing_location_id=sw.world.processing.id,
            timeout_seconds=60,
        )
    assert _copies_at(sqlite_engine, sw.world.processing.id) == []


def test_source_preference_archive_first_then_priority(sqlite_engine, tmp_path):
    sw = _world(sqlite_engine, tmp_path, n_packages=1)
    package = sw.packages[0]
    buffer_root = tmp_path / "buffer"
    buffer_root.mkdir()
    # The buffer holds a corrupt tar: if it were chosen over the archive, staging would fail.
    (buffer_root / f"{package.name}.tar").write_bytes(b"not the package")
    with session_scope(sqlite_engine) as session:
        buffer = m.DataLocation(
            name="buffer",
            site_id=sw.world.site.id,
            location_type="buffer",
            storage_type="disk",
            priority=0,
            root_path=str(buffer_root),
        )
        session.add(buffer)
        session.add(
            m.PhysicalCopy(
                location=buffer,
                raw_data_package_id=package.id,
                path=f"{package.name}.tar",
                status=PhysicalCopyStatus.PRESENT,
            )
        )
    messages: list[str] = []
    LocalStager().stage(
        engine=sqlite_engine,
        package_ids=sw.package_ids,
        processing_location_id=sw.world.processing.id,
        timeout_seconds=60,
        progress=messages.append,
    )
    assert any(f"from archive ({sw.archive_root / (package.name + '.tar')})" in msg for msg in messages)


def test_no_source_copy_names_the_package_and_the_fix(sqlite_engine, tmp_path):
    sw = _world(sqlite_engine, tmp_path, n_packages=1)
    (sw.archive_root / f"{sw.packages[0].name}.tar").unlink()
    with pytest.raises(StagingError) as raised:
        LocalStager().stage(
            engine=sqlite_engine,
            package_ids=sw.package_ids,
            processing_location_id=sw.world.processing.id,
            timeout_seconds=60,
        )
    assert sw.packages[0].name in str(raised.value) and "STAGER=external" in str(raised.value)


def test_unknown_package_and_location_are_refused(sqlite_engine, tmp_path):
    sw = _world(sqlite_engine, tmp_path, n_packages=1)
    with pytest.raises(StagingError, match="999999"):
        LocalStager().stage(
            engine=sqlite_engine,
            package_ids=[999999],
            processing_location_id=sw.world.processing.id,
            timeout_seconds=60,
        )
    with pytest.raises(StagingError, match="processing location id 424242"):
        LocalStager().stage(
            engine=sqlite_engine,
            package_ids=sw.package_ids,
            processing_location_id=424242,
            timeout_seconds=60,
        )


def test_local_stager_timeout_while_copying(sqlite_engine, tmp_path):
    sw = _world(sqlite_engine, tmp_path, n_packages=1)
    ticks = iter([0.0, 0.0] + [1000.0] * 100)  # start, package start, then past the deadline at the first chunk
    with pytest.raises(StagingTimeout) as raised:
        LocalStager(clock=lambda: next(ticks)).stage(
            engine=sqlite_engine,
            package_ids=sw.package_ids,
            processing_location_id=sw.world.processing.id,
            timeout_seconds=5,
        )
    message = str(raised.value)
    assert sw.packages[0].name in message and "5 s while copying" in message
    assert _copies_at(sqlite_engine, sw.world.processing.id) == []
    assert _leftovers(sw.processing_root / "raw") == []


def test_local_stager_timeout_between_packages_names_the_unstaged(sqlite_engine, tmp_path):
    sw = _world(sqlite_engine, tmp_path, n_packages=2)
    clock = {"now": 0.0}

    def advance(message: str) -> None:
        if message.startswith("registering"):
            clock["now"] = 1000.0  # the first package took "too long"

    with pytest.raises(StagingTimeout) as raised:
        LocalStager(clock=lambda: clock["now"]).stage(
            engine=sqlite_engine,
            package_ids=sw.package_ids,
            processing_location_id=sw.world.processing.id,
            timeout_seconds=5,
            progress=advance,
        )
    assert sw.packages[1].name in str(raised.value) and sw.packages[0].name not in str(raised.value)
    assert [c.raw_data_package_id for c in _copies_at(sqlite_engine, sw.world.processing.id)] == [sw.package_ids[0]]


def test_concurrent_staging_of_one_package_yields_one_intact_copy(engine, tmp_path):
    sw = _world(engine, tmp_path, n_packages=1)
    package = sw.packages[0]
    # Both stagers unpack before either registers, so both race for the rename and for the ops-db row.
    barrier = threading.Barrier(2, timeout=60)
    results: dict[str, object] = {}

    def progress(message: str) -> None:
        if message.startswith("registering"):
            barrier.wait()

    def run(name: str) -> None:
        try:
            results[name] = LocalStager().stage(
                engine=engine,
                package_ids=sw.package_ids,
                processing_location_id=sw.world.processing.id,
                timeout_seconds=60,
                progress=progress,
            )[package.id]
        except Exception as error:  # noqa: BLE001 - the assertion below reports it
            results[name] = error
            barrier.abort()

    threads = [threading.Thread(target=run, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    a, b = results["a"], results["b"]
    assert not isinstance(a, Exception) and not isinstance(b, Exception), results
    assert a.host_dir == b.host_dir == sw.processing_root / "raw" / package.name
    for relative_path, content in sw.contents[package.name].items():
        assert (a.host_dir / relative_path).read_bytes() == content
    copies = _copies_at(engine, sw.world.processing.id)
    assert [(c.status, c.path) for c in copies] == [(PhysicalCopyStatus.STAGED, str(a.host_dir))]
    assert _leftovers(sw.processing_root / "raw") == []


def test_registration_race_lost_on_the_unique_constraint_adopts_the_winner(engine, tmp_path, monkeypatch):
    sw = _world(engine, tmp_path, n_packages=1)
    package = sw.packages[0]
    winner_dir = sw.processing_root / "raw" / "winner"
    winner_dir.mkdir(parents=True)
    real_find = staging._find_package_copy

    def find_then_lose_race(session, *, location_id, package_id):
        found = real_find(session, location_id=location_id, package_id=package_id)
        # Another process commits its row after our read: our insert then hits the unique constraint.
        with session_scope(engine) as other:
            other.add(
                m.PhysicalCopy(
                    data_location_id=location_id,
                    raw_data_package_id=package_id,
                    path=str(winner_dir),
                    status=PhysicalCopyStatus.STAGED,
                )
            )
        return found

    monkeypatch.setattr(staging, "_find_package_copy", find_then_lose_race)
    messages: list[str] = []
    staged = LocalStager().stage(
        engine=engine,
        package_ids=sw.package_ids,
        processing_location_id=sw.world.processing.id,
        timeout_seconds=60,
        progress=messages.append,
    )
    assert staged[package.id].host_dir == winner_dir
    assert any("another process registered" in msg for msg in messages)
    assert [c.path for c in _copies_at(engine, sw.world.processing.id)] == [str(winner_dir)]


def test_stale_directory_from_a_crash_is_replaced(sqlite_engine, tmp_path):
    sw = _world(sqlite_engine, tmp_path, n_packages=1)
    package = sw.packages[0]
    stale = sw.processing_root / "raw" / package.name
    stale.mkdir(parents=True)
    (stale / "scan.json").write_bytes(b"half-written by a crashed run")
    staged = LocalStager().stage(
        engine=sqlite_engine,
        package_ids=sw.package_ids,
        processing_location_id=sw.world.processing.id,
        timeout_seconds=60,
    )
    assert (staged[package.id].host_dir / "scan.json").read_bytes() == sw.contents[package.name]["scan.json"]
    assert _leftovers(sw.processing_root / "raw") == []


# ---------------------------------------------------------------------------------------------- hostile tars


def _tar_with(package_name: str, build) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        good = tarfile.TarInfo(f"{package_name}/scan.json")
        good.size = 2
        tar.addfile(good, io.BytesIO(b"{}"))
        build(tar)
    return buffer.getvalue()


def _file(name: str, data: bytes = b"evil"):
    def add(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    return add


def _special(name: str, kind: bytes, linkname: str = ""):
    def add(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.linkname = linkname
        tar.addfile(info)

    return add


def _link_then_write_through(name: str, target: str):
    def add(tar: tarfile.TarFile) -> None:
        _special(name, tarfile.SYMTYPE, target)(tar)
        _file(f"{name}/escaped.txt")(tar)

    return add


HOSTILE = {
    "absolute-path": lambda pkg, out: _file(str(out / "abs-escape.txt")),
    "dot-dot": lambda pkg, out: _file(f"{pkg}/../../../{out.name}/dotdot-escape.txt"),
    "symlink-escape": lambda pkg, out: _link_then_write_through(f"{pkg}/link", str(out)),
    "symlink": lambda pkg, out: _special(f"{pkg}/passwd", tarfile.SYMTYPE, "/etc/passwd"),
    "hardlink": lambda pkg, out: _special(f"{pkg}/hard", tarfile.LNKTYPE, "/etc/passwd"),
    "char-device": lambda pkg, out: _special(f"{pkg}/null", tarfile.CHRTYPE),
    "block-device": lambda pkg, out: _special(f"{pkg}/sda", tarfile.BLKTYPE),
    "fifo": lambda pkg, out: _special(f"{pkg}/pipe", tarfile.FIFOTYPE),
    "outside-package-dir": lambda pkg, out: _file("other-package/scan.json"),
    "duplicate-entry": lambda pkg, out: _file(f"{pkg}/scan.json", b"{ }"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_tar_is_refused_and_writes_nothing_outside(sqlite_engine, tmp_path, case):
    sw = _world(sqlite_engine, tmp_path, n_packages=1)
    package = sw.packages[0]
    outside = tmp_path / "outside"
    outside.mkdir()
    tar_bytes = _tar_with(package.name, HOSTILE[case](package.name, outside))
    (sw.archive_root / f"{package.name}.tar").write_bytes(tar_bytes)
    with session_scope(sqlite_engine) as session:
        session.get(m.RawDataPackage, package.id).checksum = sha256(tar_bytes)
    with pytest.raises(StagingError) as raised:
        LocalStager().stage(
            engine=sqlite_engine,
            package_ids=sw.package_ids,
            processing_location_id=sw.world.processing.id,
            timeout_seconds=60,
        )
    if case != "duplicate-entry":
        assert isinstance(raised.value, UnsafeArchive)
    assert list(outside.iterdir()) == []
    assert not (sw.processing_root / "raw" / package.name).exists()
    assert _leftovers(sw.processing_root / "raw") == []
    assert _copies_at(sqlite_engine, sw.world.processing.id) == []


def test_safe_unpack_makes_files_read_only_and_reports_digests(tmp_path):
    tar_path = tmp_path / "p.tar"
    tar_path.write_bytes(package_tar("p", {"a.txt": b"alpha", "d/b.txt": b"beta"}))
    written = safe_unpack(tar_path=tar_path, package_name="p", dest=tmp_path / "out")
    assert written == {"a.txt": (5, sha256(b"alpha")), "d/b.txt": (4, sha256(b"beta"))}
    assert (tmp_path / "out" / "d" / "b.txt").stat().st_mode & 0o777 == 0o444


@pytest.mark.parametrize("name", ["", ".", "..", ".hidden", "a/b", "a\\b", "x" * 256])
def test_package_names_that_are_not_one_directory_are_refused(name):
    with pytest.raises(StagingError, match="cannot be used as a directory name"):
        staging.validate_package_name(name)


# ------------------------------------------------------------------------------------------- ExternalStager


def _jobs(engine) -> list[tuple[int, StagingJobStatus, list[int]]]:
    with Session(engine) as session:
        return [
            (job.id, job.status, sorted(p.id for p in job.packages))
            for job in session.scalars(select(m.StagingJob).order_by(m.StagingJob.id))
        ]


def _data_transfer(engine, sw: StagingWorld, *, fail_with: str | None = None, register: bool = True):
    """Play data-transfer: wait for a pending job, then fulfil (or fail) it, as its staging worker would."""

    def work() -> None:
        for _ in range(600):
            with session_scope(engine) as session:
                job = session.scalars(
                    select(m.StagingJob).where(m.StagingJob.status == StagingJobStatus.PENDING)
                ).first()
                if job is not None:
                    job.status = StagingJobStatus.IN_PROGRESS
                    break
            time.sleep(0.02)
        else:
            return
        with session_scope(engine) as session:
            job = session.get(m.StagingJob, job.id)
            if fail_with is not None:
                job.status, job.error = StagingJobStatus.FAILED, fail_with
                return
            for package in job.packages if register else []:
                target = sw.processing_root / "staged" / package.name
                target.mkdir(parents=True)
                for relative_path, content in sw.contents[package.name].items():
                    (target / relative_path).parent.mkdir(parents=True, exist_ok=True)
                    (target / relative_path).write_bytes(content)
                session.add(
                    m.PhysicalCopy(
                        data_location_id=job.target_location_id,
                        raw_data_package=package,
                        path=f"staged/{package.name}",
                        status=PhysicalCopyStatus.STAGED,
                    )
                )
            job.status = StagingJobStatus.COMPLETED

    thread = threading.Thread(target=work)
    thread.start()
    return thread


def test_external_stager_creates_one_job_and_returns_what_data_transfer_staged(engine, tmp_path):
    sw = _world(engine, tmp_path, n_packages=3)
    already = sw.packages[0]
    LocalStager().stage(
        engine=engine,
        package_ids=[already.id],
        processing_location_id=sw.world.processing.id,
        timeout_seconds=60,
    )
    worker = _data_transfer(engine, sw)
    staged = ExternalStager(poll_interval_seconds=0.02).stage(
        engine=engine,
        package_ids=sw.package_ids,
        processing_location_id=sw.world.processing.id,
        timeout_seconds=60,
    )
    worker.join(timeout=60)
    jobs = _jobs(engine)
    assert [(status, ids) for _, status, ids in jobs] == [(StagingJobStatus.COMPLETED, sw.package_ids[1:])]
    assert staged[already.id].host_dir == sw.processing_root / "raw" / already.name
    for package in sw.packages[1:]:
        result = staged[package.id]
        assert result.host_dir == sw.processing_root / "staged" / package.name
        assert [f.relative_path for f in result.files] == sorted(sw.contents[package.name])


def test_external_stager_needs_no_job_when_everything_is_staged(sqlite_engine, tmp_path):
    sw = _world(sqlite_engine, tmp_path, n_packages=2)
    LocalStager().stage(
        engine=sqlite_engine,
        package_ids=sw.package_ids,
        processing_location_id=sw.world.processing.id,
        timeout_seconds=60,
    )
    staged = ExternalStager(poll_interval_seconds=0.02).stage(
        engine=sqlite_engine,
        package_ids=sw.package_ids,
        processing_location_id=sw.world.processing.id,
        timeout_seconds=1,
    )
    assert set(staged) == set(sw.package_ids) and _jobs(sqlite_engine) == []


def test_external_stager_reuses_an_active_job_and_times_out_with_advice(engine, tmp_path):
    sw = _world(engine, tmp_path, n_packages=2)
    with session_scope(engine) as session:
        job = m.StagingJob(
            target_location_id=sw.world.processing.id,
            status=StagingJobStatus.IN_PROGRESS,
            packages=[session.get(m.RawDataPackage, pid) for pid in sw.package_ids],
        )
        session.add(job)
        session.flush()
        job_id = job.id
    with pytest.raises(StagingTimeout) as raised:
        ExternalStager(poll_interval_seconds=0.02).stage(
            engine=engine,
            package_ids=sw.package_ids,
            processing_location_id=sw.world.processing.id,
            timeout_seconds=0.1,
        )
    message = str(raised.value)
    assert f"staging job(s) {job_id}" in message and "0.1 s" in message and "data-transfer" in message
    assert all(p.name in message for p in sw.packages)
    assert [j for j, _, _ in _jobs(engine)] == [job_id]


def test_ensure_staging_jobs_covers_only_what_no_active_job_covers(sqlite_engine, tmp_path):
    sw = _world(sqlite_engine, tmp_path, n_packages=3)
    first, second, third = sw.package_ids
    with session_scope(sqlite_engine) as session:
        active = m.StagingJob(
            target_location_id=sw.world.processing.id, packages=[session.get(m.RawDataPackage, first)]
        )
        failed = m.StagingJob(
            target_location_id=sw.world.processing.id,
            status=StagingJobStatus.FAILED,
            packages=[session.get(m.RawDataPackage, second)],
        )
        other_place = m.StagingJob(
            target_location_id=sw.world.archive.id, packages=[session.get(m.RawDataPackage, third)]
        )
        session.add_all([active, failed, other_place])
        session.flush()
        job_ids, new = ensure_staging_jobs(
            session, package_ids=sw.package_ids, target_location_id=sw.world.processing.id
        )
        assert new is not None and job_ids == sorted([active.id, new])
        assert sorted(p.id for p in session.get(m.StagingJob, new).packages) == [second, third]


def test_failed_staging_job_reports_its_error(engine, tmp_path):
    sw = _world(engine, tmp_path, n_packages=1)
    worker = _data_transfer(engine, sw, fail_with="bbcp: disk quota exceeded on /data/staged")
    with pytest.raises(StagingError) as raised:
        ExternalStager(poll_interval_seconds=0.02).stage(
            engine=engine,
            package_ids=sw.package_ids,
            processing_location_id=sw.world.processing.id,
            timeout_seconds=60,
        )
    worker.join(timeout=60)
    assert not isinstance(raised.value, StagingTimeout)
    assert "disk quota exceeded" in str(raised.value) and sw.packages[0].name in str(raised.value)


def test_completed_job_without_copies_is_an_error_not_a_hang(sqlite_engine, tmp_path):
    sw = _world(sqlite_engine, tmp_path, n_packages=1)
    worker = _data_transfer(sqlite_engine, sw, register=False)
    with pytest.raises(StagingError) as raised:
        ExternalStager(poll_interval_seconds=0.02).stage(
            engine=sqlite_engine,
            package_ids=sw.package_ids,
            processing_location_id=sw.world.processing.id,
            timeout_seconds=60,
        )
    worker.join(timeout=60)
    assert not isinstance(raised.value, StagingTimeout)
    assert "no present/staged PhysicalCopy" in str(raised.value)


def test_invalid_timeouts_are_refused():
    with pytest.raises(ValueError, match="timeout_seconds=0"):
        LocalStager().stage(engine=None, package_ids=[1], processing_location_id=1, timeout_seconds=0)
    with pytest.raises(ValueError, match="poll_interval_seconds=-1"):
        ExternalStager(poll_interval_seconds=-1)


# ---------------------------------------------------------------------------------------------- upstream


def test_require_present_products(engine, tmp_path):
    with session_scope(engine) as session:
        sw = make_staging_world(session, tmp_path, n_packages=0)
        attempt = make_step_attempt(session, sw.world, key="scan-1", status=RunStatus.COMPLETED)
        good, _ = add_product(
            session, attempt, sw.world.processing, path=tmp_path / "ws" / "good.dat", relative_path="good.dat"
        )
        marked, _ = add_product(
            session,
            attempt,
            sw.world.processing,
            path=tmp_path / "ws" / "marked.dat",
            relative_path="marked.dat",
            copy_status=PhysicalCopyStatus.DELETION_POSSIBLE,
        )
        gone, _ = add_product(
            session, attempt, sw.world.processing, path=tmp_path / "ws" / "gone.dat", relative_path="gone.dat"
        )
        nowhere = m.DataProduct(
            executed_reduction_step=attempt,
            reduction_step_id=attempt.reduction_step_id,
            sub_group_key="scan-1",
            product_type=DataProductType.INTERMEDIATE,
            relative_path="nowhere.dat",
            size_bytes=1,
            sha256="2" * 64,
        )
        session.add(nowhere)
        session.flush()
        ids = {"good": good.id, "marked": marked.id, "gone": gone.id, "nowhere": nowhere.id}
    (tmp_path / "ws" / "gone.dat").unlink()
    location_id = sw.world.processing.id
    with Session(engine) as session:
        assert require_present_products(session, product_ids=[ids["good"]], processing_location_id=location_id) == {
            ids["good"]: tmp_path / "ws" / "good.dat"
        }
        assert require_present_products(session, product_ids=[], processing_location_id=location_id) == {}
        for name, expected in [
            ("marked", "deletion_possible"),
            ("gone", "does not exist"),
            ("nowhere", "no copy"),
        ]:
            with pytest.raises(MissingUpstreamProduct) as raised:
                require_present_products(
                    session, product_ids=[ids["good"], ids[name]], processing_location_id=location_id
                )
            message = str(raised.value)
            assert f"upstream product {ids[name]} ({name}.dat)" in message
            assert "'calibrate'" in message and "'scan-1'" in message and expected in message
        with pytest.raises(MissingUpstreamProduct, match="id 987654 does not exist"):
            require_present_products(session, product_ids=[987654], processing_location_id=location_id)


def test_staging_counts_no_rows_twice_under_repeated_calls(sqlite_engine, tmp_path):
    sw = _world(sqlite_engine, tmp_path, n_packages=2)
    for _ in range(3):
        LocalStager().stage(
            engine=sqlite_engine,
            package_ids=sw.package_ids,
            processing_location_id=sw.world.processing.id,
            timeout_seconds=60,
        )
    with Session(sqlite_engine) as session:
        assert session.scalar(select(func.count()).select_from(m.PhysicalCopy)) == 4  # 2 archive + 2 staged
