from __future__ import annotations

from decimal import Decimal as D

from hypothesis import given

from rating.staircase import rate_staircase
from schemas.pricing import StaircasePrice, Step
from tests.unit.rating.strategies import quantities, staircase_prices

SPEC = StaircasePrice(
    steps=[
        Step(up_to=D(5), amount=D(0)),
        Step(up_to=D(50), amount=D(99)),
        Step(up_to=None, amount=D(499)),
    ]
)


def test_staircase_bands() -> None:
    assert rate_staircase(SPEC, D(0)).amount == D(0)
    assert rate_staircase(SPEC, D(5)).amount == D(0)
    assert rate_staircase(SPEC, D("5.001")).amount == D(99)
    assert rate_staircase(SPEC, D(50)).amount == D(99)
    assert rate_staircase(SPEC, D(51)).amount == D(499)
    assert rate_staircase(SPEC, D(10**9)).amount == D(499)


@given(spec=staircase_prices(), q=quantities)
def test_staircase_amount_is_one_of_the_steps(spec: StaircasePrice, q: D) -> None:
    amount = rate_staircase(spec, q).amount
    chargeable = max(q - spec.free_units, D(0))
    band = next(s for s in spec.steps if s.up_to is None or chargeable <= s.up_to)
    assert amount == band.amount
