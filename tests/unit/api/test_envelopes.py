from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from api.envelopes import group_rows
from api.ingest_parse import Row, row_to_event
from schemas.envelope import decode, group

rows_st = st.lists(
    st.tuples(
        st.text(min_size=1, max_size=12),
        st.sampled_from(["a", "b"]),
        st.text(min_size=1, max_size=5),
        st.integers(0, 4_102_444_800_000),
        st.dictionaries(st.text(max_size=4), st.integers(-(2**63), 2**63 - 1), max_size=2),
    ),
    max_size=60,
)


@given(rows_st, st.integers(1, 9), st.integers(1, 7), st.text(min_size=1, max_size=8))
def test_same_bytes_as_schemas_envelope_group(
    rows: list[Row], partitions: int, max_events: int, tenant: str
) -> None:
    """The fast path produces exactly the envelopes of the reference implementation."""
    fast = group_rows(tenant, 1_700_000_000_000, rows, partitions, max_events)
    ref = group(tenant, 1_700_000_000_000, [row_to_event(r) for r in rows], partitions, max_events)
    assert fast == ref


@given(rows_st, st.integers(1, 9))
def test_every_event_once_and_decodable(rows: list[Row], partitions: int) -> None:
    envs = group_rows("t", 5, rows, partitions, 4)
    seen = []
    for env in envs:
        dec = decode(env.payload)
        assert dec.tenant_id == "t" and dec.ingested_at_ms == 5
        assert 0 < len(dec.events) <= 4
        assert tuple(e.id for e in dec.events) == env.event_ids
        seen.extend((e.id, e.type, e.customer, e.time_ms, e.properties) for e in dec.events)
    assert sorted(seen, key=repr) == sorted(rows, key=repr)
