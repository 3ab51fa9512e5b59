"""Output discovery by convention (docs/container-contract.md, section 4): which files an attempt produced,
typed and checksummed.

* Final step: every regular file under ``output/<type dir>/`` (recursively) is a product of that type
  (``science/`` → science, ``qa/`` → qa_metric, ``plots/`` → plot, ``statistics/`` → statistics,
  ``logs/`` → log).
* Intermediate step: every regular file under ``workspace/<step>/`` is an ``intermediate`` product.

Refused, all listed in one ``OutputContractError``: every symbolic link (wherever it points: a link is
never needed to deliver a file, and refusing all of them means no link can smuggle a path outside the
run's directories into the ops-db), files directly in ``output/`` or in an unknown directory there,
special files (FIFO, socket, device), names that are not valid UTF-8 or hold control characters, and an
attempt that wrote no file at all. On refusal nothing of the attempt is to be registered.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from ccat_dagster.execution.contract import (
    INTERMEDIATE_PRODUCT_TYPE,
    OUTPUT_TYPE_DIRS,
    AttemptLayout,
    ContainerContractError,
    OutputContractError,
    OutputProblem,
    validate_path_component,
)

_HASH_CHUNK_BYTES = 1 << 20
_ALLOWED_DIRS = ", ".join(f"{name}/" for name in OUTPUT_TYPE_DIRS)


@dataclass(frozen=True)
class DiscoveredProduct:
    """One product file; ``relative_path`` is POSIX, relative to output/ (final) or workspace/<step>/."""

    relative_path: str
    product_type: str
    size: int
    sha256: str
    host_path: Path


@dataclass(frozen=True)
class _Candidate:
    relative_path: str
    product_type: str
    host_path: Path


def discover_products(*, layout: AttemptLayout, max_products: int | None = None) -> list[DiscoveredProduct]:
    """The products of the attempt described by ``layout``, sorted by relative path.

    Raises OutputContractError listing every offending path (relative to the output root) when the output
    breaks the contract; the checksums are only computed when the structure is acceptable. More than
    ``max_products`` files is refused too, before any is read.
    """
    root = layout.products_dir
    summary = (
        f"step {layout.step!r} (sub-group {layout.sub_group_key!r}, attempt {layout.attempt_id!r}) broke the "
        f"output contract in {root}; nothing of this attempt may be registered. Offending paths:"
    )
    if root.is_symlink() or not root.is_dir():
        raise OutputContractError(
            summary=summary,
            problems=[OutputProblem(".", "the output directory is missing or not a directory")],
        )

    problems: list[OutputProblem] = []
    candidates: list[_Candidate] = []
    if layout.is_final:
        for entry in _entries(root, relative=".", problems=problems):
            relative = entry.name
            if _refused(entry, relative=relative, problems=problems):
                continue
            if entry.is_dir(follow_symlinks=False):
                product_type = OUTPUT_TYPE_DIRS.get(entry.name)
                if product_type is None:
                    problems.append(
                        OutputProblem(
                            f"{relative}/",
                            f"unknown output directory; final products go under one of {_ALLOWED_DIRS}",
                        )
                    )
                else:
                    _walk(
                        Path(entry.path),
                        prefix=relative,
                        product_type=product_type,
                        into=candidates,
                        problems=problems,
                    )
            else:
                problems.append(
                    OutputProblem(relative, f"file directly in output/; put it under one of {_ALLOWED_DIRS}")
                )
        if not candidates and not problems:
            problems.append(
                OutputProblem(".", f"the final step wrote no file; it must write its products under {_ALLOWED_DIRS}")
            )
    else:
        _walk(root, prefix="", product_type=INTERMEDIATE_PRODUCT_TYPE, into=candidates, problems=problems)
        if not candidates and not problems:
            problems.append(
                OutputProblem(".", "the step wrote no file; an intermediate step must write to WORKFLOW_OUTPUT_DIR")
            )
    if max_products is not None and len(candidates) > max_products:
        problems.append(
            OutputProblem(
                ".",
                f"{len(candidates)} files, more than the limit of {max_products} products per attempt "
                "(CCAT_WORKFLOW_MANAGER_MAX_PRODUCTS_PER_ATTEMPT); write fewer, larger products (e.g. one archive)",
            )
        )
    if problems:
        raise OutputContractError(summary=summary, problems=problems)

    products = []
    for candidate in sorted(candidates, key=lambda c: c.relative_path):
        try:
            size, sha256 = _size_and_sha256(candidate.host_path)
        except (OSError, ValueError) as exc:
            problems.append(OutputProblem(candidate.relative_path, f"cannot be read: {exc}"))
            continue
        products.append(
            DiscoveredProduct(
                relative_path=candidate.relative_path,
                product_type=candidate.product_type,
                size=size,
                sha256=sha256,
                host_path=candidate.host_path,
            )
        )
    if problems:
        raise OutputContractError(summary=summary, problems=problems)
    return products


def _entries(directory: Path, *, relative: str, problems: list[OutputProblem]) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(directory) as iterator:
            return sorted(iterator, key=lambda entry: entry.name)
    except OSError as exc:
        problems.append(OutputProblem(f"{relative}/", f"directory cannot be read: {exc.strerror or exc}"))
        return []


def _refused(entry: os.DirEntry[str], *, relative: str, problems: list[OutputProblem]) -> bool:
    """Record why ``entry`` can be neither a product nor a directory of products; True if refused."""
    try:
        entry.name.encode("utf-8")
    except UnicodeEncodeError:
        problems.append(OutputProblem(relative, "file name is not valid UTF-8; use UTF-8 names"))
        return True
    try:
        validate_path_component(entry.name, "file name")
    except ContainerContractError as exc:
        problems.append(OutputProblem(relative, str(exc)))
        return True
    if entry.is_symlink():
        try:
            target = os.readlink(entry.path)
        except OSError:
            target = "?"
        problems.append(
            OutputProblem(relative, f"symbolic link to {target!r}; links are refused, write the file itself")
        )
        return True
    if entry.is_dir(follow_symlinks=False) or entry.is_file(follow_symlinks=False):
        return False
    problems.append(OutputProblem(relative, f"{_special_kind(entry)}; only regular files can be products"))
    return True


def _walk(
    directory: Path, *, prefix: str, product_type: str, into: list[_Candidate], problems: list[OutputProblem]
) -> None:
    for entry in _entries(directory, relative=prefix or ".", problems=problems):
        relative = f"{prefix}/{entry.name}" if prefix else entry.name
        if _refused(entry, relative=relative, problems=problems):
            continue
        if entry.is_dir(follow_symlinks=False):
            _walk(Path(entry.path), prefix=relative, product_type=product_type, into=into, problems=problems)
        else:
            into.append(_Candidate(relative_path=relative, product_type=product_type, host_path=Path(entry.path)))


def _special_kind(entry: os.DirEntry[str]) -> str:
    try:
        mode = entry.stat(follow_symlinks=False).st_mode
    except OSError:
        return "special file"
    if stat.S_ISFIFO(mode):
        return "named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device file"
    return "special file"


def _size_and_sha256(path: Path) -> tuple[int, str]:
    # O_NOFOLLOW: the file was a regular file when listed; never follow a link swapped in since.
    descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    with os.fdopen(descriptor, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ValueError("no longer a regular file")
        digest = hashlib.sha256()
        while chunk := handle.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return info.st_size, digest.hexdigest()
