"""Kafka topic administration next to the producer: create the events topic, count its partitions."""

from __future__ import annotations

from tally.errors import TallyError


def create_topic(bootstrap: str, topic: str, partitions: int, timeout: float = 15.0) -> None:
    """Create ``topic`` if it does not exist (idempotent)."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    md = admin.list_topics(timeout=timeout)
    if topic in md.topics and not md.topics[topic].error:
        return
    futures = admin.create_topics(
        [NewTopic(topic, num_partitions=partitions, replication_factor=1)]
    )
    for fut in futures.values():
        try:
            fut.result(timeout)
        except KafkaException as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise


def topic_partitions(bootstrap: str, topic: str, timeout: float = 10.0) -> int:
    from confluent_kafka.admin import AdminClient

    md = AdminClient({"bootstrap.servers": bootstrap}).list_topics(topic, timeout=timeout)
    meta = md.topics.get(topic)
    if meta is None or meta.error or not meta.partitions:
        raise TallyError(f"topic {topic!r} not found on {bootstrap}")
    return len(meta.partitions)
