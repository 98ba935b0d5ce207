from __future__ import annotations

import pytest

from api.meters_file import parse_meters_file
from schemas.meters import Aggregation
from tally.errors import ValidationError

MULTI = """
tenants:
  t1:
    meters:
      - slug: api_calls
        event_type: api_call
        aggregation: COUNT
      - slug: tokens
        eventType: llm
        aggregation: SUM
        valueProperty: $.tokens
        groupBy: {model: $.model}
  t2:
    meters: []
"""


def test_multi_tenant() -> None:
    specs = parse_meters_file(MULTI)
    assert set(specs) == {"t1", "t2"}
    assert [s.slug for s in specs["t1"]] == ["api_calls", "tokens"]
    assert specs["t1"][1].aggregation == Aggregation.SUM
    assert specs["t1"][1].group_by == {"model": "$.model"}
    assert specs["t2"] == []


def test_single_tenant_shorthand() -> None:
    specs = parse_meters_file(
        "tenant: t9\nmeters:\n  - {slug: m, eventType: e, aggregation: count}\n"
    )
    assert list(specs) == ["t9"] and specs["t9"][0].slug == "m"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("- a", "mapping"),
        ("foo: 1", "'tenants' or 'tenant'"),
        ("tenants: {t1: {meters: [{slug: m, eventType: e, aggregation: SUM}]}}", "value_property"),
        ("tenants: {t1: {meters: [{slug: 'Bad Slug', eventType: e, aggregation: COUNT}]}}", "slug"),
        (
            "tenant: t\nmeters: [{slug: m, eventType: e, aggregation: COUNT},"
            " {slug: m, eventType: f, aggregation: COUNT}]",
            "duplicate slug",
        ),
        ("tenants: {t1: [1]}", "tenants.t1"),
        ("tenants: [\n", "YAML"),
    ],
)
def test_errors_name_the_problem(text: str, needle: str) -> None:
    with pytest.raises(ValidationError) as ei:
        parse_meters_file(text, "m.yaml")
    assert needle in ei.value.message
    assert ei.value.message.startswith("m.yaml")
