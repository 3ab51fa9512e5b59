"""Grouping presets: named templates of filter rules and group_by, stored in ops-db (``grouping_preset``).

A pipeline YAML names a preset instead of spelling out group_by (and, optionally, extra rules); the preset's
rules are ANDed with the grouping's own rules. The built-in presets are owned by this module:
``ensure_builtin_presets`` writes them, and rewrites a built-in row that was changed by hand. Custom presets
use other names (``save_preset``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from ccat_dagster.errors import CcatError
from ccat_dagster.grouping.rules import (
    FilterRule,
    FilterRuleError,
    parse_rules,
    rules_to_json,
    validate_group_by,
)
from ccat_dagster.opsdb.models import GroupingPreset

__all__ = [
    "BUILTIN_PRESETS",
    "Preset",
    "PresetError",
    "ensure_builtin_presets",
    "get_preset",
    "list_presets",
    "save_preset",
]


class PresetError(CcatError, LookupError):
    """A preset name that ops-db does not hold, or a preset whose stored content is invalid."""


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    filter_rules: tuple[FilterRule, ...]
    group_by: tuple[str, ...]


BUILTIN_PRESETS: tuple[Preset, ...] = (
    Preset("per-scan", "one sub-group per scan (ExecutedObsUnit)", (), ("executed_obs_unit",)),
    Preset(
        "per-obs-unit",
        "one sub-group per ObsUnit (all scans of one observation definition)",
        (),
        ("obs_unit",),
    ),
    Preset("per-source", "one sub-group per source", (), ("source",)),
    Preset("per-source-line", "one sub-group per source and spectral line", (), ("source", "line")),
    Preset("per-night", "one sub-group per UTC date of the scan start", (), ("obs_date",)),
    Preset("per-module", "one sub-group per instrument module", (), ("instrument_module",)),
    Preset("everything", "one sub-group (key 'all') holding every package of the grouping", (), ()),
)


def ensure_builtin_presets(session: Session) -> list[str]:
    """Insert the built-in presets, or rewrite them where the stored row differs. Returns the names written.

    Idempotent: a second call writes nothing. Flushes, does not commit (the caller's transaction decides).
    """
    existing = {
        row.name: row
        for row in session.scalars(
            select(GroupingPreset).where(GroupingPreset.name.in_([p.name for p in BUILTIN_PRESETS]))
        )
    }
    written = []
    for preset in BUILTIN_PRESETS:
        rules, group_by = rules_to_json(preset.filter_rules), list(preset.group_by)
        row = existing.get(preset.name)
        if row is None:
            session.add(
                GroupingPreset(name=preset.name, description=preset.description, filter_rules=rules, group_by=group_by)
            )
        elif (row.description, row.filter_rules, row.group_by) != (preset.description, rules, group_by):
            row.description, row.filter_rules, row.group_by = preset.description, rules, group_by
        else:
            continue
        written.append(preset.name)
    session.flush()
    return written


def save_preset(
    session: Session, *, name: str, description: str = "", filter_rules: Any = (), group_by: Sequence[str]
) -> Preset:
    """Create or replace a custom preset after validating its rules and group_by (built-in names refused)."""
    if name in {p.name for p in BUILTIN_PRESETS}:
        raise PresetError(f"preset {name!r} is built in and cannot be replaced; choose another name")
    if not name or not name.replace("-", "").replace("_", "").isalnum():
        raise PresetError(f"preset name {name!r} is invalid: use letters, digits, - and _")
    rules = parse_rules(list(filter_rules))
    dims = validate_group_by(group_by)
    row = session.scalars(select(GroupingPreset).where(GroupingPreset.name == name)).one_or_none()
    if row is None:
        row = GroupingPreset(name=name)
        session.add(row)
    row.description, row.filter_rules, row.group_by = description, rules_to_json(rules), dims
    session.flush()
    return Preset(name, description, tuple(rules), tuple(dims))


def get_preset(session: Session, name: str) -> Preset:
    """The stored preset ``name``, validated. Raises PresetError naming the available presets."""
    row = session.scalars(select(GroupingPreset).where(GroupingPreset.name == name)).one_or_none()
    if row is None:
        stored = list(session.scalars(select(GroupingPreset.name).order_by(GroupingPreset.name)))
        if stored:
            raise PresetError(f"no grouping preset {name!r} in ops-db; available presets: {', '.join(stored)}")
        raise PresetError(
            f"no grouping preset {name!r}: ops-db holds no presets yet; install the built-in ones "
            f"({', '.join(p.name for p in BUILTIN_PRESETS)}) with `ccat-dagster groupings presets --install`"
        )
    return _from_row(row)


def list_presets(session: Session) -> list[Preset]:
    return [_from_row(row) for row in session.scalars(select(GroupingPreset).order_by(GroupingPreset.name))]


def _from_row(row: GroupingPreset) -> Preset:
    try:
        rules = parse_rules(row.filter_rules)
        dims = validate_group_by(row.group_by)
    except FilterRuleError as error:
        raise PresetError(f"grouping preset {row.name!r} stored in ops-db is invalid: {error}") from error
    return Preset(row.name, row.description, tuple(rules), tuple(dims))
