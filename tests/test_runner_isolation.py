"""Isolation on real parts (PostgreSQL, local staging, bubblewrap, local backend): a bad raw package, a full
disk or too many products fail only the attempt they concern, with its failure kind and a message saying why."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from ccat_dagster.execution.hpc.local import LocalBackend
from ccat_dagster.execution.runner import OutcomeKind, RunnerConfig, StepRunner
from ccat_dagster.execution.runtimes import BubblewrapRuntime
from ccat_dagster.execution.staging import LocalStager, resolve_copy_path
from ccat_dagster.opsdb import models as m
from ccat_dagster.opsdb.enums import FailureKind, RunStatus

from .dagster_fixtures import require_bwrap_and_numpy
from .runner_fixtures import STEP, RunnerWorld, dispose_runner_world, make_runner_world

pytestmark = [pytest.mark.postgres, pytest.mark.bwrap]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[RunnerWorld]:
    require_bwrap_and_numpy()
    world = make_runner_world(tmp_path_factory.mktemp("isolation"), scans=30)
    assert len(world.scan_keys) >= 9, world.scan_keys
    yield world
    dispose_runner_world(world)


def _archive_tar(world: RunnerWorld, key: str) -> Path:
    """The archive copy of the raw package of scan ``key`` (executed_obs_unit=<uuid>)."""
    eou = key.split("=", 1)[1]
    with Session(world.engine) as session:
        root, path = session.execute(
            select(m.DataLocation.root_path, m.PhysicalCopy.path)
            .join(m.DataLocation, m.PhysicalCopy.data_location_id == m.DataLocation.id)
            .join(m.RawDataPackage, m.PhysicalCopy.raw_data_package_id == m.RawDataPackage.id)
            .where(m.RawDataPackage.executed_obs_unit_id == eou)
            .where(m.DataLocation.id != world.processing_location_id)
        ).first()
    return resolve_copy_path(location_root=root, copy_path=path)


def _run(world: RunnerWorld, pipeline: str, keys: list[str], runner: StepRunner | None = None):
    runner = runner or world.runner()
    return runner.run(pipeline_name=pipeline, step_name=STEP, sub_group_keys=keys, dagster_run_id="run-iso")


@pytest.mark.parametrize("damage", ["corrupt", "missing"])
def test_a_bad_raw_package_fails_only_the_sub_group_that_contains_it(world, damage):
    offset = 0 if damage == "corrupt" else 3
    keys = world.scan_keys[offset : offset + 3]
    tar = _archive_tar(world, keys[1])
    if damage == "corrupt":
        data = bytearray(tar.read_bytes())
        data[len(data) // 2] ^= 0xFF
        tar.write_bytes(bytes(data))
    else:
        tar.rename(tar.with_suffix(".gone"))
    pipeline = world.apply(behaviour="ok", max_retries=2)
    outcomes = _run(world, pipeline, keys)
    assert [o.kind for o in outcomes] == [OutcomeKind.COMPLETED, OutcomeKind.FAILED, OutcomeKind.COMPLETED]
    assert outcomes[1].failure_kind is FailureKind.STAGING and outcomes[1].detail.startswith("staging failed: ")
    (bad,) = world.attempts(pipeline, keys[1])  # not retried: a retry would read the same bad package
    assert (bad.status, bad.failure_kind, bad.hpc_job_id) == (RunStatus.FAILED, FailureKind.STAGING, None)
    for key in (keys[0], keys[2]):
        (good,) = world.attempts(pipeline, key)
        assert good.status is RunStatus.COMPLETED and good.failure_kind is None


def test_more_products_than_the_limit_are_refused_as_a_contract_failure(world):
    keys = world.scan_keys[6:8]
    pipeline = world.apply(behaviour="ok", extra_config={"fail_keys": [keys[0]], "fail_behaviour": "many", "files": 6})
    outcomes = _run(world, pipeline, keys, world.runner(max_products_per_attempt=5))
    assert [o.kind for o in outcomes] == [OutcomeKind.FAILED, OutcomeKind.COMPLETED]
    assert outcomes[0].failure_kind is FailureKind.CONTRACT
    assert "6 files, more than the limit of 5 products per attempt" in outcomes[0].detail
    (refused,) = world.attempts(pipeline, keys[0])
    assert refused.failure_kind is FailureKind.CONTRACT
    assert world.registered_counts([refused.id])["products"] == 0


@pytest.fixture
def full_disk(tmp_path) -> Iterator[Path]:
    """A 1 MiB tmpfs, filled up: the pipeline base directory of a runner with nowhere left to write."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs (a real full file system) needs root; CI runs the suite as root")
    mount = tmp_path / "full"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=True)
    try:
        with open(mount / "filler", "wb") as handle:
            try:
                while True:
                    handle.write(b"\0" * 65536)
                    handle.flush()
            except OSError:
                pass
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_while_preparing_an_attempt_fails_it_as_disk_full_naming_the_path(world, full_disk):
    keys = world.scan_keys[8:9]
    pipeline = world.apply(behaviour="ok")
    runner = StepRunner(
        engine=world.engine,
        backend=LocalBackend(state_dir=world.base_dir / ".local-jobs", max_concurrent_jobs=2),
        runtime=BubblewrapRuntime(),
        stager=LocalStager(),
        config=RunnerConfig(
            pipeline_base_dir=full_disk,
            processing_location_id=world.processing_location_id,
            sif_cache_dir=world.data_dir / "sif-cache",
            poll_interval_seconds=0.2,
        ),
        report=world.reports.append,
    )
    (outcome,) = _run(world, pipeline, keys, runner)
    assert outcome.kind is OutcomeKind.FAILED and outcome.failure_kind is FailureKind.DISK_FULL
    assert "the disk is full (ENOSPC)" in outcome.detail and str(full_disk) in outcome.detail
    (attempt,) = world.attempts(pipeline, keys[0])
    assert (attempt.status, attempt.failure_kind, attempt.hpc_job_id) == (RunStatus.FAILED, FailureKind.DISK_FULL, None)
