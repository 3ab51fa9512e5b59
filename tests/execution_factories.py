"""Test helpers for staging, registration and retention: real package tars on disk, attempts in any state."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.orm import Session

from ccat_dagster.opsdb import models as m
from ccat_dagster.opsdb.enums import DataProductType, PhysicalCopyStatus, RunStatus
from ccat_dagster.opsdb.states import transition

from .opsdb_factories import World, make_world

HAPPY_PATH = (
    RunStatus.STAGING_DATA,
    RunStatus.SUBMITTED,
    RunStatus.RUNNING,
    RunStatus.COLLECTING_RESULTS,
    RunStatus.COMPLETED,
)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def package_tar(package_name: str, files: dict[str, bytes]) -> bytes:
    """A package tar as data-transfer writes it: ``<package_name>/<file>`` entries, deterministic."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, content in sorted(files.items()):
            info = tarfile.TarInfo(f"{package_name}/{name}")
            info.size, info.mtime, info.mode = len(content), 0, 0o644
            tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


@dataclass
class StagingWorld:
    world: World
    archive_root: Path
    processing_root: Path
    packages: list[m.RawDataPackage]
    contents: dict[str, dict[str, bytes]] = field(default_factory=dict)

    @property
    def package_ids(self) -> list[int]:
        return [p.id for p in self.packages]


def make_staging_world(session: Session, tmp_path: Path, *, n_packages: int = 2, suffix: str = "") -> StagingWorld:
    """``make_world`` with real archive and processing roots under ``tmp_path`` and ``n_packages`` packages
    whose tars lie in the archive with a present PhysicalCopy (path relative to the archive root)."""
    world = make_world(session, suffix=suffix)
    archive_root = tmp_path / f"archive{suffix}"
    processing_root = tmp_path / f"processing{suffix}"
    archive_root.mkdir()
    processing_root.mkdir()
    world.archive.root_path = str(archive_root)
    world.processing.root_path = str(processing_root)
    staging_world = StagingWorld(world, archive_root, processing_root, [])
    for index in range(n_packages):
        name = f"chai-lfa-20261001T0{index}0000{suffix}"
        files = {
            "scan.json": f'{{"scan": "{name}"}}'.encode(),
            "sky.f32": bytes(range(index, index + 64)) * 4,
            "sub/hot.f32": f"hot load of {name}".encode(),
        }
        tar_bytes = package_tar(name, files)
        (archive_root / f"{name}.tar").write_bytes(tar_bytes)
        package = m.RawDataPackage(
            name=name,
            executed_obs_unit=world.package.executed_obs_unit,
            instrument_module=world.module,
            size_bytes=len(tar_bytes),
            checksum=sha256(tar_bytes),
            state=world.package.state,
        )
        package.files = [
            m.RawDataFile(relative_path=rel, size_bytes=len(content), checksum=sha256(content))
            for rel, content in sorted(files.items())
        ]
        session.add(package)
        session.add(
            m.PhysicalCopy(
                location=world.archive,
                raw_data_package=package,
                path=f"{name}.tar",
                status=PhysicalCopyStatus.PRESENT,
                checksum=package.checksum,
            )
        )
        staging_world.packages.append(package)
        staging_world.contents[name] = files
    session.flush()
    return staging_world


def make_step_attempt(
    session: Session,
    world: World,
    *,
    step: m.ReductionStep | None = None,
    key: str = "all",
    attempt: int = 1,
    status: RunStatus = RunStatus.PENDING,
    fingerprint: str = "f" * 64,
    at: dt.datetime | None = None,
) -> m.ExecutedReductionStep:
    """An attempt of ``step`` (default: the world's first step) moved along the RunStatus happy path to
    ``status`` (FAILED / CANCELLED: from RUNNING) through the real transition function."""
    row = m.ExecutedReductionStep(
        step=step or world.step,
        sub_group_key=key,
        attempt=attempt,
        status=RunStatus.PENDING,
        input_fingerprint=fingerprint,
        software_version=world.software_version,
        config=world.config,
    )
    session.add(row)
    session.flush()
    targets = (
        HAPPY_PATH[: HAPPY_PATH.index(status) + 1]
        if status in HAPPY_PATH
        else ((*HAPPY_PATH[:3], status) if status is not RunStatus.PENDING else ())
    )
    for target in targets:
        transition(session, row, target, at=at)
    session.flush()
    return row


@dataclass(frozen=True)
class FakeDiscovered:
    """The shape of ``discovery.DiscoveredProduct``, written to disk by ``write_product``."""

    relative_path: str
    product_type: str
    size: int
    sha256: str
    host_path: Path


def write_product(root: Path, relative_path: str, content: bytes, product_type: str) -> FakeDiscovered:
    path = root / relative_path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return FakeDiscovered(relative_path, product_type, len(content), sha256(content), path)


def add_product(
    session: Session,
    attempt: m.ExecutedReductionStep,
    location: m.DataLocation,
    *,
    path: Path,
    relative_path: str,
    product_type: DataProductType = DataProductType.INTERMEDIATE,
    content: bytes = b"product",
    copy_status: PhysicalCopyStatus = PhysicalCopyStatus.PRESENT,
) -> tuple[m.DataProduct, m.PhysicalCopy]:
    """A product of ``attempt`` with a file at ``path`` and a copy at ``location`` (no collection logic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    product = m.DataProduct(
        executed_reduction_step=attempt,
        reduction_step_id=attempt.reduction_step_id,
        sub_group_key=attempt.sub_group_key,
        product_type=product_type,
        relative_path=relative_path,
        size_bytes=len(content),
        sha256=sha256(content),
    )
    copy = m.PhysicalCopy(
        location=location, data_product=product, path=str(path), status=copy_status, checksum=sha256(content)
    )
    session.add_all([product, copy])
    session.flush()
    return product, copy
