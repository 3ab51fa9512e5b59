"""Which ReductionSoftwareVersion a step runs: its ``version_spec`` read under its ``version_policy``.

``exact``: the registered version equal to version_spec. ``compatible``: the newest registered version with
the same major version (the same major.minor while the major is 0, as semver's caret range), at least
version_spec. ``latest``: the newest registered version. Pre-releases are only chosen when named exactly.
Equal precedence (versions differing only in ``+build``) is broken by registration order, newest first.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from ccat_dagster.errors import CcatError
from ccat_dagster.opsdb.enums import VersionPolicy
from ccat_dagster.opsdb.models import ReductionSoftwareVersion, ReductionStep
from ccat_dagster.pipelines.spec import parse_semver

__all__ = ["SoftwareVersionError", "choose_version", "resolve_software_version"]


class SoftwareVersionError(CcatError, LookupError):
    """No registered software version satisfies a step's version_spec and version_policy."""


def choose_version(
    versions: Sequence[ReductionSoftwareVersion], *, version_spec: str, policy: VersionPolicy
) -> ReductionSoftwareVersion | None:
    """The version ``policy`` picks for ``version_spec`` among ``versions`` (of one software), or None."""
    wanted = parse_semver(version_spec)
    candidates = []
    for row in versions:
        try:
            key = parse_semver(row.version)
        except ValueError:
            continue  # a row registered outside the YAML path with a non-semver version: never chosen
        is_prerelease = key[3] != ((2, 0),)
        if policy is VersionPolicy.EXACT:
            ok = row.version == version_spec
        elif is_prerelease and row.version != version_spec:
            ok = False
        elif policy is VersionPolicy.COMPATIBLE:
            same_line = key[0] == wanted[0] and (wanted[0] != 0 or key[1] == wanted[1])
            ok = same_line and key >= wanted
        else:
            ok = True
        if ok:
            candidates.append((key, row.id or 0, row))
    if not candidates:
        return None
    return max(candidates, key=lambda item: (item[0], item[1]))[2]


def resolve_software_version(session: Session, *, step: ReductionStep) -> ReductionSoftwareVersion:
    """The version ``step`` runs now. Raises SoftwareVersionError naming the registered versions."""
    versions = session.scalars(
        select(ReductionSoftwareVersion).where(
            ReductionSoftwareVersion.reduction_software_id == step.reduction_software_id
        )
    ).all()
    chosen = choose_version(versions, version_spec=step.version_spec, policy=step.version_policy)
    if chosen is None:
        registered = ", ".join(sorted((v.version for v in versions), key=_sort_key)) or "none"
        raise SoftwareVersionError(
            f"step {step.name!r}: no version of software {step.software.name!r} satisfies "
            f"{step.version_policy.value} {step.version_spec} (registered: {registered}); apply a pipeline "
            "file that declares such a version"
        )
    return chosen


def _sort_key(version: str) -> tuple[object, ...]:
    try:
        return (0, parse_semver(version))
    except ValueError:
        return (1, version)
