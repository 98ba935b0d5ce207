"""Fault injection at the store boundary: a wrapper around a real ``clickhouse.store.Store``.

The worker's sink (``clickhouse.sink.ClickHouseSink``) is built on it unchanged, so every fault
hits the real commit protocol against real chDB. A fault is armed with ``arm(...)`` and fires on
the matching operations:

- ``op``: ``"insert"`` (``table`` = events | usage_minute | worker_claims | worker_heartbeats),
  ``"chain"`` (the progress + claims read), ``"progress"`` (other progress reads),
  ``"seen"`` (the dedupe-index rebuild read of stored ids), ``"meters"`` (meter loads);
- ``mode``: ``"before"`` (raise, nothing executed), ``"after"`` (execute, then raise: the answer
  is lost), ``"late"`` (raise a timeout now, execute in a background thread after ``delay`` s:
  an insert that lands after its client gave up);
- ``skip``: let that many matching operations through first; ``times``: fire that often;
  ``then``: faults (as ``arm`` keyword dicts) armed at the moment this one fires, e.g. "the
  answer of this insert is lost AND the next check read fails".

``down = True`` makes every operation fail (the store unreachable). ``log`` records every insert
into ``usage_minute`` with its token and outcome, so tests can tell which writer's links landed.
Errors are ``tally.errors.StoreUnavailable``, as the real store raises them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from clickhouse.store import Store
from tally.errors import StoreUnavailable


@dataclass
class Fault:
    op: str
    mode: str = "before"
    table: str | None = None
    skip: int = 0
    times: int = 1
    delay: float = 1.5
    then: list[dict[str, Any]] = field(default_factory=list)  # faults armed once this fires
    hits: int = 0
    seen: int = 0

    def matches(self, op: str, table: str | None) -> bool:
        return op == self.op and (self.table is None or self.table == table)


@dataclass
class InsertRecord:
    table: str
    token: str | None
    outcome: str  # ok | failed | lost | late-landed | late-failed
    at: float = field(default_factory=time.monotonic)


class FaultyStore:
    """Delegates to ``inner``; injects the armed faults. Thread-safe."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.database = inner.database
        self.client = inner.client
        self.faults: list[Fault] = []
        self.down = False
        self.log: list[InsertRecord] = []
        self.late_threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    # --- arming ------------------------------------------------------------------------------
    def arm(self, op: str, mode: str = "before", **kw: Any) -> Fault:
        fault = Fault(op, mode, **kw)
        with self._lock:
            self.faults.append(fault)
        return fault

    def _fire(self, op: str, table: str | None) -> Fault | None:
        with self._lock:
            if self.down:
                return Fault(op, "before", table)
            for f in self.faults:
                if f.hits < f.times and f.matches(op, table):
                    f.seen += 1
                    if f.seen > f.skip:
                        f.hits += 1
                        for spec in f.then:
                            spec = dict(spec)
                            self.faults.append(
                                Fault(spec.pop("op"), spec.pop("mode", "before"), **spec)
                            )
                        return f
            return None

    def wait_late(self, timeout: float = 60) -> None:
        for th in list(self.late_threads):
            th.join(timeout)

    def tokens(self, outcome: str | None = None) -> list[str | None]:
        return [r.token for r in self.log if outcome is None or r.outcome == outcome]

    @staticmethod
    def _err(what: str) -> StoreUnavailable:
        return StoreUnavailable(f"ClickHouse is unavailable ({what}): injected fault")

    # --- the Store interface the sink and repo use -------------------------------------------
    def insert(
        self,
        table: str,
        rows: Any,
        column_names: list[str],
        settings: dict[str, Any] | None = None,
        **kw: Any,
    ) -> None:
        self._insert(
            table, settings, lambda: self.inner.insert(table, rows, column_names, settings, **kw)
        )

    def insert_arrow(self, table: str, data: Any, settings: dict[str, Any] | None = None) -> None:
        """The worker's Arrow inserts (events, link commits): the same faults as ``insert``."""
        self._insert(table, settings, lambda: self.inner.insert_arrow(table, data, settings))

    def _insert(self, table: str, settings: dict[str, Any] | None, run: Any) -> None:
        token = (settings or {}).get("insert_deduplication_token")
        fault = self._fire("insert", table)

        def record(outcome: str) -> None:
            if table == "usage_minute":
                with self._lock:
                    self.log.append(InsertRecord(table, token, outcome))

        if fault is None:
            try:
                run()
            except Exception:
                record("failed")
                raise
            record("ok")
            return
        if fault.mode == "before":
            record("failed")
            raise self._err(f"insert into {table}")
        if fault.mode == "after":
            run()
            record("lost")
            raise self._err(f"insert into {table}, answer lost")
        if fault.mode == "late":

            def land() -> None:
                time.sleep(fault.delay)
                try:
                    run()
                    record("late-landed")
                except Exception:
                    record("late-failed")

            th = threading.Thread(target=land, daemon=True)
            self.late_threads.append(th)
            th.start()
            raise TimeoutError(f"insert into {table}: no answer in time (still running)")
        raise AssertionError(f"unknown fault mode {fault.mode}")

    @staticmethod
    def _kind(sql: str) -> str:
        if "worker_claims" in sql and "UNION ALL" in sql:
            return "chain"
        if "~progress" in sql or ("{meter:String}" in sql and "usage_minute" in sql):
            return "progress"
        if ".meters" in sql:
            return "meters"
        if ".events" in sql and "source_offset >" in sql:
            return "seen"
        return "query"

    def query_rows(self, sql: str, params: dict[str, Any] | None = None) -> list[tuple]:
        fault = self._fire(self._kind(sql), None)
        if fault is not None:
            if fault.mode == "after":
                self.inner.query_rows(sql, params)
            raise self._err("query")
        return self.inner.query_rows(sql, params)

    def stream_rows(self, sql: str, params: dict[str, Any] | None = None) -> Iterator[list[tuple]]:
        fault = self._fire(self._kind(sql), None)
        if fault is not None:
            raise self._err("query")
        yield from self.inner.stream_rows(sql, params)

    def command(self, sql: str, params: dict[str, Any] | None = None, **kw: Any) -> Any:
        if self._fire("command", None) is not None:
            raise self._err("command")
        return self.inner.command(sql, params, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
