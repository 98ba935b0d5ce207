"""Pure invoice math: totals = sum of rounded lines (tax exclusive and inclusive), discounts,
late-usage adjustments. No I/O."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rating.adjustments import Billed, key_of, late_adjustments
from rating.discounts import DiscountSpec, discount_lines
from rating.lines import make_line
from rating.tax import document_totals
from schemas.pricing import LineItem, LineKind

D = Decimal
P0, P1 = datetime(2025, 2, 1, tzinfo=UTC), datetime(2025, 3, 1, tzinfo=UTC)


def line(
    amount: str, key: str | None = "api", kind: LineKind = LineKind.USAGE, q: str = "1"
) -> LineItem:
    return make_line(
        kind,
        D(amount),
        "USD",
        quantity=D(q),
        charge_key=key,
        description=key or "",
        period_start=P0,
        period_end=P1,
    )


cents = st.integers(min_value=-(10**7), max_value=10**8).map(lambda n: D(n).scaleb(-2))
rates = st.dictionaries(
    st.sampled_from(["VAT", "GST", "city"]),
    st.integers(min_value=0, max_value=3000).map(lambda n: D(n).scaleb(-2)),
    max_size=3,
)


@settings(max_examples=300, deadline=None)
@given(st.lists(cents, max_size=30), rates, st.booleans())
def test_totals_are_sums_of_rounded_lines(
    amounts: list[Decimal], tax_rates: dict[str, Decimal], inclusive: bool
) -> None:
    lines = [line(str(a)) for a in amounts]
    t = document_totals(lines, tax_rates, "USD", inclusive=inclusive)
    gross = sum((ln.amount for ln in lines), D(0))
    assert t.tax == sum(t.line_taxes, D(0)) == sum((a for _, _, a in t.taxes), D(0))
    if inclusive:
        assert t.total == gross and t.subtotal == gross - t.tax
    else:
        assert t.subtotal == gross and t.total == gross + t.tax
    for v in (t.subtotal, t.tax, t.total, *t.line_taxes):
        assert v == v.quantize(D("0.01"))  # cents, never more


def test_tax_exclusive_and_inclusive_by_hand() -> None:
    lines = [line("0.05"), line("0.05"), line("10.00"), line("-2.00")]
    ex = document_totals(lines, {"VAT": D("10")}, "USD")
    assert (ex.subtotal, ex.tax, ex.total) == (D("8.10"), D("0.82"), D("8.92"))
    # 120.00 gross at 20 % inclusive: tax 120 * 20/120 = 20.00, net 100.00
    inc = document_totals([line("120.00")], {"VAT": D("20")}, "USD", inclusive=True)
    assert (inc.subtotal, inc.tax, inc.total) == (D("100.00"), D("20.00"), D("120.00"))
    # Two inclusive rates share the denominator: 115 at 10 % + 5 %: 10.00 and 5.00.
    two = document_totals([line("115.00")], {"A": D("10"), "B": D("5")}, "USD", inclusive=True)
    assert [a for _, _, a in two.taxes] == [D("10.00"), D("5.00")] and two.subtotal == D("100.00")


def test_discounts_per_charge_then_per_invoice() -> None:
    lines = [line("30.00", "base", LineKind.FIXED), line("23.01", "api"), line("1.00", "storage")]
    out = discount_lines(
        lines,
        [
            DiscountSpec("b", percentage=D("10")),  # invoice: 10 % of what is left
            DiscountSpec("a", percentage=D("50"), charge_key="api"),  # 11.505 -> 11.51
            DiscountSpec("c", amount=D("5"), charge_key="storage"),  # capped at 1.00
        ],
        "USD",
    )
    assert [(d.charge_key, d.amount) for d in out] == [
        ("api", D("-11.51")),
        ("storage", D("-1.00")),
        (None, D("-4.15")),
    ]
    # invoice base = 54.01 - 11.51 - 1.00 = 41.50; 10 % = 4.15
    assert all(d.kind is LineKind.DISCOUNT for d in out)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(cents, min_size=1, max_size=10),
    st.lists(st.integers(1, 100_000), max_size=4),
    st.lists(st.integers(1, 100), max_size=3),
)
def test_discounts_never_exceed_their_base(
    amounts: list[Decimal], fixed: list[int], pcts: list[int]
) -> None:
    lines = [line(str(a)) for a in amounts]
    specs = [DiscountSpec(f"f{i}", amount=D(v).scaleb(-2)) for i, v in enumerate(fixed)]
    specs += [DiscountSpec(f"p{i}", percentage=D(v)) for i, v in enumerate(pcts)]
    out = discount_lines(lines, specs, "USD")
    gross = sum((ln.amount for ln in lines), D(0))
    total = gross + sum((d.amount for d in out), D(0))
    assert all(d.amount < 0 for d in out)
    if gross > 0:
        assert total >= 0
    else:
        assert out == []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 10**6)), min_size=1, max_size=6))
def test_late_adjustments_bring_billed_to_the_rerated_amounts(pairs: list[tuple[int, int]]) -> None:
    billed = {}
    rerated = []
    for i, (old, new) in enumerate(pairs):
        old_line = line(str(D(old).scaleb(-2)), f"c{i}", q=str(old))
        billed[key_of(old_line)] = Billed(old_line.quantity, old_line.amount, old_line)
        rerated.append(line(str(D(new).scaleb(-2)), f"c{i}", q=str(new)))
    adj = late_adjustments(rerated, billed, "USD", "Feb")
    got = {k: billed[k].amount for k in billed}
    for k, ln in adj:
        assert ln.kind is LineKind.ADJUSTMENT and ln.period_start == P0
        got[k] += ln.amount
    assert got == {key_of(r): r.amount for r in rerated}


def test_unknown_currency_lines_are_refused() -> None:
    with pytest.raises(Exception, match="line 0"):
        document_totals([make_line(LineKind.USAGE, D(1), "EUR")], {}, "USD")
