"""What the Dagster UI shows of a completed sub-group: rounded figures, the products table, plot thumbnails, and
the QA contract (qa/*.json in the published schema, thresholds from qa_checks, asset check evaluations).

Pure functions in milliseconds, plus one in-process Dagster materialization (ephemeral instance) that pins the
Dagster behaviour the step assets rely on: per-partition check evaluations logged from the asset body, and the
table and markdown metadata stored with the materialization.
"""

from __future__ import annotations

import base64
import io
import json
import random
import re
from pathlib import Path

import dagster as dg
import jsonschema
import pytest
from PIL import Image

from ccat_dagster.assets import metadata as md
from ccat_dagster.assets.factory import _AssetEventBatch
from ccat_dagster.execution.discovery import DiscoveredProduct
from ccat_dagster.execution.outcomes import OutcomeKind, SubGroupOutcome
from ccat_dagster.execution.qa import (
    QaThreshold,
    evaluate_qa_checks,
    qa_schema,
    read_qa_reports,
    thresholds_from_dict,
    thresholds_to_dict,
)
from ccat_dagster.grouping.engine import scan_label
from ccat_dagster.grouping.keys import decode_sub_group_key, encode_sub_group_key

SHA = "ab" * 32


def _product(tmp_path: Path, relative: str, product_type: str, content: bytes) -> DiscoveredProduct:
    path = tmp_path / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return DiscoveredProduct(relative, product_type, len(content), SHA, path)


def _png(width: int, height: int, *, noisy: bool = False) -> bytes:
    image = Image.new("RGB", (width, height), (30, 90, 160))
    if noisy:
        image = Image.frombytes("RGB", (width, height), random.Random(1).randbytes(width * height * 3))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _qa(metrics: dict) -> bytes:
    return json.dumps({"qa_version": 1, "metrics": metrics, "scans": ["kept as it is"]}).encode()


# ------------------------------------------------------------------------------------------------ figures


def test_figures_are_rounded_and_carry_their_unit_in_the_key():
    shown = md.figures(
        {
            "cpu_hours": 5.775000000000001e-07,
            "wall_time_seconds": 2.04567891,
            "peak_memory_gb": 0.0612345,
            "memory_gb": 2,
            "time_hours": 1,
            "hpc_job_id": "42",
            "product_count": 6,
            "exit_code": None,
        }
    )
    assert shown["cpu_time_s"] == dg.MetadataValue.float(0.002079)  # 5.775e-07 h = 0.002079 s
    assert shown["wall_time_s"] == dg.MetadataValue.float(2.046)
    assert shown["peak_memory_gb"] == dg.MetadataValue.float(0.06123)
    assert shown["requested_memory_gb"] == dg.MetadataValue.float(2.0)
    assert shown["requested_time_h"] == dg.MetadataValue.float(1.0)
    assert (shown["hpc_job_id"], shown["product_count"]) == ("42", 6)
    assert "cpu_hours" not in shown and "exit_code" not in shown


@pytest.mark.parametrize(
    ("value", "expected"),
    [(5.775000000000001e-07, 5.775e-07), (123456.7, 123500.0), (0.0, 0.0), (-0.00123456, -0.001235)],
)
def test_round_significant(value, expected):
    assert md.round_significant(value) == expected


@pytest.mark.parametrize(
    ("size", "text"), [(0, "0 B"), (1023, "1023 B"), (4096, "4 KiB"), (26616, "26 KiB"), (5 * 2**20, "5 MiB")]
)
def test_sizes_read_as_people_write_them(size, text):
    assert md.format_size(size) == text


# ------------------------------------------------------------------------------------------- products table


def test_the_products_table_lists_path_type_size_and_sha256(tmp_path):
    products = [
        _product(tmp_path, "plots/all_mom0.png", "plot", b"x" * 2048),
        _product(tmp_path, "science/all_cube.fits", "science", b"y" * 10),
    ]
    table = md.products_table(products)
    assert [c.name for c in table.schema.columns] == ["path", "type", "size", "sha256"]
    assert [r.data for r in table.records] == [
        {"path": "plots/all_mom0.png", "type": "plot", "size": "2 KiB", "sha256": SHA},
        {"path": "science/all_cube.fits", "type": "science", "size": "10 B", "sha256": SHA},
    ]


def test_a_long_product_list_ends_with_a_row_that_counts_the_rest(tmp_path):
    products = [DiscoveredProduct(f"f{i:03d}", "intermediate", 1024, SHA, tmp_path) for i in range(60)]
    rows = md.products_table(products).records
    assert len(rows) == md.MAX_PRODUCT_ROWS + 1
    assert rows[-1].data["path"] == "… 10 more product(s), listed in ops-db" and rows[-1].data["size"] == "10 KiB"


# ------------------------------------------------------------------------------------------------ thumbnails


def test_a_plot_becomes_a_small_embedded_thumbnail(tmp_path):
    plot = _product(tmp_path, "plots/all_mom0.png", "plot", _png(600, 500))
    text = md.preview_markdown([plot, _product(tmp_path, "qa/all_qa.json", "qa_metric", b"{}")])
    assert text is not None
    data = re.fullmatch(r"!\[plots/all_mom0.png\]\(data:image/png;base64,(\S+)\)\n\n`plots/all_mom0.png`", text)
    assert data, text
    png = base64.b64decode(data.group(1))
    assert len(png) <= md.MAX_THUMBNAIL_BYTES
    with Image.open(io.BytesIO(png)) as image:
        assert image.size == (288, 240)  # fits 320 x 240, aspect kept


def test_a_thumbnail_over_the_byte_bound_is_made_smaller(tmp_path, monkeypatch):
    monkeypatch.setattr(md, "MAX_THUMBNAIL_BYTES", 40_000)
    png = md.thumbnail_png(_product(tmp_path, "plots/noise.png", "plot", _png(800, 600, noisy=True)).host_path)
    with Image.open(io.BytesIO(png)) as image:
        assert image.width < 320 and len(png) <= 40_000


def test_an_unreadable_plot_is_named_instead_of_failing_the_step(tmp_path, monkeypatch):
    broken = _product(tmp_path, "plots/broken.png", "plot", b"not a png")
    text = md.preview_markdown([broken])
    assert text is not None and text.startswith("`plots/broken.png`: no preview: not a readable image")
    monkeypatch.setattr(md, "MAX_PLOT_BYTES", 10)
    big = _product(tmp_path, "plots/big.png", "plot", _png(20, 20))
    assert "more than the 10 B read for a preview" in (md.preview_markdown([big]) or "")
    assert md.preview_markdown([_product(tmp_path, "science/x.fits", "science", b"x")]) is None


# ------------------------------------------------------------------------------------------------ QA contract


def test_the_qa_schema_is_valid_and_accepts_what_the_example_software_writes():
    schema = qa_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    example = {
        "qa_version": 1,
        "metrics": {
            "rms_k": {"value": 0.1, "unit": "K", "description": "off-line rms"},
            "flagged_scans": {"value": 1, "unit": "scans", "items": ["chai-lfa-20261001T021500"]},
            "not_measured": {"value": None},
        },
        "program_specific": {"anything": [1, 2]},
    }
    jsonschema.validate(example, schema)


def test_checks_pass_within_and_fail_beyond_their_limits(tmp_path):
    qa = _product(
        tmp_path,
        "qa/all_qa.json",
        "qa_metric",
        _qa(
            {
                "rms_k": {"value": 0.1024, "unit": "K"},
                "flagged_scans": {"value": 1, "unit": "scans", "items": ["chai-lfa-20261001T021500"]},
                "coverage": {"value": 0.4},
                "noise": {"value": None},
            }
        ),
    )
    report = read_qa_reports([(qa.relative_path, qa.host_path)])
    thresholds = thresholds_from_dict(
        {
            "rms_k": {"max": 0.2},
            "flagged_scans": {"max": 0, "severity": "warn"},
            "coverage": {"min": 0.5, "max": 1},
            "noise": {"max": 1},
        }
    )
    outcomes = {o.metric: o for o in evaluate_qa_checks(thresholds, report)}
    assert outcomes["rms_k"].passed and outcomes["rms_k"].description == "rms_k = 0.1024 K, within ≤ 0.2 K"
    flagged = outcomes["flagged_scans"]
    assert not flagged.passed and flagged.severity == "warn" and flagged.check_name == "qa_flagged_scans"
    assert flagged.description == ("flagged_scans = 1 scans is above the limit (≤ 0 scans): chai-lfa-20261001T021500")
    assert not outcomes["coverage"].passed and "is below the limit (from 0.5 to 1)" in outcomes["coverage"].description
    assert not outcomes["noise"].passed and "was not measured" in outcomes["noise"].description
    assert (flagged.source, flagged.items, flagged.value) == ("qa/all_qa.json", ("chai-lfa-20261001T021500",), 1.0)


def test_the_limits_themselves_pass():
    report = read_qa_reports([])
    (outcome,) = evaluate_qa_checks([QaThreshold("x", max=0)], report)
    assert not outcome.passed and "no qa/*.json file was written" in outcome.description


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"{not json", "qa/bad.json: not JSON"),
        (b"\xff\xfe", "qa/bad.json: not JSON"),
        (json.dumps({"metrics": {}}).encode(), "qa/bad.json: the document: 'qa_version' is a required property"),
        (_qa({"rms_k": {"value": "low"}}), "qa/bad.json: metrics/rms_k/value: 'low' is not of type"),
        (_qa({"RMS": {"value": 1}}), "qa/bad.json: metrics: 'RMS' does not match"),
        (_qa({"rms_k": {"value": 1, "colour": "red"}}), "qa/bad.json: metrics/rms_k: Additional properties"),
    ],
)
def test_a_malformed_qa_file_fails_the_checks_with_a_clear_reason_and_raises_nothing(tmp_path, content, problem):
    bad = _product(tmp_path, "qa/bad.json", "qa_metric", content)
    report = read_qa_reports([(bad.relative_path, bad.host_path)])
    assert len(report.problems) == 1 and report.problems[0].startswith(problem), report.problems
    (outcome,) = evaluate_qa_checks([QaThreshold("rms_k", max=1)], report)
    assert not outcome.passed
    assert outcome.description.startswith("metric 'rms_k' is in no QA file (qa/bad.json); qa/bad.json: ")


def test_a_metric_in_two_files_and_an_oversized_file_are_problems(tmp_path, monkeypatch):
    one = _product(tmp_path, "qa/a.json", "qa_metric", _qa({"rms_k": {"value": 0.1}}))
    two = _product(tmp_path, "qa/b.json", "qa_metric", _qa({"rms_k": {"value": 0.9}}))
    report = read_qa_reports([(p.relative_path, p.host_path) for p in (two, one)])
    assert report.metrics["rms_k"].value == 0.1 and report.metrics["rms_k"].source == "qa/a.json"
    assert report.problems == ("qa/b.json: metric 'rms_k' is also in qa/a.json; name each metric once",)
    monkeypatch.setattr("ccat_dagster.execution.qa.MAX_QA_FILE_BYTES", 10)
    assert "more than the 10 bytes a QA report may have" in read_qa_reports([("qa/a.json", one.host_path)]).problems[0]


def test_thresholds_round_trip_through_the_stored_form():
    thresholds = (QaThreshold("a", max=1.0), QaThreshold("b", min=0.5, severity="warn", description="why"))
    stored = thresholds_to_dict(thresholds)
    assert stored == {"a": {"max": 1.0}, "b": {"min": 0.5, "severity": "warn", "description": "why"}}
    assert thresholds_from_dict(stored) == thresholds
    assert thresholds_from_dict(None) == ()


# ------------------------------------------------------------------------------------------- readable keys


def test_a_scan_key_names_start_and_id_and_is_a_safe_partition_key():
    import datetime as dt
    import uuid

    eou = uuid.UUID("094daaf8-1c2b-4d3e-8f90-a1b2c3d4e5f6")
    start = dt.datetime(2026, 10, 1, 3, 30, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    label = scan_label(start, eou)
    assert label == "20261001T0130_094daaf8"  # UTC
    assert scan_label(start, str(eou)) == label
    key = encode_sub_group_key([("scan", label)])
    assert key == "scan=20261001T0130_094daaf8"
    assert decode_sub_group_key(key) == [("scan", label)]
    assert scan_label(None, eou) == "nostart_094daaf8"


# ----------------------------------------------------------------------------- Dagster: per-partition checks


def test_materialization_and_per_partition_checks_reach_the_event_log(tmp_path):
    """Pins what the step assets rely on in Dagster 1.13: evaluations logged for a partition the run does not
    target (a sensor run lists its sub-groups in run config), table and markdown metadata stored."""
    parts = dg.DynamicPartitionsDefinition(name="probe__scan")
    key = dg.AssetKey(["probe", "grid_map"])
    thresholds = (QaThreshold("rms_k", max=0.2), QaThreshold("flagged_scans", max=0))
    specs = md.qa_check_specs(key, thresholds, parts)
    products = (
        _product(tmp_path, "plots/all_mom0.png", "plot", _png(60, 50)),
        _product(
            tmp_path,
            "qa/all_qa.json",
            "qa_metric",
            _qa({"rms_k": {"value": 0.1, "unit": "K"}, "flagged_scans": {"value": 1, "items": ["s1"]}}),
        ),
    )

    @dg.asset(key=key, partitions_def=parts, check_specs=specs, output_required=False)
    def probe(context):  # no annotation: this module postpones them, Dagster reads the real one
        batch = _AssetEventBatch(context)
        for sub_group in ("scan=a", "scan=b"):
            batch.add_outcome(
                SubGroupOutcome(sub_group, OutcomeKind.COMPLETED, metadata={"product_count": 2}, products=products),
                thresholds,
            )
        batch.flush()
        for spec in specs:
            yield dg.Output(None, output_name=spec.get_python_identifier())

    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("probe__scan", ["scan=a", "scan=b"])
    assert dg.materialize([probe], instance=instance, partition_key="scan=a").success

    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=key, asset_partitions=["scan=b"]), limit=1
    ).records
    metadata = records[0].asset_materialization.metadata
    assert isinstance(metadata["products"], dg.TableMetadataValue) and len(metadata["products"].records) == 2
    assert metadata["preview"].md_str.startswith("![plots/all_mom0.png](data:image/png;base64,")
    for check_name, passed in (("qa_rms_k", True), ("qa_flagged_scans", False)):
        history = instance.event_log_storage.get_asset_check_execution_history(
            dg.AssetCheckKey(key, check_name), limit=10
        )
        evaluations = {r.partition: r.event.dagster_event.event_specific_data for r in history if r.event}
        assert set(evaluations) >= {"scan=a", "scan=b"}, evaluations
        assert {e.passed for p, e in evaluations.items() if p in ("scan=a", "scan=b")} == {passed}
        assert evaluations["scan=b"].target_materialization_data is not None
