from __future__ import annotations

from decimal import Decimal as D

from hypothesis import given

from rating.graduated import rate_graduated
from rating.volume import rate_volume
from schemas.pricing import GraduatedPrice, Tier, VolumePrice
from tests.unit.rating.strategies import money, quantities

SPEC = VolumePrice(
    tiers=[
        Tier(up_to=D(100), unit_amount=D(2), flat_amount=D(10)),
        Tier(up_to=D(200), unit_amount=D(1)),
        Tier(up_to=None, unit_amount=D("0.5"), flat_amount=D(50)),
    ]
)


def test_volume_known_points() -> None:
    assert rate_volume(SPEC, D(0)).amount == D(10)
    assert rate_volume(SPEC, D(100)).amount == D(210)  # up_to is inclusive
    assert rate_volume(SPEC, D(101)).amount == D(101)
    assert rate_volume(SPEC, D(300)).amount == D(200)


def test_volume_is_not_monotonic_in_general() -> None:
    """Documented: crossing into a cheaper tier lowers the amount (210 at 100, 101 at 101)."""
    assert rate_volume(SPEC, D(101)).amount < rate_volume(SPEC, D(100)).amount


@given(rate=money, flat=money, q=quantities)
def test_volume_equals_graduated_with_one_tier(rate: D, flat: D, q: D) -> None:
    tier = Tier(up_to=None, unit_amount=rate, flat_amount=flat)
    vol = rate_volume(VolumePrice(tiers=[tier]), q).amount
    assert vol == rate_graduated(GraduatedPrice(tiers=[tier]), q).amount == q * rate + flat
