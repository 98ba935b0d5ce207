from __future__ import annotations

from decimal import Decimal as D

from hypothesis import given

from rating.flat import rate_flat
from schemas.pricing import FlatPrice
from tests.unit.rating.strategies import money, quantities


def test_flat_fee_ignores_quantity() -> None:
    spec = FlatPrice(amount=D("49.99"))
    assert rate_flat(spec, D(0)).amount == D("49.99")
    assert rate_flat(spec, D(1234)).amount == D("49.99")
    assert [p.label for p in rate_flat(spec).parts] == ["flat fee"]


@given(amount=money, q=quantities)
def test_flat_is_constant(amount: D, q: D) -> None:
    assert rate_flat(FlatPrice(amount=amount), q).amount == amount
