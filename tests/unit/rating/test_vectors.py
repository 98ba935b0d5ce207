"""Published worked pricing examples, kept in the repository (tests/data/rating_vectors.json).

A missing file FAILS (it is never skipped)."""

from __future__ import annotations

import json
from datetime import datetime
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest

from rating import Period, rate_charge, round_half_up, time_weighted_sum
from schemas.pricing import parse_price

VECTORS = Path(__file__).resolve().parents[2] / "data" / "rating_vectors.json"


def _load() -> dict[str, Any] | None:
    try:
        return json.loads(VECTORS.read_text())
    except FileNotFoundError:
        return None


DATA = _load()
CASES = (
    [pytest.param(v, id=v["name"]) for v in DATA["vectors"]]
    if DATA is not None
    else [pytest.param(None, id="rating_vectors.json-missing")]
)


def _require() -> dict[str, Any]:
    if DATA is None:
        pytest.fail(f"pricing vectors file not found: {VECTORS}")
    return DATA


def test_vectors_file_has_cases() -> None:
    assert len(_require()["vectors"]) >= 15


@pytest.mark.parametrize("vector", CASES)
def test_vector(vector: dict[str, Any] | None) -> None:
    if vector is None:
        pytest.fail(f"pricing vectors file not found: {VECTORS}")
    price = parse_price(vector["price"])
    line = rate_charge(price, Decimal(vector["quantity"]))
    # String equality also checks the currency's exponent (2.00, 400, 0.500).
    assert str(line.amount) == vector["amount"]


def test_time_weighted_sum() -> None:
    spec = _require()["time_weighted_sum"]
    period = Period(
        datetime.fromisoformat(spec["period"]["from"]), datetime.fromisoformat(spec["period"]["to"])
    )
    deltas = [(datetime.fromisoformat(t), Decimal(v)) for t, v in spec["events"]]
    value = time_weighted_sum(deltas, period)
    num, den = spec["value_exact"].split("/")
    assert value == Fraction(int(num), int(den))
    places = -Decimal(spec["value"]).as_tuple().exponent  # type: ignore[operator]
    assert str(round_half_up(value, places)) == spec["value"]
