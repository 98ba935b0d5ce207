from __future__ import annotations

from decimal import Decimal as D

from hypothesis import given

from rating.graduated import rate_graduated
from schemas.pricing import GraduatedPrice, Tier
from tests.unit.rating.strategies import graduated_prices, int_quantities, quantities

SPEC = GraduatedPrice(
    tiers=[
        Tier(up_to=D(10), unit_amount=D(10), flat_amount=D(2)),
        Tier(up_to=D(20), unit_amount=D(5), flat_amount=D(3)),
        Tier(up_to=None, unit_amount=D(5), flat_amount=D(3)),
    ]
)


def test_graduated_known_points() -> None:
    expected = {0: 2, 1: 12, 10: 102, 11: 110, 12: 115, 20: 155, 21: 163}
    for q, amount in expected.items():
        assert rate_graduated(SPEC, D(q)).amount == D(amount), q


def test_graduated_fractional_quantity_slices() -> None:
    assert rate_graduated(SPEC, D("10.5")).amount == D(100) + D(2) + D("2.5") + D(3)


def _reference(spec: GraduatedPrice, q: D) -> D:
    """Independent formula: per tier, clamp(q - lower, 0, width) * rate, plus flat if reached."""
    q = max(q - spec.free_units, D(0))
    out = D(0)
    lowers = [D(0)] + [t.up_to for t in spec.tiers[:-1] if t.up_to is not None]
    for i, (tier, lower) in enumerate(zip(spec.tiers, lowers, strict=True)):
        width = None if tier.up_to is None else tier.up_to - lower
        units = max(q - lower, D(0))
        if width is not None:
            units = min(units, width)
        out += units * tier.unit_amount
        if i == 0 or q > lower:
            out += tier.flat_amount
    return out


@given(spec=graduated_prices(with_wrappers=False), q=quantities)
def test_graduated_equals_sum_of_per_tier_parts(spec: GraduatedPrice, q: D) -> None:
    r = rate_graduated(spec, q)
    assert r.amount == _reference(spec, q)
    assert r.amount == sum((p.amount for p in r.parts), D(0))
    assert sum((p.quantity or D(0) for p in r.parts if p.label.endswith("units")), D(0)) == q


@given(spec=graduated_prices(), q=int_quantities)
def test_graduated_increment_is_marginal_rate(spec: GraduatedPrice, q: D) -> None:
    """Adding one unit costs the rate of the tier that unit falls in (+ its flat if new)."""
    nxt = q + 1 - spec.free_units  # the position of the added unit among chargeable units
    diff = rate_graduated(spec, q + 1).amount - rate_graduated(spec, q).amount
    if nxt <= 0:
        assert diff == 0
        return
    prev = max(nxt - 1, D(0))
    lower = D(0)
    expected = D(0)
    for i, tier in enumerate(spec.tiers):
        upper = tier.up_to
        lo_units = min(max(prev - lower, D(0)), upper - lower if upper is not None else prev)
        hi_units = min(max(nxt - lower, D(0)), upper - lower if upper is not None else nxt)
        expected += (hi_units - lo_units) * tier.unit_amount
        if i > 0 and prev <= lower < nxt:
            expected += tier.flat_amount
        if upper is None:
            break
        lower = upper
    assert diff == expected
