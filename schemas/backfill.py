"""Backfill records shared by ``streams.backfill`` (the run) and ``clickhouse.backfill`` (the store).

See ``streams.backfill`` for the protocol; docs/architecture.md, "Backfill".
"""

from __future__ import annotations

from dataclasses import dataclass, field

import orjson

ALL_OFFSETS = (1 << 63) - 1  # the bound of a partition without an activation row (dead topic)

RUNNING = "running"
COMPLETE = "complete"
FAILED = "failed"
NOTHING_TO_DO = "nothing_to_backfill"


def origin_of(run_id: str) -> str:
    return f"b:{run_id}"


# --- the boundary (pure) ---------------------------------------------------------------------


@dataclass(frozen=True)
class Boundary:
    """The backfill side of a meter's activation boundary.

    ``older``: the ledger's topics ordered before ``topic`` (all their events count);
    ``bounds``: partition -> first marker offset in ``topic`` (events before it count); a
    partition of ``topic`` without a bound contributes all its events.
    """

    topic: str
    older: tuple[str, ...] = ()
    bounds: dict[int, int] = field(default_factory=dict)

    def includes(self, topic: str, partition: int, offset: int) -> bool:
        """The predicate the scan implements in SQL (``clickhouse.backfill.boundary_sql``), for an
        event of the ledger (whose topic is among those ``make_boundary`` was given)."""
        if topic in self.older:
            return True
        return topic == self.topic and offset < self.bounds.get(partition, ALL_OFFSETS)

    def to_json(self) -> str:
        return orjson.dumps(
            {
                "topic": self.topic,
                "older": list(self.older),
                "bounds": {str(p): o for p, o in sorted(self.bounds.items())},
            }
        ).decode()

    @classmethod
    def from_json(cls, text: str) -> Boundary:
        doc = orjson.loads(text)
        return cls(
            topic=str(doc["topic"]),
            older=tuple(str(t) for t in doc["older"]),
            bounds={int(p): int(o) for p, o in doc["bounds"].items()},
        )


# --- records ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class LockRow:
    tenant_id: str
    meter_id: str
    seq: int
    run_id: str
    owner: str
    acquired_ms: int


@dataclass(frozen=True)
class RunRecord:
    """One run of a meter (a row of ``backfill_runs``; the newest version counts)."""

    tenant_id: str
    meter_id: str
    run_id: str
    state: str = RUNNING
    owner: str = ""
    boundary: Boundary | None = None
    chunk_events: int = 0
    events_total: int = 0
    events_scanned: int = 0
    events_matched: int = 0
    value_problems: int = 0
    windows: int = 0
    chunks: int = 0
    error: str = ""
    started_ms: int = 0
    heartbeat_ms: int = 0
    finished_ms: int = 0
    version: int = 0
    corrections_seq: int = 0  # the run applies corrections with 1 <= seq <= this in its scan


@dataclass(frozen=True)
class Checkpoint:
    """Stored with chunk ``chunk`` (1-based): the keyset position after it and its counters."""

    chunk: int
    last_event_id: str
    scanned: int
    matched: int
    problems: int
