"""Input fingerprints and software version resolution. Pure functions, no database."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ccat_dagster.errors import CcatError

# Version 2 hashes content (package checksums, upstream products' sha256 with the path a container reads them
# at), never database ids: an upstream re-run that reproduces identical bytes leaves its consumers up to date.
# Migration 0006 rewrote the version-1 fingerprints of existing attempts from their recorded inputs.
FINGERPRINT_VERSION = "ccat-fp-2"


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def config_sha256(parameters: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(parameters).encode()).hexdigest()


def input_fingerprint(
    *,
    packages: Iterable[tuple[str, str]],
    upstream_products: Iterable[tuple[str, str, str, str]],
    software_version: str,
    image_digest: str | None,
    config_sha: str,
) -> str:
    """The hash that decides whether a step's sub-group needs (re)processing.

    ``packages`` are (RawDataPackage name, checksum) pairs; ``upstream_products`` are (upstream step name,
    upstream sub_group_key, relative path, sha256) of the products the step reads: where a container finds a
    file and what is in it, not which database row describes it. Order does not matter; any change to the
    inputs' content, the resolved software version, its image digest or the step config gives a different
    fingerprint, and a re-run upstream that writes the same bytes gives the same one (early cutoff).
    """
    payload = {
        "v": FINGERPRINT_VERSION,
        "packages": sorted([str(name), checksum] for name, checksum in packages),
        "products": sorted([str(step), str(key), str(path), sha] for step, key, path, sha in upstream_products),
        "software": software_version,
        "image_digest": image_digest or "",
        "config": config_sha,
    }
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


class VersionResolutionError(CcatError):
    """No registered software version satisfies a step's version policy."""


_SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-([0-9A-Za-z.-]+))?(?:\+[0-9A-Za-z.-]+)?$")


@dataclass(frozen=True, order=True)
class SemVer:
    major: int
    minor: int
    patch: int
    # A release sorts after its pre-releases: (1, "") > (0, "rc.1").
    release_rank: tuple[int, str]

    @classmethod
    def parse(cls, text: str) -> SemVer:
        match = _SEMVER.match(text.strip())
        if not match:
            raise VersionResolutionError(f"version {text!r} is not semantic (expected MAJOR.MINOR.PATCH, e.g. 1.2.0)")
        major, minor, patch, pre = match.groups()
        return cls(int(major), int(minor), int(patch), (0, pre) if pre else (1, ""))


def resolve_version(*, policy: str, spec: str, available: Sequence[str], software: str) -> str:
    """Pick the version a step runs with.

    - ``exact``: exactly ``spec``.
    - ``compatible``: the newest release with the same major version as ``spec`` and not older than it
      (for 0.x, the same minor), as semantic versioning promises compatibility there.
    - ``latest``: the newest registered release.
    Pre-releases are only chosen when named exactly.
    """
    if not available:
        raise VersionResolutionError(
            f"software {software!r} has no registered versions: apply a pipeline that names one"
        )
    if policy == "exact":
        if spec in available:
            return spec
        raise VersionResolutionError(
            f"software {software!r} has no version {spec!r} (policy exact); registered: {', '.join(sorted(available))}"
        )
    wanted = SemVer.parse(spec)
    releases = [(SemVer.parse(v), v) for v in available if SemVer.parse(v).release_rank[0] == 1 or v == spec]
    if policy == "latest":
        candidates = releases
    elif policy == "compatible":
        candidates = [
            (parsed, v)
            for parsed, v in releases
            if parsed.major == wanted.major and (wanted.major != 0 or parsed.minor == wanted.minor) and parsed >= wanted
        ]
    else:
        raise VersionResolutionError(f"version_policy {policy!r} is unknown: use exact, compatible or latest")
    if not candidates:
        raise VersionResolutionError(
            f"no version of {software!r} satisfies {policy} {spec!r}; registered: {', '.join(sorted(available))}"
        )
    return max(candidates)[1]
