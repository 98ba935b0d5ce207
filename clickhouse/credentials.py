"""API keys and admin tokens: create, list, revoke, rotate, look up (migration 060).

A key is ``tly_<tenant_id>_<secret>``; an admin token is ``tla_<secret>`` (a fixed token from
``TALLY_ADMIN_TOKEN`` may look like anything). Only ``sha256`` (hex) of a secret is stored, plus
a short display prefix of API keys (``tly_<tenant>_`` and 4 characters). The public id of a key
or token is the first 16 hex characters of its hash (``key_id`` / ``token_id``).

The creation row (``api_keys`` / ``admin_tokens``) never changes. Later changes are appended to
aggregate tables whose merges commute, so concurrent changes from several API processes never
undo each other: a revocation is sticky (``min(revoked_at)``), an expiry can only be brought
forward (``min(expires_at)``; rotation uses this for the overlap), and the last use only grows
(``max(last_used_at)``, written in batches by the API, never per request).

Nothing here caches: ``api.auth`` caches lookups with bounded TTLs.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from clickhouse.store import Store
from schemas.timeutil import epoch_ms, to_ms, utc_now
from tally.errors import Conflict, NotFound, ValidationError

KEY_PREFIX = "tly_"
ADMIN_PREFIX = "tla_"
TENANT_ID_LEN = 12
ID_LEN = 16
MAX_SECRET_LEN = 256
MAX_NAME = 128
_DISPLAY_PREFIX = len(KEY_PREFIX) + TENANT_ID_LEN + 1 + 4  # 'tly_' + tenant + '_' + 4 chars
_BASE32 = frozenset("abcdefghijklmnopqrstuvwxyz234567")
_HEX = frozenset("0123456789abcdef")

NEVER = datetime(2299, 12, 31, tzinfo=UTC)  # "not revoked" / "no expiry" in the min() columns
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)  # "never used" in the max() column


def hash_secret(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


def public_id(secret: str) -> str:
    """The id under which a key or token is listed and revoked (never enough to use it)."""
    return hash_secret(secret)[:ID_LEN]


def is_tenant_id(value: str) -> bool:
    return len(value) == TENANT_ID_LEN and all(c in _BASE32 for c in value)


def is_public_id(value: str) -> bool:
    return len(value) == ID_LEN and all(c in _HEX for c in value)


def tenant_of_key(api_key: str) -> str | None:
    """The tenant id embedded in an API key, or None if the key is malformed."""
    if not isinstance(api_key, str) or len(api_key) > MAX_SECRET_LEN:
        return None
    if not api_key.startswith(KEY_PREFIX):
        return None
    tenant_id = api_key[len(KEY_PREFIX) : len(KEY_PREFIX) + TENANT_ID_LEN]
    rest = api_key[len(KEY_PREFIX) + TENANT_ID_LEN :]
    if not is_tenant_id(tenant_id) or len(rest) < 2 or rest[0] != "_":
        return None
    return tenant_id


def _aware(dt: datetime | None) -> datetime | None:
    if dt is None:
        return None
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def _real(dt: datetime | None, sentinel: datetime) -> datetime | None:
    """None for NULL and for the 'never' sentinel of a column."""
    v = _aware(dt)
    if v is None or v == sentinel:
        return None
    return v


def _earliest(*values: datetime | None) -> datetime | None:
    present = [v for v in values if v is not None]
    return min(present) if present else None


def check_name(name: str | None) -> str:
    if name is None:
        return ""
    if not isinstance(name, str) or len(name) > MAX_NAME or any(ord(c) < 32 for c in name):
        raise ValidationError(
            f"name must be a string of at most {MAX_NAME} printable characters", field="name"
        )
    return name.strip()


@dataclass(frozen=True)
class ApiKeyInfo:
    """A key as listed (never the secret)."""

    key_id: str
    tenant_id: str
    name: str
    prefix: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None

    def status(self, now: datetime) -> str:
        if self.revoked_at is not None and self.revoked_at <= now:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"

    def to_json(self, now: datetime) -> dict[str, Any]:
        def iso(dt: datetime | None) -> str | None:
            if dt is None:
                return None
            return to_ms(dt).isoformat(timespec="milliseconds").replace("+00:00", "Z")

        return {
            "id": self.key_id,
            "tenant_id": self.tenant_id,
            "name": self.name,
            "prefix": self.prefix,
            "status": self.status(now),
            "created_at": iso(self.created_at),
            "expires_at": iso(self.expires_at),
            "revoked_at": iso(self.revoked_at),
            "last_used_at": iso(self.last_used_at),
        }


@dataclass(frozen=True)
class KeyMatch:
    """A successful lookup: who the key belongs to and until when it is valid."""

    tenant_id: str
    key_id: str
    expires_ms: int | None  # epoch ms; None = no expiry

    def valid_at(self, now_ms: int) -> bool:
        return self.expires_ms is None or now_ms < self.expires_ms


@dataclass(frozen=True)
class AdminTokenInfo:
    token_id: str
    name: str
    created_at: datetime
    revoked_at: datetime | None

    def to_json(self) -> dict[str, Any]:
        def iso(dt: datetime | None) -> str | None:
            if dt is None:
                return None
            return to_ms(dt).isoformat(timespec="milliseconds").replace("+00:00", "Z")

        return {
            "id": self.token_id,
            "name": self.name,
            "status": "revoked" if self.revoked_at is not None else "active",
            "created_at": iso(self.created_at),
            "revoked_at": iso(self.revoked_at),
        }


class Credentials:
    """API keys and admin tokens of one store. Every API-key method is scoped to one tenant."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.db = store.database

    # --- API keys -----------------------------------------------------------------------------

    def create_api_key(
        self, tenant_id: str, name: str | None = None, expires_at: datetime | None = None
    ) -> tuple[ApiKeyInfo, str]:
        """Store a new key of ``tenant_id`` (which must exist); the plaintext is returned only
        here. ``expires_at`` must lie in the future."""
        name = check_name(name)
        now = utc_now()
        if expires_at is not None:
            expires_at = to_ms(_aware(expires_at) or expires_at)
            if expires_at <= now:
                raise ValidationError("expires_at must be in the future", field="expires_at")
        if not is_tenant_id(tenant_id):
            raise NotFound(f"tenant {tenant_id!r} not found", field="tenant_id")
        key = f"{KEY_PREFIX}{tenant_id}_{secrets.token_urlsafe(32)}"
        digest = hash_secret(key)
        key_id = digest[:ID_LEN]
        self.store.insert(
            "api_keys",
            [
                (
                    tenant_id,
                    digest,
                    key[:_DISPLAY_PREFIX],
                    now,
                    0,
                    epoch_ms(now),
                    key_id,
                    name,
                    expires_at,
                )
            ],
            [
                "tenant_id",
                "key_hash",
                "key_prefix",
                "created_at",
                "revoked",
                "version",
                "key_id",
                "name",
                "expires_at",
            ],
        )
        info = ApiKeyInfo(
            key_id, tenant_id, name, key[:_DISPLAY_PREFIX], now, expires_at, None, None
        )
        return info, key

    def _key_rows(self, tenant_id: str, key_id: str | None) -> list[ApiKeyInfo]:
        where = "tenant_id = {tenant:String}"
        params: dict[str, Any] = {"tenant": tenant_id}
        if key_id is not None:
            where += " AND key_id = {key_id:String}"
            params["key_id"] = key_id
        rows = self.store.query_rows(
            "SELECT k.key_id, k.name, k.key_prefix, k.created_at, k.expires_at, k.revoked, "
            "s.revoked_at, s.expires_at, s.last_used_at FROM ("
            "SELECT key_id, name, key_prefix, created_at, expires_at, revoked "
            f"FROM {self.db}.api_keys FINAL WHERE {where}"
            ") AS k LEFT JOIN ("
            "SELECT key_id, min(revoked_at) AS revoked_at, min(expires_at) AS expires_at, "
            f"max(last_used_at) AS last_used_at FROM {self.db}.api_key_state WHERE {where} "
            "GROUP BY key_id"
            ") AS s ON k.key_id = s.key_id "
            "ORDER BY k.created_at, k.key_id SETTINGS join_use_nulls = 1",
            params,
        )
        out = []
        for kid, name, prefix, created, exp, legacy_revoked, rev, exp2, used in rows:
            created_at = _aware(created)
            assert created_at is not None
            revoked_at = _real(rev, NEVER)
            if legacy_revoked and revoked_at is None:
                revoked_at = created_at
            out.append(
                ApiKeyInfo(
                    key_id=kid,
                    tenant_id=tenant_id,
                    name=name,
                    prefix=prefix,
                    created_at=created_at,
                    expires_at=_earliest(_aware(exp), _real(exp2, NEVER)),
                    revoked_at=revoked_at,
                    last_used_at=_real(used, EPOCH),
                )
            )
        return out

    def list_api_keys(self, tenant_id: str, include_inactive: bool = True) -> list[ApiKeyInfo]:
        keys = self._key_rows(tenant_id, None)
        if include_inactive:
            return keys
        now = utc_now()
        return [k for k in keys if k.status(now) == "active"]

    def get_api_key(self, tenant_id: str, key_id: str) -> ApiKeyInfo:
        found = self._key_rows(tenant_id, key_id) if is_public_id(key_id) else []
        if not found:
            raise NotFound(f"API key {key_id!r} not found", field="key_id")
        return found[0]

    def _append_state(
        self,
        tenant_id: str,
        key_id: str,
        *,
        revoked_at: datetime = NEVER,
        expires_at: datetime = NEVER,
        last_used_at: datetime = EPOCH,
    ) -> None:
        self.store.insert(
            "api_key_state",
            [(tenant_id, key_id, revoked_at, expires_at, last_used_at)],
            ["tenant_id", "key_id", "revoked_at", "expires_at", "last_used_at"],
        )

    def revoke_api_key(self, tenant_id: str, key_id: str) -> ApiKeyInfo:
        """Revoke a key (idempotent: revoking a revoked key keeps its first revocation time)."""
        key = self.get_api_key(tenant_id, key_id)
        if key.revoked_at is not None:
            return key
        now = utc_now()
        self._append_state(tenant_id, key.key_id, revoked_at=now)
        return self.get_api_key(tenant_id, key_id)

    def rotate_api_key(
        self,
        tenant_id: str,
        key_id: str,
        overlap: timedelta,
        name: str | None = None,
        expires_at: datetime | None = None,
    ) -> tuple[ApiKeyInfo, str, ApiKeyInfo]:
        """A new key replacing ``key_id``; the old one keeps working for ``overlap`` (then it
        expires). Returns (new key, its plaintext, the old key as it is now)."""
        if overlap < timedelta(0):
            raise ValidationError("overlap must be >= 0 seconds", field="overlap_s")
        old = self.get_api_key(tenant_id, key_id)
        now = utc_now()
        if old.status(now) != "active":
            raise Conflict(
                f"API key {key_id!r} is {old.status(now)}; create a new key instead of rotating",
                field="key_id",
            )
        new, secret = self.create_api_key(
            tenant_id, old.name if name is None else name, expires_at=expires_at
        )
        self._append_state(tenant_id, old.key_id, expires_at=to_ms(now + overlap))
        return new, secret, self.get_api_key(tenant_id, key_id)

    def lookup_api_key(self, api_key: str) -> KeyMatch | None:
        """The tenant and key id of a key that is neither revoked nor expired, else None."""
        tenant_id = tenant_of_key(api_key)
        if tenant_id is None:
            return None
        digest = hash_secret(api_key)
        return self.lookup_api_key_hashes([(tenant_id, digest)]).get(digest)

    def lookup_api_key_hashes(self, keys: Sequence[tuple[str, str]]) -> dict[str, KeyMatch]:
        """Keys by (tenant id, key hash), many in one read: the hashes of the keys that are
        neither revoked nor expired, with their match; the others are left out. (The API's
        cache re-confirms the keys in use this way, without their secrets.)"""
        if not keys:
            return {}
        tenants = sorted({t for t, _ in keys})
        hashes = sorted({h for _, h in keys})
        rows = self.store.query_rows(
            "SELECT k.tenant_id, k.key_hash, k.key_id, k.expires_at, s.revoked_at, s.expires_at "
            "FROM (SELECT tenant_id, key_hash, key_id, expires_at, revoked FROM "
            f"{self.db}.api_keys FINAL "
            "WHERE tenant_id IN {tenants:Array(String)} AND key_hash IN {hashes:Array(String)}"
            ") AS k LEFT JOIN ("
            "SELECT tenant_id, key_id, min(revoked_at) AS revoked_at, "
            f"min(expires_at) AS expires_at FROM {self.db}.api_key_state "
            "WHERE tenant_id IN {tenants:Array(String)} AND key_id IN {ids:Array(String)} "
            "GROUP BY tenant_id, key_id"
            ") AS s ON k.tenant_id = s.tenant_id AND k.key_id = s.key_id WHERE k.revoked = 0 "
            "SETTINGS join_use_nulls = 1",
            {"tenants": tenants, "hashes": hashes, "ids": sorted({h[:ID_LEN] for h in hashes})},
        )
        wanted = set(keys)
        now_ms = epoch_ms(utc_now())
        out: dict[str, KeyMatch] = {}
        for tenant_id, digest, kid, exp, rev, exp2 in rows:
            if (tenant_id, digest) not in wanted or _real(rev, NEVER) is not None:
                continue
            expires = _earliest(_aware(exp), _real(exp2, NEVER))
            match = KeyMatch(tenant_id, kid, None if expires is None else epoch_ms(expires))
            if match.valid_at(now_ms):
                out[digest] = match
        return out

    def record_last_used(self, uses: dict[tuple[str, str], int]) -> None:
        """``{(tenant_id, key_id): epoch ms}`` -> one insert (the API batches these)."""
        if not uses:
            return
        rows = [
            (t, k, NEVER, NEVER, datetime.fromtimestamp(ms / 1000, UTC))
            for (t, k), ms in sorted(uses.items())
        ]
        self.store.insert(
            "api_key_state",
            rows,
            ["tenant_id", "key_id", "revoked_at", "expires_at", "last_used_at"],
        )

    # --- admin tokens -------------------------------------------------------------------------

    def _admin_hashes(self) -> set[str]:
        rows = self.store.query_rows(f"SELECT token_hash FROM {self.db}.admin_tokens FINAL")
        return {r[0] for r in rows}

    def _store_admin(self, token: str, name: str) -> AdminTokenInfo:
        now = utc_now()
        digest = hash_secret(token)
        self.store.insert(
            "admin_tokens",
            [(digest, now, digest[:ID_LEN], name)],
            ["token_hash", "created_at", "token_id", "name"],
        )
        return AdminTokenInfo(digest[:ID_LEN], name, now, None)

    def create_admin_token(self, name: str | None = None) -> tuple[AdminTokenInfo, str]:
        """A new admin token; the plaintext is returned only here."""
        token = f"{ADMIN_PREFIX}{secrets.token_urlsafe(32)}"
        return self._store_admin(token, check_name(name)), token

    def ensure_admin_token(self, fixed: str | None = None) -> str | None:
        """Make sure an admin token exists; return the plaintext of a token stored now, else None.

        - ``fixed`` given and never stored: store it (even if other tokens exist), return it. A
          fixed token that was stored and later revoked stays revoked (it is not stored again).
        - no token ever stored and no ``fixed``: generate one, store it, return it (once).
        - otherwise: None.
        """
        existing = self._admin_hashes()
        if fixed:
            if hash_secret(fixed) in existing:
                return None
            self._store_admin(fixed, "TALLY_ADMIN_TOKEN")
            return fixed
        if existing:
            return None
        _info, token = self.create_admin_token("generated at first start")
        return token

    def _admin_rows(self, token_id: str | None = None) -> list[AdminTokenInfo]:
        where, params = "1", {}
        if token_id is not None:
            where, params = "token_id = {token_id:String}", {"token_id": token_id}
        rows = self.store.query_rows(
            "SELECT t.token_id, t.name, t.created_at, r.revoked_at FROM ("
            f"SELECT token_id, name, created_at FROM {self.db}.admin_tokens FINAL WHERE {where}"
            ") AS t LEFT JOIN ("
            f"SELECT token_id, min(revoked_at) AS revoked_at FROM {self.db}.admin_token_revocations "
            f"WHERE {where} GROUP BY token_id"
            ") AS r ON t.token_id = r.token_id ORDER BY t.created_at, t.token_id "
            "SETTINGS join_use_nulls = 1",
            params,
        )
        out = []
        for tid, name, created, rev in rows:
            created_at = _aware(created)
            assert created_at is not None
            out.append(AdminTokenInfo(tid, name, created_at, _real(rev, NEVER)))
        return out

    def list_admin_tokens(self) -> list[AdminTokenInfo]:
        return self._admin_rows()

    def revoke_admin_token(self, token_id: str) -> AdminTokenInfo:
        found = self._admin_rows(token_id) if is_public_id(token_id) else []
        if not found:
            raise NotFound(f"admin token {token_id!r} not found", field="token_id")
        if found[0].revoked_at is not None:
            return found[0]
        self.store.insert(
            "admin_token_revocations", [(token_id, utc_now())], ["token_id", "revoked_at"]
        )
        return self._admin_rows(token_id)[0]

    def lookup_admin_token(self, token: str) -> str | None:
        """The token id of a valid (unrevoked) admin token, else None."""
        if not isinstance(token, str) or not token or len(token) > MAX_SECRET_LEN:
            return None
        digest = hash_secret(token)
        rows = self.store.query_rows(
            f"SELECT token_id FROM {self.db}.admin_tokens FINAL "
            "WHERE token_hash = {hash:String} AND token_id NOT IN ("
            f"SELECT token_id FROM {self.db}.admin_token_revocations "
            "WHERE token_id = {token_id:String})",
            {"hash": digest, "token_id": digest[:ID_LEN]},
        )
        return str(rows[0][0]) if rows else None
