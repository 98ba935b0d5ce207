"""Abuse resistance: a flood of random, well-formed API keys (from one address and from many
spoofed ones) while a real client ingests, against a real uvicorn server, Tansu and chDB with the
embedded mode's serialised store. The real client is served; the store sees a bounded number of
lookups; the flood gets 401/429, never a 5xx."""

from __future__ import annotations

import random
import secrets
import threading
import time
from collections import Counter
from typing import Any

import httpx

from api.app import create_app
from api.producer import EventProducer
from clickhouse.repo import Repo

from .conftest import consume_all, make_settings
from .test_openmeter_sdk import ServerThread

DURATION_S = 6.0
LOOKUPS_PER_S = 20.0


def _metric(text: str, name: str) -> float:
    total = 0.0
    for ln in text.splitlines():
        if ln.startswith(name):
            total += float(ln.split()[-1])
    return total


def test_random_key_flood_does_not_starve_a_real_client(
    broker: Any,
    topic: str,
    store: Any,
    repo: Repo,
    producer: EventProducer,
    tenant: tuple[str, str],
) -> None:
    tenant_id, key = tenant
    settings = make_settings(
        broker,
        topic,
        auth_positive_ttl_s=1.0,  # the real key is re-checked several times during the flood
        auth_lookups_per_s=LOOKUPS_PER_S,
        max_events_per_request=100,
    )
    app = create_app(settings, store, producer=producer, progress_waiter=None, repo=repo)
    stop = threading.Event()
    flood_codes: Counter[int] = Counter()
    real_codes: Counter[int] = Counter()
    real_latency: list[float] = []
    sent_ids: list[str] = []
    lock = threading.Lock()

    def flood(n: int, spoof: bool) -> None:
        rnd = random.Random(n)
        with httpx.Client(base_url=server.url, timeout=30) as c:
            while not stop.is_set():
                tid = (
                    tenant_id
                    if rnd.random() < 0.5
                    else secrets.token_hex(6).translate(str.maketrans("0189", "abcd"))
                )
                k = f"tly_{tid}_{secrets.token_urlsafe(32)}"
                headers = {"Authorization": f"Bearer {k}"}
                if spoof:
                    headers["X-Forwarded-For"] = f"10.{rnd.randrange(256)}.{rnd.randrange(256)}.7"
                if rnd.random() < 0.5:
                    r = c.get("/v1/meters", headers=headers)
                else:
                    r = c.post(
                        "/v1/events",
                        json=[{"id": "x", "type": "t", "customer": "c"}],
                        headers=headers,
                    )
                with lock:
                    flood_codes[r.status_code] += 1

    def real() -> None:
        i = 0
        with httpx.Client(base_url=server.url, timeout=30) as c:
            while not stop.is_set():
                batch = [{"id": f"real-{i}-{j}", "type": "t", "customer": "c"} for j in range(20)]
                t0 = time.perf_counter()
                r = c.post("/v1/events", json=batch, headers={"Authorization": f"Bearer {key}"})
                real_latency.append(time.perf_counter() - t0)
                real_codes[r.status_code] += 1
                if r.status_code == 202:
                    sent_ids.extend(e["id"] for e in batch)
                i += 1
                time.sleep(0.05)

    with ServerThread(app) as server:
        with httpx.Client(base_url=server.url) as c:  # the real key is known before the flood
            assert (
                c.get("/v1/meters", headers={"Authorization": f"Bearer {key}"}).status_code == 200
            )
            before = _metric(c.get("/metrics").text, 'tally_auth_store_lookups_total{kind="k"}')
        threads = [threading.Thread(target=flood, args=(n, n % 2 == 1)) for n in range(6)]
        threads.append(threading.Thread(target=real))
        t0 = time.monotonic()
        for t in threads:
            t.start()
        time.sleep(DURATION_S)
        stop.set()
        for t in threads:
            t.join(60)
        elapsed = time.monotonic() - t0
        text = httpx.get(server.url + "/metrics").text
    lookups = _metric(text, 'tally_auth_store_lookups_total{kind="k"}') - before
    flood_total = sum(flood_codes.values())
    real_latency.sort()
    print(
        f"\nflood: {flood_total} requests in {elapsed:.1f}s {dict(flood_codes)}; "
        f"store lookups: {lookups:.0f}; real client: {dict(real_codes)}, latency p50 "
        f"{real_latency[len(real_latency) // 2] * 1000:.1f} ms, max {real_latency[-1] * 1000:.1f} ms"
    )
    # the real client was served every time
    assert set(real_codes) == {202} and real_codes[202] >= 10
    # the flood never caused a server error and was mostly refused without a lookup
    assert flood_total > lookups * 3, (flood_total, lookups)
    assert set(flood_codes) <= {401, 429}, flood_codes
    assert flood_codes[429] > 0
    # store lookups: the global budget (+ its burst) + the real key's re-checks (1 per TTL)
    assert lookups <= LOOKUPS_PER_S * (elapsed + 1) + (elapsed / 1.0 + 2), lookups
    got = consume_all(broker.bootstrap, topic, len(sent_ids), timeout=20)
    stored = {e.id for *_, env in got for e in env.events}
    assert stored == set(sent_ids)
