"""Pure pricing: exact Decimal rating of price specs (schemas.pricing), line items, billing
periods and proration. No I/O. See docs/pricing.md."""

from rating.base import Rating
from rating.engine import apply_commitments, rate, rate_model
from rating.gauge import latest_value, time_weighted_sum, to_quantity
from rating.lines import (
    InvoiceTotals,
    LineItem,
    LineKind,
    invoice_totals,
    make_line,
    rate_charge,
    rate_charge_lines,
    resolve_currency,
)
from rating.money import exponent, round_amount, round_half_up
from rating.periods import Period, next_period, period_at, period_containing
from rating.proration import (
    prorate,
    prorate_between,
    prorated_charge,
    proration_factor,
    upgrade_proration,
)

__all__ = [
    "InvoiceTotals",
    "LineItem",
    "LineKind",
    "Period",
    "Rating",
    "apply_commitments",
    "exponent",
    "invoice_totals",
    "latest_value",
    "make_line",
    "next_period",
    "period_at",
    "period_containing",
    "prorate",
    "prorate_between",
    "prorated_charge",
    "proration_factor",
    "rate",
    "rate_charge",
    "rate_charge_lines",
    "rate_model",
    "resolve_currency",
    "round_amount",
    "round_half_up",
    "time_weighted_sum",
    "to_quantity",
    "upgrade_proration",
]
