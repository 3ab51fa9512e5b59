"""Re-execute the attempt that made a product and compare what comes out (``ccat-dagster reproduce``).

From what ops-db recorded for the attempt — its input packages (staged again through the stager where no copy
is present, checked against their recorded checksums), its upstream products (by sha256), the software
version and the image digest it was submitted with, its config — the same manifest, mounts and container
command are built with the contract and runtime code the runner uses, in a scratch directory outside
``PIPELINE_BASE_DIR``, and run on the chosen backend. Upstream products are copied into the scratch workspace
after their sha256 is checked, so nothing registered is mounted writable or changed. Every product of the
attempt is then compared by sha256 with what the re-execution wrote: identical, different (with both sizes),
missing, or extra. Nothing is written to ops-db's products; staging may add raw-data copies, as for any run.
"""

from __future__ import annotations

import argparse
import enum
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, selectinload

from ccat_dagster.errors import CcatError
from ccat_dagster.execution import contract
from ccat_dagster.execution.discovery import discover_products
from ccat_dagster.execution.fingerprint import config_sha256, input_fingerprint
from ccat_dagster.execution.hpc.base import HpcBackend, JobResources, JobSpec
from ccat_dagster.execution.images import image_digest_of, resolve_image
from ccat_dagster.execution.runtimes import ContainerInvocation, ContainerRuntime
from ccat_dagster.execution.staging import Stager, require_present_products
from ccat_dagster.opsdb import models as m
from ccat_dagster.opsdb.engine import session_scope
from ccat_dagster.settings import Settings

_CHUNK = 1 << 20


class ReproduceError(CcatError):
    """The product cannot be re-executed as recorded; the message says what is missing and what to do."""


class Verdict(enum.StrEnum):
    IDENTICAL = "identical"
    DIFFERENT = "different"
    MISSING = "missing"
    EXTRA = "extra"


@dataclass(frozen=True)
class OutputComparison:
    relative_path: str
    verdict: Verdict
    recorded_sha256: str | None = None
    reproduced_sha256: str | None = None
    recorded_size: int | None = None
    reproduced_size: int | None = None


@dataclass
class ReproduceReport:
    product_id: int
    attempt_id: int
    step: str
    sub_group_key: str
    software: str
    image_digest: str
    backend: str
    job_id: str
    exit_code: int | None
    workdir: str
    outputs: list[OutputComparison] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        return self.exit_code == 0 and bool(self.outputs) and all(o.verdict is Verdict.IDENTICAL for o in self.outputs)

    def as_json(self) -> dict[str, Any]:
        document = asdict(self)
        document["identical"] = self.identical
        document["outputs"] = [{k: v for k, v in asdict(o).items() if v is not None} for o in self.outputs]
        return document

    def as_text(self) -> str:
        lines = [
            f"product {self.product_id}: attempt {self.attempt_id} of step {self.step} [{self.sub_group_key}], "
            f"{self.software} {self.image_digest}",
            f"re-executed on {self.backend} as job {self.job_id} (exit code {self.exit_code}) in {self.workdir}",
        ]
        for o in self.outputs:
            if o.verdict is Verdict.DIFFERENT:
                detail = f" (recorded {o.recorded_size} bytes, reproduced {o.reproduced_size} bytes)"
            elif o.verdict is Verdict.MISSING:
                detail = f" (recorded {o.recorded_size} bytes, not written again)"
            elif o.verdict is Verdict.EXTRA:
                detail = f" ({o.reproduced_size} bytes, not among the recorded products)"
            else:
                detail = ""
            lines.append(f"  {o.verdict.value:9}  {o.relative_path}{detail}")
        lines.extend(f"note: {note}" for note in self.notes)
        lines.append("IDENTICAL" if self.identical else "NOT IDENTICAL")
        return "\n".join(lines)


@dataclass(frozen=True)
class _Recorded:
    """What ops-db recorded about the attempt, read in one session."""

    attempt_id: int
    pipeline: str
    processing_location_id: int
    step: str
    sub_group_key: str
    is_final: bool
    run_id: str
    software: contract.SoftwareRef
    entrypoint: list[str]
    config: dict[str, Any]
    resources: dict[str, Any]
    recorded_image_digest: str | None
    package_ids: list[int]
    files: dict[int, dict[str, tuple[int, str]]]
    upstream: list[contract.UpstreamProduct]
    products: dict[str, tuple[int, str]]
    input_fingerprint: str
    current_fingerprint: str
    attempt_dir: str | None


def reproduce_product(
    *,
    engine: Engine,
    product_id: int,
    workdir: Path,
    pipeline_base_dir: Path,
    sif_cache_dir: Path,
    backend: HpcBackend,
    runtime: ContainerRuntime,
    stager: Stager,
    staging_timeout_seconds: float = 3600.0,
    poll_seconds: float = 0.5,
    timeout_seconds: float | None = None,
    progress: Callable[[str], None] = lambda _message: None,
) -> ReproduceReport:
    """Re-execute the attempt that made ``product_id`` in ``workdir`` (created; must be new or empty).

    Inputs are staged at the processing location of the product's pipeline. Raises ``ReproduceError`` (or the
    ``ImageError`` of a missing image, the stager's error for inputs that cannot be staged) before anything runs
    when the recorded attempt cannot be re-executed as it was.
    """
    workdir = _scratch_dir(Path(workdir), Path(pipeline_base_dir))
    with Session(engine) as session:
        recorded = _read_attempt(session, product_id)
    notes: list[str] = []
    if recorded.current_fingerprint != recorded.input_fingerprint:
        raise ReproduceError(
            f"attempt {recorded.attempt_id}'s recorded inputs no longer give its input fingerprint "
            f"{recorded.input_fingerprint[:12]}…: a package checksum or the software version's image digest changed "
            "since (a new data version or image build); reproduce a product of the current inputs instead"
        )

    image = resolve_image(
        image_ref=recorded.software.image_ref,
        image_digest=recorded.software.image_digest,
        sif_cache_dir=sif_cache_dir,
        runtime_name=runtime.name,
    )
    digest = image_digest_of(
        image, image_ref=recorded.software.image_ref, cache_dir=Path(sif_cache_dir) / ".tree-digests"
    )
    if recorded.recorded_image_digest is None:
        notes.append(
            f"attempt {recorded.attempt_id} recorded no image digest (made before digests were recorded); the "
            f"image now has {digest}, which cannot be compared"
        )
    elif digest != recorded.recorded_image_digest:
        raise ReproduceError(
            f"the image of {recorded.software.name} {recorded.software.version} ({image.location}) is {digest}, but "
            f"attempt {recorded.attempt_id} ran with {recorded.recorded_image_digest}; restore that image (or "
            "re-run the step with a new software version) to reproduce the product"
        )

    layout = contract.attempt_layout(
        base_dir=workdir / "pipelines",
        pipeline=recorded.pipeline,
        sub_group_key=recorded.sub_group_key,
        step=recorded.step,
        # The attempt's own id: the manifest lists it, and the scratch base directory keeps it apart.
        attempt_id=str(recorded.attempt_id),
        is_final=recorded.is_final,
    )
    layout.create()
    staged = (
        stager.stage(
            engine=engine,
            package_ids=recorded.package_ids,
            processing_location_id=recorded.processing_location_id,
            timeout_seconds=staging_timeout_seconds,
            progress=progress,
        )
        if recorded.package_ids
        else {}
    )
    inputs = _inputs(recorded, staged)
    with session_scope(engine) as session:
        sources = require_present_products(
            session,
            product_ids=[p.product_id for p in recorded.upstream],
            processing_location_id=recorded.processing_location_id,
        )
    upstream = [
        _copy_upstream(layout, product, Path(sources[int(product.product_id)])) for product in recorded.upstream
    ]

    manifest = contract.build_manifest(
        layout=layout,
        run_id=recorded.run_id,
        software=recorded.software,
        config=recorded.config,
        inputs=inputs,
        upstream_products=upstream,
    )
    contract.write_manifest(layout=layout, manifest=manifest)
    notes.extend(_manifest_differences(recorded, manifest))
    mounts = contract.build_mounts(
        layout=layout,
        input_packages=[(staged[p].package_name, staged[p].host_dir) for p in recorded.package_ids],
        upstream_products=upstream,
    )
    resources = JobResources(
        cpu=int(recorded.resources.get("cpu", 1)),
        memory_gb=float(recorded.resources.get("memory_gb", 2.0)),
        time_hours=float(recorded.resources.get("time_hours", 1.0)),
        gpus=int(recorded.resources.get("gpus", 0)),
    )
    command = runtime.command(
        ContainerInvocation(
            image=image,
            mounts=mounts,
            env=contract.build_environment(layout=layout),
            args=list(recorded.entrypoint),
            gpus=resources.gpus,
        )
    )
    spec = JobSpec(
        command=command,
        resources=resources,
        env={},
        job_name=f"ccat-reproduce-{recorded.attempt_id}",
        log_dir=layout.logs_dir,
    )
    job_id = backend.submit(spec)
    progress(f"submitted the re-execution of attempt {recorded.attempt_id} to {backend.name} as job {job_id}")
    deadline = time.monotonic() + (timeout_seconds or resources.time_limit_seconds + 600)
    info = backend.status(job_id)
    while not info.is_terminal:
        if time.monotonic() > deadline:
            backend.cancel(job_id)
            raise ReproduceError(f"the re-execution (job {job_id}) did not finish in time and was cancelled")
        time.sleep(poll_seconds)
        info = backend.status(job_id)

    report = ReproduceReport(
        product_id=product_id,
        attempt_id=recorded.attempt_id,
        step=recorded.step,
        sub_group_key=recorded.sub_group_key,
        software=f"{recorded.software.name}=={recorded.software.version}",
        image_digest=digest,
        backend=backend.name,
        job_id=job_id,
        exit_code=info.exit_code,
        workdir=str(workdir),
        notes=notes,
    )
    if info.exit_code != 0:
        tail = backend.logs(job_id, tail_lines=20).strip()
        report.notes.append(f"the re-execution failed (exit code {info.exit_code}): {tail[-1500:]}")
    report.outputs = compare_outputs(recorded=recorded.products, layout=layout)
    return report


def compare_outputs(*, recorded: dict[str, tuple[int, str]], layout: contract.AttemptLayout) -> list[OutputComparison]:
    """Every recorded product (relative path → (size, sha256)) against what the layout's products dir holds."""
    reproduced = (
        {p.relative_path: (p.size, p.sha256) for p in discover_products(layout=layout)}
        if layout.products_dir.is_dir()
        else {}
    )
    return compare_digests(recorded=recorded, reproduced=reproduced)


def compare_digests(
    *, recorded: dict[str, tuple[int, str]], reproduced: dict[str, tuple[int, str]]
) -> list[OutputComparison]:
    """Identical / different / missing / extra for two {relative path: (size, sha256)} maps, sorted by path."""
    result = []
    for path in sorted(set(recorded) | set(reproduced)):
        old, new = recorded.get(path), reproduced.get(path)
        if old is None:
            assert new is not None
            verdict = Verdict.EXTRA
        elif new is None:
            verdict = Verdict.MISSING
        else:
            verdict = Verdict.IDENTICAL if old[1] == new[1] else Verdict.DIFFERENT
        result.append(
            OutputComparison(
                relative_path=path,
                verdict=verdict,
                recorded_sha256=old[1] if old else None,
                reproduced_sha256=new[1] if new else None,
                recorded_size=old[0] if old else None,
                reproduced_size=new[0] if new else None,
            )
        )
    return result


def _scratch_dir(workdir: Path, pipeline_base_dir: Path) -> Path:
    """``workdir`` made absolute and created; refused when it overlaps PIPELINE_BASE_DIR or holds files."""
    workdir = Path(os.path.abspath(workdir))
    base = Path(os.path.abspath(pipeline_base_dir))
    if workdir == base or workdir.is_relative_to(base) or base.is_relative_to(workdir):
        raise ReproduceError(
            f"--workdir {workdir} overlaps PIPELINE_BASE_DIR {base}, where registered products live; give a "
            "scratch directory outside it"
        )
    if workdir.exists() and (not workdir.is_dir() or any(workdir.iterdir())):
        raise ReproduceError(f"--workdir {workdir} exists and is not an empty directory; give a new one")
    workdir.mkdir(parents=True, exist_ok=True)
    return workdir


def _read_attempt(session: Session, product_id: int) -> _Recorded:
    product = session.get(m.DataProduct, product_id)
    if product is None:
        raise ReproduceError(f"data product {product_id} does not exist in ops-db; list products with 'lineage'")
    attempt = session.scalars(
        select(m.ExecutedReductionStep)
        .where(m.ExecutedReductionStep.id == product.executed_reduction_step_id)
        .options(
            selectinload(m.ExecutedReductionStep.input_packages).selectinload(m.RawDataPackage.files),
            selectinload(m.ExecutedReductionStep.input_products),
            selectinload(m.ExecutedReductionStep.products),
        )
    ).one()
    step = attempt.step
    pipeline = step.pipeline
    is_final = not any(step in other.depends_on for other in pipeline.steps)
    version = attempt.software_version
    upstream_steps = [s.id for s in step.depends_on]
    upstream = [
        contract.UpstreamProduct(
            product_id=p.id,
            step=p.step.name,
            sub_group_key=p.sub_group_key,
            product_type=p.product_type.value,
            relative_path=p.relative_path,
            size=p.size_bytes,
            sha256=p.sha256,
        )
        # The planner's order (upstream step, sub-group, path): a program may read its inputs in manifest order.
        for p in sorted(
            attempt.input_products,
            key=lambda p: (
                upstream_steps.index(p.reduction_step_id)
                if p.reduction_step_id in upstream_steps
                else len(upstream_steps),
                p.sub_group_key,
                p.relative_path,
            ),
        )
    ]
    return _Recorded(
        attempt_id=attempt.id,
        pipeline=pipeline.name,
        processing_location_id=pipeline.processing_location_id,
        step=step.name,
        sub_group_key=attempt.sub_group_key,
        is_final=is_final,
        run_id=attempt.dagster_run_id or f"attempt-{attempt.id}",
        software=contract.SoftwareRef(
            name=version.software.name,
            version=version.version,
            image_ref=version.image_ref,
            image_digest=version.image_digest,
        ),
        entrypoint=list(version.entrypoint or []),
        config=dict(attempt.config.parameters or {}),
        resources=dict(step.resources or {}),
        recorded_image_digest=attempt.image_digest,
        package_ids=sorted(p.id for p in attempt.input_packages),
        files={p.id: {str(f.id): (f.size_bytes, f.checksum) for f in p.files} for p in attempt.input_packages},
        upstream=upstream,
        products={p.relative_path: (p.size_bytes, p.sha256) for p in attempt.products},
        input_fingerprint=attempt.input_fingerprint,
        attempt_dir=attempt.attempt_dir,
        current_fingerprint=input_fingerprint(
            packages=[] if step.depends_on else [(p.name, p.checksum) for p in attempt.input_packages],
            upstream_products=[
                (p.step.name, p.sub_group_key, p.relative_path, p.sha256) for p in attempt.input_products
            ],
            software_version=f"{version.software.name}=={version.version}",
            image_digest=version.image_digest,
            config_sha=attempt.config.parameters_sha256 or config_sha256(attempt.config.parameters),
        ),
    )


def _manifest_differences(recorded: _Recorded, manifest: dict[str, Any]) -> list[str]:
    """A note naming the manifest keys that differ from the attempt's own manifest, when that file is still there.

    Both list container paths only, so a faithful re-execution has an identical manifest.
    """
    if not recorded.attempt_dir:
        return ["the attempt recorded no directory; its manifest cannot be compared"]
    original_path = Path(recorded.attempt_dir) / "config" / contract.MANIFEST_NAME
    try:
        original = json.loads(original_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return [f"the attempt's manifest {original_path} is gone or unreadable; it cannot be compared"]
    rebuilt = json.loads(json.dumps(manifest))
    differing = sorted(k for k in set(original) | set(rebuilt) if original.get(k) != rebuilt.get(k))
    if not differing:
        return []
    return [f"the rebuilt manifest differs from the attempt's ({original_path}) in: {', '.join(differing)}"]


def _inputs(recorded: _Recorded, staged: dict[int, Any]) -> list[contract.InputFile]:
    """The manifest's input files from the staged copies, each checked against the checksum ops-db recorded."""
    inputs = []
    for package_id in recorded.package_ids:
        package = staged[package_id]
        expected = recorded.files[package_id]
        for raw_file_id, relative_path, size, sha256 in package.files:
            if expected.get(str(raw_file_id)) != (size, sha256):
                raise ReproduceError(
                    f"raw file {relative_path} of package {package.package_name} is now {size} bytes with sha256 "
                    f"{sha256}, not what attempt {recorded.attempt_id} read; the input changed since, so the "
                    "product cannot be reproduced as recorded"
                )
            inputs.append(
                contract.InputFile(
                    package_id=package_id,
                    package_name=package.package_name,
                    raw_file_id=str(raw_file_id),
                    relative_path=relative_path,
                    size=size,
                    sha256=sha256,
                )
            )
    return inputs


def _copy_upstream(
    layout: contract.AttemptLayout, product: contract.UpstreamProduct, source: Path
) -> contract.UpstreamProduct:
    """Copy a registered upstream product into the scratch workspace after checking its sha256."""
    target = contract.workspace_step_dir(
        base_dir=layout.base_dir, pipeline=layout.pipeline, sub_group_key=product.sub_group_key, step=product.step
    ) / contract.validate_relative_path(product.relative_path, f"path of upstream product {product.product_id}")
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with source.open("rb") as reader, target.open("wb") as writer:
        while chunk := reader.read(_CHUNK):
            digest.update(chunk)
            writer.write(chunk)
    if digest.hexdigest() != product.sha256:
        raise ReproduceError(
            f"upstream product {product.product_id} ({source}) has sha256 {digest.hexdigest()}, not the recorded "
            f"{product.sha256}; it changed on disk, so the product cannot be reproduced from it"
        )
    return contract.UpstreamProduct(
        product_id=product.product_id,
        step=product.step,
        sub_group_key=product.sub_group_key,
        product_type=product.product_type,
        relative_path=product.relative_path,
        size=product.size,
        sha256=product.sha256,
        host_path=target,
    )


__all__ = [
    "OutputComparison",
    "ReproduceError",
    "ReproduceReport",
    "Verdict",
    "compare_digests",
    "compare_outputs",
    "reproduce_product",
]


# ---------------------------------------------------------------------------------------------- command line


def register(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    command = commands.add_parser(
        "reproduce",
        help="re-execute the attempt that made a product and compare every output by sha256",
        description="Re-run the attempt that produced PRODUCT_ID from what ops-db recorded (inputs by checksum, "
        "image digest, config, manifest) in a scratch directory, then report each output as identical, "
        "different, missing or extra. Exit 0 only when every output is identical.",
    )
    command.add_argument("product_id", type=int, metavar="PRODUCT_ID", help="the DataProduct id")
    command.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="new or empty scratch directory outside PIPELINE_BASE_DIR (default: <data dir>/reproduce/…)",
    )
    command.add_argument(
        "--backend", choices=("local", "slurm"), default=None, help="where to run it (default: HPC_BACKEND)"
    )
    command.add_argument("--json", action="store_true", help="print the report as JSON")
    command.set_defaults(handler=_reproduce)


def _reproduce(args: argparse.Namespace, settings: Settings) -> int:
    from ccat_dagster.execution.runtimes import get_runtime
    from ccat_dagster.execution.staging import ExternalStager, LocalStager
    from ccat_dagster.opsdb.engine import make_engine

    workdir = (
        args.workdir or settings.data_dir / "reproduce" / f"product-{args.product_id}-{time.strftime('%Y%m%dT%H%M%S')}"
    )
    backend_name = args.backend or settings.hpc_backend
    backend: HpcBackend
    if backend_name == "local":
        from ccat_dagster.execution.hpc.local import LocalBackend

        backend = LocalBackend(state_dir=Path(os.path.abspath(workdir)).parent / f".{Path(workdir).name}-jobs")
    elif backend_name == "slurm":
        from ccat_dagster.execution.hpc.slurm import SlurmBackend

        backend = SlurmBackend(partition=settings.slurm_partition or None)
    else:
        raise ReproduceError(f"HPC_BACKEND={backend_name!r} cannot re-execute here; pass --backend local or slurm")
    engine = make_engine(settings.ops_db_url)
    try:
        report = reproduce_product(
            engine=engine,
            product_id=args.product_id,
            workdir=workdir,
            pipeline_base_dir=settings.pipeline_base_dir,
            sif_cache_dir=settings.sif_cache_dir,
            backend=backend,
            runtime=get_runtime(settings.container_runtime),
            stager=ExternalStager() if settings.stager == "external" else LocalStager(),
            staging_timeout_seconds=float(settings.staging_timeout_seconds),
            progress=lambda message: print(message, file=sys.stderr),
        )
    finally:
        engine.dispose()
    print(json.dumps(report.as_json(), indent=2) if args.json else report.as_text())
    return 0 if report.identical else 1
