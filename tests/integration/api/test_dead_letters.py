"""Dead letters end to end (real Tansu broker, real chDB, the real worker and API):

- poison messages on a partition land in the dead-letter table with tenant, reason and source
  position, and never block the partition: the good messages around them are stored;
- the admin lists them (with a payload excerpt), a tenant sees only its own, the one error shape
  when a re-drive is refused because the payload is still bad;
- after a fix (a worker fault injected into the decode path, then removed), re-driving produces
  the payload to the events topic again and its events are counted exactly once: a re-drive of
  events that also got in another way, or a second re-drive, double counts nothing.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from confluent_kafka import Producer

import streams.processor as processor
from clickhouse.sink import ClickHouseSink
from schemas.envelope import EnvelopeError, partition_for
from schemas.timeutil import epoch_ms, utc_now
from tests.integration.api.live import Live, live_tally


def _produce(live: Live, bootstrap: str, partition: int, payloads: list[bytes]) -> list[int]:
    """Produce raw messages to one partition, in order; their offsets."""
    p = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    offsets: list[int] = []
    errors: list[Any] = []

    def done(err: Any, msg: Any) -> None:
        if err is not None:
            errors.append(err)
        else:
            offsets.append(int(msg.offset()))

    for payload in payloads:
        p.produce(live.settings.events_topic, value=payload, partition=partition, on_delivery=done)
        p.flush(30)  # one at a time: offsets in order
    assert not errors, errors
    return offsets


def _envelope(tenant: str, events: list[tuple[str, Any]], **over: Any) -> bytes:
    now = epoch_ms(utc_now())
    doc: dict[str, Any] = {
        "v": 1,
        "t": tenant,
        "at": now,
        "e": [[eid, "api", "c1", t if t is not None else now - 1000, {}] for eid, t in events],
    }
    doc.update(over)
    return orjson.dumps(doc)


def _wait_stored(live: Live, targets: dict[int, int], timeout: float = 120) -> None:
    sink = ClickHouseSink(live.store)
    topic = live.settings.events_topic
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        progress = sink.progress(topic)
        if all(progress.get(p, -1) >= o for p, o in targets.items()):
            return
        time.sleep(0.2)
    raise AssertionError(f"not stored up to {targets}: {sink.progress(topic)}")


def _stored_ids(live: Live, tenant: str) -> list[str]:
    db = live.store.database
    rows = live.store.query_rows(
        f"SELECT event_id FROM {db}.events FINAL WHERE tenant_id = {{t:String}} ORDER BY 1",
        {"t": tenant},
    )
    return [str(r[0]) for r in rows]


def _counted(live: Live, tenant: str, meter_id: str) -> int:
    db = live.store.database
    ((n,),) = live.store.query_rows(
        f"SELECT sum(events) FROM {db}.usage_minute WHERE tenant_id = {{t:String}} "
        "AND meter_id = {m:String}",
        {"t": tenant, "m": meter_id},
    )
    return int(n or 0)


def _tenant(c: httpx.Client, live: Live, name: str) -> tuple[str, dict[str, str]]:
    r = c.post("/v1/admin/tenants", json={"name": name}, headers=live.admin)
    assert r.status_code == 201, r.text
    body = r.json()
    return body["tenant_id"], {"Authorization": f"Bearer {body['api_key']}"}


def _meter(c: httpx.Client, key: dict[str, str]) -> str:
    r = c.post(
        "/v1/meters",
        json={"slug": "calls", "event_type": "api", "aggregation": "count"},
        headers=key,
    )
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def _assert_error_shape(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"] == code and isinstance(body["message"], str)
    assert isinstance(body["details"], list) and body["details"]
    assert all(set(d) >= {"field", "message"} for d in body["details"])
    return dict(body)


def test_poison_messages_become_dead_letters_without_blocking_their_partition(
    broker: Any, topic: str, store: Any, unique: str, tmp_path: Path
) -> None:
    with (
        live_tally(broker, topic, store, unique, tmp_path) as live,
        httpx.Client(base_url=live.url, timeout=60) as c,
    ):
        tenant, key = _tenant(c, live, "acme")
        other, other_key = _tenant(c, live, "globex")
        meter_id = _meter(c, key)
        time.sleep(0.05)  # events strictly after the meter
        payloads = [
            _envelope(tenant, [("a1", None), ("a2", None)]),
            b"{not json at all",
            _envelope(tenant, [("u1", None)], v=3),  # a version this worker does not read
            _envelope(tenant, [("g1", None), ("bad", "yesterday"), ("g2", None)]),
            _envelope(other, [("o1", None)], at="soon"),
            b"",
            _envelope(tenant, [("b1", None)]),
        ]
        offsets = _produce(live, broker.bootstrap, 2, payloads)
        _wait_stored(live, {2: offsets[-1]})

        # the partition went on: every good event around the poison is stored and counted
        assert _stored_ids(live, tenant) == ["a1", "a2", "b1", "g1", "g2"]
        assert _counted(live, tenant, meter_id) == 5

        r = c.get("/v1/admin/dead-letters", headers=live.admin)
        assert r.status_code == 200, r.text
        letters = r.json()["data"]
        got = {
            (d["source"]["offset"], d["source"]["index"]): (d["reason"], d["tenant_id"])
            for d in letters
        }
        assert got == {
            (offsets[1], None): ("undecodable", None),
            (offsets[2], None): ("unsupported_version", tenant),
            (offsets[3], 1): ("invalid_event", tenant),
            (offsets[4], None): ("invalid_envelope", other),
            (offsets[5], None): ("empty_message", None),
        }
        for d in letters:
            assert d["source"]["topic"] == live.settings.events_topic
            assert d["source"]["partition"] == 2
            assert d["redrives"] == 0 and d["produced_at"] is not None
        by_reason = {d["reason"]: d for d in letters}
        assert by_reason["undecodable"]["payload_excerpt"] == "{not json at all"
        assert '"bad"' in by_reason["invalid_event"]["payload_excerpt"]
        assert by_reason["invalid_event"]["event_id"] == "bad"
        assert by_reason["empty_message"]["redrivable"] is False

        # a tenant sees its own dead letters only; another's id is a 404
        mine = c.get("/v1/dead-letters", headers=key).json()["data"]
        assert {d["reason"] for d in mine} == {"unsupported_version", "invalid_event"}
        theirs = c.get("/v1/dead-letters", headers=other_key).json()["data"]
        assert [d["reason"] for d in theirs] == ["invalid_envelope"]
        dl = by_reason["invalid_event"]["id"]
        one = c.get(f"/v1/dead-letters/{dl}", headers=key).json()
        assert orjson.loads(one["payload"])["e"][0][0] == "bad"
        _assert_error_shape(c.get(f"/v1/dead-letters/{dl}", headers=other_key), 404, "not_found")
        r = c.get("/v1/admin/dead-letters?reason=nope", headers=live.admin)
        assert _assert_error_shape(r, 400, "invalid_request")["details"][0]["field"] == "reason"

        # without a fix, a re-drive is refused and says why (nothing is produced)
        for reason in ("undecodable", "unsupported_version", "invalid_event", "empty_message"):
            r = c.post(
                f"/v1/admin/dead-letters/{by_reason[reason]['id']}/redrive", headers=live.admin
            )
            _assert_error_shape(r, 409, "conflict")
        r = c.get("/v1/admin/dead-letters?redriven=true", headers=live.admin)
        assert r.json()["data"] == []
        assert _counted(live, tenant, meter_id) == 5


@pytest.fixture
def worker_fault(monkeypatch: pytest.MonkeyPatch) -> dict[str, bool]:
    """A worker bug, injected: while armed, the worker's decoder refuses every envelope that
    holds an event id starting with ``bug-`` (as a worker of an older version might)."""
    armed = {"on": True}
    real = processor.decode_columns

    def faulty(payload: bytes) -> Any:
        if armed["on"] and b'"bug-' in payload:
            tenant = orjson.loads(payload.partition(b"\n")[0]).get("t", "")  # the header line
            raise EnvelopeError("injected worker fault", "invalid_envelope", tenant)
        return real(payload)

    monkeypatch.setattr(processor, "decode_columns", faulty)
    return armed


def test_redrive_after_a_fix_counts_every_event_exactly_once(
    broker: Any, topic: str, store: Any, unique: str, tmp_path: Path, worker_fault: dict[str, bool]
) -> None:
    with (
        live_tally(broker, topic, store, unique, tmp_path) as live,
        httpx.Client(base_url=live.url, timeout=60) as c,
    ):
        tenant, key = _tenant(c, live, "acme")
        meter_id = _meter(c, key)
        time.sleep(0.05)
        # through the API: two messages the faulty worker turns into dead letters, one fine
        # (bug-1 and its neighbour share a partition, so they travel in one message)
        part = partition_for(tenant, "bug-1", 4)
        twin = next(
            f"bug-{j}" for j in range(2, 999) if partition_for(tenant, f"bug-{j}", 4) == part
        )
        lone = next(
            f"bug-{j}" for j in range(2, 999) if partition_for(tenant, f"bug-{j}", 4) != part
        )
        now = utc_now().isoformat()
        for batch in (["bug-1", twin], [lone], ["ok-1"]):
            r = c.post(
                "/v1/events",
                json=[{"id": i, "type": "api", "customer": "c1", "time": now} for i in batch],
                headers=key,
            )
            assert r.status_code == 202, r.text
        deadline = time.monotonic() + 120
        while True:
            letters = c.get("/v1/admin/dead-letters", headers=live.admin).json()["data"]
            if len(letters) == 2 and "ok-1" in _stored_ids(live, tenant):
                break
            assert time.monotonic() < deadline, (letters, _stored_ids(live, tenant))
            time.sleep(0.3)
        assert _stored_ids(live, tenant) == ["ok-1"]
        assert {d["reason"] for d in letters} == {"invalid_envelope"}
        assert all(d["redrivable"] for d in letters)

        # the fix is deployed; meanwhile the client re-sent the twin itself
        worker_fault["on"] = False
        r = c.post(
            "/v1/events?wait=stored",
            json={"id": twin, "type": "api", "customer": "c1", "time": now},
            headers=key,
        )
        assert r.status_code == 202, r.text
        assert _counted(live, tenant, meter_id) == 2

        first = next(d for d in letters if '"bug-1"' in d["payload_excerpt"])
        r = c.post(f"/v1/admin/dead-letters/{first['id']}/redrive", headers=live.admin)
        assert r.status_code == 200, r.text
        done = r.json()
        assert done["events"] == 2 and done["topic"] == live.settings.events_topic
        _wait_stored(live, {p["partition"]: p["offset"] for p in done["positions"]})
        assert _stored_ids(live, tenant) == sorted(["bug-1", twin, "ok-1"])
        assert _counted(live, tenant, meter_id) == 3  # the twin counted once

        # a second re-drive of the same dead letter, then the bulk re-drive of the rest
        r = c.post(f"/v1/admin/dead-letters/{first['id']}/redrive", headers=live.admin)
        assert r.status_code == 200, r.text
        again = r.json()["positions"]
        r = c.post("/v1/admin/dead-letters/redrive", json={"tenant_id": tenant}, headers=live.admin)
        assert r.status_code == 200, r.text
        bulk = r.json()
        assert [d["id"] for d in bulk["redriven"]] == [
            d["id"] for d in letters if d["id"] != first["id"]
        ]
        assert bulk["refused"] == []
        targets: dict[int, int] = {}
        for p in again + [p for d in bulk["redriven"] for p in d["positions"]]:
            targets[p["partition"]] = max(targets.get(p["partition"], -1), p["offset"])
        _wait_stored(live, targets)
        assert _stored_ids(live, tenant) == sorted(["bug-1", twin, lone, "ok-1"])
        assert _counted(live, tenant, meter_id) == 4

        listed = c.get("/v1/admin/dead-letters?redriven=true", headers=live.admin).json()["data"]
        assert {d["id"]: d["redrives"] for d in listed} == {
            first["id"]: 2,
            **{d["id"]: 1 for d in bulk["redriven"]},
        }
        r = c.post("/v1/admin/dead-letters/redrive", json={}, headers=live.admin)
        assert r.json() == {"redriven": [], "refused": []}  # nothing left that was not re-driven
