"""Sensor tick cost (issue 4): 1,000 newly archived packages on top of a small and a large archive.

Uses the archives that benchmarks/bench_grouping.py loads (1,000,000 and 100,000 RawDataPackages on
PostgreSQL; run it first). Adds a per-scan pipeline over the whole archive, takes a cursor at "now", marks
1,000 packages changed (state → archived, updated_at bumped) and times one ``evaluate_tick`` (change
watermark, touched sub-groups, gap evaluation), which is the work a Dagster sensor tick does.
Usage: .venv/bin/python benchmarks/bench_sensor_tick.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import time

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from ccat_dagster.execution.fingerprint import config_sha256
from ccat_dagster.execution.triggers import TickCursor, evaluate_tick
from ccat_dagster.opsdb import models as m
from ccat_dagster.opsdb.engine import make_engine
from ccat_dagster.opsdb.enums import LocationType, StorageType, TriggerType

DATABASES = {"100k": "ccat_bench_grouping_100k", "1M": "ccat_bench_grouping"}


def ensure_pipeline(session: Session) -> m.Pipeline:
    pipeline = session.scalars(select(m.Pipeline).where(m.Pipeline.name == "bench_tick")).one_or_none()
    if pipeline:
        return pipeline
    site = m.Site(name="bench-site", short_name="bench")
    location = m.DataLocation(name="bench-processing", site=site, location_type=LocationType.PROCESSING,
                              storage_type=StorageType.DISK, root_path="/tmp/bench")
    software = m.ReductionSoftware(name="bench-sw")
    m.ReductionSoftwareVersion(software=software, version="1.0.0", image_ref="/tmp/x", entrypoint=["true"])
    config = m.ReductionStepConfig(name="bench.step", parameters={}, parameters_sha256=config_sha256({}))
    grouping = m.DataGrouping(name="bench-all-lfa", filter_rules=[
        {"table": "InstrumentModule", "column": "name", "operator": "in", "value": ["LFA", "HFA", "PCAM280"]}])
    pipeline = m.Pipeline(name="bench_tick", data_grouping=grouping, processing_location=location,
                          trigger_type=TriggerType.CONTINUOUS)
    m.ReductionStep(pipeline=pipeline, name="calibrate", group_by=["executed_obs_unit"], software=software,
                    version_spec="1.0.0", config=config)
    session.add(pipeline)
    session.flush()
    return pipeline


def one_tick(url: str) -> float:
    engine = make_engine(url)
    with Session(engine) as session, session.begin():
        ensure_pipeline(session)
        session.execute(text("UPDATE raw_data_package SET updated_at = now() - interval '1 day' "
                             "WHERE updated_at > now() - interval '1 hour'"))
    cursor = TickCursor(package_ts=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=30), package_id=0)
    with Session(engine) as session, session.begin():
        session.execute(text(
            "UPDATE raw_data_package SET state = 'archived', updated_at = now() "
            "WHERE id IN (SELECT id FROM raw_data_package ORDER BY random() LIMIT 1000)"))
    with Session(engine) as session, session.begin():
        pipeline = session.scalars(select(m.Pipeline).where(m.Pipeline.name == "bench_tick")).one()
        start = time.perf_counter()
        result = evaluate_tick(session, pipeline, cursor, now=dt.datetime.now(dt.UTC), overlap_seconds=0)
        elapsed = time.perf_counter() - start
        assert result.changed_packages == 1000, result.changed_packages
    engine.dispose()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    medians = {}
    for label, name in DATABASES.items():
        url = f"postgresql+psycopg2://postgres@127.0.0.1:5432/{name}"
        times = [one_tick(url) for _ in range(args.repeat)]
        medians[label] = statistics.median(times)
        print(f"{label}: median {medians[label]:.3f} s over {args.repeat} ticks ({', '.join(f'{t:.3f}' for t in times)})")
    print(f"ratio 1M / 100k: {medians['1M'] / medians['100k']:.2f}")


if __name__ == "__main__":
    main()
