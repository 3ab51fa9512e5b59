"""``/data-products/``: products with filters, detail, ``…/{id}/lineage`` (summary, tree or W3C PROV-JSON, from
the same lineage queries and export as ``ccat-dagster lineage``) and the impact of a raw data package
(``/data-products/raw-packages/{package}/impact``, as ``ccat-dagster impact``)."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from ccat_dagster.api.auth import ReadCaller
from ccat_dagster.api.pagination import Page, PageParams, page_params
from ccat_dagster.api.problems import ApiProblem
from ccat_dagster.api.routers.common import RowId, get_or_404, step_rows_page, transaction
from ccat_dagster.opsdb import models as m
from ccat_dagster.opsdb.enums import DataProductType, PhysicalCopyStatus

router = APIRouter(prefix="/data-products", tags=["data products"])
P = m.DataProduct
# Above this many attempts in a lineage the tree is refused (the summary answers instead), as in the CLI.
TREE_MAX_ATTEMPTS = 200


class ProductOut(BaseModel):
    id: int
    pipeline: str
    step: str
    sub_group_key: str
    product_type: DataProductType
    relative_path: str
    size_bytes: int
    sha256: str
    attempt_id: int
    superseded_by_id: int | None
    current: bool
    created_at: dt.datetime


class CopyOut(BaseModel):
    location: str
    path: str
    status: PhysicalCopyStatus
    checksum: str | None


class ProductDetail(ProductOut):
    metadata: dict[str, Any]
    physical_copies: list[CopyOut]
    input_product_ids: list[int]
    input_package_count: int


def _row(product: m.DataProduct, pipeline: str, step: str) -> dict[str, Any]:
    return {
        "id": product.id,
        "pipeline": pipeline,
        "step": step,
        "sub_group_key": product.sub_group_key,
        "product_type": product.product_type,
        "relative_path": product.relative_path,
        "size_bytes": product.size_bytes,
        "sha256": product.sha256,
        "attempt_id": product.executed_reduction_step_id,
        "superseded_by_id": product.superseded_by_id,
        "current": product.superseded_by_id is None,
        "created_at": product.created_at,
    }


@router.get("/", response_model=Page[ProductOut], summary="data products, newest first, with filters")
def list_products(
    request: Request,
    caller: ReadCaller,
    page: Annotated[PageParams, Depends(page_params)],
    pipeline: Annotated[str | None, Query(max_length=128)] = None,
    step: Annotated[str | None, Query(max_length=64)] = None,
    sub_group: Annotated[str | None, Query(max_length=512)] = None,
    product_type: DataProductType | None = None,
    current: Annotated[bool | None, Query(description="true: not superseded; false: superseded only")] = None,
    created_after: dt.datetime | None = None,
    created_before: dt.datetime | None = None,
) -> dict[str, Any]:
    where = []
    if product_type is not None:
        where.append(P.product_type == product_type)
    if current is not None:
        where.append(P.superseded_by_id.is_(None) if current else P.superseded_by_id.is_not(None))
    with transaction(request) as session:
        return step_rows_page(
            session,
            P,
            page,
            pipeline=pipeline,
            step=step,
            sub_group=sub_group,
            created_after=created_after,
            created_before=created_before,
            where=where,
            convert=_row,
        )


@router.get("/raw-packages/{package}/impact", summary="what derives from a raw data package (id or name)")
def package_impact(request: Request, package: str, caller: ReadCaller) -> dict[str, Any]:
    from ccat_dagster.opsdb.lineage import descendants_of_package, find_package
    from ccat_dagster.provenance.invalidate import pipeline_next_run_notes
    from ccat_dagster.provenance.report import impact_as_json

    with transaction(request) as session:
        row = find_package(session, package)
        impact = descendants_of_package(session, package_id=row.id)
        notes = pipeline_next_run_notes(session, {g.pipeline for g in impact.sub_groups})
        return {"package_id": row.id, "package": row.name, **impact_as_json(impact), "what_happens_next": notes}


@router.get("/{product_id}", response_model=ProductDetail, summary="one data product with its copies")
def get_product(request: Request, product_id: RowId, caller: ReadCaller) -> ProductDetail:
    with transaction(request) as session:
        product = get_or_404(session, P, product_id, "data product")
        attempt = product.executed_reduction_step
        return ProductDetail(
            **_row(product, product.step.pipeline.name, product.step.name),
            metadata=dict(product.metadata_ or {}),
            physical_copies=[
                CopyOut(location=c.location.name, path=c.path, status=c.status, checksum=c.checksum)
                for c in product.physical_copies
            ],
            input_product_ids=sorted(p.id for p in attempt.input_products),
            input_package_count=len(attempt.input_packages),
        )


@router.get(
    "/{product_id}/lineage",
    summary="what a product derives from: summary, tree, or W3C PROV-JSON",
    responses={200: {"content": {"application/json": {}}}},
)
def get_lineage(
    request: Request,
    product_id: RowId,
    caller: ReadCaller,
    view: Annotated[
        Literal["summary", "tree", "prov-json"], Query(description="summary (default), tree, prov-json")
    ] = "summary",
    files: Annotated[bool, Query(description="tree and prov-json: include each package's raw files")] = False,
) -> JSONResponse:
    from ccat_dagster.opsdb.lineage import ancestors, lineage_summary
    from ccat_dagster.provenance.prov import lineage_to_prov_json, validate_prov_json

    with transaction(request) as session:
        get_or_404(session, P, product_id, "data product")
        if view == "prov-json":
            document = lineage_to_prov_json(ancestors(session, product_id=product_id, include_files=files))
            validate_prov_json(document)
            return JSONResponse(document)
        summary = lineage_summary(session, product_id=product_id)
        if view == "summary":
            return JSONResponse(jsonable_encoder(_summary(summary)))
        if summary.attempt_count > TREE_MAX_ATTEMPTS:
            raise ApiProblem(
                422,
                f"the lineage of product {product_id} has {summary.attempt_count} attempts, more than the "
                f"{TREE_MAX_ATTEMPTS} a tree shows: ask for view=summary or view=prov-json",
                errors=[("query.view", "tree too large")],
            )
        lineage = ancestors(session, product_id=product_id, include_files=files)
        return JSONResponse(jsonable_encoder(_tree(lineage)))


def _plain(record: Any) -> dict[str, Any]:
    return dataclasses.asdict(record)


def _summary(summary: Any) -> dict[str, Any]:
    return {
        "view": "summary",
        "root": _plain(summary.root),
        "location": summary.location,
        "generated_by": _plain(summary.generated_by),
        "attempt_count": summary.attempt_count,
        "product_count": summary.product_count,
        "package_count": summary.package_count,
        "package_bytes": summary.package_bytes,
        "file_count": summary.file_count,
        "used_product_count": summary.used_product_count,
        "used_package_count": summary.used_package_count,
        "steps": [
            {
                "pipeline": s.step.pipeline,
                "step": s.step.name,
                "position": s.position,
                "software": f"{s.software.software} {s.software.version}",
                "image_digest": s.software.image_digest,
                "config_id": s.config.id,
                "config_sha256": s.config.parameters_sha256,
                "attempts": s.attempts,
                "sub_groups": s.sub_groups,
                "first_finished_at": s.first_finished_at,
                "last_finished_at": s.last_finished_at,
            }
            for s in summary.steps
        ],
        "packages": [_plain(p) for p in summary.packages],
        "packages_complete": summary.complete,
        "invalidated_packages": [_plain(p) for p in summary.invalidated_packages],
    }


def _tree(lineage: Any) -> dict[str, Any]:
    return {
        "view": "tree",
        "root": _plain(lineage.root),
        "attempts": [
            {
                **_plain(run),
                "used_product_ids": list(lineage.used_products.get(run.id, ())),
                "used_package_ids": list(lineage.used_packages.get(run.id, ())),
            }
            for run in lineage.runs.values()
        ],
        "products": [_plain(p) for p in lineage.products.values()],
        "packages": [
            {
                **_plain(p),
                **({"files": [_plain(f) for f in lineage.files.get(p.id, ())]} if lineage.files_included else {}),
            }
            for p in lineage.packages.values()
        ],
        "steps": [_plain(s) for s in lineage.steps.values()],
        "software": [_plain(s) for s in lineage.software.values()],
        "configs": [_plain(c) for c in lineage.configs.values()],
    }
