"""Fixtures for the data-grouping tests: one migrated ops-db per dialect holding a small, awkward observatory.

The observatory has names with unicode, ``/``, ``=``, ``+``, spaces and dots, two sources differing only in
case, a module name used by two instruments, an instrument/module pair built to collide if keys were joined
naively, a JSON value of the wrong type, a scan whose start has a non-UTC offset, and packages in every state
(one invalidated). ``reference_resolve`` is an independent, plain-Python implementation of the documented
semantics that the SQL engine is checked against.
"""

from __future__ import annotations

import datetime as dt
import re
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from ccat_dagster.grouping.catalog import TABLE_MAP
from ccat_dagster.grouping.keys import encode_sub_group_key
from ccat_dagster.grouping.rules import LIST_OPERATORS, FilterRule, parse_rules
from ccat_dagster.opsdb import models as m
from ccat_dagster.opsdb.engine import make_engine
from ccat_dagster.opsdb.enums import ObsStatus, PackageState, SourceKind
from ccat_dagster.opsdb.migrate import upgrade

from .conftest import create_pg_database, drop_pg_database

UTC = dt.UTC


# ------------------------------------------------------------------------------------------- databases


def create_grouping_pg_database() -> str:
    return create_pg_database("ccat_test_grouping")


def drop_grouping_pg_database(url: str) -> None:
    drop_pg_database(url)


@dataclass
class GroupingDb:
    dialect: str
    url: str
    engine: Engine
    world: World


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def grouping_db(request, tmp_path_factory) -> Iterator[GroupingDb]:
    """A migrated ops-db holding ``build_world``, once per dialect per test module (tests must not commit)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('grouping') / 'opsdb.sqlite'}"
    else:
        url = create_grouping_pg_database()
    try:
        upgrade(url)
        engine = make_engine(url)
        with Session(engine) as session, session.begin():
            world = build_world(session)
        yield GroupingDb(request.param, url, engine, world)
        engine.dispose()
    finally:
        if request.param == "postgresql":
            drop_grouping_pg_database(url)


@pytest.fixture
def db_session(grouping_db: GroupingDb) -> Iterator[Session]:
    """A session whose every change is rolled back after the test (the world stays as built)."""
    with grouping_db.engine.connect() as connection:
        transaction = connection.begin()
        session = Session(bind=connection, join_transaction_mode="create_savepoint")
        try:
            yield session
        finally:
            session.close()
            transaction.rollback()


# ----------------------------------------------------------------------------------------------- world

WEIRD_SOURCE = "ρ Oph/A=1 + x"
WEIRD_LINE = "CO 4-3/β"


@dataclass
class World:
    packages: dict[str, int]
    scans: dict[str, uuid.UUID]
    modules: dict[str, int]


def build_world(session: Session) -> World:
    instruments = {
        name: m.Instrument(name=name, available=name != "Odd")
        for name in ("CHAI", "Prime-Cam", "Odd.Name", "Odd", "Twin")
    }
    module_specs = [
        ("CHAI", "LFA"),
        ("CHAI", "HFA"),
        ("Prime-Cam", "PCAM280"),
        ("Odd.Name", "M"),
        ("Odd", "Name.M"),
        ("Twin", "LFA"),
    ]
    modules = {f"{i}/{n}": m.InstrumentModule(name=n, instrument=instruments[i]) for i, n in module_specs}
    sources = {
        "NGC253": m.Source(name="NGC253", kind=SourceKind.FIXED),
        "ngc253": m.Source(name="ngc253", kind=SourceKind.FIXED),
        "Orion-KL": m.Source(name="Orion-KL", kind=SourceKind.FIXED),
        "Jupiter": m.Source(name="Jupiter", kind=SourceKind.SOLAR_SYSTEM),
        WEIRD_SOURCE: m.Source(name=WEIRD_SOURCE, kind=SourceKind.CONSTANT_ELEVATION),
    }
    programs = {
        "GEco": m.ObservingProgram(short_name="GEco", name="Galactic Ecology"),
        "Cal": m.ObservingProgram(short_name="Cal", name="Calibration"),
        "Deep Field": m.ObservingProgram(short_name="Deep Field", name="a name with a space"),
    }
    obs_units = {
        name: m.ObsUnit(name=name, source=sources[s], observing_program=programs[p], line_id=line)
        for name, s, p, line in [
            ("ngc253-co43", "NGC253", "GEco", "CO43"),
            ("ngc253-cii", "NGC253", "GEco", "CII"),
            ("lower-ngc253-co43", "ngc253", "Cal", "CO43"),
            ("orion-co43", "Orion-KL", "GEco", "CO43"),
            ("jupiter-cal", "Jupiter", "Cal", None),
            ("weird", WEIRD_SOURCE, "Deep Field", WEIRD_LINE),
        ]
    }
    scan_specs = [
        ("e1", "ngc253-co43", dt.datetime(2026, 10, 1, 1, 0, tzinfo=UTC), ObsStatus.COMPLETED),
        ("e2", "ngc253-co43", dt.datetime(2026, 10, 1, 23, 30, tzinfo=UTC), ObsStatus.COMPLETED),
        ("e3", "ngc253-cii", dt.datetime(2026, 10, 2, 0, 30, tzinfo=UTC), ObsStatus.COMPLETED),
        ("e4", "lower-ngc253-co43", dt.datetime(2026, 10, 2, 3, 0, tzinfo=UTC), ObsStatus.COMPLETED),
        ("e5", "orion-co43", dt.datetime(2026, 10, 3, 2, 0, tzinfo=UTC), ObsStatus.FAILED),
        ("e6", "jupiter-cal", dt.datetime(2026, 10, 3, 5, 0, tzinfo=UTC), ObsStatus.COMPLETED),
        ("e7", "weird", dt.datetime(2026, 10, 4, 1, 0, tzinfo=UTC), ObsStatus.COMPLETED),
        # 01:30 at UTC+5 is 20:30 UTC the day before: obs_date must say 2026-10-03.
        (
            "e8",
            "orion-co43",
            dt.datetime(2026, 10, 4, 1, 30, tzinfo=dt.timezone(dt.timedelta(hours=5))),
            ObsStatus.COMPLETED,
        ),
    ]
    scans = {
        name: m.ExecutedObsUnit(
            id=uuid.UUID(int=index + 1, version=4),
            obs_unit=obs_units[ou],
            start_time=start,
            end_time=start + dt.timedelta(minutes=30) if name != "e6" else None,
            status=status,
        )
        for index, (name, ou, start, status) in enumerate(scan_specs)
    }
    A, W, F, T = PackageState.ARCHIVED, PackageState.WAITING, PackageState.FAILED, PackageState.TRANSFERRING
    package_specs: list[tuple[str, str, str, int, PackageState, dict[str, Any], str | None]] = [
        (
            "pkg-01",
            "e1",
            "CHAI/LFA",
            100,
            A,
            {"observation": {"frequency_ghz": 461.04, "mode": "otf"}, "calibrated": True},
            None,
        ),
        (
            "pkg-02",
            "e1",
            "CHAI/HFA",
            200,
            A,
            {"observation": {"frequency_ghz": 1900.5, "mode": "raster"}, "calibrated": False},
            None,
        ),
        (
            "pkg-03",
            "e2",
            "CHAI/LFA",
            300,
            A,
            {"observation": {"frequency_ghz": 461.04, "mode": "otf"}, "calibrated": True},
            None,
        ),
        ("pkg-04", "e3", "CHAI/HFA", 400, A, {"observation": {"frequency_ghz": "n/a", "mode": "Otf"}}, None),
        (
            "pkg-05",
            "e4",
            "CHAI/LFA",
            500,
            A,
            {"observation": {"frequency_ghz": 461}, "calibrated": False},
            None,
        ),
        (
            "pkg_06%",
            "e5",
            "Twin/LFA",
            600,
            A,
            {"observation": {"frequency_ghz": 461.04, "mode": "50%_done"}},
            None,
        ),
        (
            "pkg-07",
            "e6",
            "Prime-Cam/PCAM280",
            700,
            A,
            {"observation": {"frequency_ghz": 280}, "weather": {"pwv_mm": 0.5}},
            None,
        ),
        ("pkg-08", "e7", "Odd.Name/M", 800, A, {}, None),
        ("pkg-09", "e7", "Odd/Name.M", 900, A, {"observation": None}, None),
        (
            "pkg-10",
            "e8",
            "CHAI/LFA",
            1000,
            A,
            {"observation": {"frequency_ghz": 461.04, "mode": "OTF"}},
            None,
        ),
        ("pkg-11", "e1", "Prime-Cam/PCAM280", 1100, W, {"observation": {"frequency_ghz": 280}}, None),
        ("pkg-12", "e2", "CHAI/LFA", 1200, F, {"observation": {"frequency_ghz": 461.04}}, None),
        ("pkg-13", "e5", "CHAI/LFA", 1300, A, {"observation": {"frequency_ghz": 461.04}}, "bad weather"),
        ("pkg-14", "e3", "CHAI/LFA", 1400, T, {"observation": {"frequency_ghz": 461.04}}, None),
    ]
    packages = {}
    for name, scan, module, size, state, metadata, invalid in package_specs:
        packages[name] = m.RawDataPackage(
            name=name,
            executed_obs_unit=scans[scan],
            instrument_module=modules[module],
            size_bytes=size,
            checksum=f"{size:064x}",
            state=state,
            metadata_=metadata,
            invalidated_reason=invalid,
        )
    session.add_all([*instruments.values(), *modules.values(), *sources.values(), *programs.values()])
    session.add_all([*obs_units.values(), *scans.values(), *packages.values()])
    session.flush()
    return World(
        packages={name: p.id for name, p in packages.items()},
        scans={name: s.id for name, s in scans.items()},
        modules={name: mod.id for name, mod in modules.items()},
    )


# ---------------------------------------------------------------------------------- reference semantics


def _load(session: Session) -> dict[str, dict[Any, dict[str, Any]]]:
    rows: dict[str, dict[Any, dict[str, Any]]] = {}
    for name, table in TABLE_MAP.items():
        rows[name] = {row["id"]: dict(row) for row in session.execute(select(table)).mappings()}
    return rows


def _json_at(document: Any, keys: Sequence[str]) -> Any:
    for key in keys:
        if not isinstance(document, dict) or key not in document:
            return None
        document = document[key]
    return document


def _like(pattern: str) -> re.Pattern[str]:
    out, chars = [], iter(pattern)
    for char in chars:
        if char == "\\":
            out.append(re.escape(next(chars, "\\")))
        elif char == "%":
            out.append(".*")
        elif char == "_":
            out.append(".")
        else:
            out.append(re.escape(char))
    return re.compile("".join(out), re.DOTALL)


def _rule_matches(rule: FilterRule, value: Any) -> bool:
    kind = rule.value_kind
    if kind.startswith("json-"):
        value = _json_at(value, rule.json_keys)
        if kind == "json-number":
            value = float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
        elif kind == "json-string":
            value = value if isinstance(value, str) else None
        else:
            value = value if isinstance(value, bool) else None
    op, wanted = rule.operator, rule.value
    if wanted is None:
        return (value is None) == (op == "eq")
    if op == "neq":
        return value is None or value != wanted
    if op == "not_in":
        return value is None or value not in wanted
    if value is None:
        return False
    if op == "eq":
        return value == wanted
    if op == "in":
        return value in wanted
    if op == "like":
        return _like(wanted).fullmatch(value) is not None
    return {"gt": value > wanted, "gte": value >= wanted, "lt": value < wanted, "lte": value <= wanted}[op]


def reference_resolve(
    session: Session,
    *,
    filter_rules: Any,
    group_by: Sequence[str],
    instrument_module_id: int | None = None,
    package_ids: Sequence[int] | None = None,
    only_archived: bool = True,
) -> list[tuple[str, tuple[int, ...], int, int]]:
    """(key, sorted ids, count, bytes) per sub-group, computed in Python from the documented semantics."""
    rules = parse_rules(filter_rules)
    rows = _load(session)
    groups: dict[str, list[dict[str, Any]]] = {}
    for package in rows["RawDataPackage"].values():
        if package["invalidated_reason"] is not None:
            continue
        if only_archived and package["state"] != "archived":
            continue
        if instrument_module_id is not None and package["instrument_module_id"] != instrument_module_id:
            continue
        if package_ids is not None and package["id"] not in package_ids:
            continue
        scan = rows["ExecutedObsUnit"][package["executed_obs_unit_id"]]
        obs_unit = rows["ObsUnit"][scan["obs_unit_id"]]
        module = rows["InstrumentModule"][package["instrument_module_id"]]
        record = {
            "RawDataPackage": package,
            "ExecutedObsUnit": scan,
            "ObsUnit": obs_unit,
            "Source": rows["Source"][obs_unit["source_id"]],
            "ObservingProgram": rows["ObservingProgram"][obs_unit["observing_program_id"]],
            "InstrumentModule": module,
            "Instrument": rows["Instrument"][module["instrument_id"]],
        }
        if not all(_rule_matches(rule, record[rule.table][rule.column]) for rule in rules):
            continue
        instrument_name = record["Instrument"]["name"].replace("%", "%25").replace(".", "%2E")
        labels = {
            "executed_obs_unit": str(scan["id"]),
            "scan": f"{scan['start_time'].astimezone(UTC):%Y%m%dT%H%M}_{str(scan['id'])[:8]}",
            "obs_unit": obs_unit["name"],
            "source": record["Source"]["name"],
            "instrument_module": f"{instrument_name}.{module['name']}",
            "instrument": record["Instrument"]["name"],
            "observing_program": record["ObservingProgram"]["short_name"],
            "line": obs_unit["line_id"],
            "obs_date": scan["start_time"].astimezone(UTC).date().isoformat(),
        }
        key = encode_sub_group_key([(d, labels[d]) for d in group_by])
        groups.setdefault(key, []).append(package)
    return sorted(
        (key, tuple(sorted(p["id"] for p in members)), len(members), sum(p["size_bytes"] for p in members))
        for key, members in groups.items()
    )


def as_tuples(sub_groups: Sequence[Any]) -> list[tuple[str, tuple[int, ...], int, int]]:
    return [(g.key, g.package_ids, g.package_count, g.total_bytes) for g in sub_groups]


def list_value(rule: FilterRule) -> bool:
    return rule.operator in LIST_OPERATORS
