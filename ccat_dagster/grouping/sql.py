"""SQL constructs whose text differs between PostgreSQL and SQLite, so one Select serves both dialects.

Every user value reaches the database as a bound parameter; the dialect-specific parts (JSON access, the UTC
date, id lists, aggregation, case-sensitive LIKE) are rendered by the ``@compiles`` functions below, and the
type decorators convert the bound values per dialect (a JSON path is a ``text[]`` on PostgreSQL and a
``$."a"."b"`` path on SQLite).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Boolean, Date, Float, Integer, String, Text, TypeDecorator, bindparam
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement

# ------------------------------------------------------------------------------------------ bound values


class JsonPathType(TypeDecorator[Sequence[str]]):
    """A JSON path given as a tuple of object keys, bound the way each dialect wants it."""

    impl = String
    cache_ok = True

    def load_dialect_impl(self, dialect: Any) -> Any:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(ARRAY(Text))
        return dialect.type_descriptor(String())

    def process_bind_param(self, value: Sequence[str] | None, dialect: Any) -> Any:
        if value is None:
            return None
        if dialect.name == "postgresql":
            return list(value)
        # Keys are validated to [A-Za-z0-9_-]+ (rules.py); quoting them keeps e.g. "1a" an object key.
        return "$" + "".join(f'."{key}"' for key in value)


class IdListType(TypeDecorator[Sequence[int]]):
    """A list of integer ids as ONE bound parameter: an integer[] on PostgreSQL, a JSON array on SQLite.

    integer[], the type of the id columns: ``int4 = ANY(int8[])`` is a cross-type comparison that PostgreSQL
    cannot hash, so a filter on thousands of ids compared each row with every id (seconds at 5,000 ids).
    """

    impl = String
    cache_ok = True

    def load_dialect_impl(self, dialect: Any) -> Any:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(ARRAY(Integer))
        return dialect.type_descriptor(String())

    def process_bind_param(self, value: Sequence[int] | None, dialect: Any) -> Any:
        if value is None:
            return None
        ids = sorted({int(v) for v in value})
        return ids if dialect.name == "postgresql" else json.dumps(ids)


class LikePatternType(TypeDecorator[str]):
    """A LIKE pattern (``%``, ``_``, ``\\`` escapes); on SQLite translated to case-sensitive GLOB syntax."""

    impl = String
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Any) -> str | None:
        if value is None or dialect.name == "postgresql":
            return value
        return like_to_glob(value)


class AggregatedIdsType(TypeDecorator[list[int]]):
    """The member ids of one group: a list from PostgreSQL's array_agg, a text from SQLite's group_concat."""

    impl = String
    cache_ok = True

    def process_result_value(self, value: Any, dialect: Any) -> list[int]:
        if value is None:
            return []
        if isinstance(value, str):
            return [int(part) for part in value.split(",")]
        return value  # psycopg2 already returns a fresh list


def like_to_glob(pattern: str) -> str:
    """``%`` → ``*``, ``_`` → ``?``, ``\\x`` → literal x; GLOB's own ``* ? [`` become bracket sets."""
    out: list[str] = []
    chars = iter(pattern)
    for char in chars:
        if char == "\\":
            char = next(chars, "\\")
            out.append(_glob_literal(char))
        elif char == "%":
            out.append("*")
        elif char == "_":
            out.append("?")
        else:
            out.append(_glob_literal(char))
    return "".join(out)


def _glob_literal(char: str) -> str:
    return f"[{char}]" if char in "*?[" else char


def json_path_param(keys: Sequence[str]) -> Any:
    return bindparam(None, tuple(keys), type_=JsonPathType())


def like_param(pattern: str) -> Any:
    return bindparam(None, pattern, type_=LikePatternType())


def id_list_param(ids: Sequence[int]) -> Any:
    return bindparam(None, list(ids), type_=IdListType())


# -------------------------------------------------------------------------------------------- expressions


class json_number(FunctionElement[float]):
    """The number at a path of a JSON column, NULL where it is absent or not a JSON number."""

    type = Float()
    inherit_cache = True
    name = "json_number"


class json_text(FunctionElement[str]):
    """The string at a path of a JSON column, NULL where it is absent or not a JSON string."""

    type = String()
    inherit_cache = True
    name = "json_text"


class json_boolean(FunctionElement[bool]):
    """The boolean at a path of a JSON column, NULL where it is absent or not a JSON boolean."""

    type = Boolean()
    inherit_cache = True
    name = "json_boolean"


class utc_date(FunctionElement[Any]):
    """The UTC calendar date of a UTC timestamp column."""

    type = Date()
    inherit_cache = True
    name = "utc_date"


class id_in_list(FunctionElement[bool]):
    """``column`` is one of the ids of an ``id_list_param`` (one bound parameter for any number of ids)."""

    type = Boolean()
    inherit_cache = True
    name = "id_in_list"


class aggregate_ids(FunctionElement[list[int]]):
    """All values of an integer column in the group (unordered)."""

    type = AggregatedIdsType()
    inherit_cache = True
    name = "aggregate_ids"


class case_sensitive_like(FunctionElement[bool]):
    """``column LIKE pattern`` with the same case-sensitive meaning on both dialects."""

    type = Boolean()
    inherit_cache = True
    name = "case_sensitive_like"


class binary_order(FunctionElement[str]):
    """A text compared by code point on both dialects (PostgreSQL's default collation is locale-dependent)."""

    type = String()
    inherit_cache = True
    name = "binary_order"


def _args(element: FunctionElement[Any], compiler: Any, **kw: Any) -> list[str]:
    return [compiler.process(clause, **kw) for clause in element.clauses]


_PG_JSON_TYPE_TEST = "CASE WHEN jsonb_typeof({col} #> {path}) = '{json_type}' THEN {value} END"


@compiles(json_number, "postgresql")
def _pg_json_number(element: json_number, compiler: Any, **kw: Any) -> str:
    col, path = _args(element, compiler, **kw)
    value = f"CAST(({col} #>> {path}) AS DOUBLE PRECISION)"
    return _PG_JSON_TYPE_TEST.format(col=col, path=path, json_type="number", value=value)


@compiles(json_text, "postgresql")
def _pg_json_text(element: json_text, compiler: Any, **kw: Any) -> str:
    col, path = _args(element, compiler, **kw)
    return _PG_JSON_TYPE_TEST.format(col=col, path=path, json_type="string", value=f"({col} #>> {path})")


@compiles(json_boolean, "postgresql")
def _pg_json_boolean(element: json_boolean, compiler: Any, **kw: Any) -> str:
    col, path = _args(element, compiler, **kw)
    value = f"CAST(({col} #>> {path}) AS BOOLEAN)"
    return _PG_JSON_TYPE_TEST.format(col=col, path=path, json_type="boolean", value=value)


@compiles(json_number, "sqlite")
def _sqlite_json_number(element: json_number, compiler: Any, **kw: Any) -> str:
    col, path = _args(element, compiler, **kw)
    return f"CASE WHEN json_type({col}, {path}) IN ('integer', 'real') THEN json_extract({col}, {path}) END"


@compiles(json_text, "sqlite")
def _sqlite_json_text(element: json_text, compiler: Any, **kw: Any) -> str:
    col, path = _args(element, compiler, **kw)
    return f"CASE WHEN json_type({col}, {path}) = 'text' THEN json_extract({col}, {path}) END"


@compiles(json_boolean, "sqlite")
def _sqlite_json_boolean(element: json_boolean, compiler: Any, **kw: Any) -> str:
    col, path = _args(element, compiler, **kw)
    return f"CASE WHEN json_type({col}, {path}) IN ('true', 'false') THEN json_extract({col}, {path}) END"


@compiles(utc_date, "postgresql")
def _pg_utc_date(element: utc_date, compiler: Any, **kw: Any) -> str:
    (col,) = _args(element, compiler, **kw)
    return f"CAST(({col} AT TIME ZONE 'UTC') AS DATE)"


@compiles(utc_date, "sqlite")
def _sqlite_utc_date(element: utc_date, compiler: Any, **kw: Any) -> str:
    # SQLite stores ops-db timestamps as naive UTC text (models.UtcDateTime).
    (col,) = _args(element, compiler, **kw)
    return f"date({col})"


@compiles(id_in_list, "postgresql")
def _pg_id_in_list(element: id_in_list, compiler: Any, **kw: Any) -> str:
    col, ids = _args(element, compiler, **kw)
    return f"{col} = ANY({ids})"


@compiles(id_in_list, "sqlite")
def _sqlite_id_in_list(element: id_in_list, compiler: Any, **kw: Any) -> str:
    col, ids = _args(element, compiler, **kw)
    return f"{col} IN (SELECT value FROM json_each({ids}))"


@compiles(aggregate_ids, "postgresql")
def _pg_aggregate_ids(element: aggregate_ids, compiler: Any, **kw: Any) -> str:
    (col,) = _args(element, compiler, **kw)
    return f"array_agg({col})"


@compiles(aggregate_ids, "sqlite")
def _sqlite_aggregate_ids(element: aggregate_ids, compiler: Any, **kw: Any) -> str:
    (col,) = _args(element, compiler, **kw)
    return f"group_concat({col})"


@compiles(case_sensitive_like, "postgresql")
def _pg_like(element: case_sensitive_like, compiler: Any, **kw: Any) -> str:
    # PostgreSQL's LIKE is case-sensitive and its default escape character is the backslash.
    col, pattern = _args(element, compiler, **kw)
    return f"({col} LIKE {pattern})"


@compiles(case_sensitive_like, "sqlite")
def _sqlite_like(element: case_sensitive_like, compiler: Any, **kw: Any) -> str:
    # SQLite's LIKE ignores ASCII case; GLOB does not (the pattern is translated by LikePatternType).
    col, pattern = _args(element, compiler, **kw)
    return f"({col} GLOB {pattern})"


@compiles(binary_order, "postgresql")
def _pg_binary_order(element: binary_order, compiler: Any, **kw: Any) -> str:
    (col,) = _args(element, compiler, **kw)
    return f'({col} COLLATE "C")'


@compiles(binary_order, "sqlite")
def _sqlite_binary_order(element: binary_order, compiler: Any, **kw: Any) -> str:
    (col,) = _args(element, compiler, **kw)
    return f"({col})"


class uuid_text(FunctionElement[str]):
    """A UUID column as canonical text (lower-case, hyphenated), the same on both dialects."""

    type = String()
    inherit_cache = True
    name = "uuid_text"


class pg_json_path_exists(FunctionElement[bool]):
    """PostgreSQL ``jsonb_path_exists(column, path, vars, silent => true)``; path and vars are bound values.

    Strict mode: a missing key, an array or a value of another JSON type never matches (NULL result).
    """

    type = Boolean()
    inherit_cache = True
    name = "pg_json_path_exists"


class dialect_choice(FunctionElement[bool]):
    """The first expression on PostgreSQL, the second on SQLite (the same condition written two ways)."""

    type = Boolean()
    inherit_cache = True
    name = "dialect_choice"


@compiles(uuid_text, "postgresql")
def _pg_uuid_text(element: uuid_text, compiler: Any, **kw: Any) -> str:
    (col,) = _args(element, compiler, **kw)
    return f"CAST({col} AS TEXT)"


@compiles(uuid_text, "sqlite")
def _sqlite_uuid_text(element: uuid_text, compiler: Any, **kw: Any) -> str:
    # SQLAlchemy stores a Uuid on SQLite as 32 hex digits without hyphens.
    (col,) = _args(element, compiler, **kw)
    parts = " || '-' || ".join(f"substr({col}, {start}, {length})" for start, length in _UUID_GROUPS)
    return f"lower({parts})"


_UUID_GROUPS = ((1, 8), (9, 4), (13, 4), (17, 4), (21, 12))


@compiles(pg_json_path_exists)
def _pg_json_path_exists(element: pg_json_path_exists, compiler: Any, **kw: Any) -> str:
    col, path, variables = _args(element, compiler, **kw)
    return f"jsonb_path_exists({col}, CAST({path} AS JSONPATH), CAST({variables} AS JSONB), true)"


@compiles(dialect_choice)
def _postgresql_choice(element: dialect_choice, compiler: Any, **kw: Any) -> str:
    postgresql_expr, _ = list(element.clauses)
    return f"({compiler.process(postgresql_expr, **kw)})"


@compiles(dialect_choice, "sqlite")
def _sqlite_choice(element: dialect_choice, compiler: Any, **kw: Any) -> str:
    _, sqlite_expr = list(element.clauses)
    # Parenthesised: the condition may be an OR inside the surrounding AND.
    return f"({compiler.process(sqlite_expr, **kw)})"


# Without a dialect (``str(statement)`` while debugging) render the PostgreSQL form.
for _construct, _render in (
    (json_number, _pg_json_number),
    (json_text, _pg_json_text),
    (json_boolean, _pg_json_boolean),
    (utc_date, _pg_utc_date),
    (id_in_list, _pg_id_in_list),
    (aggregate_ids, _pg_aggregate_ids),
    (case_sensitive_like, _pg_like),
    (binary_order, _pg_binary_order),
    (uuid_text, _pg_uuid_text),
):
    compiles(_construct)(_render)

__all__ = [
    "aggregate_ids",
    "binary_order",
    "case_sensitive_like",
    "dialect_choice",
    "id_in_list",
    "id_list_param",
    "json_boolean",
    "json_number",
    "json_path_param",
    "json_text",
    "like_param",
    "like_to_glob",
    "pg_json_path_exists",
    "utc_date",
    "uuid_text",
]
