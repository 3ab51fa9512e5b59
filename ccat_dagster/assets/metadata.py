"""What the Dagster UI shows of a completed sub-group: its materialization metadata and its QA asset checks.

* Figures are rounded to ``SIGNIFICANT_DIGITS`` and carry their unit in the key (``wall_time_s``,
  ``cpu_time_s``, ``peak_memory_gb``); ops-db keeps the exact values.
* ``products``: a table of the attempt's products (path, type, size, sha256), at most ``MAX_PRODUCT_ROWS`` rows;
  a longer list ends with a row that says how many are not shown.
* ``preview``: a thumbnail of each PNG plot product (at most ``MAX_THUMBNAILS``), embedded in markdown as a
  data URI, downscaled to fit ``THUMBNAIL_BOX`` pixels and at most ``MAX_THUMBNAIL_BYTES`` of PNG; a plot that
  cannot be read or shrunk that far is named instead of shown. Nothing here fails the step.
* QA checks: one asset check per entry of the step's ``qa_checks`` (``execution.qa``), evaluated per sub-group.
"""

from __future__ import annotations

import base64
import io
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import dagster as dg

from ccat_dagster.execution.discovery import DiscoveredProduct
from ccat_dagster.execution.qa import QaCheckOutcome, QaThreshold, format_number

SIGNIFICANT_DIGITS = 4
MAX_PRODUCT_ROWS = 50
MAX_THUMBNAILS = 2
THUMBNAIL_BOX = (320, 240)
MAX_THUMBNAIL_BYTES = 48 * 1024
# A plot larger than this is not opened in the step process (a PNG's pixels are decoded into memory).
MAX_PLOT_BYTES = 20 * 1024 * 1024
MAX_PLOT_PIXELS = 25_000_000

PRODUCTS_SCHEMA = dg.TableSchema(
    columns=[
        dg.TableColumn("path", "string", description="relative to output/ (final step) or workspace/<step>/"),
        dg.TableColumn("type", "string", description="DataProductType"),
        dg.TableColumn("size", "string", description="file size (exact bytes in ops-db)"),
        dg.TableColumn("sha256", "string"),
    ]
)

# Outcome metadata → (key shown, factor to the unit in that key). Exact values stay in ops-db.
_FIGURES: Mapping[str, tuple[str, float]] = {
    "wall_time_seconds": ("wall_time_s", 1.0),
    "cpu_hours": ("cpu_time_s", 3600.0),
    "peak_memory_gb": ("peak_memory_gb", 1.0),
    "memory_gb": ("requested_memory_gb", 1.0),
    "time_hours": ("requested_time_h", 1.0),
}


def round_significant(value: float, digits: int = SIGNIFICANT_DIGITS) -> float:
    """``value`` with ``digits`` significant digits: 5.775000000000001e-07 → 5.775e-07, 2.0791 s → 2.079."""
    if value == 0 or not math.isfinite(value):
        return value
    return round(value, digits - 1 - math.floor(math.log10(abs(value))))


def format_size(size: int) -> str:
    """Bytes as people read them: ``812 B``, ``4.0 KiB``, ``1.23 MiB``."""
    if size < 1024:
        return f"{size} B"
    value = float(size)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            return f"{format_number(round_significant(value, 3))} {unit}"
    raise AssertionError("unreachable")


def figures(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The outcome's metadata with numbers rounded and unit-labelled; other entries as they are."""
    shown: dict[str, Any] = {}
    for key, value in metadata.items():
        if value is None:
            continue
        if key in _FIGURES and isinstance(value, int | float) and not isinstance(value, bool):
            name, factor = _FIGURES[key]
            shown[name] = dg.MetadataValue.float(round_significant(float(value) * factor))
        else:
            shown[key] = value
    return shown


def products_table(products: Sequence[DiscoveredProduct]) -> dg.TableMetadataValue:
    rows = [
        dg.TableRecord(
            {"path": p.relative_path, "type": p.product_type, "size": format_size(p.size), "sha256": p.sha256}
        )
        for p in products[:MAX_PRODUCT_ROWS]
    ]
    if len(products) > MAX_PRODUCT_ROWS:
        rest = products[MAX_PRODUCT_ROWS:]
        rows.append(
            dg.TableRecord(
                {
                    "path": f"… {len(rest)} more product(s), listed in ops-db",
                    "type": "",
                    "size": format_size(sum(p.size for p in rest)),
                    "sha256": "",
                }
            )
        )
    return dg.MetadataValue.table(records=rows, schema=PRODUCTS_SCHEMA)


def thumbnail_png(path: Path) -> bytes:
    """A downscaled copy of the PNG at ``path`` (fits THUMBNAIL_BOX; at most MAX_THUMBNAIL_BYTES).

    Raises ``ValueError`` naming why no thumbnail can be made (too large a file or image, not an image, still
    over the byte bound at a quarter of the box).
    """
    from PIL import Image, UnidentifiedImageError

    size = path.stat().st_size
    if size > MAX_PLOT_BYTES:
        raise ValueError(f"{format_size(size)}, more than the {format_size(MAX_PLOT_BYTES)} read for a preview")
    try:
        with Image.open(path) as image:
            if image.width * image.height > MAX_PLOT_PIXELS:
                raise ValueError(f"{image.width} x {image.height} pixels, too many to decode for a preview")
            image.load()
            picture = image.convert("RGBA") if image.mode in ("P", "LA", "PA") else image.copy()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
        raise ValueError(f"not a readable image ({error})") from None
    box = THUMBNAIL_BOX
    for _ in range(3):
        small = picture.copy()
        small.thumbnail(box)
        buffer = io.BytesIO()
        small.save(buffer, format="PNG", optimize=True)
        if buffer.tell() <= MAX_THUMBNAIL_BYTES:
            return buffer.getvalue()
        box = (box[0] // 2 or 1, box[1] // 2 or 1)
    raise ValueError(f"its thumbnail stays above {format_size(MAX_THUMBNAIL_BYTES)}")


def preview_markdown(products: Sequence[DiscoveredProduct]) -> str | None:
    """Markdown with a thumbnail of each PNG plot (or why there is none); None without plots."""
    plots = [p for p in products if p.product_type == "plot" and p.relative_path.lower().endswith(".png")]
    if not plots:
        return None
    parts = []
    for product in plots[:MAX_THUMBNAILS]:
        try:
            data = base64.b64encode(thumbnail_png(product.host_path)).decode("ascii")
        except (OSError, ValueError) as error:
            parts.append(f"`{product.relative_path}`: no preview: {error}")
            continue
        parts.append(f"![{product.relative_path}](data:image/png;base64,{data})\n\n`{product.relative_path}`")
    if len(plots) > MAX_THUMBNAILS:
        parts.append(f"{len(plots) - MAX_THUMBNAILS} more plot(s) without preview")
    return "\n\n".join(parts)


def materialization_metadata(metadata: Mapping[str, Any], products: Sequence[DiscoveredProduct]) -> dict[str, Any]:
    """Everything a completed sub-group's materialization shows."""
    shown = figures(metadata)
    if "products_dir" in shown:
        shown["products_dir"] = dg.MetadataValue.path(str(shown["products_dir"]))
    if products:
        shown["products"] = products_table(products)
        preview = preview_markdown(products)
        if preview is not None:
            shown["preview"] = dg.MetadataValue.md(preview)
    return shown


def qa_check_specs(
    asset_key: dg.AssetKey, thresholds: Sequence[QaThreshold], partitions_def: dg.PartitionsDefinition
) -> list[dg.AssetCheckSpec]:
    # Partitioned checks (one result per sub-group) are a preview feature of Dagster 1.13; the warning would be
    # printed on every load of the code location. tests/test_ui_metadata.py pins that per-partition results work.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.PreviewWarning)
        return [_check_spec(asset_key, threshold, partitions_def) for threshold in thresholds]


def _check_spec(
    asset_key: dg.AssetKey, threshold: QaThreshold, partitions_def: dg.PartitionsDefinition
) -> dg.AssetCheckSpec:
    return dg.AssetCheckSpec(
        threshold.check_name,
        asset=asset_key,
        description=(
            f"QA: {threshold.metric} {threshold.describe()} (qa_checks of the step; read from the "
            f"step's qa/*.json)" + (f". {threshold.description}" if threshold.description else "")
        ),
        partitions_def=partitions_def,
        metadata={"metric": threshold.metric, "limit": threshold.describe(), "severity": threshold.severity},
    )


def qa_check_evaluation(
    asset_key: dg.AssetKey,
    sub_group_key: str,
    outcome: QaCheckOutcome,
    *,
    target: Any = None,
) -> dg.AssetCheckEvaluation:
    """One QA check of one sub-group; ``target`` is the materialization it judges (when known)."""
    metadata: dict[str, Any] = {"limit": outcome.limit}
    if outcome.value is not None:
        metadata["value"] = dg.MetadataValue.float(round_significant(outcome.value))
    if outcome.unit:
        metadata["unit"] = outcome.unit
    if outcome.source:
        metadata["qa_file"] = outcome.source
    if outcome.items:
        metadata["items"] = dg.MetadataValue.json(list(outcome.items[:100]))
    return dg.AssetCheckEvaluation(
        asset_key=asset_key,
        check_name=outcome.check_name,
        passed=outcome.passed,
        metadata=metadata,
        severity=dg.AssetCheckSeverity.WARN if outcome.severity == "warn" else dg.AssetCheckSeverity.ERROR,
        description=outcome.description,
        target_materialization_data=target,
        blocking=False,
        partition=sub_group_key,
    )
