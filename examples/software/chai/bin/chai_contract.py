"""The CCAT container contract as the CHAI example programs see it.

Everything a program needs to know about where it runs comes from the manifest (``$WORKFLOW_MANIFEST``,
else ``$WORKFLOW_CONFIG_DIR/manifest.json``, else ``/workflow/config/manifest.json``) and from
``WORKFLOW_OUTPUT_DIR``; nothing here guesses a path.

Exit codes of every program:
    0  success
    1  internal error (a bug in this software; the traceback is on stderr)
    2  input rejected: manifest, config, checksum, size or data format is wrong
    3  an output could not be written
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SOFTWARE_VERSION = "1.0.0"
DEFAULT_CONFIG_DIR = "/workflow/config"
MANIFEST_NAME = "manifest.json"

EXIT_OK = 0
EXIT_INTERNAL_ERROR = 1
EXIT_INPUT_REJECTED = 2
EXIT_OUTPUT_FAILED = 3

# The characters ccat-dagster's sub_group_key encoding uses; all are harmless in a file name.
_SAFE_STEM = re.compile(r"[^A-Za-z0-9._+=~%-]")
# Leaves room for the longest suffix added to a stem ("_grid_map.log") within Linux's 255-byte NAME_MAX.
MAX_STEM_LENGTH = 200
_STEM_HASH_DIGITS = 16
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_HASH_CHUNK_BYTES = 1 << 20


class InputRejected(Exception):
    """The manifest, the config or an input file is unusable; the program exits with 2."""


class ManifestError(InputRejected):
    """manifest.json is missing, unreadable or lacks a required entry."""


class ConfigError(InputRejected):
    """A config parameter has a value this software does not accept."""


class ChecksumMismatch(InputRejected):
    """An input file's sha256 or size differs from what the manifest says."""


class DataFormatError(InputRejected):
    """An input file exists and matches its checksum but does not hold what the format requires."""


class OutputError(Exception):
    """An output file could not be written; the program exits with 3."""


@dataclass(frozen=True)
class InputFile:
    """One staged raw file, as listed under ``inputs`` in the manifest."""

    path: Path
    package_name: str
    package_id: Any
    size: int | None
    sha256: str


@dataclass(frozen=True)
class UpstreamProduct:
    """One product of an earlier step, as listed under ``upstream_products`` in the manifest."""

    path: Path
    step: str
    sub_group_key: str | None
    product_type: str
    size: int | None
    sha256: str
    product_id: Any


@dataclass(frozen=True)
class Manifest:
    """The parts of manifest.json these programs use; ``raw`` keeps the whole document."""

    step: str
    sub_group_key: str
    is_final_step: bool
    config: dict[str, Any]
    inputs: tuple[InputFile, ...]
    upstream_products: tuple[UpstreamProduct, ...]
    paths: dict[str, str]
    raw: dict[str, Any] = field(repr=False)


class Progress:
    """Writes one line per event to stdout and keeps the lines so a final step can store them as a log."""

    def __init__(self, *, program: str) -> None:
        self.program = program
        self.lines: list[str] = []

    def say(self, message: str) -> None:
        line = f"[{self.program}] {message}"
        self.lines.append(line)
        print(line, flush=True)

    def warn(self, message: str) -> None:
        line = f"[{self.program}] WARNING: {message}"
        self.lines.append(line)
        print(line, file=sys.stderr, flush=True)


def _require(mapping: dict[str, Any], key: str, kind: type | tuple[type, ...], *, where: str) -> Any:
    if key not in mapping:
        raise ManifestError(f"manifest: {where} has no '{key}' entry; the orchestrator must write it")
    value = mapping[key]
    # bool is an int subclass; a flag where a count is expected is a manifest bug, not a value.
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
        raise ManifestError(
            f"manifest: {where}.{key} is {value!r} ({type(value).__name__}); expected {_kind_name(kind)}"
        )
    return value


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in _as_tuple(kind))


def _normalise_sha256(value: Any, *, where: str) -> str:
    text = str(value).strip().lower()
    text = text.removeprefix("sha256:")
    if not _SHA256_HEX.fullmatch(text):
        raise ManifestError(f"manifest: {where}.sha256 is {value!r}; expected 64 hexadecimal digits")
    return text


def manifest_path() -> Path:
    """``$WORKFLOW_MANIFEST``, else ``$WORKFLOW_CONFIG_DIR/manifest.json`` (default ``/workflow/config``)."""
    explicit = os.environ.get("WORKFLOW_MANIFEST")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("WORKFLOW_CONFIG_DIR") or DEFAULT_CONFIG_DIR) / MANIFEST_NAME


def _optional_size(entry: dict[str, Any], *, where: str) -> int | None:
    size = entry.get("size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
        raise ManifestError(f"manifest: {where}.size is {size!r}; expected a byte count or null")
    return size


def load_manifest(*, path: Path | None = None) -> Manifest:
    """Read and check the manifest; raises ManifestError naming the first bad entry."""
    path = path or manifest_path()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ManifestError(
            f"cannot read the manifest {path}: {exc.strerror or exc}; mount it at /workflow/config "
            "or set WORKFLOW_CONFIG_DIR"
        ) from exc
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"manifest {path} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ManifestError(f"manifest {path} must hold a JSON object, not {type(raw).__name__}")

    config = raw.get("config") or {}
    if not isinstance(config, dict):
        raise ManifestError(f"manifest: config is {type(config).__name__}; expected an object of parameters")

    inputs = []
    for index, entry in enumerate(_require(raw, "inputs", list, where="top level")):
        where = f"inputs[{index}]"
        if not isinstance(entry, dict):
            raise ManifestError(f"manifest: {where} is not an object")
        inputs.append(
            InputFile(
                path=Path(_require(entry, "path", str, where=where)),
                package_name=_require(entry, "package_name", str, where=where),
                package_id=entry.get("package_id"),
                size=_optional_size(entry, where=where),
                sha256=_normalise_sha256(_require(entry, "sha256", str, where=where), where=where),
            )
        )

    upstream = []
    for index, entry in enumerate(raw.get("upstream_products") or []):
        where = f"upstream_products[{index}]"
        if not isinstance(entry, dict):
            raise ManifestError(f"manifest: {where} is not an object")
        key = entry.get("sub_group_key")
        upstream.append(
            UpstreamProduct(
                path=Path(_require(entry, "path", str, where=where)),
                step=str(entry.get("step") or ""),
                sub_group_key=None if key is None else str(key),
                product_type=str(entry.get("product_type") or ""),
                size=_optional_size(entry, where=where),
                sha256=_normalise_sha256(_require(entry, "sha256", str, where=where), where=where),
                product_id=entry.get("product_id"),
            )
        )

    paths = raw.get("paths") or {}
    if not isinstance(paths, dict):
        raise ManifestError(f"manifest: paths is {type(paths).__name__}; expected an object")
    return Manifest(
        step=_require(raw, "step", str, where="top level"),
        sub_group_key=str(_require(raw, "sub_group_key", (str, int), where="top level")),
        is_final_step=bool(raw.get("is_final_step", False)),
        config=config,
        inputs=tuple(inputs),
        upstream_products=tuple(upstream),
        paths={str(k): str(v) for k, v in paths.items()},
        raw=raw,
    )


def output_dir(*, manifest: Manifest) -> Path:
    """``WORKFLOW_OUTPUT_DIR``, else the manifest's ``paths.output_dir``.

    Not created here: write_bytes creates directories as it writes, so a run rejected before its first
    output leaves nothing behind.
    """
    value = os.environ.get("WORKFLOW_OUTPUT_DIR") or manifest.paths.get("output_dir")
    if not value:
        raise ManifestError(
            "WORKFLOW_OUTPUT_DIR is not set and the manifest has no paths.output_dir; the orchestrator "
            "must pass one of them"
        )
    return Path(value)


def verify_checksums(*, files: Iterable[InputFile | UpstreamProduct], progress: Progress) -> None:
    """Hash every file and compare with the manifest; one progress line per file."""
    for item in files:
        try:
            actual_size = item.path.stat().st_size
            digest = hashlib.sha256()
            with item.path.open("rb") as handle:
                while chunk := handle.read(_HASH_CHUNK_BYTES):
                    digest.update(chunk)
        except OSError as exc:
            raise DataFormatError(
                f"cannot read {item.path}, which the manifest lists: {exc.strerror or exc}"
            ) from exc
        if item.size is not None and actual_size != item.size:
            raise ChecksumMismatch(
                f"size mismatch for {item.path}: manifest says {item.size} bytes, file has "
                f"{actual_size}; the staged copy is incomplete or stale, stage it again"
            )
        if digest.hexdigest() != item.sha256:
            raise ChecksumMismatch(
                f"sha256 mismatch for {item.path}: manifest says {item.sha256}, file has "
                f"{digest.hexdigest()}; the staged copy is corrupt or stale, stage it again"
            )
        progress.say(f"verified {item.path} ({actual_size} bytes, sha256 ok)")


def safe_file_stem(*, name: str, what: str) -> str:
    """A name usable as one path component with a suffix added.

    Characters outside ``[A-Za-z0-9._+=~%-]`` become ``_``; a name longer than MAX_STEM_LENGTH keeps its
    start and gets ``~`` plus a hash of the whole name, so different long names stay different.
    """
    stem = _SAFE_STEM.sub("_", name).lstrip(".")
    if not stem:
        raise InputRejected(f"{what} {name!r} gives an empty file name; it must contain a letter or digit")
    if len(stem) > MAX_STEM_LENGTH:
        digest = hashlib.sha256(name.encode("utf-8")).hexdigest()[:_STEM_HASH_DIGITS]
        stem = f"{stem[: MAX_STEM_LENGTH - _STEM_HASH_DIGITS - 1]}~{digest}"
    return stem


def config_choice(*, config: dict[str, Any], key: str, allowed: tuple[str, ...], default: str) -> str:
    value = config.get(key, default)
    if value not in allowed:
        raise ConfigError(
            f"config {key}={value!r} is not supported; allowed: {', '.join(repr(a) for a in allowed)}"
        )
    return str(value)


def config_int(*, config: dict[str, Any], key: str, default: int, minimum: int, maximum: int) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise ConfigError(
            f"config {key}={value!r} is invalid; expected an integer from {minimum} to {maximum}"
        )
    return value


def config_positive_float(*, config: dict[str, Any], key: str, default: float) -> float:
    value = config.get(key, default)
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigError(f"config {key}={value!r} is invalid; expected a positive number")
    return float(value)


def config_float(*, config: dict[str, Any], key: str, default: float) -> float:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"config {key}={value!r} is invalid; expected a finite number")
    return float(value)


def warn_unknown_config(*, config: dict[str, Any], known: Iterable[str], progress: Progress) -> None:
    # Other steps' parameters may share one config object, so an unknown key is worth a warning only.
    for key in sorted(set(config) - set(known)):
        progress.warn(f"config key {key!r} is not used by this program")


def finite_or_none(value: float) -> float | None:
    """JSON has no NaN; a missing measurement is written as null."""
    return float(value) if math.isfinite(value) else None


def write_bytes(*, path: Path, data: bytes, progress: Progress) -> None:
    """Write via a hidden temporary name and rename, so a crash never leaves a half file to be collected."""
    partial = path.with_name(f".{path.name}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial.write_bytes(data)
        os.replace(partial, path)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc
    progress.say(f"wrote {path} ({len(data)} bytes)")


def write_json(*, path: Path, document: dict[str, Any], progress: Progress) -> None:
    text = json.dumps(document, indent=2, sort_keys=True, allow_nan=False) + "\n"
    write_bytes(path=path, data=text.encode("utf-8"), progress=progress)


def read_json_object(*, path: Path) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataFormatError(f"{path} is not a readable JSON file: {exc}") from exc
    if not isinstance(document, dict):
        raise DataFormatError(f"{path} must hold a JSON object, not {type(document).__name__}")
    return document


def run_program(*, program: str, main: Callable[[], None]) -> None:
    """Run ``main`` and turn its outcome into the contract's exit code and a one-line stderr message."""
    try:
        main()
    except InputRejected as exc:
        print(f"[{program}] ERROR (input rejected): {exc}", file=sys.stderr, flush=True)
        sys.exit(EXIT_INPUT_REJECTED)
    except OutputError as exc:
        print(f"[{program}] ERROR (output failed): {exc}", file=sys.stderr, flush=True)
        sys.exit(EXIT_OUTPUT_FAILED)
    except Exception:  # noqa: BLE001 - the last line of defence must report every bug, then fail the run
        traceback.print_exc()
        print(f"[{program}] ERROR (internal): unexpected failure, see the traceback above", file=sys.stderr)
        sys.exit(EXIT_INTERNAL_ERROR)
    sys.exit(EXIT_OK)
