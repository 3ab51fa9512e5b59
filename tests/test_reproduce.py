"""``ccat-dagster reproduce``: the demo pipeline's products re-executed from ops-db's records and compared.

Real parts: PostgreSQL ops-db, the local stager, bubblewrap, the local backend and the real single-node Slurm.
The CHAI example runs calibrate → baseline → grid_map once; then its map cube is reproduced on both backends
(identical), an intermediate whose raw copy was removed is staged again, a deliberately non-deterministic
payload is reported different, and a missing image or an overlapping scratch directory are clear errors.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from ccat_dagster.cli import main
from ccat_dagster.execution.hpc.local import LocalBackend
from ccat_dagster.execution.images import ImageError
from ccat_dagster.execution.runner import OutcomeKind
from ccat_dagster.execution.runtimes import BubblewrapRuntime
from ccat_dagster.execution.staging import LocalStager
from ccat_dagster.opsdb import models as m
from ccat_dagster.opsdb.enums import PhysicalCopyStatus
from ccat_dagster.pipelines.apply import apply_pipeline_spec
from ccat_dagster.pipelines.spec import load_pipeline_spec, parse_pipeline_spec
from ccat_dagster.provenance.reproduce import (
    ReproduceError,
    Verdict,
    compare_digests,
    reproduce_product,
)

from .dagster_fixtures import EXAMPLE, PIPELINE, archived_example_scan_keys, require_bwrap_and_numpy
from .runner_fixtures import RunnerWorld, dispose_runner_world, make_runner_world

pytestmark = [pytest.mark.postgres, pytest.mark.bwrap]

NONDETERMINISTIC = r"""
import os
out = os.environ["WORKFLOW_OUTPUT_DIR"]
os.makedirs(os.path.join(out, "science"), exist_ok=True)
open(os.path.join(out, "science", "stable.txt"), "w").write("the same every time\n")
open(os.path.join(out, "science", "noise.bin"), "wb").write(os.urandom(64 + os.urandom(1)[0] % 32))
"""


def test_compare_digests_classifies_every_path() -> None:
    result = compare_digests(
        recorded={"a": (1, "x"), "b": (2, "y"), "c": (3, "z")},
        reproduced={"a": (1, "x"), "b": (5, "w"), "d": (4, "v")},
    )
    assert [(o.relative_path, o.verdict, o.recorded_size, o.reproduced_size) for o in result] == [
        ("a", Verdict.IDENTICAL, 1, 1),
        ("b", Verdict.DIFFERENT, 2, 5),
        ("c", Verdict.MISSING, 3, None),
        ("d", Verdict.EXTRA, None, 4),
    ]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[RunnerWorld]:
    """The CHAI example run once for every archived scan: calibrate, baseline, grid_map (local, bubblewrap)."""
    require_bwrap_and_numpy()
    # Paths go into #SBATCH lines for the Slurm test, which accept only plain characters.
    world = make_runner_world(tmp_path_factory.mktemp("reproduce"), scans=4)
    with Session(world.engine) as session, session.begin():
        apply_pipeline_spec(session, load_pipeline_spec(EXAMPLE), source_path=EXAMPLE)
        scans = sorted(archived_example_scan_keys(session))
    for step, keys in (("calibrate", scans), ("baseline", scans), ("grid_map", ["all"])):
        outcomes = world.runner().run(
            pipeline_name=PIPELINE, step_name=step, sub_group_keys=keys, dagster_run_id=uuid.uuid4().hex
        )
        assert {o.kind for o in outcomes} == {OutcomeKind.COMPLETED}, [o.detail for o in outcomes]
    yield world
    dispose_runner_world(world)


def _product(world: RunnerWorld, step: str, suffix: str) -> m.DataProduct:
    with Session(world.engine) as session:
        return session.scalars(
            select(m.DataProduct)
            .join(m.ReductionStep)
            .join(m.Pipeline)
            .where(m.Pipeline.name == PIPELINE, m.ReductionStep.name == step)
            .where(m.DataProduct.relative_path.like(f"%{suffix}"))
            .order_by(m.DataProduct.id)
            .limit(1)
        ).one()


def _environment(world: RunnerWorld, monkeypatch) -> None:
    monkeypatch.setenv("CCAT_OPS_DB_URL", world.url)
    monkeypatch.setenv("CCAT_DAGSTER_DATA_DIR", str(world.data_dir))
    monkeypatch.setenv("CCAT_WORKFLOW_MANAGER_PIPELINE_BASE_DIR", str(world.base_dir))
    monkeypatch.setenv("CCAT_WORKFLOW_MANAGER_SIF_CACHE_DIR", str(world.data_dir / "sif-cache"))
    monkeypatch.setenv("CCAT_WORKFLOW_MANAGER_CONTAINER_RUNTIME", "bubblewrap")
    monkeypatch.setenv("CCAT_WORKFLOW_MANAGER_HPC_BACKEND", "local")


def _registered_state(world: RunnerWorld) -> tuple[list[tuple], list[tuple]]:
    with Session(world.engine) as session:
        products = session.execute(
            select(m.DataProduct.id, m.DataProduct.sha256, m.DataProduct.superseded_by_id).order_by(m.DataProduct.id)
        ).all()
        copies = session.execute(
            select(m.PhysicalCopy.path, m.PhysicalCopy.status)
            .where(m.PhysicalCopy.data_product_id.is_not(None))
            .order_by(m.PhysicalCopy.id)
        ).all()
    return [tuple(p) for p in products], [tuple(c) for c in copies]


def test_reproduce_the_map_cube_on_the_local_backend_is_identical(world, tmp_path, monkeypatch, capsys) -> None:
    cube = _product(world, "grid_map", "_cube.fits")
    before = _registered_state(world)
    _environment(world, monkeypatch)
    code = main(["reproduce", str(cube.id), "--workdir", str(tmp_path / "scratch"), "--backend", "local", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0, (report["outputs"], report["notes"])
    assert report["identical"] is True and report["backend"] == "local"
    paths = {o["relative_path"]: o["verdict"] for o in report["outputs"]}
    assert cube.relative_path in paths and len(paths) == 6, "every product of the attempt is compared"
    assert set(paths.values()) == {"identical"}
    assert report["image_digest"].startswith("sha256:")
    assert report["notes"] == [], "the rebuilt manifest equals the attempt's own, key for key"
    assert _registered_state(world) == before, "registered products and their copies are untouched"
    reproduced = tmp_path / "scratch" / "pipelines" / PIPELINE / "all" / "output" / cube.relative_path
    # The example software's reproducibility notes: a verifiable CHECKSUM/DATASUM, DATE-OBS from the scan, TELESCOP.
    header = subprocess.run(
        [
            "/usr/bin/python3",
            "-W",
            "error",
            "-c",
            "import sys; from astropy.io import fits\n"
            "with fits.open(sys.argv[1], checksum=True) as f:\n"
            "    h = f[0].header; print(h['TELESCOP'], h['DATE-OBS'], h['CHECKSUM'], h['DATASUM'])",
            str(reproduced),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert header[0] == "FYST" and header[1].startswith("20") and "+" not in header[1]
    assert len(header[2]) == 16 and header[3].isdigit()


@pytest.mark.slurm
def test_reproduce_on_the_real_slurm_is_identical(world, tmp_path_factory) -> None:
    if (
        shutil.which("sbatch") is None
        or "is UP" not in subprocess.run(["scontrol", "ping"], capture_output=True, text=True, check=False).stdout
    ):
        message = "Slurm is not running here; run scripts/slurm-single-node.sh as root"
        if os.environ.get("CI") or os.environ.get("CCAT_REQUIRE_ALL_BACKENDS"):
            pytest.fail(message)
        pytest.skip(message)
    from ccat_dagster.execution.hpc.slurm import SlurmBackend

    cube = _product(world, "grid_map", "_mom0.fits")
    report = reproduce_product(
        engine=world.engine,
        product_id=cube.id,
        workdir=tmp_path_factory.mktemp("slurm_scratch") / "scratch",
        pipeline_base_dir=world.base_dir,
        sif_cache_dir=world.data_dir / "sif-cache",
        backend=SlurmBackend(),
        runtime=BubblewrapRuntime(),
        stager=LocalStager(),
    )
    assert report.backend == "slurm" and report.exit_code == 0, report.notes
    assert report.identical, report.as_text()


def test_an_input_no_longer_present_is_staged_again(world, tmp_path) -> None:
    calibrated = _product(world, "calibrate", ".cal.f32")
    with Session(world.engine) as session, session.begin():
        attempt = session.get(m.ExecutedReductionStep, calibrated.executed_reduction_step_id)
        (package,) = attempt.input_packages
        package_id = package.id
        copy = session.scalars(
            select(m.PhysicalCopy).where(
                m.PhysicalCopy.raw_data_package_id == package_id,
                m.PhysicalCopy.data_location_id == world.processing_location_id,
            )
        ).one()
        staged_dir = Path(copy.path)
        session.delete(copy)
    shutil.rmtree(staged_dir)
    report = reproduce_product(
        engine=world.engine,
        product_id=calibrated.id,
        workdir=tmp_path / "scratch",
        pipeline_base_dir=world.base_dir,
        sif_cache_dir=world.data_dir / "sif-cache",
        backend=LocalBackend(state_dir=tmp_path / "jobs"),
        runtime=BubblewrapRuntime(),
        stager=LocalStager(),
    )
    assert report.identical, report.as_text()
    assert staged_dir.is_dir(), "the package was staged again through the local stager"
    with Session(world.engine) as session:
        status = session.scalar(
            select(m.PhysicalCopy.status).where(
                m.PhysicalCopy.raw_data_package_id == package_id,
                m.PhysicalCopy.data_location_id == world.processing_location_id,
            )
        )
    assert status in (PhysicalCopyStatus.PRESENT, PhysicalCopyStatus.STAGED)


def test_a_nondeterministic_payload_is_reported_different(world, tmp_path, monkeypatch, capsys) -> None:
    software = tmp_path / "noisy-software"
    (software / "bin").mkdir(parents=True)
    (software / "bin" / "noisy.py").write_text(NONDETERMINISTIC)
    name = f"t_noisy_{uuid.uuid4().hex[:6]}"
    spec = parse_pipeline_spec(
        {
            "pipeline": name,
            "processing_location": "ramses-processing",
            "trigger": {"type": "manual"},
            "grouping": {
                "name": f"{name}-grouping",
                "instrument_module": "LFA",
                "rules": [{"table": "Source", "column": "name", "operator": "eq", "value": "NGC253"}],
            },
            "steps": [
                {
                    "name": "noisy",
                    "software": {
                        "name": name,
                        "version": "1.0.0",
                        "image_ref": str(software),
                        "entrypoint": ["/usr/bin/python3", "/opt/software/bin/noisy.py"],
                    },
                    "group_by": ["executed_obs_unit"],
                }
            ],
        }
    )
    with Session(world.engine) as session, session.begin():
        apply_pipeline_spec(session, spec)
    (outcome,) = world.runner().run(
        pipeline_name=name, step_name="noisy", sub_group_keys=world.scan_keys[:1], dagster_run_id=uuid.uuid4().hex
    )
    assert outcome.kind is OutcomeKind.COMPLETED, outcome.detail
    with Session(world.engine) as session:
        product_id = session.scalar(
            select(m.DataProduct.id).where(
                m.DataProduct.executed_reduction_step_id == outcome.attempt_id,
                m.DataProduct.relative_path == "science/noise.bin",
            )
        )
    _environment(world, monkeypatch)
    code = main(["reproduce", str(product_id), "--workdir", str(tmp_path / "scratch")])
    text = capsys.readouterr().out
    assert code == 1
    assert "different  science/noise.bin (recorded" in text and "identical  science/stable.txt" in text
    assert text.rstrip().endswith("NOT IDENTICAL")


def test_a_missing_image_and_a_bad_workdir_are_clear_errors(world, tmp_path) -> None:
    cube = _product(world, "grid_map", "_cube.fits")
    common = dict(
        engine=world.engine,
        product_id=cube.id,
        pipeline_base_dir=world.base_dir,
        sif_cache_dir=world.data_dir / "sif-cache",
        backend=LocalBackend(state_dir=tmp_path / "jobs"),
        runtime=BubblewrapRuntime(),
        stager=LocalStager(),
    )
    with pytest.raises(ReproduceError, match="overlaps PIPELINE_BASE_DIR"):
        reproduce_product(workdir=world.base_dir / "scratch", **common)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(ReproduceError, match="not an empty directory"):
        reproduce_product(workdir=tmp_path / "full", **common)
    with pytest.raises(ReproduceError, match="data product 999999 does not exist"):
        reproduce_product(**{**common, "product_id": 999999}, workdir=tmp_path / "a")

    calibrated = _product(world, "calibrate", ".cal.json")
    with Session(world.engine) as session, session.begin():
        (package,) = session.get(m.ExecutedReductionStep, calibrated.executed_reduction_step_id).input_packages
        package_id, checksum = package.id, package.checksum
        package.checksum = "0" * 64  # a new data version of the scan since the attempt ran
    try:
        with pytest.raises(ReproduceError, match="no longer give its input fingerprint"):
            reproduce_product(**{**common, "product_id": calibrated.id}, workdir=tmp_path / "c")
    finally:
        with Session(world.engine) as session, session.begin():
            session.get(m.RawDataPackage, package_id).checksum = checksum

    with Session(world.engine) as session, session.begin():
        attempt = session.get(m.ExecutedReductionStep, cube.executed_reduction_step_id)
        version = attempt.software_version
        version_id, original = version.id, version.image_ref
        version.image_ref = str(tmp_path / "gone")
    try:
        with pytest.raises(ImageError, match="does not exist; build or copy it there first"):
            reproduce_product(workdir=tmp_path / "b", **common)
    finally:
        with Session(world.engine) as session, session.begin():
            session.get(m.ReductionSoftwareVersion, version_id).image_ref = original
