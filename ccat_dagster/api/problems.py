"""Errors as RFC 9457 problem details (``application/problem+json``), each naming the bad field.

A body is ``{"type", "title", "status", "detail", "instance", "errors": [{"field", "message"}]}``; ``field`` is a
dotted path into the request (``body.filter_rules[0].operator``, ``query.limit``), or the name of the rule / key
the domain code rejected.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.exc import DataError, IntegrityError, OperationalError, StatementError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ccat_dagster.errors import CcatError

PROBLEM_MEDIA_TYPE = "application/problem+json"
log = logging.getLogger(__name__)


class FieldError(BaseModel):
    field: str
    message: str


class Problem(BaseModel):
    """An RFC 9457 problem details body."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    instance: str | None = None
    errors: list[FieldError] = []


class ApiProblem(Exception):
    """Raised by an endpoint: answered as a problem details body with this status."""

    def __init__(self, status: int, detail: str, *, errors: Sequence[tuple[str, str]] = (), title: str = "") -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.errors = [FieldError(field=f, message=msg) for f, msg in errors]
        self.title = title


_TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Content Too Large",
    422: "Unprocessable Content",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
}

# Responses every endpoint may give, for the OpenAPI document.
PROBLEM_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": Problem, "description": _TITLES[status], "content": {PROBLEM_MEDIA_TYPE: {}}}
    for status in (401, 403, 404, 409, 413, 422)
}


def problem_response(
    request: Request,
    status: int,
    detail: str,
    *,
    errors: Sequence[FieldError] = (),
    title: str = "",
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = Problem(
        title=title or _TITLES.get(status, "Error"),
        status=status,
        detail=detail,
        instance=request.url.path,
        errors=list(errors),
    )
    return JSONResponse(body.model_dump(), status_code=status, media_type=PROBLEM_MEDIA_TYPE, headers=headers)


def _loc(loc: Sequence[Any]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += ("." if text else "") + str(part)
    return text


def domain_problem(error: CcatError) -> ApiProblem:
    """The HTTP answer to a domain error: lookups 404, everything else the caller sent 422, with one field error
    per problem line the domain code reported (each names the rule, key or file path it is about)."""
    from ccat_dagster.grouping.presets import PresetError
    from ccat_dagster.launch import LaunchUnavailable
    from ccat_dagster.opsdb.lineage import LineageError
    from ccat_dagster.pipelines.apply import PipelineNotFoundError

    problems = list(getattr(error, "problems", ()) or [str(error)])
    if isinstance(error, LaunchUnavailable):
        return ApiProblem(503, str(error))
    if isinstance(error, LookupError) and isinstance(error, LineageError | PipelineNotFoundError | PresetError):
        return ApiProblem(404, str(error).splitlines()[0], errors=[(_field_of(p), p) for p in problems])
    first = problems[0] if len(problems) == 1 else f"{len(problems)} problems; see errors"
    return ApiProblem(422, first, errors=[(_field_of(p), p) for p in problems])


def _field_of(problem: str) -> str:
    """The rule or key a domain message starts with (``filter_rules[0] {...}: …`` → ``filter_rules[0]``)."""
    head = problem.split(":", 1)[0].strip()
    token = head.split(" ", 1)[0]
    return token or "body"


def install(app: FastAPI) -> None:
    """Answer every error of ``app`` as problem details."""

    @app.exception_handler(ApiProblem)
    async def _api_problem(request: Request, error: ApiProblem) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
        return problem_response(
            request, error.status, error.detail, errors=error.errors, title=error.title, headers=headers
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, error: RequestValidationError) -> JSONResponse:
        errors = [FieldError(field=_loc(e.get("loc", ())), message=str(e.get("msg", ""))) for e in error.errors()]
        detail = f"{errors[0].field}: {errors[0].message}" if len(errors) == 1 else f"{len(errors)} invalid fields"
        return problem_response(request, 422, detail, errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return problem_response(request, error.status_code, str(error.detail), headers=getattr(error, "headers", None))

    @app.exception_handler(CcatError)
    async def _domain(request: Request, error: CcatError) -> JSONResponse:
        problem = domain_problem(error)
        return problem_response(request, problem.status, problem.detail, errors=problem.errors)

    @app.exception_handler(IntegrityError)
    async def _integrity(request: Request, error: IntegrityError) -> JSONResponse:
        # The constraint, not the statement and its values: those may echo what the client sent at length.
        detail = str(getattr(error, "orig", error)).strip().splitlines()[0][:300]
        return problem_response(request, 409, f"ops-db refused the change: {detail}")

    @app.exception_handler(DataError)
    async def _data(request: Request, error: DataError) -> JSONResponse:
        detail = str(getattr(error, "orig", error)).strip().splitlines()[0][:300]
        return problem_response(request, 422, f"ops-db cannot store a value of the request: {detail}")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        if isinstance(error, StatementError) and isinstance(error.orig, ValueError | OverflowError):
            # The driver refused a parameter before sending it (a NUL character, an integer out of range).
            return problem_response(request, 422, f"ops-db cannot store a value of the request: {error.orig}")
        log.exception("unexpected error in %s %s", request.method, request.url.path)
        return problem_response(request, 500, "the API failed unexpectedly; the server log has the details")

    @app.exception_handler(OperationalError)
    async def _unavailable(request: Request, error: OperationalError) -> JSONResponse:
        log.warning("ops-db unavailable: %s", str(getattr(error, "orig", error)).splitlines()[0])
        return problem_response(request, 503, "ops-db is unavailable; retry later")
