"""Group validated rows into envelopes without building pydantic ``Event`` objects.

Same partitioning (``schemas.envelope.partition_for``), same wire format and same splitting as
``schemas.envelope.group`` -- a unit test asserts byte equality with it -- but ~3x cheaper per
event because the rows already carry the epoch ms and no model is constructed.
"""

from __future__ import annotations

import zlib

import orjson

from api.ingest_parse import Row
from schemas.envelope import VERSION, OutgoingEnvelope


def group_rows(
    tenant_id: str,
    ingested_at_ms: int,
    rows: list[Row],
    partitions: int,
    max_events: int = 1000,
) -> list[OutgoingEnvelope]:
    """Envelopes per target partition (ascending), each with at most ``max_events`` events."""
    prefix = f"{tenant_id}\x00"
    crc = zlib.crc32
    by_partition: dict[int, list[Row]] = {}
    for row in rows:
        part = crc((prefix + row[0]).encode()) % partitions
        bucket = by_partition.get(part)
        if bucket is None:
            by_partition[part] = [row]
        else:
            bucket.append(row)
    out: list[OutgoingEnvelope] = []
    for part in sorted(by_partition):
        evs = by_partition[part]
        for i in range(0, len(evs), max_events):
            chunk = evs[i : i + max_events]
            payload = orjson.dumps({"v": VERSION, "t": tenant_id, "at": ingested_at_ms, "e": chunk})
            out.append(OutgoingEnvelope(part, payload, tuple(r[0] for r in chunk)))
    return out
