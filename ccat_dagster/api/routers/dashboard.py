"""``/ux/pipeline-dashboard``: what ops-db-ui's pipeline dashboard shows, per pipeline, in three statements:
attempts by status over time windows with their CPU hours, current products and bytes, and the latest failures."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel
from sqlalchemy import case, func, select

from ccat_dagster.api.auth import ReadCaller
from ccat_dagster.api.routers.common import transaction
from ccat_dagster.opsdb import models as m
from ccat_dagster.opsdb.enums import RunStatus

router = APIRouter(prefix="/ux", tags=["dashboard"])
E, S, P = m.ExecutedReductionStep, m.ReductionStep, m.Pipeline
WINDOWS = {"24h": dt.timedelta(hours=24), "7d": dt.timedelta(days=7), "30d": dt.timedelta(days=30)}


class WindowOut(BaseModel):
    runs_by_status: dict[str, int]
    cpu_hours: float
    failures: int


class FailureOut(BaseModel):
    attempt_id: int
    step: str
    sub_group_key: str
    status: RunStatus
    failure_kind: str | None
    error: str | None
    finished_at: dt.datetime | None


class PipelineDashboard(BaseModel):
    id: int
    name: str
    enabled: bool
    trigger_type: str
    windows: dict[str, WindowOut]
    in_flight: int
    current_products: int
    current_product_bytes: int
    last_attempt_at: dt.datetime | None
    recent_failures: list[FailureOut]


class DashboardOut(BaseModel):
    generated_at: dt.datetime
    windows: list[str]
    pipelines: list[PipelineDashboard]


@router.get("/pipeline-dashboard", response_model=DashboardOut, summary="per-pipeline aggregates for the dashboard")
def pipeline_dashboard(
    request: Request,
    caller: ReadCaller,
    failures_per_pipeline: Annotated[int, Query(ge=0, le=50)] = 5,
) -> DashboardOut:
    now = m.utcnow()
    since = {name: now - span for name, span in WINDOWS.items()}
    oldest = min(since.values())
    with transaction(request) as session:
        pipelines = session.execute(select(P.id, P.name, P.enabled, P.trigger_type).order_by(P.name)).all()
        windows: dict[int, dict[str, WindowOut]] = {
            p.id: {w: WindowOut(runs_by_status={}, cpu_hours=0.0, failures=0) for w in WINDOWS} for p in pipelines
        }
        columns = []
        for name, start in since.items():
            recent = E.created_at >= start
            columns += [
                func.sum(case((recent, 1), else_=0)).label(f"n_{name}"),
                func.sum(case((recent, func.coalesce(E.cpu_hours, 0.0)), else_=0.0)).label(f"cpu_{name}"),
            ]
        rows = session.execute(
            select(S.pipeline_id, E.status, *columns)
            .select_from(E)
            .join(S, S.id == E.reduction_step_id)
            .where(E.created_at >= oldest)
            .group_by(S.pipeline_id, E.status)
        ).all()
        for row in rows:
            for name in WINDOWS:
                count = int(getattr(row, f"n_{name}") or 0)
                if not count:
                    continue
                window = windows[row.pipeline_id][name]
                window.runs_by_status[row.status.value] = count
                window.cpu_hours += float(getattr(row, f"cpu_{name}") or 0.0)
                if row.status in (RunStatus.FAILED, RunStatus.CANCELLED):
                    window.failures += count
        in_flight = dict(
            session.execute(
                select(S.pipeline_id, func.count())
                .select_from(E)
                .join(S, S.id == E.reduction_step_id)
                .where(E.status.not_in([s.value for s in RunStatus if s.is_terminal]))
                .group_by(S.pipeline_id)
            ).all()
        )
        last_attempt = dict(
            session.execute(
                select(S.pipeline_id, func.max(E.created_at))
                .join(S, S.id == E.reduction_step_id)
                .group_by(S.pipeline_id)
            ).all()
        )
        products = {
            pid: (count, size)
            for pid, count, size in session.execute(
                select(S.pipeline_id, func.count(), func.coalesce(func.sum(m.DataProduct.size_bytes), 0))
                .select_from(m.DataProduct)
                .join(S, S.id == m.DataProduct.reduction_step_id)
                .where(m.DataProduct.superseded_by_id.is_(None))
                .group_by(S.pipeline_id)
            ).all()
        }
        failures: dict[int, list[FailureOut]] = {p.id: [] for p in pipelines}
        if failures_per_pipeline:
            for pipeline in pipelines:
                for attempt, step in session.execute(
                    select(E, S.name)
                    .join(S, S.id == E.reduction_step_id)
                    .where(S.pipeline_id == pipeline.id, E.status == RunStatus.FAILED)
                    .order_by(E.id.desc())
                    .limit(failures_per_pipeline)
                ).all():
                    failures[pipeline.id].append(
                        FailureOut(
                            attempt_id=attempt.id,
                            step=step,
                            sub_group_key=attempt.sub_group_key,
                            status=attempt.status,
                            failure_kind=attempt.failure_kind.value if attempt.failure_kind else None,
                            error=(attempt.error or "").partition("\n")[0] or None,
                            finished_at=attempt.finished_at,
                        )
                    )
    out: list[PipelineDashboard] = []
    for p in pipelines:
        count, size = products.get(p.id, (0, 0))
        for window in windows[p.id].values():
            window.runs_by_status = dict(sorted(window.runs_by_status.items()))
            window.cpu_hours = round(window.cpu_hours, 6)
        out.append(
            PipelineDashboard(
                id=p.id,
                name=p.name,
                enabled=p.enabled,
                trigger_type=p.trigger_type.value,
                windows=windows[p.id],
                in_flight=int(in_flight.get(p.id, 0)),
                current_products=int(count),
                current_product_bytes=int(size),
                last_attempt_at=last_attempt.get(p.id),
                recent_failures=failures[p.id],
            )
        )
    return DashboardOut(generated_at=now, windows=list(WINDOWS), pipelines=out)
