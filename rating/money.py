"""Exact money arithmetic and the one rounding rule (half-up to the currency's exponent)."""

from __future__ import annotations

import decimal
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from fractions import Fraction

from schemas.pricing import CURRENCY_EXPONENTS
from tally.errors import ValidationError

Exact = Decimal | Fraction

# Enough digits for Decimal(38, 9) quantities times prices with many places; any rounding that
# would still happen is trapped (Inexact) and reported instead of silently losing money.
_CONTEXT = decimal.Context(
    prec=120,
    rounding=decimal.ROUND_HALF_UP,
    Emax=decimal.MAX_EMAX,
    Emin=decimal.MIN_EMIN,
    traps=[decimal.InvalidOperation, decimal.DivisionByZero, decimal.Overflow, decimal.Inexact],
)


@contextmanager
def exact() -> Iterator[decimal.Context]:
    """A decimal context in which any inexact operation raises instead of rounding."""
    with decimal.localcontext(_CONTEXT) as ctx:
        try:
            yield ctx
        except decimal.Inexact as exc:
            raise ValidationError(
                "amount exceeds the exact precision of the rating engine",
                field="quantity",
            ) from exc


def exponent(currency: str) -> int:
    """Minor-unit digits of ``currency``; tally ValidationError naming ``currency`` if unknown."""
    try:
        return CURRENCY_EXPONENTS[currency.upper()]
    except (KeyError, AttributeError):
        raise ValidationError(
            f"unknown currency {currency!r} (not an active ISO 4217 code)",
            field="currency",
        ) from None


def round_half_up(value: Exact, places: int) -> Decimal:
    """Round an exact value half-up (ties away from zero) to ``places`` decimals. Never -0."""
    frac = Fraction(value)
    scaled = abs(frac) * 10**places
    units = int(scaled)  # floor, since scaled >= 0
    if scaled - units >= Fraction(1, 2):
        units += 1
    if frac < 0:
        units = -units
    return Decimal(units).scaleb(-places, context=_CONTEXT)


def round_amount(value: Exact, currency: str) -> Decimal:
    """The single rounding rule: half-up to the currency's exponent (USD 2, JPY 0, KWD 3)."""
    return round_half_up(value, exponent(currency))


def to_decimal(value: Fraction) -> Decimal | None:
    """The exact Decimal equal to ``value`` if it has a finite decimal expansion, else None."""
    den = value.denominator
    twos = fives = 0
    while den % 2 == 0:
        den //= 2
        twos += 1
    while den % 5 == 0:
        den //= 5
        fives += 1
    if den != 1:
        return None
    places = max(twos, fives)
    return Decimal(value.numerator * 10**places // value.denominator).scaleb(
        -places, context=_CONTEXT
    )


def exact_str(value: Exact) -> str:
    """Decimal string when finite, else ``"p/q"`` (for LineItem.exact_amount)."""
    if isinstance(value, Decimal):
        return str(value)
    dec = to_decimal(value)
    return str(dec) if dec is not None else f"{value.numerator}/{value.denominator}"
