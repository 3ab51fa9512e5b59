"""The container contract: names, host layout, mounts, environment and manifest (docs/container-contract.md)."""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import re
import stat
import sys
import uuid
from pathlib import Path

import jsonschema
import pytest

from ccat_dagster.execution import contract
from ccat_dagster.execution.contract import (
    ContainerContractError,
    InputFile,
    SoftwareRef,
    StaleOutputError,
    UpstreamProduct,
    attempt_layout,
    build_environment,
    build_manifest,
    build_mounts,
    describe_exit_code,
    validate_manifest,
    validate_path_component,
    write_manifest,
)
from ccat_dagster.opsdb.enums import DataProductType

REPO = Path(__file__).resolve().parents[1]
SHA_A = "a" * 64
SHA_B = "b" * 64
SOFTWARE = SoftwareRef(name="chai", version="1.0.0", image_ref="docker://ghcr.io/ccat/chai:1.0.0", image_digest=SHA_A)


def _layout(base: Path, **overrides: object) -> contract.AttemptLayout:
    fields: dict = {
        "base_dir": base,
        "pipeline": "chai-ngc253",
        "sub_group_key": "eou=scan-1",
        "step": "calibrate",
        "attempt_id": 5,
        "is_final": False,
    }
    fields.update(overrides)
    return attempt_layout(**fields)


def _input(package: str, name: str, **overrides: object) -> InputFile:
    fields: dict = {
        "package_name": package,
        "package_id": 11,
        "raw_file_id": uuid.UUID(int=7),
        "relative_path": name,
        "size": 3,
        "sha256": SHA_A,
    }
    fields.update(overrides)
    return InputFile(**fields)


def _upstream(step: str, key: str, name: str, product_id: int = 1, **overrides: object) -> UpstreamProduct:
    fields: dict = {
        "product_id": product_id,
        "step": step,
        "sub_group_key": key,
        "product_type": "intermediate",
        "relative_path": name,
        "size": 4,
        "sha256": SHA_B,
    }
    fields.update(overrides)
    return UpstreamProduct(**fields)


# ---------------------------------------------------------------------------------------------------------
# Names


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("", "non-empty"),
        (".", "other than '.'"),
        ("..", "other than '.'"),
        ("a/b", "contains '/'"),
        ("a\0b", "control characters"),
        ("a\nb", "control characters"),
        ("tab\there", "control characters"),
        ("del\x7f", "control characters"),
        ("x" * 256, "longer than 255 bytes"),
        ("é" * 128, "longer than 255 bytes"),
        (5, "must be a string"),
    ],
)
def test_validate_path_component_refuses(value: object, fragment: str) -> None:
    with pytest.raises(ContainerContractError, match=re.escape(fragment)) as caught:
        validate_path_component(value, "step name")  # type: ignore[arg-type]
    assert "step name" in str(caught.value)


@pytest.mark.parametrize("value", ["calibrate", "source=ngc253+line=co43", "all", "..hidden", "é" * 127, "a b"])
def test_validate_path_component_accepts(value: str) -> None:
    assert validate_path_component(value, "sub_group_key") == value


# ---------------------------------------------------------------------------------------------------------
# Host layout


def test_attempt_layout_paths(tmp_path: Path) -> None:
    layout = _layout(tmp_path)
    sub_group = tmp_path / "chai-ngc253" / "eou=scan-1"
    assert layout.attempt_id == "5"
    assert layout.step_workspace_dir == sub_group / "workspace" / "calibrate"
    assert layout.output_dir == sub_group / "output"
    assert layout.config_dir == sub_group / "attempts" / "calibrate" / "5" / "config"
    assert layout.logs_dir == sub_group / "attempts" / "calibrate" / "5" / "logs"
    assert layout.manifest_path == layout.config_dir / "manifest.json"
    assert layout.products_dir == layout.step_workspace_dir
    assert layout.container_output_dir == "/workflow/workspace/calibrate/"
    final = _layout(tmp_path, step="grid", is_final=True)
    assert final.products_dir == sub_group / "output"
    assert final.container_output_dir == "/workflow/output/"


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"base_dir": "relative/base"}, "must be an absolute path"),
        ({"pipeline": "a/b"}, "pipeline name"),
        ({"sub_group_key": ".."}, "sub_group_key"),
        ({"step": ""}, "step name"),
        ({"attempt_id": "1\n"}, "attempt id"),
        ({"attempt_id": True}, "attempt id"),
    ],
)
def test_attempt_layout_refuses_bad_values(tmp_path: Path, overrides: dict, fragment: str) -> None:
    with pytest.raises(ContainerContractError, match=fragment):
        _layout(tmp_path, **overrides)


def test_a_retry_gets_its_own_config_and_logs(tmp_path: Path) -> None:
    first = _layout(tmp_path, attempt_id=1)
    assert first.create() is None
    for path in (first.config_dir, first.logs_dir, first.step_workspace_dir):
        assert path.is_dir()
    assert not first.output_dir.exists()
    write_manifest(
        layout=first, manifest=build_manifest(layout=first, run_id=1, software=SOFTWARE, config={}, inputs=[])
    )
    (first.logs_dir / "stdout.log").write_text("first attempt\n")

    with pytest.raises(ContainerContractError, match="already exists.*new attempt id"):
        _layout(tmp_path, attempt_id=1).create()

    second = _layout(tmp_path, attempt_id=2)
    second.create()
    assert second.config_dir != first.config_dir
    assert (first.logs_dir / "stdout.log").read_text() == "first attempt\n"
    assert json.loads(first.manifest_path.read_text())["attempt_id"] == "1"


def test_create_refuses_leftover_output_unless_set_aside(tmp_path: Path) -> None:
    first = _layout(tmp_path, attempt_id=1)
    first.create()
    (first.products_dir / "sub").mkdir()
    (first.products_dir / "sub" / "partial.f32").write_bytes(b"xx")

    second = _layout(tmp_path, attempt_id=2)
    with pytest.raises(StaleOutputError, match="sub/partial.f32"):
        second.create()
    assert not second.attempt_dir.exists(), "a refused attempt must leave no directory behind"

    moved = second.create(set_aside_previous_output=True)
    assert moved == second.attempt_dir / "previous-output"
    assert (moved / "sub" / "partial.f32").read_bytes() == b"xx"
    assert second.products_dir.is_dir() and not any(second.products_dir.iterdir())


def test_leftover_output_on_a_file_system_of_its_own_is_set_aside_entry_by_entry(tmp_path: Path, monkeypatch) -> None:
    """An output directory that is a mount point cannot be renamed (EBUSY / EXDEV): its entries move instead."""
    first = _layout(tmp_path, attempt_id=1)
    first.create()
    (first.products_dir / "sub").mkdir()
    (first.products_dir / "sub" / "partial.f32").write_bytes(b"xx")
    (first.products_dir / "bulk.bin").write_bytes(b"yy")
    mount_point = first.products_dir
    rename = os.rename

    def rename_except_mount_point(source, target):  # type: ignore[no-untyped-def]
        if Path(source) == mount_point:
            raise OSError(errno.EBUSY, "Device or resource busy", str(source))
        return rename(source, target)

    monkeypatch.setattr(os, "rename", rename_except_mount_point)
    second = _layout(tmp_path, attempt_id=2)
    moved = second.create(set_aside_previous_output=True)
    assert moved == second.attempt_dir / "previous-output"
    assert (moved / "sub" / "partial.f32").read_bytes() == b"xx" and (moved / "bulk.bin").read_bytes() == b"yy"
    assert second.products_dir == mount_point and not any(mount_point.iterdir())


def test_empty_directories_are_not_leftovers(tmp_path: Path) -> None:
    first = _layout(tmp_path, attempt_id=1, is_final=True, step="grid")
    first.create()
    (first.output_dir / "science").mkdir()
    assert _layout(tmp_path, attempt_id=2, is_final=True, step="grid").create() is None


# ---------------------------------------------------------------------------------------------------------
# Mounts and environment


def test_mounts_of_an_intermediate_step(tmp_path: Path) -> None:
    layout = _layout(tmp_path)
    mounts = build_mounts(layout=layout, input_packages=[("pkg_b", Path("/s/b")), ("pkg_a", Path("/s/a"))])
    assert [(m.host, m.container, m.read_only) for m in mounts] == [
        (Path("/s/b"), "/workflow/input/pkg_b", True),
        (Path("/s/a"), "/workflow/input/pkg_a", True),
        (layout.step_workspace_dir, "/workflow/workspace/calibrate", False),
        (layout.config_dir, "/workflow/config", True),
        (layout.logs_dir, "/workflow/logs", False),
    ]


def test_mounts_of_a_fan_in_final_step(tmp_path: Path) -> None:
    layout = _layout(tmp_path, sub_group_key="all", step="grid", is_final=True)
    upstream = [_upstream("baseline", "eou=2", "x", 1), _upstream("baseline", "eou=1", "x", 2)]
    upstream.append(_upstream("calibrate", "all", "cal.json", 3))
    mounts = build_mounts(layout=layout, input_packages=[], upstream_products=upstream)
    base = tmp_path / "chai-ngc253"
    assert [(m.host, m.container, m.read_only) for m in mounts] == [
        (base / "eou=1" / "workspace" / "baseline", "/workflow/workspace/baseline/eou=1", True),
        (base / "eou=2" / "workspace" / "baseline", "/workflow/workspace/baseline/eou=2", True),
        (base / "all" / "workspace" / "calibrate", "/workflow/workspace/calibrate", True),
        (layout.step_workspace_dir, "/workflow/workspace/grid", False),
        (layout.output_dir, "/workflow/output", False),
        (layout.config_dir, "/workflow/config", True),
        (layout.logs_dir, "/workflow/logs", False),
    ]


def test_one_upstream_sub_group_with_another_key_uses_the_fan_in_path(tmp_path: Path) -> None:
    layout = _layout(tmp_path, sub_group_key="all", step="grid", is_final=True)
    dirs = contract.upstream_container_dirs(layout=layout, upstream_products=[_upstream("baseline", "eou=1", "x")])
    assert dirs == {("baseline", "eou=1"): "/workflow/workspace/baseline/eou=1"}


@pytest.mark.parametrize(
    ("packages", "upstream", "fragment"),
    [
        ([("p", Path("/a")), ("p", Path("/b"))], [], "listed twice"),
        ([("../p", Path("/a"))], [], "input package name"),
        ([("p", Path("relative"))], [], "absolute"),
        ([], [_upstream("calibrate", "eou=scan-1", "x")], "products of itself"),
    ],
)
def test_build_mounts_refuses(tmp_path: Path, packages: list, upstream: list, fragment: str) -> None:
    with pytest.raises(ContainerContractError, match=fragment):
        build_mounts(layout=_layout(tmp_path), input_packages=packages, upstream_products=upstream)


def test_upstream_host_path_must_be_what_the_mount_shows(tmp_path: Path) -> None:
    layout = _layout(tmp_path, step="baseline")
    right = tmp_path / "chai-ngc253" / "eou=scan-1" / "workspace" / "calibrate" / "sub" / "a.cal"
    build_mounts(
        layout=layout,
        input_packages=[],
        upstream_products=[_upstream("calibrate", "eou=scan-1", "sub/a.cal", host_path=right)],
    )
    wrong = tmp_path / "elsewhere" / "a.cal"
    with pytest.raises(ContainerContractError, match=r"upstream product 1 is at .*elsewhere.*must be .*sub/a.cal"):
        build_mounts(
            layout=layout,
            input_packages=[],
            upstream_products=[_upstream("calibrate", "eou=scan-1", "sub/a.cal", host_path=wrong)],
        )


def test_missing_mount_sources_are_listed(tmp_path: Path) -> None:
    layout = _layout(tmp_path)
    layout.create()
    mounts = build_mounts(layout=layout, input_packages=[("p", tmp_path / "not-staged")])
    assert contract.missing_mount_sources(mounts=mounts) == [tmp_path / "not-staged"]


def test_environment(tmp_path: Path) -> None:
    env = build_environment(layout=_layout(tmp_path), extra={"OMP_NUM_THREADS": "2"})
    assert env == {
        "WORKFLOW_OUTPUT_DIR": "/workflow/workspace/calibrate/",
        "WORKFLOW_INPUT_DIR": "/workflow/input",
        "WORKFLOW_WORKSPACE_DIR": "/workflow/workspace",
        "WORKFLOW_CONFIG_DIR": "/workflow/config",
        "WORKFLOW_LOGS_DIR": "/workflow/logs",
        "WORKFLOW_MANIFEST": "/workflow/config/manifest.json",
        "OMP_NUM_THREADS": "2",
    }
    assert build_environment(layout=_layout(tmp_path, is_final=True))["WORKFLOW_OUTPUT_DIR"] == "/workflow/output/"
    with pytest.raises(ContainerContractError, match="cannot be overridden"):
        build_environment(layout=_layout(tmp_path), extra={"WORKFLOW_OUTPUT_DIR": "/tmp"})
    with pytest.raises(ContainerContractError, match="invalid"):
        build_environment(layout=_layout(tmp_path), extra={"BAD-NAME": "x"})


def test_environment_gives_the_payload_its_time_limit(tmp_path: Path) -> None:
    env = build_environment(layout=_layout(tmp_path), time_limit_seconds=3600)
    assert env["WORKFLOW_TIME_LIMIT_SECONDS"] == "3600"
    assert "WORKFLOW_TIME_LIMIT_SECONDS" not in build_environment(layout=_layout(tmp_path))
    with pytest.raises(ContainerContractError, match="cannot be overridden"):
        build_environment(layout=_layout(tmp_path), extra={"WORKFLOW_TIME_LIMIT_SECONDS": "99999"})
    for bad in (0, -5, 1.5, True):
        with pytest.raises(ContainerContractError, match=f"time limit {bad!r} is invalid"):
            build_environment(layout=_layout(tmp_path), time_limit_seconds=bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------
# Manifest


def _fan_in_manifest(tmp_path: Path) -> dict:
    layout = _layout(tmp_path, sub_group_key="all", step="grid", attempt_id="a-1", is_final=True)
    return build_manifest(
        layout=layout,
        run_id=42,
        software=SOFTWARE,
        config={"pixel_arcsec": 10, "weights": [1, 2.5], "mode": None},
        inputs=[_input("chai_scan_1", "scan.json"), _input("chai_scan_1", "data/sky.f32", raw_file_id=99)],
        upstream_products=[
            _upstream("baseline", "eou=2", "eou=2.base.f32", 7),
            _upstream("baseline", "eou=1", "eou=1.base.f32", 8, sha256="sha256:" + "C" * 64),
        ],
    )


def test_manifest_content(tmp_path: Path) -> None:
    manifest = _fan_in_manifest(tmp_path)
    assert manifest == {
        "manifest_version": 1,
        "run_id": 42,
        "attempt_id": "a-1",
        "pipeline": "chai-ngc253",
        "step": "grid",
        "sub_group_key": "all",
        "is_final_step": True,
        "software": {
            "name": "chai",
            "version": "1.0.0",
            "image_ref": "docker://ghcr.io/ccat/chai:1.0.0",
            "image_digest": "sha256:" + SHA_A,
        },
        "config": {"pixel_arcsec": 10, "weights": [1, 2.5], "mode": None},
        "inputs": [
            {
                "path": "/workflow/input/chai_scan_1/scan.json",
                "size": 3,
                "sha256": SHA_A,
                "package_id": 11,
                "package_name": "chai_scan_1",
                "raw_file_id": "00000000-0000-0000-0000-000000000007",
            },
            {
                "path": "/workflow/input/chai_scan_1/data/sky.f32",
                "size": 3,
                "sha256": SHA_A,
                "package_id": 11,
                "package_name": "chai_scan_1",
                "raw_file_id": 99,
            },
        ],
        "upstream_products": [
            {
                "path": "/workflow/workspace/baseline/eou=2/eou=2.base.f32",
                "product_type": "intermediate",
                "sha256": SHA_B,
                "size": 4,
                "product_id": 7,
                "step": "baseline",
                "sub_group_key": "eou=2",
            },
            {
                "path": "/workflow/workspace/baseline/eou=1/eou=1.base.f32",
                "product_type": "intermediate",
                "sha256": "c" * 64,
                "size": 4,
                "product_id": 8,
                "step": "baseline",
                "sub_group_key": "eou=1",
            },
        ],
        "paths": {
            "input": "/workflow/input",
            "workspace": "/workflow/workspace",
            "output_dir": "/workflow/output/",
            "config": "/workflow/config",
            "logs": "/workflow/logs",
            "manifest": "/workflow/config/manifest.json",
        },
    }


def test_manifest_paths_agree_with_the_mounts(tmp_path: Path) -> None:
    layout = _layout(tmp_path, sub_group_key="all", step="grid", is_final=True)
    upstream = [_upstream("baseline", "eou=1", "x.f32", 1), _upstream("baseline", "eou=2", "x.f32", 2)]
    inputs = [_input("pkg", "a/b.dat")]
    manifest = build_manifest(
        layout=layout, run_id=1, software=SOFTWARE, config={}, inputs=inputs, upstream_products=upstream
    )
    mounts = build_mounts(layout=layout, input_packages=[("pkg", tmp_path / "staged")], upstream_products=upstream)
    for entry in manifest["inputs"] + manifest["upstream_products"]:
        covering = [m for m in mounts if entry["path"].startswith(m.container + "/")]
        assert len(covering) == 1 and covering[0].read_only, entry["path"]


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"config": {"bad": float("nan")}}, "not plain JSON"),
        ({"config": {"bad": object()}}, "not plain JSON"),
        ({"inputs": [_input("p", "/etc/passwd")]}, "is absolute"),
        ({"inputs": [_input("p", "../x")]}, "component"),
        ({"inputs": [_input("p", "x", sha256="abc")]}, "not a sha256"),
        ({"inputs": [_input("p", "x", size=-1)]}, "byte count"),
        ({"inputs": [_input("p", "x", package_id=True)]}, "package id"),
        ({"inputs": [_input("p", "x"), _input("p", "x")]}, "twice"),
        ({"upstream_products": [_upstream("b", "eou=scan-1", "x", product_type="image")]}, "product_type"),
        ({"run_id": ""}, "run id"),
        ({"software": SoftwareRef(name="", version="1", image_ref="x")}, "software/name"),
        (
            {"software": SoftwareRef(name="n", version="1", image_ref="x", image_digest="md5:1")},
            "image_digest",
        ),
    ],
)
def test_build_manifest_refuses(tmp_path: Path, change: dict, fragment: str) -> None:
    arguments = {
        "layout": _layout(tmp_path),
        "run_id": 1,
        "software": SOFTWARE,
        "config": {},
        "inputs": [],
        **change,
    }
    with pytest.raises(ContainerContractError, match=fragment):
        build_manifest(**arguments)


def test_validate_manifest_names_the_bad_entry(tmp_path: Path) -> None:
    manifest = _fan_in_manifest(tmp_path)
    manifest["inputs"][1]["path"] = "/etc/passwd"
    with pytest.raises(ContainerContractError, match="inputs/1/path"):
        validate_manifest(manifest)
    del manifest["inputs"]
    with pytest.raises(ContainerContractError, match="'inputs' is a required property"):
        validate_manifest(manifest)


def test_write_manifest_is_read_only_and_written_once(tmp_path: Path) -> None:
    layout = _layout(tmp_path)
    layout.create()
    manifest = build_manifest(layout=layout, run_id=3, software=SOFTWARE, config={"a": 1}, inputs=[_input("p", "f")])
    path = write_manifest(layout=layout, manifest=manifest)
    assert path == layout.manifest_path
    assert json.loads(path.read_text()) == manifest
    assert stat.S_IMODE(path.stat().st_mode) == 0o444
    assert [p.name for p in layout.config_dir.iterdir()] == ["manifest.json"], "no temporary file may remain"
    with pytest.raises(ContainerContractError, match="written once"):
        write_manifest(layout=layout, manifest=manifest)
    assert json.loads(path.read_text()) == manifest


def test_schema_is_valid_and_documented() -> None:
    schema = contract.manifest_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["properties"]["manifest_version"]["const"] == contract.MANIFEST_VERSION
    doc = (REPO / "docs" / "container-contract.md").read_text(encoding="utf-8")
    assert "ccat_dagster/execution/manifest.schema.json" in doc


def test_the_documented_example_manifest_is_valid() -> None:
    doc = (REPO / "docs" / "container-contract.md").read_text(encoding="utf-8")
    examples = re.findall(r"```json\n(.*?)```", doc, flags=re.DOTALL)
    manifests = [json.loads(text) for text in examples if '"manifest_version"' in text]
    assert manifests, "docs/container-contract.md must show an example manifest"
    for manifest in manifests:
        validate_manifest(manifest)


def test_product_types_are_ops_db_product_types() -> None:
    assert contract.PRODUCT_TYPES == {member.value for member in DataProductType}
    schema_types = contract.manifest_schema()["properties"]["upstream_products"]["items"]["properties"]
    assert set(schema_types["product_type"]["enum"]) == contract.PRODUCT_TYPES


def test_the_example_software_reads_the_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CHAI example programs are the reference consumer of the manifest."""
    source = REPO / "examples" / "software" / "chai" / "bin" / "chai_contract.py"
    spec = importlib.util.spec_from_file_location("chai_contract_under_test", source)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the module executes.
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(_fan_in_manifest(tmp_path)))
    loaded = module.load_manifest(path=path)
    assert loaded.step == "grid" and loaded.is_final_step
    assert [str(i.path) for i in loaded.inputs][0] == "/workflow/input/chai_scan_1/scan.json"
    assert loaded.upstream_products[0].sub_group_key == "eou=2"
    assert loaded.paths["output_dir"] == "/workflow/output/"


# ---------------------------------------------------------------------------------------------------------
# Exit codes and small helpers


@pytest.mark.parametrize(
    ("code", "fragment"),
    [
        (0, "success"),
        (137, "out of memory"),
        (-9, "out of memory"),
        (143, "SIGTERM"),
        (-15, "SIGTERM"),
        (2, "the software reported failure"),
    ],
)
def test_describe_exit_code(code: int, fragment: str) -> None:
    assert fragment in describe_exit_code(code)


def test_short_hash_is_stable_and_short() -> None:
    assert contract.short_hash("source=ngc253+line=co43") == contract.short_hash("source=ngc253+line=co43")
    assert len(contract.short_hash("x")) == 8
    assert contract.short_hash("a") != contract.short_hash("b")


@pytest.mark.parametrize(
    "target", ["/workflow/..", "/workflow/a/../b", "//workflow", "/workflow/", "workflow", "/w/./a"]
)
def test_mount_targets_must_be_canonical(target: str) -> None:
    with pytest.raises(ContainerContractError, match="normalised container path"):
        contract.Mount(Path("/data"), target, read_only=True)


def test_mount_sources_must_be_absolute() -> None:
    with pytest.raises(ContainerContractError, match="absolute"):
        contract.Mount(Path("data"), "/workflow/input/x", read_only=True)
