"""Staging: before submit, every input RawDataPackage needs a usable copy at the processing site.

A copy is *usable* when ops-db has a ``PhysicalCopy`` of the package at the processing location with status
``present`` or ``staged`` AND its directory exists on this host. Such packages are never staged again.

Two stagers share the ``Stager`` interface:

- ``LocalStager`` (demo, tests, single machine): copies ``<package_name>.tar`` from a disk location holding a
  present copy, verifies its sha256 against ``RawDataPackage.checksum``, unpacks it safely, verifies every
  ``RawDataFile``, places it atomically at ``<processing root>/raw/<package_name>/`` and registers
  ``PhysicalCopy(status=staged)``.
- ``ExternalStager`` (production): creates one ``StagingJob`` for what is missing and waits (bounded) for
  data-transfer to fulfil it.

Path convention for every copy: ``PhysicalCopy.path`` is absolute, or relative to its
``DataLocation.root_path``. For a staged package it names the directory holding the package's files
(``RawDataFile.relative_path`` is relative to it).

Stagers open their own short transactions and never hold one while copying or waiting, so a long staging
never blocks ops-db writers.
"""

from __future__ import annotations

import abc
import hashlib
import os
import shutil
import tarfile
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, NamedTuple

from sqlalchemy import Engine, case, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ccat_dagster.errors import CcatError
from ccat_dagster.opsdb.engine import session_scope
from ccat_dagster.opsdb.enums import LocationType, PhysicalCopyStatus, StagingJobStatus, StorageType
from ccat_dagster.opsdb.models import (
    DataLocation,
    DataProduct,
    PhysicalCopy,
    RawDataFile,
    RawDataPackage,
    StagingJob,
    staging_job_package,
)

USABLE_COPY_STATUSES = (PhysicalCopyStatus.PRESENT, PhysicalCopyStatus.STAGED)
ACTIVE_JOB_STATUSES = (StagingJobStatus.PENDING, StagingJobStatus.IN_PROGRESS)
RAW_SUBDIR = "raw"
_CHUNK_BYTES = 1 << 20
_PLACE_ATTEMPTS = 3

ProgressFn = Callable[[str], None]


class StagingError(CcatError):
    """Input data could not be made available at the processing location; the run must not be submitted."""


class StagingTimeout(StagingError):
    """Staging did not finish within the caller's ``timeout_seconds``."""


class ChecksumMismatch(StagingError):
    """A copied package or one of its files does not match the sha256 ops-db recorded for it."""


class UnsafeArchive(StagingError):
    """A package tar holds an entry that could write outside its directory (absolute path, ``..``, a link,
    a device) or does not follow the ``<package_name>/<file>`` layout."""


class MissingUpstreamProduct(StagingError):
    """An upstream DataProduct a step consumes has no present copy at the processing location."""


class StagedFile(NamedTuple):
    """One staged raw file; ``relative_path`` is relative to ``StagedPackage.host_dir``."""

    raw_file_id: uuid.UUID
    relative_path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class StagedPackage:
    """A package usable at the processing location: its files are ``host_dir / file.relative_path``."""

    package_id: int
    package_name: str
    host_dir: Path
    files: list[StagedFile]


def _ignore_progress(_message: str) -> None:
    """The default progress sink: staging works without anyone listening."""


def resolve_copy_path(*, location_root: str | Path, copy_path: str) -> Path:
    """The host path of a PhysicalCopy: ``copy_path`` if absolute, else relative to the location's root."""
    path = Path(copy_path)
    return path if path.is_absolute() else Path(location_root) / path


def validate_package_name(name: str) -> str:
    """A package name becomes a directory name under ``<root>/raw/``: refuse anything that is not one plain,
    visible path component (leading dots are reserved for this module's temporary directories)."""
    if (
        not name
        or len(name) > 255
        or name in (".", "..")
        or name.startswith(".")
        or any(ch in name for ch in ("/", "\\", "\x00"))
    ):
        raise StagingError(
            f"package name {name!r} cannot be used as a directory name: it must be one path component "
            "without '/', '\\', NUL, a leading '.', and at most 255 characters; fix the name in ops-db"
        )
    return name


# ---------------------------------------------------------------------------------------------- snapshots


@dataclass(frozen=True)
class _PackageInfo:
    id: int
    name: str
    checksum: str
    files: list[StagedFile]


@dataclass(frozen=True)
class _LocationInfo:
    id: int
    name: str
    root: Path


def _load_location(session: Session, location_id: int) -> _LocationInfo:
    location = session.get(DataLocation, location_id)
    if location is None:
        raise StagingError(
            f"processing location id {location_id} does not exist in ops-db: "
            "check CCAT_WORKFLOW_MANAGER_PROCESSING_LOCATION_ID"
        )
    return _LocationInfo(id=location.id, name=location.name, root=Path(location.root_path))


def _load_packages(session: Session, package_ids: Sequence[int]) -> list[_PackageInfo]:
    rows = {p.id: p for p in session.scalars(select(RawDataPackage).where(RawDataPackage.id.in_(package_ids)))}
    unknown = [pid for pid in package_ids if pid not in rows]
    if unknown:
        raise StagingError(f"raw data package id(s) {unknown} do not exist in ops-db; nothing was staged")
    files: dict[int, list[StagedFile]] = {pid: [] for pid in package_ids}
    query = (
        select(RawDataFile)
        .where(RawDataFile.raw_data_package_id.in_(package_ids))
        .order_by(RawDataFile.raw_data_package_id, RawDataFile.relative_path)
    )
    for row in session.scalars(query):
        files[row.raw_data_package_id].append(
            StagedFile(row.id, row.relative_path, row.size_bytes, row.checksum.lower())
        )
    return [
        _PackageInfo(id=pid, name=rows[pid].name, checksum=rows[pid].checksum.lower(), files=files[pid])
        for pid in package_ids
    ]


def _usable_copies(session: Session, *, package_ids: Iterable[int], location: _LocationInfo) -> dict[int, Path]:
    """Package id → directory of its copies at ``location`` that ops-db calls usable and that exist here."""
    ids = list(package_ids)
    if not ids:
        return {}
    query = (
        select(PhysicalCopy.raw_data_package_id, PhysicalCopy.path)
        .where(PhysicalCopy.data_location_id == location.id)
        .where(PhysicalCopy.raw_data_package_id.in_(ids))
        .where(PhysicalCopy.status.in_(USABLE_COPY_STATUSES))
    )
    usable: dict[int, Path] = {}
    for package_id, path in session.execute(query):
        host_dir = resolve_copy_path(location_root=location.root, copy_path=path)
        if host_dir.is_dir():
            usable[package_id] = host_dir
    return usable


def _staged(package: _PackageInfo, host_dir: Path) -> StagedPackage:
    return StagedPackage(package_id=package.id, package_name=package.name, host_dir=host_dir, files=package.files)


def _names(packages: Iterable[_PackageInfo]) -> str:
    return ", ".join(f"{p.name} (id {p.id})" for p in packages)


# ---------------------------------------------------------------------------------------------- interface


class Stager(abc.ABC):
    """Makes raw packages usable at a processing location. Implementations stage only what is missing."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock

    def stage(
        self,
        *,
        engine: Engine,
        package_ids: Sequence[int],
        processing_location_id: int,
        timeout_seconds: float,
        progress: ProgressFn = _ignore_progress,
    ) -> dict[int, StagedPackage]:
        """A ``StagedPackage`` for every id in ``package_ids`` (duplicates ignored), staging the missing ones.

        Raises ``StagingError`` (unknown package or location, no source copy, unsafe archive, a job that
        failed), ``ChecksumMismatch`` or ``StagingTimeout`` when ``timeout_seconds`` passes first. On any
        error no copy is registered for the package that failed; packages staged before it stay staged
        (they are valid and a retry reuses them). ``progress`` receives one-line human messages.
        """
        if timeout_seconds <= 0:
            raise ValueError(f"timeout_seconds={timeout_seconds!r} is invalid: give a positive number of seconds")
        deadline = self._clock() + timeout_seconds
        ordered = list(dict.fromkeys(package_ids))
        if not ordered:
            return {}
        with session_scope(engine) as session:
            location = _load_location(session, processing_location_id)
            packages = _load_packages(session, ordered)
            usable = _usable_copies(session, package_ids=ordered, location=location)
        result: dict[int, StagedPackage] = {}
        missing: list[_PackageInfo] = []
        for package in packages:
            if package.id in usable:
                result[package.id] = _staged(package, usable[package.id])
            else:
                missing.append(package)
        if result:
            progress(f"{len(result)} package(s) already staged at {location.name}")
        if missing:
            result.update(
                self._stage_missing(
                    engine=engine,
                    packages=missing,
                    location=location,
                    deadline=deadline,
                    timeout_seconds=timeout_seconds,
                    progress=progress,
                )
            )
        return {pid: result[pid] for pid in ordered}

    @abc.abstractmethod
    def _stage_missing(
        self,
        *,
        engine: Engine,
        packages: list[_PackageInfo],
        location: _LocationInfo,
        deadline: float,
        timeout_seconds: float,
        progress: ProgressFn,
    ) -> dict[int, StagedPackage]:
        """Stage ``packages`` (none has a usable copy at ``location``) before ``deadline`` (on ``_clock``)."""


# ---------------------------------------------------------------------------------------------- local


@dataclass(frozen=True)
class _SourceCopy:
    location_name: str
    tar_path: Path


class LocalStager(Stager):
    """Copies, verifies and unpacks package tars from a disk location reachable from this host.

    Source choice: present copies at active disk locations other than the processing location, a
    ``long_term_archive`` first, then by ascending ``DataLocation.priority`` (1 = first choice), then id; the
    first whose tar exists on this host is used. Safe to run in several processes at once for the same
    package: the final directory appears by one atomic rename and ops-db's unique (location, package)
    constraint decides whose registration wins; the loser adopts the winner's copy.
    """

    def _stage_missing(
        self,
        *,
        engine: Engine,
        packages: list[_PackageInfo],
        location: _LocationInfo,
        deadline: float,
        timeout_seconds: float,
        progress: ProgressFn,
    ) -> dict[int, StagedPackage]:
        raw_root = location.root / RAW_SUBDIR
        try:
            raw_root.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StagingError(
                f"cannot create {raw_root} for staged packages of location {location.name!r}: "
                f"{error.strerror}; "
                "check DataLocation.root_path and its permissions"
            ) from error
        staged: dict[int, StagedPackage] = {}
        for index, package in enumerate(packages):
            if self._clock() > deadline:
                raise StagingTimeout(
                    f"staging did not finish within {timeout_seconds:g} s: package(s) "
                    f"{_names(packages[index:])} are not staged yet (the ones before them are); raise the "
                    "staging timeout or stage fewer packages per run"
                )
            validate_package_name(package.name)
            if not package.checksum:
                raise StagingError(
                    f"package {package.name} (id {package.id}) has no checksum in ops-db, so its copy cannot "
                    "be "
                    "verified; nothing was staged. Record RawDataPackage.checksum (sha256 of the tar) first"
                )
            with session_scope(engine) as session:
                sources = _source_copies(session, package_id=package.id, exclude_location_id=location.id)
            source = next((s for s in sources if s.tar_path.is_file()), None)
            if source is None:
                checked = ", ".join(str(s.tar_path) for s in sources) or "none registered"
                raise StagingError(
                    f"package {package.name} (id {package.id}) has no present copy on a disk location "
                    "readable "
                    f"from this host (checked: {checked}); register the archive copy in ops-db, mount the "
                    "archive "
                    "here, or use CCAT_WORKFLOW_MANAGER_STAGER=external"
                )
            progress(f"staging {package.name} from {source.location_name} ({source.tar_path})")
            placed = self._unpack_and_place(
                package=package,
                source=source,
                raw_root=raw_root,
                deadline=deadline,
                timeout_seconds=timeout_seconds,
                progress=progress,
            )
            progress(f"registering staged copy of {package.name} at {location.name}: {placed}")
            host_dir = _register_staged_copy(engine, package=package, location=location, host_dir=placed)
            if host_dir != placed:
                progress(f"{package.name}: another process registered its copy first; using {host_dir}")
            staged[package.id] = _staged(package, host_dir)
        return staged

    def _unpack_and_place(
        self,
        *,
        package: _PackageInfo,
        source: _SourceCopy,
        raw_root: Path,
        deadline: float,
        timeout_seconds: float,
        progress: ProgressFn,
    ) -> Path:
        # The work directory lives in raw_root so the final rename never crosses a filesystem (atomic).
        work = Path(tempfile.mkdtemp(prefix=f".staging-{package.name}-", dir=raw_root))
        try:
            tar_copy = work / f"{package.name}.tar"
            digest = self._copy_and_hash(
                source=source.tar_path,
                target=tar_copy,
                package=package,
                deadline=deadline,
                timeout_seconds=timeout_seconds,
            )
            if digest != package.checksum:
                raise ChecksumMismatch(
                    f"package {package.name} (id {package.id}): the tar copied from {source.tar_path} has "
                    "sha256 "
                    f"{digest} but ops-db records {package.checksum}; nothing was staged. The archive copy "
                    "at "
                    f"{source.location_name} is damaged or ops-db is wrong: check it with data-transfer"
                )
            unpacked = work / package.name
            written = safe_unpack(tar_path=tar_copy, package_name=package.name, dest=unpacked)
            tar_copy.unlink()
            _verify_unpacked(package=package, written=written, progress=progress)
            return _place(unpacked=unpacked, final=raw_root / package.name, package=package, progress=progress)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _copy_and_hash(
        self, *, source: Path, target: Path, package: _PackageInfo, deadline: float, timeout_seconds: float
    ) -> str:
        digest = hashlib.sha256()
        try:
            with source.open("rb") as src, target.open("xb") as dst:
                while chunk := src.read(_CHUNK_BYTES):
                    if self._clock() > deadline:
                        raise StagingTimeout(
                            f"staging package {package.name} (id {package.id}) did not finish within "
                            f"{timeout_seconds:g} s while copying {source}; raise the staging timeout or "
                            "check "
                            "the archive's read speed"
                        )
                    digest.update(chunk)
                    dst.write(chunk)
        except OSError as error:
            raise StagingError(
                f"cannot copy {source} for package {package.name} (id {package.id}): {error.strerror or error}"
            ) from error
        return digest.hexdigest()


def _source_copies(session: Session, *, package_id: int, exclude_location_id: int) -> list[_SourceCopy]:
    archive_first = case((DataLocation.location_type == LocationType.LONG_TERM_ARCHIVE, 0), else_=1)
    query = (
        select(DataLocation.name, DataLocation.root_path, PhysicalCopy.path)
        .join(DataLocation, PhysicalCopy.data_location_id == DataLocation.id)
        .where(PhysicalCopy.raw_data_package_id == package_id)
        .where(PhysicalCopy.status == PhysicalCopyStatus.PRESENT)
        .where(DataLocation.storage_type == StorageType.DISK)
        .where(DataLocation.active.is_(True))
        .where(DataLocation.id != exclude_location_id)
        .order_by(archive_first, DataLocation.priority, DataLocation.id)
    )
    return [
        _SourceCopy(location_name=name, tar_path=resolve_copy_path(location_root=root, copy_path=path))
        for name, root, path in session.execute(query)
    ]


def _member_relative_path(member: tarfile.TarInfo, *, package_name: str, tar_path: Path) -> str:
    """The member's path below ``<package_name>/``; refuses anything that could escape or that is not ours."""
    name = member.name
    pure = PurePosixPath(name)
    if pure.is_absolute() or ".." in pure.parts or "\x00" in name:
        raise UnsafeArchive(f"{tar_path}: entry {name!r} has an absolute path or '..'; refusing to unpack it")
    parts = pure.parts
    if not parts or parts[0] != package_name:
        raise UnsafeArchive(
            f"{tar_path}: entry {name!r} is not below {package_name}/; a package tar holds only "
            f"{package_name}/<file> entries"
        )
    if not (member.isfile() or member.isdir()):
        kind = "link" if (member.issym() or member.islnk()) else "device or special file"
        raise UnsafeArchive(
            f"{tar_path}: entry {name!r} is a {kind}; package tars may hold only regular files and directories"
        )
    return "/".join(parts[1:])


def safe_unpack(*, tar_path: Path, package_name: str, dest: Path) -> dict[str, tuple[int, str]]:
    """Unpack ``<package_name>/...`` of ``tar_path`` into the NEW directory ``dest``; relative path →
    (size, sha256) of every file written.

    Nothing is ever written outside ``dest``: absolute names, ``..``, links, devices, FIFOs and entries
    outside ``<package_name>/`` raise ``UnsafeArchive``; a duplicate entry raises ``StagingError``. Files are
    made read-only (0444) because raw inputs must never change. On error ``dest`` is left for the caller to
    remove.
    """
    dest.mkdir()
    written: dict[str, tuple[int, str]] = {}
    try:
        with tarfile.open(tar_path, mode="r:*") as tar:
            for member in tar:
                relative = _member_relative_path(member, package_name=package_name, tar_path=tar_path)
                # Parents are created from validated names and no link is ever created, so every path below
                # stays inside dest.
                target = dest / relative if relative else dest
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                if not relative:
                    raise UnsafeArchive(f"{tar_path}: entry {member.name!r} is a file where the package dir belongs")
                target.parent.mkdir(parents=True, exist_ok=True)
                fileobj = tar.extractfile(member)
                if fileobj is None:  # pragma: no cover - isfile() members always have data
                    raise UnsafeArchive(f"{tar_path}: entry {member.name!r} has no data")
                if relative in written or target.exists():
                    raise StagingError(f"{tar_path}: entry {member.name!r} appears twice; the package is malformed")
                written[relative] = _write_new_file(fileobj, target)
                os.chmod(target, 0o444)
    except tarfile.TarError as error:
        raise StagingError(f"{tar_path} is not a readable tar archive: {error}") from error
    except OSError as error:
        raise StagingError(f"cannot unpack {tar_path} into {dest}: {error.strerror or error}") from error
    return written


def _write_new_file(source: IO[bytes], target: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with target.open("xb") as out:
        while chunk := source.read(_CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
            out.write(chunk)
    return size, digest.hexdigest()


def _verify_unpacked(*, package: _PackageInfo, written: dict[str, tuple[int, str]], progress: ProgressFn) -> None:
    for file in package.files:
        key = str(PurePosixPath(file.relative_path))
        got = written.get(key)
        if got is None:
            raise StagingError(
                f"package {package.name} (id {package.id}): file {file.relative_path!r} listed in ops-db is "
                "not "
                "in the tar; nothing was staged. Check the package's RawDataFile rows against the archive"
            )
        size, sha256 = got
        if sha256 != file.sha256 or size != file.size:
            raise ChecksumMismatch(
                f"package {package.name} (id {package.id}): file {file.relative_path!r} has sha256 {sha256} "
                f"({size} bytes) but ops-db records {file.sha256} ({file.size} bytes); nothing was staged"
            )
    extra = sorted(set(written) - {str(PurePosixPath(f.relative_path)) for f in package.files})
    if extra:
        # The tar matched its recorded checksum, so extras are authentic; inputs come from RawDataFile rows.
        progress(f"{package.name}: {len(extra)} file(s) in the tar are not RawDataFile rows: {', '.join(extra[:5])}")


def _matches(directory: Path, package: _PackageInfo) -> bool:
    """Whether ``directory`` holds every file of ``package`` with the recorded size and sha256."""
    for file in package.files:
        path = directory / file.relative_path
        try:
            if path.is_symlink() or not path.is_file() or path.stat().st_size != file.size:
                return False
            with path.open("rb") as handle:
                if _file_sha256(handle) != file.sha256:
                    return False
        except OSError:
            return False
    return True


def _file_sha256(handle: IO[bytes]) -> str:
    digest = hashlib.sha256()
    while chunk := handle.read(_CHUNK_BYTES):
        digest.update(chunk)
    return digest.hexdigest()


def _place(*, unpacked: Path, final: Path, package: _PackageInfo, progress: ProgressFn) -> Path:
    """Rename ``unpacked`` to ``final``; an existing ``final`` is adopted if complete, else replaced."""
    for _ in range(_PLACE_ATTEMPTS):
        try:
            os.rename(unpacked, final)
            return final
        except OSError as error:
            if not (final.exists() or final.is_symlink()):
                raise StagingError(
                    f"cannot move staged package {package.name} into {final}: {error.strerror or error}"
                ) from error
        # Another process renamed its (verified) copy in first, or an earlier run died before registering.
        if final.is_dir() and not final.is_symlink() and _matches(final, package):
            progress(f"{package.name}: {final} was already placed by another process; using it")
            return final
        stale = final.parent / f".stale-{package.name}-{uuid.uuid4().hex[:8]}"
        progress(f"{package.name}: {final} exists but does not match ops-db; replacing it")
        try:
            os.rename(final, stale)
        except FileNotFoundError:
            continue
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
    raise StagingError(
        f"could not place staged package {package.name} at {final} after {_PLACE_ATTEMPTS} tries: other "
        "processes keep replacing it; check what else writes to that directory"
    )


def _find_package_copy(session: Session, *, location_id: int, package_id: int) -> PhysicalCopy | None:
    return session.scalar(
        select(PhysicalCopy)
        .where(PhysicalCopy.data_location_id == location_id)
        .where(PhysicalCopy.raw_data_package_id == package_id)
        .with_for_update()
    )


def _register_staged_copy(engine: Engine, *, package: _PackageInfo, location: _LocationInfo, host_dir: Path) -> Path:
    """Record the staged copy; returns the directory ops-db now names (another process's, if it won)."""
    try:
        with session_scope(engine) as session:
            copy = _find_package_copy(session, location_id=location.id, package_id=package.id)
            if copy is None:
                session.add(
                    PhysicalCopy(
                        data_location_id=location.id,
                        raw_data_package_id=package.id,
                        path=str(host_dir),
                        status=PhysicalCopyStatus.STAGED,
                        checksum=package.checksum,
                    )
                )
                session.flush()
                return host_dir
            existing = resolve_copy_path(location_root=location.root, copy_path=copy.path)
            if copy.status in USABLE_COPY_STATUSES and existing.is_dir():
                return existing
            # An old row (deleted, deletion_*, or a directory that vanished): this staging replaces it.
            copy.path = str(host_dir)
            copy.status = PhysicalCopyStatus.STAGED
            copy.checksum = package.checksum
            copy.status_reason = None
            return host_dir
    except IntegrityError:
        # Unique (location, package): another process inserted its row between our read and our insert.
        with session_scope(engine) as session:
            usable = _usable_copies(session, package_ids=[package.id], location=location)
        if package.id in usable:
            return usable[package.id]
        raise StagingError(
            f"package {package.name} (id {package.id}): another process registered a copy at {location.name} "
            "at the same moment, but it is not usable; check its PhysicalCopy row and re-run"
        ) from None


# ---------------------------------------------------------------------------------------------- external


class ExternalStager(Stager):
    """Asks data-transfer to stage: one ``StagingJob`` for the missing packages, then waits for it.

    A package already listed in a pending/in_progress StagingJob for the same location is not requested again:
    that job is watched instead, so at most one new job is created per call. Two processes asking for the same
    packages at the same instant may both create a job; data-transfer then stages twice, which is harmless.
    The wait ends when every package has a usable copy (even if the jobs have not been marked completed yet).
    """

    def __init__(
        self,
        *,
        poll_interval_seconds: float = 15.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if poll_interval_seconds <= 0:
            raise ValueError(
                f"poll_interval_seconds={poll_interval_seconds!r} is invalid: give a positive number of seconds"
            )
        super().__init__(clock=clock)
        self.poll_interval_seconds = poll_interval_seconds
        self._sleep = sleep

    def _stage_missing(
        self,
        *,
        engine: Engine,
        packages: list[_PackageInfo],
        location: _LocationInfo,
        deadline: float,
        timeout_seconds: float,
        progress: ProgressFn,
    ) -> dict[int, StagedPackage]:
        ids = [p.id for p in packages]
        by_id = {p.id: p for p in packages}
        with session_scope(engine) as session:
            job_ids, created = ensure_staging_jobs(session, package_ids=ids, target_location_id=location.id)
        jobs_text = ", ".join(str(j) for j in job_ids)
        reused = [j for j in job_ids if j != created]
        progress(
            f"waiting for staging job(s) {jobs_text} ({len(ids)} package(s) to {location.name}; "
            f"new: {created if created is not None else 'none'}, reused: "
            f"{', '.join(map(str, reused)) or 'none'})"
        )
        last_report = ""
        ended_without_copies = 0
        while True:
            with session_scope(engine) as session:
                # Job states first, then copies: a job seen completed has its copies visible to the next read.
                jobs = session.scalars(select(StagingJob).where(StagingJob.id.in_(job_ids))).all()
                states = {job.id: (job.status, job.error) for job in jobs}
                usable = _usable_copies(session, package_ids=ids, location=location)
            if len(usable) == len(ids):
                progress(f"staging job(s) {jobs_text}: all {len(ids)} package(s) staged")
                return {pid: _staged(by_id[pid], usable[pid]) for pid in ids}
            waiting = [by_id[pid] for pid in ids if pid not in usable]
            failed = {jid: error for jid, (status, error) in states.items() if status is StagingJobStatus.FAILED}
            if failed:
                reasons = "; ".join(f"job {jid}: {error or 'no error recorded'}" for jid, error in failed.items())
                raise StagingError(
                    f"staging to {location.name} failed ({reasons}) for package(s) {_names(waiting)}; fix "
                    "the cause "
                    "in data-transfer (see its staging worker logs); the next attempt creates a new staging "
                    "job"
                )
            ended = len(states) < len(job_ids) or all(s is StagingJobStatus.COMPLETED for s, _ in states.values())
            ended_without_copies = ended_without_copies + 1 if ended else 0
            # One more poll before giving up: data-transfer may mark a job completed just before its copies.
            if ended_without_copies >= 2:
                raise StagingError(
                    f"staging job(s) {jobs_text} ended (or vanished) but package(s) {_names(waiting)} have "
                    "no "
                    f"present/staged PhysicalCopy at {location.name} whose directory exists on this host "
                    "(root "
                    f"{location.root}); check the copies data-transfer registered and that the location is "
                    "mounted"
                )
            remaining = deadline - self._clock()
            status_text = ", ".join(f"job {jid} {s.value}" for jid, (s, _) in sorted(states.items()))
            if remaining <= 0:
                raise StagingTimeout(
                    f"staging job(s) {jobs_text} did not stage package(s) {_names(waiting)} to "
                    f"{location.name} "
                    f"within {timeout_seconds:g} s ({status_text}); check that data-transfer's staging "
                    "workers "
                    f"for {location.name} are running and the jobs' status and error in ops-db, or raise the "
                    "staging timeout"
                )
            if status_text != last_report:
                progress(f"waiting for staging: {status_text}; {len(waiting)} package(s) left")
                last_report = status_text
            self._sleep(min(self.poll_interval_seconds, remaining))


def ensure_staging_jobs(
    session: Session, *, package_ids: Sequence[int], target_location_id: int
) -> tuple[list[int], int | None]:
    """Make sure every package is covered by an active (pending / in_progress) StagingJob for the location.

    Reuses active jobs that already list a package; the rest go into ONE new pending job. Returns (ids of
    every job to watch, sorted; id of the new job or None). Runs in the caller's transaction.
    """
    ids = list(dict.fromkeys(package_ids))
    covered_rows = session.execute(
        select(staging_job_package.c.raw_data_package_id, StagingJob.id)
        .join(StagingJob, StagingJob.id == staging_job_package.c.staging_job_id)
        .where(StagingJob.target_location_id == target_location_id)
        .where(StagingJob.status.in_(ACTIVE_JOB_STATUSES))
        .where(staging_job_package.c.raw_data_package_id.in_(ids))
        .order_by(StagingJob.id)
    ).all()
    covering: dict[int, int] = {}
    for package_id, job_id in covered_rows:
        covering.setdefault(package_id, job_id)
    uncovered = [pid for pid in ids if pid not in covering]
    new_job_id: int | None = None
    if uncovered:
        packages = session.scalars(select(RawDataPackage).where(RawDataPackage.id.in_(uncovered))).all()
        job = StagingJob(target_location_id=target_location_id, status=StagingJobStatus.PENDING, packages=packages)
        session.add(job)
        session.flush()
        new_job_id = job.id
    job_ids = sorted(set(covering.values()) | ({new_job_id} if new_job_id is not None else set()))
    return job_ids, new_job_id


# ---------------------------------------------------------------------------------------------- upstream


def require_present_products(
    session: Session, *, product_ids: Sequence[int], processing_location_id: int
) -> dict[int, Path]:
    """Host path of every upstream DataProduct's present copy at the processing location.

    Raises ``MissingUpstreamProduct`` naming the product id, its relative path, step and sub-group when a
    product does not exist, has no copy there, its copy is not ``present`` (e.g. retention marked it
    ``deletion_possible``), or ops-db says present but the file is gone from this host. Read-only.
    """
    ids = list(dict.fromkeys(product_ids))
    if not ids:
        return {}
    location = _load_location(session, processing_location_id)
    products = {p.id: p for p in session.scalars(select(DataProduct).where(DataProduct.id.in_(ids)))}
    copies = {
        c.data_product_id: c
        for c in session.scalars(
            select(PhysicalCopy)
            .where(PhysicalCopy.data_location_id == location.id)
            .where(PhysicalCopy.data_product_id.in_(ids))
        )
    }
    paths: dict[int, Path] = {}
    for product_id in ids:
        product = products.get(product_id)
        if product is None:
            raise MissingUpstreamProduct(f"upstream product id {product_id} does not exist in ops-db; re-plan the step")
        what = (
            f"upstream product {product.id} ({product.relative_path}) of step {product.step.name!r}, "
            f"sub-group {product.sub_group_key!r}"
        )
        redo = f"re-run step {product.step.name!r} for sub-group {product.sub_group_key!r} to recreate it"
        copy = copies.get(product_id)
        if copy is None:
            raise MissingUpstreamProduct(f"{what} has no copy at processing location {location.name!r}; {redo}")
        if copy.status is not PhysicalCopyStatus.PRESENT:
            raise MissingUpstreamProduct(
                f"{what} is not present at {location.name!r} (copy {copy.id} is {copy.status.value}"
                f"{': ' + copy.status_reason if copy.status_reason else ''}); {redo}"
            )
        path = resolve_copy_path(location_root=location.root, copy_path=copy.path)
        if not path.exists():
            raise MissingUpstreamProduct(
                f"{what}: ops-db says present at {path} but the file does not exist on this host; {redo}"
            )
        paths[product_id] = path
    return paths
