"""Authentication: ``Authorization: Bearer <api key>`` -> tenant id; admin token for /v1/admin.

Keys are verified by ``clickhouse.repo.Repo.authenticate`` (only ``sha256(key)`` is stored).
Results are cached in-process for a short time so that ingest does not pay a ClickHouse round
trip per request: valid keys for ``POSITIVE_TTL_S``, unknown keys for ``NEGATIVE_TTL_S`` (a key
created on another replica is usable here after at most that long).
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import Depends, Request

from api.state import AppState, get_state
from tally import log as tally_log
from tally.errors import AuthenticationError

POSITIVE_TTL_S = 60.0
NEGATIVE_TTL_S = 2.0
MAX_ENTRIES = 10_000
MAX_TOKEN_LEN = 512


class AuthCache:
    """A small TTL cache: token -> value (None = known invalid)."""

    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self._data: dict[str, tuple[float, Any]] = {}
        self._max = max_entries

    def get(self, token: str) -> tuple[bool, Any]:
        hit = self._data.get(token)
        if hit is None:
            return False, None
        expires, value = hit
        if expires < time.monotonic():
            self._data.pop(token, None)
            return False, None
        return True, value

    def put(self, token: str, value: Any) -> None:
        if len(self._data) >= self._max:
            self._data.clear()
        ttl = POSITIVE_TTL_S if value else NEGATIVE_TTL_S
        self._data[token] = (time.monotonic() + ttl, value)

    def clear(self) -> None:
        self._data.clear()


def bearer_token(request: Request) -> str:
    """The token of ``Authorization: Bearer <token>``; 401 naming what is wrong."""
    header = request.headers.get("authorization")
    if header is None:
        raise AuthenticationError(
            "missing Authorization header; send 'Authorization: Bearer <api key>'",
            details=[{"field": "authorization", "message": "missing"}],
        )
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationError(
            "malformed Authorization header; expected 'Bearer <api key>'",
            details=[{"field": "authorization", "message": "expected the Bearer scheme"}],
        )
    if len(token) > MAX_TOKEN_LEN:
        raise AuthenticationError(
            "invalid API key", details=[{"field": "authorization", "message": "token too long"}]
        )
    return token


async def current_tenant(request: Request, st: AppState = Depends(get_state)) -> str:
    """FastAPI dependency: the tenant id of the request's API key."""
    return await tenant_of_api_key(st, bearer_token(request))


async def tenant_of_api_key(st: AppState, token: str) -> str:
    """The tenant id of an API key however it was presented (Bearer, Segment write key); 401
    if it is unknown or revoked."""
    if len(token) > MAX_TOKEN_LEN:
        raise AuthenticationError(
            "invalid API key", details=[{"field": "authorization", "message": "token too long"}]
        )
    cache: AuthCache = st.auth_cache
    key = "k:" + token
    hit, tenant_id = cache.get(key)
    if not hit:
        tenant_id = await st.run(st.repo.authenticate, token)
        cache.put(key, tenant_id)
    if not tenant_id:
        raise AuthenticationError(
            "invalid API key (unknown or revoked)",
            details=[{"field": "authorization", "message": "invalid API key"}],
        )
    tally_log.note_tenant(str(tenant_id))
    return str(tenant_id)


async def require_admin(request: Request, st: AppState = Depends(get_state)) -> None:
    """FastAPI dependency: the request carries the admin token."""
    token = bearer_token(request)
    cache: AuthCache = st.auth_cache
    key = "a:" + token
    hit, ok = cache.get(key)
    if not hit:
        ok = bool(await st.run(st.repo.check_admin_token, token))
        cache.put(key, ok)
    if not ok:
        raise AuthenticationError(
            "invalid admin token",
            details=[{"field": "authorization", "message": "not the admin token"}],
        )
