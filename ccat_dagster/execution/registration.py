"""Product registration: the collection transaction of one attempt, lineage and supersession.

``register_attempt_results`` writes the attempt's DataProducts, their PhysicalCopies, the lineage rows,
supersession of older products and the COMPLETED transition in the CALLER's transaction: commit it and all of
it exists; roll it back (any exception) and none of it does. Nothing here commits.

Supersession rule (one place, documented here): when attempt N of (step, sub_group_key) completes, every
product of an earlier COMPLETED attempt of the same (step, sub_group_key) that is not yet superseded gets
``superseded_by`` =

1. the new product with the same ``relative_path``; else
2. the first new product (ordered by ``relative_path``) of the same ``product_type``; else
3. the first new product (ordered by ``relative_path``) of any type.

So after a completion the non-superseded products of a (step, sub_group_key) are exactly those of its newest
COMPLETED attempt. An attempt that registers no products supersedes nothing. Present copies of superseded
``intermediate`` products become ``deletion_possible``; superseded final products keep their copies.

Lineage closure (one place, documented here): with the links (``run_input_package``, ``run_input_product``)
``record_input_lineage`` writes the attempt's closure rows in the same transaction:

- ``run_ancestor_run``: every attempt that generated a product it used, and every ancestor of those;
- ``run_ancestor_package``: its own input packages and every package of those ancestors;

and ``register_attempt_results`` adds the aggregates of those rows (``record_lineage_aggregates``):

- ``run_lineage_step`` / ``run_lineage_total``: ancestor attempts per step, software version and config;
  counts of products, packages, bytes, files. A summary of a 10,000-scan lineage reads a few rows. What they
  count never changes once recorded (ancestors are COMPLETED; their products, the archived packages and their
  files are fixed).

The closure is computed from the producers' closure rows (one ``INSERT … SELECT`` per table, no walk): a
producer is an attempt whose products exist, so its own closure was written when its links were. Ancestor and
descendant queries (``opsdb.lineage``) and the sensor's walk from a changed package to its consumers
(``execution.triggers``) read these rows instead of walking the graph. Write links only through
``record_input_lineage``; links added by hand need ``record_lineage_closure`` afterwards (and
``record_lineage_aggregates`` for a completed attempt; ``opsdb.lineage.lineage_summary`` computes missing
aggregates on the fly).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import delete, insert, literal, select, union
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ccat_dagster.errors import CcatError
from ccat_dagster.opsdb.enums import DataProductType, PhysicalCopyStatus, RunStatus
from ccat_dagster.opsdb.lineage import attempt_filter, lineage_step_rows, lineage_total_rows
from ccat_dagster.opsdb.models import (
    DataLocation,
    DataProduct,
    ExecutedReductionStep,
    PhysicalCopy,
    RawDataPackage,
    RunLineageStep,
    RunLineageTotal,
    run_ancestor_package,
    run_ancestor_run,
    run_input_package,
    run_input_product,
)
from ccat_dagster.opsdb.states import check_transition, transition

# Attempt columns a caller may fill through ``metrics`` (HPC accounting of the finished job).
ATTEMPT_METRIC_FIELDS = ("exit_code", "wall_time_seconds", "cpu_hours", "peak_memory_gb")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class RegistrationError(CcatError):
    """An attempt's results cannot be registered; nothing of the attempt's collection was written."""


class DiscoveredProductLike(Protocol):
    """The shape of ``ccat_dagster.execution.discovery.DiscoveredProduct`` this module relies on."""

    @property
    def relative_path(self) -> str: ...

    @property
    def product_type(self) -> str: ...

    @property
    def size(self) -> int: ...

    @property
    def sha256(self) -> str: ...

    @property
    def host_path(self) -> Path: ...


def record_input_lineage(
    session: Session,
    *,
    attempt: ExecutedReductionStep,
    package_ids: Sequence[int],
    product_ids: Sequence[int],
) -> None:
    """Link ``attempt`` to the raw packages and upstream products it consumes (run_input_package /
    run_input_product), in the caller's transaction.

    Call it when the attempt is created, so even an attempt that later fails shows what it consumed.
    Idempotent: links that exist are kept, duplicates are skipped. Also writes the attempt's lineage closure
    (``record_lineage_closure``, module docstring). Raises ``RegistrationError`` for an id that does not exist
    or for a product of ``attempt`` itself. ``attempt`` must be in ``session``.
    """
    wanted_packages = list(dict.fromkeys(package_ids))
    if wanted_packages:
        found = session.scalars(select(RawDataPackage).where(RawDataPackage.id.in_(wanted_packages))).all()
        unknown = sorted(set(wanted_packages) - {p.id for p in found})
        if unknown:
            raise RegistrationError(
                f"attempt {attempt.id}: input raw data package id(s) {unknown} do not exist in ops-db; re-plan the step"
            )
        linked = {p.id for p in attempt.input_packages}
        attempt.input_packages.extend(sorted((p for p in found if p.id not in linked), key=lambda p: p.id))
    wanted_products = list(dict.fromkeys(product_ids))
    if wanted_products:
        found_products = session.scalars(select(DataProduct).where(DataProduct.id.in_(wanted_products))).all()
        unknown = sorted(set(wanted_products) - {p.id for p in found_products})
        if unknown:
            raise RegistrationError(
                f"attempt {attempt.id}: input data product id(s) {unknown} do not exist in ops-db; re-plan the step"
            )
        own = sorted(p.id for p in found_products if p.executed_reduction_step_id == attempt.id)
        if own:
            raise RegistrationError(
                f"attempt {attempt.id}: product(s) {own} were produced by this attempt and cannot be its input"
            )
        linked = {p.id for p in attempt.input_products}
        attempt.input_products.extend(sorted((p for p in found_products if p.id not in linked), key=lambda p: p.id))
    session.flush()
    record_lineage_closure(session, attempt_id=attempt.id)


def record_lineage_closure(session: Session, *, attempt_id: int) -> None:
    """Write the missing ``run_ancestor_run`` / ``run_ancestor_package`` rows of attempt ``attempt_id`` from its
    flushed links and its producers' closure rows (module docstring), in the caller's transaction.

    Two ``INSERT … SELECT`` statements whatever the lineage's size; idempotent (rows that exist are kept, so a
    second call after more links were added writes only the new ones).
    """
    rip, rpk = run_input_product, run_input_package
    rar, rap = run_ancestor_run, run_ancestor_package
    product = DataProduct.__table__
    producers = (
        select(product.c.executed_reduction_step_id)
        .join(rip, rip.c.data_product_id == product.c.id)
        .where(rip.c.executed_reduction_step_id == attempt_id)
    )
    ancestors = union(
        producers, select(rar.c.ancestor_run_id).where(rar.c.executed_reduction_step_id.in_(producers))
    ).subquery("ancestors")
    known_runs = select(rar.c.ancestor_run_id).where(rar.c.executed_reduction_step_id == attempt_id)
    session.execute(
        insert(rar).from_select(
            ["executed_reduction_step_id", "ancestor_run_id"],
            select(literal(attempt_id), ancestors.c[0]).where(ancestors.c[0].not_in(known_runs)),
        )
    )
    packages = union(
        select(rpk.c.raw_data_package_id).where(rpk.c.executed_reduction_step_id == attempt_id),
        select(rap.c.raw_data_package_id).where(rap.c.executed_reduction_step_id.in_(producers)),
    ).subquery("packages")
    known_packages = select(rap.c.raw_data_package_id).where(rap.c.executed_reduction_step_id == attempt_id)
    session.execute(
        insert(rap).from_select(
            ["executed_reduction_step_id", "raw_data_package_id"],
            select(literal(attempt_id), packages.c[0]).where(packages.c[0].not_in(known_packages)),
        )
    )


def record_lineage_aggregates(session: Session, *, attempt_id: int | Sequence[int]) -> None:
    """(Re)write ``run_lineage_step`` / ``run_lineage_total`` of attempt ``attempt_id`` (or of several: a
    sequence, in four statements whatever their number) from the closure rows, in the caller's transaction.
    ``register_attempt_results`` calls it once the attempt's products exist (only a product's lineage is ever
    summarized, so attempts that never complete need none)."""
    if not isinstance(attempt_id, int) and not attempt_id:
        return
    _write_lineage_aggregates(session, attempt_id=attempt_id)


def rebuild_lineage_aggregates(session: Session) -> None:
    """Recompute ``run_lineage_step`` and ``run_lineage_total`` of every attempt from the closure rows (the
    statements of ``record_lineage_aggregates``, for all attempts at once): for bulk loads and repairs."""
    _write_lineage_aggregates(session, attempt_id=None)


def _write_lineage_aggregates(session: Session, *, attempt_id: int | Sequence[int] | None) -> None:
    """Replace the lineage aggregates of ``attempt_id`` (None: of every attempt) with ones computed from its
    closure rows: per (ancestor step, software version, config) the attempts, distinct sub-groups and finish
    times; the totals of products used in the lineage, raw packages, their bytes and raw files."""
    steps, totals = RunLineageStep.__table__, RunLineageTotal.__table__
    for table in (steps, totals):
        session.execute(delete(table).where(*attempt_filter(table.c.executed_reduction_step_id, attempt_id)))

    session.execute(
        insert(steps).from_select(
            [
                "executed_reduction_step_id",
                "reduction_step_id",
                "reduction_software_version_id",
                "reduction_step_config_id",
                "attempts",
                "sub_groups",
                "first_finished_at",
                "last_finished_at",
            ],
            lineage_step_rows(attempt_id),
        )
    )
    session.execute(
        insert(totals).from_select(
            ["executed_reduction_step_id", "products", "packages", "package_bytes", "files"],
            lineage_total_rows(attempt_id),
        )
    )


def register_attempt_results(
    session: Session,
    *,
    attempt: ExecutedReductionStep,
    discovered: Sequence[DiscoveredProductLike],
    processing_location_id: int,
    input_package_ids: Sequence[int],
    input_product_ids: Sequence[int],
    metrics: Mapping[str, Any] | None = None,
    lineage_aggregates: bool = True,
) -> list[DataProduct]:
    """Register everything ``attempt`` produced and move it COLLECTING_RESULTS → COMPLETED, in the caller's
    transaction (nothing is committed here).

    Writes one DataProduct per ``discovered`` entry (same order; ``product_type`` one of DataProductType's
    values, ``sha256`` 64 hex digits, ``host_path`` absolute), one ``PhysicalCopy(status=present)`` per
    product at ``processing_location_id`` with the absolute host path, the input lineage and its closure
    (idempotent, see ``record_input_lineage``; empty input lists mean "recorded when the attempt was created"
    and skip it), the lineage aggregates (``record_lineage_aggregates``),
    supersession of older products (module docstring) and the transition.
    ``metrics`` may set the attempt's ``exit_code``, ``wall_time_seconds``, ``cpu_hours``,
    ``peak_memory_gb`` (None values are ignored). ``lineage_aggregates=False`` leaves the aggregates to the
    caller, who then calls ``record_lineage_aggregates`` for all attempts it registered in the transaction at
    once (a runner collecting a round of sub-groups).

    Raises ``RegistrationError`` (bad discovered entry, duplicate relative path, unknown location or input,
    a database constraint) or ``IllegalTransitionError`` (attempt not in COLLECTING_RESULTS). After any
    exception the caller must roll back; then nothing of this call remains and the attempt is still
    COLLECTING_RESULTS. Returns the new products, flushed (ids set).
    """
    attempt_id = attempt.id  # read now: after a failed flush the row cannot be refreshed for messages
    check_transition(RunStatus(attempt.status), RunStatus.COMPLETED, attempt_id=attempt_id)
    entries = _validated(attempt, discovered)
    location = session.get(DataLocation, processing_location_id)
    if location is None:
        raise RegistrationError(
            f"attempt {attempt.id}: processing location id {processing_location_id} does not exist in "
            "ops-db; "
            "check CCAT_WORKFLOW_MANAGER_PROCESSING_LOCATION_ID"
        )
    _apply_metrics(attempt, metrics)
    if input_package_ids or input_product_ids:
        record_input_lineage(session, attempt=attempt, package_ids=input_package_ids, product_ids=input_product_ids)
    if lineage_aggregates:
        record_lineage_aggregates(session, attempt_id=attempt_id)

    products: list[DataProduct] = []
    for entry, product_type in entries:
        product = DataProduct(
            executed_reduction_step=attempt,
            reduction_step_id=attempt.reduction_step_id,
            sub_group_key=attempt.sub_group_key,
            product_type=product_type,
            relative_path=entry.relative_path,
            size_bytes=entry.size,
            sha256=entry.sha256.lower(),
        )
        copy = PhysicalCopy(
            location=location,
            data_product=product,
            path=str(entry.host_path),
            status=PhysicalCopyStatus.PRESENT,
            checksum=entry.sha256.lower(),
        )
        session.add_all([product, copy])
        products.append(product)
    _flush(session, attempt_id, "registering its products")

    superseded = supersede_older_products(session, attempt=attempt, new_products=products)
    total_bytes = sum(p.size_bytes for p in products)
    transition(
        session,
        attempt,
        RunStatus.COMPLETED,
        message=f"{len(products)} product(s), {total_bytes} bytes registered; {len(superseded)} superseded",
    )
    _flush(session, attempt_id, "completing it")
    return products


def supersede_older_products(
    session: Session, *, attempt: ExecutedReductionStep, new_products: Sequence[DataProduct]
) -> list[DataProduct]:
    """Apply the supersession rule of this module's docstring for ``attempt``'s ``new_products``.

    Returns the products that became superseded. Present copies of superseded intermediates become
    ``deletion_possible``. Caller's transaction; the new products must be flushed.
    """
    if not new_products:
        return []
    ordered = sorted(new_products, key=lambda p: p.relative_path)
    by_path = {p.relative_path: p for p in ordered}
    first_of_type: dict[DataProductType, DataProduct] = {}
    for product in ordered:
        first_of_type.setdefault(product.product_type, product)
    older = session.scalars(
        select(DataProduct)
        .join(ExecutedReductionStep, DataProduct.executed_reduction_step_id == ExecutedReductionStep.id)
        .where(DataProduct.reduction_step_id == attempt.reduction_step_id)
        .where(DataProduct.sub_group_key == attempt.sub_group_key)
        .where(DataProduct.superseded_by_id.is_(None))
        .where(DataProduct.executed_reduction_step_id != attempt.id)
        .where(ExecutedReductionStep.status == RunStatus.COMPLETED)
        .order_by(DataProduct.id)
    ).all()
    superseded: list[DataProduct] = []
    replaced_by: dict[int, int] = {}
    for old in older:
        replacement = by_path.get(old.relative_path) or first_of_type.get(old.product_type) or ordered[0]
        old.superseded_by = replacement
        superseded.append(old)
        if old.product_type is DataProductType.INTERMEDIATE:
            replaced_by[old.id] = replacement.id
    if replaced_by:
        copies = session.scalars(
            select(PhysicalCopy)
            .where(PhysicalCopy.data_product_id.in_(list(replaced_by)))
            .where(PhysicalCopy.status == PhysicalCopyStatus.PRESENT)
        ).all()
        for copy in copies:
            copy.status = PhysicalCopyStatus.DELETION_POSSIBLE
            copy.status_reason = (
                f"superseded by product {replaced_by.get(copy.data_product_id or 0)} of attempt {attempt.id}"
            )
    return superseded


def _validated(
    attempt: ExecutedReductionStep, discovered: Sequence[DiscoveredProductLike]
) -> list[tuple[DiscoveredProductLike, DataProductType]]:
    entries: list[tuple[DiscoveredProductLike, DataProductType]] = []
    seen: set[str] = set()
    allowed = ", ".join(t.value for t in DataProductType)
    for entry in discovered:
        where = f"attempt {attempt.id}: discovered product {entry.relative_path!r}"
        try:
            product_type = DataProductType(entry.product_type)
        except ValueError:
            raise RegistrationError(f"{where} has product type {entry.product_type!r}; allowed: {allowed}") from None
        if not entry.relative_path or Path(entry.relative_path).is_absolute():
            raise RegistrationError(f"{where}: the relative path must be non-empty and relative")
        if entry.relative_path in seen:
            raise RegistrationError(f"{where} is listed twice; each output path is one product")
        seen.add(entry.relative_path)
        if not _SHA256.match(entry.sha256.lower()):
            raise RegistrationError(f"{where} has sha256 {entry.sha256!r}; expected 64 hexadecimal digits")
        if entry.size < 0:
            raise RegistrationError(f"{where} has size {entry.size}; expected a size ≥ 0 bytes")
        if not Path(entry.host_path).is_absolute():
            raise RegistrationError(f"{where} has host path {str(entry.host_path)!r}; expected an absolute path")
        entries.append((entry, product_type))
    return entries


def _apply_metrics(attempt: ExecutedReductionStep, metrics: Mapping[str, Any] | None) -> None:
    if not metrics:
        return
    unknown = sorted(set(metrics) - set(ATTEMPT_METRIC_FIELDS))
    if unknown:
        raise RegistrationError(
            f"attempt {attempt.id}: unknown metric(s) {unknown}; allowed: {', '.join(ATTEMPT_METRIC_FIELDS)}"
        )
    for name, value in metrics.items():
        if value is not None:
            setattr(attempt, name, value)


def _flush(session: Session, attempt_id: int, doing: str) -> None:
    try:
        session.flush()
    except IntegrityError as error:
        # The session is unusable now; the caller's rollback removes everything this call added.
        raise RegistrationError(
            f"attempt {attempt_id}: ops-db refused {doing} ({error.orig}); nothing was registered, "
            "roll back and check for products already registered for this attempt"
        ) from error
