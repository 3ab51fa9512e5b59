"""``/pipelines/configs/``: ReductionStepConfig rows (step parameters).

Rows are immutable (attempts keep the parameters they ran with): changed parameters are a new row, which is
what ``POST`` creates (the same name and parameters give the existing row back); ``DELETE`` removes a row
nothing refers to. There is no update.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, Field
from sqlalchemy import select

from ccat_dagster.api.auth import ReadCaller, WriteCaller
from ccat_dagster.api.pagination import Page, PageParams, keyset, page_of, page_params
from ccat_dagster.api.problems import ApiProblem
from ccat_dagster.api.routers.common import RowId, count_of, get_or_404, transaction
from ccat_dagster.opsdb import models as m
from ccat_dagster.pipelines.spec import sha256_of

router = APIRouter(prefix="/pipelines/configs", tags=["configs"])


class ConfigIn(BaseModel):
    name: str = Field(min_length=1, max_length=256)
    parameters: dict[str, Any] = Field(default_factory=dict)


class ConfigOut(BaseModel):
    id: int
    name: str
    parameters: dict[str, Any]
    parameters_sha256: str
    created_at: dt.datetime


def _out(row: m.ReductionStepConfig) -> ConfigOut:
    return ConfigOut(
        id=row.id,
        name=row.name,
        parameters=dict(row.parameters),
        parameters_sha256=row.parameters_sha256,
        created_at=row.created_at,
    )


@router.get("/", response_model=Page[ConfigOut], summary="step configs, newest first")
def list_configs(
    request: Request,
    caller: ReadCaller,
    page: Annotated[PageParams, Depends(page_params)],
    name: Annotated[str | None, Query(max_length=256)] = None,
) -> dict[str, Any]:
    query = select(m.ReductionStepConfig)
    if name is not None:
        query = query.where(m.ReductionStepConfig.name == name)
    with transaction(request) as session:
        rows = list(session.scalars(keyset(query, m.ReductionStepConfig.id, page)))
        return page_of(rows, page, item_id=lambda r: r.id, convert=_out)


@router.post("/", response_model=ConfigOut, status_code=201, summary="store step parameters (idempotent)")
def create_config(request: Request, body: ConfigIn, response: Response, caller: WriteCaller) -> ConfigOut:
    try:
        digest = sha256_of(body.parameters)
    except ValueError as error:
        raise ApiProblem(
            422, f"parameters are not plain JSON: {error}", errors=[("body.parameters", str(error))]
        ) from None
    with transaction(request) as session:
        row = session.scalars(
            select(m.ReductionStepConfig).where(
                m.ReductionStepConfig.name == body.name, m.ReductionStepConfig.parameters_sha256 == digest
            )
        ).one_or_none()
        if row is not None:
            response.status_code = 200
            return _out(row)
        row = m.ReductionStepConfig(name=body.name, parameters=dict(body.parameters), parameters_sha256=digest)
        session.add(row)
        session.flush()
        return _out(row)


@router.get("/{config_id}", response_model=ConfigOut, summary="one step config")
def get_config(request: Request, config_id: RowId, caller: ReadCaller) -> ConfigOut:
    with transaction(request) as session:
        return _out(get_or_404(session, m.ReductionStepConfig, config_id, "step config"))


@router.delete("/{config_id}", status_code=204, summary="delete a config no step or attempt uses")
def delete_config(request: Request, config_id: RowId, caller: WriteCaller) -> Response:
    with transaction(request) as session:
        row = get_or_404(session, m.ReductionStepConfig, config_id, "step config")
        steps = count_of(session, m.ReductionStep.reduction_step_config_id, row.id)
        attempts = count_of(session, m.ExecutedReductionStep.reduction_step_config_id, row.id)
        if steps or attempts:
            raise ApiProblem(409, f"step config {row.id} is used by {steps} step(s) and {attempts} attempt(s)")
        session.delete(row)
    return Response(status_code=204)
