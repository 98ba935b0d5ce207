"""Webhook signatures (pure): HMAC-SHA256 over "<timestamp>." + body."""

from __future__ import annotations

import hashlib
import hmac

from billing.webhooks import sign, verify


def test_signature_is_hmac_sha256_over_timestamp_and_body() -> None:
    body = b'{"id":"evt_1"}'
    sig = sign("whsec_abc", 1700000000, body)
    want = hmac.new(b"whsec_abc", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert sig == "v1=" + want
    assert verify("whsec_abc", "1700000000", body, sig, now=1700000100)
    assert not verify("whsec_abc", "1700000000", body + b" ", sig, now=1700000100)
    assert not verify("whsec_other", "1700000000", body, sig, now=1700000100)
    assert not verify("whsec_abc", "1700000000", body, sig, now=1700009999)  # too old
    assert not verify("whsec_abc", "not-a-number", body, sig)
