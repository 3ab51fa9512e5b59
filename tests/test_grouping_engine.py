"""The filter engine on PostgreSQL and SQLite: operators, dimensions, one bound statement, touched groups.

Each result is compared with ``reference_resolve`` (plain Python over all rows, the documented semantics) and,
for the cases a reader should be able to check by eye, with hand-written expectations.
"""

# ruff: noqa: F811 - pytest fixtures are imported by name and then requested as parameters

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import event, inspect, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from ccat_dagster.grouping.catalog import DIMENSIONS
from ccat_dagster.grouping.engine import compile_query, compile_touched_query, resolve, resolve_touched
from ccat_dagster.grouping.keys import decode_sub_group_key
from ccat_dagster.grouping.rules import OPERATORS, FilterRuleError, GroupByError, parse_rules
from ccat_dagster.opsdb import models as m
from ccat_dagster.opsdb.enums import SourceKind

from .grouping_fixtures import (  # noqa: F401 - fixtures
    WEIRD_LINE,
    WEIRD_SOURCE,
    as_tuples,
    build_world,
    create_grouping_pg_database,
    db_session,
    drop_grouping_pg_database,
    grouping_db,
    reference_resolve,
)

pytestmark = pytest.mark.postgres


def rule(table, column, operator, value, json_path=None):
    data = {"table": table, "column": column, "operator": operator, "value": value}
    if json_path is not None:
        data["json_path"] = json_path
    return data


def names(grouping_db, ids):
    by_id = {v: k for k, v in grouping_db.world.packages.items()}
    return sorted(by_id[i] for i in ids)


def members(session, grouping_db, rules, **kwargs):
    sub_groups = resolve(session, filter_rules=rules, group_by=[], **kwargs)
    return names(grouping_db, sub_groups[0].package_ids) if sub_groups else []


# Archived, valid packages of the world: pkg-01..05, pkg_06%, pkg-07..10 (pkg-11..14 are waiting, failed,
# invalidated, transferring).
OPERATOR_CASES = [
    # (rules, expected member names) — together they use every operator on every column kind.
    ([rule("Source", "name", "eq", "NGC253")], ["pkg-01", "pkg-02", "pkg-03", "pkg-04"]),
    ([rule("Source", "name", "eq", "ngc253")], ["pkg-05"]),
    (
        [rule("Source", "name", "neq", "NGC253")],
        ["pkg-05", "pkg-07", "pkg-08", "pkg-09", "pkg-10", "pkg_06%"],
    ),
    ([rule("Source", "name", "in", ["Orion-KL", WEIRD_SOURCE])], ["pkg-08", "pkg-09", "pkg-10", "pkg_06%"]),
    ([rule("Source", "name", "not_in", ["NGC253", "ngc253", "Orion-KL"])], ["pkg-07", "pkg-08", "pkg-09"]),
    ([rule("Source", "name", "like", "NGC%")], ["pkg-01", "pkg-02", "pkg-03", "pkg-04"]),
    ([rule("Source", "name", "like", "%o%")], ["pkg-10", "pkg_06%"]),
    ([rule("Source", "name", "gt", "Orion-KL")], ["pkg-05", "pkg-08", "pkg-09"]),
    ([rule("Source", "name", "gte", "Orion-KL")], ["pkg-05", "pkg-08", "pkg-09", "pkg-10", "pkg_06%"]),
    ([rule("Source", "name", "lt", "Jupiter")], []),
    ([rule("Source", "name", "lte", "NGC253")], ["pkg-01", "pkg-02", "pkg-03", "pkg-04", "pkg-07"]),
    ([rule("RawDataPackage", "name", "like", "pkg\\_06\\%")], ["pkg_06%"]),
    ([rule("RawDataPackage", "name", "like", "pkg_0_")], [f"pkg-0{i}" for i in (1, 2, 3, 4, 5, 7, 8, 9)]),
    ([rule("ObsUnit", "line_id", "eq", None)], ["pkg-07"]),
    (
        [rule("ObsUnit", "line_id", "neq", None)],
        ["pkg-01", "pkg-02", "pkg-03", "pkg-04", "pkg-05", "pkg-08", "pkg-09", "pkg-10", "pkg_06%"],
    ),
    ([rule("ObsUnit", "line_id", "neq", "CO43")], ["pkg-04", "pkg-07", "pkg-08", "pkg-09"]),
    ([rule("ObsUnit", "line_id", "not_in", ["CO43", "CII"])], ["pkg-07", "pkg-08", "pkg-09"]),
    ([rule("RawDataPackage", "size_bytes", "gt", 500)], ["pkg-07", "pkg-08", "pkg-09", "pkg-10", "pkg_06%"]),
    (
        [rule("RawDataPackage", "size_bytes", "gte", 500), rule("RawDataPackage", "size_bytes", "lte", 700)],
        ["pkg-05", "pkg-07", "pkg_06%"],
    ),
    ([rule("RawDataPackage", "size_bytes", "lt", 200)], ["pkg-01"]),
    ([rule("RawDataPackage", "size_bytes", "in", [100, 900, 1100])], ["pkg-01", "pkg-09"]),
    (
        [rule("RawDataPackage", "size_bytes", "not_in", [100, 200, 300, 400, 500])],
        ["pkg-07", "pkg-08", "pkg-09", "pkg-10", "pkg_06%"],
    ),
    ([rule("RawDataPackage", "state", "eq", "waiting")], []),
    ([rule("ExecutedObsUnit", "status", "neq", "completed")], ["pkg_06%"]),
    ([rule("ExecutedObsUnit", "status", "like", "fail%")], ["pkg_06%"]),
    ([rule("Source", "kind", "in", ["solar_system", "constant_elevation"])], ["pkg-07", "pkg-08", "pkg-09"]),
    ([rule("Instrument", "available", "eq", False)], ["pkg-09"]),
    ([rule("Instrument", "available", "neq", True)], ["pkg-09"]),
    (
        [rule("ExecutedObsUnit", "start_time", "gte", "2026-10-03")],
        ["pkg-07", "pkg-08", "pkg-09", "pkg-10", "pkg_06%"],
    ),
    (
        [rule("ExecutedObsUnit", "start_time", "lt", "2026-10-02T00:00:00+00:00")],
        ["pkg-01", "pkg-02", "pkg-03"],
    ),
    ([rule("ExecutedObsUnit", "start_time", "eq", "2026-10-04T01:30:00+05:00")], ["pkg-10"]),
    ([rule("ExecutedObsUnit", "end_time", "eq", None)], ["pkg-07"]),
    (
        [rule("ExecutedObsUnit", "end_time", "gt", "2026-10-03T00:00:00Z")],
        ["pkg-08", "pkg-09", "pkg-10", "pkg_06%"],
    ),
    ([rule("ExecutedObsUnit", "id", "eq", str(uuid.UUID(int=1, version=4)))], ["pkg-01", "pkg-02"]),
    (
        [rule("RawDataPackage", "executed_obs_unit_id", "in", [str(uuid.UUID(int=7, version=4))])],
        ["pkg-08", "pkg-09"],
    ),
    ([rule("ObservingProgram", "short_name", "eq", "Deep Field")], ["pkg-08", "pkg-09"]),
    ([rule("InstrumentModule", "name", "eq", "LFA")], ["pkg-01", "pkg-03", "pkg-05", "pkg-10", "pkg_06%"]),
    (
        [rule("InstrumentModule", "name", "eq", "LFA"), rule("Instrument", "name", "eq", "CHAI")],
        ["pkg-01", "pkg-03", "pkg-05", "pkg-10"],
    ),
    # JSON values: numeric comparison (an int 461 equals 461.0; the string "n/a" is not a number).
    (
        [rule("RawDataPackage", "metadata", "gt", 400, "observation.frequency_ghz")],
        ["pkg-01", "pkg-02", "pkg-03", "pkg-05", "pkg-10", "pkg_06%"],
    ),
    (
        [rule("RawDataPackage", "metadata", "gte", 461.04, "observation.frequency_ghz")],
        ["pkg-01", "pkg-02", "pkg-03", "pkg-10", "pkg_06%"],
    ),
    ([rule("RawDataPackage", "metadata", "lt", 461.04, "observation.frequency_ghz")], ["pkg-05", "pkg-07"]),
    ([rule("RawDataPackage", "metadata", "lte", 280, "observation.frequency_ghz")], ["pkg-07"]),
    ([rule("RawDataPackage", "metadata", "eq", 461, "observation.frequency_ghz")], ["pkg-05"]),
    (
        [rule("RawDataPackage", "metadata", "in", [280, 1900.5], "observation.frequency_ghz")],
        ["pkg-02", "pkg-07"],
    ),
    (
        [rule("RawDataPackage", "metadata", "neq", 461.04, "observation.frequency_ghz")],
        ["pkg-02", "pkg-04", "pkg-05", "pkg-07", "pkg-08", "pkg-09"],
    ),
    (
        [rule("RawDataPackage", "metadata", "not_in", [461.04, 461], "observation.frequency_ghz")],
        ["pkg-02", "pkg-04", "pkg-07", "pkg-08", "pkg-09"],
    ),
    ([rule("RawDataPackage", "metadata", "eq", "n/a", "observation.frequency_ghz")], ["pkg-04"]),
    ([rule("RawDataPackage", "metadata", "eq", "otf", "observation.mode")], ["pkg-01", "pkg-03"]),
    ([rule("RawDataPackage", "metadata", "like", "%tf", "observation.mode")], ["pkg-01", "pkg-03", "pkg-04"]),
    ([rule("RawDataPackage", "metadata", "like", "50\\%\\_%", "observation.mode")], ["pkg_06%"]),
    ([rule("RawDataPackage", "metadata", "gt", "Otf", "observation.mode")], ["pkg-01", "pkg-02", "pkg-03"]),
    ([rule("RawDataPackage", "metadata", "eq", True, "calibrated")], ["pkg-01", "pkg-03"]),
    (
        [rule("RawDataPackage", "metadata", "neq", True, "calibrated")],
        ["pkg-02", "pkg-04", "pkg-05", "pkg-07", "pkg-08", "pkg-09", "pkg-10", "pkg_06%"],
    ),
    ([rule("RawDataPackage", "metadata", "in", [False], "calibrated")], ["pkg-02", "pkg-05"]),
    ([rule("RawDataPackage", "metadata", "lt", 1, "weather.pwv_mm")], ["pkg-07"]),
    # A four-rule grouping, as in CCAT's documented example.
    (
        [
            rule("Source", "name", "eq", "NGC253"),
            rule("ObsUnit", "line_id", "eq", "CO43"),
            rule("InstrumentModule", "name", "eq", "LFA"),
            rule("RawDataPackage", "state", "eq", "archived"),
        ],
        ["pkg-01", "pkg-03"],
    ),
]


@pytest.mark.parametrize(("rules", "expected"), OPERATOR_CASES, ids=[str(i) for i in range(len(OPERATOR_CASES))])
def test_operator_semantics(grouping_db, db_session, rules, expected):
    assert members(db_session, grouping_db, rules) == expected
    reference = reference_resolve(db_session, filter_rules=rules, group_by=[])
    assert as_tuples(resolve(db_session, filter_rules=rules, group_by=[])) == reference


def test_every_operator_is_exercised():
    used = {r["operator"] for rules, _ in OPERATOR_CASES for r in rules}
    assert used == set(OPERATORS)
    kinds = {parse_rules([r])[0].value_kind for rules, _ in OPERATOR_CASES for r in rules}
    assert kinds == {
        "string",
        "enum",
        "integer",
        "boolean",
        "datetime",
        "uuid",
        "json-number",
        "json-string",
        "json-boolean",
    }


def test_like_is_case_sensitive_on_both_dialects(grouping_db, db_session):
    assert members(db_session, grouping_db, [rule("Source", "name", "like", "ngc%")]) == ["pkg-05"]
    assert members(
        db_session, grouping_db, [rule("RawDataPackage", "metadata", "like", "OTF", "observation.mode")]
    ) == ["pkg-10"]


def test_unarchived_and_invalidated_packages(grouping_db, db_session):
    everything = members(db_session, grouping_db, [], only_archived=False)
    assert "pkg-11" in everything and "pkg-12" in everything and "pkg-14" in everything
    assert "pkg-13" not in everything  # invalidated by an operator: never a member
    assert members(
        db_session, grouping_db, [rule("RawDataPackage", "state", "eq", "waiting")], only_archived=False
    ) == ["pkg-11"]
    assert members(db_session, grouping_db, [rule("RawDataPackage", "state", "like", "%ing")], only_archived=False) == [
        "pkg-11",
        "pkg-14",
    ]


def test_instrument_module_scope_and_package_restriction(grouping_db, db_session):
    lfa = grouping_db.world.modules["CHAI/LFA"]
    assert members(db_session, grouping_db, [], instrument_module_id=lfa) == [
        "pkg-01",
        "pkg-03",
        "pkg-05",
        "pkg-10",
    ]
    ids = [grouping_db.world.packages[n] for n in ("pkg-01", "pkg-02", "pkg-11", "pkg-13")]
    assert members(db_session, grouping_db, [], package_ids=ids) == ["pkg-01", "pkg-02"]
    assert resolve(db_session, filter_rules=[], group_by=["source"], package_ids=[]) == []


# ------------------------------------------------------------------------------------------ dimensions

E = {i: str(uuid.UUID(int=i, version=4)) for i in range(1, 9)}
DIMENSION_CASES = {
    "executed_obs_unit": [
        (f"executed_obs_unit={E[1]}", ["pkg-01", "pkg-02"]),
        (f"executed_obs_unit={E[2]}", ["pkg-03"]),
        (f"executed_obs_unit={E[3]}", ["pkg-04"]),
        (f"executed_obs_unit={E[4]}", ["pkg-05"]),
        (f"executed_obs_unit={E[5]}", ["pkg_06%"]),
        (f"executed_obs_unit={E[6]}", ["pkg-07"]),
        (f"executed_obs_unit={E[7]}", ["pkg-08", "pkg-09"]),
        (f"executed_obs_unit={E[8]}", ["pkg-10"]),
    ],
    # <UTC start>_<first 8 hex digits of the id> (the fixture's ids are UUID(int=i): 00000000…).
    "scan": [
        ("scan=20261001T0100_00000000", ["pkg-01", "pkg-02"]),
        ("scan=20261001T2330_00000000", ["pkg-03"]),
        ("scan=20261002T0030_00000000", ["pkg-04"]),
        ("scan=20261002T0300_00000000", ["pkg-05"]),
        ("scan=20261003T0200_00000000", ["pkg_06%"]),
        ("scan=20261003T0500_00000000", ["pkg-07"]),
        ("scan=20261003T2030_00000000", ["pkg-10"]),
        ("scan=20261004T0100_00000000", ["pkg-08", "pkg-09"]),
    ],
    "obs_unit": [
        ("obs_unit=jupiter-cal", ["pkg-07"]),
        ("obs_unit=lower-ngc253-co43", ["pkg-05"]),
        ("obs_unit=ngc253-cii", ["pkg-04"]),
        ("obs_unit=ngc253-co43", ["pkg-01", "pkg-02", "pkg-03"]),
        ("obs_unit=orion-co43", ["pkg-10", "pkg_06%"]),
        ("obs_unit=weird", ["pkg-08", "pkg-09"]),
    ],
    "source": [
        ("source=%CF%81%20Oph%2FA%3D1%20%2B%20x", ["pkg-08", "pkg-09"]),
        ("source=Jupiter", ["pkg-07"]),
        ("source=NGC253", ["pkg-01", "pkg-02", "pkg-03", "pkg-04"]),
        ("source=Orion-KL", ["pkg-10", "pkg_06%"]),
        ("source=ngc253", ["pkg-05"]),
    ],
    "instrument_module": [
        ("instrument_module=CHAI.HFA", ["pkg-02", "pkg-04"]),
        ("instrument_module=CHAI.LFA", ["pkg-01", "pkg-03", "pkg-05", "pkg-10"]),
        ("instrument_module=Odd%252EName.M", ["pkg-08"]),
        ("instrument_module=Odd.Name.M", ["pkg-09"]),
        ("instrument_module=Prime-Cam.PCAM280", ["pkg-07"]),
        ("instrument_module=Twin.LFA", ["pkg_06%"]),
    ],
    "instrument": [
        ("instrument=CHAI", ["pkg-01", "pkg-02", "pkg-03", "pkg-04", "pkg-05", "pkg-10"]),
        ("instrument=Odd", ["pkg-09"]),
        ("instrument=Odd.Name", ["pkg-08"]),
        ("instrument=Prime-Cam", ["pkg-07"]),
        ("instrument=Twin", ["pkg_06%"]),
    ],
    "observing_program": [
        ("observing_program=Cal", ["pkg-05", "pkg-07"]),
        ("observing_program=Deep%20Field", ["pkg-08", "pkg-09"]),
        ("observing_program=GEco", ["pkg-01", "pkg-02", "pkg-03", "pkg-04", "pkg-10", "pkg_06%"]),
    ],
    "line": [
        ("line=CII", ["pkg-04"]),
        ("line=CO%204-3%2F%CE%B2", ["pkg-08", "pkg-09"]),
        ("line=CO43", ["pkg-01", "pkg-02", "pkg-03", "pkg-05", "pkg-10", "pkg_06%"]),
        ("line=~", ["pkg-07"]),
    ],
    "obs_date": [
        ("obs_date=2026-10-01", ["pkg-01", "pkg-02", "pkg-03"]),
        ("obs_date=2026-10-02", ["pkg-04", "pkg-05"]),
        ("obs_date=2026-10-03", ["pkg-07", "pkg-10", "pkg_06%"]),
        ("obs_date=2026-10-04", ["pkg-08", "pkg-09"]),
    ],
}


def test_every_dimension_has_a_case():
    assert set(DIMENSION_CASES) == set(DIMENSIONS)


@pytest.mark.parametrize("dimension", sorted(DIMENSION_CASES))
def test_each_dimension(grouping_db, db_session, dimension):
    sub_groups = resolve(db_session, filter_rules=[], group_by=[dimension])
    assert [(g.key, names(grouping_db, g.package_ids)) for g in sub_groups] == DIMENSION_CASES[dimension]
    assert as_tuples(sub_groups) == reference_resolve(db_session, filter_rules=[], group_by=[dimension])
    for group in sub_groups:
        assert decode_sub_group_key(group.key) == list(group.dimensions)
        assert group.package_count == len(group.package_ids)


@pytest.mark.parametrize(
    "group_by",
    [
        [],
        ["source", "line"],
        ["line", "source"],
        ["obs_date", "instrument_module"],
        ["instrument", "observing_program", "obs_unit", "executed_obs_unit"],
        list(DIMENSIONS),
    ],
)
def test_dimension_combinations_match_the_reference(grouping_db, db_session, group_by):
    rules = [rule("RawDataPackage", "size_bytes", "neq", 300)]
    sub_groups = resolve(db_session, filter_rules=rules, group_by=group_by)
    assert as_tuples(sub_groups) == reference_resolve(db_session, filter_rules=rules, group_by=group_by)
    assert len({g.key for g in sub_groups}) == len(sub_groups)
    if not group_by:
        assert [g.key for g in sub_groups] == ["all"]


def test_source_line_example_and_totals(grouping_db, db_session):
    sub_groups = resolve(db_session, filter_rules=[rule("Source", "name", "eq", "NGC253")], group_by=["source", "line"])
    assert [(g.key, g.package_count, g.total_bytes) for g in sub_groups] == [
        ("source=NGC253+line=CII", 1, 400),
        ("source=NGC253+line=CO43", 3, 600),
    ]
    assert sub_groups[1].dimensions == (("source", "NGC253"), ("line", "CO43"))


def test_empty_result_has_no_sub_group(grouping_db, db_session):
    assert resolve(db_session, filter_rules=[rule("Source", "name", "eq", "M31")], group_by=[]) == []
    assert resolve(db_session, filter_rules=[rule("Source", "name", "eq", "M31")], group_by=["source"]) == []


def test_rule_objects_and_raw_rules_give_the_same_result(grouping_db, db_session):
    raw = [rule("Source", "name", "in", ["NGC253", "Jupiter"])]
    assert resolve(db_session, filter_rules=parse_rules(raw), group_by=["source"]) == resolve(
        db_session, filter_rules=raw, group_by=["source"]
    )


# ------------------------------------------------------------------------------- one bound statement


def _count_statements(session: Session, call):
    session.execute(select(1))  # opens the test's savepoint first, so only the call's statements are counted
    statements = []
    engine = session.get_bind()
    target = engine.engine if hasattr(engine, "engine") else engine

    def before(conn, cursor, statement, parameters, context, executemany):
        statements.append(statement)

    event.listen(target, "before_cursor_execute", before)
    try:
        result = call()
    finally:
        event.remove(target, "before_cursor_execute", before)
    return result, statements


def test_resolve_runs_exactly_one_statement(grouping_db, db_session):
    rules = [
        rule("Source", "name", "neq", "Jupiter"),
        rule("RawDataPackage", "metadata", "gt", 1, "observation.frequency_ghz"),
    ]
    for group_by in ([], ["executed_obs_unit"], list(DIMENSIONS)):
        _, statements = _count_statements(
            db_session, lambda gb=group_by: resolve(db_session, filter_rules=rules, group_by=gb)
        )
        assert len(statements) == 1
    changed = [grouping_db.world.packages["pkg-01"]]
    _, statements = _count_statements(
        db_session,
        lambda: resolve_touched(
            db_session,
            filter_rules=rules,
            group_by=["source"],
            instrument_module_id=None,
            changed_package_ids=changed,
        ),
    )
    assert len(statements) == 1


HOSTILE = "x'); DROP TABLE raw_data_package; --"


@pytest.mark.parametrize("dialect", [postgresql.dialect(), sqlite.dialect()], ids=["postgresql", "sqlite"])
def test_every_value_is_a_bound_parameter(dialect):
    rules = [
        rule("Source", "name", "eq", HOSTILE),
        rule("Source", "name", "like", HOSTILE + "%"),
        rule("ObsUnit", "line_id", "in", [HOSTILE, 'a"b']),
        rule("RawDataPackage", "metadata", "neq", HOSTILE, "observation.mode"),
        rule("RawDataPackage", "metadata", "gt", 123.25, "observation.frequency_ghz"),
        rule("ObservingProgram", "short_name", "gt", "--; SELECT 1"),
    ]
    statement = compile_query(filter_rules=rules, group_by=["source", "obs_date"], package_ids=[987654321])
    compiled = statement.compile(dialect=dialect)
    sql_text = str(compiled)
    for needle in ("DROP", "x'", "--", "123.25", "987654321", "observation", "frequency_ghz", 'a"b'):
        assert needle not in sql_text
    params = repr(compiled.params)
    for needle in (HOSTILE, "123.25", "987654321", "observation", "--; SELECT 1"):
        assert needle in params
    touched = compile_touched_query(filter_rules=rules, group_by=["line"], changed_package_ids=[424242])
    touched_sql = str(touched.compile(dialect=dialect))
    assert "DROP" not in touched_sql and "424242" not in touched_sql
    assert "424242" in repr(touched.compile(dialect=dialect).params)


@pytest.mark.parametrize("operator", ["eq", "like", "in", "gt"])
def test_hostile_values_are_only_data(grouping_db, db_session, operator):
    program = db_session.scalars(select(m.ObservingProgram).where(m.ObservingProgram.short_name == "Cal")).one()
    hostile_source = m.Source(name=HOSTILE, kind=SourceKind.FIXED)
    obs_unit = db_session.scalars(select(m.ObsUnit).where(m.ObsUnit.name == "jupiter-cal")).one()
    obs_unit.source = hostile_source
    obs_unit.observing_program = program
    db_session.flush()
    value = {"eq": HOSTILE, "like": HOSTILE, "in": [HOSTILE], "gt": "x'"}[operator]
    # gt compares by code point: the Greek rho of the weird source sorts after "x'" as well.
    expected = ["pkg-07", "pkg-08", "pkg-09"] if operator == "gt" else ["pkg-07"]
    assert members(db_session, grouping_db, [rule("Source", "name", operator, value)]) == expected
    assert (
        members(db_session, grouping_db, [rule("RawDataPackage", "metadata", operator, value, "observation.mode")])
        == []
    )
    assert "raw_data_package" in inspect(db_session.connection()).get_table_names()
    sub_groups = resolve(db_session, filter_rules=[rule("Source", "name", "eq", HOSTILE)], group_by=["source"])
    assert sub_groups[0].dimensions == (("source", HOSTILE),)
    assert "/" not in sub_groups[0].key and " " not in sub_groups[0].key


def test_invalid_input_is_rejected_before_any_query(grouping_db, db_session):
    bad = [rule("Source", "nmae", "eq", "NGC253")]
    result, statements = _count_statements(
        db_session, lambda: _raises(lambda: resolve(db_session, filter_rules=bad, group_by=[]))
    )
    assert isinstance(result, FilterRuleError) and statements == []
    result, statements = _count_statements(
        db_session, lambda: _raises(lambda: resolve(db_session, filter_rules=[], group_by=["night"]))
    )
    assert isinstance(result, GroupByError) and statements == []


def _raises(call):
    try:
        call()
    except FilterRuleError as error:
        return error
    raise AssertionError("expected FilterRuleError")


# ----------------------------------------------------------------------------------- touched groups


@pytest.mark.parametrize(
    ("group_by", "changed"),
    [
        (["executed_obs_unit"], ["pkg-01"]),
        (["executed_obs_unit"], ["pkg-08", "pkg-03"]),
        (["source", "line"], ["pkg-02"]),
        (["line"], ["pkg-07"]),  # the NULL-line group
        (["line", "obs_date"], ["pkg-07", "pkg-10"]),
        (["instrument_module"], ["pkg-09"]),
        (["obs_date"], ["pkg-10"]),
        (["instrument", "observing_program", "obs_unit"], ["pkg-05", "pkg-04"]),
        ([], ["pkg-05"]),
    ],
)
def test_resolve_touched_returns_complete_touched_groups(grouping_db, db_session, group_by, changed):
    ids = [grouping_db.world.packages[n] for n in changed]
    touched = resolve_touched(
        db_session, filter_rules=[], group_by=group_by, instrument_module_id=None, changed_package_ids=ids
    )
    full = resolve(db_session, filter_rules=[], group_by=group_by)
    assert touched == [g for g in full if set(g.package_ids) & set(ids)]
    assert touched  # every changed package here is an archived member


def test_resolve_touched_ignores_packages_outside_the_grouping(grouping_db, db_session):
    world = grouping_db.world
    rules = [rule("Source", "name", "eq", "NGC253")]
    outside = [world.packages[n] for n in ("pkg-07", "pkg-11", "pkg-13")]  # other source, waiting, invalidated
    assert (
        resolve_touched(
            db_session,
            filter_rules=rules,
            group_by=["source"],
            instrument_module_id=None,
            changed_package_ids=outside,
        )
        == []
    )
    assert (
        resolve_touched(db_session, filter_rules=rules, group_by=[], instrument_module_id=None, changed_package_ids=[])
        == []
    )
    touched = resolve_touched(
        db_session,
        filter_rules=rules,
        group_by=["line"],
        instrument_module_id=world.modules["CHAI/LFA"],
        changed_package_ids=[world.packages["pkg-03"], world.packages["pkg-02"]],
    )
    assert [(g.key, names(grouping_db, g.package_ids)) for g in touched] == [("line=CO43", ["pkg-01", "pkg-03"])]


# ------------------------------------------------------------------------------ stable across dialects


def test_keys_and_members_are_identical_on_both_dialects(tmp_path):
    from ccat_dagster.opsdb.engine import make_engine
    from ccat_dagster.opsdb.migrate import upgrade

    sqlite_url = f"sqlite:///{tmp_path / 'a.sqlite'}"
    pg_url = create_grouping_pg_database()
    try:
        results = []
        for url in (sqlite_url, pg_url):
            upgrade(url)
            engine = make_engine(url)
            with Session(engine) as session, session.begin():
                build_world(session)
            with Session(engine) as session:
                by_dims = {}
                for group_by in ([], *([d] for d in DIMENSIONS), ["source", "line"], list(DIMENSIONS)):
                    by_dims[tuple(group_by)] = [
                        (g.key, g.dimensions, g.package_count, g.total_bytes)
                        for g in resolve(session, filter_rules=[], group_by=group_by, only_archived=False)
                    ]
                results.append(by_dims)
            engine.dispose()
        assert results[0] == results[1]
        assert any(key.startswith("line=CO%204-3") for key, *_ in results[0][("line",)])
    finally:
        drop_grouping_pg_database(pg_url)


def test_weird_values_survive_the_round_trip(grouping_db, db_session):
    sub_groups = resolve(
        db_session, filter_rules=[rule("Source", "name", "eq", WEIRD_SOURCE)], group_by=["source", "line"]
    )
    assert [g.dimensions for g in sub_groups] == [(("source", WEIRD_SOURCE), ("line", WEIRD_LINE))]
    assert decode_sub_group_key(sub_groups[0].key) == [("source", WEIRD_SOURCE), ("line", WEIRD_LINE)]


SMALL_TABLE_RULES = [
    rule("InstrumentModule", "name", "in", ["LFA", "HFA", "M", "Name.M"]),
    rule("Instrument", "name", "neq", "Twin"),
    rule("ObservingProgram", "short_name", "neq", "Cal"),
    rule("RawDataPackage", "metadata", "neq", 1900.5, "observation.frequency_ghz"),
]


@pytest.mark.parametrize("group_by", [[], *([d] for d in DIMENSIONS), ["instrument", "instrument_module"]])
def test_rules_on_small_tables_with_every_dimension(grouping_db, db_session, group_by):
    """Rules on instrument / module / program tables are id look-ups or joins depending on the group_by."""
    sub_groups = resolve(db_session, filter_rules=SMALL_TABLE_RULES, group_by=group_by)
    expected = reference_resolve(db_session, filter_rules=SMALL_TABLE_RULES, group_by=group_by)
    assert as_tuples(sub_groups) == expected
    assert sorted(n for g in sub_groups for n in names(grouping_db, g.package_ids)) == [
        "pkg-01", "pkg-03", "pkg-04", "pkg-08", "pkg-09", "pkg-10",
    ]  # fmt: skip
    changed = [grouping_db.world.packages[n] for n in ("pkg-03", "pkg-08", "pkg-07")]
    touched = resolve_touched(
        db_session,
        filter_rules=SMALL_TABLE_RULES,
        group_by=group_by,
        instrument_module_id=None,
        changed_package_ids=changed,
    )
    assert touched == [g for g in sub_groups if set(g.package_ids) & set(changed)]
