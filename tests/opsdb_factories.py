"""Small ORM object graphs for tests: one of everything the ops-db models name, linked the way ops-db links them."""

from __future__ import annotations

import datetime as dt
import hashlib
import uuid
from dataclasses import dataclass

from sqlalchemy.orm import Session

from ccat_dagster.opsdb import models as m
from ccat_dagster.opsdb.enums import (
    DataProductType,
    LocationType,
    PackageState,
    PhysicalCopyStatus,
    RunStatus,
    SourceKind,
    StorageType,
    TriggerType,
    VersionPolicy,
)

T0 = dt.datetime(2026, 10, 1, 2, 0, tzinfo=dt.UTC)


@dataclass
class World:
    site: m.Site
    archive: m.DataLocation
    processing: m.DataLocation
    module: m.InstrumentModule
    package: m.RawDataPackage
    grouping: m.DataGrouping
    software_version: m.ReductionSoftwareVersion
    config: m.ReductionStepConfig
    pipeline: m.Pipeline
    step: m.ReductionStep
    final_step: m.ReductionStep


def make_world(session: Session, *, suffix: str = "") -> World:
    site = m.Site(name=f"Cologne{suffix}", short_name=f"cgn{suffix}")
    archive = m.DataLocation(
        name=f"archive{suffix}",
        site=site,
        location_type=LocationType.LONG_TERM_ARCHIVE,
        storage_type=StorageType.DISK,
        root_path="/archive",
    )
    processing = m.DataLocation(
        name=f"processing{suffix}",
        site=site,
        location_type=LocationType.PROCESSING,
        storage_type=StorageType.DISK,
        root_path="/processing",
    )
    instrument = m.Instrument(name=f"CHAI{suffix}")
    module = m.InstrumentModule(name="LFA", instrument=instrument)
    source = m.Source(name=f"NGC253{suffix}", kind=SourceKind.FIXED)
    program = m.ObservingProgram(short_name=f"GEco{suffix}")
    obs_unit = m.ObsUnit(name=f"ngc253-co43{suffix}", source=source, observing_program=program, line_id="CO43")
    eou = m.ExecutedObsUnit(id=uuid.uuid4(), obs_unit=obs_unit, start_time=T0, end_time=T0 + dt.timedelta(minutes=30))
    package = m.RawDataPackage(
        name=f"chai-lfa-001{suffix}",
        executed_obs_unit=eou,
        instrument_module=module,
        size_bytes=1024,
        checksum=hashlib.sha256(b"pkg").hexdigest(),
        state=PackageState.ARCHIVED,
        metadata_={"observation": {"frequency_ghz": 461.04}},
    )
    package.files = [m.RawDataFile(relative_path="scan.json", size_bytes=10, checksum=hashlib.sha256(b"a").hexdigest())]
    grouping = m.DataGrouping(
        name=f"ngc253{suffix}",
        filter_rules=[{"table": "Source", "column": "name", "operator": "eq", "value": "NGC253"}],
    )
    software = m.ReductionSoftware(name=f"chai-calibration{suffix}")
    version = m.ReductionSoftwareVersion(
        software=software, version="1.0.0", image_ref="docker://ccat/chai:1.0.0", image_digest="sha256:abc"
    )
    config = m.ReductionStepConfig(
        name=f"calibrate{suffix}", parameters={"calibration_mode": "hot_cold"}, parameters_sha256="0" * 64
    )
    pipeline = m.Pipeline(
        name=f"chai_ngc253{suffix}",
        data_grouping=grouping,
        processing_location=processing,
        trigger_type=TriggerType.CONTINUOUS,
    )
    step = m.ReductionStep(
        pipeline=pipeline,
        name="calibrate",
        position=0,
        group_by=["executed_obs_unit"],
        software=software,
        version_policy=VersionPolicy.COMPATIBLE,
        version_spec="1.0.0",
        config=config,
        resources={"cpu": 1, "memory_gb": 2},
    )
    final_step = m.ReductionStep(
        pipeline=pipeline,
        name="grid_map",
        position=1,
        group_by=[],
        software=software,
        version_spec="1.0.0",
        config=config,
        depends_on=[step],
    )
    session.add_all([site, archive, processing, instrument, module, package, pipeline, step, final_step])
    session.flush()
    return World(site, archive, processing, module, package, grouping, version, config, pipeline, step, final_step)


def make_attempt(
    session: Session, world: World, *, key: str = "all", attempt: int = 1, status: RunStatus = RunStatus.PENDING
) -> m.ExecutedReductionStep:
    row = m.ExecutedReductionStep(
        step=world.step,
        sub_group_key=key,
        attempt=attempt,
        status=status,
        input_fingerprint="f" * 64,
        software_version=world.software_version,
        config=world.config,
    )
    session.add(row)
    session.flush()
    return row


def make_product(
    session: Session, attempt: m.ExecutedReductionStep, *, path: str = "science/map.fits"
) -> m.DataProduct:
    product = m.DataProduct(
        executed_reduction_step=attempt,
        reduction_step_id=attempt.reduction_step_id,
        sub_group_key=attempt.sub_group_key,
        product_type=DataProductType.SCIENCE,
        relative_path=path,
        size_bytes=10,
        sha256="1" * 64,
    )
    session.add(product)
    session.flush()
    return product


def copy_of(product: m.DataProduct, location: m.DataLocation) -> m.PhysicalCopy:
    return m.PhysicalCopy(
        location=location, data_product=product, path=product.relative_path, status=PhysicalCopyStatus.PRESENT
    )
