"""The one error shape: every TallyError's body is {error, message, details: [{field, message}]}."""

from __future__ import annotations

import ast
from datetime import datetime
from pathlib import Path
from typing import Any

import pydantic
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tally import errors as E
from tally.errors import TallyError, ValidationError, detail, normalize_details, pydantic_details

ROOT = Path(__file__).resolve().parents[3]
PACKAGES = ["api", "clickhouse", "rating", "runtime", "schemas", "streams", "tally"]


def _subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_subclasses(sub))
    return out


def check_shape(body: Any) -> None:
    assert set(body) == {"error", "message", "details"}, body
    assert isinstance(body["error"], str) and body["error"]
    assert isinstance(body["message"], str) and body["message"]
    assert isinstance(body["details"], list)
    for d in body["details"]:
        assert isinstance(d, dict)
        assert isinstance(d["field"], str) and d["field"]
        assert isinstance(d["message"], str)


HIERARCHY = [TallyError, *_subclasses(TallyError)]


def test_the_hierarchy_is_what_the_api_maps() -> None:
    names = {c.__name__ for c in HIERARCHY}
    assert {"RateLimited", "QuotaExceeded", "Overloaded", "Unavailable", "NotFound"} <= names
    for cls in HIERARCHY:
        assert 400 <= cls.status <= 599 and cls.code, cls
    assert E.RateLimited.status == E.QuotaExceeded.status == 429
    assert issubclass(E.Overloaded, E.Unavailable) and E.Overloaded.status == 503


@pytest.mark.parametrize("cls", HIERARCHY, ids=lambda c: c.__name__)
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"details": None},
        {"details": []},
        {"field": "name"},
        {"details": [detail("a", "bad"), detail("b.0.c", "worse", index=3)]},
        {"details": [{"field": "x"}]},  # a missing message is filled in
        {"details": {"field": "legacy"}},  # a lone mapping is tolerated, made a list
        {"details": ["free text"]},
    ],
)
def test_every_error_has_the_one_shape(cls: type[TallyError], kwargs: dict[str, Any]) -> None:
    exc = cls("something went wrong", **kwargs)
    body = exc.to_dict()
    check_shape(body)
    assert body["error"] == cls.code and body["message"] == "something went wrong"
    if "field" in kwargs:
        assert body["details"] == [{"field": "name", "message": "something went wrong"}]
    if isinstance(kwargs.get("details"), list) and kwargs["details"][:1] == [detail("a", "bad")]:
        assert body["details"][1] == {"field": "b.0.c", "message": "worse", "index": 3}


def test_retryable_errors_carry_retry_after() -> None:
    for cls in (E.RateLimited, E.QuotaExceeded, E.Unavailable, E.Overloaded, E.BrokerUnavailable):
        exc = cls("later", retry_after=7, field="events_per_second")
        assert exc.retry_after == 7 and isinstance(exc, E.Retryable)
        assert exc.to_dict()["details"] == [{"field": "events_per_second", "message": "later"}]


@given(
    st.one_of(
        st.none(),
        st.text(),
        st.lists(
            st.one_of(
                st.dictionaries(
                    st.sampled_from(["field", "message", "index", "x"]),
                    st.one_of(st.none(), st.text(), st.integers()),
                ),
                st.integers(),
                st.text(),
            )
        ),
        st.dictionaries(st.sampled_from(["field", "message"]), st.text()),
    )
)
def test_normalize_always_gives_the_shape(details: Any) -> None:
    out = normalize_details(details, "fallback")
    assert isinstance(out, list)
    for d in out:
        assert isinstance(d["field"], str) and d["field"]
        assert isinstance(d["message"], str)


class Price(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    amount: int
    currency: str

    @pydantic.model_validator(mode="after")
    def _rule(self) -> Price:
        if self.currency == "XXX":
            raise ValueError("currency: XXX is not a currency")
        return self


class Plan(pydantic.BaseModel):
    code: str
    charges: list[Price]
    start: datetime | None = None


def _errors(doc: Any) -> pydantic.ValidationError:
    with pytest.raises(pydantic.ValidationError) as ei:
        Plan.model_validate(doc)
    return ei.value


def test_the_converter_names_nested_fields() -> None:
    exc = _errors({"charges": [{"amount": "x", "currency": "EUR"}, {"amount": 1}]})
    details = pydantic_details(exc)
    assert [d["field"] for d in details] == ["code", "charges.0.amount", "charges.1.currency"]
    assert all(d["message"] for d in details)
    assert pydantic_details(exc, "plan")[0]["field"] == "plan.code"


def test_the_converter_attributes_model_level_errors_to_the_named_field() -> None:
    exc = _errors({"code": "p", "charges": [{"amount": 1, "currency": "XXX"}]})
    assert [d["field"] for d in pydantic_details(exc)] == ["charges.0.currency"]


def test_the_converter_drops_request_locations_and_handles_bad_json() -> None:
    raw = [
        {"loc": ("body", "charges", 0), "msg": "bad", "type": "x"},
        {"loc": ("query", "window"), "msg": "bad window", "type": "x"},
        {"loc": ("body",), "msg": "JSON decode error", "type": "json_invalid"},
        {"loc": (), "msg": "whole thing", "type": "x"},
    ]
    assert [d["field"] for d in pydantic_details(raw)] == ["charges.0", "window", "body", "body"]


def test_from_pydantic_builds_message_and_details() -> None:
    exc = ValidationError.from_pydantic(_errors({"charges": []}), "invalid plan")
    assert exc.message.startswith("invalid plan: code: ")
    check_shape(exc.to_dict())


def test_no_raise_site_passes_a_dict_as_details() -> None:
    """Every `details=` argument in the code is a list (or a name/call building one)."""
    offenders = []
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Call):
                    for kw in node.keywords:
                        if kw.arg == "details" and isinstance(kw.value, ast.Dict | ast.DictComp):
                            offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, offenders
