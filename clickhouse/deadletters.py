"""Dead letters (``dead_letters``, ``dead_letter_redrives``; migration 065).

``DeadLetterRows`` is mixed into ``clickhouse.sink.ClickHouseSink``: the worker writes its rows
(``schemas.deadletters.DEAD_LETTER_COLUMNS``) at step (b) of a flush. ``DeadLetterRepo`` is what
the API reads and records re-drives with. Every read is scoped by tenant unless the caller is the
admin API (``tenant_id=None``: all tenants, including dead letters without a known tenant).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from schemas.deadletters import DEAD_LETTER_COLUMNS, DeadLetterRow
from schemas.timeutil import utc_now

if TYPE_CHECKING:
    from clickhouse.store import Store

REDRIVE_COLUMNS = [
    "tenant_id",
    "dead_letter_id",
    "redriven_at",
    "actor",
    "target_topic",
    "messages",
    "events",
]


class DeadLetterRows:
    """``record_dead_letters`` of ``streams.sink.Sink`` (needs ``self.store``)."""

    store: Store

    def record_dead_letters(self, rows: list[DeadLetterRow]) -> None:
        """Insert dead-letter rows (idempotent: a replay writes identical rows, collapsed)."""
        if rows:
            self.store.insert("dead_letters", list(rows), DEAD_LETTER_COLUMNS)


@dataclass(frozen=True)
class DeadLetterRecord:
    tenant_id: str
    dead_letter_id: str
    reason: str
    message: str
    topic: str
    partition: int
    offset: int
    index: int
    event_id: str
    meter_id: str
    payload_bytes: int
    payload_truncated: bool
    produced_at_ms: int
    redrives: int
    last_redriven_at: datetime | None
    payload_excerpt: bytes = b""  # the first EXCERPT_BYTES bytes of the payload
    payload: bytes | None = None  # only when asked for


EXCERPT_BYTES = 200  # bytes of the payload a listed dead letter shows

_FIELDS = (
    "d.tenant_id, d.dead_letter_id, d.reason, d.message, d.source_topic, d.source_partition, "
    "d.source_offset, d.source_index, d.event_id, d.meter_id, d.payload_bytes, "
    "d.payload_truncated, d.produced_at_ms, ifNull(r.n, 0), r.last, "
    f"base64Encode(substring(d.payload, 1, {EXCERPT_BYTES}))"
)


class DeadLetterRepo:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.db = store.database

    def _select(self, where: str, tail: str, payload: bool) -> str:
        extra = ", base64Encode(d.payload)" if payload else ""
        return (
            f"SELECT {_FIELDS}{extra} FROM {self.db}.dead_letters AS d FINAL "
            "LEFT JOIN (SELECT tenant_id, dead_letter_id, count() AS n, "
            "max(redriven_at) AS last "
            f"FROM {self.db}.dead_letter_redrives GROUP BY tenant_id, dead_letter_id) AS r "
            "ON d.tenant_id = r.tenant_id AND d.dead_letter_id = r.dead_letter_id "
            f"WHERE {where} {tail}"
        )

    @staticmethod
    def _record(r: tuple[Any, ...]) -> DeadLetterRecord:
        last = r[14]
        if isinstance(last, datetime) and last.tzinfo is None:  # the join loses the column's tz
            last = last.replace(tzinfo=UTC)
        return DeadLetterRecord(
            tenant_id=str(r[0]),
            dead_letter_id=str(r[1]),
            reason=str(r[2]),
            message=str(r[3]),
            topic=str(r[4]),
            partition=int(r[5]),
            offset=int(r[6]),
            index=int(r[7]),
            event_id=str(r[8]),
            meter_id=str(r[9]),
            payload_bytes=int(r[10]),
            payload_truncated=bool(r[11]),
            produced_at_ms=int(r[12]),
            redrives=int(r[13]),
            last_redriven_at=last if int(r[13]) else None,
            payload_excerpt=base64.b64decode(r[15]),
            payload=base64.b64decode(r[16]) if len(r) > 16 else None,
        )

    def list(
        self,
        tenant_id: str | None,
        *,
        reason: str | None = None,
        topic: str | None = None,
        redriven: bool | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[DeadLetterRecord]:
        """Dead letters in source order (topic, partition, offset, index). ``tenant_id`` None:
        every tenant (admin)."""
        where = ["1"]
        params: dict[str, Any] = {"limit": int(limit), "offset": int(offset)}
        if tenant_id is not None:
            where.append("d.tenant_id = {tenant:String}")
            params["tenant"] = tenant_id
        if reason is not None:
            where.append("d.reason = {reason:String}")
            params["reason"] = reason
        if topic is not None:
            where.append("d.source_topic = {topic:String}")
            params["topic"] = topic
        if redriven is not None:
            where.append("ifNull(r.n, 0) > 0" if redriven else "ifNull(r.n, 0) = 0")
        sql = self._select(
            " AND ".join(where),
            "ORDER BY d.source_topic, d.source_partition, d.source_offset, d.source_index, "
            "d.meter_id LIMIT {limit:UInt32} OFFSET {offset:UInt64}",
            payload=False,
        )
        return [self._record(r) for r in self.store.query_rows(sql, params)]

    def get(self, tenant_id: str | None, dead_letter_id: str) -> DeadLetterRecord | None:
        """One dead letter with its payload (``tenant_id`` None: any tenant, admin)."""
        where = "d.dead_letter_id = {id:String}"
        params: dict[str, Any] = {"id": dead_letter_id}
        if tenant_id is not None:
            where = "d.tenant_id = {tenant:String} AND " + where
            params["tenant"] = tenant_id
        rows = self.store.query_rows(self._select(where, "LIMIT 1", payload=True), params)
        return self._record(rows[0]) if rows else None

    def record_redrive(
        self,
        record: DeadLetterRecord,
        *,
        actor: str,
        topic: str,
        messages: int,
        events: int,
    ) -> datetime:
        now = utc_now()
        self.store.insert(
            "dead_letter_redrives",
            [(record.tenant_id, record.dead_letter_id, now, actor, topic, messages, events)],
            REDRIVE_COLUMNS,
        )
        return now


__all__ = ["DeadLetterRecord", "DeadLetterRepo", "DeadLetterRows"]
