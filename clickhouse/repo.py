"""Tenants, API keys, admin tokens and meters (ReplacingMergeTree tables, read with FINAL).

API keys look like ``tly_<tenant_id>_<secret>``: ``tenant_id`` is 12 lowercase base32 characters
(never ``_``), ``secret`` is ``secrets.token_urlsafe(32)`` (may contain ``_`` and ``-``). Only
``sha256(key)`` (hex) and a short prefix are stored. Admin tokens are stored the same way. Keys and
tokens are managed by ``clickhouse.credentials.Credentials`` (``Repo.credentials``); the key
methods here are the short forms the rest of the code uses. Nothing here caches lookups.

Rows are never updated in place: a change is a new row with a higher ``version`` (epoch ms, made
strictly increasing within the process), and readers take the newest row per key with ``FINAL``.
Filters on non-key columns (``deleted``) are applied *after* ``FINAL`` in an outer query, so an
older live row can never shine through a newer deletion.
"""

from __future__ import annotations

import base64
import logging
import secrets
import threading
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import orjson

from clickhouse.credentials import (
    KEY_PREFIX,
    TENANT_ID_LEN,
    Credentials,
    hash_secret,
    is_tenant_id,
    tenant_of_key,
)
from clickhouse.store import Store
from schemas.meters import Meter, MeterSpec, MeterStatus
from schemas.tenants import Tenant
from schemas.timeutil import epoch_ms, to_ms, utc_now
from schemas.usage import UsageMeter
from tally.errors import Conflict, NotFound, ValidationError

log = logging.getLogger(__name__)

__all__ = ["KEY_PREFIX", "Repo", "hash_secret", "is_tenant_id", "new_tenant_id", "tenant_of_key"]


def new_tenant_id() -> str:
    return base64.b32encode(secrets.token_bytes(10)).decode("ascii").lower()[:TENANT_ID_LEN]


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
        self.credentials = Credentials(store)

    # --- tenants ------------------------------------------------------------------------------

    def create_tenant(self, name: str) -> tuple[Tenant, str]:
        """Create a tenant and its first API key; the plaintext key is returned only here."""
        if not isinstance(name, str) or not name.strip() or len(name) > 256:
            raise ValidationError("tenant name must be 1..256 characters", field="name")
        now = utc_now()
        tenant = Tenant(tenant_id=new_tenant_id(), name=name.strip(), created_at=now)
        self.store.insert(
            "tenants",
            [(tenant.tenant_id, tenant.name, now, self._versions.next(now))],
            ["tenant_id", "name", "created_at", "version"],
        )
        _info, key = self.credentials.create_api_key(tenant.tenant_id, "default")
        return tenant, key

    def get_tenant(self, tenant_id: str) -> Tenant:
        rows = self.store.query_rows(
            f"SELECT tenant_id, name, created_at FROM {self.db}.tenants FINAL "
            "WHERE tenant_id = {tenant:String}",
            {"tenant": tenant_id},
        )
        if not rows:
            raise NotFound(f"tenant '{tenant_id}' not found", field="tenant_id")
        t, name, created = rows[0]
        return Tenant(tenant_id=t, name=name, created_at=_aware(created))

    def list_tenants(self) -> list[Tenant]:
        rows = self.store.query_rows(
            f"SELECT tenant_id, name, created_at FROM {self.db}.tenants FINAL "
            "ORDER BY created_at, tenant_id"
        )
        return [Tenant(tenant_id=t, name=n, created_at=_aware(c)) for t, n, c in rows]

    # --- API keys and admin tokens (clickhouse.credentials) ----------------------------------

    def create_api_key(
        self, tenant_id: str, name: str | None = None, expires_at: datetime | None = None
    ) -> str:
        """A new key of an existing tenant; returns the plaintext (shown once)."""
        self.get_tenant(tenant_id)
        _info, key = self.credentials.create_api_key(tenant_id, name, expires_at)
        return key

    def authenticate(self, api_key: str) -> str | None:
        """The tenant id of a valid (unrevoked, unexpired) key, else None. Not cached."""
        match = self.credentials.lookup_api_key(api_key)
        return match.tenant_id if match is not None else None

    def ensure_admin_token(self, fixed: str | None = None) -> str | None:
        token = self.credentials.ensure_admin_token(fixed)
        if token is not None and not fixed:
            log.info("generated a new admin token")
        return token

    def check_admin_token(self, token: str) -> bool:
        return self.credentials.lookup_admin_token(token) is not None

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
            raise Conflict(f"meter '{spec.slug}' already exists", field="slug")
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

    def _usage_meters(self, where: str, tenants: str, params: dict[str, Any]) -> list[UsageMeter]:
        """The live meters ``where`` picks, each with ``stream_only`` (``UsageMeter``): none of
        the meters with a complete backfill run or an event correction among the tenants that
        ``tenants`` picks. One statement. (The same two facts ``usage_state_sql`` checks for one
        query's range, here for the whole meter: any correction counts.)"""
        history = (
            f"SELECT tenant_id, meter_id FROM {self.db}.backfill_runs "
            f"WHERE {tenants} AND state = 'complete' "
            f"UNION ALL SELECT tenant_id, meter_id FROM {self.db}.corrections WHERE {tenants}"
        )
        rows = self.store.query_rows(
            f"SELECT {self._METER_COLS}, (tenant_id, meter_id) NOT IN ({history}) FROM ("
            f"SELECT {self._METER_COLS}, deleted FROM {self.db}.meters FINAL WHERE {where}"
            ") WHERE deleted = 0 ORDER BY tenant_id, slug",
            params,
        )
        return [UsageMeter(self._meter(*r[:-1]), bool(r[-1])) for r in rows]

    def usage_meter(self, tenant_id: str, slug: str) -> UsageMeter:
        """``get_meter`` for a usage query: the meter and whether the stream's rows alone
        answer its queries (``UsageMeter``)."""
        found = self._usage_meters(
            "tenant_id = {tenant:String} AND slug = {slug:String}",
            "tenant_id = {tenant:String}",
            {"tenant": tenant_id, "slug": slug},
        )
        if not found:
            raise NotFound(f"meter '{slug}' not found", field="slug")
        return found[0]

    def usage_meters_of(self, tenant_ids: Sequence[str]) -> list[UsageMeter]:
        """The live meters of these tenants for usage queries (``UsageMeter``), in one read (the
        API's background renewal of its meter cache)."""
        if not tenant_ids:
            return []
        where = "tenant_id IN {tenants:Array(String)}"
        return self._usage_meters(where, where, {"tenants": sorted(set(tenant_ids))})

    def get_meter(self, tenant_id: str, slug: str) -> Meter:
        found = self._live_meters(
            "tenant_id = {tenant:String} AND slug = {slug:String}",
            {"tenant": tenant_id, "slug": slug},
        )
        if not found:
            raise NotFound(f"meter '{slug}' not found", field="slug")
        return found[0]

    def delete_meter(self, tenant_id: str, slug: str) -> None:
        self._write_meter(self.get_meter(tenant_id, slug), deleted=True)

    def all_meters(self) -> list[Meter]:
        """Every tenant's live meters (the worker's one cross-tenant read)."""
        return self._live_meters("1", {})
