from __future__ import annotations

from decimal import Decimal as D

from hypothesis import given

from rating.package import rate_package
from rating.per_unit import rate_per_unit
from schemas.pricing import PackagePrice, PerUnitPrice, RoundMode
from tests.unit.rating.strategies import int_quantities, money, positive, quantities, rounds


def test_package_round_up_and_down() -> None:
    up = PackagePrice(package_size=D(10), amount=D(100))
    down = PackagePrice(package_size=D(10), amount=D(100), round=RoundMode.DOWN)
    assert rate_package(up, D(121)).amount == D(1300)
    assert rate_package(down, D(121)).amount == D(1200)
    assert rate_package(up, D(120)).amount == D(1200)
    assert rate_package(up, D(0)).amount == D(0)


def test_package_free_units() -> None:
    spec = PackagePrice(package_size=D(10), amount=D(100), free_units=D(10))
    assert rate_package(spec, D(121)).amount == D(1200)
    assert rate_package(spec, D(5)).amount == D(0)


@given(unit=money, q=int_quantities, mode=rounds)
def test_package_size_one_equals_per_unit(unit: D, q: D, mode: RoundMode) -> None:
    pkg = PackagePrice(package_size=D(1), amount=unit, round=mode)
    assert rate_package(pkg, q).amount == rate_per_unit(PerUnitPrice(unit_amount=unit), q).amount


@given(size=positive, amount=money, q=quantities)
def test_package_count_brackets_quantity(size: D, amount: D, q: D) -> None:
    n_up = rate_package(PackagePrice(package_size=size, amount=D(1)), q).amount
    n_down = rate_package(
        PackagePrice(package_size=size, amount=D(1), round=RoundMode.DOWN), q
    ).amount
    assert n_down == int(n_down) and n_up == int(n_up)
    assert n_down * size <= q <= n_up * size
    assert n_up - n_down in (0, 1)
    assert (n_up - n_down == 0) == (q % size == 0)
