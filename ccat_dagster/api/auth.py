"""Bearer tokens with a read or a write scope, stored hashed in ops-db (``api_token``).

A token is ``ccat_`` + 32 random bytes (URL-safe base64). ops-db keeps only its sha256: with that much entropy a
plain hash cannot be guessed or reversed, and a deliberately slow password hash would only slow every request.
The secret is shown once, by ``ccat-dagster api tokens create``; nothing returns it again.

``write`` includes ``read``. Every write endpoint depends on ``require_write``, every read on ``require_read``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from ccat_dagster.api.problems import ApiProblem
from ccat_dagster.errors import CcatError
from ccat_dagster.opsdb.engine import session_scope
from ccat_dagster.opsdb.models import ApiToken, utcnow

SCOPES = ("read", "write")
TOKEN_PREFIX = "ccat_"
_SHOWN_PREFIX = 12
# last_used_at is written at most this often per token, so reads do not each cost a write.
_TOUCH_INTERVAL = dt.timedelta(minutes=5)


class TokenError(CcatError, ValueError):
    """A token name, scope or id that ``api tokens`` cannot use."""


@dataclass(frozen=True)
class TokenInfo:
    """A token as listed: everything but the secret (which ops-db does not have)."""

    id: int
    name: str
    scope: str
    prefix: str
    created_at: dt.datetime
    last_used_at: dt.datetime | None
    revoked_at: dt.datetime | None


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(session: Session, *, name: str, scope: str) -> tuple[TokenInfo, str]:
    """A new token; returns its record and the secret (the only time it exists outside the client)."""
    name = name.strip()
    if not name or len(name) > 128:
        raise TokenError(f"token name {name!r} is invalid: give 1 to 128 characters, e.g. ops-db-ui")
    if scope not in SCOPES:
        raise TokenError(f"token scope {scope!r} is invalid: give read or write")
    if session.scalar(select(ApiToken.id).where(ApiToken.name == name)) is not None:
        raise TokenError(f"a token named {name!r} exists already: revoke it first or choose another name")
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = ApiToken(name=name, scope=scope, token_sha256=hash_token(secret), prefix=secret[:_SHOWN_PREFIX])
    session.add(row)
    session.flush()
    return _info(row), secret


def list_tokens(session: Session) -> list[TokenInfo]:
    return [_info(row) for row in session.scalars(select(ApiToken).order_by(ApiToken.id))]


def revoke_token(session: Session, ref: str) -> TokenInfo:
    """Revoke the token with this id or name (idempotent: revoking twice keeps the first time)."""
    query = select(ApiToken)
    query = query.where(ApiToken.id == int(ref)) if ref.isdigit() else query.where(ApiToken.name == ref)
    row = session.scalars(query).one_or_none()
    if row is None:
        raise TokenError(f"no API token {ref!r}: `ccat-dagster api tokens list` shows the ids and names")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        session.flush()
    return _info(row)


def _info(row: ApiToken) -> TokenInfo:
    return TokenInfo(row.id, row.name, row.scope, row.prefix, row.created_at, row.last_used_at, row.revoked_at)


# --------------------------------------------------------------------------------------------- FastAPI side

_bearer = HTTPBearer(auto_error=False, description="an API token from `ccat-dagster api tokens create`")


@dataclass(frozen=True)
class Caller:
    token_id: int
    name: str
    scope: str


def _authenticate(request: Request, credentials: HTTPAuthorizationCredentials | None) -> Caller:
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise ApiProblem(401, "no bearer token: send 'Authorization: Bearer <token>' (ccat-dagster api tokens create)")
    digest = hash_token(credentials.credentials)
    engine = request.app.state.engine
    with session_scope(engine) as session:
        row = session.scalars(select(ApiToken).where(ApiToken.token_sha256 == digest)).one_or_none()
        # The lookup is by hash; compare again in constant time so timing says nothing about near misses.
        if row is None or not hmac.compare_digest(row.token_sha256, digest):
            raise ApiProblem(401, "the bearer token is not known: create one with `ccat-dagster api tokens create`")
        if row.revoked_at is not None:
            raise ApiProblem(401, f"the bearer token {row.prefix}… was revoked; create a new one")
        now = utcnow()
        if row.last_used_at is None or now - row.last_used_at > _TOUCH_INTERVAL:
            session.execute(update(ApiToken).where(ApiToken.id == row.id).values(last_used_at=now))
        return Caller(row.id, row.name, row.scope)


def require_read(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Caller:
    return _authenticate(request, credentials)


def require_write(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Caller:
    caller = _authenticate(request, credentials)
    if caller.scope != "write":
        raise ApiProblem(403, f"token {caller.name!r} has the read scope; this request needs a write token")
    return caller


ReadCaller = Annotated[Caller, Depends(require_read)]
WriteCaller = Annotated[Caller, Depends(require_write)]
