"""The container contract (docs/container-contract.md): container paths, an attempt's host layout, bind mounts,
the manifest.

Everything here is plain data and file-system work; nothing knows Dagster or the ops-db. The callers map
ops-db rows onto the small frozen dataclasses below (``InputFile``, ``UpstreamProduct``, ``SoftwareRef``).

Host layout under ``PIPELINE_BASE_DIR``::

    <pipeline>/<sub_group_key>/workspace/<step>/                 each step's products (intermediate steps)
    <pipeline>/<sub_group_key>/output/<type dir>/                 the final step's products
    <pipeline>/<sub_group_key>/attempts/<step>/<attempt_id>/config/manifest.json
    <pipeline>/<sub_group_key>/attempts/<step>/<attempt_id>/logs/

The per-attempt directories mean a retry never overwrites what an earlier attempt left.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import posixpath
import re
import shutil
import tempfile
import uuid
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import jsonschema

from ccat_dagster.errors import CcatError
from ccat_dagster.execution.hpc.exit_codes import explain_exit_code

CONTAINER_ROOT = "/workflow"
CONTAINER_INPUT_DIR = "/workflow/input"
CONTAINER_WORKSPACE_DIR = "/workflow/workspace"
CONTAINER_OUTPUT_DIR = "/workflow/output"
CONTAINER_CONFIG_DIR = "/workflow/config"
CONTAINER_LOGS_DIR = "/workflow/logs"
MANIFEST_NAME = "manifest.json"
CONTAINER_MANIFEST_PATH = f"{CONTAINER_CONFIG_DIR}/{MANIFEST_NAME}"
MANIFEST_VERSION = 1
MANIFEST_SCHEMA_PATH = Path(__file__).with_name("manifest.schema.json")

# Directory under output/ → DataProductType value (the strings of ccat_dagster.opsdb.enums.DataProductType).
OUTPUT_TYPE_DIRS: Mapping[str, str] = MappingProxyType(
    {"science": "science", "qa": "qa_metric", "plots": "plot", "statistics": "statistics", "logs": "log"}
)
INTERMEDIATE_PRODUCT_TYPE = "intermediate"
PRODUCT_TYPES = frozenset({*OUTPUT_TYPE_DIRS.values(), INTERMEDIATE_PRODUCT_TYPE})

# Environment every container receives; WORKFLOW_OUTPUT_DIR is the one the CCAT contract requires.
ENV_OUTPUT_DIR = "WORKFLOW_OUTPUT_DIR"
ENV_INPUT_DIR = "WORKFLOW_INPUT_DIR"
ENV_WORKSPACE_DIR = "WORKFLOW_WORKSPACE_DIR"
ENV_CONFIG_DIR = "WORKFLOW_CONFIG_DIR"
ENV_LOGS_DIR = "WORKFLOW_LOGS_DIR"
ENV_MANIFEST = "WORKFLOW_MANIFEST"
# The job's wall-time limit in seconds, where the attempt has one: a payload can plan its work or checkpoint
# before the limit (inside a container it cannot ask the batch system).
ENV_TIME_LIMIT = "WORKFLOW_TIME_LIMIT_SECONDS"
CONTRACT_ENV_NAMES = frozenset(
    {ENV_OUTPUT_DIR, ENV_INPUT_DIR, ENV_WORKSPACE_DIR, ENV_CONFIG_DIR, ENV_LOGS_DIR, ENV_MANIFEST, ENV_TIME_LIMIT}
)

# Linux NAME_MAX: a longer name cannot be a directory, and sub_group_key is one.
_NAME_MAX_BYTES = 255
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_ATTEMPT_SET_ASIDE_DIR = "previous-output"


class ContainerContractError(CcatError, ValueError):
    """A value or a directory breaks the container contract; the message names it and the fix."""


class StaleOutputError(ContainerContractError):
    """The directory an attempt would write its products to already holds files from an earlier attempt."""


@dataclass(frozen=True)
class OutputProblem:
    """One path of an attempt's output that breaks the contract, relative to the output root."""

    relative_path: str
    reason: str


class OutputContractError(ContainerContractError):
    """The container left output that breaks the contract; ``problems`` lists every offending path."""

    def __init__(self, *, summary: str, problems: Sequence[OutputProblem]) -> None:
        self.problems = tuple(problems)
        lines = [summary, *(f"  - {p.relative_path}: {p.reason}" for p in self.problems)]
        super().__init__("\n".join(lines))


def validate_path_component(value: str, what: str) -> str:
    """Return ``value`` if it can be one directory name, else raise ContainerContractError naming ``what``.

    Refused: non-strings, empty, ``.``, ``..``, ``/``, NUL and other control characters, more than 255 bytes.
    """
    if not isinstance(value, str):
        raise ContainerContractError(f"{what} must be a string, not {type(value).__name__} ({value!r})")
    if value in ("", ".", ".."):
        raise ContainerContractError(
            f"{what} {value!r} cannot be a directory name; give a non-empty name other than '.' and '..'"
        )
    if "/" in value:
        raise ContainerContractError(
            f"{what} {value!r} contains '/', which would make it several directories; remove or replace it"
        )
    control = sorted({c for c in value if ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F})
    if control:
        shown = ", ".join(repr(c) for c in control)
        raise ContainerContractError(
            f"{what} {value!r} contains control characters ({shown}); use printable characters only"
        )
    if len(value.encode("utf-8", "surrogateescape")) > _NAME_MAX_BYTES:
        raise ContainerContractError(
            f"{what} {value[:40]!r}... is longer than {_NAME_MAX_BYTES} bytes, the limit for a directory "
            "name; shorten it"
        )
    return value


def validate_relative_path(value: str, what: str) -> str:
    """Return ``value`` if it is a relative POSIX path of valid components (no ``..``, no empty parts)."""
    if not isinstance(value, str) or not value:
        raise ContainerContractError(f"{what} must be a non-empty relative path, not {value!r}")
    if value.startswith("/"):
        raise ContainerContractError(f"{what} {value!r} is absolute; give it relative to its directory")
    for part in value.split("/"):
        if part == "":
            raise ContainerContractError(f"{what} {value!r} has an empty component ('//' or a trailing '/')")
        validate_path_component(part, f"a component of {what} {value!r}")
    return value


def normalise_sha256(value: str, what: str) -> str:
    """64 lower-case hexadecimal digits; a ``sha256:`` prefix is accepted and removed."""
    text = value.strip().lower().removeprefix("sha256:") if isinstance(value, str) else ""
    if not _SHA256_HEX.fullmatch(text):
        raise ContainerContractError(f"{what} {value!r} is not a sha256 checksum; expected 64 hexadecimal digits")
    return text


@dataclass(frozen=True)
class Mount:
    """One bind mount: ``host`` (absolute) appears at ``container`` (absolute, normalised)."""

    host: Path
    container: str
    read_only: bool

    def __post_init__(self) -> None:
        if not isinstance(self.host, Path) or not self.host.is_absolute():
            raise ContainerContractError(f"mount source {self.host!r} must be an absolute pathlib.Path")
        # normpath() changes any path with '..', '.', '//' or a trailing '/': only canonical targets pass.
        if (
            not isinstance(self.container, str)
            or not self.container.startswith("/")
            or self.container.startswith("//")
            or posixpath.normpath(self.container) != self.container
        ):
            raise ContainerContractError(
                f"mount target {self.container!r} must be an absolute, normalised container path "
                "(no '..', no '//', no trailing '/')"
            )


def workspace_step_dir(*, base_dir: Path, pipeline: str, sub_group_key: str, step: str) -> Path:
    """Host directory holding the products of ``step`` for one sub-group (also upstream mounts' source)."""
    return (
        Path(base_dir)
        / validate_path_component(pipeline, "pipeline name")
        / validate_path_component(sub_group_key, "sub_group_key")
        / "workspace"
        / validate_path_component(step, "step name")
    )


@dataclass(frozen=True)
class AttemptLayout:
    """Host directories of one attempt of one step for one sub-group; build it with ``attempt_layout``."""

    base_dir: Path
    pipeline: str
    sub_group_key: str
    step: str
    attempt_id: str
    is_final: bool

    def __post_init__(self) -> None:
        if not isinstance(self.base_dir, Path) or not self.base_dir.is_absolute():
            raise ContainerContractError(
                f"PIPELINE_BASE_DIR {self.base_dir!r} must be an absolute path (bind mounts need absolute sources)"
            )
        validate_path_component(self.pipeline, "pipeline name")
        validate_path_component(self.sub_group_key, "sub_group_key")
        validate_path_component(self.step, "step name")
        validate_path_component(self.attempt_id, "attempt id")

    @property
    def sub_group_dir(self) -> Path:
        return self.base_dir / self.pipeline / self.sub_group_key

    @property
    def workspace_dir(self) -> Path:
        """The sub-group's workspace root; every step has its own directory in it."""
        return self.sub_group_dir / "workspace"

    @property
    def step_workspace_dir(self) -> Path:
        """This step's directory in the workspace, mounted read-write at ``/workflow/workspace/<step>``."""
        return self.workspace_dir / self.step

    @property
    def output_dir(self) -> Path:
        """The sub-group's final-product directory, mounted at ``/workflow/output`` for the final step."""
        return self.sub_group_dir / "output"

    @property
    def attempt_dir(self) -> Path:
        return self.sub_group_dir / "attempts" / self.step / self.attempt_id

    @property
    def config_dir(self) -> Path:
        return self.attempt_dir / "config"

    @property
    def logs_dir(self) -> Path:
        return self.attempt_dir / "logs"

    @property
    def manifest_path(self) -> Path:
        return self.config_dir / MANIFEST_NAME

    @property
    def products_dir(self) -> Path:
        """Host directory whose files become this attempt's products: output/ or workspace/<step>/."""
        return self.output_dir if self.is_final else self.step_workspace_dir

    @property
    def container_step_workspace_dir(self) -> str:
        return f"{CONTAINER_WORKSPACE_DIR}/{self.step}"

    @property
    def container_output_dir(self) -> str:
        """The value of ``WORKFLOW_OUTPUT_DIR``: ``/workflow/output/`` or ``/workflow/workspace/<step>/``."""
        return f"{CONTAINER_OUTPUT_DIR}/" if self.is_final else f"{self.container_step_workspace_dir}/"

    def create(self, *, set_aside_previous_output: bool = False) -> Path | None:
        """Create this attempt's directories; return where earlier output was moved, if anywhere.

        Refuses an attempt id that already has a directory (a retry needs a new id). If the products
        directory already holds files, they would be mistaken for this attempt's products: by default
        ``StaleOutputError`` is raised; with ``set_aside_previous_output=True`` the directory is moved to
        ``attempts/<step>/<attempt_id>/previous-output/`` first. Only do that for output no registered
        product points at (the caller knows; this module does not read the ops-db).
        """
        if self.attempt_dir.exists():
            raise ContainerContractError(self._attempt_exists_message())
        leftovers = _files_below(self.products_dir, limit=5)
        if leftovers and not set_aside_previous_output:
            shown = ", ".join(leftovers)
            raise StaleOutputError(
                f"{self.products_dir} already holds files from an earlier attempt of step {self.step!r} "
                f"(sub-group {self.sub_group_key!r}): {shown}; they would be registered as this attempt's "
                "products. Supersede or move them, or create the attempt with set_aside_previous_output=True"
            )
        self.attempt_dir.parent.mkdir(parents=True, exist_ok=True)
        try:
            # exist_ok=False: of two racing creators of the same attempt id, exactly one wins.
            self.attempt_dir.mkdir()
        except FileExistsError:
            raise ContainerContractError(self._attempt_exists_message()) from None
        self.config_dir.mkdir()
        self.logs_dir.mkdir()
        set_aside: Path | None = None
        if leftovers:
            set_aside = self.attempt_dir / _ATTEMPT_SET_ASIDE_DIR
            _move_aside(self.products_dir, set_aside)
        self.step_workspace_dir.mkdir(parents=True, exist_ok=True)
        self.products_dir.mkdir(parents=True, exist_ok=True)
        return set_aside

    def _attempt_exists_message(self) -> str:
        return (
            f"attempt directory {self.attempt_dir} already exists: attempt {self.attempt_id!r} of step "
            f"{self.step!r} was prepared before; give every attempt a new attempt id so a retry never "
            "overwrites an earlier one"
        )


def attempt_layout(
    *,
    base_dir: Path | str,
    pipeline: str,
    sub_group_key: str,
    step: str,
    attempt_id: str | int,
    is_final: bool,
) -> AttemptLayout:
    """The host layout of one attempt; every name is validated as a directory name."""
    if isinstance(attempt_id, bool) or not isinstance(attempt_id, str | int):
        raise ContainerContractError(f"attempt id {attempt_id!r} must be a string or an integer")
    return AttemptLayout(
        base_dir=Path(base_dir),
        pipeline=pipeline,
        sub_group_key=sub_group_key,
        step=step,
        attempt_id=str(attempt_id),
        is_final=bool(is_final),
    )


def _move_aside(directory: Path, target: Path) -> None:
    """Move ``directory`` to ``target``. A directory that is a mount point (an output file system of its own)
    cannot be renamed: its entries move instead, copied where they cross file systems."""
    try:
        os.rename(directory, target)
        return
    except OSError as error:
        if error.errno not in (errno.EXDEV, errno.EBUSY):
            raise
    target.mkdir()
    for entry in sorted(directory.iterdir()):
        shutil.move(entry, target / entry.name)


def _files_below(root: Path, *, limit: int) -> list[str]:
    """Up to ``limit`` non-directory entries below ``root`` (relative, sorted per directory)."""
    found: list[str] = []
    if not root.is_dir():
        return found
    for current, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames) + [d for d in dirnames if os.path.islink(os.path.join(current, d))]:
            found.append(Path(current, name).relative_to(root).as_posix())
            if len(found) >= limit:
                return found
    return found


# ---------------------------------------------------------------------------------------------------------
# Inputs of an attempt, independent of the ORM.


@dataclass(frozen=True)
class SoftwareRef:
    """The reduction software version that runs (ReductionSoftware + ReductionSoftwareVersion)."""

    name: str
    version: str
    image_ref: str
    image_digest: str | None = None


@dataclass(frozen=True)
class InputFile:
    """One staged raw file; ``relative_path`` is its path inside the package directory (POSIX)."""

    package_name: str
    package_id: int | str
    raw_file_id: int | str | uuid.UUID
    relative_path: str
    size: int
    sha256: str

    @property
    def container_path(self) -> str:
        return f"{CONTAINER_INPUT_DIR}/{self.package_name}/{self.relative_path}"


@dataclass(frozen=True)
class UpstreamProduct:
    """One product of an earlier step; ``relative_path`` is relative to that step's workspace directory.

    ``host_path`` (optional) is where the product's PhysicalCopy says the file is; ``build_mounts`` then
    checks that the mount of that step's directory really shows this file at the manifest's path.
    """

    product_id: int | str
    step: str
    sub_group_key: str
    product_type: str
    relative_path: str
    size: int
    sha256: str
    host_path: Path | None = None


def upstream_container_dirs(
    *, layout: AttemptLayout, upstream_products: Sequence[UpstreamProduct]
) -> dict[tuple[str, str], str]:
    """Container directory of each (upstream step, upstream sub_group_key), sorted by step then key.

    Identity (the step's only upstream sub-group is this attempt's own): ``/workflow/workspace/<step>``.
    Anything else (fan-in over several sub-groups, or one different sub-group):
    ``/workflow/workspace/<step>/<upstream sub_group_key>``.
    """
    keys_by_step: dict[str, set[str]] = defaultdict(set)
    for product in upstream_products:
        validate_path_component(product.step, "upstream step name")
        validate_path_component(product.sub_group_key, "upstream sub_group_key")
        keys_by_step[product.step].add(product.sub_group_key)
    plan: dict[tuple[str, str], str] = {}
    for step in sorted(keys_by_step):
        if step == layout.step:
            raise ContainerContractError(
                f"step {layout.step!r} lists products of itself as upstream products; its own directory "
                f"{CONTAINER_WORKSPACE_DIR}/{step} is its output; upstream products come from other steps"
            )
        keys = keys_by_step[step]
        if keys == {layout.sub_group_key}:
            plan[(step, layout.sub_group_key)] = f"{CONTAINER_WORKSPACE_DIR}/{step}"
        else:
            for key in sorted(keys):
                plan[(step, key)] = f"{CONTAINER_WORKSPACE_DIR}/{step}/{key}"
    return plan


def build_mounts(
    *,
    layout: AttemptLayout,
    input_packages: Sequence[tuple[str, Path]],
    upstream_products: Sequence[UpstreamProduct] = (),
) -> list[Mount]:
    """The bind mounts of one attempt, in a fixed order.

    ``input_packages``: (package name, staged host directory) in the order to mount them, each read-only at
    ``/workflow/input/<package name>``. Then the upstream steps' directories read-only (see
    ``upstream_container_dirs``), this step's workspace directory read-write, ``/workflow/output``
    read-write for the final step, ``/workflow/config`` read-only and ``/workflow/logs`` read-write.
    """
    mounts: list[Mount] = []
    seen_packages: set[str] = set()
    for package_name, host_dir in input_packages:
        validate_path_component(package_name, "input package name")
        if package_name in seen_packages:
            raise ContainerContractError(
                f"input package {package_name!r} is listed twice; each package is mounted once at "
                f"{CONTAINER_INPUT_DIR}/{package_name}"
            )
        seen_packages.add(package_name)
        mounts.append(Mount(Path(host_dir), f"{CONTAINER_INPUT_DIR}/{package_name}", read_only=True))
    for (step, key), container_dir in upstream_container_dirs(
        layout=layout, upstream_products=upstream_products
    ).items():
        host_dir = workspace_step_dir(base_dir=layout.base_dir, pipeline=layout.pipeline, sub_group_key=key, step=step)
        mounts.append(Mount(host_dir, container_dir, read_only=True))
    for product in upstream_products:
        if product.host_path is not None:
            _check_upstream_host_path(layout=layout, product=product)
    mounts.append(Mount(layout.step_workspace_dir, layout.container_step_workspace_dir, read_only=False))
    if layout.is_final:
        mounts.append(Mount(layout.output_dir, CONTAINER_OUTPUT_DIR, read_only=False))
    mounts.append(Mount(layout.config_dir, CONTAINER_CONFIG_DIR, read_only=True))
    mounts.append(Mount(layout.logs_dir, CONTAINER_LOGS_DIR, read_only=False))
    return mounts


def _check_upstream_host_path(*, layout: AttemptLayout, product: UpstreamProduct) -> None:
    validate_relative_path(product.relative_path, f"path of upstream product {product.product_id!r}")
    step_dir = workspace_step_dir(
        base_dir=layout.base_dir,
        pipeline=layout.pipeline,
        sub_group_key=product.sub_group_key,
        step=product.step,
    )
    expected = step_dir / product.relative_path
    if os.path.normpath(Path(product.host_path or "")) != os.path.normpath(expected):
        raise ContainerContractError(
            f"upstream product {product.product_id!r} is at {product.host_path}, but the container sees step "
            f"{product.step!r} of sub-group {product.sub_group_key!r} through {step_dir}; its physical copy "
            f"must be {expected}"
        )


def missing_mount_sources(*, mounts: Sequence[Mount]) -> list[Path]:
    """Mount sources that are not directories on this host; check before submitting, not on the node."""
    return [mount.host for mount in mounts if not mount.host.is_dir()]


def build_environment(
    *, layout: AttemptLayout, extra: Mapping[str, str] | None = None, time_limit_seconds: int | None = None
) -> dict[str, str]:
    """The container's environment: the contract variables plus ``extra`` (which may not override them).

    ``time_limit_seconds``: the job's wall-time limit as submitted, given to the payload as
    ``WORKFLOW_TIME_LIMIT_SECONDS`` (absent when the attempt runs without one, as ``reproduce`` does).
    """
    env = {
        ENV_OUTPUT_DIR: layout.container_output_dir,
        ENV_INPUT_DIR: CONTAINER_INPUT_DIR,
        ENV_WORKSPACE_DIR: CONTAINER_WORKSPACE_DIR,
        ENV_CONFIG_DIR: CONTAINER_CONFIG_DIR,
        ENV_LOGS_DIR: CONTAINER_LOGS_DIR,
        ENV_MANIFEST: CONTAINER_MANIFEST_PATH,
    }
    if time_limit_seconds is not None:
        if isinstance(time_limit_seconds, bool) or not isinstance(time_limit_seconds, int) or time_limit_seconds < 1:
            raise ContainerContractError(
                f"time limit {time_limit_seconds!r} is invalid: give a whole number of seconds of at least 1"
            )
        env[ENV_TIME_LIMIT] = str(time_limit_seconds)
    for name, value in (extra or {}).items():
        validate_env_name(name)
        if name in CONTRACT_ENV_NAMES:
            raise ContainerContractError(
                f"environment variable {name} is set by the container contract and cannot be overridden"
            )
        if not isinstance(value, str):
            raise ContainerContractError(f"environment variable {name}={value!r} must be a string")
        env[name] = value
    return env


def validate_env_name(name: str) -> str:
    if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
        raise ContainerContractError(
            f"environment variable name {name!r} is invalid; use letters, digits and '_', not starting with a digit"
        )
    return name


# ---------------------------------------------------------------------------------------------------------
# The manifest.


def _json_id(value: Any, what: str) -> int | str:
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, bool) or not isinstance(value, int | str) or value == "":
        raise ContainerContractError(f"{what} {value!r} must be an integer or a non-empty string")
    return value


def _size(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ContainerContractError(f"{what} {value!r} must be a byte count (an integer ≥ 0)")
    return value


def _image_digest(value: str | None) -> str | None:
    if value is None:
        return None
    return "sha256:" + normalise_sha256(value, "software image_digest")


def build_manifest(
    *,
    layout: AttemptLayout,
    run_id: int | str,
    software: SoftwareRef,
    config: Mapping[str, Any],
    inputs: Sequence[InputFile],
    upstream_products: Sequence[UpstreamProduct] = (),
) -> dict[str, Any]:
    """The manifest of one attempt as a JSON-ready dict, validated against ``manifest.schema.json``.

    Container paths follow ``build_mounts`` for the same layout and upstream products.
    """
    try:
        json.dumps(dict(config), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ContainerContractError(
            f"config parameters of step {layout.step!r} are not plain JSON ({exc}); use strings, numbers, "
            "booleans, null, lists and objects with string keys"
        ) from exc

    seen_paths: set[str] = set()

    def unique(path: str) -> str:
        if path in seen_paths:
            raise ContainerContractError(f"the manifest would list {path} twice; each file must appear once")
        seen_paths.add(path)
        return path

    input_entries = []
    for item in inputs:
        validate_path_component(item.package_name, "input package name")
        validate_relative_path(item.relative_path, f"path of a file in package {item.package_name!r}")
        input_entries.append(
            {
                "path": unique(item.container_path),
                "size": _size(item.size, f"size of {item.container_path}"),
                "sha256": normalise_sha256(item.sha256, f"sha256 of {item.container_path}"),
                "package_id": _json_id(item.package_id, f"package id of {item.container_path}"),
                "package_name": item.package_name,
                "raw_file_id": _json_id(item.raw_file_id, f"raw file id of {item.container_path}"),
            }
        )

    dirs = upstream_container_dirs(layout=layout, upstream_products=upstream_products)
    upstream_entries = []
    for product in upstream_products:
        where = f"upstream product {product.product_id!r} of step {product.step!r}"
        validate_relative_path(product.relative_path, f"path of {where}")
        if product.product_type not in PRODUCT_TYPES:
            raise ContainerContractError(
                f"{where} has product_type {product.product_type!r}; expected one of {', '.join(sorted(PRODUCT_TYPES))}"
            )
        path = f"{dirs[(product.step, product.sub_group_key)]}/{product.relative_path}"
        upstream_entries.append(
            {
                "path": unique(path),
                "product_type": product.product_type,
                "sha256": normalise_sha256(product.sha256, f"sha256 of {where}"),
                "size": _size(product.size, f"size of {where}"),
                "product_id": _json_id(product.product_id, f"id of {where}"),
                "step": product.step,
                "sub_group_key": product.sub_group_key,
            }
        )

    manifest: dict[str, Any] = {
        "manifest_version": MANIFEST_VERSION,
        "run_id": _json_id(run_id, "run id"),
        "attempt_id": layout.attempt_id,
        "pipeline": layout.pipeline,
        "step": layout.step,
        "sub_group_key": layout.sub_group_key,
        "is_final_step": layout.is_final,
        "software": {
            "name": software.name,
            "version": software.version,
            "image_ref": software.image_ref,
            "image_digest": _image_digest(software.image_digest),
        },
        "config": json.loads(json.dumps(dict(config))),
        "inputs": input_entries,
        "upstream_products": upstream_entries,
        "paths": {
            "input": CONTAINER_INPUT_DIR,
            "workspace": CONTAINER_WORKSPACE_DIR,
            "output_dir": layout.container_output_dir,
            "config": CONTAINER_CONFIG_DIR,
            "logs": CONTAINER_LOGS_DIR,
            "manifest": CONTAINER_MANIFEST_PATH,
        },
    }
    validate_manifest(manifest)
    return manifest


@functools.cache
def manifest_schema() -> dict[str, Any]:
    """The published JSON Schema (draft 2020-12) of manifest.json."""
    schema: dict[str, Any] = json.loads(MANIFEST_SCHEMA_PATH.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return schema


@functools.cache
def _manifest_validator() -> jsonschema.Draft202012Validator:
    """Read and checked once per process: a batched run writes a manifest per sub-group."""
    return jsonschema.Draft202012Validator(manifest_schema())


def validate_manifest(manifest: Mapping[str, Any]) -> None:
    """Raise ContainerContractError naming the first entry of ``manifest`` the schema refuses."""
    validator = _manifest_validator()
    error = jsonschema.exceptions.best_match(validator.iter_errors(manifest))
    if error is not None:
        where = "/".join(str(part) for part in error.absolute_path) or "(top level)"
        raise ContainerContractError(f"manifest entry {where} is invalid: {error.message}")


def write_manifest(*, layout: AttemptLayout, manifest: Mapping[str, Any]) -> Path:
    """Validate and write ``config/manifest.json`` read-only (0444); an existing one is never replaced."""
    validate_manifest(manifest)
    text = json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False) + "\n"
    descriptor, temporary = tempfile.mkstemp(dir=layout.config_dir, prefix=".manifest.", suffix=".partial")
    try:
        # No fsync: the job that reads it is submitted after this returns (a shared file system shows a closed
        # file to other clients), and a host crash ends the attempt, whose retry writes a new manifest.
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(temporary, 0o444)
        try:
            # link() fails on an existing name: the manifest appears complete or not at all, and once.
            os.link(temporary, layout.manifest_path)
        except FileExistsError:
            raise ContainerContractError(
                f"{layout.manifest_path} already exists; an attempt's manifest is written once "
                "(create a new attempt instead)"
            ) from None
    finally:
        os.unlink(temporary)
    return layout.manifest_path


def short_hash(value: str, *, length: int = 8) -> str:
    """A short, stable hex digest of ``value`` (a sha256 prefix), for names that must be short (job names)."""
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).hexdigest()[:length]


def describe_exit_code(exit_code: int) -> str:
    """What a container's exit code means under the contract (0 = success, anything else fails the attempt).

    Accepts shell-style codes (128 + signal) and Python's negative codes for a process killed by a signal; the
    wording lives with every other exit-code description in ``execution.hpc.exit_codes``.
    """
    return explain_exit_code(exit_code)
