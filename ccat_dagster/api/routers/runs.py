"""``/pipelines/runs/``: attempts (ExecutedReductionStep) with filters, detail, logs, cancel and retry.

Cancel terminates the attempt's Dagster run (its step runner then cancels the HPC job and marks the attempts
CANCELLED); retry launches a new run of the attempt's step and sub-group, as ``ccat-dagster pipelines run
--sub-group`` does.
"""

from __future__ import annotations

import datetime as dt
import os
import stat
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session

from ccat_dagster.api.auth import ReadCaller, WriteCaller
from ccat_dagster.api.pagination import Page, PageParams, page_params
from ccat_dagster.api.problems import ApiProblem
from ccat_dagster.api.routers.common import RowId, count_of, get_or_404, step_rows_page, transaction
from ccat_dagster.opsdb import models as m
from ccat_dagster.opsdb.enums import RunStatus

router = APIRouter(prefix="/pipelines/runs", tags=["runs"])
E = m.ExecutedReductionStep
LOG_TAIL_BYTES = 65_536


class AttemptOut(BaseModel):
    id: int
    pipeline: str
    step: str
    sub_group_key: str
    attempt: int
    status: RunStatus
    failure_kind: str | None
    dagster_run_id: str | None
    hpc_backend: str | None
    hpc_job_id: str | None
    exit_code: int | None
    wall_time_seconds: float | None
    cpu_hours: float | None
    peak_memory_gb: float | None
    error: str | None = Field(description="the first line of the error")
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None


class TransitionOut(BaseModel):
    from_status: RunStatus | None
    to_status: RunStatus
    at: dt.datetime
    message: str | None


class AttemptDetail(AttemptOut):
    error_full: str | None
    input_fingerprint: str
    software_version_id: int
    config_id: int
    image_digest: str | None
    input_package_count: int
    input_product_ids: list[int]
    product_ids: list[int]
    transitions: list[TransitionOut]


class LogFile(BaseModel):
    name: str
    size_bytes: int
    truncated: bool
    text: str


class LogsOut(BaseModel):
    attempt_id: RowId
    logs_dir: str | None
    files: list[LogFile]


class RunActionOut(BaseModel):
    attempt_id: RowId
    dagster_run_id: str
    message: str


def _row(attempt: m.ExecutedReductionStep, pipeline: str, step: str) -> dict[str, Any]:
    return {
        "id": attempt.id,
        "pipeline": pipeline,
        "step": step,
        "sub_group_key": attempt.sub_group_key,
        "attempt": attempt.attempt,
        "status": attempt.status,
        "failure_kind": attempt.failure_kind.value if attempt.failure_kind else None,
        "dagster_run_id": attempt.dagster_run_id,
        "hpc_backend": attempt.hpc_backend,
        "hpc_job_id": attempt.hpc_job_id,
        "exit_code": attempt.exit_code,
        "wall_time_seconds": attempt.wall_time_seconds,
        "cpu_hours": attempt.cpu_hours,
        "peak_memory_gb": attempt.peak_memory_gb,
        "error": (attempt.error or "").partition("\n")[0] or None,
        "created_at": attempt.created_at,
        "started_at": attempt.started_at,
        "finished_at": attempt.finished_at,
    }


@router.get("/", response_model=Page[AttemptOut], summary="attempts, newest first, with filters")
def list_attempts(
    request: Request,
    caller: ReadCaller,
    page: Annotated[PageParams, Depends(page_params)],
    pipeline: Annotated[str | None, Query(max_length=128, description="pipeline name")] = None,
    step: Annotated[str | None, Query(max_length=64, description="step name")] = None,
    status: Annotated[list[RunStatus] | None, Query(description="one or more statuses")] = None,
    sub_group: Annotated[str | None, Query(max_length=512, description="sub_group_key")] = None,
    created_after: Annotated[dt.datetime | None, Query(description="ISO 8601; naive times are UTC")] = None,
    created_before: Annotated[dt.datetime | None, Query(description="ISO 8601; naive times are UTC")] = None,
) -> dict[str, Any]:
    with transaction(request) as session:
        return step_rows_page(
            session,
            E,
            page,
            pipeline=pipeline,
            step=step,
            sub_group=sub_group,
            created_after=created_after,
            created_before=created_before,
            where=[E.status.in_(status)] if status else [],
            convert=_row,
        )


def _attempt(session: Session, attempt_id: RowId) -> tuple[m.ExecutedReductionStep, str, str]:
    attempt = get_or_404(session, E, attempt_id, "attempt")
    return attempt, attempt.step.pipeline.name, attempt.step.name


@router.get("/{attempt_id}", response_model=AttemptDetail, summary="one attempt with its transitions")
def get_attempt(request: Request, attempt_id: RowId, caller: ReadCaller) -> AttemptDetail:
    with transaction(request) as session:
        attempt, pipeline, step = _attempt(session, attempt_id)
        package_count = count_of(session, m.run_input_package.c.executed_reduction_step_id, attempt.id)
        return AttemptDetail(
            **_row(attempt, pipeline, step),
            error_full=attempt.error,
            input_fingerprint=attempt.input_fingerprint,
            software_version_id=attempt.reduction_software_version_id,
            config_id=attempt.reduction_step_config_id,
            image_digest=attempt.image_digest,
            input_package_count=package_count,
            input_product_ids=sorted(p.id for p in attempt.input_products),
            product_ids=sorted(p.id for p in attempt.products),
            transitions=[
                TransitionOut(from_status=t.from_status, to_status=t.to_status, at=t.at, message=t.message)
                for t in attempt.transitions
            ],
        )


@router.get("/{attempt_id}/logs", response_model=LogsOut, summary="the container and job logs of an attempt")
def get_logs(
    request: Request,
    attempt_id: RowId,
    caller: ReadCaller,
    tail_bytes: Annotated[
        int, Query(ge=1, le=1_048_576, description="bytes from the end of each file")
    ] = LOG_TAIL_BYTES,
) -> LogsOut:
    with transaction(request) as session:
        attempt = get_or_404(session, E, attempt_id, "attempt")
        attempt_dir = attempt.attempt_dir
    if not attempt_dir:
        return LogsOut(attempt_id=attempt_id, logs_dir=None, files=[])
    logs_dir = Path(attempt_dir) / "logs"
    return LogsOut(attempt_id=attempt_id, logs_dir=str(logs_dir), files=_read_logs(logs_dir, tail_bytes))


def _read_logs(logs_dir: Path, tail_bytes: int) -> list[LogFile]:
    """The regular files directly in ``logs_dir`` (symlinks and special files are skipped: a container wrote
    this directory), each as its last ``tail_bytes`` bytes."""
    try:
        entries = sorted(os.scandir(logs_dir), key=lambda e: e.name)
    except OSError:
        return []
    files = []
    for entry in entries:
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if not stat.S_ISREG(info.st_mode):
            continue
        with open(entry.path, "rb") as handle:
            if info.st_size > tail_bytes:
                handle.seek(info.st_size - tail_bytes)
            data = handle.read(tail_bytes)
        files.append(
            LogFile(
                name=entry.name,
                size_bytes=info.st_size,
                truncated=info.st_size > tail_bytes,
                text=data.decode("utf-8", errors="replace"),
            )
        )
    return files


@router.post("/{attempt_id}/cancel", response_model=RunActionOut, status_code=202, summary="terminate its Dagster run")
def cancel_attempt(request: Request, attempt_id: RowId, caller: WriteCaller) -> RunActionOut:
    with transaction(request) as session:
        attempt = get_or_404(session, E, attempt_id, "attempt")
        status, run_id = attempt.status, attempt.dagster_run_id
    if status.is_terminal:
        raise ApiProblem(409, f"attempt {attempt_id} is {status.value} already; there is nothing to cancel")
    if not run_id:
        raise ApiProblem(409, f"attempt {attempt_id} has no Dagster run to terminate")
    request.app.state.launcher.terminate(run_id)
    return RunActionOut(
        attempt_id=attempt_id,
        dagster_run_id=run_id,
        message=f"termination of Dagster run {run_id} requested; its HPC jobs are cancelled and its attempts "
        "end CANCELLED",
    )


@router.post("/{attempt_id}/retry", response_model=RunActionOut, status_code=202, summary="run its sub-group again")
def retry_attempt(request: Request, attempt_id: RowId, caller: WriteCaller) -> RunActionOut:
    from ccat_dagster.api.routers.pipelines import dagster_instance
    from ccat_dagster.launch import API_TRIGGER, launch_step, plan_step_launch

    with transaction(request) as session:
        attempt, pipeline, step = _attempt(session, attempt_id)
        if attempt.status not in (RunStatus.FAILED, RunStatus.CANCELLED):
            raise ApiProblem(
                409, f"attempt {attempt_id} is {attempt.status.value}: only failed or cancelled attempts are retried"
            )
        plan = plan_step_launch(session, pipeline_name=pipeline, step_name=step, sub_group_keys=[attempt.sub_group_key])
    (run,) = launch_step(
        plan,
        instance=dagster_instance(request),
        launcher=request.app.state.launcher,
        settings=request.app.state.settings,
        trigger=API_TRIGGER,
    )
    return RunActionOut(
        attempt_id=attempt_id,
        dagster_run_id=run.run_id,
        message=f"launched Dagster run {run.run_id} for {pipeline}/{step} [{attempt.sub_group_key}]",
    )
