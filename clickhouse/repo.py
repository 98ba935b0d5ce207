"""Tenants, API keys, admin tokens and meters (ReplacingMergeTree tables, read with FINAL).

API keys look like ``tly_<tenant_id>_<secret>``: ``tenant_id`` is 12 lowercase base32 characters
(never ``_``), ``secret`` is ``secrets.token_urlsafe(32)`` (may contain ``_`` and ``-``). Only
``sha256(key)`` (hex) and a short prefix are stored. Admin tokens are stored the same way.

Rows are never updated in place: a change is a new row with a higher ``version`` (epoch ms, made
strictly increasing within the process), and readers take the newest row per key with ``FINAL``.
Filters on non-key columns (``deleted``) are applied *after* ``FINAL`` in an outer query, so an
older live row can never shine through a newer deletion.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import secrets
import threading
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import orjson

from clickhouse.store import Store
from schemas.meters import Meter, MeterSpec, MeterStatus
from schemas.tenants import Tenant
from schemas.timeutil import epoch_ms, to_ms, utc_now
from tally.errors import Conflict, NotFound, ValidationError

log = logging.getLogger(__name__)

KEY_PREFIX = "tly_"
TENANT_ID_LEN = 12
_KEY_PREFIX_STORED = len(KEY_PREFIX) + TENANT_ID_LEN + 1 + 4  # 'tly_' + tenant + '_' + 4 chars
_MAX_KEY_LEN = 256
AUTH_CACHE_TTL_S = 5.0
_AUTH_CACHE_MAX = 10_000
_BASE32 = frozenset("abcdefghijklmnopqrstuvwxyz234567")


def new_tenant_id() -> str:
    return base64.b32encode(secrets.token_bytes(10)).decode("ascii").lower()[:TENANT_ID_LEN]


def is_tenant_id(value: str) -> bool:
    return len(value) == TENANT_ID_LEN and all(c in _BASE32 for c in value)


def hash_secret(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


def tenant_of_key(api_key: str) -> str | None:
    """The tenant id embedded in an API key, or None if the key is malformed."""
    if not isinstance(api_key, str) or len(api_key) > _MAX_KEY_LEN:
        return None
    if not api_key.startswith(KEY_PREFIX):
        return None
    tenant_id = api_key[len(KEY_PREFIX) : len(KEY_PREFIX) + TENANT_ID_LEN]
    rest = api_key[len(KEY_PREFIX) + TENANT_ID_LEN :]
    if not is_tenant_id(tenant_id) or len(rest) < 2 or rest[0] != "_":
        return None
    return tenant_id


def _aware(dt: datetime) -> datetime:
    """DateTime64 values come back naive (UTC) from the driver."""
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def _spec_json(spec: MeterSpec) -> str:
    """The MeterSpec part of a spec or meter, as JSON with field names (not aliases)."""
    return spec.model_dump_json(include=set(MeterSpec.model_fields))


class _Versions:
    """Strictly increasing epoch-ms versions within this process."""

    def __init__(self) -> None:
        self._last = 0
        self._lock = threading.Lock()

    def next(self, now: datetime) -> int:
        with self._lock:
            self._last = max(epoch_ms(now), self._last + 1)
            return self._last


class Repo:
    """Tenants, keys and meters. Every method except ``all_meters`` is scoped to one tenant."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.db = store.database
        self._versions = _Versions()
        self._auth_cache: dict[str, tuple[str, float]] = {}
        self._auth_lock = threading.Lock()

    # --- tenants ------------------------------------------------------------------------------

    def create_tenant(self, name: str) -> tuple[Tenant, str]:
        """Create a tenant and its first API key; the plaintext key is returned only here."""
        if not isinstance(name, str) or not name.strip() or len(name) > 256:
            raise ValidationError(
                "tenant name must be 1..256 characters", details={"field": "name"}
            )
        now = utc_now()
        tenant = Tenant(tenant_id=new_tenant_id(), name=name.strip(), created_at=now)
        self.store.insert(
            "tenants",
            [(tenant.tenant_id, tenant.name, now, self._versions.next(now))],
            ["tenant_id", "name", "created_at", "version"],
        )
        return tenant, self.create_api_key(tenant.tenant_id)

    def get_tenant(self, tenant_id: str) -> Tenant:
        rows = self.store.query_rows(
            f"SELECT tenant_id, name, created_at FROM {self.db}.tenants FINAL "
            "WHERE tenant_id = {tenant:String}",
            {"tenant": tenant_id},
        )
        if not rows:
            raise NotFound(f"tenant '{tenant_id}' not found", details={"field": "tenant_id"})
        t, name, created = rows[0]
        return Tenant(tenant_id=t, name=name, created_at=_aware(created))

    def list_tenants(self) -> list[Tenant]:
        rows = self.store.query_rows(
            f"SELECT tenant_id, name, created_at FROM {self.db}.tenants FINAL "
            "ORDER BY created_at, tenant_id"
        )
        return [Tenant(tenant_id=t, name=n, created_at=_aware(c)) for t, n, c in rows]

    # --- API keys -----------------------------------------------------------------------------

    def create_api_key(self, tenant_id: str) -> str:
        self.get_tenant(tenant_id)
        key = f"{KEY_PREFIX}{tenant_id}_{secrets.token_urlsafe(32)}"
        now = utc_now()
        self.store.insert(
            "api_keys",
            [
                (
                    tenant_id,
                    hash_secret(key),
                    key[:_KEY_PREFIX_STORED],
                    now,
                    0,
                    self._versions.next(now),
                )
            ],
            ["tenant_id", "key_hash", "key_prefix", "created_at", "revoked", "version"],
        )
        return key

    def authenticate(self, api_key: str) -> str | None:
        """The tenant id of a valid, unrevoked key, else None. Hits are cached for 5 s."""
        tenant_id = tenant_of_key(api_key)
        if tenant_id is None:
            return None
        digest = hash_secret(api_key)
        now = time.monotonic()
        with self._auth_lock:
            hit = self._auth_cache.get(digest)
            if hit is not None and hit[1] > now:
                return hit[0]
        rows = self.store.query_rows(
            "SELECT tenant_id FROM ("
            f"SELECT tenant_id, revoked FROM {self.db}.api_keys FINAL "
            "WHERE tenant_id = {tenant:String} AND key_hash = {hash:String}"
            ") WHERE revoked = 0",
            {"tenant": tenant_id, "hash": digest},
        )
        if not rows:
            return None
        with self._auth_lock:
            if len(self._auth_cache) >= _AUTH_CACHE_MAX:
                self._auth_cache = {k: v for k, v in self._auth_cache.items() if v[1] > now}
                if len(self._auth_cache) >= _AUTH_CACHE_MAX:
                    self._auth_cache.clear()
            self._auth_cache[digest] = (tenant_id, now + AUTH_CACHE_TTL_S)
        return tenant_id

    # --- admin tokens -------------------------------------------------------------------------

    def _admin_hashes(self) -> set[str]:
        rows = self.store.query_rows(f"SELECT token_hash FROM {self.db}.admin_tokens FINAL")
        return {r[0] for r in rows}

    def _store_admin(self, token: str) -> None:
        self.store.insert(
            "admin_tokens", [(hash_secret(token), utc_now())], ["token_hash", "created_at"]
        )

    def ensure_admin_token(self, fixed: str | None = None) -> str | None:
        """Make sure an admin token exists; return the plaintext of a token stored now, else None.

        - ``fixed`` given and not stored yet: store it (even if other tokens exist), return it.
        - no token stored at all and no ``fixed``: generate one, store it, return it (once).
        - otherwise: None.
        """
        existing = self._admin_hashes()
        if fixed:
            if hash_secret(fixed) in existing:
                return None
            self._store_admin(fixed)
            return fixed
        if existing:
            return None
        token = f"tla_{secrets.token_urlsafe(32)}"
        self._store_admin(token)
        log.info("generated a new admin token")
        return token

    def check_admin_token(self, token: str) -> bool:
        if not isinstance(token, str) or not token or len(token) > _MAX_KEY_LEN:
            return False
        rows = self.store.query_rows(
            f"SELECT count() FROM {self.db}.admin_tokens WHERE token_hash = {{hash:String}}",
            {"hash": hash_secret(token)},
        )
        return bool(rows and rows[0][0])

    # --- meters -------------------------------------------------------------------------------

    _METER_COLS = "tenant_id, slug, meter_id, spec, created_at, status, activation_topic"
    _METER_INSERT = [
        "tenant_id",
        "slug",
        "meter_id",
        "spec",
        "created_at",
        "deleted",
        "version",
        "status",
        "activation_topic",
    ]

    def _live_meters(self, where: str, params: dict[str, Any]) -> list[Meter]:
        rows = self.store.query_rows(
            f"SELECT {self._METER_COLS} FROM ("
            f"SELECT {self._METER_COLS}, deleted FROM {self.db}.meters FINAL WHERE {where}"
            ") WHERE deleted = 0 ORDER BY tenant_id, slug",
            params,
        )
        return [self._meter(*r) for r in rows]

    @staticmethod
    def _meter(
        tenant_id: str,
        slug: str,
        meter_id: str,
        spec: str,
        created: datetime,
        status: str = MeterStatus.ACTIVE,
        activation_topic: str = "",
    ) -> Meter:
        data = orjson.loads(spec)
        data.update(
            slug=slug,
            id=meter_id,
            tenant_id=tenant_id,
            created_at=_aware(created),
            status=status or MeterStatus.ACTIVE,
            activation_topic=activation_topic,
        )
        return Meter.model_validate(data)

    def _write_meter(self, meter: Meter, *, deleted: bool = False) -> None:
        now = utc_now()
        self.store.insert(
            "meters",
            [
                (
                    meter.tenant_id,
                    meter.slug,
                    meter.id,
                    _spec_json(meter),
                    meter.created_at,
                    int(deleted),
                    self._versions.next(now),
                    str(meter.status),
                    meter.activation_topic,
                )
            ],
            self._METER_INSERT,
        )

    def create_meter(self, tenant_id: str, spec: MeterSpec, *, activation_topic: str = "") -> Meter:
        """Store a new meter; Conflict if the slug exists.

        With ``activation_topic`` the meter is stored ``pending``: the caller then produces its
        activation markers to that topic and calls ``activate_meter``. Without it the meter is
        ``active`` at once and applies to every event (no markers; used by tests and tools that
        write the store directly).
        """
        self.get_tenant(tenant_id)
        if self.find_meter(tenant_id, spec.slug) is not None:
            raise Conflict(f"meter '{spec.slug}' already exists", details={"field": "slug"})
        meter = self._meter(
            tenant_id,
            spec.slug,
            uuid.uuid4().hex,
            _spec_json(spec),
            to_ms(utc_now()),
            MeterStatus.PENDING if activation_topic else MeterStatus.ACTIVE,
            activation_topic,
        )
        self._write_meter(meter)
        return meter

    def activate_meter(self, meter: Meter) -> Meter:
        """Mark a pending meter active (its markers were acknowledged). NotFound if the meter
        was deleted (or replaced) meanwhile; an active meter is returned as it is."""
        current = self.find_meter(meter.tenant_id, meter.slug)
        if current is None:
            raise NotFound(
                f"meter '{meter.slug}' was deleted while it was being activated",
                details=[{"field": "slug", "message": "deleted during activation"}],
            )
        if current.id != meter.id:
            raise Conflict(
                f"meter '{meter.slug}' was replaced by another create request meanwhile",
                details=[{"field": "slug", "message": "created concurrently"}],
            )
        if current.status == MeterStatus.ACTIVE:
            return current
        active = current.model_copy(update={"status": MeterStatus.ACTIVE})
        self._write_meter(active)
        return active

    def find_meter(self, tenant_id: str, slug: str) -> Meter | None:
        found = self._live_meters(
            "tenant_id = {tenant:String} AND slug = {slug:String}",
            {"tenant": tenant_id, "slug": slug},
        )
        return found[0] if found else None

    def list_meters(self, tenant_id: str) -> list[Meter]:
        return self._live_meters("tenant_id = {tenant:String}", {"tenant": tenant_id})

    def get_meter(self, tenant_id: str, slug: str) -> Meter:
        found = self._live_meters(
            "tenant_id = {tenant:String} AND slug = {slug:String}",
            {"tenant": tenant_id, "slug": slug},
        )
        if not found:
            raise NotFound(f"meter '{slug}' not found", details={"field": "slug"})
        return found[0]

    def delete_meter(self, tenant_id: str, slug: str) -> None:
        self._write_meter(self.get_meter(tenant_id, slug), deleted=True)

    def all_meters(self) -> list[Meter]:
        """Every tenant's live meters (the worker's one cross-tenant read)."""
        return self._live_meters("1", {})
