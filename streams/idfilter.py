"""An in-memory filter of event ids (a blocked Bloom filter) in front of the on-disk dedupe index.

Almost every id the worker looks up is new. Looking one up in the sqlite index costs 3-7 us
(B-tree searches in two tables whose pages mostly miss sqlite's bounded page cache), and that
grows with the index. The filter answers "certainly not in the index" for ~99 % of new ids from
memory, so only the rest (the real duplicates and a few false positives) reach sqlite. It never
answers "present": a hit only means "ask the index". So the dedupe stays exact whatever the
filter holds, as long as it holds every id of the index (``streams.dedupe.DedupeIndex`` keeps
that true: it adds every id it records and builds the filter again from the file when the file
may have changed behind its back).

Layout: one 64-bit word per id picks ``_K`` bits of that word (one memory access per lookup);
``BITS_PER_ID`` bits of memory per planned id give ~0.5 % false positives at capacity. A layer
that reaches its capacity gets a successor twice its size for the ids that follow (a scalable
Bloom filter: nothing is read again), or as large as the rest of ``max_bytes`` allows; once
all of it is used the last layer takes more ids than planned and answers "maybe" more often.
Hashes are Python's own ``hash`` of the ``(tenant_id, event_id)`` tuple (salted per process:
the filter is never stored), mixed once, and the bit work is vectorised with numpy.
"""

from __future__ import annotations

from collections.abc import Collection
from itertools import compress

import numpy as np

Key = tuple[str, str]
BITS_PER_ID = 16
_K = 5  # bits set per id, inside its word (the 30 low bits of the mixed hash; the word: its top 32)
_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd: a bijection of the 64-bit hashes
_SIX = np.uint64(6)
_SIXTY_THREE = np.uint64(63)
_THIRTY_TWO = np.uint64(32)
_ONE = np.uint64(1)


def words_for(capacity: int, max_bytes: int) -> int:
    """Words (8 bytes each) of a filter planned for ``capacity`` ids, at most ``max_bytes``."""
    return max(1, min(-(-capacity * BITS_PER_ID // 64), max_bytes // 8))


class _Layer:
    def __init__(self, words: int) -> None:
        self.words = np.zeros(words, dtype=np.uint64)
        self.n = np.uint64(words)
        self.capacity = words * 64 // BITS_PER_ID
        self.added = 0

    def word(self, h: np.ndarray) -> np.ndarray:
        return ((h >> _THIRTY_TWO) * self.n) >> _THIRTY_TWO  # in [0, words): the top 32 bits


class IdFilter:
    """A set of ids that may answer "maybe" for ids it never got, never "no" for one it got."""

    def __init__(self, words: int, max_bytes: int | None = None) -> None:
        if words < 1:
            raise ValueError("an id filter needs at least one word")
        self.max_bytes = max_bytes if max_bytes is not None else words * 8
        self.layers = [_Layer(words)]
        self.added = 0  # ids added (with repeats)

    @property
    def capacity(self) -> int:
        """Ids it holds at its planned false-positive rate (all layers)."""
        return sum(layer.capacity for layer in self.layers)

    @property
    def nbytes(self) -> int:
        return sum(int(layer.words.nbytes) for layer in self.layers)

    @staticmethod
    def _hash(keys: Collection[Key]) -> tuple[np.ndarray, np.ndarray]:
        """(mixed hash, bit mask) per key."""
        h = np.fromiter(map(hash, keys), dtype=np.int64, count=len(keys)).view(np.uint64)
        h = h * _MIX  # wraps: the low bits of Python's tuple hash are mixed into the high ones
        mask = np.zeros(len(keys), dtype=np.uint64)
        bits = h
        for _ in range(_K):
            mask |= _ONE << (bits & _SIXTY_THREE)
            bits = bits >> _SIX
        return h, mask

    def add(self, keys: Collection[Key]) -> None:
        if not keys:
            return
        last = self.layers[-1]
        if last.added >= last.capacity:
            # full: the ids that follow go into a layer twice its size, or all the bytes left
            words = min(2 * len(last.words), (self.max_bytes - self.nbytes) // 8)
            if words > 0:
                last = _Layer(words)
                self.layers.append(last)
        h, mask = self._hash(keys)
        np.bitwise_or.at(last.words, last.word(h), mask)
        last.added += len(keys)
        self.added += len(keys)

    def maybe(self, keys: Collection[Key]) -> list[Key]:
        """The keys that may have been added (every key that was, and a few that were not)."""
        if not keys:
            return []
        h, mask = self._hash(keys)
        hit = np.zeros(len(keys), dtype=bool)
        for layer in self.layers:
            hit |= (layer.words[layer.word(h)] & mask) == mask
        return list(compress(keys, hit.tolist()))
