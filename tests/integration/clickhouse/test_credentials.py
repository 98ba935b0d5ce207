"""Key and admin-token lifecycle in the store (clickhouse.credentials), on a real chDB."""

from __future__ import annotations

from datetime import timedelta

import pytest

from clickhouse.credentials import EPOCH, NEVER, Credentials, hash_secret
from clickhouse.repo import Repo
from clickhouse.store import Store
from schemas.timeutil import epoch_ms, utc_now
from tally.errors import Conflict, NotFound, ValidationError


def _all_text(store: Store, table: str) -> str:
    rows = store.query_rows(f"SELECT * FROM {store.database}.{table}")
    return repr(rows)


def test_several_named_keys_list_revoke_never_show_the_secret(store: Store) -> None:
    repo = Repo(store)
    tenant, first = repo.create_tenant("acme")
    creds = repo.credentials
    info, second = creds.create_api_key(tenant.tenant_id, "ci")
    keys = creds.list_api_keys(tenant.tenant_id)
    assert [(k.name, k.status(utc_now())) for k in keys] == [
        ("default", "active"),
        ("ci", "active"),
    ]
    assert keys[1] == info
    assert all(k.last_used_at is None and k.expires_at is None for k in keys)
    listed = repr([k.to_json(utc_now()) for k in keys])
    for secret in (first, second):
        assert secret not in listed and secret.split("_", 2)[2] not in listed
        assert hash_secret(secret) not in listed  # only the 16-char id, not the whole hash
    # both work
    assert creds.lookup_api_key(first).tenant_id == tenant.tenant_id  # type: ignore[union-attr]
    assert creds.lookup_api_key(second).key_id == info.key_id  # type: ignore[union-attr]
    # revoke the second: only it stops working; revoking again keeps the first time
    revoked = creds.revoke_api_key(tenant.tenant_id, info.key_id)
    assert revoked.status(utc_now()) == "revoked" and revoked.revoked_at is not None
    assert creds.lookup_api_key(second) is None
    assert repo.authenticate(first) == tenant.tenant_id
    again = creds.revoke_api_key(tenant.tenant_id, info.key_id)
    assert again.revoked_at == revoked.revoked_at
    # tenant scoping: another tenant cannot see or revoke it
    other, _ = repo.create_tenant("globex")
    with pytest.raises(NotFound):
        creds.revoke_api_key(other.tenant_id, keys[0].key_id)
    with pytest.raises(NotFound):
        creds.get_api_key(tenant.tenant_id, "not-an-id")
    assert creds.lookup_api_key(first) is not None
    text = _all_text(store, "api_key_state") + _all_text(store, "api_keys")
    assert first not in text and second not in text


def test_rotation_overlap_then_expiry_and_revocation_is_sticky(store: Store) -> None:
    repo = Repo(store)
    tenant, old_key = repo.create_tenant("acme")
    creds = repo.credentials
    old_id = creds.list_api_keys(tenant.tenant_id)[0].key_id
    new, new_key, old = creds.rotate_api_key(tenant.tenant_id, old_id, timedelta(hours=1))
    assert new.name == "default" and new.key_id != old_id
    assert old.expires_at is not None
    assert timedelta(minutes=59) < old.expires_at - utc_now() <= timedelta(hours=1)
    # overlap: both work
    assert creds.lookup_api_key(old_key) is not None
    assert creds.lookup_api_key(new_key) is not None
    match = creds.lookup_api_key(old_key)
    assert match is not None and match.expires_ms == epoch_ms(old.expires_at)
    # a second rotation with a shorter overlap brings the expiry forward, never back
    _n2, _k2, old2 = creds.rotate_api_key(tenant.tenant_id, old_id, timedelta(0))
    assert old2.status(utc_now()) == "expired"
    assert creds.lookup_api_key(old_key) is None
    with pytest.raises(Conflict):
        creds.rotate_api_key(tenant.tenant_id, old_id, timedelta(hours=5))
    with pytest.raises(ValidationError):
        creds.rotate_api_key(tenant.tenant_id, new.key_id, timedelta(seconds=-1))
    # a later "expiry" row (e.g. a concurrent rotation elsewhere) cannot undo a revocation
    creds.revoke_api_key(tenant.tenant_id, new.key_id)
    store.insert(
        "api_key_state",
        [(tenant.tenant_id, new.key_id, NEVER, utc_now() + timedelta(days=9), EPOCH)],
        ["tenant_id", "key_id", "revoked_at", "expires_at", "last_used_at"],
    )
    store.command(f"OPTIMIZE TABLE {store.database}.api_key_state FINAL")
    assert creds.lookup_api_key(new_key) is None
    assert creds.get_api_key(tenant.tenant_id, new.key_id).status(utc_now()) == "revoked"


def test_expiry_and_last_used(store: Store) -> None:
    repo = Repo(store)
    tenant, _ = repo.create_tenant("acme")
    creds = repo.credentials
    with pytest.raises(ValidationError):
        creds.create_api_key(tenant.tenant_id, "past", utc_now() - timedelta(seconds=1))
    with pytest.raises(ValidationError):
        creds.create_api_key(tenant.tenant_id, "x" * 200)
    soon = utc_now() + timedelta(days=2)
    info, key = creds.create_api_key(tenant.tenant_id, "temp", soon)
    match = creds.lookup_api_key(key)
    assert match is not None and match.expires_ms == epoch_ms(soon)
    assert not match.valid_at(epoch_ms(soon)) and match.valid_at(epoch_ms(soon) - 1)
    t1, t2 = epoch_ms(utc_now()) - 5000, epoch_ms(utc_now())
    creds.record_last_used({(tenant.tenant_id, info.key_id): t2})
    creds.record_last_used({(tenant.tenant_id, info.key_id): t1})  # an older batch arrives late
    got = creds.get_api_key(tenant.tenant_id, info.key_id)
    assert got.last_used_at is not None and epoch_ms(got.last_used_at) == t2
    assert got.expires_at == soon


def test_admin_tokens_create_list_revoke(store: Store) -> None:
    creds = Credentials(store)
    info, token = creds.create_admin_token("ops")
    assert token.startswith("tla_")
    assert creds.lookup_admin_token(token) == info.token_id
    assert [t.name for t in creds.list_admin_tokens()] == ["ops"]
    assert creds.ensure_admin_token() is None  # one exists already
    assert creds.ensure_admin_token("fixed-token-abc") == "fixed-token-abc"
    fixed_id = hash_secret("fixed-token-abc")[:16]
    creds.revoke_admin_token(fixed_id)
    assert creds.lookup_admin_token("fixed-token-abc") is None
    # a revoked fixed token (TALLY_ADMIN_TOKEN) is not brought back by the next start
    assert creds.ensure_admin_token("fixed-token-abc") is None
    assert creds.lookup_admin_token("fixed-token-abc") is None
    assert creds.lookup_admin_token(token) == info.token_id
    with pytest.raises(NotFound):
        creds.revoke_admin_token("0" * 16)
    listed = {t.token_id: t.to_json()["status"] for t in creds.list_admin_tokens()}
    assert listed == {info.token_id: "active", fixed_id: "revoked"}
    text = _all_text(store, "admin_tokens")
    assert token not in text and "fixed-token-abc" not in text


def test_keys_looked_up_by_hash_in_one_read_agree_with_one_by_one(store: Store) -> None:
    """``lookup_api_key_hashes`` (the API cache's background re-check) answers like
    ``lookup_api_key`` for keys that are valid, revoked, expired, expiring later, rotated, and
    for a hash asked under the wrong tenant."""
    repo = Repo(store)
    a, a_key = repo.create_tenant("acme")
    b, b_key = repo.create_tenant("globex")
    creds = repo.credentials
    _i1, revoked = creds.create_api_key(a.tenant_id, "revoked")
    creds.revoke_api_key(a.tenant_id, _i1.key_id)
    _i2, later = creds.create_api_key(a.tenant_id, "later", utc_now() + timedelta(days=3))
    old_id = creds.list_api_keys(b.tenant_id)[0].key_id
    _new, b_new, _old = creds.rotate_api_key(b.tenant_id, old_id, timedelta(hours=2))
    _i3, expired = creds.create_api_key(b.tenant_id, "short")
    creds.rotate_api_key(b.tenant_id, _i3.key_id, timedelta(0))
    keys = {a.tenant_id: [a_key, revoked, later], b.tenant_id: [b_key, b_new, expired]}
    pairs = [(t, hash_secret(k)) for t, ks in keys.items() for k in ks]
    pairs.append((b.tenant_id, hash_secret(a_key)))  # a's key under b: not b's
    got = creds.lookup_api_key_hashes(pairs)
    want = {
        hash_secret(k): m
        for ks in keys.values()
        for k in ks
        if (m := creds.lookup_api_key(k)) is not None
    }
    assert got == want
    assert set(got) == {hash_secret(k) for k in (a_key, later, b_key, b_new)}
    assert got[hash_secret(b_key)].expires_ms is not None  # the rotation's overlap end
    assert creds.lookup_api_key_hashes([(b.tenant_id, hash_secret(a_key))]) == {}
    assert creds.lookup_api_key_hashes([]) == {}
