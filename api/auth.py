"""Authentication: ``Authorization: Bearer <api key>`` -> tenant; admin token for /v1/admin.

Lookups go to the store (``clickhouse.credentials``) only on a cache miss, and are bounded:

- **valid cache** (``auth_positive_ttl_s``, default 5 s): a valid key is re-checked against the
  store once its entry is that old, so a key revoked in another API process stops working here
  within ``auth_positive_ttl_s`` (in this process: at once). A key's expiry is checked on every
  request. Entries past their TTL are kept (LRU, ``auth_cache_max_entries``) so that re-checking a
  recently valid key is never refused by the limits below.
- **invalid cache** (``auth_negative_ttl_s``, default 60 s): unknown, revoked and expired
  credentials are answered 401 from memory. It is a separate LRU, so junk cannot push valid keys
  out.
- **per-client-address failure limit**: each address may fail ``auth_failure_burst`` times, then
  ``auth_failures_per_s``; beyond that its failing requests get 429 + Retry-After, and its unknown
  credentials are not looked up at all (a cached valid key from the same address is still served).
- **global lookup budget**: at most ``auth_lookups_per_s`` store lookups of never-seen credentials
  per process and second, whatever the number of addresses; beyond it: 429 + Retry-After. Junk
  can therefore never occupy the (in embedded mode serialised) store.
- concurrent lookups of the same credential share one store call.
- **kept warm**: API keys used in the last ``cache_keep_warm_s`` are re-checked in the
  background (``Authenticator.refresh``, one store read for all of them, once one entry is
  past half its TTL: ``TTLCache.renew_due``), so requests using them do not wait for the
  store; the revocation bound above is unchanged (an entry is never served longer than the TTL
  after the store confirmed it).

Malformed API keys (not ``tly_<tenant>_<secret>``) never reach the store. Secrets never appear in
logs, metrics or error bodies; caches are keyed by ``sha256``.

Successful API-key uses are remembered in memory (``last_used``) and written in one batch every
``counters_flush_s`` by ``AppState.flush_counters``.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import Depends, Request

from api.ratelimit import Hit, KeyedBuckets, TokenBucket, TTLCache, retry_after_s
from api.state import AppState, State
from clickhouse.credentials import KeyMatch, tenant_of_key
from tally import log as tally_log
from tally.errors import AuthenticationError, RateLimited
from tally.settings import Settings

MAX_TOKEN_LEN = 512
MAX_ADDRESSES = 10_000
# (tenant id, key hash) pairs -> the hashes still valid, with their match
LookupMany = Callable[[list[tuple[str, str]]], Awaitable[dict[str, KeyMatch]]]


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class Authenticator:
    """The per-app credential caches and limits (see the module docstring)."""

    def __init__(
        self, settings: Settings, metrics: Any = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        s = settings
        self.settings = settings
        self.metrics = metrics
        self.clock = clock
        self.valid: TTLCache[str, Any] = TTLCache(s.auth_cache_max_entries)
        self.invalid: TTLCache[str, bool] = TTLCache(s.auth_cache_max_entries)
        self.failures: KeyedBuckets[str] = KeyedBuckets(MAX_ADDRESSES)
        self.lookups = TokenBucket(s.auth_lookups_per_s, max(1.0, s.auth_lookups_per_s), clock())
        self._inflight: dict[str, asyncio.Future[Any]] = {}
        self.last_used: dict[tuple[str, str], int] = {}
        self._forgets = 0  # a refresh in flight across a ``forget`` does not keep its answers

    # --- helpers ----------------------------------------------------------------------------
    def _count(self, name: str, label: str) -> None:
        if self.metrics is not None:
            getattr(self.metrics, name).labels(label).inc()

    def _failure_bucket(self, address: str, now: float) -> TokenBucket:
        s = self.settings
        return self.failures.bucket(address, s.auth_failures_per_s, s.auth_failure_burst, now)

    def _fail(self, address: str, now: float, message: str) -> AuthenticationError | RateLimited:
        """A failed authentication: 401, or 429 once the address used up its failures."""
        wait = self._failure_bucket(address, now).take(1, now)
        if wait > 0:
            self._count("auth_failures", "limited")
            return RateLimited(
                "too many failed authentications from this address; retry later",
                retry_after=retry_after_s(wait),
                field="authorization",
            )
        self._count("auth_failures", "invalid")
        return AuthenticationError(message, field="authorization")

    async def _lookup(self, ck: str, fn: Callable[[], Awaitable[Any]]) -> Any:
        fut = self._inflight.get(ck)
        if fut is not None:
            return await asyncio.shield(fut)
        fut = asyncio.get_running_loop().create_future()
        self._inflight[ck] = fut
        try:
            value = await fn()
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved: nobody else may be waiting
            raise
        else:
            fut.set_result(value)
            return value
        finally:
            self._inflight.pop(ck, None)

    async def resolve(
        self,
        kind: str,
        token: str,
        address: str,
        lookup: Callable[[str], Awaitable[Any]],
        message: str,
    ) -> Any:
        """The cached or looked-up value of ``token`` (a KeyMatch or an admin token id)."""
        now = self.clock()
        ck = kind + hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()
        hit, value = self.valid.get(ck, now)
        if hit is Hit.FRESH:
            if not isinstance(value, KeyMatch) or value.valid_at(_now_ms()):
                return value
            self.valid.pop(ck)  # expired since it was cached
            self.invalid.put(ck, True, self.settings.auth_negative_ttl_s, now)
            raise self._fail(address, now, message)
        known = hit is Hit.STALE  # valid recently: re-check it without the limits below
        if not known:
            bad, _ = self.invalid.get(ck, now)
            if bad is Hit.FRESH:
                raise self._fail(address, now, message)
            if kind == "k" and tenant_of_key(token) is None:  # malformed: no lookup needed
                self.invalid.put(ck, True, self.settings.auth_negative_ttl_s, now)
                raise self._fail(address, now, message)
            bucket = self._failure_bucket(address, now)
            if bucket.available(now) < 1:
                self._count("auth_failures", "limited")
                raise RateLimited(
                    "too many failed authentications from this address; retry later",
                    retry_after=retry_after_s((1 - bucket.tokens) / bucket.rate),
                    field="authorization",
                )
            if ck not in self._inflight:
                wait_s = self.lookups.take(1, now)
                if wait_s > 0:
                    self._count("auth_failures", "lookup_budget")
                    raise RateLimited(
                        "too many unknown credentials are being checked right now; retry later",
                        retry_after=retry_after_s(wait_s),
                        field="authorization",
                    )
        self._count("auth_lookups", kind)
        value = await self._lookup(ck, lambda: lookup(token))
        now = self.clock()
        if value is None:
            self.valid.pop(ck)
            self.invalid.put(ck, True, self.settings.auth_negative_ttl_s, now)
            raise self._fail(address, now, message)
        self.invalid.pop(ck)
        self.valid.put(ck, value, self.settings.auth_positive_ttl_s, now)
        return value

    async def refresh(self, lookup_many: LookupMany, keep_warm_s: float) -> int:
        """Re-check in one store read the API keys used in the last ``keep_warm_s``, once one
        valid entry is past half its TTL (``TTLCache.renew_due``): renew the ones still valid,
        move the others to the invalid cache. Requests then find keys in use fresh instead of
        waiting for the store; a revoked key still stops working within
        ``auth_positive_ttl_s``. Returns how many entries were renewed. (Admin tokens are
        re-checked on use only.)"""

        async def read(due: list[tuple[str, Any]]) -> dict[str, KeyMatch]:
            found = await lookup_many([(m.tenant_id, ck[1:]) for ck, m in due])
            return {ck: found[ck[1:]] for ck, _m in due if ck[1:] in found}

        def api_key(ck: str, value: Any) -> bool:
            return ck.startswith("k") and isinstance(value, KeyMatch)

        ttl = self.settings.auth_positive_ttl_s
        renewed, gone = await self.valid.renew_due(
            ttl, keep_warm_s, self.clock(), read, lambda: self._forgets, api_key
        )
        now = self.clock()
        for ck in gone:
            self.valid.pop(ck)
            self.invalid.put(ck, True, self.settings.auth_negative_ttl_s, now)
        return renewed

    def forget(self, *, key_id: str | None = None, token_id: str | None = None) -> None:
        """Drop cached valid entries of a key or admin token revoked through this process."""
        self._forgets += 1
        if key_id is not None:
            self.valid.drop_where(lambda v: isinstance(v, KeyMatch) and v.key_id == key_id)
        if token_id is not None:
            self.valid.drop_where(lambda v: v == token_id)

    def touch(self, match: KeyMatch) -> None:
        self.last_used[(match.tenant_id, match.key_id)] = _now_ms()

    def take_last_used(self) -> dict[tuple[str, str], int]:
        uses, self.last_used = self.last_used, {}
        return uses


def bearer_token(request: Request) -> str:
    """The token of ``Authorization: Bearer <token>``; 401 naming what is wrong."""
    header = request.headers.get("authorization")
    if header is None:
        raise AuthenticationError(
            "missing Authorization header; send 'Authorization: Bearer <api key>'",
            field="authorization",
        )
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationError(
            "malformed Authorization header; expected 'Bearer <api key>'", field="authorization"
        )
    if len(token) > MAX_TOKEN_LEN:
        raise AuthenticationError("invalid API key: token too long", field="authorization")
    return token


def client_address(request: Request) -> str:
    return request.client.host if request.client is not None else "unknown"


async def key_match(st: AppState, token: str, address: str) -> KeyMatch:
    """The valid API key ``token`` however it was presented (Bearer, Segment write key), from
    client ``address``: 401 if unknown, revoked or expired, 429 if the address or the lookup
    budget is exhausted or the tenant's request rate is exceeded."""
    if len(token) > MAX_TOKEN_LEN:
        raise AuthenticationError("invalid API key: token too long", field="authorization")
    auth: Authenticator = st.auth
    creds = st.repo.credentials

    async def lookup(t: str) -> Any:
        return await st.run(creds.lookup_api_key, t)

    match: KeyMatch = await auth.resolve(
        "k", token, address, lookup, "invalid API key (unknown, revoked or expired)"
    )
    auth.touch(match)
    tally_log.note_tenant(str(match.tenant_id))
    await st.limiter.charge_request(st, match.tenant_id)
    return match


async def tenant_of_api_key(st: AppState, token: str, address: str = "unknown") -> str:
    """The tenant id of an API key presented some other way than Bearer (Segment write key)."""
    return (await key_match(st, token, address)).tenant_id


async def current_key(request: Request, st: State) -> KeyMatch:
    """FastAPI dependency: the valid API key of the request (charges the tenant's request
    rate limit)."""
    return await key_match(st, bearer_token(request), client_address(request))


async def current_tenant(match: KeyMatch = Depends(current_key)) -> str:
    """FastAPI dependency: the tenant id of the request's API key."""
    return match.tenant_id


# the tenant of the request's API key, as a route parameter: ``tenant_id: Tenant``
Tenant = Annotated[str, Depends(current_tenant)]


async def require_admin(request: Request, st: State) -> str:
    """FastAPI dependency: the request carries a valid admin token; returns its id."""
    token = bearer_token(request)
    creds = st.repo.credentials

    async def lookup(t: str) -> Any:
        return await st.run(creds.lookup_admin_token, t)

    token_id: str = await st.auth.resolve(
        "a", token, client_address(request), lookup, "invalid admin token (unknown or revoked)"
    )
    return token_id
