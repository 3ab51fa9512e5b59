"""``ccat-dagster products list``: the data products in ops-db, filtered by pipeline, step, sub-group and type.

By default only current products (not superseded by a newer data version); ``--all`` includes superseded ones.
``--json`` prints one object per product with its copies, for scripts.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from ccat_dagster.errors import CcatError
from ccat_dagster.opsdb import models as m
from ccat_dagster.opsdb.enums import DataProductType

if TYPE_CHECKING:
    from ccat_dagster.settings import Settings

PRODUCT_TYPES = tuple(t.value for t in DataProductType)


class ProductQueryError(CcatError, ValueError):
    """A ``products list`` filter that cannot match anything as written (e.g. an unknown pipeline)."""


@dataclass(frozen=True)
class ProductRow:
    id: int
    pipeline: str
    step: str
    sub_group_key: str
    product_type: str
    relative_path: str
    size_bytes: int
    sha256: str
    attempt_id: int
    superseded_by_id: int | None
    created_at: str
    copies: list[dict[str, str]]


def list_products(
    session: Session,
    *,
    pipeline: str | None = None,
    step: str | None = None,
    sub_group: str | None = None,
    product_type: str | None = None,
    include_superseded: bool = False,
) -> list[ProductRow]:
    """The matching products ordered by pipeline, step position, sub-group and path.

    Raises ``ProductQueryError`` for a pipeline or step that does not exist, so a typo is not an empty list.
    """
    if pipeline is not None and session.scalar(select(m.Pipeline.id).where(m.Pipeline.name == pipeline)) is None:
        known = session.scalars(select(m.Pipeline.name).order_by(m.Pipeline.name)).all()
        raise ProductQueryError(f"--pipeline {pipeline!r} is not in ops-db (pipelines: {', '.join(known) or 'none'})")
    if step is not None:
        steps = select(m.ReductionStep.id).join(m.Pipeline).where(m.ReductionStep.name == step)
        if pipeline is not None:
            steps = steps.where(m.Pipeline.name == pipeline)
        if session.scalar(steps.limit(1)) is None:
            raise ProductQueryError(f"--step {step!r} is no step of {pipeline or 'any pipeline'} in ops-db")
    query = (
        select(m.DataProduct, m.Pipeline.name, m.ReductionStep.name)
        .join(m.ReductionStep, m.DataProduct.reduction_step_id == m.ReductionStep.id)
        .join(m.Pipeline, m.ReductionStep.pipeline_id == m.Pipeline.id)
        .options(selectinload(m.DataProduct.physical_copies).selectinload(m.PhysicalCopy.location))
        .order_by(m.Pipeline.name, m.ReductionStep.position, m.DataProduct.sub_group_key, m.DataProduct.relative_path)
    )
    if pipeline is not None:
        query = query.where(m.Pipeline.name == pipeline)
    if step is not None:
        query = query.where(m.ReductionStep.name == step)
    if sub_group is not None:
        query = query.where(m.DataProduct.sub_group_key == sub_group)
    if product_type is not None:
        query = query.where(m.DataProduct.product_type == DataProductType(product_type))
    if not include_superseded:
        query = query.where(m.DataProduct.superseded_by_id.is_(None))
    return [
        ProductRow(
            id=product.id,
            pipeline=pipeline_name,
            step=step_name,
            sub_group_key=product.sub_group_key,
            product_type=product.product_type.value,
            relative_path=product.relative_path,
            size_bytes=product.size_bytes,
            sha256=product.sha256,
            attempt_id=product.executed_reduction_step_id,
            superseded_by_id=product.superseded_by_id,
            created_at=product.created_at.isoformat(),
            copies=[
                {"location": copy.location.name, "path": copy.path, "status": copy.status.value}
                for copy in sorted(product.physical_copies, key=lambda c: c.id)
            ],
        )
        for product, pipeline_name, step_name in session.execute(query)
    ]


def render_products(rows: list[ProductRow]) -> list[str]:
    if not rows:
        return ["no data products match"]
    lines = [f"{len(rows)} data product(s):"]
    for row in rows:
        copy = next((c["path"] for c in row.copies if c["status"] in ("present", "staged")), "-")
        superseded = f"  superseded by #{row.superseded_by_id}" if row.superseded_by_id else ""
        lines.append(
            f"  #{row.id:<5} {row.pipeline}/{row.step} [{row.sub_group_key}] {row.product_type:<10} "
            f"{row.size_bytes:>10} B  {copy}{superseded}"
        )
    return lines


def register(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    products = commands.add_parser("products", help="the data products in ops-db")
    sub = products.add_subparsers(dest="products_command", required=True, metavar="COMMAND")
    listing = sub.add_parser(
        "list",
        help="list data products (current ones; --all adds superseded)",
        description="List data products with their type, size and copies; filters combine (AND).",
    )
    listing.add_argument("--pipeline", metavar="NAME", help="only products of this pipeline")
    listing.add_argument("--step", metavar="NAME", help="only products of this step")
    listing.add_argument("--sub-group", metavar="KEY", help="only products of this sub_group_key")
    listing.add_argument("--type", choices=PRODUCT_TYPES, help="only products of this type")
    listing.add_argument("--all", action="store_true", help="include products superseded by a newer data version")
    listing.add_argument("--json", action="store_true", help="machine-readable output (a JSON list)")
    listing.set_defaults(handler=_products_list)


def _products_list(args: argparse.Namespace, settings: Settings) -> int:
    from ccat_dagster.opsdb.engine import make_engine, session_scope

    engine = make_engine(settings.ops_db_url)
    try:
        with session_scope(engine) as session:
            rows = list_products(
                session,
                pipeline=args.pipeline,
                step=args.step,
                sub_group=args.sub_group,
                product_type=args.type,
                include_superseded=args.all,
            )
    finally:
        engine.dispose()
    if args.json:
        print(json.dumps([asdict(row) for row in rows], indent=2))
    else:
        print("\n".join(render_products(rows)))
    return 0
