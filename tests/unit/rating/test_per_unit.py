from __future__ import annotations

from decimal import Decimal as D

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rating.per_unit import rate_per_unit
from schemas.pricing import PackageTransform, PerUnitPrice, RoundMode
from tally.errors import ValidationError
from tests.unit.rating.strategies import int_quantities, money, rounds


def test_per_unit_exact() -> None:
    r = rate_per_unit(PerUnitPrice(unit_amount=D("0.0015")), D(333))
    assert r.amount == D("0.4995")


def test_package_transform_rounds_up_and_down() -> None:
    up = PerUnitPrice(unit_amount=D(5), package=PackageTransform(divide_by=D(1000)))
    down = PerUnitPrice(
        unit_amount=D(5), package=PackageTransform(divide_by=D(1000), round=RoundMode.DOWN)
    )
    assert rate_per_unit(up, D(2001)).amount == D(15)
    assert rate_per_unit(down, D(2001)).amount == D(10)
    assert rate_per_unit(up, D(2000)).amount == D(10)
    assert rate_per_unit(up, D(0)).amount == D(0)


def test_free_units_come_off_first() -> None:
    spec = PerUnitPrice(unit_amount=D(2), free_units=D(10))
    assert rate_per_unit(spec, D(25)).amount == D(30)
    assert rate_per_unit(spec, D(3)).amount == D(0)
    assert rate_per_unit(spec, D(25)).parts[0].label == "free units"


def test_negative_quantity_is_refused() -> None:
    with pytest.raises(ValidationError) as err:
        rate_per_unit(PerUnitPrice(unit_amount=D(1)), D(-1))
    assert [d["field"] for d in err.value.details] == ["quantity"]


@given(unit=money, q=int_quantities, mode=rounds)
def test_divide_by_one_equals_plain_per_unit(unit: D, q: D, mode: RoundMode) -> None:
    plain = PerUnitPrice(unit_amount=unit)
    packaged = PerUnitPrice(unit_amount=unit, package=PackageTransform(divide_by=D(1), round=mode))
    assert rate_per_unit(packaged, q).amount == rate_per_unit(plain, q).amount == q * unit


@given(unit=money, q=st.decimals(min_value=0, max_value=10**6, places=9))
def test_per_unit_is_linear(unit: D, q: D) -> None:
    assert rate_per_unit(PerUnitPrice(unit_amount=unit), q).amount == q * unit
