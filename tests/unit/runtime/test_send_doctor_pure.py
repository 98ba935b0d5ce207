"""Pure parts of `tally events send` (ids, records) and `tally doctor` (judgements)."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from runtime.doctor import Status, judge_lag, judge_skew
from runtime.send import _csv_event, derive_id, normalize

_props = st.dictionaries(
    st.text(max_size=5), st.one_of(st.integers(-(2**62), 2**62), st.text(max_size=5)), max_size=4
)


@given(
    st.text(max_size=8), st.text(max_size=8), _props, st.one_of(st.none(), st.integers(0, 2**41))
)
def test_derived_ids_depend_on_content_only(
    type_: str, customer: str, props: dict[str, Any], t: int | None
) -> None:
    ev = {"type": type_, "customer": customer, "properties": props, "time": t}
    again = {
        "time": t,
        "properties": dict(reversed(list(props.items()))),
        "customer": customer,
        "type": type_,
    }
    assert derive_id(ev) == derive_id(again)
    assert derive_id(ev) != derive_id({**ev, "customer": customer + "x"})
    assert normalize(ev)[0]["id"] == derive_id(ev)  # type: ignore[index]


def test_given_ids_are_kept_and_non_objects_refused() -> None:
    assert normalize({"id": "e1", "type": "t"})[0] == {"id": "e1", "type": "t"}
    assert normalize([1])[1] == "expected a JSON object, got list"


def test_csv_rows() -> None:
    event, err = _csv_event({"id": "", "type": "api.call", "customer": "c", "time": "", "tokens": "12.5",
                             "properties": '{"model": "m"}', "empty": ""})  # fmt: skip
    assert err is None and event is not None
    assert event["properties"] == {"tokens": "12.5", "model": "m"}
    assert event["id"].startswith("h-") and "time" not in event
    assert (
        _csv_event({"type": "t", "customer": "c", "properties": "[1]"})[1]
        == "properties must be a JSON object"
    )


def test_skew_judgement() -> None:
    assert judge_skew("the server", 0.3, 0.5).status is Status.OK
    warn = judge_skew("the server", -10, 0.5)
    assert warn.status is Status.WARN and "10.0 s behind" in warn.message and "NTP" in warn.fix
    assert judge_skew("the store", 600, 0.5).status is Status.FAIL


def test_lag_judgement() -> None:
    assert judge_lag(0, {}, {0: 5}, 3, 12).status is Status.OK
    catching = judge_lag(40, {0: 5}, {0: 25}, 2, None)
    assert catching.status is Status.WARN and "catching up" in catching.message
    stuck = judge_lag(40, {0: 5}, {0: 5}, 3, 9000)
    assert stuck.status is Status.FAIL and "tally worker" in stuck.fix and "2.5 h" in stuck.message
