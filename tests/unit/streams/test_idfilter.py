"""The in-memory id filter in front of the dedupe index (pure: no I/O)."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streams.idfilter import BITS_PER_ID, IdFilter, words_for

keys_st = st.lists(st.tuples(st.sampled_from(["t1", "t2", ""]), st.text(max_size=12)))


@given(keys_st, keys_st)
def test_an_added_id_is_always_a_maybe(
    added: list[tuple[str, str]], more: list[tuple[str, str]]
) -> None:
    flt = IdFilter(words_for(len(added) + 1, 1 << 20))
    flt.add(added)
    flt.add(more)
    assert flt.maybe(added) == added  # in order, repeats kept
    assert flt.maybe(more) == more
    assert flt.added == len(added) + len(more)


def test_most_new_ids_are_not_a_maybe() -> None:
    """At its planned capacity ~0.5 % of new ids are false positives; at twice that ~3.5 %."""
    flt = IdFilter(words_for(100_000, 1 << 30))
    assert flt.capacity >= 100_000
    flt.add([("t", str(uuid.uuid4())) for _ in range(flt.capacity)])
    new = [("t", str(uuid.uuid4())) for _ in range(100_000)]
    assert len(flt.maybe(new)) < 1_500
    flt.add([("u", str(uuid.uuid4())) for _ in range(flt.capacity)])
    assert len(flt.maybe(new)) < 6_000
    assert flt.maybe([]) == []


def test_a_full_filter_grows_by_layers_within_its_bytes() -> None:
    flt = IdFilter(words_for(10_000, 1 << 30), 1 << 30)
    first = [("t", str(uuid.uuid4())) for _ in range(35_000)]
    for i in range(0, len(first), 1000):
        flt.add(first[i : i + 1000])
    assert [len(layer.words) for layer in flt.layers] == [2500, 5000, 10000]
    assert flt.maybe(first) == first
    new = [("t", str(uuid.uuid4())) for _ in range(100_000)]
    assert len(flt.maybe(new)) < 2_000  # each layer within its planned rate
    capped = IdFilter(4, 32)  # 4 words, at most 32 bytes: no room for a second layer
    capped.add(first[:1000])
    assert len(capped.layers) == 1 and capped.nbytes == 32
    assert capped.maybe(first[:1000]) == first[:1000]
    # less than twice the last layer left: the next one takes what is left
    rest = IdFilter(2500, (2500 + 3000) * 8)
    for i in range(0, 20_000, 1000):
        rest.add(first[i : i + 1000])
    assert [len(layer.words) for layer in rest.layers] == [2500, 3000]
    assert rest.nbytes == rest.max_bytes and rest.maybe(first[:20_000]) == first[:20_000]


def test_size_is_planned_and_bounded() -> None:
    assert words_for(1_000, 1 << 20) * 64 >= 1_000 * BITS_PER_ID
    assert words_for(10**9, 1 << 20) == (1 << 20) // 8  # capped by max_bytes
    assert words_for(0, 1 << 20) == 1
    assert IdFilter(words_for(4096, 1 << 20)).nbytes == 4096 * BITS_PER_ID // 8
    assert IdFilter(10, 1 << 20).capacity == 10 * 64 // BITS_PER_ID
    with pytest.raises(ValueError, match="at least one word"):
        IdFilter(0)
