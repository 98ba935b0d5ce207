"""The official `openmeter` SDK, unmodified, ingests into and queries a running `tally run`."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
from openmeter import Client

from tests.integration.e2e.harness import create_tenant, start_embedded


def test_openmeter_sdk_round_trip_through_the_whole_pipeline(tmp_path: Path) -> None:
    proc, url = start_embedded(tmp_path / "data", tmp_path / "tally.log")
    try:
        key = create_tenant(url, "sdk")
        r = httpx.post(
            url + "/v1/meters",
            headers={"Authorization": f"Bearer {key}"},
            json={
                "slug": "tokens",
                "eventType": "prompt",
                "aggregation": "SUM",
                "valueProperty": "$.tokens",
                "groupBy": {"model": "$.model"},
            },
        )
        assert r.status_code == 201, r.text
        client = Client(endpoint=url, token=key)
        now = datetime.now(UTC).replace(second=0, microsecond=0)
        events = [
            {
                "specversion": "1.0",
                "id": f"sdk-{i}",
                "source": "tests",
                "type": "prompt",
                "subject": "customer-1" if i % 3 else "customer-2",
                "time": (now - timedelta(minutes=i)).isoformat(),
                "data": {"tokens": 10 * i + 1, "model": "small" if i % 2 else "large"},
            }
            for i in range(30)
        ]
        client.events.ingest_events(events[:20])
        client.events.ingest_events(events[10:])  # overlapping retry: ids 10..19 twice
        expected: dict[tuple[str, str], float] = {}
        for e in events:
            k = (e["subject"], e["data"]["model"])
            expected[k] = expected.get(k, 0) + e["data"]["tokens"]

        deadline = time.monotonic() + 10
        while True:
            res = client.meters.query_json(
                "tokens",
                from_parameter=now - timedelta(hours=1),
                to=now + timedelta(minutes=5),
                group_by=["subject", "model"],
            )
            got = {(row.subject, row.group_by["model"]): row.value for row in res.data}
            if got == expected or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert got == expected
    finally:
        proc.terminate()
