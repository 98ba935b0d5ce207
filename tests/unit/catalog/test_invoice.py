"""Upcoming-invoice assembly from given usage numbers, and upgrade proration to the cent."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rating.invoice import (
    UsageAmount,
    UsageKey,
    assemble_upcoming_invoice,
    fixed_lines,
    preview_plan_lines,
    usage_keys,
    usage_segments,
)
from rating.periods import Period
from rating.subscriptions import apply_action, change_plan, current_period
from schemas.catalog import Action, ChangeTiming
from schemas.pricing import LineKind
from tally.errors import ValidationError
from tests.unit.catalog.helpers import at, customer, error_field, plan, subscribe

D = Decimal

GROWTH_CHARGES = [
    {
        "key": "api",
        "meter_slug": "api",
        "price": {
            "model": "graduated",
            "tiers": [
                {"up_to": "1000", "unit_amount": "0"},
                {"up_to": "10000", "unit_amount": "0.002"},
                {"up_to": None, "unit_amount": "0.001"},
            ],
        },
    },
    {
        "key": "storage",
        "meter_slug": "storage",
        "price": {
            "model": "per_unit",
            "unit_amount": "0.25",
            "package": {"divide_by": "10", "round": "up"},
        },
    },
    {
        "key": "compute",
        "meter_slug": "compute",
        "group_by": "region",
        "price": {
            "model": "volume",
            "tiers": [
                {"up_to": "100", "unit_amount": "0.10"},
                {"up_to": "1000", "unit_amount": "0.08"},
                {"up_to": None, "unit_amount": "0.05"},
            ],
        },
    },
]
GROWTH = plan("growth", "49.00", charges=GROWTH_CHARGES)
MARCH = Period(at("2024-03-01T00:00:00Z"), at("2024-04-01T00:00:00Z"))


def test_upcoming_invoice_from_given_usage_to_the_cent() -> None:
    cust = customer(taxes={"VAT": "20"})
    sub = subscribe(GROWTH, "2024-03-01T00:00:00Z", cust=cust)
    now = at("2024-03-20T08:30:00Z")
    plans = {("growth", 1): GROWTH}
    keys = usage_keys(sub, plans, current_period(sub, now))
    assert keys == [
        UsageKey("api", None, MARCH.start, MARCH.end),
        UsageKey("storage", None, MARCH.start, MARCH.end),
        UsageKey("compute", "region", MARCH.start, MARCH.end),
    ]
    usage = {
        keys[0]: [UsageAmount(D("25500"))],
        keys[1]: [UsageAmount(D("123.4"))],
        keys[2]: [
            UsageAmount(D("1234.567"), {"region": "us"}),
            UsageAmount(D("150"), {"region": "eu"}),
        ],
    }
    inv = assemble_upcoming_invoice(sub, cust, plans, usage, now)
    # Hand computation:
    #   base      flat                                   49.00
    #   api       graduated 25500: 1000*0 + 9000*0.002 = 18, 15500*0.001 = 15.5   33.50
    #   storage   123.4 / 10 = 12.34 -> 13 packages * 0.25                          3.25
    #   compute eu  volume 150 -> tier 2: 150 * 0.08                               12.00
    #   compute us  volume 1234.567 -> tier 3: * 0.05 = 61.72835 -> half-up        61.73
    #   subtotal = 49.00 + 33.50 + 3.25 + 12.00 + 61.73 = 159.48
    #   VAT 20% per line: 9.80 + 6.70 + 0.65 + 2.40 + 12.346->12.35 = 31.90
    #   total = 191.38
    got = [(ln.kind, ln.charge_key, ln.group, ln.amount) for ln in inv.lines]
    assert got == [
        (LineKind.FIXED, "base", None, D("49.00")),
        (LineKind.USAGE, "api", None, D("33.50")),
        (LineKind.USAGE, "storage", None, D("3.25")),
        (LineKind.USAGE, "compute", {"region": "eu"}, D("12.00")),
        (LineKind.USAGE, "compute", {"region": "us"}, D("61.73")),
    ]
    assert inv.lines[-1].exact_amount == "61.72835"
    assert inv.subtotal == D("159.48")
    assert [(t.name, t.amount) for t in inv.taxes] == [("VAT", D("31.90"))]
    assert inv.tax == D("31.90")
    assert inv.total == D("191.38")
    assert (inv.period_start, inv.period_end) == (MARCH.start, MARCH.end)
    assert inv.currency == "USD"
    assert inv.total == sum((ln.amount for ln in inv.lines), D(0)) + inv.tax


def test_no_usage_still_shows_each_ungrouped_charge_and_the_minimum() -> None:
    p = plan(
        "min",
        None,
        charges=[
            {
                "key": "calls",
                "meter_slug": "api",
                "price": {"model": "per_unit", "unit_amount": "0.01", "minimum": "5"},
            },
            {
                "key": "by_region",
                "meter_slug": "compute",
                "group_by": "region",
                "price": {"model": "per_unit", "unit_amount": "1"},
            },
        ],
    )
    sub = subscribe(p, "2024-03-01T00:00:00Z")
    plans = {("min", 1): p}
    keys = usage_keys(sub, plans, MARCH)
    inv = assemble_upcoming_invoice(
        sub, customer(), plans, {k: [] for k in keys}, at("2024-03-02T00:00:00Z")
    )
    assert [(ln.kind, ln.amount) for ln in inv.lines] == [
        (LineKind.USAGE, D("0.00")),
        (LineKind.MINIMUM_ADJUSTMENT, D("5.00")),
    ]
    assert inv.total == D("5.00")


def test_missing_usage_is_an_error_not_zero() -> None:
    sub = subscribe(GROWTH, "2024-03-01T00:00:00Z")
    with pytest.raises(KeyError):
        assemble_upcoming_invoice(sub, customer(), {("growth", 1): GROWTH}, {}, MARCH.start)


def test_several_tax_rates_each_rounded_per_line() -> None:
    p = plan(
        "t",
        "10.05",
        charges=[
            {
                "key": "x",
                "meter_slug": "api",
                "price": {"model": "per_unit", "unit_amount": "0.333"},
            }
        ],
    )
    cust = customer(taxes={"state": "6.25", "city": "2.5"})
    sub = subscribe(p, "2024-03-01T00:00:00Z", cust=cust)
    plans = {("t", 1): p}
    keys = usage_keys(sub, plans, MARCH)
    inv = assemble_upcoming_invoice(sub, cust, plans, {keys[0]: [UsageAmount(D(7))]}, MARCH.start)
    # lines: 10.05 and 7 * 0.333 = 2.331 -> 2.33; subtotal 12.38
    # state 6.25%: 0.628125 -> 0.63, 0.145625 -> 0.15 => 0.78
    # city 2.5%:   0.25125 -> 0.25, 0.05825 -> 0.06   => 0.31
    assert inv.subtotal == D("12.38")
    assert {t.name: t.amount for t in inv.taxes} == {"city": D("0.31"), "state": D("0.78")}
    assert inv.tax == D("1.09")
    assert inv.total == D("13.47")


def test_jpy_rounds_to_whole_yen() -> None:
    p = plan(
        "jp",
        "1000",
        currency="JPY",
        charges=[
            {"key": "x", "meter_slug": "api", "price": {"model": "per_unit", "unit_amount": "0.5"}}
        ],
    )
    cust = customer(currency="JPY")
    sub = subscribe(p, "2024-03-01T00:00:00Z", cust=cust)
    plans = {("jp", 1): p}
    keys = usage_keys(sub, plans, MARCH)
    inv = assemble_upcoming_invoice(sub, cust, plans, {keys[0]: [UsageAmount(D(3))]}, MARCH.start)
    assert [ln.amount for ln in inv.lines] == [D("1000"), D("2")]  # 1.5 -> 2 (half-up)
    assert inv.total == D("1002")


# --- proration ----------------------------------------------------------------------------------

BASIC = plan(
    "basic",
    "10.00",
    charges=[
        {"key": "api", "meter_slug": "api", "price": {"model": "per_unit", "unit_amount": "0.01"}}
    ],
)
PRO = plan(
    "pro",
    "30.00",
    charges=[
        {"key": "api", "meter_slug": "api", "price": {"model": "per_unit", "unit_amount": "0.005"}}
    ],
)
PLANS = {("basic", 1): BASIC, ("pro", 1): PRO}
APRIL = Period(at("2024-04-01T00:00:00Z"), at("2024-05-01T00:00:00Z"))  # 30 days = 2,592,000 s


def test_upgrade_mid_period_proration_to_the_cent() -> None:
    sub = subscribe(BASIC, "2024-04-01T00:00:00Z")
    t = at("2024-04-16T12:00:00Z")  # 15.5 days used, 14.5 days = 1,252,800 s remain
    sub = change_plan(sub, BASIC, PRO, t)
    lines = fixed_lines(sub, PLANS, APRIL)
    # base 10.00 billed in advance; credit 10 * 14.5/30 = 4.8333... -> -4.83;
    # charge 30 * 14.5/30 = 14.50. Net fixed = 10.00 - 4.83 + 14.50 = 19.67.
    assert [(ln.kind, ln.amount) for ln in lines] == [
        (LineKind.FIXED, D("10.00")),
        (LineKind.PRORATION, D("-4.83")),
        (LineKind.PRORATION, D("14.50")),
    ]
    assert lines[1].exact_amount == "-29/6"
    assert (lines[1].period_start, lines[1].period_end) == (t, APRIL.end)
    assert "basic v1" in lines[1].description and "pro v1" in lines[2].description
    # Usage is split at the change: each part rated with its own plan.
    keys = usage_keys(sub, PLANS, APRIL)
    assert keys == [UsageKey("api", None, APRIL.start, t), UsageKey("api", None, t, APRIL.end)]
    usage = {keys[0]: [UsageAmount(D(1001))], keys[1]: [UsageAmount(D(1001))]}
    inv = assemble_upcoming_invoice(sub, customer(), PLANS, usage, at("2024-04-20T00:00:00Z"))
    # usage: 1001 * 0.01 = 10.01 ; 1001 * 0.005 = 5.005 -> 5.01 (half-up, per line)
    assert [ln.amount for ln in inv.lines[3:]] == [D("10.01"), D("5.01")]
    assert inv.total == D("19.67") + D("10.01") + D("5.01")


def test_upgrade_is_prorated_to_the_second() -> None:
    # 25,920.00 a month of 2,592,000 s = 0.01 per second: one second more changes one cent.
    small = plan("s", "25920.00")
    big = plan("b", "51840.00")
    plans = {("s", 1): small, ("b", 1): big}
    base = at("2024-04-16T00:00:00Z")  # 15 days = 1,296,000 s remain
    for extra, credit, charge in [(0, "-12960.00", "25920.00"), (1, "-12959.99", "25919.98")]:
        sub = subscribe(small, "2024-04-01T00:00:00Z")
        sub = change_plan(sub, small, big, base + timedelta(seconds=extra))
        amounts = [ln.amount for ln in fixed_lines(sub, plans, APRIL)]
        assert amounts == [D("25920.00"), D(credit), D(charge)]


def test_downgrade_at_period_end_has_no_proration() -> None:
    sub = subscribe(PRO, "2024-04-01T00:00:00Z")
    sub = change_plan(sub, PRO, BASIC, at("2024-04-10T00:00:00Z"))
    assert sub.pending_change is not None
    assert [ln.amount for ln in fixed_lines(sub, PLANS, APRIL)] == [D("30.00")]
    from rating.subscriptions import advance

    may = Period(at("2024-05-01T00:00:00Z"), at("2024-06-01T00:00:00Z"))
    later = advance(sub, at("2024-05-02T00:00:00Z"))
    assert [ln.amount for ln in fixed_lines(later, PLANS, may)] == [D("10.00")]


def test_pause_and_resume_credit_and_recharge() -> None:
    sub = subscribe(BASIC, "2024-04-01T00:00:00Z")
    sub = apply_action(sub, Action.PAUSE, at("2024-04-07T00:00:00Z"))
    sub = apply_action(sub, Action.RESUME, at("2024-04-22T00:00:00Z"))
    lines = fixed_lines(sub, PLANS, APRIL)
    # 10.00; credit 24/30 * 10 = -8.00; charge 9/30 * 10 = 3.00 -> 21 days active = 7.00
    assert [ln.amount for ln in lines] == [D("10.00"), D("-8.00"), D("3.00")]
    # usage keeps being billed while paused: one segment for the whole month
    assert usage_keys(sub, PLANS, APRIL) == [UsageKey("api", None, APRIL.start, APRIL.end)]


def test_trial_is_free_of_fixed_fees_and_ends_mid_period() -> None:
    sub = subscribe(BASIC, "2024-04-01T00:00:00Z", trial_end="2024-04-11T00:00:00Z")
    from rating.subscriptions import advance

    sub = advance(sub, at("2024-04-20T00:00:00Z"))
    lines = fixed_lines(sub, PLANS, APRIL)
    assert [(ln.kind, ln.amount) for ln in lines] == [(LineKind.PRORATION, D("6.67"))]  # 20/30


def test_start_inside_a_calendar_period_is_prorated() -> None:
    sub = subscribe(BASIC, "2024-04-21T00:00:00Z")
    assert [ln.amount for ln in fixed_lines(sub, PLANS, APRIL)] == [D("3.33")]  # 10/30 * 10
    assert usage_keys(sub, PLANS, APRIL) == [
        UsageKey("api", None, at("2024-04-21T00:00:00Z"), APRIL.end)
    ]


def test_cancel_now_credits_the_unused_part_and_ends_usage() -> None:
    sub = subscribe(BASIC, "2024-04-01T00:00:00Z")
    sub = apply_action(sub, Action.CANCEL, at("2024-04-25T06:00:30.500Z"))
    lines = fixed_lines(sub, PLANS, APRIL)
    # unused: 5 days 17:59:29.5 = 496,769.5 s of 2,592,000 -> 10 * that = 1.9165...
    assert [ln.amount for ln in lines] == [D("10.00"), D("-1.92")]
    # usage ends at the minute containing the cancellation (floored)
    assert usage_segments(sub, APRIL)[-1].end == at("2024-04-25T06:00:00Z")


@settings(max_examples=150, deadline=None)
@given(seconds=st.integers(min_value=1, max_value=2_592_000 - 1))
def test_upgrade_lines_are_exact_shares(seconds: int) -> None:
    t = APRIL.start + timedelta(seconds=seconds)
    sub = change_plan(
        subscribe(BASIC, "2024-04-01T00:00:00Z"), BASIC, PRO, t, ChangeTiming.IMMEDIATE
    )
    lines = fixed_lines(sub, PLANS, APRIL)
    remaining = Fraction(2_592_000 - seconds, 2_592_000)
    exact_net = 10 + (30 - 10) * remaining  # what active time at each price costs
    assert Fraction(lines[1].exact_amount) == -10 * remaining
    assert Fraction(lines[2].exact_amount) == 30 * remaining
    total = sum((ln.amount for ln in lines), D(0))
    # three lines rounded once each: at most 1.5 cents from the exact value
    assert abs(Fraction(total) - exact_net) <= Fraction(3, 200)


# --- preview --------------------------------------------------------------------------------------


def test_preview_plan_lines() -> None:
    lines = preview_plan_lines(
        GROWTH.spec(),
        {"api": D("25500"), "storage": D("123.4"), "compute": {"us": D("1234.567"), "eu": D(150)}},
    )
    assert sum((ln.amount for ln in lines), D(0)) == D("159.48")


@pytest.mark.parametrize(
    ("usage", "field"),
    [
        ({"nope": D(1)}, "usage.nope"),
        ({"api": {"x": D(1)}}, "usage.api"),
    ],
)
def test_preview_plan_lines_names_the_bad_field(usage: dict, field: str) -> None:
    with pytest.raises(ValidationError) as exc:
        preview_plan_lines(GROWTH.spec(), usage)
    assert error_field(exc.value) == field
