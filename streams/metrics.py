"""Every metric of the stream worker, in one place (names are a contract: dashboards, alerts and
tests use them; docs/deploy.md lists them).

A ``WorkerMetrics`` is made on the process registry (``tally.metrics.process_registry``) by the
entry point and injected into ``StreamWorker`` and ``BatchProcessor``; without one they make
their own on a private registry (unit tests). The processor calls the hooks at a few points:

- ``BatchProcessor.add``: ``consumed`` (events of each message read), ``poison`` (undecodable
  messages), ``skipped`` (messages at or below the stored progress);
- ``BatchProcessor.flush_batch``: ``flush_seconds``, ``flush_rows{table}`` (rows of each insert
  that returned; ``BatchProcessor.prepare`` counts the ledger rows it inserts ahead),
  ``store_errors`` (attempts that met a store error; ``prepare``'s ledger inserts too);
- ``BatchProcessor.apply`` for a stored link: ``stored``, ``duplicate``, ``late``,
  ``meter_value_errors``, ``dead_letters{reason}``;
- the worker's monitor loop (every ``worker_heartbeat_s``): ``consumer_lag{partition}``,
  ``freshness_seconds``, ``dedupe_index_entries``, ``partitions``, ``held_events``, ``up``,
  ``store_up`` (the heartbeat write), ``broker_up`` (the lag measurement),
  ``failing_seconds``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

FLUSH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

OUTCOMES = ("consumed", "stored", "duplicate", "poison")
TABLES = ("events", "usage_minute", "meter_activations", "dead_letters")


class WorkerMetrics:
    """The worker's metrics on ``registry`` (a private one when None)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry if registry is not None else CollectorRegistry()
        self.events = Counter(
            "tally_worker_events",
            "Events by outcome: consumed (read from the topic), stored (kept in the ledger), "
            "duplicate (an id stored before, or earlier in the same link), poison (undecodable "
            "messages, counted per message)",
            ["outcome"],
            registry=r,
        )
        self.consumed = self.events.labels("consumed")
        self.stored = self.events.labels("stored")
        self.duplicate = self.events.labels("duplicate")
        self.poison = self.events.labels("poison")
        self.late = Counter(
            "tally_worker_late_events",
            "Stored events whose event time is more than late_event_s before they were accepted",
            registry=r,
        )
        self.flush_seconds = Histogram(
            "tally_worker_flush_seconds",
            "One commit attempt: read progress, insert events, activations and links, verify",
            buckets=FLUSH_BUCKETS,
            registry=r,
        )
        self.flush_rows = Counter(
            "tally_worker_flush_rows",
            "Rows written per table by commit attempts (a retried attempt writes its rows again)",
            ["table"],
            registry=r,
        )
        for table in TABLES:
            self.flush_rows.labels(table)
        self.store_errors = Counter(
            "tally_worker_store_errors",
            "Commit attempts, partition set-ups and ledger inserts made while preparing a link "
            "that met a store error",
            registry=r,
        )
        self.consumer_lag = Gauge(
            "tally_worker_consumer_lag",
            "Messages in the partition's log after the last stored offset (log end from a fetch "
            "response's high watermark; see docs/deploy.md)",
            ["partition"],
            registry=r,
        )
        self.freshness = Gauge(
            "tally_worker_freshness_seconds",
            "Age of the oldest message accepted by the broker and not stored yet (0 when none)",
            registry=r,
        )
        self.dedupe_entries = Gauge(
            "tally_worker_dedupe_index_entries",
            "Event ids in the worker's local dedupe indexes (within the dedupe horizon; written or held for the next batched write)",
            registry=r,
        )
        self.partitions = Gauge(
            "tally_worker_partitions", "Partitions assigned to this worker and set up", registry=r
        )
        self.held_events = Gauge(
            "tally_worker_held_events",
            "Events read and not stored yet (buffered and sealed links)",
            registry=r,
        )
        self.markers = Counter(
            "tally_worker_activation_markers",
            "Meter activation markers processed (first in a partition)",
            registry=r,
        )
        self.meter_value_errors = Counter(
            "tally_worker_meter_value_errors",
            "Events that matched a meter but had an unusable value",
            registry=r,
        )
        # by reason: schemas.deadletters.REASONS
        self.dead_letters = Counter(
            "tally_worker_dead_letters",
            "Dead letters written by committed links, by reason (schemas.deadletters)",
            ["reason"],
            registry=r,
        )
        self.skipped = Counter(
            "tally_worker_skipped_messages",
            "Messages skipped as already stored (offset at or below the stored progress)",
            registry=r,
        )
        self.commits = Counter(
            "tally_worker_commits",
            "Links resolved as stored or adopted from another writer",
            registry=r,
        )
        self.fenced = Counter(
            "tally_worker_fenced_partitions",
            "Partitions dropped because another worker claimed them",
            registry=r,
        )
        self.up = Gauge(
            "tally_worker_up",
            "1 while the worker runs (partitions set up, consuming), 0 when starting or stopped",
            registry=r,
        )
        self.store_up = Gauge(
            "tally_worker_store_up",
            "1 when the worker's last heartbeat write to the store succeeded, else 0",
            registry=r,
        )
        self.broker_up = Gauge(
            "tally_worker_broker_up",
            "1 when the worker's last lag measurement got an answer from the broker, else 0",
            registry=r,
        )
        self.failing_seconds = Gauge(
            "tally_worker_failing_seconds",
            "How long commits have been failing (0 while they go through)",
            registry=r,
        )
        self.lag_probe_errors = Counter(
            "tally_worker_lag_probe_errors",
            "Lag measurements that failed (broker or store unreachable)",
            registry=r,
        )
        self._lag_partitions: set[int] = set()

    def set_lag(self, lags: dict[int, int]) -> None:
        """Publish the lag of the partitions this worker owns; forget the others."""
        for p, lag in lags.items():
            self.consumer_lag.labels(str(p)).set(lag)
        for p in self._lag_partitions - set(lags):
            self.consumer_lag.remove(str(p))
        self._lag_partitions = set(lags)
