"""The CHAI example's per-scan steps run packed on the real single-node Slurm, with real containers and data.

The example pipeline (examples/pipelines/chai_ngc253_co43.yaml), its per-scan steps (``group_by: [scan]``) given
``execution: {mode: packed}``, is applied to a seeded PostgreSQL ops-db; the StepRunner gets its packed backend
the way a Dagster run does (``HpcBackendResource.for_step``: Parsl's HighThroughputExecutor on a SlurmProvider),
stages the raw packages with the local stager and runs the real CHAI software under bubblewrap inside the
allocations. One scan's raw package is bad at the source (its cold load is a copy of its hot load, with
checksums that match, so staging accepts it and the calibration itself must refuse it): it fails alone.

test_packed_slurm.py covers the engine's failure modes (cancel, a killed run worker) with trivial payloads; this
module proves that what packing changes (where the container runs) leaves the container contract, staging and
registration of a real step as they are with one Slurm job per sub-group.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from sqlalchemy import select
from sqlalchemy.orm import Session

from ccat_dagster.execution.hpc.packed.backend import PackedBackend
from ccat_dagster.execution.hpc.slurm.backend import SlurmBackend
from ccat_dagster.execution.runner import OutcomeKind
from ccat_dagster.execution.staging import resolve_copy_path
from ccat_dagster.grouping.engine import scan_label
from ccat_dagster.grouping.keys import encode_sub_group_key
from ccat_dagster.opsdb import models as m
from ccat_dagster.opsdb.enums import FailureKind, RunStatus
from ccat_dagster.pipelines.apply import apply_pipeline_spec
from ccat_dagster.pipelines.spec import parse_pipeline_spec
from ccat_dagster.resources.ccat import HpcBackendResource

from .conftest import require_slurm
from .dagster_fixtures import EXAMPLE, PIPELINE, archived_example_scan_ids, require_bwrap_and_numpy
from .runner_fixtures import RunnerWorld, dispose_runner_world, make_runner_world, pipeline_attempts
from .test_packed_slurm import _require_slurm_and_parsl, wait_released
from .test_runner_failures import assert_path

pytestmark = [pytest.mark.slurm, pytest.mark.postgres, pytest.mark.bwrap, pytest.mark.slow]

SCANS = 6  # sub-groups per step: enough that one allocation of two workers runs several tasks each
POLL = {"poll_interval_seconds": 1.0, "min_poll_interval_seconds": 0.2, "scheduler_queries_per_minute": 600}


def packed_example_spec():
    """The example pipeline with its per-scan steps (``group_by: [scan]``) packed, everything else as shipped."""
    data = yaml.safe_load(EXAMPLE.read_text())
    per_scan = [step for step in data["steps"] if step.get("group_by") == ["scan"]]
    assert [step["name"] for step in per_scan] == ["calibrate", "baseline"], "the example's per-scan steps moved"
    for step in per_scan:
        step["execution"] = {"mode": "packed"}
    return parse_pipeline_spec(data, origin=str(EXAMPLE), base_dir=EXAMPLE.parent)


def scan_packages(world: RunnerWorld) -> dict[str, m.RawDataPackage]:
    """Sub-group key (``scan=<label>``) → the scan's archived raw package, for the example's grouping."""
    with Session(world.engine, expire_on_commit=False) as session:
        packages = session.scalars(
            select(m.RawDataPackage)
            .join(m.ExecutedObsUnit)
            .where(m.RawDataPackage.executed_obs_unit_id.in_(archived_example_scan_ids(session)))
        ).all()
        by_key = {}
        for package in packages:
            eou = package.executed_obs_unit
            by_key[encode_sub_group_key([("scan", scan_label(eou.start_time, eou.id))])] = package
        session.expunge_all()
    return dict(sorted(by_key.items()))


def break_cold_load(world: RunnerWorld, package: m.RawDataPackage) -> None:
    """Rewrite the archived package with cold.f32 a copy of hot.f32, and record its checksums as the archive would
    have (the fault happened at the telescope): staging accepts it, and calibration finds no usable channel."""
    with Session(world.engine) as session, session.begin():
        copy, root = session.execute(
            select(m.PhysicalCopy, m.DataLocation.root_path)
            .join(m.DataLocation, m.PhysicalCopy.data_location_id == m.DataLocation.id)
            .where(m.PhysicalCopy.raw_data_package_id == package.id)
        ).one()
        tar_path = resolve_copy_path(location_root=root, copy_path=copy.path)
        with tarfile.open(tar_path) as tar:
            files = {Path(i.name).name: tar.extractfile(i).read() for i in tar.getmembers() if i.isfile()}
        files["cold.f32"] = files["hot.f32"]
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name, content in sorted(files.items()):
                info = tarfile.TarInfo(f"{package.name}/{name}")
                info.size, info.mode = len(content), 0o644
                tar.addfile(info, io.BytesIO(content))
        tar_path.write_bytes(buffer.getvalue())
        row = session.get(m.RawDataPackage, package.id)
        row.checksum = copy.checksum = hashlib.sha256(buffer.getvalue()).hexdigest()
        row.size_bytes = len(buffer.getvalue())
        cold = next(f for f in row.files if f.relative_path == "cold.f32")
        cold.checksum = hashlib.sha256(files["cold.f32"]).hexdigest()


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[RunnerWorld]:
    require_slurm()
    _require_slurm_and_parsl()
    require_bwrap_and_numpy()
    # Parsl writes the run directory's paths into #SBATCH lines, which take plain characters only.
    world = make_runner_world(tmp_path_factory.mktemp("packed_chai"), scans=20)
    with Session(world.engine) as session, session.begin():
        apply_pipeline_spec(session, packed_example_spec(), source_path=EXAMPLE)
    yield world
    dispose_runner_world(world)


class PackedBackends:
    """The packed-backend factory a Dagster run uses (``HpcBackendResource.for_step`` on Slurm), remembering
    each backend it made so the test can count and release their allocations."""

    def __init__(self, world: RunnerWorld) -> None:
        self.resource = HpcBackendResource(
            kind="slurm",
            packed_state_dir=str(world.base_dir / ".packed"),
            packed_max_allocations=2,
            packed_cores_per_allocation=2,
            packed_walltime_minutes=60,  # the example's per-scan steps ask for time_hours 1
            packed_idle_seconds=30,
        )
        self.made: list[PackedBackend] = []

    def for_step(self, step):
        backend = self.resource.for_step(step)
        assert isinstance(backend, PackedBackend), f"{step.asset_label} did not run packed"
        self.made.append(backend)
        return backend

    def allocations(self) -> list[str]:
        return sorted({job for backend in self.made for job in backend.engine.allocation_ids()})

    def release(self) -> None:
        for backend in self.made:
            backend.close()
        subprocess.run(["scancel", *self.allocations()], check=False, capture_output=True)


def packed_runner(world: RunnerWorld, backends: PackedBackends):
    # One-job-per-sub-group Slurm is the deployment's backend; the step's execution mode swaps in the packed one.
    return world.runner(SlurmBackend(), backend_for_step=backends.for_step, **POLL)


def assert_ran_in_an_allocation(
    world: RunnerWorld, attempt: m.ExecutedReductionStep, spans: dict[str, tuple[float, float]] | None
) -> None:
    """The task's record, written by the job wrapper inside the allocation, and Slurm's accounting (``spans``;
    None without it) agree: the task ran while one of the batch's allocations was running."""
    record = json.loads((world.base_dir / ".packed" / "tasks" / f"{attempt.hpc_job_id}.json").read_text())
    assert record["state"] == "finished" and record["exit_code"] == attempt.exit_code
    if spans is None:
        return
    assert any(start <= record["started_at"] and record["finished_at"] <= end for start, end in spans.values()), (
        record,
        spans,
    )


def accounting_enabled() -> bool:
    config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, check=True).stdout
    return "accounting_storage/slurmdbd" in config


def parsl_children() -> list[int]:
    """Pids of this process's children that are Parsl's (the interchange names itself ``parsl: ...``)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            if parent == os.getpid() and b"parsl" in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


def sacct_spans(job_ids: list[str]) -> dict[str, tuple[float, float]]:
    """Start and end (epoch seconds; a running job ends now) of each allocation, as Slurm accounted them."""
    out = subprocess.run(
        ["sacct", "-X", "-n", "-P", f"--jobs={','.join(job_ids)}", "--format=JobID,Start,End"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout

    def epoch(text: str) -> float:  # sacct prints local time to the second
        return time.mktime(time.strptime(text, "%Y-%m-%dT%H:%M:%S"))

    spans = {}
    for line in out.splitlines():
        job, start, end = line.split("|")
        if start not in ("", "None", "Unknown"):  # an allocation that never started ran nothing
            spans[job] = (epoch(start) - 1, time.time() if end in ("", "Unknown", "None") else epoch(end) + 1)
    return spans


def test_chai_per_scan_steps_run_packed_on_slurm_each_sub_group_its_own_attempt(world):
    """calibrate, then baseline, for six scans, each step one packed batch on real Slurm: every good scan's
    attempt completes with its exit code, wall time and peak memory, its manifest, products and lineage; the scan
    with the broken cold load fails alone (each of its attempts, retries included, exit 2), and its baseline
    never starts; each batch ran in fewer allocations than it had sub-groups, all released at the end."""
    packages = scan_packages(world)
    assert len(packages) >= SCANS, list(packages)
    keys = list(packages)[:SCANS]
    bad = keys[-1]
    good = keys[:-1]
    break_cold_load(world, packages[bad])
    backends = PackedBackends(world)
    started = time.monotonic()
    try:
        calibrated = packed_runner(world, backends).run(
            pipeline_name=PIPELINE, step_name="calibrate", sub_group_keys=keys, dagster_run_id="packed-cal"
        )
        calibrate_allocations = backends.allocations()
        assert {o.sub_group_key: o.kind for o in calibrated} == {
            **{k: OutcomeKind.COMPLETED for k in good},
            bad: OutcomeKind.FAILED,
        }, [(o.sub_group_key, o.detail) for o in calibrated]

        baselined = packed_runner(world, backends).run(
            pipeline_name=PIPELINE, step_name="baseline", sub_group_keys=keys, dagster_run_id="packed-base"
        )
        assert {o.sub_group_key: o.kind for o in baselined} == {
            **{k: OutcomeKind.COMPLETED for k in good},
            bad: OutcomeKind.SKIPPED,
        }, [(o.sub_group_key, o.detail) for o in baselined]
        allocations = backends.allocations()
    finally:
        backends.release()
    elapsed = time.monotonic() - started

    # Few allocations: each batch's tasks shared its engine's allocations (at most two, here one node).
    baseline_allocations = sorted(set(allocations) - set(calibrate_allocations))
    assert 1 <= len(calibrate_allocations) < len(keys), calibrate_allocations
    assert 1 <= len(baseline_allocations) < len(good), baseline_allocations
    assert wait_released(allocations, 30) == [], "the batch's allocations outlived it"
    assert parsl_children() == [], "a Parsl interchange outlived its batch"

    # scripts/slurm-single-node.sh falls back to no slurmdbd where it cannot run one: then sacct knows nothing.
    spans = sacct_spans(allocations) if accounting_enabled() else None
    with Session(world.engine) as session:
        package_ids = {key: packages[key].id for key in keys}
        for step in ("calibrate", "baseline"):
            for key in good:
                (attempt,) = world_attempts(world, step, key)
                assert attempt.hpc_backend == "packed" and len(attempt.hpc_job_id) == 32
                assert attempt.exit_code == 0 and attempt.failure_kind is None
                assert attempt.wall_time_seconds is not None and attempt.wall_time_seconds > 0
                assert attempt.peak_memory_gb is not None and attempt.peak_memory_gb > 0
                assert_path(attempt, "staging_data", "submitted", "collecting_results", "completed")
                assert_ran_in_an_allocation(world, attempt, spans)
                manifest = json.loads((Path(attempt.attempt_dir) / "config" / "manifest.json").read_text())
                assert (manifest["step"], manifest["sub_group_key"]) == (step, key)
                products = session.scalars(
                    select(m.DataProduct).where(m.DataProduct.executed_reduction_step_id == attempt.id)
                ).all()
                suffixes = sorted(p.relative_path.split(".", 1)[1] for p in products)
                expected = ["cal.f32", "cal.json"] if step == "calibrate" else ["base.f32", "base.json"]
                assert suffixes == expected, suffixes
                assert all(p.sub_group_key == key and len(p.sha256) == 64 for p in products)
                # Lineage to the scan's own raw package only: directly (calibrate) or through calibrate (baseline).
                ancestors = session.scalars(
                    select(m.run_ancestor_package.c.raw_data_package_id).where(
                        m.run_ancestor_package.c.executed_reduction_step_id == attempt.id
                    )
                ).all()
                assert ancestors == [package_ids[key]], (step, key, ancestors)
                if step == "calibrate":
                    assert {str(i["package_id"]) for i in manifest["inputs"]} == {str(package_ids[key])}
                    assert len(manifest["inputs"]) == 4  # scan.json, sky, hot and cold
                else:
                    (upstream,) = world_attempts(world, "calibrate", key)
                    used = session.scalars(
                        select(m.DataProduct.executed_reduction_step_id)
                        .join(m.run_input_product, m.run_input_product.c.data_product_id == m.DataProduct.id)
                        .where(m.run_input_product.c.executed_reduction_step_id == attempt.id)
                    ).all()
                    assert used and set(used) == {upstream.id}, used

    job_ids = [a.hpc_job_id for step in ("calibrate", "baseline") for k in keys for a in world_attempts(world, step, k)]
    assert len(job_ids) == 2 * len(good) + 3 and len(set(job_ids)) == len(job_ids), job_ids  # one task per attempt

    tries = world_attempts(world, "calibrate", bad)
    assert [(a.status, a.failure_kind, a.exit_code) for a in tries] == [
        (RunStatus.FAILED, FailureKind.EXIT_CODE, 2)
    ] * 3, [(a.status, a.failure_kind, a.exit_code, a.error) for a in tries]
    assert "no channel can be calibrated" in tries[-1].error, tries[-1].error
    for attempt in tries:  # refused by the CHAI software inside the allocation, not before submission
        assert attempt.hpc_backend == "packed"
        assert_ran_in_an_allocation(world, attempt, spans)
    assert world.registered_counts([a.id for a in tries])["products"] == 0
    assert world_attempts(world, "baseline", bad) == []
    print(f"packed CHAI calibrate + baseline of {SCANS} scans: {elapsed:.1f} s, allocations {allocations}")


def world_attempts(world: RunnerWorld, step: str, key: str) -> list[m.ExecutedReductionStep]:
    return pipeline_attempts(world.engine, PIPELINE, step=step, key=key)
