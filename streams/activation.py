"""Meter activation (pure): which meters apply at a position of the events log.

The stream/backfill boundary of a meter X is a position in each partition's log, fixed by the
broker: the offset of the first ``activate_meter`` marker of X in that partition. Every worker
(also a zombie and the partition's next owner) sees the same log, so they all draw the same line,
whatever the wall clocks and the worker's lag. The rule (``meter_applies``), for an event at
(topic T, partition p, offset o)::

    X applies  iff  order(X.activation_topic) < order(T)
               or  (X.activation_topic == T and first marker of X in (T, p) has offset < o)

``order`` is ``schemas.topics.topic_order`` (generation, then name); a meter with an empty
activation topic sorts before every topic (it applies everywhere). The backfill counts exactly the
complement (``streams.backfill.Boundary.includes``).

``Activations`` is the worker's state for its topic: per partition, the first marker offset of
each meter activated there. It is rebuilt on assignment from the stored activation rows with
offset <= the partition's committed progress M (markers above M are read again from Kafka), and
updated by ``mark`` as markers are processed, before the flush that holds them is committed: a
failed flush is retried with the same messages (same first marker), and events after a marker are
never committed before the marker's own flush, so recording it early is safe.
"""

from __future__ import annotations

from schemas.topics import TopicOrder, topic_order

NO_MARKER = 1 << 62  # larger than any offset


def meter_applies(
    meter_topic: str, event_topic: str, first_marker: int | None, offset: int
) -> bool:
    """The rule above, for one meter and one event position (``first_marker``: the offset of the
    meter's first marker in the event's partition, None if none was processed)."""
    if topic_order(meter_topic) < topic_order(event_topic):
        return True
    return meter_topic == event_topic and first_marker is not None and first_marker < offset


class Activations:
    """Per-partition first-marker offsets of the meters activated in ``topic``."""

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.order: TopicOrder = topic_order(topic)
        self._parts: dict[int, dict[str, int]] = {}
        self._to_load: dict[int, int] = {}
        self._before: dict[str, bool] = {}

    # --- assignment ---------------------------------------------------------------------------
    def assign(self, partition: int, store_progress: int) -> None:
        """The partition's state must be (re)loaded with markers <= ``store_progress``."""
        self._parts.pop(partition, None)
        self._to_load[partition] = store_progress

    def revoke(self, partition: int) -> None:
        self._parts.pop(partition, None)
        self._to_load.pop(partition, None)

    def to_load(self) -> dict[int, int]:
        """Partitions waiting for ``load``: partition -> the progress to load up to."""
        return dict(self._to_load)

    def load(self, partition: int, first_markers: dict[str, int]) -> None:
        self._parts[partition] = dict(first_markers)
        self._to_load.pop(partition, None)

    # --- markers ------------------------------------------------------------------------------
    def mark(self, partition: int, meter_id: str, offset: int) -> bool:
        """A marker of ``meter_id`` at ``offset``. True if it is the meter's first marker in the
        partition (its activation row must be written), False for a later repeat."""
        part = self._parts.setdefault(partition, {})
        first = part.get(meter_id)
        if first is None or offset < first:
            part[meter_id] = offset
            return True
        return first == offset  # the same marker again (a retried flush): write the row again

    # --- the rule -----------------------------------------------------------------------------
    def always(self, meter_id: str, meter_topic: str) -> bool:
        """True if the meter applies to every event of this topic (activated in an earlier one)."""
        known = self._before.get(meter_id)
        if known is None:
            known = self._before[meter_id] = topic_order(meter_topic) < self.order
        return known

    def first_markers(self, partition: int) -> dict[str, int]:
        """meter id -> first marker offset in the partition (empty if none)."""
        return self._parts.get(partition, {})

    def applies(self, meter_id: str, meter_topic: str, partition: int, offset: int) -> bool:
        if self.always(meter_id, meter_topic):
            return True
        if meter_topic != self.topic:
            return False
        return self._parts.get(partition, {}).get(meter_id, NO_MARKER) < offset
