"""Filter rules and group_by dimensions: parsing and validation, before any query runs and without a database.

A rule is ``{table, column, operator, value, json_path?}``; a grouping's rules are ANDed (docs/groupings.md).
``parse_rules`` checks every rule and reports every problem at once, each naming the rule by index and
content and saying what would be valid.
"""

from __future__ import annotations

import datetime as dt
import difflib
import json
import math
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ccat_dagster.errors import CcatError
from ccat_dagster.grouping.catalog import COLUMNS, DIMENSIONS, TABLE_MAP, ColumnInfo, Dimension

__all__ = [
    "DIMENSIONS",
    "OPERATORS",
    "Dimension",
    "FilterRule",
    "FilterRuleError",
    "GroupByError",
    "parse_rules",
    "rules_to_json",
    "validate_group_by",
]

OPERATORS: Mapping[str, str] = {
    "eq": "=",
    "neq": "!= (also matches NULL / a missing JSON key)",
    "in": "IN (list)",
    "not_in": "NOT IN (list) (also matches NULL / a missing JSON key)",
    "gt": ">",
    "gte": ">=",
    "lt": "<",
    "lte": "<=",
    "like": "LIKE (case-sensitive; % any text, _ one character, \\ escapes the next character)",
}
LIST_OPERATORS = frozenset({"in", "not_in"})
ORDER_OPERATORS = frozenset({"gt", "gte", "lt", "lte"})
EQUALITY_OPERATORS = frozenset({"eq", "neq", "in", "not_in"})

# Operators each column kind supports. A JSON value's kind is decided by the rule's value (number, string,
# boolean), since a JSON document has no declared type.
_OPERATORS_BY_KIND: dict[str, frozenset[str]] = {
    "string": frozenset(OPERATORS),
    "enum": EQUALITY_OPERATORS | {"like"},
    "integer": EQUALITY_OPERATORS | ORDER_OPERATORS,
    "float": EQUALITY_OPERATORS | ORDER_OPERATORS,
    "boolean": EQUALITY_OPERATORS,
    "datetime": EQUALITY_OPERATORS | ORDER_OPERATORS,
    "uuid": EQUALITY_OPERATORS,
    "json-number": EQUALITY_OPERATORS | ORDER_OPERATORS,
    "json-string": frozenset(OPERATORS),
    "json-boolean": EQUALITY_OPERATORS,
}
_RULE_KEYS = ("table", "column", "operator", "value", "json_path")
_REQUIRED_KEYS = ("table", "column", "operator", "value")
_JSON_KEY = re.compile(r"[A-Za-z0-9_-]+")
_BIGINT = 2**63


class FilterRuleError(CcatError, ValueError):
    """Filter rules or a group_by that cannot be used; ``problems`` holds one line per problem found."""

    def __init__(self, problems: Sequence[str], *, context: str = "") -> None:
        self.problems = tuple(problems)
        prefix = f"{context}: " if context else ""
        if len(self.problems) == 1:
            message = prefix + self.problems[0]
        else:
            message = prefix + f"{len(self.problems)} problems:\n  - " + "\n  - ".join(self.problems)
        super().__init__(message)


class GroupByError(FilterRuleError):
    """A group_by that is not a list of known, distinct dimension names."""


@dataclass(frozen=True)
class FilterRule:
    """One validated rule. ``value`` is normalised: a tuple for in/not_in, aware UTC datetimes, UUIDs.

    ``json_path`` is the dotted path into a JSON column (e.g. ``observation.frequency_ghz``), else None.
    """

    table: str
    column: str
    operator: str
    value: Any
    json_path: str | None = None

    @property
    def json_keys(self) -> tuple[str, ...]:
        return tuple(self.json_path.split(".")) if self.json_path else ()

    @property
    def column_info(self) -> ColumnInfo:
        return COLUMNS[self.table][self.column]

    @property
    def value_kind(self) -> str:
        """How the value is compared: the column's kind, or json-number / json-string / json-boolean."""
        kind = self.column_info.kind
        if kind != "json":
            return kind
        sample = self.value[0] if self.operator in LIST_OPERATORS else self.value
        return _json_value_kind(sample)

    def to_dict(self) -> dict[str, Any]:
        """The rule as JSON-serialisable data; ``parse_rules([rule.to_dict()])`` gives the rule back."""
        value = [_jsonable(v) for v in self.value] if self.operator in LIST_OPERATORS else _jsonable(self.value)
        data: dict[str, Any] = {
            "table": self.table,
            "column": self.column,
            "operator": self.operator,
            "value": value,
        }
        if self.json_path is not None:
            data["json_path"] = self.json_path
        return data


def rules_to_json(rules: Iterable[FilterRule]) -> list[dict[str, Any]]:
    return [rule.to_dict() for rule in rules]


def parse_rules(raw: Any) -> list[FilterRule]:
    """Validate ``raw`` (a list of rule mappings, or FilterRules) and return the rules.

    Raises FilterRuleError listing every problem, each naming the rule as ``filter_rules[i] {...}``.
    """
    if raw is None or isinstance(raw, str | bytes | Mapping) or not isinstance(raw, Sequence):
        raise FilterRuleError(
            [
                f"filter_rules must be a list of rules, got {_show(raw)}; write e.g. "
                '[{"table": "Source", "column": "name", "operator": "eq", "value": "NGC253"}] '
                "(an empty list [] selects every package)"
            ]
        )
    rules: list[FilterRule] = []
    problems: list[str] = []
    for index, item in enumerate(raw):
        data = item.to_dict() if isinstance(item, FilterRule) else item
        rule_problems, rule = _check_rule(data)
        label = f"filter_rules[{index}] {_show(data)}"
        problems.extend(f"{label}: {problem}" for problem in rule_problems)
        if rule is not None:
            rules.append(rule)
    if problems:
        raise FilterRuleError(problems)
    return rules


def validate_group_by(group_by: Any) -> list[str]:
    """Check that ``group_by`` is a list of distinct known dimension names; ``[]``: one sub-group ``all``."""
    valid = ", ".join(DIMENSIONS)
    if group_by is None or isinstance(group_by, str | bytes | Mapping) or not isinstance(group_by, Sequence):
        hint = f'; did you mean ["{group_by}"]?' if isinstance(group_by, str) else ""
        raise GroupByError(
            [f"group_by must be a list of dimension names, got {_show(group_by)}{hint}; valid names: {valid}"]
        )
    problems = []
    seen: set[str] = set()
    for index, name in enumerate(group_by):
        if not isinstance(name, str):
            problems.append(f"group_by[{index}] {_show(name)} is not a dimension name; valid names: {valid}")
        elif name not in DIMENSIONS:
            problems.append(
                f"group_by[{index}] {name!r} is not a dimension{_suggest(name, DIMENSIONS)}; valid names: {valid}"
            )
        elif name in seen:
            problems.append(f"group_by[{index}] {name!r} is listed twice: give each dimension once")
        else:
            seen.add(name)
    if problems:
        raise GroupByError(problems)
    return list(group_by)


# ---------------------------------------------------------------------------------------------- internals


def _check_rule(data: Any) -> tuple[list[str], FilterRule | None]:
    if not isinstance(data, Mapping):
        return [f"a rule must be a mapping with keys {', '.join(_REQUIRED_KEYS)} (and optional json_path)"], None
    problems: list[str] = []
    unknown = [key for key in data if key not in _RULE_KEYS]
    if unknown:
        problems.append(f"unknown key(s) {', '.join(map(repr, unknown))}; a rule has keys {', '.join(_RULE_KEYS)}")
    missing = [key for key in _REQUIRED_KEYS if key not in data]
    if missing:
        problems.append(f"missing key(s) {', '.join(missing)}")
        return problems, None

    table, column, operator, value = data["table"], data["column"], data["operator"], data["value"]
    json_path = data.get("json_path")
    if not isinstance(table, str) or table not in TABLE_MAP:
        problems.append(
            f"unknown table {_show(table)}{_suggest(table, TABLE_MAP)}; valid tables: {', '.join(TABLE_MAP)}"
        )
        return problems, None
    columns = COLUMNS[table]
    if not isinstance(column, str) or column not in columns:
        problems.append(
            f"unknown column {_show(column)} on {table}{_suggest(column, columns)}; "
            f"valid columns: {', '.join(sorted(columns))}"
        )
        return problems, None
    if not isinstance(operator, str) or operator not in OPERATORS:
        problems.append(
            f"unknown operator {_show(operator)}{_suggest(operator, OPERATORS)}; "
            f"valid operators: {', '.join(OPERATORS)}"
        )
        return problems, None

    info = columns[column]
    if info.kind == "json":
        path_problem = _check_json_path(json_path, info)
        if path_problem:
            problems.append(path_problem)
            return problems, None
    elif json_path is not None:
        json_columns = [c.qualified_name for t in COLUMNS.values() for c in t.values() if c.kind == "json"]
        problems.append(
            f"json_path is only valid on a JSON column, and {info.qualified_name} is a {info.kind} column; "
            f"drop json_path, or use a JSON column ({', '.join(json_columns)})"
        )
        return problems, None

    value_problems, normalised = _check_value(info, operator, value)
    problems.extend(value_problems)
    if problems:
        return problems, None
    return [], FilterRule(table, column, operator, normalised, json_path)


def _check_json_path(json_path: Any, info: ColumnInfo) -> str | None:
    if json_path is None:
        return (
            f"{info.qualified_name} is a JSON column: add json_path, the dotted path to the value "
            '(e.g. "json_path": "observation.frequency_ghz")'
        )
    if not isinstance(json_path, str) or not all(_JSON_KEY.fullmatch(k) for k in json_path.split(".")):
        return (
            f"json_path {_show(json_path)} is invalid: give dot-separated object keys made of letters, "
            "digits, _ and - (e.g. observation.frequency_ghz)"
        )
    return None


def _check_value(info: ColumnInfo, operator: str, value: Any) -> tuple[list[str], Any]:
    name = info.qualified_name + ("" if info.kind != "json" else " (JSON value)")
    if value is None:
        if operator in ("eq", "neq") and info.nullable and info.kind != "json":
            return [], None
        nullable = [c.qualified_name for t in COLUMNS.values() for c in t.values() if c.nullable and c.kind != "json"]
        return [
            f"value null is only allowed with eq / neq on a nullable column ({', '.join(nullable)}); "
            f"{name} with {operator} needs a value"
        ], None

    if operator in LIST_OPERATORS:
        if isinstance(value, str | bytes | Mapping) or not isinstance(value, Sequence):
            return [f'operator {operator} needs a list value, got {_show(value)}; write e.g. ["a", "b"]'], None
        if len(value) == 0:
            match_hint = "matches nothing" if operator == "in" else "excludes nothing"
            return [
                f"operator {operator} needs a non-empty list (an empty list {match_hint}): add values or drop the rule"
            ], None
        elements = list(value)
    else:
        elements = [value]

    kind = info.kind
    if kind == "json":
        kinds = {_json_value_kind(e) for e in elements}
        if None in kinds:
            return [
                f"value {_show(value)} cannot be compared with a JSON value: use a number, a string or true/false"
            ], None
        if len(kinds) > 1:
            return [f"list {_show(value)} mixes {' and '.join(sorted(kinds))} values: use one type"], None  # type: ignore[arg-type]
        kind = kinds.pop()  # type: ignore[assignment]

    allowed = _OPERATORS_BY_KIND[kind]
    if operator not in allowed:
        return [
            f"operator {operator} does not apply to {name} ({_KIND_NAMES[kind]}); "
            f"valid operators for it: {', '.join(o for o in OPERATORS if o in allowed)}"
        ], None

    converted = []
    for element in elements:
        problem, result = _convert(kind, info, operator, element)
        if problem:
            return [f"value {_show(element)} is not valid for {name}: {problem}"], None
        converted.append(result)
    return [], tuple(converted) if operator in LIST_OPERATORS else converted[0]


_KIND_NAMES = {
    "string": "a text column",
    "enum": "an enumeration column",
    "integer": "an integer column",
    "float": "a number column",
    "boolean": "a boolean column",
    "datetime": "a timestamp column",
    "uuid": "a UUID column",
    "json-number": "compared as a number",
    "json-string": "compared as text",
    "json-boolean": "compared as a boolean",
}


def _convert(kind: str, info: ColumnInfo, operator: str, value: Any) -> tuple[str | None, Any]:
    if kind in ("string", "enum", "json-string"):
        if not isinstance(value, str):
            return f"expected a text value (in quotes), got {type(value).__name__}", None
        if "\x00" in value:
            return "text values cannot contain the NUL character", None
        if operator == "like":
            if _ends_with_lone_escape(value):
                return "a like pattern cannot end with a single \\ (write \\\\ for a literal backslash)", None
            return None, value
        if kind == "enum" and value not in info.enum_values:
            return f"expected one of {', '.join(info.enum_values)} (lower-case)", None
        return None, value
    if kind == "integer":
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            return f"expected a whole number, got {type(value).__name__}", None
        if not -_BIGINT <= value < _BIGINT:
            return "the number is outside the 64-bit integer range", None
        return None, value
    if kind in ("float", "json-number"):
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"expected a number, got {type(value).__name__}", None
        if isinstance(value, int) and not -_BIGINT <= value < _BIGINT:
            return "the number is outside the 64-bit integer range", None  # also beyond what a float holds
        if not math.isfinite(value):
            return "expected a finite number", None
        return None, float(value) if kind == "json-number" or isinstance(value, float) else value
    if kind in ("boolean", "json-boolean"):
        if not isinstance(value, bool):
            return f"expected true or false, got {type(value).__name__}", None
        return None, value
    if kind == "datetime":
        return _to_datetime(value)
    if kind == "uuid":
        if isinstance(value, uuid.UUID):
            return None, value
        if not isinstance(value, str):
            return f"expected a UUID string, got {type(value).__name__}", None
        try:
            return None, uuid.UUID(value)
        except ValueError:
            return "expected a UUID such as 0f8fad5b-d9cb-469f-a165-70867728950e", None
    raise AssertionError(f"unhandled column kind {kind}")


def _to_datetime(value: Any) -> tuple[str | None, Any]:
    """ISO-8601 text (or a date/datetime from YAML); a date means midnight UTC, no offset means UTC."""
    hint = "expected an ISO-8601 timestamp such as 2026-10-01T02:00:00Z or a date such as 2026-10-01"
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value)
        except ValueError:
            return hint, None
    if isinstance(value, dt.datetime):
        return None, (value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC))
    if isinstance(value, dt.date):
        return None, dt.datetime(value.year, value.month, value.day, tzinfo=dt.UTC)
    return f"{hint}, got {type(value).__name__}", None


def _json_value_kind(value: Any) -> str | None:
    if isinstance(value, bool):
        return "json-boolean"
    if isinstance(value, int | float):
        return "json-number"
    if isinstance(value, str):
        return "json-string"
    return None


def _ends_with_lone_escape(pattern: str) -> bool:
    trailing = len(pattern) - len(pattern.rstrip("\\"))
    return trailing % 2 == 1


def _jsonable(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    return value


def _show(value: Any, limit: int = 200) -> str:
    try:
        text = json.dumps(value, default=str, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _suggest(name: Any, choices: Iterable[str]) -> str:
    if not isinstance(name, str):
        return ""
    lowered = {choice.lower(): choice for choice in choices}
    close = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.6)
    return f" (did you mean {lowered[close[0]]!r}?)" if close else ""
