"""``/pipelines/groupings/``: DataGrouping CRUD, ``POST …/{id}/resolve`` (the filter engine's sub-groups, as
``ccat-dagster groupings preview``) and ``/pipelines/groupings/presets``."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, Field
from sqlalchemy import select

from ccat_dagster.api.auth import ReadCaller, WriteCaller
from ccat_dagster.api.pagination import Page, PageParams, keyset, page_of, page_params
from ccat_dagster.api.problems import ApiProblem
from ccat_dagster.api.routers.common import MAX_ID, RowId, get_or_404, transaction
from ccat_dagster.grouping.engine import resolve
from ccat_dagster.grouping.presets import list_presets, save_preset
from ccat_dagster.grouping.rules import FilterRuleError, parse_rules, rules_to_json, validate_group_by
from ccat_dagster.opsdb import models as m

router = APIRouter(prefix="/pipelines/groupings", tags=["groupings"])


class GroupingIn(BaseModel):
    name: str = Field(min_length=1, max_length=128)
    description: str = Field(default="", max_length=10_000)
    filter_rules: list[Any] = Field(
        default_factory=list, description="rules {table, column, operator, value, json_path?}"
    )
    instrument_module_id: int | None = Field(default=None, ge=1, le=MAX_ID)


class GroupingOut(BaseModel):
    id: int
    name: str
    description: str
    filter_rules: list[Any]
    instrument_module_id: int | None
    pipelines: list[str]
    created_at: dt.datetime
    updated_at: dt.datetime


class ResolveIn(BaseModel):
    group_by: list[str] = Field(default_factory=list, description="dimensions; [] gives one sub-group 'all'")
    include_unarchived: bool = False
    limit: int = Field(default=1000, ge=0, le=100_000, description="sub-groups returned at most (counts cover all)")
    include_package_ids: bool = False


class SubGroupOut(BaseModel):
    key: str
    dimensions: dict[str, str | None]
    package_count: int
    total_bytes: int
    package_ids: list[int] | None = None


class ResolveOut(BaseModel):
    grouping: str
    group_by: list[str]
    only_archived: bool
    sub_group_count: int
    package_count: int
    total_bytes: int
    truncated: bool
    sub_groups: list[SubGroupOut]


class PresetIn(BaseModel):
    name: str = Field(min_length=1, max_length=128)
    description: str = Field(default="", max_length=10_000)
    filter_rules: list[Any] = Field(default_factory=list)
    group_by: list[str]


class PresetOut(BaseModel):
    name: str
    description: str
    filter_rules: list[Any]
    group_by: list[str]
    builtin: bool


def _checked_rules(raw: list[Any]) -> list[dict[str, Any]]:
    try:
        return rules_to_json(parse_rules(raw))
    except FilterRuleError as error:
        raise ApiProblem(
            422,
            str(error).splitlines()[0] if len(error.problems) == 1 else f"{len(error.problems)} invalid filter rules",
            errors=[(("body." + p.split(" ", 1)[0]), p) for p in error.problems],
        ) from None


def _check_module(session: Any, module_id: int | None) -> None:
    if module_id is not None and session.get(m.InstrumentModule, module_id) is None:
        raise ApiProblem(
            422, f"instrument module {module_id} does not exist", errors=[("body.instrument_module_id", "unknown id")]
        )


def _out(session: Any, row: m.DataGrouping) -> GroupingOut:
    pipelines = list(session.scalars(select(m.Pipeline.name).where(m.Pipeline.data_grouping_id == row.id)))
    return GroupingOut(
        id=row.id,
        name=row.name,
        description=row.description,
        filter_rules=list(row.filter_rules or []),
        instrument_module_id=row.instrument_module_id,
        pipelines=pipelines,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


@router.get("/presets", response_model=list[PresetOut], summary="grouping presets stored in ops-db")
def get_presets(request: Request, caller: ReadCaller) -> list[PresetOut]:
    from ccat_dagster.grouping.presets import BUILTIN_PRESETS

    builtin = {p.name for p in BUILTIN_PRESETS}
    with transaction(request) as session:
        return [
            PresetOut(
                name=p.name,
                description=p.description,
                filter_rules=rules_to_json(p.filter_rules),
                group_by=list(p.group_by),
                builtin=p.name in builtin,
            )
            for p in list_presets(session)
        ]


@router.post("/presets", response_model=PresetOut, status_code=201, summary="create or replace a custom preset")
def put_preset(request: Request, body: PresetIn, caller: WriteCaller) -> PresetOut:
    _checked_rules(body.filter_rules)
    with transaction(request) as session:
        preset = save_preset(
            session,
            name=body.name,
            description=body.description,
            filter_rules=body.filter_rules,
            group_by=body.group_by,
        )
    return PresetOut(
        name=preset.name,
        description=preset.description,
        filter_rules=rules_to_json(preset.filter_rules),
        group_by=list(preset.group_by),
        builtin=False,
    )


@router.get("/", response_model=Page[GroupingOut], summary="data groupings, newest first")
def list_groupings(
    request: Request, caller: ReadCaller, page: Annotated[PageParams, Depends(page_params)]
) -> dict[str, Any]:
    with transaction(request) as session:
        rows = list(session.scalars(keyset(select(m.DataGrouping), m.DataGrouping.id, page)))
        return page_of(rows, page, item_id=lambda r: r.id, convert=lambda r: _out(session, r))


@router.post("/", response_model=GroupingOut, status_code=201, summary="create a data grouping")
def create_grouping(request: Request, body: GroupingIn, caller: WriteCaller) -> GroupingOut:
    rules = _checked_rules(body.filter_rules)
    with transaction(request) as session:
        if session.scalar(select(m.DataGrouping.id).where(m.DataGrouping.name == body.name)) is not None:
            raise ApiProblem(409, f"a data grouping named {body.name!r} exists", errors=[("body.name", "taken")])
        _check_module(session, body.instrument_module_id)
        row = m.DataGrouping(
            name=body.name,
            description=body.description,
            filter_rules=rules,
            instrument_module_id=body.instrument_module_id,
        )
        session.add(row)
        session.flush()
        return _out(session, row)


@router.get("/{grouping_id}", response_model=GroupingOut, summary="one data grouping")
def get_grouping(request: Request, grouping_id: RowId, caller: ReadCaller) -> GroupingOut:
    with transaction(request) as session:
        return _out(session, get_or_404(session, m.DataGrouping, grouping_id, "data grouping"))


@router.put("/{grouping_id}", response_model=GroupingOut, summary="replace a data grouping's rules and description")
def update_grouping(request: Request, grouping_id: RowId, body: GroupingIn, caller: WriteCaller) -> GroupingOut:
    rules = _checked_rules(body.filter_rules)
    with transaction(request) as session:
        row = get_or_404(session, m.DataGrouping, grouping_id, "data grouping")
        if body.name != row.name:
            raise ApiProblem(
                422, f"a grouping cannot be renamed ({row.name!r} → {body.name!r})", errors=[("body.name", "differs")]
            )
        _check_module(session, body.instrument_module_id)
        row.description, row.filter_rules, row.instrument_module_id = (
            body.description,
            rules,
            body.instrument_module_id,
        )
        session.flush()
        return _out(session, row)


@router.delete("/{grouping_id}", status_code=204, summary="delete a grouping no pipeline uses")
def delete_grouping(request: Request, grouping_id: RowId, caller: WriteCaller) -> Response:
    with transaction(request) as session:
        row = get_or_404(session, m.DataGrouping, grouping_id, "data grouping")
        users = list(session.scalars(select(m.Pipeline.name).where(m.Pipeline.data_grouping_id == row.id)))
        if users:
            raise ApiProblem(409, f"data grouping {row.name!r} is used by pipeline(s) {', '.join(users)}")
        session.delete(row)
    return Response(status_code=204)


@router.post("/{grouping_id}/resolve", response_model=ResolveOut, summary="the sub-groups for a group_by; runs nothing")
def resolve_grouping(request: Request, grouping_id: RowId, body: ResolveIn, caller: ReadCaller) -> ResolveOut:
    try:
        dims = validate_group_by(body.group_by)
    except FilterRuleError as error:
        raise ApiProblem(
            422, str(error).splitlines()[0], errors=[("body." + p.split(" ", 1)[0], p) for p in error.problems]
        ) from None
    with transaction(request) as session:
        row = get_or_404(session, m.DataGrouping, grouping_id, "data grouping")
        try:
            rules = parse_rules(row.filter_rules or [])
        except FilterRuleError as error:
            raise FilterRuleError(error.problems, context=f"grouping {row.name!r}") from None
        groups = resolve(
            session,
            filter_rules=rules,
            group_by=dims,
            instrument_module_id=row.instrument_module_id,
            only_archived=not body.include_unarchived,
        )
        name = row.name
    shown = groups[: body.limit]
    return ResolveOut(
        grouping=name,
        group_by=dims,
        only_archived=not body.include_unarchived,
        sub_group_count=len(groups),
        package_count=sum(g.package_count for g in groups),
        total_bytes=sum(g.total_bytes for g in groups),
        truncated=len(shown) < len(groups),
        sub_groups=[
            SubGroupOut(
                key=g.key,
                dimensions=dict(g.dimensions),
                package_count=g.package_count,
                total_bytes=g.total_bytes,
                package_ids=list(g.package_ids) if body.include_package_ids else None,
            )
            for g in shown
        ],
    )
