"""`tally run` end to end: HTTP ingest → Tansu → Faust worker → chDB → usage queries."""

from __future__ import annotations

import random
from pathlib import Path

import httpx

from tests.integration.e2e.harness import (
    RetryingClient,
    Workload,
    assert_matches,
    create_meters,
    create_tenant,
    query_all,
    start_embedded,
)


def test_every_aggregation_matches_ground_truth_with_duplicates_retries_and_late_events(
    tmp_path: Path,
) -> None:
    proc, url = start_embedded(tmp_path / "data", tmp_path / "tally.log")
    try:
        key = create_tenant(url, "acme")
        other = create_tenant(url, "globex")
        create_meters(url, key)
        create_meters(url, other)
        wl = Workload(seed=11, n_unique=3000).generate()
        client = RetryingClient(key, lambda: url)
        rnd = random.Random(5)
        batches = [wl.events[i : i + 250] for i in range(0, len(wl.events), 250)]
        for batch in batches:
            client.send(batch)
            if rnd.random() < 0.3:  # a client retry of a whole acknowledged batch
                client.send(batch)
        # wait=stored (the embedded default): acknowledged means queryable, no polling needed.
        assert_matches(query_all(url, key, wl), wl.truth())
        # The other tenant sent nothing and sees nothing.
        r = httpx.get(
            f"{url}/v1/meters/calls/usage",
            params={"from": wl.window[0], "to": wl.window[1]},
            headers={"Authorization": f"Bearer {other}"},
        )
        assert r.status_code == 200, r.text
        assert all(row["value"] in (None, "0", 0) for row in r.json()["data"]), r.text
        assert proc.terminate() == 0, proc.tail()

        # Restart on the same data directory: everything is still there, and re-sending the
        # whole workload (all ids already stored) changes nothing.
        proc, url = start_embedded(tmp_path / "data", tmp_path / "tally2.log")
        client = RetryingClient(key, lambda: url)
        for batch in batches[:4]:
            client.send(batch)
        assert_matches(query_all(url, key, wl), wl.truth())
    finally:
        if proc.alive():
            proc.terminate()
