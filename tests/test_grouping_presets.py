"""Grouping presets stored in ops-db: built-ins installed idempotently, looked up by name, validated."""

# ruff: noqa: F811 - pytest fixtures are imported by name and then requested as parameters

from __future__ import annotations

import pytest
from sqlalchemy import select

from ccat_dagster.grouping.engine import resolve
from ccat_dagster.grouping.presets import (
    BUILTIN_PRESETS,
    PresetError,
    ensure_builtin_presets,
    get_preset,
    list_presets,
    save_preset,
)
from ccat_dagster.grouping.rules import FilterRuleError
from ccat_dagster.opsdb import models as m

from .grouping_fixtures import db_session, grouping_db  # noqa: F401 - fixtures

pytestmark = pytest.mark.postgres


def test_builtin_presets_are_installed_once(db_session):
    assert {"per-scan", "per-source-line", "per-night", "everything"} <= {p.name for p in BUILTIN_PRESETS}
    with pytest.raises(PresetError, match="holds no presets yet.*groupings presets --install"):
        get_preset(db_session, "per-scan")
    assert ensure_builtin_presets(db_session) == [p.name for p in BUILTIN_PRESETS]
    assert ensure_builtin_presets(db_session) == []
    rows = db_session.scalars(select(m.GroupingPreset)).all()
    assert len(rows) == len(BUILTIN_PRESETS)
    assert get_preset(db_session, "per-source-line").group_by == ("source", "line")
    assert get_preset(db_session, "everything").group_by == ()
    assert get_preset(db_session, "per-scan").group_by == ("executed_obs_unit",)
    assert get_preset(db_session, "per-night").group_by == ("obs_date",)


def test_a_changed_builtin_row_is_restored(db_session):
    ensure_builtin_presets(db_session)
    row = db_session.scalars(select(m.GroupingPreset).where(m.GroupingPreset.name == "per-night")).one()
    row.group_by = ["source"]
    db_session.flush()
    assert ensure_builtin_presets(db_session) == ["per-night"]
    assert get_preset(db_session, "per-night").group_by == ("obs_date",)


def test_unknown_preset_lists_the_available_names(db_session):
    ensure_builtin_presets(db_session)
    with pytest.raises(PresetError) as info:
        get_preset(db_session, "per-scans")
    assert "no grouping preset 'per-scans'" in str(info.value)
    assert "everything, per-module, per-night, per-obs-unit, per-scan, per-source, per-source-line" in str(info.value)


def test_custom_presets_are_validated_and_usable(grouping_db, db_session):
    rules = [{"table": "ObsUnit", "column": "line_id", "operator": "eq", "value": "CO43"}]
    saved = save_preset(db_session, name="co43-per-source", filter_rules=rules, group_by=["source"])
    preset = get_preset(db_session, "co43-per-source")
    assert preset == saved and preset.filter_rules[0].value == "CO43"
    keys = [g.key for g in resolve(db_session, filter_rules=preset.filter_rules, group_by=preset.group_by)]
    assert keys == ["source=NGC253", "source=Orion-KL", "source=ngc253"]
    with pytest.raises(FilterRuleError, match="'night' is not a dimension"):
        save_preset(db_session, name="bad", group_by=["night"])
    with pytest.raises(FilterRuleError, match="unknown operator"):
        save_preset(db_session, name="bad", filter_rules=[{**rules[0], "operator": "=="}], group_by=[])
    with pytest.raises(PresetError, match="built in"):
        save_preset(db_session, name="per-scan", group_by=["source"])
    with pytest.raises(PresetError, match="name 'a b' is invalid"):
        save_preset(db_session, name="a b", group_by=[])


def test_an_invalid_stored_preset_is_reported_by_name(db_session):
    db_session.add(m.GroupingPreset(name="hand-edited", filter_rules=[], group_by=["nights"]))
    db_session.flush()
    with pytest.raises(PresetError, match="preset 'hand-edited' stored in ops-db is invalid: .*'nights'"):
        get_preset(db_session, "hand-edited")
    with pytest.raises(PresetError):
        list_presets(db_session)
