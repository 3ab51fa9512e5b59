"""Turning a software version's ``image_ref`` into something a container runtime can run (SPEC §6).

* A local ``.sif`` file or a directory is used as it is. A directory with ``usr/`` is a sandbox (an
  unpacked root file system); a directory without ``usr/`` is a *software directory*, which only the
  bubblewrap runtime runs (mounted at ``/opt/software`` over the host's read-only ``/usr``).
* A remote reference (``docker://``, ``oras://``, ``library://``, ``https://``) is pulled once with
  ``apptainer pull`` into ``SIF_CACHE_DIR/sha256-<hex>.sif`` and reused from there. The digest is the cache
  key, so remote references need one.
"""

from __future__ import annotations

import enum
import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ccat_dagster.execution.contract import ContainerContractError, normalise_sha256

RUNTIME_NAMES = ("apptainer", "bubblewrap")
REMOTE_SCHEMES = ("docker://", "oras://", "library://", "https://")
_PULL_TIMEOUT_SECONDS = 3600
_HASH_CHUNK_BYTES = 1 << 20

PullFunction = Callable[[str, Path], None]
"""``pull(image_ref, destination)`` writes the image as a SIF file at ``destination`` (not yet existing)."""


class ImageError(ContainerContractError):
    """An image reference cannot be resolved to a runnable image; the message says what to change."""


class ImagePullError(ImageError):
    """Pulling a remote image failed."""


class ImageKind(enum.StrEnum):
    SIF = "sif"
    SANDBOX = "sandbox"
    SOFTWARE_DIR = "software_dir"


@dataclass(frozen=True)
class ResolvedImage:
    """A runnable image on this host: a SIF file, a sandbox directory or a software directory."""

    path: Path
    digest: str | None
    kind: ImageKind


def normalise_image_digest(value: str) -> str:
    """``sha256:<64 hex>``; a bare 64-digit hex string is accepted."""
    try:
        return "sha256:" + normalise_sha256(value, "image_digest")
    except ContainerContractError:
        raise ImageError(
            f"image_digest {value!r} is not a sha256 digest; expected 'sha256:' and 64 hexadecimal digits"
        ) from None


def sif_cache_path(*, sif_cache_dir: Path, image_digest: str) -> Path:
    """Where the pulled image with this digest is cached: ``<SIF_CACHE_DIR>/sha256-<hex>.sif``."""
    # '-' rather than the digest's ':': several tools (bind specs, PATH-like lists) read ':' as a separator.
    return Path(sif_cache_dir) / (normalise_image_digest(image_digest).replace(":", "-", 1) + ".sif")


def apptainer_pull(image_ref: str, destination: Path, *, apptainer: str = "apptainer") -> None:
    """Pull ``image_ref`` into ``destination`` as a SIF with ``apptainer pull``."""
    command = [apptainer, "pull", str(destination), image_ref]
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=_PULL_TIMEOUT_SECONDS)
    except FileNotFoundError:
        raise ImagePullError(
            f"cannot pull {image_ref}: {apptainer!r} was not found; install Apptainer on this host or point "
            "image_ref at a local .sif file"
        ) from None
    except subprocess.TimeoutExpired:
        raise ImagePullError(
            f"pulling {image_ref} took more than {_PULL_TIMEOUT_SECONDS} s and was stopped; pull it by hand "
            "into the SIF cache or check the registry"
        ) from None
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip()[-500:]
        raise ImagePullError(f"'{' '.join(command)}' failed with exit code {result.returncode}: {tail}")


def resolve_image(
    *,
    image_ref: str,
    image_digest: str | None,
    sif_cache_dir: Path,
    runtime_name: str,
    pull: PullFunction | None = None,
    base_dir: Path | None = None,
) -> ResolvedImage:
    """Resolve ``image_ref`` for ``runtime_name``; pulls a remote image at most once per digest.

    Relative local paths are resolved against ``base_dir``. ``pull`` defaults to ``apptainer_pull``.
    """
    if runtime_name not in RUNTIME_NAMES:
        raise ImageError(f"container runtime {runtime_name!r} is unknown; allowed: {', '.join(RUNTIME_NAMES)}")
    if not isinstance(image_ref, str) or not image_ref.strip():
        raise ImageError(f"image_ref {image_ref!r} is empty; give a .sif path, a directory or a remote reference")
    digest = None if image_digest is None else normalise_image_digest(image_digest)

    if image_ref.startswith(REMOTE_SCHEMES):
        return _resolve_remote(
            image_ref=image_ref,
            digest=digest,
            sif_cache_dir=Path(sif_cache_dir),
            runtime_name=runtime_name,
            pull=pull or apptainer_pull,
        )
    if "://" in image_ref:
        raise ImageError(
            f"image_ref {image_ref!r} has an unsupported scheme; use a local path or one of {', '.join(REMOTE_SCHEMES)}"
        )
    return _resolve_local(image_ref=image_ref, digest=digest, runtime_name=runtime_name, base_dir=base_dir)


def _resolve_local(*, image_ref: str, digest: str | None, runtime_name: str, base_dir: Path | None) -> ResolvedImage:
    path = Path(image_ref)
    if not path.is_absolute():
        if base_dir is None:
            raise ImageError(
                f"image_ref {image_ref!r} is a relative path and no base directory was given; make it absolute"
            )
        path = Path(base_dir) / path
    path = Path(os.path.abspath(path))
    if path.is_dir():
        kind = ImageKind.SANDBOX if (path / "usr").is_dir() else ImageKind.SOFTWARE_DIR
    elif path.is_file() and path.suffix == ".sif":
        kind = ImageKind.SIF
    elif path.exists():
        raise ImageError(
            f"image {path} is neither a .sif file nor a directory; give a SIF image, a sandbox directory "
            "(with usr/) or a software directory"
        )
    else:
        raise ImageError(f"image {path} (image_ref {image_ref!r}) does not exist; build or copy it there first")

    if runtime_name == "bubblewrap" and kind is ImageKind.SIF:
        raise ImageError(
            f"the bubblewrap runtime cannot run the SIF image {path}; unpack it with "
            "'apptainer build --sandbox <dir> <image.sif>' and use the directory, or set "
            "CONTAINER_RUNTIME=apptainer"
        )
    if runtime_name == "apptainer" and kind is ImageKind.SOFTWARE_DIR:
        raise ImageError(
            f"{path} is a software directory (a directory without usr/), which Apptainer cannot run; build a "
            "SIF or sandbox image containing it, or set CONTAINER_RUNTIME=bubblewrap"
        )
    return ResolvedImage(path=path, digest=digest, kind=kind)


def _resolve_remote(
    *, image_ref: str, digest: str | None, sif_cache_dir: Path, runtime_name: str, pull: PullFunction
) -> ResolvedImage:
    if runtime_name == "bubblewrap":
        raise ImageError(
            f"the bubblewrap runtime cannot pull or run the remote image {image_ref!r}; build a sandbox "
            "directory from it (apptainer build --sandbox <dir> <ref>) and set image_ref to that directory, "
            "or set CONTAINER_RUNTIME=apptainer"
        )
    if digest is None:
        raise ImageError(
            f"image_ref {image_ref!r} is remote but the software version has no image_digest; set "
            "image_digest (sha256:<64 hex>) so the image is pulled once into the SIF cache and every run "
            "uses the same image"
        )
    pinned = image_ref.rpartition("@")[2] if "@" in image_ref else None
    if pinned is not None and pinned.startswith("sha256:") and pinned.lower() != digest:
        raise ImageError(f"image_ref {image_ref!r} pins {pinned} but image_digest is {digest}; make them agree")

    target = sif_cache_path(sif_cache_dir=sif_cache_dir, image_digest=digest)
    if target.is_file():
        return ResolvedImage(path=target, digest=digest, kind=ImageKind.SIF)
    sif_cache_dir.mkdir(parents=True, exist_ok=True)
    lock_path = sif_cache_dir / f".{target.name}.lock"
    with open(lock_path, "a") as lock:
        # One puller per digest across processes; the others wait and find the finished file.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_file():
            return ResolvedImage(path=target, digest=digest, kind=ImageKind.SIF)
        scratch = Path(tempfile.mkdtemp(dir=sif_cache_dir, prefix=f".{target.stem}.pull-"))
        try:
            pulled = scratch / "image.sif"
            pull(image_ref, pulled)
            if not pulled.is_file() or pulled.stat().st_size == 0:
                raise ImagePullError(f"pulling {image_ref} produced no image file at {pulled}")
            if image_ref.startswith("https://"):
                # A plain download is the SIF itself, so its checksum must be the digest.
                actual = "sha256:" + _sha256_of(pulled)
                if actual != digest:
                    raise ImagePullError(
                        f"{image_ref} downloaded with checksum {actual}, not image_digest {digest}; fix "
                        "image_digest or the URL"
                    )
            os.replace(pulled, target)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return ResolvedImage(path=target, digest=digest, kind=ImageKind.SIF)


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()
