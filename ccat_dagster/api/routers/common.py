"""What the routers share: the ops-db transaction of a request, lookups that answer 404, and the filtered page of
the lists whose rows belong to a step (products, attempts)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any, TypeVar

from fastapi import Path, Request
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ccat_dagster.api.pagination import PageParams, keyset, page_of
from ccat_dagster.api.problems import ApiProblem
from ccat_dagster.opsdb import models as m
from ccat_dagster.opsdb.engine import session_scope

T = TypeVar("T")
# ops-db ids are 32-bit integers on PostgreSQL: a larger one cannot name a row, so it is refused as invalid.
MAX_ID = 2_147_483_647
RowId = Annotated[int, Path(ge=1, le=MAX_ID, description="ops-db id")]


@contextmanager
def transaction(request: Request) -> Iterator[Session]:
    """One ops-db transaction, committed before the endpoint returns (so a client that reads right after its
    write sees it) and rolled back on any error."""
    with session_scope(request.app.state.engine) as session:
        yield session


def get_or_404(session: Session, model: type[T], row_id: Any, what: str) -> T:
    row = session.get(model, row_id)
    if row is None:
        raise ApiProblem(404, f"no {what} with id {row_id}", errors=[("path.id", f"unknown {what} id")])
    return row


def count_of(session: Session, column: Any, value: Any) -> int:
    """How many rows of ``column``'s table have ``column == value`` (the rows that still refer to a row a
    delete would remove)."""
    return session.scalar(select(func.count()).where(column == value)) or 0


def step_ids_of(session: Session, pipeline: str | None, step: str | None) -> list[int] | None:
    """The ids of the steps a pipeline / step name filter selects; None when there is no such filter."""
    if pipeline is None and step is None:
        return None
    query = select(m.ReductionStep.id).join(m.Pipeline, m.Pipeline.id == m.ReductionStep.pipeline_id)
    if pipeline is not None:
        query = query.where(m.Pipeline.name == pipeline)
    if step is not None:
        query = query.where(m.ReductionStep.name == step)
    return list(session.scalars(query))


def as_utc(value: dt.datetime) -> dt.datetime:
    """A query time as aware UTC (a naive time is taken as UTC)."""
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def step_rows_page(
    session: Session,
    model: Any,
    page: PageParams,
    *,
    pipeline: str | None,
    step: str | None,
    sub_group: str | None,
    created_after: dt.datetime | None,
    created_before: dt.datetime | None,
    where: Iterable[Any] = (),
    convert: Callable[[Any, str, str], Any],
) -> dict[str, Any]:
    """A page of ``model`` rows (a table with ``reduction_step_id``, ``sub_group_key`` and ``created_at``), newest
    first, with the filters every list of step rows has; ``where`` adds the list's own conditions. Each item is
    ``convert(row, pipeline name, step name)``."""
    step_ids = step_ids_of(session, pipeline, step)
    if step_ids == []:
        return {"items": [], "limit": page.limit, "next_cursor": None}
    query = (
        select(model, m.Pipeline.name, m.ReductionStep.name)
        .join(m.ReductionStep, m.ReductionStep.id == model.reduction_step_id)
        .join(m.Pipeline, m.Pipeline.id == m.ReductionStep.pipeline_id)
    )
    if step_ids is not None:
        query = query.where(model.reduction_step_id.in_(step_ids))
    if sub_group is not None:
        query = query.where(model.sub_group_key == sub_group)
    for condition in where:
        query = query.where(condition)
    if created_after is not None:
        query = query.where(model.created_at >= as_utc(created_after))
    if created_before is not None:
        query = query.where(model.created_at < as_utc(created_before))
    rows = session.execute(keyset(query, model.id, page)).all()
    return page_of(rows, page, item_id=lambda r: r[0].id, convert=lambda r: convert(*r))
