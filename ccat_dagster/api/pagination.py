"""Keyset pagination: newest first by id, ``limit`` items per page, ``cursor`` = the last id of the previous page.

A page never counts the whole result (a COUNT over 100,000 attempts costs more than the page): ``next_cursor`` is
set while more items may follow. Each list query orders by id descending and reads ``limit + 1`` rows through an
index that starts with its filter column.
"""

from __future__ import annotations

from typing import Annotated, Any, Generic, TypeVar

from fastapi import Query
from pydantic import BaseModel
from sqlalchemy import Select

from ccat_dagster.api.problems import ApiProblem

DEFAULT_LIMIT = 50
MAX_LIMIT = 500
T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    items: list[T]
    limit: int
    next_cursor: str | None = None


class PageParams(BaseModel):
    limit: int
    after_id: int | None


def page_params(
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT, description="items per page")] = DEFAULT_LIMIT,
    cursor: Annotated[
        str | None, Query(max_length=20, description="next_cursor of the previous page; omit for the first page")
    ] = None,
) -> PageParams:
    after_id = None
    if cursor is not None:
        if not cursor.isdigit() or int(cursor) > 2**63 - 1:
            raise ApiProblem(
                422,
                f"cursor {cursor!r} is invalid: pass next_cursor of the previous page",
                errors=[("query.cursor", "not a page cursor")],
            )
        after_id = int(cursor)
    return PageParams(limit=limit, after_id=after_id)


def keyset(query: Select[Any], id_column: Any, params: PageParams) -> Select[Any]:
    if params.after_id is not None:
        query = query.where(id_column < params.after_id)
    return query.order_by(id_column.desc()).limit(params.limit + 1)


def page_of(rows: list[Any], params: PageParams, *, item_id: Any, convert: Any) -> dict[str, Any]:
    more = len(rows) > params.limit
    rows = rows[: params.limit]
    return {
        "items": [convert(row) for row in rows],
        "limit": params.limit,
        "next_cursor": str(item_id(rows[-1])) if more and rows else None,
    }
