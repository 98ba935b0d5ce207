"""Document totals with tax exclusive or inclusive (pure).

Tax is computed and rounded per line and per rate (half-up, currency exponent) and summed, so
every line can show its tax and the totals add up exactly.

- **exclusive** (prices exclude tax): line tax = round(amount x rate / 100);
  ``subtotal`` = sum of the rounded lines, ``total = subtotal + tax``.
- **inclusive** (prices include tax): the tax is extracted, line tax =
  round(amount x rate / (100 + sum of rates)); ``total`` = sum of the rounded lines,
  ``subtotal = total - tax`` (the net amount).

Either way ``total`` = sum of the rounded lines plus the tax added on top (none when inclusive).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from decimal import Decimal
from fractions import Fraction
from typing import NamedTuple

from rating.money import exact, exponent, round_amount
from schemas.pricing import LineItem
from tally.errors import ValidationError


class DocumentTotals(NamedTuple):
    subtotal: Decimal
    taxes: list[tuple[str, Decimal, Decimal]]  # (name, rate, amount) sorted by name
    tax: Decimal
    total: Decimal
    line_taxes: list[Decimal]  # per line, all rates


def document_totals(
    lines: Sequence[LineItem],
    tax_rates: Mapping[str, Decimal],
    currency: str,
    inclusive: bool = False,
) -> DocumentTotals:
    places = exponent(currency)
    for i, line in enumerate(lines):
        if line.currency != currency:
            raise ValidationError(
                f"line {i} is in {line.currency}, the document in {currency}",
                field="currency",
            )
    for name, r in tax_rates.items():
        if not isinstance(r, Decimal) or not r.is_finite() or r < 0:
            raise ValidationError(f"tax rate {name} must be a Decimal >= 0", field="tax_rates")
    zero = Decimal(0).scaleb(-places)
    denominator = Fraction(100) + (
        sum((Fraction(r) for r in tax_rates.values()), Fraction(0)) if inclusive else 0
    )
    names = sorted(tax_rates)
    per_rate = {n: zero for n in names}
    line_taxes: list[Decimal] = []
    with exact():
        for line in lines:
            lt = zero
            for n in names:
                t = round_amount(
                    Fraction(line.amount) * Fraction(tax_rates[n]) / denominator, currency
                )
                per_rate[n] += t
                lt += t
            line_taxes.append(lt)
        gross = sum((line.amount for line in lines), zero)
        tax = sum(per_rate.values(), zero)
        if inclusive:
            total, subtotal = gross, gross - tax
        else:
            subtotal, total = gross, gross + tax
    taxes = [(n, tax_rates[n], per_rate[n]) for n in names]
    return DocumentTotals(subtotal, taxes, tax, total, line_taxes)
