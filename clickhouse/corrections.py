"""Rows of event corrections (migration 051): the correction log (``corrections``), the
recomputed minute windows (``usage_overrides``) and the ledger reads they need. SQL and rows
only; the rules are in ``billing.corrections``.

- A correction is claimed as ONE insert into ``corrections`` (its record row, ``meter_id = ''``,
  plus its effect rows), sent with the insert-deduplication token (tenant, seq): of two claims of
  the same seq the server stores only the first; the claimer reads back which correction holds
  the seq. The insert is the commit point: effects and record are there together or not at all.
- Usage queries read the effect rows and overrides (``clickhouse.queries.usage_source``).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson

from clickhouse.catalog import first_writer_rank
from clickhouse.sink import ONE_PART_SETTINGS
from clickhouse.store import Store
from schemas.billing import Correction, CorrectionAction
from schemas.corrections import Effect, LedgerEvent, Markers, Override
from schemas.timeutil import epoch_ms, from_epoch_ms
from tally.errors import NotFound

MINUTE_MS = 60_000

CORRECTION_COLUMNS = [
    "tenant_id",
    "seq",
    "correction_id",
    "event_id",
    "meter_id",
    "customer",
    "window_start",
    "group_key",
    "side",
    "group_values",
    "events",
    "value_count",
    "value_sum",
    "action",
    "properties",
    "doc",
    "created_at",
    "rank",
]
OVERRIDE_COLUMNS = [
    "tenant_id",
    "meter_id",
    "customer",
    "window_start",
    "group_key",
    "side",
    "seq",
    "base_events",
    "version",
    "group_values",
    "events",
    "value_count",
    "value_sum",
    "value_min",
    "value_max",
    "uniq_values",
    "latest",
    "computed_at",
]
_BASE_MAX = (1 << 32) - 1

Window = tuple[str, datetime]  # (customer, minute window start)


def _utc(dt: datetime) -> datetime:
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def claim_token(tenant_id: str, seq: int) -> str:
    return "correction/" + hashlib.sha256(f"{tenant_id}\x00{seq}".encode()).hexdigest()


def override_version(seq: int, base_events: int) -> int:
    """Newest corrections first, then the most stream events (late events since)."""
    return (int(seq) << 32) | min(int(base_events), _BASE_MAX)


def _minute_pairs(windows: Iterable[Window]) -> list[tuple[str, int]]:
    return sorted({(c, epoch_ms(w) // MINUTE_MS) for c, w in windows})


class CorrectionStore:
    """The correction rows of ``billing.ports.CorrectionRows`` (mixed into
    ``clickhouse.billing.ClickHouseBilling``; needs ``self.store`` and ``self.db``)."""

    store: Store
    db: str

    # --- the ledger ---------------------------------------------------------------------------

    def get_event(self, tenant_id: str, event_id: str) -> LedgerEvent:
        rows = self.store.query_rows(
            f"SELECT event_type, customer, toUnixTimestamp64Milli(time), properties, "
            f"source_topic, source_partition, source_offset FROM {self.db}.events FINAL "
            "WHERE tenant_id = {tenant:String} AND event_id = {id:String} LIMIT 1",
            {"tenant": tenant_id, "id": event_id},
        )
        if not rows:
            raise NotFound(
                f"event {event_id!r} not found",
                details=[{"field": "event_id", "message": "unknown"}],
            )
        t, c, ms, props, topic, part, off = rows[0]
        return LedgerEvent(
            event_id, str(t), str(c), int(ms), orjson.loads(props), str(topic), int(part), int(off)
        )

    def ledger_window_events(
        self, tenant_id: str, event_type: str, windows: Sequence[Window]
    ) -> list[LedgerEvent]:
        """The ledger's events of ``event_type`` in the given (customer, minute) windows."""
        pairs = _minute_pairs(windows)
        if not pairs:
            return []
        lo = min(m for _, m in pairs) * MINUTE_MS
        hi = (max(m for _, m in pairs) + 1) * MINUTE_MS
        rows = self.store.query_rows(
            f"SELECT event_id, customer, toUnixTimestamp64Milli(time), properties, source_topic, "
            f"source_partition, source_offset FROM {self.db}.events FINAL "
            "WHERE tenant_id = {tenant:String} AND event_type = {type:String} "
            "AND customer IN {custs:Array(String)} "
            "AND time >= fromUnixTimestamp64Milli({lo:Int64}, 'UTC') "
            "AND time < fromUnixTimestamp64Milli({hi:Int64}, 'UTC') "
            "AND (customer, intDiv(toUnixTimestamp64Milli(time), 60000)) IN "
            "{pairs:Array(Tuple(String, Int64))} ORDER BY event_id",
            {
                "tenant": tenant_id,
                "type": event_type,
                "custs": sorted({c for c, _ in pairs}),
                "lo": lo,
                "hi": hi,
                "pairs": pairs,
            },
        )
        return [
            LedgerEvent(
                str(e), event_type, str(c), int(ms), orjson.loads(p), str(t), int(pt), int(o)
            )
            for e, c, ms, p, t, pt, o in rows
        ]

    def activation_markers(self, tenant_id: str, meter_ids: Sequence[str]) -> dict[str, Markers]:
        """meter id -> (topic, partition) -> offset of the meter's first activation marker."""
        out: dict[str, Markers] = {m: {} for m in meter_ids}
        if not meter_ids:
            return out
        rows = self.store.query_rows(
            f"SELECT meter_id, topic, source_partition, min(marker_offset) "
            f"FROM {self.db}.meter_activations WHERE tenant_id = {{tenant:String}} "
            "AND meter_id IN {meters:Array(String)} GROUP BY meter_id, topic, source_partition",
            {"tenant": tenant_id, "meters": sorted(set(meter_ids))},
        )
        for m, topic, part, off in rows:
            out.setdefault(str(m), {})[(str(topic), int(part))] = int(off)
        return out

    # --- the log ------------------------------------------------------------------------------

    def correction_top(self, tenant_id: str) -> int:
        rows = self.store.query_rows(
            f"SELECT max(seq) FROM {self.db}.corrections WHERE tenant_id = {{tenant:String}} "
            "AND meter_id = ''",
            {"tenant": tenant_id},
        )
        return int(rows[0][0]) if rows and rows[0][0] is not None else 0

    def corrections(self, tenant_id: str, event_id: str | None = None) -> list[Correction]:
        """The correction records (of one event), in log order."""
        params: dict[str, Any] = {"tenant": tenant_id}
        extra = ""
        if event_id is not None:
            extra = " AND event_id = {id:String}"
            params["id"] = event_id
        rows = self.store.query_rows(
            f"SELECT seq, doc FROM {self.db}.corrections FINAL WHERE tenant_id = {{tenant:String}} "
            f"AND meter_id = ''{extra} ORDER BY seq, rank DESC, created_at, correction_id "
            "LIMIT 1 BY seq, correction_id",
            params,
        )
        out = []
        winners: dict[int, str] = {}
        for seq, doc in rows:
            c = Correction.model_validate_json(doc)
            if int(seq) > 0:  # 051 claims: one correction per seq (the first writer)
                if winners.setdefault(int(seq), c.id) != c.id:
                    continue
            out.append(c.model_copy(update={"seq": int(seq)}))
        return out

    def claim_correction(
        self, tenant_id: str, correction: Correction, effects: Sequence[Effect]
    ) -> str | None:
        """Insert the correction (record + effects) at ``correction.seq`` in ONE insert with the
        token (tenant, seq); returns the id of the correction that holds the seq afterwards."""
        rank = first_writer_rank()
        window = from_epoch_ms(epoch_ms(correction.event_time) // MINUTE_MS * MINUTE_MS)
        after = correction.properties_after
        rows: list[tuple[Any, ...]] = [
            (
                tenant_id,
                correction.seq,
                correction.id,
                correction.event_id,
                "",
                correction.customer,
                window,
                "",
                "",
                {},
                0,
                0,
                0,
                correction.action.value,
                orjson.dumps(after).decode() if after is not None else "",
                correction.model_dump_json(),
                correction.created_at,
                rank,
            )
        ]
        for e in effects:
            rows.append(
                (
                    tenant_id,
                    correction.seq,
                    correction.id,
                    correction.event_id,
                    e.meter_id,
                    e.customer,
                    e.window_start,
                    e.group_key,
                    e.side,
                    e.group_values,
                    e.events,
                    e.value_count,
                    e.value_sum,
                    "",
                    "",
                    "",
                    correction.created_at,
                    rank,
                )
            )
        settings = dict(ONE_PART_SETTINGS)
        settings["insert_deduplicate"] = 1
        settings["insert_deduplication_token"] = claim_token(tenant_id, correction.seq)
        self.store.insert("corrections", rows, CORRECTION_COLUMNS, settings=settings)
        found = self.store.query_rows(
            f"SELECT correction_id FROM {self.db}.corrections FINAL "
            "WHERE tenant_id = {tenant:String} AND meter_id = '' AND seq = {seq:UInt64} "
            "ORDER BY rank DESC, correction_id LIMIT 1",
            {"tenant": tenant_id, "seq": correction.seq},
        )
        return str(found[0][0]) if found else None

    def latest_corrections(
        self, tenant_id: str, event_ids: Sequence[str]
    ) -> dict[str, dict[str, Any] | None]:
        """event id -> its properties after its latest correction (None: voided), for the
        given events that have corrections."""
        if not event_ids:
            return {}
        out: dict[str, dict[str, Any] | None] = {}
        ids = sorted(set(event_ids))
        for i in range(0, len(ids), 10_000):
            rows = self.store.query_rows(
                f"SELECT event_id, argMax(action, (seq, created_at)), "
                f"argMax(properties, (seq, created_at)) FROM {self.db}.corrections FINAL "
                "WHERE tenant_id = {tenant:String} AND meter_id = '' "
                "AND event_id IN {ids:Array(String)} GROUP BY event_id",
                {"tenant": tenant_id, "ids": ids[i : i + 10_000]},
            )
            for e, action, props in rows:
                out[str(e)] = None if action == CorrectionAction.VOID.value else orjson.loads(props)
        return out

    # --- recomputed windows -------------------------------------------------------------------

    def dirty_keys(
        self, tenant_id: str, meter_id: str, windows: Sequence[Window]
    ) -> dict[Window, dict[tuple[str, str], dict[str, str]]]:
        """(customer, minute) -> (group key, side) -> group values: the keys corrections
        changed in those windows of the meter."""
        pairs = _minute_pairs(windows)
        out: dict[Window, dict[tuple[str, str], dict[str, str]]] = defaultdict(dict)
        if not pairs:
            return out
        rows = self.store.query_rows(
            f"SELECT customer, toUnixTimestamp64Milli(window_start), group_key, side, "
            f"any(group_values) FROM {self.db}.corrections "
            "WHERE tenant_id = {tenant:String} AND meter_id = {meter:String} "
            "AND (customer, intDiv(toUnixTimestamp64Milli(window_start), 60000)) IN "
            "{pairs:Array(Tuple(String, Int64))} "
            "GROUP BY customer, window_start, group_key, side",
            {"tenant": tenant_id, "meter": meter_id, "pairs": pairs},
        )
        for c, ms, gk, side, gv in rows:
            out[(str(c), from_epoch_ms(int(ms)))][(str(gk), str(side))] = dict(gv)
        return out

    def stream_counts(
        self, tenant_id: str, meter_id: str, windows: Sequence[Window]
    ) -> dict[tuple[str, datetime, str], int]:
        """(customer, minute, group key) -> events the stream pre-aggregated there."""
        pairs = _minute_pairs(windows)
        if not pairs:
            return {}
        rows = self.store.query_rows(
            f"SELECT customer, toUnixTimestamp64Milli(window_start), group_key, sum(events) "
            f"FROM {self.db}.usage_minute WHERE tenant_id = {{tenant:String}} "
            "AND meter_id = {meter:String} AND origin = 's' "
            "AND (customer, intDiv(toUnixTimestamp64Milli(window_start), 60000)) IN "
            "{pairs:Array(Tuple(String, Int64))} GROUP BY customer, window_start, group_key",
            {"tenant": tenant_id, "meter": meter_id, "pairs": pairs},
        )
        return {(str(c), from_epoch_ms(int(ms)), str(gk)): int(n) for c, ms, gk, n in rows}

    def write_overrides(self, tenant_id: str, overrides: Sequence[Override]) -> None:
        if not overrides:
            return
        now = datetime.now(UTC)
        rows = []
        for o in overrides:
            a = o.aggregate
            rows.append(
                (
                    tenant_id,
                    o.meter_id,
                    o.customer,
                    o.window_start,
                    o.group_key,
                    o.side,
                    o.seq,
                    o.base_events,
                    override_version(o.seq, o.base_events),
                    a.group_values,
                    a.events,
                    a.value_count,
                    a.value_sum,
                    a.value_min,
                    a.value_max,
                    list(a.uniq),
                    a.latest,
                    now,
                )
            )
        self.store.insert("usage_overrides", rows, OVERRIDE_COLUMNS)

    def overrides(self, tenant_id: str, meter_id: str) -> list[Override]:
        """The current overrides of a meter (tests and tools)."""
        from schemas.corrections import WindowAggregate

        rows = self.store.query_rows(
            "SELECT customer, toUnixTimestamp64Milli(window_start), group_key, side, seq, "
            "base_events, group_values, events, value_count, value_sum, value_min, value_max, "
            f"uniq_values, latest FROM {self.db}.usage_overrides FINAL "
            "WHERE tenant_id = {tenant:String} AND meter_id = {meter:String} "
            "ORDER BY customer, window_start, group_key, side",
            {"tenant": tenant_id, "meter": meter_id},
        )
        return [
            Override(
                meter_id,
                str(c),
                from_epoch_ms(int(ms)),
                str(gk),
                str(side),
                int(seq),
                int(base),
                WindowAggregate(dict(gv), int(n), int(vc), vs, vmin, vmax, tuple(u), tuple(latest)),
            )
            for c, ms, gk, side, seq, base, gv, n, vc, vs, vmin, vmax, u, latest in rows
        ]


__all__ = ["CorrectionStore", "_utc"]
