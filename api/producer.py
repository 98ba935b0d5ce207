"""The ingest producer: envelopes -> Kafka, resolved only when the broker acknowledged each one.

``confluent_kafka.Producer`` with ``acks=all`` and ``enable.idempotence=true``. A daemon thread
polls the client so that delivery reports fire promptly; each report completes an asyncio future
on the caller's loop through ``loop.call_soon_threadsafe``. ``produce`` returns only when every
envelope's report arrived; any delivery error or the timeout raises ``BrokerUnavailable``
(503 + Retry-After at the HTTP layer) -- nothing of the request may then be reported as accepted.

A fatal client error (e.g. the idempotent producer lost its sequence state), or a delivery
report saying the broker no longer accepts the client's producer id/epoch (after the broker was
frozen past the message timeout, Tansu answers ProducerFenced to every later produce), makes the
producer replace its librdkafka client; requests in flight on the old one fail with 503 and are retried
by clients (ingest is idempotent by event id).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence
from functools import partial
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from api.topics import topic_partitions
from schemas.envelope import OutgoingEnvelope
from tally.errors import BrokerUnavailable

log = logging.getLogger(__name__)

# Delivery errors after which this client's idempotence state is dead: only a new client (a new
# producer id) can produce again.
_RESET_CODES = frozenset(
    {
        KafkaError.PRODUCER_FENCED,
        KafkaError._FENCED,
        KafkaError.INVALID_PRODUCER_EPOCH,
        KafkaError.UNKNOWN_PRODUCER_ID,
        KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER,
        KafkaError.INVALID_PRODUCER_ID_MAPPING,
    }
)


class EventProducer:
    """Produce envelopes to ``topic``; ``partitions`` comes from the topic's metadata."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        *,
        timeout_s: float = 10.0,
        retry_after_s: int = 5,
        linger_ms: float = 2.0,
        compression: str = "none",
        partitions: int | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.timeout_s = timeout_s
        self.retry_after_s = retry_after_s
        self._conf: dict[str, Any] = {
            "bootstrap.servers": bootstrap,
            "acks": "all",
            "enable.idempotence": True,
            "linger.ms": linger_ms,
            "compression.type": compression,
            "message.timeout.ms": max(1, int(timeout_s * 1000)),
            "queue.buffering.max.messages": 100_000,
            "queue.buffering.max.kbytes": 512 * 1024,
            "message.max.bytes": 16 * 1024 * 1024,
            "error_cb": self._on_error,
            "logger": logging.getLogger("api.producer.librdkafka"),
        }
        if config:
            self._conf.update(config)
        self._lock = threading.Lock()
        self._producer = Producer(self._conf)
        self._needs_reset = False
        try:
            self.partitions = partitions or topic_partitions(bootstrap, topic, timeout=timeout_s)
        except Exception:
            self._producer.purge()
            raise
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll_loop, name="tally-producer", daemon=True)
        self._thread.start()
        self._closed = False

    # -- background -------------------------------------------------------------------------

    def _poll_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._producer.poll(0.05)
            except Exception:  # a callback raised; never let the poll thread die
                log.exception("producer poll failed")

    def _on_error(self, err: KafkaError) -> None:
        if err.fatal():
            log.error("producer fatal error, the client will be replaced: %s", err.str())
            self._needs_reset = True
        elif err.code() == KafkaError._ALL_BROKERS_DOWN:
            log.warning("producer: %s", err.str())
        else:  # connection refused etc. repeat every retry backoff; the 503s tell the story
            log.debug("producer error: %s", err.str())

    def _reset_if_needed(self) -> None:
        if not self._needs_reset:
            return
        with self._lock:
            if not self._needs_reset:
                return
            old = self._producer
            self._producer = Producer(self._conf)
            self._needs_reset = False
        try:  # fail whatever is still queued on the old client; its reports fire now
            old.purge()
            old.poll(0)
        except Exception:
            log.exception("purging the old producer failed")

    @staticmethod
    def _deliver(
        fut: asyncio.Future[tuple[int, int]], err: KafkaError | None, msg: Message
    ) -> None:
        if fut.done():  # the request timed out already
            return
        if err is not None:
            fut.set_exception(
                BrokerUnavailable(f"the broker did not acknowledge the events: {err.str()}")
            )
        else:
            fut.set_result((int(msg.partition() or 0), int(msg.offset() or 0)))

    def _on_delivery(
        self,
        loop: asyncio.AbstractEventLoop,
        fut: asyncio.Future[tuple[int, int]],
        err: KafkaError | None,
        msg: Message,
    ) -> None:
        if err is not None and (err.fatal() or err.code() in _RESET_CODES):
            if not self._needs_reset:
                log.warning("producer: %s; the client will be replaced", err.str())
            self._needs_reset = True
        try:
            loop.call_soon_threadsafe(self._deliver, fut, err, msg)
        except RuntimeError:  # loop closed (shutdown); nobody is waiting any more
            pass

    # -- API --------------------------------------------------------------------------------

    async def produce(
        self, envelopes: Sequence[OutgoingEnvelope], key: str | bytes | None = None
    ) -> list[tuple[int, int]]:
        """Produce every envelope; returns ``(partition, offset)`` per envelope, in order.

        Raises ``BrokerUnavailable`` on any delivery error, on a full local queue and when not
        every acknowledgement arrived within ``timeout_s``.
        """
        if self._closed:
            raise BrokerUnavailable("the producer is shut down", retry_after=self.retry_after_s)
        if not envelopes:
            return []
        self._reset_if_needed()
        loop = asyncio.get_running_loop()
        futs: list[asyncio.Future[tuple[int, int]]] = []
        producer = self._producer
        for env in envelopes:
            fut: asyncio.Future[tuple[int, int]] = loop.create_future()
            cb = partial(self._on_delivery, loop, fut)
            try:
                try:
                    producer.produce(
                        self.topic, env.payload, key, partition=env.partition, on_delivery=cb
                    )
                except BufferError:
                    await asyncio.sleep(0.05)  # let the poll thread drain the queue, once
                    producer.produce(
                        self.topic, env.payload, key, partition=env.partition, on_delivery=cb
                    )
            except BufferError:
                self._abandon(futs)
                raise BrokerUnavailable(
                    "the producer queue is full (the broker is slow or down)",
                    retry_after=self.retry_after_s,
                ) from None
            except KafkaException as exc:
                self._abandon(futs)
                raise BrokerUnavailable(
                    f"producing to the broker failed: {exc}", retry_after=self.retry_after_s
                ) from None
            futs.append(fut)
        # librdkafka fails each message after message.timeout.ms; this is only a backstop.
        _done, pending = await asyncio.wait(futs, timeout=self.timeout_s + 5.0)
        if pending:
            self._abandon(futs)
            raise BrokerUnavailable(
                f"the broker did not acknowledge the events within {self.timeout_s:g}s",
                retry_after=self.retry_after_s,
            )
        out: list[tuple[int, int]] = []
        first_error: BaseException | None = None
        for fut in futs:
            failure = fut.exception()
            if failure is not None:
                first_error = first_error or failure
            else:
                out.append(fut.result())
        if first_error is not None:
            if isinstance(first_error, BrokerUnavailable):
                first_error.retry_after = self.retry_after_s
            raise first_error
        return out

    @staticmethod
    def _abandon(futs: list[asyncio.Future[tuple[int, int]]]) -> None:
        for f in futs:
            if not f.done():
                f.cancel()
            elif not f.cancelled():
                f.exception()  # mark retrieved: no "exception was never retrieved" noise

    def ping(self, timeout: float = 2.0) -> bool:
        """True if the broker answers a metadata request for the topic (blocking)."""
        try:
            md = self._producer.list_topics(self.topic, timeout=timeout)
        except Exception:
            return False
        meta = md.topics.get(self.topic)
        return bool(meta is not None and not meta.error and meta.partitions)

    def flush(self, timeout: float | None = None) -> int:
        """Wait for queued messages; returns how many are still undelivered."""
        return int(self._producer.flush(self.timeout_s if timeout is None else timeout))

    def close(self, timeout: float | None = None) -> None:
        """Drain (flush) and stop the poll thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            left = self.flush(timeout)
            if left:
                log.warning("producer closed with %d undelivered messages", left)
        finally:
            self._stop.set()
            self._thread.join(timeout=5)
