"""What the filter engine may touch: the tables, their columns, the join graph and the group_by dimensions.

All of it is data: a new filterable table is one ``TABLE_MAP`` entry plus one ``JOIN_GRAPH`` edge; a new
dimension is one ``DIMENSIONS`` entry. Columns are read from the ops-db models, so a new model column is
filterable without a code change. Importing this module needs no database.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    Integer,
    Numeric,
    String,
    Table,
    TypeDecorator,
    Uuid,
)
from sqlalchemy import Enum as SqlEnum
from sqlalchemy.types import TypeEngine

from ccat_dagster.opsdb import models as m

ROOT_TABLE = "RawDataPackage"

ColumnKind = Literal["string", "enum", "integer", "float", "boolean", "datetime", "uuid", "json"]

# Logical table name (the ops-db model class name, as CCAT writes rules) → ops-db table.
TABLE_MAP: MappingProxyType[str, Table] = MappingProxyType(
    {
        "RawDataPackage": m.RawDataPackage.__table__,  # type: ignore[dict-item]
        "ExecutedObsUnit": m.ExecutedObsUnit.__table__,  # type: ignore[dict-item]
        "ObsUnit": m.ObsUnit.__table__,  # type: ignore[dict-item]
        "Source": m.Source.__table__,  # type: ignore[dict-item]
        "ObservingProgram": m.ObservingProgram.__table__,  # type: ignore[dict-item]
        "InstrumentModule": m.InstrumentModule.__table__,  # type: ignore[dict-item]
        "Instrument": m.Instrument.__table__,  # type: ignore[dict-item]
    }
)


@dataclass(frozen=True)
class JoinEdge:
    """How to reach ``table`` from its parent on the way from the root: ``parent.foreign_key = table.key``.

    Every foreign key on these paths is NOT NULL, so inner joins never drop a package.
    """

    table: str
    parent: str
    foreign_key: str
    key: str = "id"


# The join graph is a tree rooted at RawDataPackage; each table names the edge that leads to it.
JOIN_GRAPH: MappingProxyType[str, JoinEdge] = MappingProxyType(
    {
        "ExecutedObsUnit": JoinEdge("ExecutedObsUnit", "RawDataPackage", "executed_obs_unit_id"),
        "ObsUnit": JoinEdge("ObsUnit", "ExecutedObsUnit", "obs_unit_id"),
        "Source": JoinEdge("Source", "ObsUnit", "source_id"),
        "ObservingProgram": JoinEdge("ObservingProgram", "ObsUnit", "observing_program_id"),
        "InstrumentModule": JoinEdge("InstrumentModule", "RawDataPackage", "instrument_module_id"),
        "Instrument": JoinEdge("Instrument", "InstrumentModule", "instrument_id"),
    }
)


# Tables that hold tens of rows by nature (instruments, their modules, observing programs). A rule on them is
# evaluated once, as a list of matching ids that the scan of the table below checks, instead of as a join
# probed for every package: on PostgreSQL it lets the scan drop packages before costlier (JSON) conditions.
SMALL_TABLES = frozenset({"InstrumentModule", "Instrument", "ObservingProgram"})


def join_path(table: str) -> list[JoinEdge]:
    """The edges from the root to ``table``, root side first (``[]`` for the root itself)."""
    path: list[JoinEdge] = []
    while table != ROOT_TABLE:
        edge = JOIN_GRAPH[table]
        path.append(edge)
        table = edge.parent
    return list(reversed(path))


@dataclass(frozen=True)
class ColumnInfo:
    table: str
    name: str
    kind: ColumnKind
    nullable: bool
    enum_values: tuple[str, ...] = ()

    @property
    def qualified_name(self) -> str:
        return f"{self.table}.{self.name}"


def _kind_of(sql_type: TypeEngine) -> ColumnKind:
    if isinstance(sql_type, TypeDecorator):
        sql_type = sql_type.impl_instance
    # Order matters: Enum is a String subclass, Boolean and DateTime are checked before the generic types.
    if isinstance(sql_type, SqlEnum):
        return "enum"
    if isinstance(sql_type, JSON):
        return "json"
    if isinstance(sql_type, Boolean):
        return "boolean"
    if isinstance(sql_type, DateTime):
        return "datetime"
    if isinstance(sql_type, Uuid):
        return "uuid"
    if isinstance(sql_type, Integer):
        return "integer"
    if isinstance(sql_type, Float | Numeric):
        return "float"
    if isinstance(sql_type, String):
        return "string"
    raise TypeError(f"ops-db column type {sql_type!r} has no filter kind: add it to grouping.catalog._kind_of")


def _columns_of(table_name: str, table: Table) -> dict[str, ColumnInfo]:
    columns = {}
    for column in table.columns:
        kind = _kind_of(column.type)
        values: tuple[str, ...] = ()
        if kind == "enum":
            values = tuple(column.type.enums)  # type: ignore[attr-defined]
        columns[column.name] = ColumnInfo(table_name, column.name, kind, bool(column.nullable), values)
    return columns


# Logical table → column name (the database column name, e.g. RawDataPackage.metadata) → description.
COLUMNS: MappingProxyType[str, MappingProxyType[str, ColumnInfo]] = MappingProxyType(
    {name: MappingProxyType(_columns_of(name, table)) for name, table in TABLE_MAP.items()}
)


# ------------------------------------------------------------------------------------------------ dimensions


@dataclass(frozen=True)
class Dimension:
    """One group_by dimension: what the database groups on, and what the sub-group key shows.

    ``group`` is the column grouped on, chosen as the foreign key nearest the root (per-scan grouping needs no
    join at all) and an id wherever the human-readable name is not unique on its own (a module name is unique
    only within its instrument). When ``label_root`` is set, the key shows ``labels`` read from that table's
    row with id = the group value (and from its parents in the join graph), looked up once per sub-group
    after aggregation. Without ``label_root`` the group value itself is shown, after ``transform``.
    """

    name: str
    description: str
    group: tuple[str, str]
    label_root: str | None = None
    labels: tuple[tuple[str, str], ...] = ()
    transform: Literal["utc_date", "uuid_text"] | None = None

    @property
    def label_tables(self) -> frozenset[str]:
        return frozenset(table for table, _ in self.labels)


DIMENSIONS: MappingProxyType[str, Dimension] = MappingProxyType(
    {
        d.name: d
        for d in (
            Dimension(
                "executed_obs_unit",
                "one sub-group per scan (ExecutedObsUnit id, a UUID)",
                group=("RawDataPackage", "executed_obs_unit_id"),
                transform="uuid_text",
            ),
            Dimension(
                "scan",
                "one sub-group per scan (ExecutedObsUnit), named <UTC start YYYYMMDDTHHMM>_<first 8 hex digits "
                "of its id>, e.g. 20261001T0100_094daaf8",
                group=("RawDataPackage", "executed_obs_unit_id"),
                label_root="ExecutedObsUnit",
                labels=(("ExecutedObsUnit", "start_time"), ("ExecutedObsUnit", "id")),
            ),
            Dimension(
                "obs_unit",
                "one sub-group per ObsUnit (its unique name)",
                group=("ExecutedObsUnit", "obs_unit_id"),
                label_root="ObsUnit",
                labels=(("ObsUnit", "name"),),
            ),
            Dimension(
                "source",
                "one sub-group per Source (its unique name)",
                group=("ObsUnit", "source_id"),
                label_root="Source",
                labels=(("Source", "name"),),
            ),
            Dimension(
                "instrument_module",
                "one sub-group per InstrumentModule, shown as <instrument>.<module>",
                group=("RawDataPackage", "instrument_module_id"),
                label_root="InstrumentModule",
                labels=(("Instrument", "name"), ("InstrumentModule", "name")),
            ),
            Dimension(
                "instrument",
                "one sub-group per Instrument (its unique name)",
                group=("InstrumentModule", "instrument_id"),
                label_root="Instrument",
                labels=(("Instrument", "name"),),
            ),
            Dimension(
                "observing_program",
                "one sub-group per ObservingProgram (its unique short_name)",
                group=("ObsUnit", "observing_program_id"),
                label_root="ObservingProgram",
                labels=(("ObservingProgram", "short_name"),),
            ),
            Dimension(
                "line",
                "one sub-group per spectral line (ObsUnit.line_id); scans without a line form one group",
                group=("ObsUnit", "line_id"),
            ),
            Dimension(
                "obs_date",
                "one sub-group per UTC date of the scan start (ExecutedObsUnit.start_time), YYYY-MM-DD",
                group=("ExecutedObsUnit", "start_time"),
                transform="utc_date",
            ),
        )
    }
)
