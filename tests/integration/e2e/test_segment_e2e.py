"""Segment senders against a running `tally run`: the real `segment-analytics-python` library
(through a fault-injecting proxy, so that its retries run) and the webhook destination.
Totals are compared with a ground truth computed here from the sent messages."""

from __future__ import annotations

import hashlib
import hmac
import logging
import random
from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import orjson
import pytest
from segment.analytics.client import Client as SegmentClient

from tests.integration.e2e.harness import TallyProcess, create_tenant, start_embedded
from tests.support.faultproxy import FaultProxy


@pytest.fixture(scope="module")
def tally(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("segment-e2e")
    proc: TallyProcess
    proc, url = start_embedded(tmp / "data", tmp / "tally.log")
    try:
        yield url
    finally:
        assert proc.terminate() == 0, proc.tail()


def _h(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _meters(url: str, key: str) -> None:
    for m in (
        {"slug": "calls", "event_type": "api.call", "aggregation": "count"},
        {"slug": "units", "event_type": "api.call", "aggregation": "sum",
         "value_property": "$.units"},
        {"slug": "signups", "event_type": "Signed Up", "aggregation": "count"},
    ):  # fmt: skip
        r = httpx.post(url + "/v1/meters", json=m, headers=_h(key), timeout=30)
        assert r.status_code == 201, r.text


def _usage(url: str, key: str, slug: str) -> dict[str, Decimal]:
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    r = httpx.get(
        f"{url}/v1/meters/{slug}/usage",
        params={
            "from": (now - timedelta(days=2)).isoformat(),
            "to": (now + timedelta(minutes=10)).isoformat(),
            "group_by": "customer",
        },
        headers=_h(key),
        timeout=30,
    )
    assert r.status_code == 200, r.text
    return {row["customer"]: Decimal(row["value"]) for row in r.json()["data"]}


def test_segment_library_with_retries_counts_every_message_once(tally: str) -> None:
    key = create_tenant(tally, "segment-sdk")
    _meters(tally, key)
    rnd = random.Random(17)
    now = datetime.now(UTC)
    calls: Counter[str] = Counter()
    units: defaultdict[str, Decimal] = defaultdict(Decimal)
    signups: Counter[str] = Counter()
    errors: list[tuple[Exception, Any]] = []
    with FaultProxy(tally) as proxy:
        # Faults on the batch endpoint: a 503 with Retry-After (the library re-queues and waits),
        # answers lost after Tally stored the batch (the library resends the same messageIds),
        # and 502s without Retry-After (counted retries with backoff).
        proxy.add("unavailable", prefix="/v1/batch", count=3, retry_after=1)
        proxy.add("lose", prefix="/v1/batch", count=4)
        proxy.add("bad_gateway", prefix="/v1/batch", count=2)
        client = SegmentClient(
            write_key=key,
            host=proxy.url,
            gzip=True,
            upload_size=40,
            upload_interval=0.05,
            max_retries=10,
            on_error=lambda exc, batch: errors.append((exc, batch)),
        )
        logging.getLogger("segment").setLevel(logging.CRITICAL)
        for i in range(1200):
            user = f"user-{rnd.randrange(9)}"
            when = now - timedelta(minutes=rnd.randrange(0, 600), milliseconds=i)
            if i % 10 == 0:
                client.identify(user_id=user, traits={"plan": "pro"})
                client.page(user_id=user, name="Pricing")
            if i % 25 == 0:
                client.track(user_id=user, event="Signed Up", timestamp=when)
                signups[user] += 1
                continue
            n = rnd.randrange(1, 500)
            client.track(
                user_id=user,
                event="api.call",
                properties={"units": n, "endpoint": rnd.choice(["/a", "/b"])},
                timestamp=when,
            )
            calls[user] += 1
            units[user] += n
        client.flush()
        client.join()
        stats = dict(proxy.injected)
        batch_requests = sum(1 for _m, p, _s in proxy.requests if p.startswith("/v1/batch"))
    assert errors == [], errors[:3]
    assert stats == {"unavailable": 3, "lose": 4, "bad_gateway": 2}, stats
    assert batch_requests >= 1200 // 40 + 9  # every fault was followed by a resend
    assert _usage(tally, key, "calls") == {u: Decimal(n) for u, n in calls.items()}
    assert _usage(tally, key, "units") == dict(units)
    assert _usage(tally, key, "signups") == {u: Decimal(n) for u, n in signups.items()}
    metrics = httpx.get(tally + "/metrics", timeout=30).text
    assert 'tally_segment_messages_ignored_total{type="identify"}' in metrics


def _sign(secret: str, body: bytes) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha1).hexdigest()


def test_webhook_destination_counts_each_message_once(tally: str) -> None:
    key = create_tenant(tally, "segment-webhook")
    _meters(tally, key)
    r = httpx.put(
        tally + "/v1/segment/config",
        json={"customer_property": "context.groupId", "fallback_to_user_id": True},
        headers=_h(key),
        timeout=30,
    )
    assert r.status_code == 200, r.text
    r = httpx.post(tally + "/v1/segment/webhook-secret", headers=_h(key), timeout=30)
    assert r.status_code == 200, r.text
    secret, path = r.json()["secret"], r.json()["webhook"]["path"]
    rnd = random.Random(5)
    now = datetime.now(UTC)
    expected: Counter[str] = Counter()
    bodies: list[bytes] = []
    for i in range(120):
        account = f"acct-{rnd.randrange(4)}"
        msg = {
            "type": "track",
            "messageId": f"wh-{i}",
            "userId": f"user-{i}",
            "event": "api.call",
            "properties": {"units": 1},
            "context": {"groupId": account} if i % 3 else {},
            "timestamp": (now - timedelta(seconds=i)).isoformat(),
            "receivedAt": now.isoformat(),
        }
        expected[account if i % 3 else f"user-{i}"] += 1
        bodies += [orjson.dumps(msg)] * (1 + (i % 4 == 0))  # every 4th message replayed
        bodies.append(orjson.dumps({"type": "identify", "userId": "u", "messageId": f"id-{i}"}))
    rnd.shuffle(bodies)

    def deliver(body: bytes) -> tuple[int, int, int]:
        """Like Segment: one message per POST, several in flight at once."""
        with httpx.Client(base_url=tally, timeout=60) as http:
            forged = http.post(path, content=body, headers={"X-Signature": _sign("x" * 20, body)})
            r = http.post(path, content=body, headers={"X-Signature": _sign(secret, body)})
            assert r.status_code == 200, r.text
            return forged.status_code, r.json()["accepted"], r.json()["ignored"]

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(deliver, bodies))
    assert {a[0] for a in answers} == {401}
    assert sum(a[1] for a in answers) == 150 and sum(a[2] for a in answers) == 120
    refused = len(answers)
    assert _usage(tally, key, "calls") == {c: Decimal(n) for c, n in expected.items()}
    assert sum(expected.values()) == 120
    metrics = httpx.get(tally + "/metrics", timeout=30).text
    assert f'tally_segment_webhook_refused_total{{reason="bad_signature"}} {refused}.0' in metrics
