"""Spec validation (errors name the field) and JSON round-trips of schemas.pricing."""

from __future__ import annotations

from decimal import Decimal as D
from typing import Any

import pydantic
import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.pricing import PRICE_ADAPTER, PlanSpec, parse_price
from tests.unit.rating.strategies import (
    flat_prices,
    graduated_prices,
    package_prices,
    per_unit_prices,
    percentage_prices,
    staircase_prices,
    volume_prices,
)

any_price = st.one_of(
    flat_prices(),
    per_unit_prices(),
    graduated_prices(),
    volume_prices(),
    package_prices(),
    staircase_prices(),
    percentage_prices(),
)


def _error(data: dict[str, Any]) -> str:
    with pytest.raises(pydantic.ValidationError) as err:
        parse_price(data)
    e = err.value.errors()[0]
    return ".".join(str(x) for x in e["loc"]) + ": " + e["msg"]


def test_overlapping_tiers() -> None:
    msg = _error(
        {
            "model": "graduated",
            "tiers": [
                {"up_to": 10, "unit_amount": "1"},
                {"up_to": 10, "unit_amount": "1"},
                {"up_to": None, "unit_amount": "1"},
            ],
        }
    )
    assert "tiers[1].up_to" in msg and "overlap" in msg


def test_unordered_tiers() -> None:
    msg = _error(
        {
            "model": "volume",
            "tiers": [
                {"up_to": 20, "unit_amount": "1"},
                {"up_to": 10, "unit_amount": "1"},
                {"up_to": None, "unit_amount": "1"},
            ],
        }
    )
    assert "tiers[1].up_to" in msg


def test_missing_last_open_tier() -> None:
    msg = _error({"model": "graduated", "tiers": [{"up_to": 10, "unit_amount": "1"}]})
    assert "tiers[0].up_to" in msg and "open" in msg
    msg = _error(
        {
            "model": "staircase",
            "steps": [{"up_to": None, "amount": "1"}, {"up_to": 5, "amount": "2"}],
        }
    )
    assert "steps[0].up_to" in msg


def test_empty_tiers() -> None:
    assert "tiers" in _error({"model": "graduated", "tiers": []})


def test_negative_price_names_the_field() -> None:
    assert _error({"model": "per_unit", "unit_amount": "-1"}).startswith("per_unit.unit_amount")
    msg = _error({"model": "graduated", "tiers": [{"up_to": None, "flat_amount": "-2"}]})
    assert msg.startswith("graduated.tiers.0.flat_amount")


def test_unknown_currency_and_model() -> None:
    assert _error({"model": "flat", "amount": "1", "currency": "XYZ"}).startswith("flat.currency")
    assert "model" in _error({"model": "tiered", "amount": "1"}) or "tag" in _error(
        {"model": "tiered", "amount": "1"}
    )


def test_float_money_refused() -> None:
    assert _error({"model": "flat", "amount": 1.5}).startswith("flat.amount")


def test_min_above_max() -> None:
    assert "minimum" in _error({"model": "flat", "amount": "1", "minimum": "5", "maximum": "2"})
    assert "min_per_event" in _error(
        {"model": "percentage", "rate": "1", "min_per_event": "5", "max_per_event": "2"}
    )


def test_currency_is_normalized() -> None:
    assert parse_price({"model": "flat", "amount": "1", "currency": "usd"}).currency == "USD"


@given(price=any_price)
def test_price_json_round_trip(price: Any) -> None:
    text = PRICE_ADAPTER.dump_json(price)
    assert PRICE_ADAPTER.validate_json(text) == price
    assert b'"amount":1' not in text  # Decimals are strings, never JSON numbers


def _plan(**over: Any) -> dict[str, Any]:
    plan = {
        "code": "pro",
        "name": "Pro",
        "currency": "EUR",
        "interval": "month",
        "charges": [
            {"key": "base", "price": {"model": "flat", "amount": "49"}},
            {
                "key": "api",
                "meter_slug": "api-calls",
                "group_by": "region",
                "price": {"model": "per_unit", "unit_amount": "0.001", "currency": "EUR"},
            },
        ],
    }
    plan.update(over)
    return plan


def test_plan_round_trip() -> None:
    plan = PlanSpec.model_validate(_plan())
    assert PlanSpec.model_validate_json(plan.model_dump_json()) == plan
    assert plan.charges[1].price.unit_amount == D("0.001")  # type: ignore[union-attr]


def test_plan_currency_checks() -> None:
    with pytest.raises(pydantic.ValidationError) as err:
        PlanSpec.model_validate(_plan(currency="USD"))
    assert "charges[1].price.currency" in str(err.value)
    with pytest.raises(pydantic.ValidationError) as err:
        PlanSpec.model_validate(_plan(currency="EURO"))
    assert err.value.errors()[0]["loc"] == ("currency",)


def test_plan_duplicate_keys_and_fixed_group_by() -> None:
    dup = _plan(charges=[{"key": "a", "price": {"model": "flat", "amount": "1"}}] * 2)
    with pytest.raises(pydantic.ValidationError, match=r"charges\[1\]\.key"):
        PlanSpec.model_validate(dup)
    bad = _plan(charges=[{"key": "a", "group_by": "x", "price": {"model": "flat", "amount": "1"}}])
    with pytest.raises(pydantic.ValidationError, match="group_by"):
        PlanSpec.model_validate(bad)
