"""Hypothesis strategies shared by the tests of the wire format and of the worker that reads it."""

from __future__ import annotations

from hypothesis import strategies as st

from schemas import envelope

# JSON values for events' properties, with the bulk encoder's separator (``envelope._SEP``, the
# old one too), newlines and JSON's own delimiters inside strings
property_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**63), 2**63 - 1),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=8),
        st.sampled_from(
            [envelope._SEP, "\x00\x01tally-properties\x01\x00", '",{', "},{", "\\", '\\"', "\n"]
        ),
    ),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=12,
)
