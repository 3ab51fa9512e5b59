"""QA results of a final step (the QA contract): ``qa/*.json`` reports and the step's ``qa_checks`` thresholds.

The container writes ``/workflow/output/qa/<name>.json`` documents in the published schema
``qa.schema.json`` (``qa_version`` 1, ``metrics`` by name: value, unit, description, items). After the attempt
completed, ``read_qa_reports`` reads the QA products of the attempt and ``evaluate_qa_checks`` compares the
named metrics with the thresholds of the step's ``qa_checks`` (pipeline YAML, validated when the pipeline is
applied). Every outcome is plain data; the Dagster layer turns each into an asset check evaluation.

A QA file that cannot be read, is not JSON or breaks the schema never fails the step: its products are
registered as they are, and every check whose metric is therefore missing fails with a description naming the
file and what is wrong with it. Nothing here knows of Dagster.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema

QA_SCHEMA_PATH = Path(__file__).with_name("qa.schema.json")
QA_PRODUCT_TYPE = "qa_metric"
# A QA report is a handful of numbers; a larger file is not read (it would be parsed in the step process).
MAX_QA_FILE_BYTES = 1 << 20
SEVERITIES = ("error", "warn")


@dataclass(frozen=True)
class QaThreshold:
    """One entry of a step's ``qa_checks``: the metric must stay within [min, max] (either may be open)."""

    metric: str
    min: float | None = None
    max: float | None = None
    severity: str = "error"
    description: str = ""

    @property
    def check_name(self) -> str:
        """The Dagster asset check's name."""
        return f"qa_{self.metric}"

    def describe(self, unit: str = "") -> str:
        """The accepted range as people write it: ``≤ 0.5 K``, ``≥ 3``, ``from 1 to 2 K``."""
        suffix = f" {unit}" if unit else ""
        if self.min is not None and self.max is not None:
            return f"from {format_number(self.min)} to {format_number(self.max)}{suffix}"
        if self.max is not None:
            return f"≤ {format_number(self.max)}{suffix}"
        return f"≥ {format_number(self.min)}{suffix}"

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        if self.min is not None:
            data["min"] = self.min
        if self.max is not None:
            data["max"] = self.max
        if self.severity != "error":
            data["severity"] = self.severity
        if self.description:
            data["description"] = self.description
        return data


def thresholds_from_dict(data: Mapping[str, Any] | None) -> tuple[QaThreshold, ...]:
    """``ReductionStep.qa_checks`` (metric → {min, max, severity, description}) as thresholds, by metric."""
    return tuple(
        QaThreshold(
            metric=metric,
            min=_number_or_none(entry.get("min")),
            max=_number_or_none(entry.get("max")),
            severity=str(entry.get("severity", "error")),
            description=str(entry.get("description", "")),
        )
        for metric, entry in sorted((data or {}).items())
    )


def thresholds_to_dict(thresholds: Sequence[QaThreshold]) -> dict[str, dict[str, Any]]:
    return {t.metric: t.to_dict() for t in sorted(thresholds, key=lambda t: t.metric)}


@dataclass(frozen=True)
class QaMetric:
    name: str
    value: float | None
    unit: str
    description: str
    items: tuple[str, ...]
    source: str
    """The QA file's relative path (``qa/<name>.json``)."""


@dataclass(frozen=True)
class QaReport:
    """The metrics of one attempt's QA files, and what was wrong with the files that could not be used."""

    metrics: Mapping[str, QaMetric]
    problems: tuple[str, ...] = ()
    files: tuple[str, ...] = ()


@dataclass(frozen=True)
class QaCheckOutcome:
    check_name: str
    metric: str
    passed: bool
    severity: str
    description: str
    value: float | None = None
    unit: str = ""
    limit: str = ""
    source: str = ""
    items: tuple[str, ...] = ()


def is_qa_file(relative_path: str, product_type: str) -> bool:
    return product_type == QA_PRODUCT_TYPE and relative_path.endswith(".json")


def read_qa_reports(files: Sequence[tuple[str, Path]]) -> QaReport:
    """Read ``(relative_path, host_path)`` QA files; never raises for what a container wrote."""
    metrics: dict[str, QaMetric] = {}
    problems: list[str] = []
    for relative, path in sorted(files):
        document, problem = _load(relative, path)
        if problem:
            problems.append(problem)
            continue
        for name, entry in sorted(document["metrics"].items()):
            if name in metrics:
                problems.append(f"{relative}: metric {name!r} is also in {metrics[name].source}; name each metric once")
                continue
            metrics[name] = QaMetric(
                name=name,
                value=None if entry["value"] is None else float(entry["value"]),
                unit=entry.get("unit", ""),
                description=entry.get("description", ""),
                items=tuple(entry.get("items", ())),
                source=relative,
            )
    return QaReport(metrics=metrics, problems=tuple(problems), files=tuple(sorted(r for r, _ in files)))


def evaluate_qa_checks(thresholds: Sequence[QaThreshold], report: QaReport) -> list[QaCheckOutcome]:
    """One outcome per threshold: passed when its metric was measured and lies within the limits."""
    outcomes = []
    for threshold in thresholds:
        metric = report.metrics.get(threshold.metric)
        if metric is None:
            where = ", ".join(report.files) if report.files else "no qa/*.json file was written"
            reason = f"metric {threshold.metric!r} is in no QA file ({where})"
            if report.problems:
                reason += "; " + "; ".join(report.problems)
            outcomes.append(
                QaCheckOutcome(
                    threshold.check_name,
                    threshold.metric,
                    passed=False,
                    severity=threshold.severity,
                    description=reason,
                    limit=threshold.describe(),
                )
            )
            continue
        limit = threshold.describe(metric.unit)
        value_text = f"{threshold.metric} = {format_quantity(metric.value, metric.unit)}"
        if metric.value is None or not math.isfinite(metric.value):
            passed, description = False, f"{threshold.metric} was not measured ({metric.source} gives null)"
        elif threshold.max is not None and metric.value > threshold.max:
            passed, description = False, f"{value_text} is above the limit ({limit})"
        elif threshold.min is not None and metric.value < threshold.min:
            passed, description = False, f"{value_text} is below the limit ({limit})"
        else:
            passed, description = True, f"{value_text}, within {limit}"
        if metric.items:
            description += f": {', '.join(metric.items[:10])}" + (" …" if len(metric.items) > 10 else "")
        outcomes.append(
            QaCheckOutcome(
                threshold.check_name,
                threshold.metric,
                passed=passed,
                severity=threshold.severity,
                description=description,
                value=metric.value,
                unit=metric.unit,
                limit=limit,
                source=metric.source,
                items=metric.items,
            )
        )
    return outcomes


def format_number(value: float) -> str:
    """Four significant digits, no exponent for everyday magnitudes: 0.1235, 12.5, 3, 1.2e-07."""
    return f"{value:.4g}"


def format_quantity(value: float | None, unit: str) -> str:
    if value is None:
        return "not measured"
    return f"{format_number(value)} {unit}".rstrip()


@functools.cache
def qa_schema() -> dict[str, Any]:
    schema: dict[str, Any] = json.loads(QA_SCHEMA_PATH.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return schema


@functools.cache
def _validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(qa_schema())


def _load(relative: str, path: Path) -> tuple[dict[str, Any], str | None]:
    try:
        size = path.stat().st_size
        if size > MAX_QA_FILE_BYTES:
            return {}, f"{relative}: {size} bytes, more than the {MAX_QA_FILE_BYTES} bytes a QA report may have"
        document = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as error:
        return {}, f"{relative}: cannot be read ({error.strerror or error})"
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        return {}, f"{relative}: not JSON ({error})"
    errors = sorted(_validator().iter_errors(document), key=lambda e: list(e.absolute_path))
    if errors:
        error = jsonschema.exceptions.best_match(errors)
        where = "/".join(str(part) for part in error.absolute_path) or "the document"
        return {}, f"{relative}: {where}: {error.message} (schema qa.schema.json, qa_version 1)"
    return document, None


def _number_or_none(value: Any) -> float | None:
    return None if value is None else float(value)
