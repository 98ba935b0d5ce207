"""The credential caches and limits of api.auth.Authenticator, with a fake clock and an
in-memory credential table (no I/O)."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import pytest

from api.auth import Authenticator
from clickhouse.credentials import KeyMatch, hash_secret
from tally.errors import AuthenticationError, RateLimited
from tally.settings import Settings

TENANT = "abcdefghijkl"


def key() -> str:
    return f"tly_{TENANT}_{secrets.token_urlsafe(16)}"


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Table:
    """The store's answer per key, and how many lookups reached it."""

    def __init__(self) -> None:
        self.valid: dict[str, KeyMatch] = {}
        self.calls = 0

    async def lookup(self, token: str) -> Any:
        self.calls += 1
        await asyncio.sleep(0)
        return self.valid.get(token)

    def add(self, token: str, kid: str = "k1", expires_ms: int | None = None) -> None:
        self.valid[token] = KeyMatch(TENANT, kid, expires_ms)


def make(**kw: Any) -> tuple[Authenticator, Clock, Table]:
    base: dict[str, Any] = dict(
        auth_positive_ttl_s=5,
        auth_negative_ttl_s=60,
        auth_failure_burst=3,
        auth_failures_per_s=1,
        auth_lookups_per_s=4,
        auth_cache_max_entries=100,
    )
    s = Settings(**{**base, **kw})
    clock = Clock()
    return Authenticator(s, clock=clock), clock, Table()


def resolve(a: Authenticator, t: Table, token: str, addr: str = "1.2.3.4") -> Any:
    return asyncio.run(a.resolve("k", token, addr, t.lookup, "invalid API key"))


def test_valid_key_is_cached_for_the_positive_ttl_then_rechecked() -> None:
    a, clock, t = make()
    k = key()
    t.add(k)
    assert resolve(a, t, k).key_id == "k1" and t.calls == 1
    clock.t += 4.9
    resolve(a, t, k)
    assert t.calls == 1
    del t.valid[k]  # revoked in another process
    resolve(a, t, k)  # still cached: within the bound
    clock.t += 0.2  # the bound has passed: the next request re-checks and is refused
    with pytest.raises(AuthenticationError):
        resolve(a, t, k)
    assert t.calls == 2


def test_unknown_keys_are_cached_and_the_address_is_limited() -> None:
    a, clock, t = make()
    bad = key()
    with pytest.raises(AuthenticationError):
        resolve(a, t, bad)
    for _ in range(2):  # negative cache: no more lookups
        with pytest.raises(AuthenticationError):
            resolve(a, t, bad)
    assert t.calls == 1
    # the burst of 3 failures is used: 429 now, and nothing new is looked up for this address
    with pytest.raises(RateLimited) as ei:
        resolve(a, t, key())
    assert ei.value.retry_after >= 1 and ei.value.details[0]["field"] == "authorization"
    assert t.calls == 1
    # another address is not affected
    with pytest.raises(AuthenticationError):
        resolve(a, t, key(), addr="5.6.7.8")
    # a valid key from the limited address that was cached stays served (also when stale)
    good = key()
    t.add(good)
    resolve(a, t, good, addr="9.9.9.9")
    clock.t += 30  # stale now; the limited address may still re-check it
    a.failures.bucket("1.2.3.4", 1, 3, clock()).tokens = 0
    assert resolve(a, t, good).tenant_id == TENANT


def test_malformed_keys_never_reach_the_store() -> None:
    a, _clock, t = make(auth_failure_burst=1000)
    for junk in ("nope", "tly_", "tly_UPPERCASE123_x", "Bearer", "tla_x" * 3):
        with pytest.raises(AuthenticationError):
            resolve(a, t, junk)
    assert t.calls == 0


def test_the_global_lookup_budget_bounds_store_calls_from_any_number_of_addresses() -> None:
    a, clock, t = make(auth_failure_burst=1000)
    refused = 0
    for i in range(200):
        try:
            resolve(a, t, key(), addr=f"10.0.{i // 250}.{i % 250}")
        except RateLimited as exc:
            refused += 1
            assert "unknown credentials" in exc.message
        except AuthenticationError:
            pass
    assert t.calls == 4 and refused == 196  # budget: 4 per second, nothing refilled yet
    clock.t += 1
    with pytest.raises(AuthenticationError):
        resolve(a, t, key())
    assert t.calls == 5


def test_expiry_is_checked_on_every_request() -> None:
    import time

    a, _clock, t = make()
    k = key()
    t.add(k, expires_ms=time.time_ns() // 1_000_000 + 150)
    resolve(a, t, k)
    time.sleep(0.2)
    with pytest.raises(AuthenticationError):
        resolve(a, t, k)  # cached but expired: refused without waiting for the TTL
    assert t.calls == 1


def test_concurrent_lookups_of_one_key_share_a_store_call() -> None:
    a, _clock, t = make()
    k = key()
    t.add(k)

    async def many() -> list[Any]:
        return await asyncio.gather(*(a.resolve("k", k, "a", t.lookup, "x") for _ in range(20)))

    assert {m.key_id for m in asyncio.run(many())} == {"k1"} and t.calls == 1


def test_forget_makes_a_local_revocation_immediate_and_caches_are_bounded() -> None:
    a, _clock, t = make(auth_failure_burst=10_000, auth_lookups_per_s=10_000)
    k = key()
    t.add(k, kid="kk")
    resolve(a, t, k)
    del t.valid[k]
    a.forget(key_id="kk")
    with pytest.raises(AuthenticationError):
        resolve(a, t, k)
    for _ in range(500):
        with pytest.raises(AuthenticationError):
            resolve(a, t, key())
    assert len(a.invalid) <= 100 and len(a.valid) <= 100


class ManyTable:
    """``lookup_api_key_hashes`` over a ``Table``: (tenant, key hash) -> the valid matches."""

    def __init__(self, table: Table) -> None:
        self.table = table
        self.reads: list[list[tuple[str, str]]] = []
        self.gate: asyncio.Event | None = None

    async def __call__(self, pairs: list[tuple[str, str]]) -> dict[str, KeyMatch]:
        self.reads.append(pairs)
        valid = {hash_secret(k): m for k, m in self.table.valid.items()}
        if self.gate is not None:
            await self.gate.wait()
        return {h: valid[h] for t, h in pairs if h in valid and valid[h].tenant_id == t}


def test_keys_in_use_are_rechecked_in_the_background_and_revocation_still_bounds_them() -> None:
    a, clock, t = make()
    many = ManyTable(t)
    used, idle, gone = key(), key(), key()
    t.add(used, "k1")
    t.add(idle, "k2")
    t.add(gone, "k3")
    for k in (used, idle, gone):
        resolve(a, t, k)
    assert t.calls == 3
    assert asyncio.run(a.refresh(many, keep_warm_s=60)) == 0  # all young
    clock.t += 3  # past half the TTL of 5 s
    resolve(a, t, used)
    resolve(a, t, gone)
    del t.valid[gone]  # revoked in another process
    assert asyncio.run(a.refresh(many, keep_warm_s=2)) == 1  # idle: not used in the last 2 s
    assert sorted(h for _t, h in many.reads[0]) == sorted(hash_secret(k) for k in (used, gone))
    # gone is refused at once, from the invalid cache (no lookup); used stays fresh past 5 s
    with pytest.raises(AuthenticationError):
        resolve(a, t, gone)
    clock.t += 4.9
    assert resolve(a, t, used).key_id == "k1"
    assert t.calls == 3
    # the revocation bound holds without the background too: idle is re-checked on use
    resolve(a, t, idle)
    assert t.calls == 4
    # a refresh that read before a revocation through this process keeps nothing
    clock.t += 3
    many.gate = asyncio.Event()

    async def revoke_during_refresh() -> int:
        task = asyncio.create_task(a.refresh(many, keep_warm_s=60))
        await asyncio.sleep(0)
        del t.valid[used]
        a.forget(key_id="k1")
        assert many.gate is not None
        many.gate.set()
        return await task

    assert asyncio.run(revoke_during_refresh()) == 0
    with pytest.raises(AuthenticationError):
        resolve(a, t, used)
    assert t.calls == 5


def test_admin_tokens_are_only_rechecked_on_use() -> None:
    a, clock, t = make()
    many = ManyTable(t)

    async def admin_lookup(token: str) -> Any:
        return "tok1"

    asyncio.run(a.resolve("a", "admin-secret", "1.2.3.4", admin_lookup, "invalid admin token"))
    clock.t += 4
    assert asyncio.run(a.refresh(many, keep_warm_s=60)) == 0 and many.reads == []
