"""Filter-rule and group_by validation: each error names the rule (index and content) and what is valid."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest

from ccat_dagster.errors import CcatError
from ccat_dagster.grouping.catalog import COLUMNS, DIMENSIONS, JOIN_GRAPH, ROOT_TABLE, TABLE_MAP, join_path
from ccat_dagster.grouping.rules import (
    OPERATORS,
    FilterRule,
    FilterRuleError,
    GroupByError,
    parse_rules,
    rules_to_json,
    validate_group_by,
)


def rule(table="Source", column="name", operator="eq", value="NGC253", **extra):
    return {"table": table, "column": column, "operator": operator, "value": value, **extra}


def problems_of(raw):
    with pytest.raises(FilterRuleError) as info:
        parse_rules(raw)
    assert isinstance(info.value, CcatError)
    return info.value.problems


def single_problem(raw_rule):
    (problem,) = problems_of([rule(), raw_rule])
    assert problem.startswith("filter_rules[1] {")  # names the rule by index and content
    assert f'"table": "{raw_rule.get("table")}"' in problem or "table" not in raw_rule
    return problem


# ------------------------------------------------------------------------------------------- valid input


def test_documented_example_parses_and_round_trips():
    raw = [
        rule("Source", "name", "eq", "NGC253"),
        rule("ObsUnit", "line_id", "eq", "CO43"),
        rule("InstrumentModule", "name", "eq", "CHAI"),
        rule("RawDataPackage", "state", "eq", "archived"),
        rule("RawDataPackage", "metadata", "gt", 400, json_path="observation.frequency_ghz"),
    ]
    rules = parse_rules(raw)
    assert rules[0] == FilterRule("Source", "name", "eq", "NGC253")
    assert rules[4].json_keys == ("observation", "frequency_ghz") and rules[4].value == 400.0
    assert rules[4].value_kind == "json-number"
    assert parse_rules(rules_to_json(rules)) == rules
    assert parse_rules(rules) == rules  # FilterRules are accepted (and re-checked)
    assert parse_rules([]) == []


def test_values_are_normalised():
    rules = parse_rules(
        [
            rule("ObsUnit", "line_id", "in", ["CO43", "CII"]),
            rule("ExecutedObsUnit", "start_time", "gte", "2026-10-01"),
            rule("ExecutedObsUnit", "start_time", "lt", "2026-10-02T05:00:00+05:00"),
            rule("ExecutedObsUnit", "end_time", "lt", dt.date(2026, 10, 3)),
            rule("ExecutedObsUnit", "id", "eq", "0F8FAD5B-D9CB-469F-A165-70867728950E"),
            rule("RawDataPackage", "size_bytes", "gt", 1e9),
            rule("ObsUnit", "line_id", "eq", None),
        ]
    )
    assert rules[0].value == ("CO43", "CII")
    assert rules[1].value == dt.datetime(2026, 10, 1, tzinfo=dt.UTC)
    assert rules[2].value == dt.datetime(2026, 10, 2, 0, 0, tzinfo=dt.UTC)
    assert rules[3].value == dt.datetime(2026, 10, 3, tzinfo=dt.UTC)
    assert rules[4].value == uuid.UUID("0f8fad5b-d9cb-469f-a165-70867728950e")
    assert rules[5].value == 1_000_000_000 and isinstance(rules[5].value, int)
    assert rules[6].value is None
    assert hash(rules[0])  # frozen and hashable


def test_catalogue_covers_the_documented_tables_and_dimensions():
    assert set(TABLE_MAP) == {
        "RawDataPackage",
        "ExecutedObsUnit",
        "ObsUnit",
        "Source",
        "ObservingProgram",
        "InstrumentModule",
        "Instrument",
    }
    assert set(JOIN_GRAPH) == set(TABLE_MAP) - {ROOT_TABLE}
    assert [e.table for e in join_path("Source")] == ["ExecutedObsUnit", "ObsUnit", "Source"]
    assert [e.table for e in join_path("Instrument")] == ["InstrumentModule", "Instrument"]
    assert COLUMNS["RawDataPackage"]["metadata"].kind == "json"
    assert COLUMNS["RawDataPackage"]["state"].enum_values == ("waiting", "transferring", "archived", "failed")
    assert {
        "executed_obs_unit",
        "obs_unit",
        "source",
        "instrument_module",
        "instrument",
        "observing_program",
        "line",
        "obs_date",
    } <= set(DIMENSIONS)


# -------------------------------------------------------------------------------------------- structure


@pytest.mark.parametrize("raw", [None, "Source.name = NGC253", {"table": "Source"}, 3])
def test_rules_must_be_a_list(raw):
    (problem,) = problems_of(raw)
    assert "filter_rules must be a list" in problem and '"table": "Source"' in problem


def test_a_rule_must_be_a_mapping_with_the_known_keys():
    problems = problems_of(["Source.name=NGC253", {"table": "Source", "column": "name"}, rule(colour="red")])
    assert problems[0].startswith('filter_rules[0] "Source.name=NGC253": a rule must be a mapping')
    assert problems[1].startswith("filter_rules[1]") and "missing key(s) operator, value" in problems[1]
    assert problems[2].startswith("filter_rules[2]") and "unknown key(s) 'colour'" in problems[2]
    assert "table, column, operator, value, json_path" in problems[2]


def test_all_problems_are_reported_at_once():
    with pytest.raises(FilterRuleError) as info:
        parse_rules([rule(table="Sourse"), rule(), rule(column="nmae"), rule(operator="~")])
    error = info.value
    assert [p.split(" ", 1)[0] for p in error.problems] == [
        "filter_rules[0]",
        "filter_rules[2]",
        "filter_rules[3]",
    ]
    assert str(error).startswith("3 problems:")


# ------------------------------------------------------------- the errors docs/groupings.md lists


def test_unknown_table():
    problem = single_problem(rule(table="Sourse"))
    assert 'unknown table "Sourse"' in problem and "did you mean 'Source'?" in problem
    assert "valid tables: RawDataPackage, ExecutedObsUnit, ObsUnit, Source" in problem


def test_unknown_column():
    problem = single_problem(rule(table="ObsUnit", column="line"))
    assert 'unknown column "line" on ObsUnit' in problem and "did you mean 'line_id'?" in problem
    assert "valid columns: id, line_id, name, observing_program_id, source_id" in problem


def test_unknown_operator():
    problem = single_problem(rule(operator="between"))
    assert 'unknown operator "between"' in problem
    assert "valid operators: " + ", ".join(OPERATORS) in problem


def test_json_path_on_a_non_json_column():
    problem = single_problem(rule(json_path="a.b"))
    assert "json_path is only valid on a JSON column" in problem and "Source.name is a string column" in problem
    assert "RawDataPackage.metadata" in problem


def test_json_column_needs_a_valid_json_path():
    problem = single_problem(rule("RawDataPackage", "metadata", "gt", 400))
    assert "add json_path" in problem
    for bad_path in ("", "a..b", "a.b'; --", "$.a", 5):
        problem = single_problem(rule("RawDataPackage", "metadata", "gt", 400, json_path=bad_path))
        assert "json_path" in problem and "is invalid" in problem


def test_empty_in_list():
    problem = single_problem(rule(operator="in", value=[]))
    assert "operator in needs a non-empty list" in problem
    problem = single_problem(rule(operator="not_in", value=[]))
    assert "operator not_in needs a non-empty list" in problem


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (rule(value=253), "value 253 is not valid for Source.name: expected a text value"),
        (rule("RawDataPackage", "size_bytes", "gt", "big"), "expected a whole number, got str"),
        (rule("RawDataPackage", "size_bytes", "gt", 1.5), "expected a whole number, got float"),
        (rule("RawDataPackage", "size_bytes", "gt", True), "expected a whole number, got bool"),
        (rule("RawDataPackage", "size_bytes", "gt", 2**64), "outside the 64-bit integer range"),
        (
            rule("RawDataPackage", "state", "eq", "ARCHIVED"),
            "expected one of waiting, transferring, archived, failed",
        ),
        (rule("Instrument", "available", "eq", "yes"), "expected true or false, got str"),
        (rule("ExecutedObsUnit", "start_time", "gt", "yesterday"), "expected an ISO-8601 timestamp"),
        (rule("ExecutedObsUnit", "start_time", "gt", 1700000000), "expected an ISO-8601 timestamp"),
        (rule("ExecutedObsUnit", "id", "eq", "not-a-uuid"), "expected a UUID"),
        (rule("ExecutedObsUnit", "id", "eq", 7), "expected a UUID string, got int"),
        (rule(operator="in", value="NGC253"), "operator in needs a list value"),
        (rule(operator="in", value=["NGC253", 5]), "value 5 is not valid for Source.name"),
        (rule(value="NGC\x00253"), "cannot contain the NUL character"),
        (rule(operator="like", value="NGC\\"), "cannot end with a single \\"),
        (rule(value=None), "value null is only allowed with eq / neq on a nullable column"),
        (rule("ObsUnit", "line_id", "in", ["CO43", None]), "is not valid for ObsUnit.line_id"),
        (rule("ObsUnit", "line_id", "gt", None), "needs a value"),
        (rule("RawDataPackage", "metadata", "eq", None, json_path="a"), "value null is only allowed"),
        (
            rule("RawDataPackage", "metadata", "eq", {"a": 1}, json_path="a"),
            "use a number, a string or true/false",
        ),
        (
            rule("RawDataPackage", "metadata", "in", [1, "a"], json_path="a"),
            "mixes json-number and json-string",
        ),
        (rule("RawDataPackage", "metadata", "gt", float("nan"), json_path="a"), "expected a finite number"),
        (rule("RawDataPackage", "metadata", "gt", 10**400, json_path="a"), "outside the 64-bit integer range"),
    ],
)
def test_value_of_the_wrong_type(raw, expected):
    assert expected in single_problem(raw)


@pytest.mark.parametrize(
    ("raw", "valid"),
    [
        (rule("RawDataPackage", "state", "gt", "archived"), "eq, neq, in, not_in, like"),
        (rule("RawDataPackage", "size_bytes", "like", "1%"), "eq, neq, in, not_in, gt, gte, lt, lte"),
        (rule("Instrument", "available", "lt", True), "eq, neq, in, not_in"),
        (rule("ExecutedObsUnit", "id", "gt", str(uuid.uuid4())), "eq, neq, in, not_in"),
        (rule("ExecutedObsUnit", "start_time", "like", "2026%"), "eq, neq, in, not_in, gt, gte, lt, lte"),
        (
            rule("RawDataPackage", "metadata", "like", 4, json_path="a"),
            "eq, neq, in, not_in, gt, gte, lt, lte",
        ),
        (rule("RawDataPackage", "metadata", "gt", True, json_path="a"), "eq, neq, in, not_in"),
    ],
)
def test_operator_that_does_not_apply_to_the_column(raw, valid):
    problem = single_problem(raw)
    assert f"operator {raw['operator']} does not apply" in problem and f"valid operators for it: {valid}" in problem


# -------------------------------------------------------------------------------------------- group_by


def test_group_by_valid():
    assert validate_group_by([]) == []
    assert validate_group_by(("source", "line")) == ["source", "line"]
    assert validate_group_by(list(DIMENSIONS)) == list(DIMENSIONS)


def test_unknown_dimension():
    with pytest.raises(GroupByError) as info:
        validate_group_by(["source", "night"])
    (problem,) = info.value.problems
    assert problem.startswith("group_by[1] 'night' is not a dimension")
    assert "valid names: executed_obs_unit, scan, obs_unit, source, instrument_module" in problem
    assert isinstance(info.value, FilterRuleError)


@pytest.mark.parametrize(
    ("group_by", "expected"),
    [
        ("source", 'did you mean ["source"]?'),
        (None, "group_by must be a list of dimension names"),
        (["source", "source"], "'source' is listed twice"),
        (["source", 3], "group_by[1] 3 is not a dimension name"),
        (["Source"], "did you mean 'source'?"),
    ],
)
def test_bad_group_by(group_by, expected):
    with pytest.raises(GroupByError) as info:
        validate_group_by(group_by)
    assert expected in str(info.value)


def test_the_grouping_package_does_not_import_dagster():
    import subprocess
    import sys

    code = (
        "import sys, ccat_dagster.grouping.engine, ccat_dagster.grouping.presets, ccat_dagster.grouping.cli; "
        "sys.exit(1 if any(m == 'dagster' or m.startswith('dagster.') for m in sys.modules) else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
