"""Secrets that Tally must be able to read back (Segment webhook shared secrets), sealed at rest.

An HMAC can only be verified with the secret itself, so such a secret cannot be stored as a hash
like an API key. It is sealed with Fernet (AES-128-CBC + HMAC-SHA256, from ``cryptography``)
under the server's ``secrets_key`` before it is written to ClickHouse: a copy of the database (a
backup, a replica, a leaked dump) does not reveal it without the key, which lives outside the
database (``TALLY_SECRETS_KEY``; embedded mode: ``<data_dir>/secrets.key``, mode 0600).

``secrets_key`` may hold several comma-separated keys: the first seals, every one opens, so the
key can be rotated (put the new key first, keep the old one until every secret was re-set).
Nothing here logs; callers never log a plaintext or a key either.
"""

from __future__ import annotations

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from tally.errors import NotConfigured


def generate_key() -> str:
    return Fernet.generate_key().decode("ascii")


class SecretBox:
    def __init__(self, keys: str) -> None:
        parts = [k.strip() for k in keys.split(",") if k.strip()]
        if not parts:
            raise NotConfigured(
                "this server has no secrets key, so it cannot store a webhook secret: set "
                "TALLY_SECRETS_KEY (the same value on every API replica; create one with "
                "`tally secrets-key`)"
            )
        try:
            self._fernet = MultiFernet([Fernet(k.encode("ascii")) for k in parts])
        except (ValueError, UnicodeEncodeError):
            raise NotConfigured(
                "TALLY_SECRETS_KEY is not valid: expected comma-separated Fernet keys "
                "(32 url-safe base64-encoded bytes each; create one with `tally secrets-key`)"
            ) from None

    def seal(self, plaintext: str) -> str:
        return self._fernet.encrypt(plaintext.encode("utf-8")).decode("ascii")

    def open(self, sealed: str) -> str | None:
        """The plaintext, or None if no configured key opens it (e.g. the key was replaced)."""
        try:
            return self._fernet.decrypt(sealed.encode("ascii")).decode("utf-8")
        except (InvalidToken, UnicodeError):
            return None
