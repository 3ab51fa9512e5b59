"""Readable text for lineage, impact, invalidation and cleanup results (what the CLI prints); pure."""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import json
import uuid
from collections import defaultdict
from collections.abc import Iterable

from ccat_dagster.execution.retention import DeletionAction, DeletionOutcome
from ccat_dagster.opsdb.lineage import (
    LineagePackage,
    LineageProduct,
    LineageRun,
    LineageSummary,
    ProductImpact,
    ProductLineage,
)
from ccat_dagster.provenance.cleanup import CleanupReport
from ccat_dagster.provenance.invalidate import InvalidationResult

_BRANCH, _LAST, _PIPE, _SPACE = "├─ ", "└─ ", "│  ", "   "


def _time(value: dt.datetime | None) -> str:
    return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ") if value else "-"


def product_line(product: LineageProduct) -> str:
    state = "current" if product.is_current else f"superseded by #{product.superseded_by_id}"
    if product.invalidated:
        state += ", derived from invalidated raw data"
    return (
        f"product #{product.id} {product.relative_path} ({product.product_type.value}, "
        f"{product.size_bytes} B, sha256 {product.sha256[:12]}…, {state})"
    )


def package_line(package: LineagePackage, *, files: int | None = None) -> str:
    line = f" {package.line_id}" if package.line_id else ""
    parts = [
        f"scan {package.executed_obs_unit_id} at {_time(package.scan_start)}",
        f"{package.source}{line}",
        f"{package.instrument}/{package.instrument_module}",
        package.state.value,
    ]
    if files is not None:
        parts.append(f"{files} file(s)")
    if package.invalidated_reason:
        parts.append(f"INVALIDATED: {package.invalidated_reason}")
    return f"raw data package #{package.id} {package.name} ({', '.join(parts)})"


def _run_line(run: LineageRun, lineage: ProductLineage) -> str:
    software = lineage.software.get(run.software_version_id)
    parts = [f"{run.status.value} {_time(run.finished_at)}"]
    if software:
        parts.append(f"{software.software} {software.version}")
    return f"attempt #{run.id} {run.label}, {', '.join(parts)}"


def _short_package(package: LineagePackage) -> str:
    flag = " INVALIDATED" if package.invalidated_reason else ""
    return f"#{package.id} {package.name}{flag}"


def render_lineage(lineage: ProductLineage, *, show_files: bool = False) -> list[str]:
    """The ancestors of ``lineage.root`` as a tree (product → attempt → what it used), then the scans."""
    lines = [product_line(lineage.root)]
    location = lineage.locations.get(lineage.root.id)
    if location:
        lines.append(f"  at {location}")
    shown: set[int] = set()
    producer_of = {p.id: p.run_id for p in lineage.products.values()}

    def attempt(run_id: int, prefix: str, connector: str, header: str) -> None:
        run = lineage.runs.get(run_id)
        if run is None:
            lines.append(f"{prefix}{connector}{header}attempt #{run_id} (not readable)")
            return
        if run_id in shown:
            lines.append(f"{prefix}{connector}{header}attempt #{run_id} {run.label} (shown above)")
            return
        shown.add(run_id)
        lines.append(f"{prefix}{connector}{header}{_run_line(run, lineage)}")
        child_prefix = prefix + (_SPACE if connector == _LAST else _PIPE)
        by_producer: dict[int, list[int]] = defaultdict(list)
        for product_id in lineage.used_products.get(run_id, ()):
            by_producer[producer_of.get(product_id, 0)].append(product_id)
        children: list[tuple[str, object]] = [("run", item) for item in sorted(by_producer.items())]
        used = lineage.used_packages.get(run_id, ())
        # One line for all packages of an attempt (a fan-in uses hundreds); with --files one node each.
        children += [("package", p) for p in used] if show_files else ([("package", used)] if used else [])
        for index, (kind, item) in enumerate(children):
            last = index == len(children) - 1
            branch = _LAST if last else _BRANCH
            if kind == "run":
                producer, product_ids = item  # type: ignore[misc]
                names = ", ".join(f"#{p} {lineage.products[p].relative_path}" for p in product_ids)
                attempt(producer, child_prefix, branch, f"used {names} ← ")
            elif show_files:
                package = lineage.packages.get(int(item))  # type: ignore[call-overload]
                name = _short_package(package) if package else f"#{item}"
                files = lineage.files.get(int(item), ())  # type: ignore[call-overload]
                lines.append(f"{child_prefix}{branch}used raw data package {name}")
                file_prefix = child_prefix + (_SPACE if last else _PIPE)
                for f_index, file in enumerate(files):
                    mark = _LAST if f_index == len(files) - 1 else _BRANCH
                    size = f"{file.size_bytes} B, {file.checksum[:12]}…"
                    lines.append(f"{file_prefix}{mark}{file.relative_path} ({size})")
            else:
                names = [
                    _short_package(lineage.packages[p]) if p in lineage.packages else f"#{p}"
                    for p in item  # type: ignore[attr-defined]
                ]
                noun = "package" if len(names) == 1 else f"packages ({len(names)})"
                lines.append(f"{child_prefix}{branch}used raw data {noun}: {', '.join(names)}")

    attempt(lineage.root.run_id, "", _LAST, "generated by ")
    lines.append("")
    lines.extend(render_packages(lineage.packages.values(), title="raw data packages (scans) in this lineage"))
    lines.append("steps (software version and image, config):")
    seen: set[tuple[int, int, int]] = set()
    for run in sorted(lineage.runs.values(), key=lambda r: r.id):
        key = (run.step_id, run.software_version_id, run.config_id)
        if key in seen:
            continue
        seen.add(key)
        software = lineage.software.get(run.software_version_id)
        config = lineage.configs.get(run.config_id)
        text = f"  {run.pipeline}/{run.step}: "
        if software:
            digest = f" @{software.image_digest}" if software.image_digest else ""
            text += f"{software.software} {software.version} ({software.image_ref}{digest})"
        if config:
            text += f", config {config.name} {json.dumps(config.parameters, sort_keys=True)}"
        lines.append(text)
    lines.append(
        f"{len(lineage.runs)} attempt(s), {len(lineage.products)} product(s), "
        f"{len(lineage.packages)} raw data package(s)"
        + (f", {sum(len(f) for f in lineage.files.values())} raw file(s)" if lineage.files_included else "")
    )
    return lines


def render_lineage_summary(summary: LineageSummary) -> list[str]:
    """The ancestors of ``summary.root`` per step (for lineages too large to print attempt by attempt): the
    generating attempt, one line per step, the listed scans and every invalidated one."""
    run = summary.generated_by
    lines = [product_line(summary.root)]
    if summary.location:
        lines.append(f"  at {summary.location}")
    lines.append(f"└─ generated by attempt #{run.id} {run.label}, {run.status.value} {_time(run.finished_at)}")
    lines.append(
        f"   used {summary.used_product_count} upstream product(s) and {summary.used_package_count} raw data "
        "package(s) directly"
    )
    lines.append("")
    lines.append(
        f"lineage: {summary.attempt_count} attempt(s) in {len(summary.steps)} step(s), {summary.product_count} "
        f"upstream product(s), {summary.package_count} raw data package(s) ({summary.file_count} raw file(s), "
        f"{summary.package_bytes} B)"
    )
    lines.append("steps (attempts over sub-groups; software version and image, config; finished):")
    for step in summary.steps:
        software, config = step.software, step.config
        digest = f" @{software.image_digest}" if software.image_digest else ""
        lines.append(
            f"  {step.step.pipeline}/{step.step.name}: {step.attempts} attempt(s) over {step.sub_groups} "
            f"sub-group(s), {software.software} {software.version} ({software.image_ref}{digest}), "
            f"config {config.name} {json.dumps(config.parameters, sort_keys=True)}, finished "
            f"{_time(step.first_finished_at)} … {_time(step.last_finished_at)}"
        )
    lines.append("")
    title = "raw data packages (scans) in this lineage"
    if summary.complete:
        lines.extend(render_packages(summary.packages, title=title))
    else:
        lines.append(
            f"{title}: {summary.package_count} (the first {len(summary.packages)} by id; `--packages-only` lists all)"
        )
        lines.extend(f"  {package_line(p)}" for p in summary.packages)
        lines.append(f"  … {summary.package_count - len(summary.packages)} more")
    if summary.invalidated_packages:
        lines.extend(render_packages(summary.invalidated_packages, title="INVALIDATED raw data packages in it"))
    return lines


def render_packages(packages: Iterable[LineagePackage], *, title: str) -> list[str]:
    rows = sorted(packages, key=lambda p: p.id)
    return [f"{title}: {len(rows)}", *(f"  {package_line(p)}" for p in rows)]


def render_impact(impact: ProductImpact, next_run: dict[str, str] | None = None) -> list[str]:
    """``next_run``: pipeline name → what re-runs a sub-group of it if the subject is invalidated."""
    next_run = next_run or {}
    redo = [g for g in impact.sub_groups if g.needs_redo]
    done = [g for g in impact.sub_groups if not g.needs_redo]
    lines = [
        f"impact of {impact.subject}: {len(impact.runs)} attempt(s) and {len(impact.products)} product(s) "
        f"derive from it ({len(impact.current_products)} current)"
    ]
    if not impact.sub_groups:
        lines.append("nothing was derived from it yet")
        return lines
    lines.append(f"sub-groups to redo if it is bad ({len(redo)}):")
    for group in redo:
        lines.append(
            f"  {group.pipeline}/{group.step} [{group.sub_group_key}]: {len(group.current_product_ids)} "
            f"current product(s), attempt(s) {', '.join(f'#{r}' for r in group.run_ids)}"
            + (f"; if invalidated: {next_run[group.pipeline]}" if group.pipeline in next_run else "")
        )
    if done:
        lines.append(f"sub-groups already redone (only superseded products derive from it) ({len(done)}):")
        lines.extend(f"  {g.pipeline}/{g.step} [{g.sub_group_key}]" for g in done)
    lines.append("current products derived from it:")
    lines.extend(f"  {product_line(p)}" for p in impact.current_products)
    return lines


def impact_as_json(impact: ProductImpact) -> dict[str, object]:
    return {
        "subject": impact.subject,
        "sub_groups": [
            {
                "pipeline": g.pipeline,
                "step": g.step,
                "sub_group_key": g.sub_group_key,
                "needs_redo": g.needs_redo,
                "attempt_ids": list(g.run_ids),
                "current_product_ids": list(g.current_product_ids),
                "superseded_product_ids": list(g.superseded_product_ids),
            }
            for g in impact.sub_groups
        ],
        "products": [
            {
                "id": p.id,
                "relative_path": p.relative_path,
                "product_type": p.product_type.value,
                "attempt_id": p.run_id,
                "current": p.is_current,
            }
            for p in impact.products.values()
        ],
    }


def _json_value(value: object) -> object:
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_value(v) for v in value]
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    return value


def lineage_summary_as_json(summary: LineageSummary) -> dict[str, object]:
    """``lineage --json``: the summary's records as plain JSON values (enums as values, times in ISO 8601)."""
    document = _json_value(dataclasses.asdict(summary))
    assert isinstance(document, dict)
    document["packages_complete"] = summary.complete
    return document


def render_invalidation(result: InvalidationResult, *, dry_run: bool) -> list[str]:
    subject = f"raw data package #{result.package_id} {result.package_name}"
    if result.already_invalidated:
        return [f"{subject} is already invalidated ({result.reason}); nothing changed"]
    would = "would " if dry_run else ""
    header = (
        f"DRY RUN, nothing written: {subject} would be invalidated: {result.reason}"
        if dry_run
        else f"{subject} invalidated: {result.reason}"
    )
    lines = [
        header,
        f"{'would mark' if dry_run else 'marked'} {len(result.marked_product_ids)} current product(s) "
        "derived from it (metadata.invalidated); each is superseded when its sub-group's re-run completes",
    ]
    reruns = [g for g in result.affected if g.reruns]
    retired = [g for g in result.affected if not g.reruns]
    lines.append(f"sub-groups to re-run without it ({len(reruns)}):")
    lines.extend(
        f"  {g.pipeline}/{g.step} [{g.sub_group_key}]: {len(g.remaining_package_ids)} remaining member(s); "
        f"{g.next_run or 'see `ccat-dagster pipelines gaps`'}"
        for g in reruns
    )
    lines.append(
        f"sub-groups retired, no member left ({len(retired)}; {len(result.retired_copy_ids)} intermediate "
        f"cop(ies) {would}→ deletion_possible):"
    )
    lines.extend(f"  {g.pipeline}/{g.step} [{g.sub_group_key}]" for g in retired)
    if result.in_flight_run_ids:
        lines.append(
            "WARNING: attempt(s) in flight use it and are not cancelled: "
            + ", ".join(f"#{r}" for r in result.in_flight_run_ids)
            + "; their products will not be marked (cancel them in the Dagster UI if needed)"
        )
    return lines


def render_cleanup(report: CleanupReport) -> list[str]:
    lines = [
        f"retention cleanup{' (DRY RUN, nothing changed)' if report.dry_run else ''}: {report.summary()}",
        f"allowed roots: {', '.join(str(r) for r in report.allowed_roots)}",
    ]
    verb = "would mark" if report.dry_run else "marked"
    lines.extend(f"  {verb} copy #{c.copy_id} (product #{c.product_id}) {c.path}: {c.reason}" for c in report.marked)
    labels = {
        DeletionAction.WOULD_DELETE: "would delete",
        DeletionAction.DELETED: "deleted",
        DeletionAction.FAILED: "refused" if report.dry_run else "deletion_failed",
    }
    lines.extend(
        f"  {labels[o.action]} copy #{o.copy_id} {o.path}: {o.reason}; {recreation_text(o)}" for o in report.outcomes
    )
    return lines


def recreation_text(outcome: DeletionOutcome) -> str:
    """What re-creating a deleted (or would-be deleted) copy costs, for a person."""
    hours = "CPU time not recorded" if outcome.recreate_cpu_hours is None else f"{outcome.recreate_cpu_hours:g} CPU h"
    return f"re-creating it would re-run {outcome.recreate_attempts} attempt(s), {hours}"
