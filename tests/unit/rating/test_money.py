from __future__ import annotations

from decimal import Decimal as D
from fractions import Fraction as F

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rating.money import exact_str, exponent, round_amount, round_half_up, to_decimal
from schemas.pricing import CURRENCY_EXPONENTS
from tally.errors import ValidationError


@pytest.mark.parametrize(
    ("code", "exp"),
    [
        ("USD", 2),
        ("EUR", 2),
        ("JPY", 0),
        ("KRW", 0),
        ("ISK", 0),
        ("CLP", 0),
        ("XOF", 0),
        ("KWD", 3),
        ("BHD", 3),
        ("TND", 3),
        ("OMR", 3),
        ("CLF", 4),
        ("UYW", 4),
    ],
)
def test_exponents(code: str, exp: int) -> None:
    assert exponent(code) == exp


def test_table_shape() -> None:
    assert len(CURRENCY_EXPONENTS) > 150
    assert all(len(c) == 3 and c.isupper() and c.isalpha() for c in CURRENCY_EXPONENTS)
    # withdrawn or without a minor unit: not usable
    for code in ("HRK", "XAU", "XXX", "XTS", "XDR"):
        assert code not in CURRENCY_EXPONENTS


def test_unknown_currency_names_the_field() -> None:
    with pytest.raises(ValidationError) as err:
        round_amount(D(1), "ABC")
    assert [d["field"] for d in err.value.details] == ["currency"]


@pytest.mark.parametrize(
    ("value", "currency", "expected"),
    [
        (D("0.005"), "USD", "0.01"),
        (D("0.0049999"), "USD", "0.00"),
        (D("-0.005"), "USD", "-0.01"),  # half away from zero
        (D("-0.004"), "USD", "0.00"),  # never -0.00
        (D("400.5"), "JPY", "401"),
        (D("0.4995"), "KWD", "0.500"),
        (D(7), "USD", "7.00"),
        (F(2, 3), "USD", "0.67"),
        (F(1, 200), "USD", "0.01"),
    ],
)
def test_round_half_up(value: D | F, currency: str, expected: str) -> None:
    assert str(round_amount(value, currency)) == expected


@given(st.decimals(min_value=-(10**12), max_value=10**12, places=6), st.integers(0, 4))
def test_round_half_up_matches_decimal_quantize(value: D, places: int) -> None:
    from decimal import ROUND_HALF_UP, localcontext

    with localcontext(prec=50):
        expected = value.quantize(D(1).scaleb(-places), rounding=ROUND_HALF_UP)
    got = round_half_up(value, places)
    assert got == expected
    assert got.as_tuple().exponent == -places


def test_to_decimal_and_exact_str() -> None:
    assert to_decimal(F(1, 8)) == D("0.125")
    assert to_decimal(F(1, 3)) is None
    assert exact_str(F(2, 3)) == "2/3"
    assert exact_str(F(5, 4)) == "1.25"
    assert exact_str(D("1.50")) == "1.50"
