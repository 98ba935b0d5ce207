"""Topic generations: the order of the events topics a deployment has produced to.

Embedded mode (``tally run``) keeps the broker's log in memory, so every start produces to a new
topic ``<base>.g<epoch ms of the start>`` (``generation_topic``). A topic's *generation* is that
millisecond number; a topic without the suffix (scale-out's fixed ``tally.events``) has generation
0, and "no topic" (a meter created without an activation marker) has generation -1.

``topic_order`` makes the order total: generation first, then the name, so two different topics
are never "the same position" (the meter activation rule and the backfill boundary must be exact
complements of each other for every pair of topics).
"""

from __future__ import annotations

import re

_GENERATION = re.compile(r"\.g([0-9]{1,18})$")

TopicOrder = tuple[int, str]


def generation_topic(base: str, epoch_ms: int) -> str:
    """The events topic of an embedded start at ``epoch_ms``."""
    return f"{base}.g{int(epoch_ms)}"


def topic_generation(topic: str) -> int:
    """``<base>.g<ms>`` -> ms; a topic without the suffix -> 0; the empty topic -> -1."""
    if not topic:
        return -1
    m = _GENERATION.search(topic)
    return int(m.group(1)) if m else 0


def topic_order(topic: str) -> TopicOrder:
    """Sort key of topics: (generation, name). The empty topic sorts before every topic."""
    return (topic_generation(topic), topic)


__all__ = ["TopicOrder", "generation_topic", "topic_generation", "topic_order"]
