"""Records about the stream worker that cross package lines: its chain state in the store
(progress + partition claims) and its status (in-process, or as a heartbeat row in the store).

Instants are epoch milliseconds (UTC), like the wire format; ``None`` means "never".
"""

from __future__ import annotations

from dataclasses import dataclass, field

WORKER_STATES = ("starting", "running", "stopped")


def chain_token(topic: str, partition: int, first: int) -> str:
    """The insert deduplication token of the link of ``topic``/``partition`` that starts at
    offset ``first``: ``"<topic>/<partition>/<first>"``.

    It names only where the link starts, not where it ends: every writer that extends the chain
    from the same point sends the same token, whatever it buffered since, so the store keeps one
    of them (the first to land) and the others are no-ops. Topic names cannot contain ``/``, so
    the token is unambiguous.
    """
    if partition < 0 or first < 0:
        raise ValueError(f"partition and first offset must be >= 0 (got {partition}, {first})")
    return f"{topic}/{partition}/{first}"


@dataclass(frozen=True, slots=True)
class Claim:
    """The newest claim of a partition: who says it owns it since when (``epoch``, wall ms)."""

    epoch: int
    owner: str


@dataclass(frozen=True, slots=True)
class ChainState:
    """What the store says about some partitions of a topic, read in one query.

    ``progress[p]``: end of the commit chain (last stored offset; absent = nothing stored).
    ``claims[p]``: the newest claim (absent = never claimed).
    ``mark``: the store's position the read saw, opaque to the worker (0 = none): a later read
    given this state as ``since`` (``Sink.read_chain``) may skip what had landed by then.
    """

    progress: dict[int, int] = field(default_factory=dict)
    claims: dict[int, Claim] = field(default_factory=dict)
    mark: int = 0


@dataclass(frozen=True, slots=True)
class WorkerStatus:
    """A worker's status: from the worker in this process, or from its newest heartbeat row.

    ``state``: ``starting`` (no partitions ready yet), ``running`` or ``stopped``.
    ``failing_since_ms``: first failure (store error, unresolved commit, partition set-up) since
    the last success; ``None`` while commits go through.
    """

    worker_id: str
    topic: str
    state: str
    beat_ms: int
    started_ms: int
    last_commit_ms: int | None = None
    failing_since_ms: int | None = None
    last_error: str = ""
    partitions: tuple[int, ...] = ()
