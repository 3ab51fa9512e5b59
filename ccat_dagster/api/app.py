"""The ASGI application: ``create_app(settings)``; ``ccat-dagster api`` serves it with uvicorn.

Endpoints follow the CCAT layout (docs/api.md): ``/pipelines/software/``, ``/pipelines/configs/``,
``/pipelines/groupings/``, ``/pipelines/runs/``, ``/pipelines/``, ``/data-products/``, ``/ux/pipeline-dashboard``.
The OpenAPI document is at ``/openapi.json`` (Swagger UI at ``/docs``).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from sqlalchemy import Engine
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ccat_dagster.api import problems
from ccat_dagster.opsdb.engine import make_engine
from ccat_dagster.settings import Settings


class BodySizeLimit:
    """Refuse request bodies larger than ``max_bytes`` with 413, before the endpoint reads them: by
    Content-Length when it is sent, else while the body streams in."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._refuse(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _TooLarge
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _TooLarge:
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        from starlette.requests import Request

        response = problems.problem_response(
            Request(scope, receive),
            413,
            f"the request body is larger than {self.max_bytes} bytes "
            "(CCAT_WORKFLOW_MANAGER_API_MAX_BODY_BYTES); send less per request",
        )
        await response(scope, receive, send)


class _TooLarge(Exception):
    pass


def create_app(
    settings: Settings, *, engine: Engine | None = None, launcher: Any = None, dagster_instance: Any = None
) -> FastAPI:
    """The API over the ops-db of ``settings``. ``launcher`` (a ``launch.RunLauncher``) starts and terminates
    Dagster runs; by default the Dagster webserver's GraphQL at ``settings.dagster_webserver_url``.
    ``dagster_instance`` receives the partitions a triggered run needs; by default ``DagsterInstance.get()``
    (DAGSTER_HOME), opened on the first trigger."""
    from ccat_dagster.api.routers import configs, dashboard, groupings, pipelines, products, runs, software

    app = FastAPI(
        title="ccat-dagster pipeline API",
        version="1",
        description="Pipelines, groupings, software, runs, data products and lineage of the CCAT workflow manager. "
        "Every request needs a bearer token (`ccat-dagster api tokens create`); writes need the write scope. "
        "Errors are RFC 9457 problem details.",
        responses=problems.PROBLEM_RESPONSES,
    )
    app.state.settings = settings
    app.state.engine = engine if engine is not None else make_engine(settings.ops_db_url)
    app.state.dagster_instance = dagster_instance
    if launcher is None:
        from ccat_dagster.launch import GraphQLRunLauncher

        launcher = GraphQLRunLauncher(settings.dagster_webserver_url)
    app.state.launcher = launcher
    problems.install(app)
    # Fixed paths under /pipelines/ first: /pipelines/{id} only matches digits, but keep the order obvious.
    for module in (software, configs, groupings, runs, pipelines, products, dashboard):
        app.include_router(module.router)
    app.add_middleware(BodySizeLimit, max_bytes=settings.api_max_body_bytes)
    return app


def app_from_environment() -> FastAPI:
    """The app for ``uvicorn --factory ccat_dagster.api.app:app_from_environment`` (settings from the environment)."""
    return create_app(Settings.from_env())
