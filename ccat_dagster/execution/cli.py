"""``ccat-dagster attempts PIPELINE``: the attempts of a pipeline's steps, newest first, with why they failed.

One line per attempt: id, step, sub-group, attempt number, status, failure kind, backend and job id, exit code,
when it finished, and the first line of its error. ``--json`` prints the same as a list of objects.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from sqlalchemy import select

from ccat_dagster.errors import CcatError
from ccat_dagster.opsdb import models as m
from ccat_dagster.opsdb.engine import make_engine, session_scope
from ccat_dagster.settings import Settings


def register(commands: argparse._SubParsersAction) -> None:
    """Add the ``attempts`` command to the ``ccat-dagster`` parser."""
    parser = commands.add_parser(
        "attempts",
        help="list a pipeline's attempts (status, failure kind, job id, error), newest first",
        description=__doc__,
    )
    parser.add_argument("pipeline", help="pipeline name")
    parser.add_argument("--step", help="only this step")
    parser.add_argument("--sub-group", dest="sub_group", help="only this sub_group_key")
    parser.add_argument("--failed", action="store_true", help="only failed and cancelled attempts")
    parser.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(handler=_list_attempts)


def attempt_rows(
    session, *, pipeline: str, step: str | None, sub_group: str | None, failed: bool, limit: int
) -> list[dict[str, Any]]:
    if limit < 1:
        raise CcatError(f"--limit {limit} is invalid: give at least 1")
    E = m.ExecutedReductionStep
    if session.scalar(select(m.Pipeline.id).where(m.Pipeline.name == pipeline)) is None:
        raise CcatError(f"pipeline {pipeline!r} is not in ops-db; `ccat-dagster pipelines list` shows the known ones")
    query = (
        select(E, m.ReductionStep.name)
        .join(m.ReductionStep, m.ReductionStep.id == E.reduction_step_id)
        .join(m.Pipeline, m.Pipeline.id == m.ReductionStep.pipeline_id)
        .where(m.Pipeline.name == pipeline)
        .order_by(E.id.desc())
        .limit(limit)
    )
    if step:
        query = query.where(m.ReductionStep.name == step)
    if sub_group:
        query = query.where(E.sub_group_key == sub_group)
    if failed:
        query = query.where(E.status.in_(["failed", "cancelled"]))
    return [
        {
            "id": attempt.id,
            "step": step_name,
            "sub_group_key": attempt.sub_group_key,
            "attempt": attempt.attempt,
            "status": attempt.status.value,
            "failure_kind": attempt.failure_kind.value if attempt.failure_kind else None,
            "hpc_backend": attempt.hpc_backend,
            "hpc_job_id": attempt.hpc_job_id,
            "exit_code": attempt.exit_code,
            "finished_at": attempt.finished_at.isoformat() if attempt.finished_at else None,
            "error": (attempt.error or "").partition("\n")[0] or None,
        }
        for attempt, step_name in session.execute(query)
    ]


def _list_attempts(args: argparse.Namespace, settings: Settings) -> int:
    engine = make_engine(settings.ops_db_url)
    try:
        with session_scope(engine) as session:
            rows = attempt_rows(
                session,
                pipeline=args.pipeline,
                step=args.step,
                sub_group=args.sub_group,
                failed=args.failed,
                limit=args.limit,
            )
    finally:
        engine.dispose()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        kind = f" ({row['failure_kind']})" if row["failure_kind"] else ""
        job = f" {row['hpc_backend']} job {row['hpc_job_id']}" if row["hpc_job_id"] else ""
        code = f" exit {row['exit_code']}" if row["exit_code"] is not None else ""
        error = f": {row['error']}" if row["error"] else ""
        print(
            f"#{row['id']} {row['step']}[{row['sub_group_key']}] attempt {row['attempt']}: "
            f"{row['status']}{kind}{job}{code}{error}"
        )
    if not rows:
        print(f"no attempts of {args.pipeline}" + (f"/{args.step}" if args.step else ""))
    return 0
