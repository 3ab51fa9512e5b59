"""Benchmark of the data-grouping filter engine on PostgreSQL.

Builds (or reuses) two ops-db databases with a synthetic archive:

* ``ccat_bench_grouping``: 1,000,000 RawDataPackages from 100,000 ExecutedObsUnits (10 packages each),
  50 sources, 200 obs units (4 lines incl. "no line"), 5 programs, 3 instrument modules;
* ``ccat_bench_grouping_100k``: the same generator at 100,000 packages (10,000 scans).

and times ``resolve`` for one 4-rule grouping with group_by [source, line] and [executed_obs_unit] on 1M
packages, ``resolve_touched`` for a few changed packages, and, on 100k packages, ``resolve`` against the
baseline of loading ORM rows (eager-joined) and filtering/grouping them in Python.

Run:  .venv/bin/python benchmarks/bench_grouping.py [--write-docs] [--repeat 5] [--rebuild]
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import random
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench_common import database_exists, db_url, machine, recreate_database, write_section
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session, joinedload

from ccat_dagster.grouping.engine import resolve, resolve_touched
from ccat_dagster.grouping.rules import parse_rules
from ccat_dagster.opsdb import models as m
from ccat_dagster.opsdb.engine import make_engine
from ccat_dagster.opsdb.migrate import upgrade

SECTION = "## Data groupings"

N_SOURCES = 50
LINES = [("CO43", 461.0408), ("CII", 1900.5369), ("CO76", 806.6518), (None, 350.0)]
PROGRAMS = ["GEco", "EoR", "DSS", "Cal", "ENG"]
MODULES = [("CHAI", "LFA"), ("CHAI", "HFA"), ("Prime-Cam", "PCAM280")]
PACKAGES_PER_SCAN = 10
FIRST_NIGHT = dt.datetime(2026, 10, 1, tzinfo=dt.UTC)

# The benchmark grouping: four rules over four tables, one of them numeric on a JSON path. It keeps about 62% of
# the archive and ~98% of the scans, so group_by [executed_obs_unit] yields close to 100,000 sub-groups.
RULES = [
    {"table": "RawDataPackage", "column": "state", "operator": "eq", "value": "archived"},
    {"table": "InstrumentModule", "column": "name", "operator": "in", "value": ["LFA", "HFA"]},
    {
        "table": "RawDataPackage",
        "column": "metadata",
        "json_path": "observation.frequency_ghz",
        "operator": "gt",
        "value": 300,
    },
    {"table": "ObservingProgram", "column": "short_name", "operator": "neq", "value": "ENG"},
]
# CCAT's documented example (very selective): one source, one line, one module, archived.
EXAMPLE_RULES = [
    {"table": "Source", "column": "name", "operator": "eq", "value": "SRC-007"},
    {"table": "ObsUnit", "column": "line_id", "operator": "eq", "value": "CO43"},
    {"table": "InstrumentModule", "column": "name", "operator": "eq", "value": "LFA"},
    {"table": "RawDataPackage", "column": "state", "operator": "eq", "value": "archived"},
]


NOTES = [
    "Notes:",
    "- One SQL statement per call; PostgreSQL 15 cannot aggregate `array_agg` in parallel (16 can), so the "
    "planner runs these plans serially. With the scan in parallel (`SET parallel_tuple_cost = 0.001` in a psql "
    "session) the [source, line] query took 0.47-0.54 s on the same data; the engine changes no session setting.",
    "- No index was added for grouping resolution: the benchmark grouping keeps ~64% of the archive, so a sequential "
    "scan is the right plan; `resolve_touched` is driven by the existing primary-key and foreign-key indexes.",
    "- The machine was shared with other test runs during the benchmark; min / max show the spread. The first run "
    "builds the two databases with COPY (under a minute) and later runs reuse them (`--rebuild` reloads).",
]


# -------------------------------------------------------------------------------------------- data load


def _loaded_packages(url: str) -> int:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return int(connection.execute(text("SELECT count(*) FROM raw_data_package")).scalar_one())
    except Exception:  # noqa: BLE001 - a missing table just means "not loaded"
        return -1
    finally:
        engine.dispose()


def ensure_dataset(name: str, scans: int, *, rebuild: bool, seed: int = 2026) -> tuple[str, float | None]:
    """The URL of a database holding ``scans`` × 10 packages; returns (url, load seconds or None if reused)."""
    url = db_url(name)
    if not rebuild and database_exists(name) and _loaded_packages(url) == scans * PACKAGES_PER_SCAN:
        return url, None
    started = time.perf_counter()
    recreate_database(name)
    upgrade(url)
    engine = make_engine(url)
    rng = random.Random(seed)
    with Session(engine) as session, session.begin():
        instruments = {n: m.Instrument(name=n) for n in {i for i, _ in MODULES}}
        modules = [m.InstrumentModule(name=mod, instrument=instruments[i]) for i, mod in MODULES]
        sources = [m.Source(name=f"SRC-{i:03d}", kind="fixed") for i in range(N_SOURCES)]
        programs = {p: m.ObservingProgram(short_name=p, name=p) for p in PROGRAMS}
        obs_units: list[tuple[m.ObsUnit, int]] = []
        for s_index, source in enumerate(sources):
            for l_index, (line, _) in enumerate(LINES):
                # 4 of the 200 obs units are engineering time (2%).
                program = "ENG" if (s_index * 4 + l_index) % 50 == 0 else PROGRAMS[(s_index + l_index) % 4]
                obs_unit = m.ObsUnit(
                    name=f"{source.name}-{line or 'cont'}",
                    source=source,
                    observing_program=programs[program],
                    line_id=line,
                )
                obs_units.append((obs_unit, l_index))
        session.add_all([*instruments.values(), *modules, *sources, *programs.values()])
        session.add_all([ou for ou, _ in obs_units])
        session.flush()
        module_ids = [mod.id for mod in modules]
        unit_ids = [(ou.id, l_index) for ou, l_index in obs_units]

    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        # Bulk load without per-row foreign-key triggers (the generator only emits valid references).
        cursor.execute("SET session_replication_role = replica")
        scan_rows = io.StringIO()
        package_rows = io.StringIO()
        package_id = 0
        states = ["archived"] * 94 + ["waiting"] * 2 + ["transferring"] * 2 + ["failed"] * 2
        for scan_index in range(scans):
            scan_id = uuid.UUID(int=rng.getrandbits(128), version=4)
            unit_id, line_index = unit_ids[rng.randrange(len(unit_ids))]
            start = FIRST_NIGHT + dt.timedelta(seconds=int(scan_index * (730 * 86400 / scans)))
            scan_rows.write(
                f"{scan_id}\t{unit_id}\t{start.isoformat()}\t"
                f"{(start + dt.timedelta(minutes=40)).isoformat()}\tcompleted\n"
            )
            for p in range(PACKAGES_PER_SCAN):
                package_id += 1
                module_index = p % 3
                frequency = LINES[line_index][1] if module_index < 2 else 280.0
                metadata = json.dumps(
                    {
                        "observation": {"frequency_ghz": frequency, "n_spectra": 16 + p},
                        "weather": {"pwv_mm": round(rng.uniform(0.3, 1.2), 2)},
                    }
                )
                state = states[rng.randrange(100)]
                invalid = "bad weather" if rng.random() < 0.005 else "\\N"
                stamp = (start + dt.timedelta(hours=12)).isoformat()
                package_rows.write(
                    f"{package_id}\tbench-{package_id:07d}\t{scan_id}\t{module_ids[module_index]}\t"
                    f"{rng.randrange(1 << 20, 50 << 30)}\t{package_id:064x}\t{state}\t{metadata}\t{invalid}\t"
                    f"{stamp}\t{stamp}\n"
                )
            if (scan_index + 1) % 10000 == 0 or scan_index + 1 == scans:
                scan_rows.seek(0)
                package_rows.seek(0)
                cursor.copy_expert(
                    "COPY executed_obs_unit (id, obs_unit_id, start_time, end_time, status) FROM STDIN",
                    scan_rows,
                )
                cursor.copy_expert(
                    "COPY raw_data_package (id, name, executed_obs_unit_id, instrument_module_id, size_bytes, "
                    "checksum, state, metadata, invalidated_reason, created_at, updated_at) FROM STDIN",
                    package_rows,
                )
                scan_rows, package_rows = io.StringIO(), io.StringIO()
        cursor.execute("SELECT setval(pg_get_serial_sequence('raw_data_package', 'id'), %s)", (package_id,))
        raw.commit()
        raw.set_isolation_level(0)  # VACUUM cannot run in a transaction
        cursor.execute("VACUUM ANALYZE")
    finally:
        raw.close()
    engine.dispose()
    return url, time.perf_counter() - started


# ------------------------------------------------------------------------------------------- measuring


@dataclass
class Timing:
    label: str
    seconds: list[float]
    detail: str

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def measure(label: str, call: Callable[[], Any], repeat: int, describe: Callable[[Any], str]) -> Timing:
    result = call()  # warm-up: caches and connection, as in a long-running sensor or code server
    seconds = []
    for _ in range(repeat):
        started = time.perf_counter()
        result = call()
        seconds.append(time.perf_counter() - started)
    return Timing(label, seconds, describe(result))


def describe(sub_groups: list[Any]) -> str:
    packages = sum(g.package_count for g in sub_groups)
    return f"{len(sub_groups):,} sub-groups, {packages:,} packages"


def python_baseline(session: Session, group_by: tuple[str, ...]) -> dict[tuple[Any, ...], list[int]]:
    """What the engine replaces: load every package as ORM rows (eager joins) and filter/group in Python."""
    session.expunge_all()
    packages = session.scalars(
        select(m.RawDataPackage).options(
            joinedload(m.RawDataPackage.executed_obs_unit)
            .joinedload(m.ExecutedObsUnit.obs_unit)
            .options(joinedload(m.ObsUnit.source), joinedload(m.ObsUnit.observing_program)),
            joinedload(m.RawDataPackage.instrument_module).joinedload(m.InstrumentModule.instrument),
        )
    ).unique()
    groups: dict[tuple[Any, ...], list[int]] = {}
    for package in packages:
        obs_unit = package.executed_obs_unit.obs_unit
        frequency = (package.metadata_.get("observation") or {}).get("frequency_ghz")
        if (
            package.invalidated_reason is None
            and package.state == "archived"
            and package.instrument_module.name in ("LFA", "HFA")
            and isinstance(frequency, int | float)
            and frequency > 300
            and obs_unit.observing_program.short_name != "ENG"
        ):
            values = {
                "source": obs_unit.source.name,
                "line": obs_unit.line_id,
                "executed_obs_unit": str(package.executed_obs_unit_id),
            }
            groups.setdefault(tuple(values[d] for d in group_by), []).append(package.id)
    return groups


def explain(url: str, rules: list[dict[str, Any]], group_by: list[str]) -> str:
    from ccat_dagster.grouping.engine import compile_query

    engine = make_engine(url)
    statement = compile_query(filter_rules=rules, group_by=group_by)
    compiled = statement.compile(dialect=engine.dialect, compile_kwargs={"render_postcompile": True})
    processors = compiled._bind_processors  # the per-dialect conversions (JSON path → text[], …)
    params = {k: processors[k](v) if k in processors else v for k, v in compiled.construct_params().items()}
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        cursor.execute("EXPLAIN (ANALYZE, BUFFERS) " + str(compiled), params)
        plan = "\n".join(row[0] for row in cursor.fetchall())
    finally:
        raw.close()
    engine.dispose()
    return plan


# ---------------------------------------------------------------------------------------------- report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--rebuild", action="store_true", help="drop and reload the benchmark databases")
    parser.add_argument("--write-docs", action="store_true", help="write the results into docs/benchmarks.md")
    parser.add_argument("--explain", action="store_true", help="print EXPLAIN ANALYZE of the 1M queries")
    args = parser.parse_args(argv)
    wall_start = time.perf_counter()

    url_1m, load_1m = ensure_dataset("ccat_bench_grouping", 100_000, rebuild=args.rebuild)
    url_100k, load_100k = ensure_dataset("ccat_bench_grouping_100k", 10_000, rebuild=args.rebuild)
    rules = parse_rules(RULES)
    example_rules = parse_rules(EXAMPLE_RULES)
    timings: list[Timing] = []

    engine = make_engine(url_1m)
    with Session(engine) as session:
        total = session.scalar(select(func.count()).select_from(m.RawDataPackage))
        scans = session.scalar(select(func.count()).select_from(m.ExecutedObsUnit))
        for group_by in (["source", "line"], ["executed_obs_unit"]):
            timings.append(
                measure(
                    f"1M: resolve, 4 rules, group_by {group_by}",
                    lambda gb=group_by: resolve(session, filter_rules=rules, group_by=gb),
                    args.repeat,
                    describe,
                )
            )
        timings.append(
            measure(
                "1M: resolve, CCAT example rules (1 source, 1 line, 1 module), group_by ['executed_obs_unit']",
                lambda: resolve(session, filter_rules=example_rules, group_by=["executed_obs_unit"]),
                args.repeat,
                describe,
            )
        )
        # Ten changed packages spread over the archive (different scans, sources and lines).
        changed = [123_457 + k * 99_991 for k in range(10)]
        for group_by in (["executed_obs_unit"], ["source", "line"]):
            timings.append(
                measure(
                    f"1M: resolve_touched, 10 changed packages, group_by {group_by}",
                    lambda gb=group_by: resolve_touched(
                        session,
                        filter_rules=rules,
                        group_by=gb,
                        instrument_module_id=None,
                        changed_package_ids=changed,
                    ),
                    args.repeat,
                    describe,
                )
            )
    engine.dispose()
    if args.explain:
        for group_by in (["source", "line"], ["executed_obs_unit"]):
            print(f"--- EXPLAIN ANALYZE group_by {group_by}\n{explain(url_1m, RULES, group_by)}\n")

    ratios = []
    engine = make_engine(url_100k)
    with Session(engine) as session:
        for group_by in (["source", "line"], ["executed_obs_unit"]):
            sql_timing = measure(
                f"100k: resolve, 4 rules, group_by {group_by}",
                lambda gb=group_by: resolve(session, filter_rules=rules, group_by=gb),
                args.repeat,
                describe,
            )
            python_timing = measure(
                f"100k: Python baseline (ORM rows + Python filter), group_by {group_by}",
                lambda gb=group_by: python_baseline(session, tuple(gb)),
                max(1, args.repeat // 2),
                lambda groups: f"{len(groups):,} sub-groups, {sum(map(len, groups.values())):,} packages",
            )
            # Both sides must agree, or the ratio means nothing.
            engine_groups = resolve(session, filter_rules=rules, group_by=group_by)
            baseline_groups = python_baseline(session, tuple(group_by))
            assert sorted(tuple(sorted(v)) for v in baseline_groups.values()) == sorted(
                g.package_ids for g in engine_groups
            ), "engine and Python baseline disagree"
            timings.extend([sql_timing, python_timing])
            ratios.append((group_by, python_timing.median / sql_timing.median))
    engine.dispose()

    command_args = "".join(f" {arg}" for arg in (sys.argv[1:] if argv is None else argv))
    if load_1m is None:
        load_text = "reused existing databases"
    else:
        load_text = f"{load_1m:.0f} s (1M) + {load_100k or 0:.0f} s (100k) via COPY"
    lines = [
        SECTION,
        "",
        f"Run on {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC with "
        f"`.venv/bin/python benchmarks/bench_grouping.py{command_args}` "
        f"(repeat {args.repeat}; each figure is the median after one warm-up call; wall time of the whole run "
        "below).",
        "",
        machine(),
        f"- Data: {total:,} RawDataPackages from {scans:,} ExecutedObsUnits, {N_SOURCES} sources, 200 obs units "
        "(lines CO43 / CII / CO76 / none), 5 programs, 3 instrument modules; 94% archived, 0.5% invalidated. "
        f"Load: {load_text}.",
        "- Grouping (4 rules): `RawDataPackage.state eq archived`, `InstrumentModule.name in [LFA, HFA]`, "
        "`RawDataPackage.metadata` `observation.frequency_ghz gt 300` (JSON, numeric), "
        "`ObservingProgram.short_name neq ENG`; plus the engine's own conditions (archived, not invalidated).",
        "",
        "| measurement | median | min | max | result |",
        "|---|---:|---:|---:|---|",
    ]
    for timing in timings:
        lines.append(
            f"| {timing.label} | {timing.median:.3f} s | {min(timing.seconds):.3f} s | "
            f"{max(timing.seconds):.3f} s | {timing.detail} |"
        )
    lines.append("")
    targets = {t.label: t.median for t in timings}
    source_line = targets["1M: resolve, 4 rules, group_by ['source', 'line']"]
    per_scan = targets["1M: resolve, 4 rules, group_by ['executed_obs_unit']"]
    lines.append("Targets:")
    lines.append(
        f"- group_by [source, line] on 1M: {source_line:.3f} s "
        f"(target ≤ 1 s: {'met' if source_line <= 1 else 'MISSED'})"
    )
    lines.append(
        f"- group_by [executed_obs_unit] on 1M: {per_scan:.3f} s (target ≤ 3 s: {'met' if per_scan <= 3 else 'MISSED'})"
    )
    for group_by, ratio in ratios:
        lines.append(
            f"- 100k, group_by {group_by}: engine {ratio:.0f}× faster than ORM rows + Python filtering "
            f"(target ≥ 20×: {'met' if ratio >= 20 else 'MISSED'})"
        )
    lines.append(f"- wall time of this benchmark run: {time.perf_counter() - wall_start:.0f} s")
    lines.extend(["", *NOTES])
    report = "\n".join(lines) + "\n"
    print(report)
    if args.write_docs:
        write_section(SECTION, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
