"""A realistic, deterministic synthetic observatory in ops-db, with real raw data files on disk.

The raw format of one CHAI scan package (``<package_name>/`` inside a tar in the archive location):
``scan.json`` (header), ``sky.f32`` (float32 LE, n_spectra × n_channels raw counts), ``hot.f32`` and
``cold.f32`` (float32 LE, n_channels load counts). A Prime-Cam package holds ``scan.json`` and
``timestream.f32``. The example software in ``examples/software/chai`` reads this format.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import math
import random
import struct
import tarfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from ccat_dagster.errors import CcatError
from ccat_dagster.opsdb.enums import (
    LocationType,
    ObsStatus,
    PackageState,
    PhysicalCopyStatus,
    SourceKind,
    StorageType,
)
from ccat_dagster.opsdb.models import (
    DataLocation,
    ExecutedObsUnit,
    Instrument,
    InstrumentModule,
    ObservingProgram,
    ObsUnit,
    PhysicalCopy,
    RawDataFile,
    RawDataPackage,
    Site,
    Source,
)

ARCHIVE_LOCATION = "cologne-archive"
PROCESSING_LOCATION = "ramses-processing"
FIRST_NIGHT = dt.datetime(2026, 10, 1, tzinfo=dt.UTC)
SCANS_PER_NIGHT = 4
N_SPECTRA = 16
N_CHANNELS = 128
T_HOT_K = 290.0
T_COLD_K = 77.0
T_RX_K = 100.0
NOISE_K = 0.2
# One scan of the first night was taken in poor weather: four times the noise, so the demo map's QA flags it.
POOR_WEATHER_SCAN = 1
POOR_WEATHER_NOISE_K = 0.8
POOR_WEATHER_PWV_MM = 2.6

# name, source, program, line, rest frequency (GHz), instrument, module, weight in the scan mix
OBS_UNITS = [
    ("ngc253-co43", "NGC253", "GEco", "CO43", 461.0408, "CHAI", "LFA", 4),
    ("ngc253-cii", "NGC253", "GEco", "CII", 1900.5369, "CHAI", "HFA", 1),
    ("orionkl-co43", "Orion-KL", "GEco", "CO43", 461.0408, "CHAI", "LFA", 2),
    ("orionkl-cii", "Orion-KL", "GEco", "CII", 1900.5369, "CHAI", "HFA", 1),
    ("jupiter-cal", "Jupiter", "Cal", None, 280.0, "Prime-Cam", "PCAM280", 1),
    ("cosmos-deep", "E-COSMOS", "EoR", None, 280.0, "Prime-Cam", "PCAM280", 1),
]
SOURCES = [
    ("NGC253", SourceKind.FIXED),
    ("Orion-KL", SourceKind.FIXED),
    ("Jupiter", SourceKind.SOLAR_SYSTEM),
    ("E-COSMOS", SourceKind.CONSTANT_ELEVATION),
]
# ICRS positions (degrees) of the fixed sources, written into CHAI scan headers so maps get celestial axes.
SOURCE_POSITIONS_DEG = {"NGC253": (11.888002, -25.288220), "Orion-KL": (83.809333, -5.372500)}
PROGRAMS = [("GEco", "Galactic Ecology"), ("Cal", "Calibration"), ("EoR", "Epoch of Reionization")]
INSTRUMENTS = {"CHAI": ["LFA", "HFA"], "Prime-Cam": ["PCAM280"]}


class DemoSeedError(CcatError, ValueError):
    """A demo seeding option that cannot be used."""


@dataclass(frozen=True)
class SeedSummary:
    scans: int
    packages: int
    packages_by_state: dict[str, int]
    raw_files: int
    archive_dir: Path
    processing_dir: Path
    already_seeded: bool


def seed_demo(
    session: Session,
    *,
    data_dir: Path,
    scans: int = 20,
    seed: int = 253,
    progress: Callable[[int, int], None] | None = None,
) -> SeedSummary:
    """Create the demo observatory. Running it again on a seeded ops-db changes nothing.

    ``progress(done, total)`` is called after each scan (the CLI's progress bar).
    """
    archive_dir = data_dir / "archive"
    processing_dir = data_dir / "processing"
    existing = session.scalar(select(DataLocation).where(DataLocation.name == ARCHIVE_LOCATION))
    if existing is not None:
        return _summary(session, Path(existing.root_path), processing_dir, already_seeded=True)
    if scans < 1:
        raise DemoSeedError(f"--scans {scans} is invalid: give at least 1 scan")
    rng = random.Random(seed)
    archive_dir.mkdir(parents=True, exist_ok=True)
    processing_dir.mkdir(parents=True, exist_ok=True)

    site_chile = Site(name="Fred Young Submillimeter Telescope", short_name="fyst", location="Cerro Chajnantor")
    site_cologne = Site(name="University of Cologne", short_name="cologne", location="Cologne")
    archive = DataLocation(
        name=ARCHIVE_LOCATION,
        site=site_cologne,
        location_type=LocationType.LONG_TERM_ARCHIVE,
        storage_type=StorageType.DISK,
        priority=1,
        root_path=str(archive_dir),
    )
    processing = DataLocation(
        name=PROCESSING_LOCATION,
        site=site_cologne,
        location_type=LocationType.PROCESSING,
        storage_type=StorageType.DISK,
        priority=1,
        root_path=str(processing_dir),
    )
    buffer = DataLocation(
        name="fyst-buffer",
        site=site_chile,
        location_type=LocationType.BUFFER,
        storage_type=StorageType.DISK,
        priority=2,
        root_path="/data/buffer",
    )
    session.add_all([site_chile, site_cologne, archive, processing, buffer])

    modules: dict[str, InstrumentModule] = {}
    for instrument_name, module_names in INSTRUMENTS.items():
        instrument = Instrument(name=instrument_name)
        session.add(instrument)
        for module_name in module_names:
            modules[module_name] = InstrumentModule(name=module_name, instrument=instrument)
            session.add(modules[module_name])
    sources = {name: Source(name=name, kind=kind) for name, kind in SOURCES}
    programs = {short: ObservingProgram(short_name=short, name=name) for short, name in PROGRAMS}
    obs_units = {}
    for name, source, program, line, *_ in OBS_UNITS:
        obs_units[name] = ObsUnit(name=name, source=sources[source], observing_program=programs[program], line_id=line)
    session.add_all([*sources.values(), *programs.values(), *obs_units.values()])
    session.flush()

    weighted = [row for row in OBS_UNITS for _ in range(row[-1])]
    for index in range(scans):
        row = weighted[index % len(weighted)]
        name, source, _program, line, rest_ghz, instrument, module_name, _w = row
        night = FIRST_NIGHT + dt.timedelta(days=index // SCANS_PER_NIGHT)
        start = night + dt.timedelta(hours=1, minutes=75 * (index % SCANS_PER_NIGHT))
        eou = ExecutedObsUnit(
            id=uuid.UUID(int=rng.getrandbits(128), version=4),
            obs_unit=obs_units[name],
            start_time=start,
            end_time=start + dt.timedelta(minutes=30),
            status=ObsStatus.COMPLETED,
        )
        package_name = f"{instrument.lower().replace('-', '')}-{module_name.lower()}-{start:%Y%m%dT%H%M%S}"
        poor_weather = index == POOR_WEATHER_SCAN
        noise_k = POOR_WEATHER_NOISE_K if poor_weather else NOISE_K
        files = (
            _chai_files(rng, package_name, source, line, rest_ghz, module_name, start, noise_k=noise_k)
            if instrument == "CHAI"
            else _primecam_files(rng, package_name, source, start)
        )
        tar_bytes = _deterministic_tar(package_name, files)
        (archive_dir / f"{package_name}.tar").write_bytes(tar_bytes)
        pwv_mm = round(rng.uniform(0.3, 1.2), 2)
        package = RawDataPackage(
            name=package_name,
            executed_obs_unit=eou,
            instrument_module=modules[module_name],
            size_bytes=len(tar_bytes),
            checksum=hashlib.sha256(tar_bytes).hexdigest(),
            state=_state_for(index, scans),
            metadata_={
                "observation": {
                    "frequency_ghz": rest_ghz,
                    "n_spectra": N_SPECTRA,
                    "n_channels": N_CHANNELS if instrument == "CHAI" else 0,
                },
                "weather": {"pwv_mm": POOR_WEATHER_PWV_MM if poor_weather else pwv_mm},
            },
            created_at=start + dt.timedelta(hours=12),
            updated_at=start + dt.timedelta(hours=12),
        )
        package.files = [
            RawDataFile(
                id=uuid.UUID(int=rng.getrandbits(128), version=4),
                relative_path=file_name,
                size_bytes=len(content),
                checksum=hashlib.sha256(content).hexdigest(),
            )
            for file_name, content in sorted(files.items())
        ]
        session.add_all([eou, package])
        if package.state is PackageState.ARCHIVED:
            session.add(
                PhysicalCopy(
                    location=archive,
                    raw_data_package=package,
                    path=f"{package_name}.tar",
                    status=PhysicalCopyStatus.PRESENT,
                    checksum=package.checksum,
                )
            )
        if progress is not None:
            progress(index + 1, scans)
    session.flush()
    return _summary(session, archive_dir, processing_dir, already_seeded=False)


def _state_for(index: int, scans: int) -> PackageState:
    """Most scans are archived; the newest are still on their way, as on a real night."""
    from_end = scans - 1 - index
    if scans >= 8 and from_end == 0:
        return PackageState.WAITING
    if scans >= 8 and from_end in (1, 2):
        return PackageState.TRANSFERRING
    if scans >= 12 and from_end == 5:
        return PackageState.FAILED
    return PackageState.ARCHIVED


def _chai_files(
    rng: random.Random,
    package_name: str,
    source: str,
    line: str | None,
    rest_ghz: float,
    module: str,
    start: dt.datetime,
    *,
    noise_k: float = NOISE_K,
) -> dict[str, bytes]:
    channel_width_mhz = 2.0
    freq_start_ghz = rest_ghz - channel_width_mhz * N_CHANNELS / 2 / 1000.0
    gain = [1000.0 * (1.0 + 0.05 * math.sin(ch / 9.0)) for ch in range(N_CHANNELS)]
    hot = [g * (T_HOT_K + T_RX_K) for g in gain]
    cold = [g * (T_COLD_K + T_RX_K) for g in gain]
    peak_k = 8.0 if source == "NGC253" else 20.0
    sigma_channels = 6.0
    centre = N_CHANNELS / 2 + rng.uniform(-2, 2)
    offsets = [[(i % 4 - 1.5) * 10.0, (i // 4 - 1.5) * 10.0] for i in range(N_SPECTRA)]
    sky: list[float] = []
    for dx, dy in offsets:
        amplitude = peak_k * math.exp(-(dx * dx + dy * dy) / (2 * 20.0**2))
        offset_k, slope_k = rng.uniform(-1.0, 1.0), rng.uniform(-0.01, 0.01)
        for ch in range(N_CHANNELS):
            t_sky = amplitude * math.exp(-((ch - centre) ** 2) / (2 * sigma_channels**2))
            t_sky += offset_k + slope_k * (ch - N_CHANNELS / 2) + rng.gauss(0.0, noise_k)
            sky.append(gain[ch] * (t_sky + T_RX_K))
    header = {
        "scan_id": package_name,
        "source": source,
        "line": line,
        "instrument_module": module,
        "n_spectra": N_SPECTRA,
        "n_channels": N_CHANNELS,
        "rest_freq_ghz": rest_ghz,
        "freq_start_ghz": freq_start_ghz,
        "channel_width_mhz": channel_width_mhz,
        "t_hot_k": T_HOT_K,
        "t_cold_k": T_COLD_K,
        "offsets_arcsec": offsets,
        "obs_start": start.isoformat(),
    }
    if source in SOURCE_POSITIONS_DEG:
        header["ra_deg"], header["dec_deg"] = SOURCE_POSITIONS_DEG[source]
    return {
        "scan.json": json.dumps(header, indent=2, sort_keys=True).encode(),
        "sky.f32": _f32(sky),
        "hot.f32": _f32(hot),
        "cold.f32": _f32(cold),
    }


def _primecam_files(rng: random.Random, package_name: str, source: str, start: dt.datetime) -> dict[str, bytes]:
    samples = [rng.gauss(0.0, 1.0) for _ in range(2048)]
    header = {
        "scan_id": package_name,
        "source": source,
        "n_samples": len(samples),
        "obs_start": start.isoformat(),
    }
    return {
        "scan.json": json.dumps(header, indent=2, sort_keys=True).encode(),
        "timestream.f32": _f32(samples),
    }


def _f32(values: list[float]) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


def _deterministic_tar(package_name: str, files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for file_name, content in sorted(files.items()):
            info = tarfile.TarInfo(f"{package_name}/{file_name}")
            info.size, info.mtime, info.mode = len(content), 0, 0o644
            tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def _summary(session: Session, archive_dir: Path, processing_dir: Path, *, already_seeded: bool) -> SeedSummary:
    packages = session.scalars(select(RawDataPackage)).all()
    by_state: dict[str, int] = {}
    for package in packages:
        by_state[package.state.value] = by_state.get(package.state.value, 0) + 1
    return SeedSummary(
        scans=len(session.scalars(select(ExecutedObsUnit.id)).all()),
        packages=len(packages),
        packages_by_state=dict(sorted(by_state.items())),
        raw_files=len(session.scalars(select(RawDataFile.id)).all()),
        archive_dir=archive_dir,
        processing_dir=processing_dir,
        already_seeded=already_seeded,
    )


def archive_waiting_packages(session: Session, *, limit: int | None = None) -> list[str]:
    """Play data-transfer: mark not-yet-archived (waiting/transferring) packages archived, oldest first.

    Registers the archive PhysicalCopy the way data-transfer would. Returns the package names.
    """
    archive = session.scalars(select(DataLocation).where(DataLocation.name == ARCHIVE_LOCATION)).one()
    query = (
        select(RawDataPackage)
        .where(RawDataPackage.state.in_([PackageState.WAITING, PackageState.TRANSFERRING]))
        .order_by(RawDataPackage.id)
    )
    if limit is not None:
        query = query.limit(limit)
    names = []
    for package in session.scalars(query):
        package.state = PackageState.ARCHIVED
        session.add(
            PhysicalCopy(
                location=archive,
                raw_data_package=package,
                path=f"{package.name}.tar",
                status=PhysicalCopyStatus.PRESENT,
                checksum=package.checksum,
            )
        )
        names.append(package.name)
    session.flush()
    return names
