"""Hypothesis strategies for price specs (shared by the rating unit tests)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from hypothesis import strategies as st

from schemas.pricing import (
    FlatPrice,
    GraduatedPrice,
    PackagePrice,
    PackageTransform,
    PercentagePrice,
    PerUnitPrice,
    RoundMode,
    StaircasePrice,
    Step,
    Tier,
    VolumePrice,
)

money = st.decimals(min_value=0, max_value=1000, places=4, allow_nan=False, allow_infinity=False)
quantities = st.decimals(
    min_value=0, max_value=100_000, places=3, allow_nan=False, allow_infinity=False
)
int_quantities = st.integers(min_value=0, max_value=100_000).map(Decimal)
positive = st.decimals(
    min_value=Decimal("0.001"), max_value=1000, places=3, allow_nan=False, allow_infinity=False
)
rounds = st.sampled_from([RoundMode.UP, RoundMode.DOWN])


@st.composite
def bounds(draw: st.DrawFn, max_bands: int = 5) -> list[Decimal]:
    """Strictly increasing positive up_to values (the open last band is added by callers)."""
    values = draw(
        st.lists(
            st.decimals(min_value=Decimal("0.5"), max_value=50_000, places=1),
            min_size=0,
            max_size=max_bands - 1,
            unique=True,
        )
    )
    return sorted(values)


@st.composite
def wrappers(draw: st.DrawFn) -> dict[str, Any]:
    free = draw(st.one_of(st.just(Decimal(0)), quantities))
    lo = draw(st.one_of(st.none(), money))
    hi = draw(st.one_of(st.none(), money))
    if lo is not None and hi is not None and lo > hi:
        lo, hi = hi, lo
    return {"free_units": free, "minimum": lo, "maximum": hi}


@st.composite
def tier_lists(draw: st.DrawFn, non_decreasing: bool = False) -> list[Tier]:
    ups: list[Decimal | None] = [*draw(bounds()), None]
    rates = [draw(money) for _ in ups]
    flats = [draw(money) for _ in ups]
    if non_decreasing:
        rates.sort()
        flats.sort()
    return [
        Tier(up_to=u, unit_amount=r, flat_amount=f)
        for u, r, f in zip(ups, rates, flats, strict=True)
    ]


@st.composite
def graduated_prices(draw: st.DrawFn, with_wrappers: bool = True) -> GraduatedPrice:
    w = draw(wrappers()) if with_wrappers else {}
    return GraduatedPrice(tiers=draw(tier_lists()), **w)


@st.composite
def volume_prices(draw: st.DrawFn, non_decreasing: bool = False) -> VolumePrice:
    return VolumePrice(tiers=draw(tier_lists(non_decreasing=non_decreasing)), **draw(wrappers()))


@st.composite
def staircase_prices(draw: st.DrawFn, non_decreasing: bool = False) -> StaircasePrice:
    ups: list[Decimal | None] = [*draw(bounds()), None]
    amounts = [draw(money) for _ in ups]
    if non_decreasing:
        amounts.sort()
    steps = [Step(up_to=u, amount=a) for u, a in zip(ups, amounts, strict=True)]
    return StaircasePrice(steps=steps, **draw(wrappers()))


@st.composite
def flat_prices(draw: st.DrawFn) -> FlatPrice:
    return FlatPrice(amount=draw(money), **draw(wrappers()))


@st.composite
def per_unit_prices(draw: st.DrawFn) -> PerUnitPrice:
    package = draw(
        st.one_of(st.none(), st.builds(PackageTransform, divide_by=positive, round=rounds))
    )
    return PerUnitPrice(unit_amount=draw(money), package=package, **draw(wrappers()))


@st.composite
def package_prices(draw: st.DrawFn) -> PackagePrice:
    return PackagePrice(
        package_size=draw(positive), amount=draw(money), round=draw(rounds), **draw(wrappers())
    )


@st.composite
def percentage_prices(draw: st.DrawFn, per_event_bounds: bool = True) -> PercentagePrice:
    lo = draw(st.one_of(st.none(), money)) if per_event_bounds else None
    hi = draw(st.one_of(st.none(), money)) if per_event_bounds else None
    if lo is not None and hi is not None and lo > hi:
        lo, hi = hi, lo
    return PercentagePrice(
        rate=draw(st.decimals(min_value=0, max_value=100, places=2)),
        fixed_amount=draw(money),
        min_per_event=lo,
        max_per_event=hi,
        **draw(wrappers()),
    )
