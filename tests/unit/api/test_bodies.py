"""One rule for JSON object bodies: required, optional (zero bytes = defaults), never
whitespace-as-absent."""

from __future__ import annotations

import pydantic
import pytest

from api.bodies import object_body
from api.ingest_parse import load_optional_json
from tally.errors import ValidationError


class Thing(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    name: str = "default"
    size: int = 1


def fields(exc: ValidationError) -> list[str]:
    return [d["field"] for d in exc.details]


class TestOptionalJson:
    def test_zero_bytes_is_absent(self) -> None:
        absent = object()
        assert load_optional_json(b"", absent) is absent

    @pytest.mark.parametrize("raw", [b" ", b"\t", b" \r\n ", b"{", b"nope"])
    def test_anything_else_must_be_json(self, raw: bytes) -> None:
        with pytest.raises(ValidationError, match="not valid JSON") as ei:
            load_optional_json(raw, {})
        assert fields(ei.value) == ["body"]

    @pytest.mark.parametrize(
        ("raw", "doc"), [(b"{}", {}), (b' {"a": 1} ', {"a": 1}), (b"null", None), (b"[]", [])]
    )
    def test_json_of_any_shape_decodes(self, raw: bytes, doc: object) -> None:
        assert load_optional_json(raw, "absent") == doc


class TestObjectBody:
    def test_optional_zero_bytes_takes_the_defaults(self) -> None:
        assert object_body(b"", Thing, "thing", optional=True) == Thing()

    @pytest.mark.parametrize("optional", [True, False])
    def test_a_document_is_validated_either_way(self, optional: bool) -> None:
        got = object_body(b'{"name": "x", "size": 3}', Thing, "thing", optional=optional)
        assert got == Thing(name="x", size=3)

    def test_optional_whitespace_is_not_json(self) -> None:
        with pytest.raises(ValidationError, match="not valid JSON") as ei:
            object_body(b"  \n", Thing, "thing", optional=True)
        assert fields(ei.value) == ["body"]

    @pytest.mark.parametrize("raw", [b"", b"  \n"])
    def test_required_empty_names_what_to_send(self, raw: bytes) -> None:
        with pytest.raises(ValidationError) as ei:
            object_body(raw, Thing, "thing")
        assert ei.value.message == "request body is empty; send a JSON thing"
        assert fields(ei.value) == ["body"]

    @pytest.mark.parametrize("optional", [True, False])
    @pytest.mark.parametrize("raw", [b"[]", b"null", b'"x"', b"7"])
    def test_not_an_object(self, raw: bytes, optional: bool) -> None:
        with pytest.raises(ValidationError) as ei:
            object_body(raw, Thing, "thing", optional=optional)
        assert ei.value.message == "a thing must be a JSON object"
        assert fields(ei.value) == ["body"]

    def test_every_bad_field_is_named(self) -> None:
        with pytest.raises(ValidationError) as ei:
            object_body(b'{"size": "big", "colour": 1}', Thing, "thing")
        assert ei.value.message.startswith("invalid thing: ")
        assert sorted(fields(ei.value)) == ["colour", "size"]
