"""Reconciliation diff (pure)."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from billing.reconcile import diff, parse_csv, report_csv
from schemas.billing import ExternalLine

D = Decimal
A, B = datetime(2025, 2, 1, tzinfo=UTC), datetime(2025, 3, 1, tzinfo=UTC)


def L(c: str, ch: str, amount: str, q: str | None = None, g: str = "") -> ExternalLine:
    return ExternalLine(
        customer_id=c, charge=ch, group=g, quantity=D(q) if q else None, amount=D(amount)
    )


def test_crafted_differences() -> None:
    tally = [
        L("a", "base", "30.00", "1"),
        L("a", "api", "23.01", "1501"),
        L("b", "base", "30.00", "1"),
        L("b", "api", "5.00", "600"),
        L("c", "base", "30.00", "1"),
    ]
    other = [
        L("a", "base", "30.00", "1"),
        L("a", "api", "23.01", "1501"),
        L("b", "base", "30.00", "1"),
        L("b", "api", "5.00", "650"),
        L("c", "base", "29.00"),
        L("d", "base", "30.00", "1"),
    ]
    r = diff(tally, other, A, B)
    status = {(ln.customer_id, ln.charge): ln.status.value for ln in r.lines}
    assert status == {
        ("a", "base"): "matched",
        ("a", "api"): "matched",
        ("b", "base"): "matched",
        ("b", "api"): "quantity_mismatch",
        ("c", "base"): "amount_mismatch",
        ("d", "base"): "extra",
    }
    assert r.counts == {
        "matched": 3,
        "missing": 0,
        "extra": 1,
        "quantity_mismatch": 1,
        "amount_mismatch": 1,
    }
    assert r.match_rate == D("50.00")
    assert (r.tally_total, r.other_total, r.difference) == (D("118.01"), D("147.01"), D("-29.00"))
    other2 = [ln for ln in other if ln.customer_id != "c"] + [L("c", "base", "29.99")]
    r2 = diff(tally, other2, A, B, amount_tolerance=D("0.01"))
    assert {ln.charge: ln.status.value for ln in r2.lines if ln.customer_id == "c"} == {
        "base": "matched"
    }
    text = report_csv(r)
    assert text.splitlines()[0].startswith("customer_id,charge,group,status")
    assert "match_rate=50.00" in text


def test_csv_import() -> None:
    rows = parse_csv("customer_id,charge,quantity,amount\na,api,10,1.50\nb,base,,30\n")
    assert rows == [L("a", "api", "1.50", "10"), L("b", "base", "30")]


keys = st.tuples(st.sampled_from("abc"), st.sampled_from(["base", "api"]), st.integers(0, 10**6))


@settings(max_examples=200, deadline=None)
@given(st.lists(keys, max_size=20), st.lists(keys, max_size=20))
def test_diff_invariants(xs: list, ys: list) -> None:
    left = [L(c, ch, str(D(a).scaleb(-2))) for c, ch, a in xs]
    right = [L(c, ch, str(D(a).scaleb(-2))) for c, ch, a in ys]
    same = diff(left, left, A, B)
    assert same.match_rate == D("100.00") and same.difference == 0
    r = diff(left, right, A, B)
    assert sum(r.counts.values()) == len(r.lines)
    assert r.difference == sum((ln.amount_difference for ln in r.lines), D(0))
    assert r.difference == r.tally_total - r.other_total
