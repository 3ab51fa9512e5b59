"""Turning a software version's ``image_ref`` into something a container runtime can run
(docs/container-contract.md, section 8).

* A local ``.sif`` file or a directory is used as it is. A directory with ``usr/`` is a sandbox (an
  unpacked root file system); a directory without ``usr/`` is a *software directory*, which only the
  bubblewrap runtime runs (mounted at ``/opt/software`` over the host's read-only ``/usr``).
* A remote reference (``docker://``, ``oras://``, ``library://``, ``https://``) is pulled once with
  ``apptainer pull`` into ``SIF_CACHE_DIR/sha256-<hex>.sif`` and reused from there. The digest is the cache
  key, so remote references need one.

Every kind of image has a digest (``image_digest``): the sha256 of a SIF file; a tree hash of a sandbox or
software directory (``tree_digest``: paths, modes, file contents and symlink targets, never following a link,
with a per-file cache keyed by (path, mtime, ctime, size, inode) so an unchanged tree is only stat'ed); and the
registry digest of a remote OCI reference (``remote_image_digest``: the ``@sha256:`` it pins, else the
declared ``image_digest``, else the digest the registry gives its tag now, asked through the distribution API by
``registry.RegistryClient``). Given a ``BuildCheck``, ``resolve_image`` records that digest for the software
version the first time it is used (``ReductionSoftwareBuild`` build 1) and refuses a different one later,
naming the version, both digests and the fix; under ``IMAGE_CHANGE_POLICY=new_build`` a change is registered
as the next build and becomes the version's ``image_digest`` (so it enters every input fingerprint), and the
attempt planned with the old build is not run. A tag that moved to another image is such a change: refused, or a
new build, before anything is pulled.

With ``CONTAINER_RUNTIME=oci`` nothing is pulled on this host: the image is the reference pinned by that digest
(``ImageKind.OCI``, ``ResolvedImage.reference``), which the Kubernetes backend runs as the Job's container.
"""

from __future__ import annotations

import enum
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from ccat_dagster.execution.contract import ContainerContractError, normalise_sha256
from ccat_dagster.opsdb import models as m
from ccat_dagster.opsdb.engine import session_scope
from ccat_dagster.settings import image_change_policy

if TYPE_CHECKING:
    from ccat_dagster.execution.registry import RegistryClient

RUNTIME_NAMES = ("apptainer", "bubblewrap", "oci")
REMOTE_SCHEMES = ("docker://", "oras://", "library://", "https://")
_PULL_TIMEOUT_SECONDS = 3600
_HASH_CHUNK_BYTES = 1 << 20

# Python's bytecode caches are derived from the sources next to them and written by whoever runs the software
# natively; hashing them would make running the software change its digest.
TREE_DIGEST_SKIPPED_DIRS = frozenset({"__pycache__"})
TREE_DIGEST_FORMAT = "ccat-tree-1"
# A file modified less than this long before it was hashed is not cached: its mtime may not yet tell a second
# write in the same clock tick apart (git's "racy" entries).
_RACY_SECONDS = 2.0
log = logging.getLogger(__name__)

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
    OCI = "oci"


@dataclass(frozen=True)
class ResolvedImage:
    """A runnable image: on this host a SIF file, a sandbox directory or a software directory (``path``); or,
    for ``CONTAINER_RUNTIME=oci``, an image in a registry (``path`` None, ``reference`` pinned by digest)."""

    path: Path | None
    digest: str | None
    kind: ImageKind
    reference: str | None = None

    @property
    def location(self) -> str:
        """Where the image is, for messages and the build record: its path, or its pinned reference."""
        return str(self.path) if self.path is not None else str(self.reference)


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


class ImageChangedError(ImageError):
    """The image of a software version is not the one recorded for that version (refused before a submit)."""


class ImageRebuiltError(ImageChangedError):
    """A changed image was registered as a new build; the attempt planned with the old build is not run."""


class ImageChangePolicy(enum.StrEnum):
    REFUSE = "refuse"
    NEW_BUILD = "new_build"


@dataclass(frozen=True)
class BuildCheck:
    """What ``resolve_image`` needs to record and check the digest of one software version's image.

    ``policy`` None reads ``CCAT_WORKFLOW_MANAGER_IMAGE_CHANGE_POLICY``. ``attempt_id``, when given, gets the
    checked digest in ``ExecutedReductionStep.image_digest``.
    """

    engine: Engine
    software: str
    version: str
    attempt_id: int | None = None
    policy: ImageChangePolicy | None = None


def resolve_image(
    *,
    image_ref: str,
    image_digest: str | None,
    sif_cache_dir: Path,
    runtime_name: str,
    pull: PullFunction | None = None,
    base_dir: Path | None = None,
    check: BuildCheck | None = None,
    registry: RegistryClient | None = None,
) -> ResolvedImage:
    """Resolve ``image_ref`` for ``runtime_name``; pulls a remote image at most once per digest.

    Relative local paths are resolved against ``base_dir``. ``pull`` defaults to ``apptainer_pull``. With
    ``check``, the image's digest is computed and checked against the version's recorded build (see the module
    docstring); the returned ``digest`` is then always set. ``registry`` asks for the digest of an OCI tag
    that neither pins nor declares one (default: a client from the ``REGISTRY_*`` settings).
    """
    if isinstance(image_ref, str) and image_ref.startswith(REMOTE_SCHEMES) and runtime_name in RUNTIME_NAMES:
        return _resolve_remote_checked(
            image_ref=image_ref,
            image_digest=image_digest,
            sif_cache_dir=Path(sif_cache_dir),
            runtime_name=runtime_name,
            pull=pull,
            check=check,
            registry=registry,
        )
    resolved = _resolve(
        image_ref=image_ref,
        image_digest=image_digest,
        sif_cache_dir=sif_cache_dir,
        runtime_name=runtime_name,
        pull=pull,
        base_dir=base_dir,
    )
    if check is None:
        return resolved
    digest = image_digest_of(resolved, image_ref=image_ref, cache_dir=Path(sif_cache_dir) / ".tree-digests")
    check_build(check, image=ResolvedImage(path=resolved.path, digest=digest, kind=resolved.kind))
    return ResolvedImage(path=resolved.path, digest=digest, kind=resolved.kind)


def _resolve_remote_checked(
    *,
    image_ref: str,
    image_digest: str | None,
    sif_cache_dir: Path,
    runtime_name: str,
    pull: PullFunction | None,
    check: BuildCheck | None,
    registry: RegistryClient | None,
) -> ResolvedImage:
    """A remote image: its digest first (pin, declaration or registry), the build check, then the pull (if any).

    Checking before pulling keeps a moved tag from costing a multi-gigabyte pull that is then refused.
    """
    if runtime_name == "bubblewrap":
        # The same one-line refusal as before a digest is looked up: bubblewrap cannot run a remote image.
        return _resolve_remote(
            image_ref=image_ref, digest=None, sif_cache_dir=sif_cache_dir, runtime_name=runtime_name, pull=_no_pull
        )
    if runtime_name == "oci" and not image_ref.startswith("docker://"):
        raise ImageError(
            f"CONTAINER_RUNTIME=oci runs container images from a registry, and {image_ref!r} is not one; use a "
            "docker://registry/repository:tag reference, or CONTAINER_RUNTIME=apptainer"
        )
    digest = remote_image_digest(
        image_ref, declared=image_digest, registry=registry, ask_registry=check is not None or image_digest is None
    )
    kind = ImageKind.OCI if runtime_name == "oci" else ImageKind.SIF
    if check is not None:
        # Recorded (and named in a refusal) by the reference the pipeline file gives, e.g. the tag that moved.
        check_build(check, image=ResolvedImage(path=None, digest=digest, kind=kind, reference=image_ref))
    if runtime_name == "oci":
        reference = parse_oci_reference(image_ref)
        return ResolvedImage(
            path=None, digest=digest, kind=kind, reference=f"{reference.registry}/{reference.repository}@{digest}"
        )
    resolved = _resolve_remote(
        image_ref=image_ref,
        digest=digest,
        sif_cache_dir=sif_cache_dir,
        runtime_name=runtime_name,
        pull=pull or apptainer_pull,
    )
    return ResolvedImage(path=resolved.path, digest=digest, kind=resolved.kind)


def _no_pull(image_ref: str, destination: Path) -> None:
    raise AssertionError(f"not pulled: {image_ref}")


def _resolve(
    *,
    image_ref: str,
    image_digest: str | None,
    sif_cache_dir: Path,
    runtime_name: str,
    pull: PullFunction | None,
    base_dir: Path | None,
) -> ResolvedImage:
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
            pull(_pull_reference(image_ref, digest), pulled)
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


def _pull_reference(image_ref: str, digest: str) -> str:
    """What to pull: an OCI reference by its digest (a tag can have moved since the digest was recorded)."""
    if image_ref.startswith(("docker://", "oras://")):
        reference = parse_oci_reference(image_ref)
        scheme = image_ref.partition("://")[0]
        return f"{scheme}://{reference.registry}/{reference.repository}@{digest}"
    return image_ref


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    # O_NOFOLLOW: a file listed as regular is never read through a link swapped in since.
    with os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW), "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- digests


def sif_digest(path: Path, *, cache_dir: Path | None = None, now: Callable[[], float] = time.time) -> str:
    """``sha256:<hex>`` of a SIF file's bytes; with ``cache_dir``, cached by (mtime, ctime, size, inode) as a tree's
    files are, so a multi-gigabyte image is read once, not before every submit."""
    path = Path(path)
    started = now()
    info = os.stat(path)
    key = [info.st_mtime_ns, info.st_ctime_ns, info.st_size, info.st_ino]
    cache_file = _tree_cache_file(path, cache_dir) if cache_dir is not None else None
    cached = _load_tree_cache(cache_file).get(".") if cache_file is not None else None
    if cached is not None and cached[:4] == key:
        return "sha256:" + str(cached[4])
    file_hash = _sha256_of(path)
    if cache_file is not None and max(info.st_mtime_ns, info.st_ctime_ns) / 1e9 < started - _RACY_SECONDS:
        _store_tree_cache(cache_file, {".": [*key, file_hash]})
    return "sha256:" + file_hash


def image_digest_of(image: ResolvedImage, *, image_ref: str, cache_dir: Path | None = None) -> str:
    """The digest of a resolved image: a SIF's sha256, a directory's tree digest, a remote image's registry digest.

    A remote image resolves to its cached SIF, but what identifies it is the registry digest it was pulled by.
    """
    if image_ref.startswith(REMOTE_SCHEMES):
        return oci_reference_digest(image_ref, declared=image.digest)
    if image.path is None:
        raise ImageError(f"image {image.location} is not on this host; its digest is its registry digest")
    if image.kind is ImageKind.SIF:
        return sif_digest(image.path, cache_dir=cache_dir)
    return tree_digest(image.path, cache_dir=cache_dir)


def tree_digest(root: Path, *, cache_dir: Path | None = None, now: Callable[[], float] = time.time) -> str:
    """A deterministic ``sha256:<hex>`` over every entry under ``root`` (``root`` itself excluded).

    Each entry contributes its kind (d, f, l, or o for special files), permission bits, its path relative to
    ``root`` (bytes, length-prefixed, so no name can imitate another entry) and, for a file, the sha256 of its
    contents, for a symlink its target as written (never followed). Entries are taken in byte order of their
    paths, so the digest does not depend on the order the file system lists them in. Directories named
    ``__pycache__`` are skipped. With ``cache_dir``, file hashes are cached per tree by (path, mtime, ctime,
    size, inode): an unchanged tree costs one ``lstat`` per entry.
    """
    root = Path(root)
    started = now()
    cache_file = _tree_cache_file(root, cache_dir) if cache_dir is not None else None
    cached = _load_tree_cache(cache_file) if cache_file is not None else {}
    fresh: dict[str, list[object]] = {}
    digest = hashlib.sha256(TREE_DIGEST_FORMAT.encode() + b"\n")
    racy_ns = (started - _RACY_SECONDS) * 1e9
    for relative, info in _walk_tree(root):
        name = relative.decode("utf-8", "surrogateescape")  # os.fsdecode's rule, without its per-call checks
        mode = stat.S_IMODE(info.st_mode)
        if stat.S_ISDIR(info.st_mode):
            kind, content = b"d", b""
        elif stat.S_ISLNK(info.st_mode):
            kind, content = b"l", os.fsencode(os.readlink(root / name))
        elif stat.S_ISREG(info.st_mode):
            key = [info.st_mtime_ns, info.st_ctime_ns, info.st_size, info.st_ino]
            entry = cached.get(name)
            if entry is not None and entry[:4] == key:
                file_hash = str(entry[4])
            else:
                file_hash = _sha256_of(root / name)
            if info.st_mtime_ns < racy_ns and info.st_ctime_ns < racy_ns:
                fresh[name] = [*key, file_hash]
            kind, content = b"f", file_hash.encode()
        else:
            kind, content = b"o", b""
        digest.update(b"%s %04o %d:%s %d:%s\n" % (kind, mode, len(relative), relative, len(content), content))
    if cache_file is not None and fresh != cached:
        _store_tree_cache(cache_file, fresh)
    return "sha256:" + digest.hexdigest()


def _walk_tree(root: Path) -> list[tuple[bytes, os.stat_result]]:
    """(relative path as bytes, lstat) of every entry under ``root``, sorted by path bytes."""
    found: list[tuple[bytes, os.stat_result]] = []
    base = os.fsencode(root)
    cut = len(base) + 1
    skipped = {os.fsencode(name) for name in TREE_DIGEST_SKIPPED_DIRS}
    pending = [base]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                info = entry.stat(follow_symlinks=False)
                if stat.S_ISDIR(info.st_mode):
                    if entry.name in skipped:
                        continue
                    pending.append(entry.path)
                found.append((entry.path[cut:], info))
    found.sort(key=lambda item: item[0])
    return found


def _tree_cache_file(root: Path, cache_dir: Path) -> Path:
    return Path(cache_dir) / (hashlib.sha256(os.fsencode(os.path.abspath(root))).hexdigest()[:32] + ".json")


def _load_tree_cache(path: Path) -> dict[str, list[object]]:
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(document, dict) or document.get("format") != TREE_DIGEST_FORMAT:
        return {}
    files = document.get("files")
    return files if isinstance(files, dict) else {}


def _store_tree_cache(path: Path, files: dict[str, list[object]]) -> None:
    """Write the cache atomically; a cache that cannot be written only costs a re-hash next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, scratch = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(handle, "w") as out:
            json.dump({"format": TREE_DIGEST_FORMAT, "files": files}, out)
        os.replace(scratch, path)
    except OSError as error:
        log.warning("could not write the tree digest cache %s: %s", path, error)


# Reference grammar of the OCI distribution spec: [registry/]repository[:tag][@algorithm:hex].
_OCI_REFERENCE = re.compile(
    r"^(?P<name>[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?::[0-9]+)?(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*)"
    r"(?::(?P<tag>[\w][\w.-]{0,127}))?(?:@(?P<digest>sha256:[0-9a-f]{64}))?$"
)


@dataclass(frozen=True)
class OciReference:
    """A parsed ``docker://`` / ``oras://`` reference, normalised as the distribution spec does."""

    registry: str
    repository: str
    tag: str | None
    digest: str | None

    @property
    def pinned(self) -> str:
        """The reference by digest (``registry/repository@sha256:…``): what a pull must use to get this image."""
        if self.digest is None:
            raise ImageError(f"{self.registry}/{self.repository}:{self.tag} pins no digest")
        return f"{self.registry}/{self.repository}@{self.digest}"


def parse_oci_reference(image_ref: str) -> OciReference:
    """Split ``docker://[registry/]repository[:tag][@sha256:…]`` (or ``oras://``); Docker Hub names normalised."""
    scheme, sep, rest = image_ref.partition("://")
    if not sep or scheme not in ("docker", "oras"):
        raise ImageError(f"{image_ref!r} is not an OCI reference; expected docker://… or oras://…")
    match = _OCI_REFERENCE.match(rest)
    if match is None:
        raise ImageError(
            f"{image_ref!r} is not a valid OCI reference; expected [registry/]repository[:tag][@sha256:<64 hex>] "
            "in lower case"
        )
    name, tag, digest = match.group("name"), match.group("tag"), match.group("digest")
    if "/" not in name and ":" in name and tag is None:
        # "debian:12": a numeric tag, not a registry port (a port is followed by a repository path).
        name, _, tag = name.partition(":")
    first, slash, remainder = name.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        registry, repository = first, remainder
    else:
        registry, repository = "docker.io", name
        if "/" not in repository:
            repository = "library/" + repository
    if registry == "index.docker.io":
        registry = "docker.io"
    return OciReference(
        registry=registry, repository=repository, tag=tag or (None if digest else "latest"), digest=digest
    )


def oci_manifest_digest(manifest: bytes) -> str:
    """The digest a registry gives a manifest: sha256 over its exact bytes (OCI image spec, descriptors)."""
    return "sha256:" + hashlib.sha256(manifest).hexdigest()


def oci_reference_digest(image_ref: str, *, declared: str | None) -> str:
    """The registry digest of a remote image: the one the reference pins, else the declared ``image_digest``.

    A tag alone names nothing fixed (it can be moved), so a remote image without either is refused; a pin that
    disagrees with the declared digest is refused too.
    """
    pinned: str | None = None
    if image_ref.startswith(("docker://", "oras://")):
        pinned = parse_oci_reference(image_ref).digest
    elif "@sha256:" in image_ref:
        pinned = normalise_image_digest(image_ref.rpartition("@")[2])
    declared_digest = None if declared is None else normalise_image_digest(declared)
    if pinned is not None and declared_digest is not None and pinned != declared_digest:
        raise ImageError(
            f"image_ref {image_ref!r} pins {pinned} but image_digest is {declared_digest}; make them agree"
        )
    digest = pinned or declared_digest
    if digest is None:
        raise ImageError(
            f"image_ref {image_ref!r} names no digest; pin it (…@sha256:<64 hex>) or set image_digest, the "
            "registry digest shown by 'skopeo inspect' or 'crane digest'"
        )
    return digest


def remote_image_digest(
    image_ref: str, *, declared: str | None, registry: RegistryClient | None = None, ask_registry: bool = True
) -> str:
    """The digest of a remote image: its pin; else what the registry gives its tag now; else the declared one.

    An OCI reference (``docker://``, ``oras://``) that pins no digest names a tag, which can be moved: with
    ``ask_registry`` the registry is asked, so a moved tag is seen (and ``check_build`` compares the answer
    with the declared or recorded digest). Without it, or when the registry cannot answer but a digest is
    declared, the declared digest is used (it names one fixed image; the warning says the tag went unchecked).
    Other remote references need a pin or a declared digest (``oci_reference_digest``).
    """
    is_oci = image_ref.startswith(("docker://", "oras://"))
    if not is_oci or parse_oci_reference(image_ref).digest is not None or not ask_registry:
        return oci_reference_digest(image_ref, declared=declared)
    if registry is None:
        from ccat_dagster.execution.registry import registry_client_from_environment

        registry = registry_client_from_environment()
    try:
        return registry.manifest_digest(parse_oci_reference(image_ref))
    except ImageError as error:
        if declared is None:
            raise
        log.warning("%s; using the declared image_digest %s without checking the tag", error, declared)
        return normalise_image_digest(declared)


# ---------------------------------------------------------------------------------------------- builds


def check_build(check: BuildCheck, *, image: ResolvedImage) -> int:
    """Record ``image.digest`` as the version's first build, or check it against the newest recorded build.

    Returns the build number. Raises ``ImageChangedError`` (policy refuse: nothing written) or
    ``ImageRebuiltError`` (policy new_build, after committing the change as the next build) when they differ.
    One transaction with the version row locked, so two workers using a version for the first time at once
    record one build.
    """
    if image.digest is None:
        raise ImageError(f"image {image.location} has no digest to check")
    policy = check.policy or ImageChangePolicy(image_change_policy())
    label = f"{check.software} {check.version}"
    rebuilt: ImageRebuiltError | None = None
    with session_scope(check.engine) as session:
        version = session.scalars(
            select(m.ReductionSoftwareVersion)
            .join(m.ReductionSoftware)
            .where(m.ReductionSoftware.name == check.software, m.ReductionSoftwareVersion.version == check.version)
            .with_for_update(of=m.ReductionSoftwareVersion)
        ).one_or_none()
        if version is None:
            raise ImageError(f"software {label} is not registered in ops-db; apply the pipeline file that declares it")
        latest = session.scalars(
            select(m.ReductionSoftwareBuild)
            .where(m.ReductionSoftwareBuild.reduction_software_version_id == version.id)
            .order_by(m.ReductionSoftwareBuild.build.desc())
            .limit(1)
        ).one_or_none()
        expected = latest.image_digest if latest is not None else version.image_digest
        if expected is None or expected == image.digest:
            number = latest.build if latest is not None else _add_build(session, version, 1, image)
        else:
            was = (
                f"build {latest.build}, recorded {latest.recorded_at:%Y-%m-%d %H:%M} UTC"
                if latest is not None
                else "the image_digest declared for it"
            )
            if policy is ImageChangePolicy.REFUSE:
                raise ImageChangedError(
                    f"the image of software {label} ({image.location}) changed: it was {expected} ({was}), it is now "
                    f"{image.digest}. A changed image needs a new version: give it one (e.g. bump the patch "
                    "number) in the pipeline file and apply it, or restore the image; or set "
                    "CCAT_WORKFLOW_MANAGER_IMAGE_CHANGE_POLICY=new_build to register it as a new build of "
                    f"{check.version} (its sub-groups are then all planned again)"
                )
            number = _add_build(session, version, (latest.build if latest is not None else 0) + 1, image)
            # The new digest enters every input fingerprint from now on: products of the new build are new products.
            version.image_digest = image.digest
            log.warning("software %s: image changed to %s, registered as build %s", label, image.digest, number)
            rebuilt = ImageRebuiltError(
                f"the image of software {label} ({image.location}) changed from {expected} ({was}) to {image.digest}; "
                f"registered as build {number} (IMAGE_CHANGE_POLICY=new_build). This attempt was planned with "
                "the earlier build and is not run; the next evaluation plans its sub-group again with the new "
                "fingerprint"
            )
        if check.attempt_id is not None and rebuilt is None:
            attempt = session.get(m.ExecutedReductionStep, check.attempt_id)
            if attempt is not None:
                attempt.image_digest = image.digest
    if rebuilt is not None:
        raise rebuilt  # after the commit: the attempt fails, the new build stays
    return number


def recorded_builds(engine: Engine, *, software: str, version: str) -> list[m.ReductionSoftwareBuild]:
    """The builds of one software version, oldest first."""
    with session_scope(engine) as session:
        return list(
            session.scalars(
                select(m.ReductionSoftwareBuild)
                .join(m.ReductionSoftwareVersion)
                .join(m.ReductionSoftware)
                .where(m.ReductionSoftware.name == software, m.ReductionSoftwareVersion.version == version)
                .order_by(m.ReductionSoftwareBuild.build)
            )
        )


def _add_build(session: Session, version: m.ReductionSoftwareVersion, number: int, image: ResolvedImage) -> int:
    session.add(
        m.ReductionSoftwareBuild(
            reduction_software_version_id=version.id,
            build=number,
            image_digest=image.digest,
            image_kind=image.kind.value,
            image_path=image.location,
        )
    )
    return number
