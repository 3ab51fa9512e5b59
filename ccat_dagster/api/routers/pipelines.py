"""``/pipelines/``: pipeline CRUD with nested steps (the pipeline-YAML document as JSON, checked and stored by
the same code as ``pipelines validate/apply``, all-or-nothing), enable / disable, and ``…/{id}/trigger``."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, Field
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ccat_dagster.api.auth import ReadCaller, WriteCaller
from ccat_dagster.api.pagination import Page, PageParams, page_params
from ccat_dagster.api.problems import ApiProblem
from ccat_dagster.api.routers.common import RowId, get_or_404, transaction
from ccat_dagster.opsdb import models as m
from ccat_dagster.pipelines.apply import (
    PipelineApplyError,
    apply_pipeline_spec,
    export_pipeline,
    list_pipelines,
    set_pipeline_enabled,
)
from ccat_dagster.pipelines.spec import PipelineSpecError, parse_pipeline_spec

router = APIRouter(prefix="/pipelines", tags=["pipelines"])
_ORIGIN = "body"

PipelineDocument = Annotated[
    dict[str, Any],
    Field(
        description="a pipeline in the pipeline-YAML format (docs/pipeline-yaml.md), as JSON",
        json_schema_extra={"example": {"pipeline": "my_pipeline", "processing_location": "cologne-hpc", "steps": []}},
    ),
]


class PipelineOut(BaseModel):
    id: int
    name: str
    description: str
    enabled: bool
    trigger_type: str
    trigger_config: dict[str, Any]
    processing_location: str
    processing_location_id: int
    data_grouping: str
    priority: int
    steps: list[str]
    spec_sha256: str
    updated_at: dt.datetime


class PipelineDetail(PipelineOut):
    definition: dict[str, Any] = Field(description="the stored pipeline as pipeline-YAML data (re-appliable)")


class ApplyOut(BaseModel):
    outcome: str = Field(description="created, updated or unchanged (with dry_run: what would happen)")
    dry_run: bool
    pipeline_id: RowId | None
    pipeline: str
    changes: list[str]


class TriggerIn(BaseModel):
    step: str = Field(min_length=1, max_length=64, description="the step to run")
    sub_groups: list[str] = Field(
        default_factory=list,
        max_length=10_000,
        description="sub_group_keys to run even when up to date; empty: the sub-groups with a gap",
    )


class TriggeredRun(BaseModel):
    dagster_run_id: str
    step: str
    sub_group_keys: list[str]


class TriggerOut(BaseModel):
    pipeline: str
    step: str
    runs: list[TriggeredRun]
    left_out: dict[str, int] = Field(description="sub-groups not run, by state (up_to_date, in_flight, …)")
    message: str


def _summary_out(session: Session, pipeline_id: int) -> PipelineOut:
    for summary in list_pipelines(session):
        if summary.id == pipeline_id:
            data = summary.to_json()
            return PipelineOut(**{**data, "updated_at": summary.updated_at})
    raise ApiProblem(404, f"no pipeline with id {pipeline_id}", errors=[("path.pipeline_id", "unknown pipeline id")])


def _spec_problems(error: PipelineSpecError | PipelineApplyError) -> ApiProblem:
    """Each problem line reads ``body: <path>: <message>``; the path is the bad field."""
    fields = []
    for problem in error.problems:
        parts = problem.split(": ", 2)
        field = f"body.{parts[1]}" if len(parts) == 3 and parts[0] == _ORIGIN else "body"
        fields.append((field, problem.removeprefix(f"{_ORIGIN}: ")))
    detail = fields[0][1] if len(fields) == 1 else f"{len(fields)} problems in the pipeline; see errors"
    return ApiProblem(422, detail, errors=fields)


class _DryRun(Exception):
    def __init__(self, out: ApplyOut) -> None:
        self.out = out


def _apply(
    request: Request, document: dict[str, Any], *, dry_run: bool, expect: str | None, must_exist: bool
) -> ApplyOut:
    try:
        spec = parse_pipeline_spec(document, origin=_ORIGIN)
    except PipelineSpecError as error:
        raise _spec_problems(error) from None
    try:
        with transaction(request) as session:
            existing = session.scalar(select(m.Pipeline.id).where(m.Pipeline.name == spec.name))
            if expect is not None and spec.name != expect:
                raise ApiProblem(
                    422,
                    f"the document names pipeline {spec.name!r}, the URL pipeline {expect!r}: "
                    "a pipeline cannot be renamed",
                    errors=[("body.pipeline", "differs from the pipeline in the URL")],
                )
            if not must_exist and existing is not None:
                raise ApiProblem(
                    409,
                    f"pipeline {spec.name!r} exists (id {existing}): update it with PUT /pipelines/{existing}",
                    errors=[("body.pipeline", "taken")],
                )
            try:
                result = apply_pipeline_spec(session, spec, source_path=_ORIGIN)
            except PipelineApplyError as error:
                raise _spec_problems(error) from None
            out = ApplyOut(
                outcome=result.outcome.value,
                dry_run=dry_run,
                pipeline_id=None if dry_run and existing is None else result.pipeline_id,
                pipeline=result.pipeline_name,
                changes=list(result.changes),
            )
            if dry_run:
                # Every check of the apply ran; leaving the transaction by an exception rolls all of it back.
                raise _DryRun(out)
    except _DryRun as done:
        out = done.out
    return out


@router.get("/", response_model=Page[PipelineOut], summary="the stored pipelines, newest first")
def get_pipelines(
    request: Request,
    caller: ReadCaller,
    page: Annotated[PageParams, Depends(page_params)],
    enabled: bool | None = None,
    trigger_type: Annotated[str | None, Query(pattern="^(continuous|cron|manual)$")] = None,
) -> dict[str, Any]:
    with transaction(request) as session:
        summaries = sorted(list_pipelines(session), key=lambda s: -s.id)
    if page.after_id is not None:
        summaries = [s for s in summaries if s.id < page.after_id]
    if enabled is not None:
        summaries = [s for s in summaries if s.enabled == enabled]
    if trigger_type is not None:
        summaries = [s for s in summaries if s.trigger_type == trigger_type]
    shown = summaries[: page.limit]
    return {
        "items": [{**s.to_json(), "updated_at": s.updated_at} for s in shown],
        "limit": page.limit,
        "next_cursor": str(shown[-1].id) if len(summaries) > page.limit else None,
    }


@router.post("/", response_model=ApplyOut, status_code=201, summary="create a pipeline with its steps")
def create_pipeline(
    request: Request,
    document: PipelineDocument,
    response: Response,
    caller: WriteCaller,
    dry_run: Annotated[bool, Query(description="check everything as apply would, write nothing")] = False,
) -> ApplyOut:
    out = _apply(request, document, dry_run=dry_run, expect=None, must_exist=False)
    if dry_run:
        response.status_code = 200
    return out


@router.get("/{pipeline_id:int}", response_model=PipelineDetail, summary="one pipeline with its steps")
def get_pipeline(request: Request, pipeline_id: RowId, caller: ReadCaller) -> PipelineDetail:
    with transaction(request) as session:
        summary = _summary_out(session, pipeline_id)
        definition = export_pipeline(session, summary.name)
    return PipelineDetail(**summary.model_dump(), definition=definition)


@router.put("/{pipeline_id:int}", response_model=ApplyOut, summary="replace a pipeline's definition (all-or-nothing)")
def update_pipeline(
    request: Request,
    pipeline_id: RowId,
    document: PipelineDocument,
    caller: WriteCaller,
    dry_run: Annotated[bool, Query(description="check everything as apply would, write nothing")] = False,
) -> ApplyOut:
    with transaction(request) as session:
        name = get_or_404(session, m.Pipeline, pipeline_id, "pipeline").name
    return _apply(request, document, dry_run=dry_run, expect=name, must_exist=True)


@router.delete("/{pipeline_id:int}", status_code=204, summary="delete a pipeline that never ran")
def delete_pipeline(request: Request, pipeline_id: RowId, caller: WriteCaller) -> Response:
    with transaction(request) as session:
        pipeline = get_or_404(session, m.Pipeline, pipeline_id, "pipeline")
        attempts = session.scalar(
            select(func.count())
            .select_from(m.ExecutedReductionStep)
            .join(m.ReductionStep, m.ReductionStep.id == m.ExecutedReductionStep.reduction_step_id)
            .where(m.ReductionStep.pipeline_id == pipeline.id)
        )
        if attempts:
            raise ApiProblem(
                409,
                f"pipeline {pipeline.name!r} has {attempts} attempt(s), which provenance refers to: disable it instead "
                f"(POST /pipelines/{pipeline.id}/disable)",
            )
        session.delete(pipeline)
    return Response(status_code=204)


def _toggle(request: Request, pipeline_id: int, enabled: bool) -> PipelineOut:
    with transaction(request) as session:
        pipeline = get_or_404(session, m.Pipeline, pipeline_id, "pipeline")
        set_pipeline_enabled(session, pipeline.name, enabled=enabled)
        return _summary_out(session, pipeline_id)


@router.post("/{pipeline_id:int}/enable", response_model=PipelineOut, summary="let sensors and schedules run it")
def enable(request: Request, pipeline_id: RowId, caller: WriteCaller) -> PipelineOut:
    return _toggle(request, pipeline_id, True)


@router.post("/{pipeline_id:int}/disable", response_model=PipelineOut, summary="stop sensors and schedules")
def disable(request: Request, pipeline_id: RowId, caller: WriteCaller) -> PipelineOut:
    return _toggle(request, pipeline_id, False)


@router.post(
    "/{pipeline_id:int}/trigger",
    response_model=TriggerOut,
    status_code=202,
    summary="launch the Dagster run(s) of a step now, as its sensor would",
)
def trigger(request: Request, pipeline_id: RowId, body: TriggerIn, caller: WriteCaller) -> TriggerOut:
    from ccat_dagster.launch import API_TRIGGER, launch_step, plan_step_launch

    with transaction(request) as session:
        name = get_or_404(session, m.Pipeline, pipeline_id, "pipeline").name
        plan = plan_step_launch(session, pipeline_name=name, step_name=body.step, sub_group_keys=body.sub_groups)
    runs = launch_step(
        plan,
        instance=dagster_instance(request),
        launcher=request.app.state.launcher,
        settings=request.app.state.settings,
        trigger=API_TRIGGER,
    )
    left = ", ".join(f"{n} {state}" for state, n in plan.left_out.items())
    message = (
        f"launched {len(runs)} run(s) for {len(plan.plans)} sub-group(s)"
        if runs
        else "nothing to run: no sub-group of this step has a gap (name sub_groups to re-run up-to-date ones)"
    ) + (f"; not run: {left}" if left else "")
    return TriggerOut(
        pipeline=name,
        step=body.step,
        runs=[
            TriggeredRun(dagster_run_id=r.run_id, step=r.step_name, sub_group_keys=list(r.sub_group_keys)) for r in runs
        ],
        left_out=plan.left_out,
        message=message,
    )


def dagster_instance(request: Request) -> Any:
    """The Dagster instance of this API process (DAGSTER_HOME), opened once."""
    if request.app.state.dagster_instance is None:
        import dagster as dg

        from ccat_dagster.launch import LaunchUnavailable

        try:
            request.app.state.dagster_instance = dg.DagsterInstance.get()
        except dg.DagsterError as error:  # DAGSTER_HOME unset, or no instance there
            raise LaunchUnavailable(
                f"the API cannot open the Dagster instance ({str(error).splitlines()[0]}): set DAGSTER_HOME for the "
                "API service to the directory of the instance's dagster.yaml"
            ) from None
    return request.app.state.dagster_instance
