"""The filter engine: filter rules + group_by → ONE SQL statement → sub-groups of raw data packages.

Rows are filtered and grouped by the database; Python only turns the grouped rows into ``SubGroup`` values
(key encoding, sorting). Every rule value is a bound parameter. The statement is the same SQLAlchemy Select
on PostgreSQL and SQLite (the dialect differences live in ``grouping.sql``).
"""

from __future__ import annotations

import datetime as dt
import json
import operator
import uuid
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import (
    Integer,
    Select,
    String,
    and_,
    any_,
    bindparam,
    case,
    cast,
    false,
    func,
    literal,
    or_,
    select,
    tuple_,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.expression import Alias, FromClause

from ccat_dagster.grouping import sql
from ccat_dagster.grouping.catalog import (
    DIMENSIONS,
    JOIN_GRAPH,
    ROOT_TABLE,
    SMALL_TABLES,
    TABLE_MAP,
    join_path,
)
from ccat_dagster.grouping.keys import encode_sub_group_key
from ccat_dagster.grouping.rules import (
    LIST_OPERATORS,
    FilterRule,
    parse_rules,
    validate_group_by,
)
from ccat_dagster.opsdb.enums import PackageState

__all__ = ["SubGroup", "compile_query", "compile_touched_query", "resolve", "resolve_touched"]

# Short, stable table aliases keep the generated SQL readable in logs and EXPLAIN output.
_ALIASES = {
    "RawDataPackage": "rdp",
    "ExecutedObsUnit": "eou",
    "ObsUnit": "ou",
    "Source": "src",
    "ObservingProgram": "prog",
    "InstrumentModule": "imod",
    "Instrument": "inst",
}


@dataclass(frozen=True)
class SubGroup:
    """One sub-group: its key, its dimension values (group_by order), its member packages (sorted ids)."""

    key: str
    dimensions: tuple[tuple[str, str | None], ...]
    package_ids: tuple[int, ...]
    package_count: int
    total_bytes: int


RuleInput = Sequence[FilterRule] | Sequence[Any]


def compile_query(
    *,
    filter_rules: RuleInput,
    group_by: Sequence[str],
    instrument_module_id: int | None = None,
    package_ids: Collection[int] | None = None,
    only_archived: bool = True,
) -> Select[Any]:
    """The one Select that ``resolve`` runs (validates rules and group_by first; raises FilterRuleError)."""
    rules, dims = _validated(filter_rules, group_by)
    parts = _QueryParts.build(rules, dims, instrument_module_id=instrument_module_id, only_archived=only_archived)
    if package_ids is not None:
        parts.where.append(sql.id_in_list(parts.root.c.id, sql.id_list_param(list(package_ids))))
    return parts.grouped_select()


def compile_touched_query(
    *,
    filter_rules: RuleInput,
    group_by: Sequence[str],
    instrument_module_id: int | None = None,
    changed_package_ids: Collection[int],
    only_archived: bool = True,
) -> Select[Any]:
    """The one Select that ``resolve_touched`` runs.

    The inner query maps the changed packages that pass the rules to their group identities (a few rows via
    the primary key); the outer query reads the complete membership of only those groups.
    """
    rules, dims = _validated(filter_rules, group_by)
    options = {"instrument_module_id": instrument_module_id, "only_archived": only_archived}
    outer = _QueryParts.build(rules, dims, **options)  # type: ignore[arg-type]
    inner = _QueryParts.build(rules, dims, alias_suffix="_changed", **options)  # type: ignore[arg-type]
    inner.where.append(sql.id_in_list(inner.root.c.id, sql.id_list_param(list(changed_package_ids))))
    if not dims:
        outer.where.append(select(literal(1)).select_from(inner.from_clause).where(*inner.where).exists())
    else:
        touched = select(*inner.match_exprs).select_from(inner.from_clause).where(*inner.where)
        if len(outer.match_exprs) == 1:
            (expr,) = outer.match_exprs
            # PostgreSQL: the touched identities as ONE array, computed first (an InitPlan). As ``IN (subquery)``
            # the planner over-estimated the touched groups (~3,700 for 500 in a 5,000-package sweep page) and
            # read the whole table into a hash join instead of the index per group: linear in the archive.
            identities = select(func.array_agg(func.distinct(inner.match_exprs[0])))
            identities = identities.select_from(inner.from_clause).where(*inner.where).scalar_subquery()
            outer.where.append(sql.dialect_choice(expr == any_(cast(identities, ARRAY(expr.type))), expr.in_(touched)))
        else:
            outer.where.append(tuple_(*outer.match_exprs).in_(touched))
    return outer.grouped_select()


def resolve(
    session: Session,
    *,
    filter_rules: RuleInput,
    group_by: Sequence[str],
    instrument_module_id: int | None = None,
    package_ids: Collection[int] | None = None,
    only_archived: bool = True,
) -> list[SubGroup]:
    """The sub-groups of the grouping, sorted by key, in ONE SQL statement.

    ``filter_rules``: FilterRules or raw rule mappings (validated here). ``group_by``: dimension names; ``[]``
    gives one sub-group ``all`` (none when nothing matches). ``instrument_module_id`` scopes the grouping to
    one module. ``package_ids`` restricts the members to these packages. ``only_archived`` keeps only
    packages in state archived. Packages with an ``invalidated_reason`` are never members.
    """
    statement = compile_query(
        filter_rules=filter_rules,
        group_by=group_by,
        instrument_module_id=instrument_module_id,
        package_ids=package_ids,
        only_archived=only_archived,
    )
    return _sub_groups(session, statement, validate_group_by(group_by))


def resolve_touched(
    session: Session,
    *,
    filter_rules: RuleInput,
    group_by: Sequence[str],
    instrument_module_id: int | None,
    changed_package_ids: Collection[int],
    only_archived: bool = True,
) -> list[SubGroup]:
    """The sub-groups holding at least one of ``changed_package_ids``, each with ALL its members.

    One SQL statement; its cost grows with the touched sub-groups, not with the archive (except for
    ``group_by: []``, whose one sub-group is the whole grouping). Changed packages that do not pass the rules
    (or are not archived when ``only_archived``) touch nothing.
    """
    if not changed_package_ids:
        validate_group_by(group_by)
        parse_rules(filter_rules)
        return []
    statement = compile_touched_query(
        filter_rules=filter_rules,
        group_by=group_by,
        instrument_module_id=instrument_module_id,
        changed_package_ids=changed_package_ids,
        only_archived=only_archived,
    )
    return _sub_groups(session, statement, validate_group_by(group_by))


# ---------------------------------------------------------------------------------------------- internals


def _validated(filter_rules: RuleInput, group_by: Sequence[str]) -> tuple[list[FilterRule], list[str]]:
    # Re-validating FilterRules too is cheap, and protects against hand-built invalid ones.
    return parse_rules(filter_rules), validate_group_by(group_by)


@dataclass
class _QueryParts:
    """The joined tables, conditions and group expressions of one filtered (sub)query, own aliases."""

    tables: dict[str, Alias]
    from_clause: FromClause
    where: list[ColumnElement[bool]]
    dims: list[str]
    group_exprs: list[ColumnElement[Any]] = field(default_factory=list)

    @property
    def root(self) -> Alias:
        return self.tables[ROOT_TABLE]

    @property
    def match_exprs(self) -> list[ColumnElement[Any]]:
        """Group identity as NOT NULL expressions: matching touched groups is a plain (hashable) equality."""
        exprs: list[ColumnElement[Any]] = []
        for name, expr in zip(self.dims, self.group_exprs, strict=True):
            if name == "line":
                # A NULL line is its own group: compare (coalesce, is-null) pairs, which are never NULL.
                exprs.extend([func.coalesce(expr, ""), expr.is_(None)])
            else:
                exprs.append(expr)
        return exprs

    @classmethod
    def build(
        cls,
        rules: Sequence[FilterRule],
        dims: Sequence[str],
        *,
        instrument_module_id: int | None,
        only_archived: bool,
        alias_suffix: str = "",
    ) -> _QueryParts:
        group_tables = {DIMENSIONS[d].group[0] for d in dims}
        joined, lookups = _plan_tables(rules, group_tables)
        tables, from_clause = _join(ROOT_TABLE, joined, alias_suffix)
        root = tables[ROOT_TABLE]
        # Conditions the scan of raw_data_package can check without a join, cheapest first.
        scan: list[ColumnElement[bool]] = [root.c.invalidated_reason.is_(None)]
        if only_archived:
            scan.append(root.c.state == PackageState.ARCHIVED)
        if instrument_module_id is not None:
            scan.append(root.c.instrument_module_id == instrument_module_id)
        json_conditions: list[ColumnElement[bool]] = []
        other: list[ColumnElement[bool]] = []
        lookup_rules: dict[str, list[FilterRule]] = {}
        for rule in rules:
            if rule.table in lookups:
                lookup_rules.setdefault(lookups[rule.table], []).append(rule)
                continue
            condition = _condition(rule, tables)
            if rule.column_info.kind == "json":
                json_conditions.append(condition)
            elif rule.table == ROOT_TABLE:
                scan.append(condition)
            else:
                other.append(condition)
        for subtree_root, subtree_rules in lookup_rules.items():
            lookup = _lookup_condition(subtree_root, subtree_rules, tables, alias_suffix)
            (scan if JOIN_GRAPH[subtree_root].parent == ROOT_TABLE else other).append(lookup)
        where = [*scan, *other]
        if json_conditions:
            # PostgreSQL orders a scan's conditions by estimated cost, and rates a JSON test as cheap as a
            # comparison; the CASE makes it test JSON only on packages that passed every other scan condition.
            where.append(case((and_(*scan), and_(*json_conditions)), else_=false()))
        parts = cls(tables, from_clause, where, list(dims))
        for name in dims:
            table, column = DIMENSIONS[name].group
            expr: ColumnElement[Any] = tables[table].c[column]
            if DIMENSIONS[name].transform == "utc_date":
                expr = sql.utc_date(expr)
            parts.group_exprs.append(expr)
        return parts

    def grouped_select(self) -> Select[Any]:
        """Aggregate the filtered packages per group, then look up the labels once per group (not per row)."""
        root = self.root
        group_columns = [expr.label(f"g{index}") for index, expr in enumerate(self.group_exprs)]
        aggregated = select(
            *group_columns,
            sql.aggregate_ids(root.c.id).label("package_ids"),
            func.count(root.c.id).label("package_count"),
            func.coalesce(func.sum(root.c.size_bytes), 0).label("total_bytes"),
        ).select_from(self.from_clause)
        aggregated = aggregated.where(and_(*self.where))
        if self.group_exprs:
            aggregated = aggregated.group_by(*self.group_exprs)
        groups = aggregated.subquery("groups")

        from_clause: FromClause = groups
        labels: list[ColumnElement[Any]] = []
        for index, name in enumerate(self.dims):
            dimension = DIMENSIONS[name]
            value = groups.c[f"g{index}"]
            if dimension.label_root is None:
                labels.append(sql.uuid_text(value) if dimension.transform == "uuid_text" else value)
                continue
            label_tables, from_clause = _join(
                dimension.label_root,
                dimension.label_tables,
                f"_{index}",
                onto=from_clause,
                on_key=value,
            )
            labels.extend(label_tables[table].c[column] for table, column in dimension.labels)
        return select(
            *(label.label(f"label{i}") for i, label in enumerate(labels)),
            groups.c.package_ids,
            groups.c.package_count,
            groups.c.total_bytes,
        ).select_from(from_clause)


def _plan_tables(rules: Sequence[FilterRule], group_tables: Collection[str]) -> tuple[set[str], dict[str, str]]:
    """Which tables to join, and which rule tables to read as an id look-up instead (→ their subtree root).

    A rule on a SMALL_TABLES table that no dimension needs becomes a look-up: the topmost small table on its
    path that is not otherwise joined is the subtree root; its parent is joined and checks the ids.
    """
    needed = set(group_tables) | {r.table for r in rules if r.table not in SMALL_TABLES}
    joined = {ROOT_TABLE} | {edge.table for table in needed for edge in join_path(table)}
    lookups: dict[str, str] = {}
    for rule in rules:
        if rule.table in joined or rule.table in lookups:
            continue
        path = [edge.table for edge in join_path(rule.table)]
        top = len(path) - 1
        while top > 0 and path[top - 1] in SMALL_TABLES and path[top - 1] not in joined:
            top -= 1
        lookups[rule.table] = path[top]
        joined |= {ROOT_TABLE} | {edge.table for edge in join_path(JOIN_GRAPH[path[top]].parent)}
    return joined, lookups


def _lookup_condition(
    subtree_root: str, rules: list[FilterRule], tables: dict[str, Alias], alias_suffix: str
) -> ColumnElement[bool]:
    """``parent.fk`` is one of the ids of ``subtree_root`` rows that pass ``rules`` (on its subtree).

    PostgreSQL: ``fk = ANY((SELECT array_agg(id) ...))``, computed once per query (an InitPlan) and checked
    in the scan. SQLite: ``fk IN (SELECT id ...)``, which it evaluates once into an index.
    """
    edge = JOIN_GRAPH[subtree_root]
    sub_tables, sub_from = _join(subtree_root, {rule.table for rule in rules}, alias_suffix + "_lookup")
    conditions = [_condition(rule, sub_tables) for rule in rules]
    foreign_key = tables[edge.parent].c[edge.foreign_key]
    key = sub_tables[subtree_root].c[edge.key]
    ids = select(func.array_agg(key)).select_from(sub_from).where(*conditions).scalar_subquery()
    return sql.dialect_choice(
        # The CAST keeps "= ANY (array)" from being read as "= ANY (subquery)".
        foreign_key == any_(cast(ids, ARRAY(Integer))),
        foreign_key.in_(select(key).select_from(sub_from).where(*conditions)),
    )


def _join(
    start: str,
    needed: Collection[str],
    alias_suffix: str,
    *,
    onto: FromClause | None = None,
    on_key: ColumnElement[Any] | None = None,
) -> tuple[dict[str, Alias], FromClause]:
    """Alias ``start`` and join every ``needed`` table along the join graph (parents before children).

    With ``onto``, ``start`` is joined to that FROM clause on ``start.id = on_key`` (label look-ups).
    """
    start_alias = TABLE_MAP[start].alias(_ALIASES[start] + alias_suffix)
    tables = {start: start_alias}
    from_clause: FromClause = start_alias
    if onto is not None:
        assert on_key is not None
        from_clause = onto.join(start_alias, start_alias.c.id == on_key)
    for table in TABLE_MAP:
        if table not in needed:
            continue
        path = join_path(table)
        # Only the part of the root path below ``start`` (label look-ups start below the root).
        names = [edge.table for edge in path]
        if start != ROOT_TABLE:
            path = path[names.index(start) + 1 :] if start in names else []
        for edge in path:
            if edge.table in tables:
                continue
            alias = TABLE_MAP[edge.table].alias(_ALIASES[edge.table] + alias_suffix)
            tables[edge.table] = alias
            from_clause = from_clause.join(alias, tables[edge.parent].c[edge.foreign_key] == alias.c[edge.key])
    return tables, from_clause


_COMPARISONS: dict[str, Callable[[Any, Any], ColumnElement[bool]]] = {
    "eq": operator.eq,
    "gt": operator.gt,
    "gte": operator.ge,
    "lt": operator.lt,
    "lte": operator.le,
}
_JSON_EXTRACTORS = {
    "json-number": sql.json_number,
    "json-string": sql.json_text,
    "json-boolean": sql.json_boolean,
}
_JSONPATH_OPERATORS = {"eq": "==", "neq": "==", "gt": ">", "gte": ">=", "lt": "<", "lte": "<="}


def _condition(rule: FilterRule, tables: dict[str, Alias]) -> ColumnElement[bool]:
    column = tables[rule.table].c[rule.column]
    kind = rule.value_kind
    if kind in _JSON_EXTRACTORS:
        extracted = _JSON_EXTRACTORS[kind](column, sql.json_path_param(rule.json_keys))
        generic = _comparison(rule, extracted, kind, nullable=True)
        if rule.operator == "like":
            return generic
        # On PostgreSQL a strict-mode jsonpath test reads the JSONB value once and compares it typed, about
        # twice as fast over a large archive as extracting and casting it; same semantics (see the docstring
        # of sql.pg_json_path_exists and docs/groupings.md).
        return sql.dialect_choice(_jsonpath_condition(rule, column), generic)
    return _comparison(rule, column, kind, nullable=rule.column_info.nullable)


def _comparison(rule: FilterRule, expr: ColumnElement[Any], kind: str, *, nullable: bool) -> ColumnElement[bool]:
    op, value = rule.operator, rule.value
    if value is None:
        return expr.is_(None) if op == "eq" else expr.is_not(None)
    if op == "like":
        return sql.case_sensitive_like(expr, sql.like_param(value))
    if op in ("gt", "gte", "lt", "lte") and kind in ("string", "json-string"):
        expr = sql.binary_order(expr)
    if op in _COMPARISONS:
        return _COMPARISONS[op](expr, value)
    if op == "neq":
        # "not equal" includes packages where the value is NULL / the JSON key is missing (docs/groupings.md).
        return expr.is_distinct_from(value) if nullable else expr != value
    assert op in LIST_OPERATORS
    if op == "in":
        return expr.in_(list(value))
    not_in = expr.not_in(list(value))
    return or_(expr.is_(None), not_in) if nullable else not_in


def _jsonpath_condition(rule: FilterRule, column: ColumnElement[Any]) -> ColumnElement[bool]:
    values = list(rule.value) if rule.operator in LIST_OPERATORS else [rule.value]
    symbol = "==" if rule.operator in LIST_OPERATORS else _JSONPATH_OPERATORS[rule.operator]
    predicate = " || ".join(f"@ {symbol} $v{index}" for index in range(len(values)))
    # Keys are validated to [A-Za-z0-9_-]+; the path and the values are bound parameters all the same.
    path = "strict $" + "".join(f'."{key}"' for key in rule.json_keys) + f" ? ({predicate})"
    variables = json.dumps({f"v{index}": value for index, value in enumerate(values)})
    exists = sql.pg_json_path_exists(
        column, bindparam(None, path, type_=String()), bindparam(None, variables, type_=String())
    )
    if rule.operator in ("neq", "not_in"):
        return ~func.coalesce(exists, False)
    return exists


def _instrument_module_label(instrument: str, module: str) -> str:
    # "<instrument>.<module>": escaping "." and "%" in the instrument name keeps the pair injective.
    return f"{instrument.replace('%', '%25').replace('.', '%2E')}.{module}"


def scan_label(start_time: dt.datetime | None, executed_obs_unit_id: Any) -> str:
    """A scan as people recognise it: ``<UTC start to the minute>_<id prefix>``, e.g. ``20261001T0100_6831946f``.

    The start is what tells the scans of a pipeline apart (its raw data packages are usually named after it), and
    the whole key stays short enough for the Dagster UI's partition list, which cuts longer keys in the middle.
    The first 8 hex digits of the ExecutedObsUnit id keep scans that started in the same minute apart (several
    instrument modules observing at once). The obs unit is not part of the label: the pipeline's grouping
    usually selects one, and the sub-group's members name it.
    """
    identifier = (
        executed_obs_unit_id if isinstance(executed_obs_unit_id, uuid.UUID) else uuid.UUID(str(executed_obs_unit_id))
    )
    if start_time is None:
        start = "nostart"
    else:
        if start_time.tzinfo is not None:
            start_time = start_time.astimezone(dt.UTC)
        start = start_time.strftime("%Y%m%dT%H%M")
    return f"{start}_{identifier.hex[:8]}"


def _dimension_value(name: str, row: Sequence[Any], at: int) -> str | None:
    if name == "instrument_module":
        return _instrument_module_label(row[at], row[at + 1])
    if name == "scan":
        return scan_label(_datetime(row[at]), row[at + 1])
    return _label(row[at])


def _datetime(value: Any) -> dt.datetime | None:
    # A label column read through a subquery may come back as text on SQLite.
    if value is None or isinstance(value, dt.datetime):
        return value
    parsed = dt.datetime.fromisoformat(str(value))
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=dt.UTC)


def _label(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, dt.date):
        return value.isoformat()
    return str(value)


def _sub_groups(session: Session, statement: Select[Any], dims: Sequence[str]) -> list[SubGroup]:
    # Column positions of each dimension's labels in the result row (instrument_module has two).
    positions: list[tuple[str, int]] = []
    position = 0
    for name in dims:
        positions.append((name, position))
        position += len(DIMENSIONS[name].labels) or 1
    ids_at, count_at, bytes_at = position, position + 1, position + 2
    result: list[SubGroup] = []
    # Rows are consumed as plain tuples: with ~100,000 per-scan sub-groups the per-row cost matters.
    for row in session.execute(statement).tuples():
        count = int(row[count_at])
        if count == 0:
            continue  # group_by [] over no matching package: no sub-group at all
        dimensions = tuple((name, _dimension_value(name, row, at)) for name, at in positions)
        ids = row[ids_at]
        ids.sort()
        result.append(
            SubGroup(
                key=encode_sub_group_key(dimensions),
                dimensions=dimensions,
                package_ids=tuple(ids),
                package_count=count,
                total_bytes=int(row[bytes_at]),
            )
        )
    result.sort(key=lambda sub_group: sub_group.key)
    return result
