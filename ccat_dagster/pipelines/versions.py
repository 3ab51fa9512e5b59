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
from ccat_dagster.execution.fingerprint import VersionResolutionError, resolve_version
from ccat_dagster.opsdb.enums import VersionPolicy
from ccat_dagster.opsdb.models import ReductionSoftwareVersion, ReductionStep
from ccat_dagster.pipelines.spec import parse_semver

__all__ = ["SoftwareVersionError", "choose_version", "resolve_software_version"]


class SoftwareVersionError(CcatError, LookupError):
    """No registered software version satisfies a step's version_spec and version_policy."""


def choose_version(
    versions: Sequence[ReductionSoftwareVersion], *, version_spec: str, policy: VersionPolicy
) -> ReductionSoftwareVersion | None:
    """The version ``policy`` picks for ``version_spec`` among ``versions`` (of one software), or None.

    The policy itself lives in ``ccat_dagster.execution.fingerprint.resolve_version``, which the planner uses
    at run time too, so what ``apply`` shows and what runs can never disagree.
    """
    usable: dict[str, ReductionSoftwareVersion] = {}
    for row in versions:
        try:
            parse_semver(row.version)
        except ValueError:
            continue  # a row registered outside the YAML path with a non-semver version: never chosen
        usable[row.version] = row
    if policy is VersionPolicy.EXACT:
        return usable.get(version_spec)
    try:
        chosen = resolve_version(policy=policy.value, spec=version_spec, available=list(usable), software="")
    except VersionResolutionError:
        return None
    return usable[chosen]


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
