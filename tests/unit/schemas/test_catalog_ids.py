"""A customer's ``external_id`` is checked against the blanks its documented pattern names."""

from __future__ import annotations

import re

import pydantic
import pytest

from schemas.catalog import ECMA_BLANKS, NO_EDGE_BLANKS, CustomerIn

BASE = {"name": "n", "currency": "USD"}
# ECMA-262 WhiteSpace and LineTerminator, from the standard's table (what ``\s`` matches in a
# JSON Schema pattern): TAB VT FF SP NBSP ZWNBSP, the Zs category, LF CR LS PS
ECMA = "\t\v\f \u00a0\ufeff\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008"
ECMA += "\u2009\u200a\u202f\u205f\u3000\n\r\u2028\u2029"


def _valid(external_id: str) -> bool:
    try:
        CustomerIn.model_validate({**BASE, "external_id": external_id})
    except pydantic.ValidationError:
        return False
    return True


def test_the_blanks_are_ecma_262s() -> None:
    assert frozenset(ECMA) == ECMA_BLANKS


@pytest.mark.parametrize("c", sorted(ECMA))
def test_an_ecma_blank_at_either_edge_is_refused(c: str) -> None:
    assert not _valid(c + "x") and not _valid("x" + c)
    assert _valid("x" + c + "x")


@pytest.mark.parametrize("c", ["\x1c", "\x1d", "\x1e", "\x1f", "\x85", "\u200b"])
def test_what_python_alone_calls_blank_is_an_ordinary_character(c: str) -> None:
    """Python's ``str.strip()`` strips these; ``\\s`` of the documented pattern does not match
    them, so a client that checks the pattern sends them (schemathesis did)."""
    assert _valid("x" + c) and _valid(c + "x")


def test_the_pattern_is_the_documented_one() -> None:
    schema = CustomerIn.model_json_schema()["properties"]["external_id"]
    assert schema["pattern"] == NO_EDGE_BLANKS
    # with the ECMA blanks spelled out, Python's engine agrees with the validator
    not_blank = f"[^{re.escape(ECMA)}]"
    ecma = f"{not_blank}(.*{not_blank})?"  # ^\S([\s\S]*\S)?$ in ECMA-262's meaning
    for v in ["a", "a b", " a", "a\t", "\x1ea\x1e", "a\ufeff", "\u3000a", "é\x85", "a\nb"]:
        assert bool(re.fullmatch(ecma, v, re.S)) == _valid(v), v
