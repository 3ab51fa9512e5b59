"""A minimal world for scale tests and benchmarks: N scans, one trivial per-scan step, pre-staged input.

Every ExecutedObsUnit has one archived RawDataPackage whose files already lie at the processing location
(a present PhysicalCopy), so runs measure orchestration, not staging. The step's software is a software
directory with one shell script (run by the bubblewrap runtime over the host's /usr): it writes one small
statistics file, exits 3 when its input holds a file ``FAIL`` and first sleeps the seconds in a file ``SLEEP``.
Used by tests/test_scale.py and benchmarks/bench_scale.py.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import Session

from ccat_dagster.opsdb import models as m
from ccat_dagster.opsdb.enums import LocationType, PackageState, PhysicalCopyStatus, SourceKind, StorageType
from ccat_dagster.pipelines.apply import apply_pipeline_spec
from ccat_dagster.pipelines.spec import load_pipeline_spec

PIPELINE = "scale_bench"
STEP = "touch"
PROCESSING = "scale-processing"
PARTITIONS = f"{PIPELINE}__executed_obs_unit"
T0 = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)

TOUCH_SCRIPT = """#!/bin/sh
# Trivial payload of the scale world: one small product; FAIL / SLEEP files in the input steer it.
for marker in /workflow/input/*/SLEEP; do [ -e "$marker" ] && sleep "$(cat "$marker")"; done
for marker in /workflow/input/*/FAIL; do
    if [ -e "$marker" ]; then echo "scale world: this scan is marked to fail" >&2; exit 3; fi
done
mkdir -p "${WORKFLOW_OUTPUT_DIR}statistics"
echo ok > "${WORKFLOW_OUTPUT_DIR}statistics/touch.txt"
"""

PIPELINE_YAML = """pipeline: {pipeline}
description: one trivial per-scan step, for scale tests and benchmarks
processing_location: {processing}
trigger: {{type: continuous}}
enabled: true
grouping:
  name: scale-scans
  instrument_module: SCALEMOD
  rules:
    - {{table: Source, column: name, operator: eq, value: SCALESRC}}
steps:
  - name: {step}
    software:
      name: scale-touch
      version: "1.0.0"
      version_policy: exact
      image_ref: {software}
      entrypoint: [/bin/sh, /opt/software/bin/touch.sh]
    config: {{}}
    group_by: [executed_obs_unit]
    cooldown_seconds: 0
    resources: {{cpu: 1, memory_gb: 1, time_hours: 0.5}}
    max_retries: 0
"""


@dataclass(frozen=True)
class ScaleWorld:
    data_dir: Path
    keys: list[str]
    """Sub-group keys in scan order (the order the partitions are added in)."""


def sub_group_key(eou_id: uuid.UUID) -> str:
    return f"executed_obs_unit={eou_id}"


def seed_scale_world(
    session: Session,
    *,
    data_dir: Path,
    scans: int,
    fail: Collection[int] = (),
    sleep_seconds: float = 0.0,
) -> ScaleWorld:
    """Seed ``scans`` pre-staged scans and apply the one-step pipeline; ``fail`` are indexes of scans that fail."""
    data_dir = data_dir.absolute()
    software = data_dir / "software" / "touch"
    (software / "bin").mkdir(parents=True, exist_ok=True)
    (software / "bin" / "touch.sh").write_text(TOUCH_SCRIPT)
    (software / "VERSION").write_text("1.0.0\n")
    processing_root = data_dir / "processing"
    site = m.Site(name="scale-site", short_name="scale")
    processing = m.DataLocation(
        name=PROCESSING,
        site=site,
        location_type=LocationType.PROCESSING,
        storage_type=StorageType.DISK,
        root_path=str(processing_root),
    )
    instrument = m.Instrument(name="SCALEINST")
    module = m.InstrumentModule(name="SCALEMOD", instrument=instrument)
    source = m.Source(name="SCALESRC", kind=SourceKind.FIXED)
    program = m.ObservingProgram(short_name="SCALE")
    obs_unit = m.ObsUnit(name="scale-unit", source=source, observing_program=program, line_id="CO43")
    session.add_all([site, processing, instrument, module, source, program, obs_unit])
    keys: list[str] = []
    content = b"scan\n"
    for index in range(scans):
        # Deterministic ids that sort in scan order, so partition ranges and indexes agree.
        eou = m.ExecutedObsUnit(
            id=uuid.UUID(int=(0x5CA1E << 96) + index),
            obs_unit=obs_unit,
            start_time=T0 + dt.timedelta(minutes=index),
            end_time=T0 + dt.timedelta(minutes=index + 1),
        )
        name = f"scale-{index:06d}"
        files = {"scan.txt": content}
        if index in fail:
            files["FAIL"] = b"1\n"
        if sleep_seconds:
            files["SLEEP"] = f"{sleep_seconds}\n".encode()
        host_dir = processing_root / "raw" / name
        host_dir.mkdir(parents=True, exist_ok=True)
        for relative, data in files.items():
            (host_dir / relative).write_bytes(data)
        package = m.RawDataPackage(
            name=name,
            executed_obs_unit=eou,
            instrument_module=module,
            size_bytes=sum(len(d) for d in files.values()),
            checksum=hashlib.sha256(name.encode()).hexdigest(),
            state=PackageState.ARCHIVED,
        )
        package.files = [
            m.RawDataFile(relative_path=rel, size_bytes=len(data), checksum=hashlib.sha256(data).hexdigest())
            for rel, data in sorted(files.items())
        ]
        session.add(package)
        session.add(
            m.PhysicalCopy(
                location=processing,
                raw_data_package=package,
                path=str(host_dir),
                status=PhysicalCopyStatus.PRESENT,
                checksum=package.checksum,
            )
        )
        keys.append(sub_group_key(eou.id))
    session.flush()
    spec_path = data_dir / "scale_pipeline.yaml"
    spec_path.write_text(PIPELINE_YAML.format(pipeline=PIPELINE, processing=PROCESSING, step=STEP, software=software))
    apply_pipeline_spec(session, load_pipeline_spec(spec_path), source_path=spec_path)
    return ScaleWorld(data_dir=data_dir, keys=keys)


def dagster_yaml(dagster_url: str) -> str:
    """A DAGSTER_HOME/dagster.yaml on PostgreSQL with the production storage (the repository's dagster.yaml:
    pooled connections in every process; dagster-postgres wants a URL without the +driver)."""
    return (
        "storage:\n  custom:\n    module: ccat_dagster.dagster_storage\n    class: PooledPostgresStorage\n"
        f"    config:\n      postgres_url: {dagster_url.replace('+psycopg2', '')}\n"
        "telemetry:\n  enabled: false\n"
    )


def scale_environment(*, data_dir: Path, ops_db_url: str, dagster_home: Path, backend: str = "local") -> dict[str, str]:
    """The environment a code location / CLI process of the scale world needs."""
    return {
        "CCAT_DAGSTER_DATA_DIR": str(data_dir),
        "CCAT_OPS_DB_URL": ops_db_url,
        "CCAT_WORKFLOW_MANAGER_CONTAINER_RUNTIME": "bubblewrap",
        "CCAT_WORKFLOW_MANAGER_HPC_BACKEND": backend,
        "CCAT_WORKFLOW_MANAGER_STAGER": "local",
        "DAGSTER_HOME": str(dagster_home),
    }
