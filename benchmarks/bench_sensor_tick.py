"""Sensor tick cost: 1,000 newly archived packages on top of 10k, 100k and 1M existing ones.

Uses the synthetic archives of benchmarks/bench_grouping.py (10 packages per scan; built here with COPY when
missing: ``ccat_bench_grouping_10k``, ``ccat_bench_grouping_100k``, ``ccat_bench_grouping``). A continuous
per-scan pipeline (``bench_tick``, step ``calibrate``, group_by [executed_obs_unit]) is added to each, and one
``evaluate_tick`` is timed, which is the work a Dagster sensor tick does (change watermark, touched sub-groups,
input fingerprints, gap evaluation) in three situations:

- new data: 100 new scans × 10 packages go from transferring to archived;
- scattered: 1,000 random existing packages change state to archived (~1,000 distinct sub-groups touched);
- idle: the next tick, with the cursor of a new-data tick and nothing changed (must request nothing).

The rows each tick adds or changes are removed / restored afterwards, so the archives stay as built.
Run:  .venv/bin/python benchmarks/bench_sensor_tick.py [--repeat 5] [--write-docs] [--explain]

``--config-change [--sizes 10k,1M]`` measures instead what a changed step definition costs: the step's config is
changed with no new data, and ticks run until the sweep it starts has planned every sub-group once; then one
more tick (the cost must be back to an idle tick's). Its own section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench_common import machine, write_section
from bench_grouping import ensure_dataset
from sqlalchemy import event, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from ccat_dagster.execution.fingerprint import config_sha256
from ccat_dagster.execution.triggers import TickCursor, TickResult, evaluate_tick
from ccat_dagster.opsdb import models as m
from ccat_dagster.opsdb.engine import make_engine
from ccat_dagster.opsdb.enums import LocationType, StorageType, TriggerType
from ccat_dagster.opsdb.migrate import upgrade

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Sensor tick cost"
# label → (database, scans of 10 packages)
ARCHIVES = {
    "10k": ("ccat_bench_grouping_10k", 1_000),
    "100k": ("ccat_bench_grouping_100k", 10_000),
    "1M": ("ccat_bench_grouping", 100_000),
}
NEW_SCANS = 100
CHANGED = 1_000
# New scans start in 2030, after every scan of the generated archives: that is how they are found for clean-up.
NEW_SCAN_EPOCH = "2030-01-01T00:00:00+00:00"
SCENARIOS = ("new data", "scattered", "idle", "new data, fan-in")


# -------------------------------------------------------------------------------------------- set-up


def ensure_pipeline(session: Session) -> m.Pipeline:
    pipeline = session.scalars(select(m.Pipeline).where(m.Pipeline.name == "bench_tick")).one_or_none()
    if pipeline:
        return pipeline
    site = m.Site(name="bench-site", short_name="bench")
    location = m.DataLocation(
        name="bench-processing",
        site=site,
        location_type=LocationType.PROCESSING,
        storage_type=StorageType.DISK,
        root_path="/tmp/bench",
    )
    software = m.ReductionSoftware(name="bench-sw")
    m.ReductionSoftwareVersion(software=software, version="1.0.0", image_ref="/tmp/x", entrypoint=["true"])
    config = m.ReductionStepConfig(name="bench.step", parameters={}, parameters_sha256=config_sha256({}))
    grouping = m.DataGrouping(
        name="bench-all-modules",
        filter_rules=[
            {"table": "InstrumentModule", "column": "name", "operator": "in", "value": ["LFA", "HFA", "PCAM280"]}
        ],
    )
    pipeline = m.Pipeline(
        name="bench_tick",
        data_grouping=grouping,
        processing_location=location,
        trigger_type=TriggerType.CONTINUOUS,
    )
    m.ReductionStep(
        pipeline=pipeline,
        name="calibrate",
        group_by=["executed_obs_unit"],
        software=software,
        version_spec="1.0.0",
        config=config,
    )
    session.add(pipeline)
    session.flush()
    return pipeline


def ensure_fan_in_pipeline(session: Session) -> m.Pipeline:
    """``bench_tick`` plus a dependent fan-in step ``grid`` per [source, line] (~5,000 packages each at 1M)."""
    pipeline = session.scalars(select(m.Pipeline).where(m.Pipeline.name == "bench_tick_fan_in")).one_or_none()
    if pipeline:
        return pipeline
    base = ensure_pipeline(session)
    calibrate = base.steps[0]
    pipeline = m.Pipeline(
        name="bench_tick_fan_in",
        data_grouping=base.data_grouping,
        processing_location=base.processing_location,
        trigger_type=TriggerType.CONTINUOUS,
    )
    upstream = m.ReductionStep(
        pipeline=pipeline,
        name="calibrate",
        group_by=["executed_obs_unit"],
        software=calibrate.software,
        version_spec="1.0.0",
        config=calibrate.config,
    )
    m.ReductionStep(
        pipeline=pipeline,
        name="grid",
        position=1,
        group_by=["source", "line"],
        software=calibrate.software,
        version_spec="1.0.0",
        config=calibrate.config,
        depends_on=[upstream],
    )
    session.add(pipeline)
    session.flush()
    return pipeline


def reset(session: Session) -> None:
    """Remove the scans a new-data tick added and age every recent change out of the watermark's way."""
    new_scans = "SELECT id FROM executed_obs_unit WHERE start_time >= :epoch"
    session.execute(
        text(f"DELETE FROM raw_data_package WHERE executed_obs_unit_id IN ({new_scans})"), {"epoch": NEW_SCAN_EPOCH}
    )
    session.execute(text("DELETE FROM executed_obs_unit WHERE start_time >= :epoch"), {"epoch": NEW_SCAN_EPOCH})
    session.execute(
        text(
            "UPDATE raw_data_package SET updated_at = now() - interval '1 day' "
            "WHERE updated_at > now() - interval '1 hour'"
        )
    )


def add_transferring_scans(session: Session) -> None:
    """NEW_SCANS new scans of 10 packages each, still in transfer (changed a day ago, before the cursor)."""
    session.execute(
        text(
            """
            WITH units AS (SELECT id, row_number() OVER (ORDER BY id) - 1 AS n FROM obs_unit),
            modules AS (SELECT id, row_number() OVER (ORDER BY id) - 1 AS n FROM instrument_module),
            scans AS (
                INSERT INTO executed_obs_unit (id, obs_unit_id, start_time, end_time, status)
                SELECT gen_random_uuid(), units.id, CAST(:epoch AS timestamptz) + g * interval '1 hour',
                       CAST(:epoch AS timestamptz) + g * interval '1 hour' + interval '40 minutes', 'completed'
                FROM generate_series(1, :scans) AS g
                JOIN units ON units.n = g % (SELECT count(*) FROM units)
                RETURNING id
            )
            INSERT INTO raw_data_package (name, executed_obs_unit_id, instrument_module_id, size_bytes, checksum,
                                          state, metadata, created_at, updated_at)
            SELECT 'tick-' || scans.id || '-' || p, scans.id, modules.id, 1048576, md5(scans.id || '-' || p),
                   'transferring', '{"observation": {"frequency_ghz": 461.04}}',
                   now() - interval '1 day', now() - interval '1 day'
            FROM scans CROSS JOIN generate_series(0, 9) AS p
            JOIN modules ON modules.n = p % (SELECT count(*) FROM modules)
            """
        ),
        {"epoch": NEW_SCAN_EPOCH, "scans": NEW_SCANS},
    )


# ------------------------------------------------------------------------------------------- measuring


@dataclass
class Statements:
    """Every SQL statement of a timed call, with its duration and parameters (for EXPLAIN)."""

    rows: list[tuple[float, str, Any]] = field(default_factory=list)
    recording: bool = False

    def attach(self, engine: Engine) -> None:
        @event.listens_for(engine, "before_cursor_execute")
        def _before(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
            conn.info["bench_started"] = time.perf_counter()

        @event.listens_for(engine, "after_cursor_execute")
        def _after(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
            if self.recording:
                self.rows.append((time.perf_counter() - conn.info["bench_started"], statement, parameters))


@dataclass
class Tick:
    seconds: float
    result: TickResult
    statements: list[tuple[float, str, Any]]

    @property
    def requested(self) -> int:
        return sum(len(r.plans) for r in self.result.requests)


def timed_tick(
    engine: Engine,
    recorder: Statements,
    cursor: TickCursor,
    pipeline_name: str = "bench_tick",
    *,
    batch_limit: int = 5000,
) -> Tick:
    with Session(engine) as session, session.begin():
        pipeline = session.scalars(select(m.Pipeline).where(m.Pipeline.name == pipeline_name)).one()
        recorder.rows, recorder.recording = [], True
        started = time.perf_counter()
        result = evaluate_tick(
            session, pipeline, cursor, now=dt.datetime.now(dt.UTC), overlap_seconds=300, batch_limit=batch_limit
        )
        seconds = time.perf_counter() - started
        recorder.recording = False
    return Tick(seconds, result, recorder.rows)


def vacuum(engine: Engine) -> None:
    """What autovacuum does in production; here each round's own ~4,000 dead row versions would otherwise pile up
    in the recent end of the (updated_at, id) index that the ticks read (autovacuum visits a 10k table much
    sooner than a 1M one, which would skew the comparison)."""
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text("VACUUM raw_data_package, executed_obs_unit"))


def run_scenarios(url: str) -> dict[str, Tick]:
    """One tick of each scenario on the archive at ``url``."""
    engine = make_engine(url)
    recorder = Statements()
    recorder.attach(engine)
    ticks: dict[str, Tick] = {}
    try:
        with Session(engine) as session, session.begin():
            ensure_fan_in_pipeline(session)
            reset(session)
            add_transferring_scans(session)
        vacuum(engine)
        # The cursor of a sensor that has seen everything up to 30 minutes ago.
        cursor = TickCursor(package_ts=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=30))
        cursor.package_read_ts = cursor.package_ts
        with Session(engine) as session, session.begin():
            session.execute(
                text(
                    "UPDATE raw_data_package SET state = 'archived', updated_at = now() WHERE executed_obs_unit_id "
                    "IN (SELECT id FROM executed_obs_unit WHERE start_time >= :epoch)"
                ),
                {"epoch": NEW_SCAN_EPOCH},
            )
        ticks["new data"] = tick = timed_tick(engine, recorder, TickCursor.loads(cursor.dumps()))
        assert tick.result.changed_packages == NEW_SCANS * 10, tick.result.changed_packages
        assert tick.requested == NEW_SCANS, tick.requested
        ticks["idle"] = idle = timed_tick(engine, recorder, tick.result.cursor)
        assert idle.result.changed_packages == 0 and not idle.result.requests, idle.result
        ticks["new data, fan-in"] = fan_in = timed_tick(
            engine, recorder, TickCursor.loads(cursor.dumps()), "bench_tick_fan_in"
        )
        assert fan_in.requested == NEW_SCANS and fan_in.result.skipped.get("upstream_not_ready"), fan_in.result

        with Session(engine) as session, session.begin():
            reset(session)
            chosen = session.execute(
                text(
                    "SELECT id, state FROM raw_data_package WHERE invalidated_reason IS NULL ORDER BY random() LIMIT :n"
                ),
                {"n": CHANGED},
            ).all()
        vacuum(engine)
        with Session(engine) as session, session.begin():
            session.execute(
                text("UPDATE raw_data_package SET state = 'archived', updated_at = now() WHERE id = ANY(:ids)"),
                {"ids": [row.id for row in chosen]},
            )
        ticks["scattered"] = tick = timed_tick(engine, recorder, TickCursor.loads(cursor.dumps()))
        assert tick.result.changed_packages == len(chosen), tick.result.changed_packages
        with Session(engine) as session, session.begin():
            for state in {row.state for row in chosen}:
                session.execute(
                    text(
                        "UPDATE raw_data_package SET state = :state, updated_at = now() - interval '1 day' "
                        "WHERE id = ANY(:ids)"
                    ),
                    {"state": state, "ids": [row.id for row in chosen if row.state == state]},
                )
            reset(session)
    finally:
        engine.dispose()
    return ticks


CONFIG_SECTION = "## Sensor tick after a definition change"


@dataclass
class Sweep:
    ticks: list[Tick]
    after: Tick
    signature_tick: Tick

    @property
    def requested(self) -> int:
        return sum(t.requested for t in self.ticks)


def run_config_change(url: str, *, batch_limit: int) -> Sweep:
    """Change ``bench_tick``'s config with no new data; tick until the sweep ends, then once more."""
    engine = make_engine(url)
    recorder = Statements()
    recorder.attach(engine)
    try:
        with Session(engine) as session, session.begin():
            ensure_pipeline(session)
            reset(session)
        vacuum(engine)
        cursor = TickCursor(package_ts=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=30))
        cursor.package_read_ts = cursor.package_ts
        # A sensor that has seen everything and the current definition (its first tick records signatures).
        first = timed_tick(engine, recorder, cursor, batch_limit=batch_limit)
        assert not first.result.requests and first.result.cursor.signatures, first.result
        with Session(engine) as session, session.begin():
            step = session.scalars(
                select(m.ReductionStep).join(m.Pipeline).where(m.Pipeline.name == "bench_tick")
            ).one()
            parameters = {"changed_at": dt.datetime.now(dt.UTC).isoformat()}
            step.config = m.ReductionStepConfig(
                name="bench.step", parameters=parameters, parameters_sha256=config_sha256(parameters)
            )
        ticks: list[Tick] = []
        cursor = first.result.cursor
        while True:
            tick = timed_tick(engine, recorder, cursor, batch_limit=batch_limit)
            ticks.append(tick)
            cursor = tick.result.cursor
            if not cursor.sweeps:
                break
        after = timed_tick(engine, recorder, cursor, batch_limit=batch_limit)
        assert not after.result.requests and not after.result.swept_steps, after.result
    finally:
        engine.dispose()
    return Sweep(ticks, after, first)


def _in_subquery_touched_query(**kwargs: Any) -> Any:
    """``compile_touched_query`` as it was before 2026-12-03: the touched identities as ``IN (subquery)``, for a
    before/after comparison in the same run (``--compare-touched-shape``)."""
    from sqlalchemy import tuple_

    from ccat_dagster.grouping import engine as grouping_engine
    from ccat_dagster.grouping import sql as grouping_sql

    rules, dims = grouping_engine._validated(kwargs["filter_rules"], kwargs["group_by"])
    options = {
        "instrument_module_id": kwargs.get("instrument_module_id"),
        "only_archived": kwargs.get("only_archived", True),
    }
    outer = grouping_engine._QueryParts.build(rules, dims, **options)
    inner = grouping_engine._QueryParts.build(rules, dims, alias_suffix="_changed", **options)
    ids = grouping_sql.id_list_param(list(kwargs["changed_package_ids"]))
    inner.where.append(grouping_sql.id_in_list(inner.root.c.id, ids))
    touched = select(*inner.match_exprs).select_from(inner.from_clause).where(*inner.where)
    if len(outer.match_exprs) == 1:
        outer.where.append(outer.match_exprs[0].in_(touched))
    else:
        outer.where.append(tuple_(*outer.match_exprs).in_(touched))
    return outer.grouped_select()


def config_change_report(
    sizes: list[str], batch_limit: int, argv: list[str], *, show_plans: bool = False, compare_shape: bool = False
) -> str:
    from ccat_dagster.grouping import engine as grouping_engine

    started_at = dt.datetime.now(dt.UTC)
    load_before = os.getloadavg()
    results: dict[str, Sweep] = {}
    current = grouping_engine.compile_touched_query
    for label in sizes:
        name, scans = ARCHIVES[label]
        url = ensure_dataset(name, scans, rebuild=False)[0]
        upgrade(url)
        runs = [(f"{label}, IN (subquery) (before)", _in_subquery_touched_query)] if compare_shape else []
        for name, shape in [*runs, (label, current)]:
            grouping_engine.compile_touched_query = shape
            try:
                results[name] = run_config_change(url, batch_limit=batch_limit)
            finally:
                grouping_engine.compile_touched_query = current
            if show_plans:  # the slowest statements of the sweep's median tick
                ticks = sorted(results[name].ticks, key=lambda t: t.seconds)
                print(f"=== {name}: median sweep tick\n" + explain(url, ticks[len(ticks) // 2].statements), flush=True)
    load_after = os.getloadavg()
    lines = [
        CONFIG_SECTION,
        "",
        f"Run on {started_at:%Y-%m-%d %H:%M} UTC with "
        f"`.venv/bin/python benchmarks/bench_sensor_tick.py{''.join(f' {a}' for a in argv)}` (load average before / "
        f"after: {' '.join(f'{x:.2f}' for x in load_before)} / {' '.join(f'{x:.2f}' for x in load_after)}).",
        "",
        machine(),
        "- The per-scan pipeline `bench_tick` of the section above (group_by [executed_obs_unit], 10 packages per "
        f"scan). Its step config is changed with no new data; a sensor tick (`evaluate_tick`, batch limit "
        f"{batch_limit:,}) sees the step's signature change and starts a sweep that walks the packages by id, one "
        "batch per tick, and plans the sub-groups they fall in. No attempt exists in these archives, so every "
        "sub-group is a gap: the largest request volume a change can cause.",
        "",
        "| archive | ticks of the sweep | sweep total | per tick: median | max | sub-groups requested | "
        "tick after the sweep | idle tick before the change |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, sweep in results.items():
        seconds = [t.seconds for t in sweep.ticks]
        lines.append(
            f"| {label} | {len(sweep.ticks)} | {sum(seconds):.1f} s | {statistics.median(seconds):.3f} s | "
            f"{max(seconds):.3f} s | {sweep.requested:,} | {sweep.after.seconds * 1000:.0f} ms | "
            f"{sweep.signature_tick.seconds * 1000:.0f} ms |"
        )
    lines += ["", *sweep_profile(results)]
    lines += [
        "",
        "Reading: the change is evaluated once, spread over ticks whose cost is bounded by the batch limit (not by "
        "the archive), and the tick after the sweep costs what an idle tick costs. At the default sensor interval "
        "(30 s) a change on 1M packages is fully planned in about (ticks × 30 s); the runs it requests are what "
        "takes long.",
        "",
    ]
    return "\n".join(lines)


def _statement_kind(statement: str) -> str:
    """A statement's shape without its parameters: the first FROM table and what it is filtered on."""
    flat = " ".join(statement.split())
    head = flat.split(" FROM ", 1)
    table = head[1].split(" ", 1)[0] if len(head) > 1 else flat[:40]
    where = flat.split(" WHERE ", 1)[1][:70] if " WHERE " in flat else ""
    return f"{flat.split(' ', 1)[0]} {table} … {where}".strip()


def sweep_profile(results: dict[str, Sweep], top: int = 4) -> list[str]:
    """Where a sweep tick's time goes, per archive: the SQL statements by kind (mean ms per tick), the rest."""
    lines = [
        "Where a sweep tick's time goes (mean per tick; SQL timed at the driver, the rest is Python):",
        "",
        "| archive | statement kind | ms per tick | calls per tick |",
        "|---|---|---:|---:|",
    ]
    for label, sweep in results.items():
        ticks = len(sweep.ticks)
        total: dict[str, float] = {}
        calls: dict[str, int] = {}
        for tick in sweep.ticks:
            for seconds, statement, _parameters in tick.statements:
                kind = _statement_kind(statement)
                total[kind] = total.get(kind, 0.0) + seconds
                calls[kind] = calls.get(kind, 0) + 1
        for kind, seconds in sorted(total.items(), key=lambda item: -item[1])[:top]:
            shown = kind.replace("|", "\\|")
            lines.append(f"| {label} | `{shown}` | {seconds / ticks * 1000:.1f} | {calls[kind] / ticks:.1f} |")
        python = sum(t.seconds for t in sweep.ticks) - sum(total.values())
        lines.append(
            f"| {label} | (all SQL) | {sum(total.values()) / ticks * 1000:.1f} | {sum(calls.values()) / ticks:.1f} |"
        )
        lines.append(f"| {label} | (Python, outside SQL) | {python / ticks * 1000:.1f} | |")
    return lines


def explain(url: str, statements: list[tuple[float, str, Any]], top: int = 3) -> str:
    """EXPLAIN (ANALYZE, BUFFERS) of the slowest statements of a tick (re-run with the same parameters)."""
    engine = make_engine(url)
    raw = engine.raw_connection()
    out = []
    try:
        cursor = raw.cursor()
        for seconds, statement, parameters in sorted(statements, key=lambda s: -s[0])[:top]:
            cursor.execute("EXPLAIN (ANALYZE, BUFFERS) " + statement, parameters)
            # Long id arrays are elided: the plan's shape is what matters.
            plan = "\n".join(row[0] if len(row[0]) < 300 else row[0][:300] + " …" for row in cursor.fetchall())
            out.append(f"--- {seconds * 1000:.1f} ms in the tick:\n{statement}\n{plan}\n")
        raw.rollback()
    finally:
        raw.close()
        engine.dispose()
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------- report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--write-docs", action="store_true", help="write the results into docs/benchmarks.md")
    parser.add_argument("--explain", action="store_true", help="print EXPLAIN ANALYZE of the slowest 1M statements")
    parser.add_argument("--config-change", action="store_true", help="measure the sweep after a config change")
    parser.add_argument("--sizes", default="10k,100k,1M", help="archives for --config-change, e.g. 10k,1M")
    parser.add_argument("--batch-limit", type=int, default=5000, help="packages per tick for --config-change")
    parser.add_argument(
        "--compare-touched-shape",
        action="store_true",
        help="with --config-change: also sweep with the earlier IN (subquery) touched query, in the same run",
    )
    args = parser.parse_args(argv)
    if args.config_change:
        report = config_change_report(
            args.sizes.split(","),
            args.batch_limit,
            list(argv or sys.argv[1:]),
            show_plans=args.explain,
            compare_shape=args.compare_touched_shape,
        )
        print(report)
        if args.write_docs:
            write_section(CONFIG_SECTION, report)
        return 0
    started_at = dt.datetime.now(dt.UTC)
    load_before = os.getloadavg()
    urls = {label: ensure_dataset(name, scans, rebuild=False)[0] for label, (name, scans) in ARCHIVES.items()}
    for url in urls.values():
        upgrade(url)  # archives built before a later migration

    runs: dict[str, dict[str, list[Tick]]] = {label: {s: [] for s in SCENARIOS} for label in ARCHIVES}
    for url in urls.values():
        run_scenarios(url)  # warm-up: connection, caches, the pipeline rows
    # Interleaved, so a burst of load on the shared machine hits every archive size alike.
    for _ in range(args.repeat):
        for label, url in urls.items():
            for scenario, tick in run_scenarios(url).items():
                runs[label][scenario].append(tick)
    load_after = os.getloadavg()

    def median(label: str, scenario: str) -> float:
        return statistics.median(t.seconds for t in runs[label][scenario])

    lines = [
        SECTION,
        "",
        f"Run on {started_at:%Y-%m-%d %H:%M} UTC with "
        f"`.venv/bin/python benchmarks/bench_sensor_tick.py{''.join(f' {a}' for a in (argv or sys.argv[1:]))}` "
        f"(repeat {args.repeat}, after one warm-up round; the archive sizes are measured interleaved in the same run; "
        f"load average before / after: {' '.join(f'{x:.2f}' for x in load_before)} / "
        f"{' '.join(f'{x:.2f}' for x in load_after)}).",
        "",
        machine(),
        "- Archives: the synthetic ones of `bench_grouping.py` (10 packages per scan, 3 modules, 94% archived). "
        "Pipeline: one CONTINUOUS step, group_by [executed_obs_unit], over all modules. Each figure is one "
        "`evaluate_tick` (watermark read, touched sub-groups, fingerprints, gap decisions) in its own "
        "transaction, overlap window 300 s.",
        "- new data: 100 new scans × 10 packages change from transferring to archived (100 sub-groups, all gaps); "
        "scattered: 1,000 random existing packages change to archived (as many distinct scans as the archive "
        "offers: ~630 of 1,000 at 10k, ~1,000 at 100k and 1M); idle: the next tick after new data, nothing changed; "
        "new data, fan-in: the new-data tick of a second pipeline whose per-scan step feeds a fan-in step "
        "group_by [source, line] (200 sub-groups of ~5,000 packages at 1M; 100 touched, all waiting upstream).",
        "",
        "| archive | scenario | median | min | max | changed | sub-groups requested | SQL statements |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label in ARCHIVES:
        for scenario in SCENARIOS:
            ticks = runs[label][scenario]
            last = ticks[-1]
            lines.append(
                f"| {label} | {scenario} | {median(label, scenario):.3f} s | {min(t.seconds for t in ticks):.3f} s | "
                f"{max(t.seconds for t in ticks):.3f} s | {last.result.changed_packages:,} | {last.requested:,} | "
                f"{len(last.statements)} |"
            )
    new_1m, new_10k, new_100k = median("1M", "new data"), median("10k", "new data"), median("100k", "new data")
    scattered_1m = median("1M", "scattered")
    fan_in_1m = median("1M", "new data, fan-in")
    ratio, ratio_100k = new_1m / new_10k, new_1m / new_100k
    scattered_ratio = scattered_1m / median("10k", "scattered")
    per_group = {
        label: median(label, "scattered") / statistics.median(t.requested for t in runs[label]["scattered"])
        for label in ("10k", "1M")
    }
    slowest = sorted(runs["1M"]["scattered"][-1].statements, key=lambda s: -s[0])[:3]
    sql_seconds = sum(s for s, _, _ in runs["1M"]["scattered"][-1].statements)
    lines += [
        "",
        "Targets:",
        f"- tick with 1,000 newly archived packages on 1M: {new_1m:.3f} s (target ≤ 1 s: "
        f"{'met' if new_1m <= 1 else 'MISSED'}); scattered 1,000 on 1M: {scattered_1m:.3f} s "
        f"({'met' if scattered_1m <= 1 else 'MISSED'})",
        f"- tick(1M) / tick(10k), new data: {ratio:.2f} (target ≤ 1.5: {'met' if ratio <= 1.5 else 'MISSED'}); "
        f"1M / 100k: {ratio_100k:.2f}; scattered 1M / 10k: {scattered_ratio:.2f}, which touches ~1.5× the "
        f"sub-groups at 1M; per touched sub-group {per_group['1M'] * 1000:.2f} ms (1M) vs "
        f"{per_group['10k'] * 1000:.2f} ms (10k), ratio {per_group['1M'] / per_group['10k']:.2f}",
        f"- idle tick (nothing changed): requests nothing, {median('1M', 'idle') * 1000:.0f} ms on 1M",
        f"- with a fan-in step [source, line] behind the per-scan step, new data on 1M: {fan_in_1m:.3f} s "
        f"(≤ 1 s: {'met' if fan_in_1m <= 1 else 'MISSED'}), 1M / 10k: "
        f"{fan_in_1m / median('10k', 'new data, fan-in'):.2f} (for information: at ~0.1 s a few tens of ms of "
        "noise move this ratio by ±0.5 on this shared machine)",
        "",
        f"Where the time goes (1M, scattered, last tick): {len(runs['1M']['scattered'][-1].statements)} SQL "
        f"statements, {sql_seconds:.3f} s in the database driver, the rest in Python (fingerprints: one SHA-256 "
        "of a canonical JSON per sub-group, SubGroup / plan objects). Slowest statements: "
        + "; ".join(f"{s * 1000:.0f} ms `{' '.join(q.split())[:70]}…`" for s, q, _ in slowest)
        + ".",
        "",
        *NOTES,
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.explain:
        print(explain(urls["1M"], runs["1M"]["scattered"][-1].statements))
    if args.write_docs:
        write_section(SECTION, report)
    return 0


NOTES = [
    "Notes:",
    "- Before this fix the (scattered) tick took 1.10 s on 1M and 0.66 s on 100k. The profile (pyinstrument, "
    "EXPLAIN ANALYZE) showed three causes, all fixed without an index or a migration: (1) the watermark read "
    "`updated_at > :ts OR (updated_at = :ts AND id > :id)` walked the (updated_at, id) index from its start and "
    "filtered ~1M entries (0.3-0.5 s on 1M); the row comparison `(updated_at, id) > (:ts, :id)` is an index range "
    "scan (6 ms). (2) The planner read input checksums with one query per sub-group (~1,000 round trips, 0.5 s); "
    "a tick now runs a fixed number of statements however many sub-groups it touches, dependent steps included "
    "(their upstream sub-groups and products are read once per step). (3) Id lists were bound as bigint[] "
    "against integer ids: PostgreSQL cannot hash that cross-type `= ANY`, so `resolve_touched` compared every "
    "candidate row with every changed id (5 s for 5,000 changed ids on a 200k archive); integer[] is hashed "
    "(0.2 s).",
    "- Fan-in steps: before this fix, a tick with new data read the complete membership of every touched fan-in "
    "sub-group and planned every upstream sub-group inside it (with [source, line] on 1M: ~500,000 packages, "
    "50,000 scans, 15-17 s; with group_by [] the whole archive on every tick). Now the tick reads only the keys "
    "of the fan-in sub-groups holding changed packages (`Planner.changed_members`: a statement over the "
    "changed packages), and one whose changed packages lie in an upstream sub-group found not up to date in the "
    "same tick is UPSTREAM_NOT_READY at once (`Planner.plan_changed`); only the others are read and planned in "
    "full, e.g. once the upstream runs completed. A sub-group held back by its cooldown is found again through "
    "one member remembered in the cursor, not by reading the whole grouping (tests/test_tick_planning.py).",
    "- What still grows with the archive: the member rows of the touched sub-groups are random heap reads, "
    "and more of them miss the cache on a larger table; and for the fan-in keys PostgreSQL hashes "
    "executed_obs_unit (100,000 rows at 1M, ~20 ms) rather than probing it 1,000 times, a cost-based choice "
    "that turns to index probes once the table is larger.",
    "- The benchmark VACUUMs raw_data_package before each measured tick (what autovacuum does in production): "
    "its own updates leave ~4,000 dead row versions per round at the recent end of the (updated_at, id) index, "
    "which autovacuum clears much sooner on the 10k table than on the 1M one.",
    "- A change set larger than `CCAT_WORKFLOW_MANAGER_SENSOR_BATCH_LIMIT` (5,000) is read in watermark order, "
    "LIMIT per tick, and the cursor carries the rest: tests/test_sensor_tick_limit.py archives 200,000 packages "
    "in one statement (one shared `updated_at`) and checks 41 bounded ticks (~0.3-0.4 s each), every package "
    "exactly once, no sub-group requested twice, a late-committed row caught, and a cursor window that never "
    "holds more than one overlap window of ids.",
]


if __name__ == "__main__":
    sys.exit(main())
