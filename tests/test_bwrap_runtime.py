"""Real container runs with the bubblewrap runtime: the contract as a program inside experiences it.

Every run goes through the same functions production uses: attempt_layout → build_manifest / write_manifest
→ build_mounts → build_environment → resolve_image → BubblewrapRuntime.command → discover_products.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from ccat_dagster.execution.contract import (
    AttemptLayout,
    InputFile,
    SoftwareRef,
    UpstreamProduct,
    attempt_layout,
    build_environment,
    build_manifest,
    build_mounts,
    missing_mount_sources,
    write_manifest,
)
from ccat_dagster.execution.discovery import DiscoveredProduct, discover_products
from ccat_dagster.execution.hpc.base import JobResources, JobSpec
from ccat_dagster.execution.hpc.local import LocalBackend
from ccat_dagster.execution.images import ImageKind, resolve_image
from ccat_dagster.execution.runtimes import DEFAULT_PATH, BubblewrapRuntime, ContainerInvocation
from ccat_dagster.opsdb.enums import FailureKind

pytestmark = pytest.mark.bwrap

DEBIAN_PYTHON = Path("/usr/bin/python3")
# The environment of the bwrap process itself; nothing of it may reach the container.
HOST_ENV = {"PATH": "/usr/bin:/bin", "CCAT_HOST_SECRET": "must-not-leak", "HOME": "/root"}

PROBE = r'''
"""Test program for the container contract; runs inside the sandbox."""
import hashlib, json, os, sys

def sha256(path):
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()

mode = sys.argv[1]
if mode == "exit":
    sys.exit(int(sys.argv[2]))
if mode == "write":
    outcome = {}
    for path in sys.argv[2:]:
        try:
            with open(path, "a") as handle:
                handle.write("x")
            outcome[path] = "ok"
        except OSError as exc:
            outcome[path] = exc.strerror
    print(json.dumps(outcome))
    sys.exit(0)

manifest = json.load(open("/workflow/config/manifest.json"))
assert os.environ["WORKFLOW_MANIFEST"] == "/workflow/config/manifest.json"
out = os.environ["WORKFLOW_OUTPUT_DIR"]
assert out == manifest["paths"]["output_dir"], (out, manifest["paths"])
seen = []
for entry in manifest["inputs"] + manifest["upstream_products"]:
    actual = sha256(entry["path"])
    if actual != entry["sha256"] or os.path.getsize(entry["path"]) != entry["size"]:
        print(f"checksum mismatch for {entry['path']}", file=sys.stderr)
        sys.exit(2)
    seen.append(entry["path"])
if manifest["is_final_step"]:
    os.makedirs(os.path.join(out, "science"), exist_ok=True)
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    with open(os.path.join(out, "science", "combined.txt"), "w") as handle:
        handle.write("\n".join(sorted(seen)) + "\n")
    with open(os.path.join(out, "logs", "probe.log"), "w") as handle:
        handle.write(f"read {len(seen)} files\n")
else:
    by_package = {}
    for entry in manifest["inputs"]:
        by_package.setdefault(entry["package_name"], []).append(entry["sha256"])
    for package, hashes in by_package.items():
        with open(os.path.join(out, f"{package}.sum"), "w") as handle:
            handle.write(",".join(sorted(hashes)))
print(json.dumps({"read": seen, "cwd": os.getcwd()}))
'''


def _bwrap_problem() -> str | None:
    if not DEBIAN_PYTHON.exists():
        return f"{DEBIAN_PYTHON} (Debian's python3) is missing; apt-get install python3"
    return BubblewrapRuntime().check()


@pytest.fixture(scope="module")
def runtime() -> BubblewrapRuntime:
    problem = _bwrap_problem()
    if problem is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must provide bubblewrap: {problem}")
        pytest.skip(f"bubblewrap is not usable here: {problem}")
    return BubblewrapRuntime()


@dataclass
class World:
    root: Path
    software: Path
    staged: Path
    base: Path


@pytest.fixture
def world(tmp_path: Path) -> World:
    software = tmp_path / "software" / "probe"
    (software / "bin").mkdir(parents=True)
    (software / "bin" / "probe.py").write_text(PROBE)
    staged = tmp_path / "staged"
    for package, files in {
        "scan_a": {"scan.json": b'{"id": "a"}', "data/sky.f32": b"\x01" * 64},
        "scan_b": {"scan.json": b'{"id": "b"}', "data/sky.f32": b"\x02" * 64},
        "scan_c": {"scan.json": b'{"id": "c"}'},
    }.items():
        for relative, data in files.items():
            path = staged / package / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    return World(root=tmp_path, software=software, staged=staged, base=tmp_path / "pipelines")


@dataclass
class Attempt:
    layout: AttemptLayout
    invocation: ContainerInvocation
    result: subprocess.CompletedProcess[str]


def run_attempt(runtime: BubblewrapRuntime, world: World, **kwargs) -> Attempt:
    layout, invocation = prepare_attempt(world, **kwargs)
    result = subprocess.run(
        runtime.command(invocation), env=HOST_ENV, capture_output=True, text=True, check=False, timeout=120
    )
    return Attempt(layout=layout, invocation=invocation, result=result)


def prepare_attempt(
    world: World,
    *,
    step: str,
    sub_group_key: str,
    is_final: bool,
    packages: tuple[str, ...] = (),
    upstream: tuple[DiscoveredProduct | UpstreamProduct, ...] = (),
    args: tuple[str, ...] = ("step",),
    program: tuple[str, ...] = (str(DEBIAN_PYTHON), "/opt/software/bin/probe.py"),
    attempt_id: int = 1,
) -> tuple[AttemptLayout, ContainerInvocation]:
    layout = attempt_layout(
        base_dir=world.base,
        pipeline="probe-pipeline",
        sub_group_key=sub_group_key,
        step=step,
        attempt_id=attempt_id,
        is_final=is_final,
    )
    layout.create()
    inputs = [
        InputFile(
            package_name=package,
            package_id=index,
            raw_file_id=f"{package}/{path.relative_to(world.staged / package).as_posix()}",
            relative_path=path.relative_to(world.staged / package).as_posix(),
            size=path.stat().st_size,
            sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
        )
        for index, package in enumerate(packages, start=1)
        for path in sorted(p for p in (world.staged / package).rglob("*") if p.is_file())
    ]
    upstream_products = [item for item in upstream if isinstance(item, UpstreamProduct)]
    manifest = build_manifest(
        layout=layout,
        run_id=100 + attempt_id,
        software=SoftwareRef(name="probe", version="0.1", image_ref=str(world.software)),
        config={"purpose": "test"},
        inputs=inputs,
        upstream_products=upstream_products,
    )
    write_manifest(layout=layout, manifest=manifest)
    mounts = build_mounts(
        layout=layout,
        input_packages=[(package, world.staged / package) for package in packages],
        upstream_products=upstream_products,
    )
    assert missing_mount_sources(mounts=mounts) == []
    image = resolve_image(
        image_ref=str(world.software),
        image_digest=None,
        sif_cache_dir=world.root / "sif",
        runtime_name="bubblewrap",
    )
    assert image.kind is ImageKind.SOFTWARE_DIR
    invocation = ContainerInvocation(
        image=image, mounts=mounts, env=build_environment(layout=layout), args=[*program, *args]
    )
    return layout, invocation


def _ok(attempt: Attempt) -> dict:
    result = attempt.result
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return json.loads(result.stdout.strip().splitlines()[-1])


def _as_upstream(product: DiscoveredProduct, *, step: str, sub_group_key: str, product_id: int) -> UpstreamProduct:
    return UpstreamProduct(
        product_id=product_id,
        step=step,
        sub_group_key=sub_group_key,
        product_type=product.product_type,
        relative_path=product.relative_path,
        size=product.size,
        sha256=product.sha256,
        host_path=product.host_path,
    )


def test_intermediate_step_reads_the_manifest_and_writes_to_workflow_output_dir(
    runtime: BubblewrapRuntime, world: World
) -> None:
    attempt = run_attempt(
        runtime, world, step="calibrate", sub_group_key="eou=1", is_final=False, packages=("scan_a", "scan_b")
    )
    report = _ok(attempt)
    assert report["cwd"] == "/workflow"
    assert sorted(report["read"]) == [
        "/workflow/input/scan_a/data/sky.f32",
        "/workflow/input/scan_a/scan.json",
        "/workflow/input/scan_b/data/sky.f32",
        "/workflow/input/scan_b/scan.json",
    ]
    products = discover_products(layout=attempt.layout)
    assert [(p.relative_path, p.product_type) for p in products] == [
        ("scan_a.sum", "intermediate"),
        ("scan_b.sum", "intermediate"),
    ]
    assert products[0].host_path == attempt.layout.step_workspace_dir / "scan_a.sum"


def test_fan_in_final_step_reads_upstream_products_of_three_sub_groups(
    runtime: BubblewrapRuntime, world: World
) -> None:
    upstream: list[UpstreamProduct] = []
    for index, package in enumerate(("scan_a", "scan_b", "scan_c")):
        key = f"eou={package}"
        attempt = run_attempt(runtime, world, step="calibrate", sub_group_key=key, is_final=False, packages=(package,))
        _ok(attempt)
        for product in discover_products(layout=attempt.layout):
            upstream.append(_as_upstream(product, step="calibrate", sub_group_key=key, product_id=index + 1))

    final = run_attempt(runtime, world, step="combine", sub_group_key="all", is_final=True, upstream=tuple(upstream))
    report = _ok(final)
    assert sorted(report["read"]) == [
        "/workflow/workspace/calibrate/eou=scan_a/scan_a.sum",
        "/workflow/workspace/calibrate/eou=scan_b/scan_b.sum",
        "/workflow/workspace/calibrate/eou=scan_c/scan_c.sum",
    ]
    products = discover_products(layout=final.layout)
    assert [(p.relative_path, p.product_type) for p in products] == [
        ("logs/probe.log", "log"),
        ("science/combined.txt", "science"),
    ]
    assert (final.layout.output_dir / "logs" / "probe.log").read_text() == "read 3 files\n"


def test_writes_outside_the_read_write_mounts_fail_as_read_only(runtime: BubblewrapRuntime, world: World) -> None:
    first = run_attempt(runtime, world, step="calibrate", sub_group_key="eou=1", is_final=False, packages=("scan_a",))
    _ok(first)
    upstream = tuple(
        _as_upstream(p, step="calibrate", sub_group_key="eou=1", product_id=1)
        for p in discover_products(layout=first.layout)
    )
    targets = {
        "/workflow/input/scan_a/scan.json": "Read-only file system",
        "/workflow/input/scan_a/new.dat": "Read-only file system",
        "/workflow/input/new.dat": "Read-only file system",
        "/workflow/config/manifest.json": "Read-only file system",
        "/workflow/workspace/calibrate/scan_a.sum": "Read-only file system",
        "/workflow/stray.dat": "Read-only file system",
        "/opt/software/bin/probe.py": "Read-only file system",
        "/usr/new.dat": "Read-only file system",
        "/workflow/workspace/baseline/ok.dat": "ok",
        "/workflow/logs/ok.log": "ok",
        "/tmp/ok.dat": "ok",
    }
    second = run_attempt(
        runtime,
        world,
        step="baseline",
        sub_group_key="eou=1",
        is_final=False,
        packages=("scan_a",),
        upstream=upstream,
        args=("write", *targets),
    )
    assert _ok(second) == targets
    assert (first.layout.step_workspace_dir / "scan_a.sum").read_text() == ",".join(
        sorted(hashlib.sha256(data).hexdigest() for data in (b"\x01" * 64, b'{"id": "a"}'))
    ), "the upstream product must be unchanged"
    assert not (world.staged / "scan_a" / "new.dat").exists()
    assert (second.layout.logs_dir / "ok.log").read_text() == "x"


def test_the_environment_inside_holds_only_what_was_passed(runtime: BubblewrapRuntime, world: World) -> None:
    attempt = run_attempt(
        runtime,
        world,
        step="calibrate",
        sub_group_key="eou=1",
        is_final=False,
        packages=("scan_a",),
        program=("/usr/bin/env", "-0"),
        args=(),
    )
    assert attempt.result.returncode == 0, attempt.result.stderr
    inside = dict(item.split("=", 1) for item in attempt.result.stdout.split("\0") if item)
    # PATH is the runtime's documented default (like apptainer's); PWD is set by bubblewrap to the workdir.
    assert inside == {**attempt.invocation.env, "PATH": DEFAULT_PATH, "PWD": "/workflow"}
    assert "CCAT_HOST_SECRET" not in inside


def test_the_exit_code_of_the_program_is_the_exit_code_of_the_run(runtime: BubblewrapRuntime, world: World) -> None:
    attempt = run_attempt(
        runtime,
        world,
        step="calibrate",
        sub_group_key="eou=1",
        is_final=False,
        packages=("scan_a",),
        args=("exit", "3"),
    )
    assert attempt.result.returncode == 3


# --- signals reach the payload inside the sandbox ------------------------------------------------------------

# Traps TERM, writes a file in its output directory and exits 143; without the TERM it would run forever.
SAVES_ON_TERM = (
    "/usr/bin/bash",
    "-c",
    'trap "echo saved > $WORKFLOW_OUTPUT_DIR/saved.txt; exit 143" TERM; while true; do sleep 0.1; done',
)


def test_a_term_to_the_runtime_command_reaches_the_payload(runtime: BubblewrapRuntime, world: World) -> None:
    layout, invocation = prepare_attempt(
        world, step="calibrate", sub_group_key="eou=term", is_final=False, program=SAVES_ON_TERM, args=()
    )
    process = subprocess.Popen(runtime.command(invocation), env=HOST_ENV, stderr=subprocess.PIPE, text=True)
    try:
        # The payload runs once bwrap's init has started it (grandchild of bwrap, great-grandchild of ours).
        deadline = time.monotonic() + 30
        while not _descendants(process.pid, depth=3):
            assert time.monotonic() < deadline, "the payload never started"
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 143, stderr
    assert (layout.step_workspace_dir / "saved.txt").read_text() == "saved\n"
    assert stderr == ""  # the forwarder adds nothing to the job's stderr


def test_the_local_backends_pre_walltime_signal_reaches_a_payload_in_bwrap(
    runtime: BubblewrapRuntime, world: World, tmp_path: Path
) -> None:
    layout, invocation = prepare_attempt(
        world, step="calibrate", sub_group_key="eou=walltime", is_final=False, program=SAVES_ON_TERM, args=()
    )
    backend = LocalBackend(tmp_path / "state", kill_grace_seconds=5.0)
    job_id = backend.submit(
        JobSpec(
            command=runtime.command(invocation),
            # A 6 s limit with the SIGTERM 3 s before it.
            resources=JobResources(time_hours=6 / 3600),
            env={"PATH": "/usr/bin:/bin"},
            job_name="walltime-in-bwrap",
            log_dir=tmp_path / "logs",
            pre_walltime_signal_seconds=3,
        )
    )
    deadline = time.monotonic() + 60
    while not (info := backend.status(job_id)).is_terminal:
        assert time.monotonic() < deadline, info
        time.sleep(0.1)
    assert (layout.step_workspace_dir / "saved.txt").read_text() == "saved\n", backend.logs(job_id)
    assert info.failure_kind is FailureKind.WALLTIME, info
    assert info.exit_code == 143
    assert "pre-walltime signal" in info.reason


def _descendants(pid: int, *, depth: int) -> list[int]:
    level = [pid]
    for _ in range(depth):
        children: list[int] = []
        for parent in level:
            try:
                children += [int(c) for c in Path(f"/proc/{parent}/task/{parent}/children").read_text().split()]
            except OSError:
                pass
        level = children
    return level
