"""``ccat-dagster api [--host H] [--port P]`` serves the REST API; ``ccat-dagster api tokens create|list|revoke``
manages its bearer tokens."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ccat_dagster.settings import Settings


def register(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    api = commands.add_parser(
        "api",
        help="serve the pipeline REST API (uvicorn); manage its tokens",
        description="Serve the REST API on HOST:PORT (OpenAPI document at /openapi.json, docs at /docs). "
        "Every request needs a token from `ccat-dagster api tokens create`.",
    )
    api.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    api.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    api.add_argument("--workers", type=int, default=1, help="uvicorn worker processes (default 1)")
    api.set_defaults(handler=_serve)
    sub = api.add_subparsers(dest="api_command", metavar="COMMAND")
    tokens = sub.add_parser("tokens", help="bearer tokens: create, list, revoke").add_subparsers(
        dest="tokens_command", required=True, metavar="COMMAND"
    )
    create = tokens.add_parser("create", help="create a token and print its secret (shown only this once)")
    create.add_argument("name", help="who uses it, e.g. ops-db-ui")
    create.add_argument("--scope", choices=("read", "write"), default="read", help="read (default) or write")
    create.set_defaults(handler=_create)
    list_cmd = tokens.add_parser("list", help="the tokens (never their secrets)")
    list_cmd.add_argument("--json", action="store_true")
    list_cmd.set_defaults(handler=_list)
    revoke = tokens.add_parser("revoke", help="revoke a token by id or name")
    revoke.add_argument("token", metavar="ID|NAME")
    revoke.set_defaults(handler=_revoke)


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from ccat_dagster.api.app import create_app
    from ccat_dagster.errors import CcatError

    if not 0 < args.port < 65536:
        raise CcatError(f"--port {args.port} is invalid: give 1 to 65535")
    if args.workers > 1:
        # Each worker process builds its own app (and engine) from the environment.
        uvicorn.run(
            "ccat_dagster.api.app:app_from_environment",
            factory=True,
            host=args.host,
            port=args.port,
            workers=args.workers,
        )
    else:
        uvicorn.run(create_app(settings), host=args.host, port=args.port)
    return 0


def _create(args: argparse.Namespace, settings: Settings) -> int:
    from ccat_dagster.api.auth import create_token
    from ccat_dagster.opsdb.engine import make_engine, session_scope

    engine = make_engine(settings.ops_db_url)
    try:
        with session_scope(engine) as session:
            info, secret = create_token(session, name=args.name, scope=args.scope)
    finally:
        engine.dispose()
    print(f"token {info.id} {info.name!r} ({info.scope}); the secret is shown only now:")
    print(secret)
    return 0


def _list(args: argparse.Namespace, settings: Settings) -> int:
    from ccat_dagster.api.auth import list_tokens
    from ccat_dagster.opsdb.engine import make_engine, session_scope

    engine = make_engine(settings.ops_db_url)
    try:
        with session_scope(engine) as session:
            tokens = list_tokens(session)
    finally:
        engine.dispose()
    if args.json:
        rows = [
            {
                "id": t.id,
                "name": t.name,
                "scope": t.scope,
                "prefix": t.prefix,
                "created_at": t.created_at.isoformat(),
                "last_used_at": t.last_used_at.isoformat() if t.last_used_at else None,
                "revoked_at": t.revoked_at.isoformat() if t.revoked_at else None,
            }
            for t in tokens
        ]
        print(json.dumps(rows, indent=2))
        return 0
    if not tokens:
        print("no API tokens (create one with `ccat-dagster api tokens create NAME --scope read|write`)")
    for t in tokens:
        state = f"revoked {t.revoked_at:%Y-%m-%d %H:%M}" if t.revoked_at else "active"
        used = f"last used {t.last_used_at:%Y-%m-%d %H:%M}" if t.last_used_at else "never used"
        print(f"{t.id:>4}  {t.name:<24} {t.scope:<5}  {t.prefix}…  {state}, {used}")
    return 0


def _revoke(args: argparse.Namespace, settings: Settings) -> int:
    from ccat_dagster.api.auth import revoke_token
    from ccat_dagster.opsdb.engine import make_engine, session_scope

    engine = make_engine(settings.ops_db_url)
    try:
        with session_scope(engine) as session:
            info = revoke_token(session, args.token)
    finally:
        engine.dispose()
    print(f"token {info.id} {info.name!r} revoked at {info.revoked_at:%Y-%m-%d %H:%M:%S} UTC")
    return 0
