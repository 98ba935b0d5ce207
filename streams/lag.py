"""Consumer lag and freshness, measured the same way on Tansu and on Kafka.

**What is measured.** For each partition ``p`` with stored progress ``M`` (the last offset whose
events are in the store: the end of the commit chain):

- ``lag = end - (M + 1)``: messages in the log that are not stored yet, where ``end`` is the
  partition's log end offset (the offset the next message will get);
- ``freshness = now - timestamp(M + 1)``: the age of the oldest message the broker accepted and
  the store does not hold yet (0 when ``lag`` is 0). The timestamp is the message's Kafka
  timestamp (the producer's create time, set by the API when it produced the envelope).

Lag counts *stored* progress, not the consumer group's committed offsets: a worker that reads
and acks nothing it has not stored has the same number either way, and a worker that reads but
cannot store (store down, stuck flush) shows its real backlog.

**How the log end is found.** Tansu answers ListOffsets(LATEST) with the base offset of the last
record batch + 1, not the true end (``end`` is understated by the size of the last batch - 1);
its fetch responses carry the right high watermark, as Kafka's do. So ``LogProbe`` fetches:
it assigns a consumer (no group, nothing committed) to ``M + 1`` of each partition and reads one
message or the end-of-partition event per partition. The fetch response gives the high watermark
(``end``, exact on both brokers) and the first message gives ``timestamp(M + 1)``. One fetch per
partition per measurement; nothing is consumed for real. ``tests/integration/streams/
test_lag_probe.py`` checks it against real Tansu (batches of several records, where
ListOffsets is wrong).

The worker measures its own partitions (``M`` = its verified chain end) every
``worker_heartbeat_s`` and publishes ``tally_worker_consumer_lag{partition}`` and
``tally_worker_freshness_seconds``; a scale-out API process measures all partitions (``M`` read
from the store) for ``/readyz``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PartitionLag:
    """One partition's measurement. ``first_unstored_ms``: timestamp of message ``stored + 1``
    when it exists and its timestamp is known."""

    partition: int
    stored: int  # last stored offset, -1 = nothing stored
    end: int  # log end offset (next offset to be written)
    first_unstored_ms: int | None = None

    @property
    def lag(self) -> int:
        return max(0, self.end - (self.stored + 1))

    def freshness_s(self, now_ms: int) -> float:
        """Age of the oldest unstored message (0 when nothing is waiting; never negative)."""
        if self.lag == 0 or self.first_unstored_ms is None:
            return 0.0
        return max(0.0, (now_ms - self.first_unstored_ms) / 1000)


@dataclass(frozen=True, slots=True)
class LagReport:
    """A measurement of some partitions at ``measured_ms`` (epoch ms). ``error``: why it could
    not be taken (the previous numbers are then unknown, not zero)."""

    measured_ms: int
    partitions: tuple[PartitionLag, ...] = ()
    error: str = ""
    topic: str = ""

    @property
    def total_lag(self) -> int:
        return sum(p.lag for p in self.partitions)

    @property
    def by_partition(self) -> dict[int, int]:
        return {p.partition: p.lag for p in self.partitions}

    def freshness_s(self, now_ms: int | None = None) -> float:
        """The worst partition's freshness as of ``now_ms`` (default: when measured)."""
        now = self.measured_ms if now_ms is None else now_ms
        return max((p.freshness_s(now) for p in self.partitions), default=0.0)

    def describe(self, now_ms: int) -> dict[str, Any]:
        """As JSON for /readyz."""
        return {
            "measured_s_ago": round(max(0, now_ms - self.measured_ms) / 1000, 1),
            "total": self.total_lag,
            "partitions": {str(p.partition): p.lag for p in self.partitions},
            "freshness_s": round(self.freshness_s(now_ms), 3),
            "error": self.error or None,
        }


def log_end(high_watermark: int | None, list_offsets_end: int | None, read_up_to: int) -> int:
    """The best known log end: the highest of the fetch high watermark, ListOffsets' answer
    (a lower bound on Tansu) and one past the highest offset actually read. Each is at most the
    true end when taken, so the highest is the closest."""
    return max(
        -1 if high_watermark is None else high_watermark,
        -1 if list_offsets_end is None else list_offsets_end,
        read_up_to + 1,
        0,
    )


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class _Pending:
    stored: int
    hw: int | None = None
    first_ms: int | None = None
    done: bool = False
    read_up_to: int = -1
    errors: list[str] = field(default_factory=list)


class LogProbe:
    """Measures log ends and first-unstored timestamps by fetching (see the module docstring).

    Blocking; one probe at a time (a lock). ``close()`` when done.
    """

    def __init__(self, bootstrap: str, topic: str, *, group: str = "tally-lag-probe") -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.group = group
        self._consumer: Any = None
        self._closed = False
        self._lock = threading.Lock()

    def _client(self) -> Any:
        if self._closed:
            # a client made after close() would never be closed: librdkafka then tears it down
            # at interpreter exit, which can crash the process
            raise RuntimeError("the log probe is closed")
        if self._consumer is None:
            from confluent_kafka import Consumer

            self._consumer = Consumer(
                {
                    "bootstrap.servers": self.bootstrap,
                    "group.id": self.group,  # never joined: assign() only, nothing committed
                    "enable.auto.commit": False,
                    "enable.auto.offset.store": False,
                    "enable.partition.eof": True,
                    "auto.offset.reset": "latest",
                    "fetch.wait.max.ms": 50,
                    "fetch.error.backoff.ms": 20,
                    "fetch.queue.backoff.ms": 10,
                    "queued.min.messages": 1,
                    "queued.max.messages.kbytes": 1024,
                    "max.partition.fetch.bytes": 65536,
                    "socket.timeout.ms": 5000,
                    "logger": logging.getLogger("streams.lag.librdkafka"),
                }
            )
        return self._consumer

    def measure(
        self,
        stored: Mapping[int, int],
        timeout: float = 5.0,
        now_ms: Callable[[], int] = _now_ms,
    ) -> LagReport:
        """Measure the partitions in ``stored`` (partition -> last stored offset, -1: none).
        Raises when the broker does not answer for every partition within ``timeout``."""
        from confluent_kafka import KafkaError, TopicPartition

        if not stored:
            return LagReport(now_ms(), (), topic=self.topic)
        with self._lock:
            consumer = self._client()
            pending = {p: _Pending(m) for p, m in stored.items()}
            consumer.assign([TopicPartition(self.topic, p, m + 1) for p, m in stored.items()])
            try:
                deadline = time.monotonic() + timeout
                while not all(x.done for x in pending.values()):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        missing = sorted(p for p, x in pending.items() if not x.done)
                        raise TimeoutError(
                            f"the broker did not answer a fetch of {self.topic} partitions "
                            f"{missing} within {timeout:g} s"
                        )
                    msg = consumer.poll(min(left, 0.5))
                    if msg is None:
                        continue
                    p = msg.partition()
                    x = pending.get(p)
                    if x is None or x.done:
                        continue
                    err = msg.error()
                    if err is not None:
                        if err.code() == KafkaError._PARTITION_EOF:
                            x.done = True
                            continue
                        if err.fatal() or not err.retriable():
                            raise RuntimeError(f"fetch of {self.topic}[{p}] failed: {err.str()}")
                        continue
                    x.read_up_to = int(msg.offset())
                    if msg.offset() == x.stored + 1:
                        kind, ts = msg.timestamp()
                        x.first_ms = int(ts) if kind and ts is not None and ts > 0 else None
                    x.done = True
                out = []
                for p, x in sorted(pending.items()):
                    _low, high = consumer.get_watermark_offsets(
                        TopicPartition(self.topic, p), cached=True
                    )
                    hw = int(high) if high is not None and high >= 0 else None
                    end = log_end(hw, None, x.read_up_to)
                    out.append(PartitionLag(p, x.stored, end, x.first_ms))
                return LagReport(now_ms(), tuple(out), topic=self.topic)
            finally:
                try:
                    consumer.unassign()
                except Exception as exc:  # a broken client is replaced at the next probe
                    log.debug("lag probe unassign failed: %r", exc)
                    self._reset()

    def ping(self, timeout: float = 2.0) -> bool:
        """True if the broker answers a metadata request for the topic."""
        try:
            with self._lock:
                md = self._client().list_topics(self.topic, timeout=timeout)
        except Exception:
            return False
        meta = md.topics.get(self.topic)
        return bool(meta is not None and not meta.error and meta.partitions)

    def _reset(self) -> None:
        c, self._consumer = self._consumer, None
        if c is not None:
            try:
                c.close()
            except Exception as exc:
                log.debug("closing the lag probe consumer: %r", exc)

    def close(self) -> None:
        """Close the client (after any probe in flight); later probes raise, pings say False."""
        with self._lock:
            self._closed = True
            self._reset()
