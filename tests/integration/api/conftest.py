"""Fixtures: the real app on a real Tansu topic and a real chDB database (no mocks)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from confluent_kafka import Consumer, TopicPartition

from api.app import create_app
from api.producer import EventProducer
from clickhouse.repo import Repo
from schemas.envelope import Envelope, decode
from tally.settings import Settings, WaitMode

ADMIN_TOKEN = "adm-test-token-0123456789abcdef"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def make_settings(broker: Any, topic: str, **kw: Any) -> Settings:
    base: dict[str, Any] = dict(
        kafka_bootstrap=broker.bootstrap,
        events_topic=topic,
        ingest_wait=WaitMode.BROKER,
        admin_token=ADMIN_TOKEN,
        max_events_per_request=50,
        max_request_bytes=32 * 1024,
        produce_timeout_s=5.0,
        wait_stored_timeout_s=1.0,
        retry_after_s=3,
    )
    base.update(kw)
    return Settings(**base)


@pytest.fixture
def settings(broker: Any, topic: str) -> Settings:
    return make_settings(broker, topic)


@pytest.fixture
def producer(broker: Any, topic: str) -> Iterator[EventProducer]:
    p = EventProducer(broker.bootstrap, topic, timeout_s=5.0)
    yield p
    p.close(5)


@pytest.fixture
def repo(store: Any) -> Repo:
    r = Repo(store)
    r.ensure_admin_token(ADMIN_TOKEN)
    return r


@pytest.fixture
async def client(
    settings: Settings, store: Any, repo: Repo, producer: EventProducer
) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings, store, producer=producer, progress_waiter=None, repo=repo)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://tally") as c:
        yield c


@pytest.fixture
def tenant(repo: Repo) -> tuple[str, str]:
    t, key = repo.create_tenant("acme")
    return t.tenant_id, key


@pytest.fixture
def other_tenant(repo: Repo) -> tuple[str, str]:
    t, key = repo.create_tenant("globex")
    return t.tenant_id, key


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def consume_all(
    bootstrap: str, topic: str, expected_events: int, timeout: float = 20
) -> list[tuple[int, int, bytes | None, Envelope]]:
    """Read the topic from the beginning until ``expected_events`` events were seen."""
    import time

    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"reader-{topic}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    try:
        md = c.list_topics(topic, timeout=10)
        parts = sorted(md.topics[topic].partitions)
        c.assign([TopicPartition(topic, p, 0) for p in parts])
        out: list[tuple[int, int, bytes | None, Envelope]] = []
        seen = 0
        deadline = time.monotonic() + timeout
        while seen < expected_events and time.monotonic() < deadline:
            msg = c.poll(0.5)
            if msg is None or msg.error():
                continue
            env = decode(msg.value())
            out.append((int(msg.partition()), int(msg.offset()), msg.key(), env))
            seen += len(env.events)
        return out
    finally:
        c.close()
