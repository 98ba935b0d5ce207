"""Leases across processes without transactions (the invoice run of a tenant, the webhook
dispatcher among API replicas), with the insert-deduplication CAS the codebase uses elsewhere.

A lease is a sequence of rows ``(tenant, name, seq)`` in ``leases``:

- **acquire**: when the newest row is free (released, or expired by the contender's clock), insert
  row ``seq + 1`` with the deduplication token (tenant, name, seq + 1) and read it back: of two
  contenders the server stores only the first insert, so exactly one reads back its own owner;
- **renew**: the holder re-inserts its row with a later expiry and a higher version (the
  newest version of a row wins), well before the old expiry (every ``ttl / 4``);
- **release**: the holder re-inserts its row expired.

The holder acts only while its own clock says the lease has at least ``margin_s`` left (measured
from the start of the insert that acquired or renewed it: conservative). Bound, documented in
docs/architecture.md: the lease is exclusive as long as the clocks of the processes differ by
less than ``margin_s`` and no holder stalls (GC pause, frozen VM) for longer than ``margin_s``
between its check and the end of the action it started.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Protocol

from schemas.leases import LeaseRow

log = logging.getLogger(__name__)


class LeaseRows(Protocol):
    def lease_head(self, tenant_id: str, name: str) -> LeaseRow | None: ...

    def lease_at(self, tenant_id: str, name: str, seq: int) -> LeaseRow | None: ...

    def acquire_lease(self, row: LeaseRow) -> None:
        """Insert ``row`` with the deduplication token (tenant, name, seq)."""
        ...

    def renew_lease(self, row: LeaseRow, version: int) -> None:
        """Insert ``row`` (same seq) again with ``version`` (newer versions win)."""
        ...


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


class Lease:
    def __init__(
        self,
        rows: LeaseRows,
        tenant_id: str,
        name: str,
        ttl_s: float,
        *,
        margin_s: float = 5.0,
        owner: str | None = None,
        wall_ms: Callable[[], int] = _wall_ms,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rows = rows
        self.tenant_id = tenant_id
        self.name = name
        self.ttl_s = ttl_s
        self.margin_s = min(margin_s, ttl_s / 4)
        self.owner = owner or uuid.uuid4().hex
        self.wall_ms = wall_ms
        self.monotonic = monotonic
        self._row: LeaseRow | None = None
        self._deadline = 0.0  # monotonic time until which this holder may act (minus margin)
        self._lock = threading.RLock()
        self._renewer: threading.Thread | None = None
        self._stop = threading.Event()

    # --- state --------------------------------------------------------------------------------
    @property
    def held(self) -> bool:
        return self.valid_for() > 0

    def valid_for(self) -> float:
        """Seconds this holder may still act (0 when it does not hold the lease)."""
        with self._lock:
            if self._row is None:
                return 0.0
            return max(0.0, self._deadline - self.margin_s - self.monotonic())

    def holder(self) -> LeaseRow | None:
        """The newest lease row (who holds or last held the lease)."""
        return self.rows.lease_head(self.tenant_id, self.name)

    # --- acquire / renew / release ------------------------------------------------------------
    def hold(self) -> bool:
        """Acquire the lease, or renew it when this holder has it and its renewal is due.
        Returns whether this process holds the lease now."""
        with self._lock:
            if self._row is not None:
                if self.valid_for() > self.ttl_s * 0.75 - self.margin_s:
                    return True  # renewed recently
                return self._renew()
            return self._acquire()

    def _acquire(self) -> bool:
        head = self.rows.lease_head(self.tenant_id, self.name)
        now = self.wall_ms()
        if head is not None and head.owner and head.expires_ms > now:
            if head.owner != self.owner:
                return False
        started = self.monotonic()
        seq = (head.seq if head is not None else 0) + 1
        row = LeaseRow(
            self.tenant_id, self.name, seq, self.owner, now, now + int(self.ttl_s * 1000)
        )
        self.rows.acquire_lease(row)
        won = self.rows.lease_at(self.tenant_id, self.name, seq)
        if won is None or won.owner != self.owner:
            return False
        self._row = row
        self._deadline = started + self.ttl_s
        log.info("lease %s/%s acquired (seq %d)", self.tenant_id or "-", self.name, seq)
        return True

    def _renew(self) -> bool:
        row = self._row
        assert row is not None
        if self.valid_for() <= 0:
            self._row = None  # expired before it could be renewed: others may have it
            return self._acquire()
        started = self.monotonic()
        now = self.wall_ms()
        new = LeaseRow(
            row.tenant_id,
            row.name,
            row.seq,
            self.owner,
            row.acquired_ms,
            now + int(self.ttl_s * 1000),
        )
        self.rows.renew_lease(new, version=now)
        head = self.rows.lease_head(self.tenant_id, self.name)
        if head is None or head.seq != row.seq or head.owner != self.owner:
            log.warning("lease %s/%s lost to %s", self.tenant_id or "-", self.name, head)
            self._row = None
            return False
        self._row = new
        self._deadline = started + self.ttl_s
        return True

    def release(self) -> None:
        self.stop_renewing()
        with self._lock:
            row = self._row
            self._row = None
            if row is None:
                return
            try:
                expired = LeaseRow(row.tenant_id, row.name, row.seq, row.owner, row.acquired_ms, 0)
                self.rows.renew_lease(expired, version=max(self.wall_ms(), row.expires_ms) + 1)
            except Exception:  # it expires by itself
                log.warning("could not release lease %s/%s", self.tenant_id or "-", self.name)

    # --- waiting and renewing in the background ------------------------------------------------
    def wait(self, timeout_s: float, poll_s: float = 0.2) -> bool:
        """Acquire, waiting up to ``timeout_s`` for the current holder to release or expire."""
        deadline = self.monotonic() + timeout_s
        while True:
            if self.hold():
                return True
            if self.monotonic() >= deadline:
                return False
            time.sleep(poll_s)

    def keep_renewed(self) -> None:
        """Renew every ``ttl / 4`` in a background thread until ``release``."""
        if self._renewer is not None:
            return
        self._stop.clear()

        def loop() -> None:
            while not self._stop.wait(self.ttl_s / 4):
                try:
                    with self._lock:
                        if self._row is None or not self._renew():
                            return
                except Exception as exc:  # the store is down: the lease may expire
                    log.warning("lease %s/%s renewal failed: %r", self.tenant_id, self.name, exc)

        self._renewer = threading.Thread(target=loop, name=f"tally-lease-{self.name}", daemon=True)
        self._renewer.start()

    def stop_renewing(self) -> None:
        self._stop.set()
        th, self._renewer = self._renewer, None
        if th is not None and th is not threading.current_thread():
            th.join(timeout=10)
