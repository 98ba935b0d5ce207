"""The served OpenAPI document (``GET /openapi.json``): what every operation really accepts and
answers.

Routes read and validate their bodies themselves (size limits, fast paths, error messages that
name the field), so FastAPI cannot infer them. Each route describes its request body, query
parameters and answers with ``doc(...)`` (``responses`` + ``openapi_extra`` for the decorator);
the schemas are pydantic models (``model(cls)``, resolved to ``#/components/schemas`` here) or
explicit JSON schemas. ``install(app)`` post-processes the generated document:

- the one error body (``Error``: ``{error, message, details: [{field, message}]}``) for every
  4xx/5xx an operation can answer, derived from what it takes (authentication -> 401 and 429,
  path parameters -> 404, a body -> 400 and 413, query parameters -> 400) plus what the route
  declares; 429 carries ``Retry-After``; FastAPI's unused 422 answers are removed;
- the security schemes (``ApiKey``, ``AdminToken``, ``SegmentWriteKey``, ``SegmentSignature``)
  and each operation's requirement;
- OpenAPI links from the operations that create an object to the operations that use its id
  (``LINKS``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute, iter_route_contexts
from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, models_json_schema

from schemas.catalog import TIMEZONE_SCHEMA
from schemas.jsonschema import JSON_VALUE, RFC3339, RFC3339_STORE, TIME_IN, decimal_schema, nullable
from schemas.pricing import CURRENCY_SCHEMA
from tally.errors import ValidationError

JSON = "application/json"
_PLACEHOLDER = "x-tally-model"

# --- shared schemas ---------------------------------------------------------------------------

ERROR_CODES = [
    "invalid_request",
    "unauthorized",
    "forbidden",
    "not_found",
    "method_not_allowed",
    "not_acceptable",
    "conflict",
    "payload_too_large",
    "unsupported_media_type",
    "rate_limited",
    "quota_exceeded",
    "internal_error",
    "unavailable",
    "overloaded",
    "broker_unavailable",
    "store_unavailable",
    "not_configured",
    "worker_unavailable",
]

COMPONENTS: dict[str, dict[str, Any]] = {
    "ErrorDetail": {
        "type": "object",
        "description": "One problem: the offending field (dotted path, header, query parameter "
        "or limit name) and what is wrong. Ingest's per-event problems add `index`.",
        "required": ["field", "message"],
        "properties": {
            "field": {"type": "string"},
            "message": {"type": "string"},
            "index": {"type": "integer", "minimum": 0},
        },
    },
    "Error": {
        "type": "object",
        "description": "The one error body of every 4xx/5xx answer (docs/operations.md).",
        "required": ["error", "message", "details"],
        "properties": {
            "error": {"type": "string", "enum": ERROR_CODES},
            "message": {"type": "string"},
            "details": {"type": "array", "items": {"$ref": "#/components/schemas/ErrorDetail"}},
        },
    },
    "EventProblem": {
        "type": "object",
        "description": "A rejected event of a batch: its position, the field and the problem.",
        "required": ["index", "field", "message"],
        "properties": {
            "index": {"type": "integer", "minimum": 0},
            "field": {"type": "string"},
            "message": {"type": "string"},
        },
    },
}

COMPONENTS["JsonValue"] = JSON_VALUE
COMPONENTS["Currency"] = CURRENCY_SCHEMA
COMPONENTS["TimeZone"] = TIMEZONE_SCHEMA

_STATUS_TEXT = {
    400: "Invalid request (`invalid_request`): `details` names every bad field.",
    401: "Missing or invalid credentials (`unauthorized`).",
    403: "Not allowed (`forbidden`).",
    404: "Unknown object (`not_found`), or an object of another tenant.",
    409: "Conflict with the object's state (`conflict`).",
    413: "Body or batch too large (`payload_too_large`): split it.",
    415: "Unsupported Content-Type or Content-Encoding (`unsupported_media_type`).",
    429: "A limit was exceeded (`rate_limited`, `quota_exceeded`): `details` names the limit; "
    "retry after `Retry-After` seconds.",
    503: "Temporarily unavailable (`overloaded`, `broker_unavailable`, `store_unavailable`, "
    "`unavailable`, `not_configured`): retry after `Retry-After` seconds when present.",
}

RETRY_AFTER = {
    "description": "Seconds to wait before retrying",
    "schema": {"type": "string", "pattern": "^[0-9]+$"},
}


def ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def error_response(status: int, description: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "description": description or _STATUS_TEXT.get(status, "Error"),
        "content": {JSON: {"schema": ref("Error")}},
    }
    if status == 429:
        out["headers"] = {"Retry-After": {**RETRY_AFTER, "required": True}}
    elif status == 503:
        out["headers"] = {"Retry-After": RETRY_AFTER}
    elif status == 401:
        out["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}}}
    return out


# --- models -----------------------------------------------------------------------------------

_MODELS: dict[str, type[BaseModel]] = {}


def model(cls: type[BaseModel], mode: str = "serialization") -> dict[str, Any]:
    """A placeholder for ``cls``'s JSON schema (``validation``: as a request body is validated;
    ``serialization``: as an answer is written), resolved by ``install``."""
    key = f"{cls.__module__}.{cls.__qualname__}"
    _MODELS[key] = cls
    return {_PLACEHOLDER: key, "mode": mode}


def model_list(cls: type[BaseModel]) -> dict[str, Any]:
    """``{"data": [cls, ...]}``: the list answers."""
    return {
        "type": "object",
        "required": ["data"],
        "properties": {"data": {"type": "array", "items": model(cls)}},
    }


def list_of(item: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["data"],
        "properties": {"data": {"type": "array", "items": item}},
    }


# --- common parameter and value schemas -------------------------------------------------------

TIME_STRING = {"type": "string", "pattern": RFC3339}
TIME_OUT = {"type": "string", "format": "date-time"}
DECIMAL_OUT = {"type": "string", "description": "a decimal number as a string"}
decimal_in = decimal_schema


def query(
    name: str,
    schema: Mapping[str, Any],
    description: str = "",
    *,
    required: bool = False,
    explode: bool | None = None,
    style: str | None = None,
) -> dict[str, Any]:
    p: dict[str, Any] = {"name": name, "in": "query", "required": required, "schema": dict(schema)}
    if description:
        p["description"] = description
    if style is not None:
        p["style"] = style
    if explode is not None:
        p["explode"] = explode
    return p


def header(
    name: str, schema: Mapping[str, Any], description: str = "", *, required: bool = False
) -> dict[str, Any]:
    p: dict[str, Any] = {"name": name, "in": "header", "required": required, "schema": dict(schema)}
    if description:
        p["description"] = description
    return p


BOOL_PARAM = {"type": "boolean"}
LIMIT_PARAM = {"type": "integer", "minimum": 1, "maximum": 1000}
OFFSET_PARAM = {"type": "integer", "minimum": 0, "maximum": 1_000_000_000}


def int_query(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    """Integer query parameter ``name`` in ``[lo, hi]`` (``default`` when absent); a 422 naming
    it otherwise (what ``LIMIT_PARAM``/``OFFSET_PARAM``-style schemas promise)."""
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = lo - 1
    if not lo <= value <= hi:
        raise ValidationError(
            f"{name} must be an integer in [{lo}, {hi}]",
            details=[{"field": name, "message": f"expected an integer in [{lo}, {hi}]"}],
        )
    return value


# --- per-operation documentation --------------------------------------------------------------


def doc(
    *,
    ok: Mapping[int, Any] | None = None,
    body: Mapping[str, Any] | None = None,
    bodies: Mapping[str, Mapping[str, Any]] | None = None,
    body_required: bool = True,
    media: Sequence[str] = (JSON,),
    params: Iterable[Mapping[str, Any]] = (),
    errors: Iterable[int] = (),
    no_errors: Iterable[int] = (),
    body_description: str = "",
) -> dict[str, Any]:
    """``responses`` and ``openapi_extra`` for a route decorator.

    ``ok``: status -> JSON schema of the answer (``None``: no body; a ``(media, schema)`` pair
    for another media type; a full response object when it has a ``description``). ``body``:
    the JSON schema of the request body (the same schema for every type of ``media``);
    ``bodies``: media type -> schema, when they differ.
    ``errors`` adds error statuses to the derived ones, ``no_errors`` removes some.
    """
    responses: dict[int | str, Any] = {}
    for status, answer in (ok or {}).items():
        if isinstance(answer, dict) and "description" in answer:
            responses[status] = answer
        elif answer is None:
            responses[status] = {"description": _OK_TEXT.get(status, "Success")}
        elif isinstance(answer, tuple):
            mt, schema = answer
            responses[status] = {
                "description": _OK_TEXT.get(status, "Success"),
                "content": {mt: {"schema": schema}},
            }
        else:
            responses[status] = {
                "description": _OK_TEXT.get(status, "Success"),
                "content": {JSON: {"schema": answer}},
            }
    extra: dict[str, Any] = {}
    if bodies is None and body is not None:
        bodies = {mt: body for mt in media}
    if bodies is not None:
        rb: dict[str, Any] = {
            "required": body_required,
            "content": {mt: {"schema": dict(schema)} for mt, schema in bodies.items()},
        }
        if body_description:
            rb["description"] = body_description
        extra["requestBody"] = rb
    plist = [dict(p) for p in params]
    if plist:
        extra["parameters"] = plist
    extra["x-tally-errors"] = sorted(set(errors))
    extra["x-tally-no-errors"] = sorted(set(no_errors))
    return {"responses": responses, "openapi_extra": extra}


_OK_TEXT = {
    200: "Success",
    201: "Created",
    202: "Accepted: every event was acknowledged by the broker",
    204: "Done (no content)",
    207: "Partly accepted",
}

# --- links ------------------------------------------------------------------------------------

# (create method, create path, status) -> [(link name, target method, target path,
#  {target parameter: runtime expression})]
LINKS: dict[tuple[str, str, int], list[tuple[str, str, str, dict[str, str]]]] = {}


def link(
    source: tuple[str, str, int],
    name: str,
    method: str,
    path: str,
    parameters: Mapping[str, str],
) -> None:
    LINKS.setdefault(source, []).append((name, method.lower(), path, dict(parameters)))


# --- security ---------------------------------------------------------------------------------

SECURITY_SCHEMES = {
    "ApiKey": {
        "type": "http",
        "scheme": "bearer",
        "description": "A tenant's API key (`tly_<tenant>_<secret>`)",
    },
    "AdminToken": {
        "type": "http",
        "scheme": "bearer",
        "description": "An admin token (`tla_...`) for `/v1/admin/*`",
    },
    "SegmentWriteKey": {
        "type": "http",
        "scheme": "basic",
        "description": "Segment's write key = the tenant's API key as the Basic user, empty "
        "password (also accepted: `Authorization: Bearer <api key>` or `writeKey` in the body)",
    },
    "SegmentSignature": {
        "type": "apiKey",
        "in": "header",
        "name": "X-Signature",
        "description": "hex HMAC-SHA1 of the raw body under the tenant's shared webhook secret",
    },
}

SEGMENT_TRACKING = (
    "/v1/batch",
    "/v1/track",
    "/v1/identify",
    "/v1/page",
    "/v1/screen",
    "/v1/group",
    "/v1/alias",
)
PUBLIC = ("/healthz", "/readyz")


def api_routes(app: FastAPI) -> list[tuple[str, str, APIRoute]]:
    """(path, method, route) of every documented operation of ``app``."""
    out = []
    for ctx in iter_route_contexts(app.routes):
        route = ctx.original_route
        if isinstance(route, APIRoute) and route.include_in_schema and ctx.path:
            for method in sorted(ctx.methods or ()):
                out.append((ctx.path, method, route))
    return out


def _auth_of(route: APIRoute) -> str:
    from api.auth import current_key, current_tenant, require_admin

    if route.path in PUBLIC:
        return "none"
    if route.path in SEGMENT_TRACKING:
        return "segment"
    if route.path.startswith("/v1/segment/webhook/"):
        return "signature"
    calls = set()
    stack = [route.dependant]
    while stack:
        d = stack.pop()
        if d.call is not None:
            calls.add(d.call)
        stack.extend(d.dependencies)
    if require_admin in calls:
        return "admin"
    if current_tenant in calls or current_key in calls:
        return "tenant"
    return "none"


_SECURITY: dict[str, list[dict[str, list[str]]]] = {
    "none": [],
    "tenant": [{"ApiKey": []}],
    "admin": [{"AdminToken": []}],
    "segment": [{"SegmentWriteKey": []}, {"ApiKey": []}],
    "signature": [{"SegmentSignature": []}],
}


# --- post-processing --------------------------------------------------------------------------


class _TallySchema(GenerateJsonSchema):
    """pydantic's JSON schemas, with a tag field (a Literal with a default, e.g. a price's
    ``model``) required on input: a discriminated union cannot pick a variant without it."""

    def field_is_required(self, field: Any, total: bool) -> bool:
        schema = field.get("schema", {})
        if (
            self.mode == "validation"
            and schema.get("type") == "default"
            and schema.get("schema", {}).get("type") == "literal"
        ):
            return True
        return super().field_is_required(field, total)


def _resolve_models(spec: dict[str, Any]) -> None:
    found: dict[tuple[str, str], None] = {}

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if _PLACEHOLDER in node:
                found[(node[_PLACEHOLDER], node.get("mode", "serialization"))] = None
                return
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(spec)
    pairs = [(_MODELS[k], mode) for k, mode in found]
    refs, defs = models_json_schema(
        pairs,  # type: ignore[arg-type]
        ref_template="#/components/schemas/{model}",
        schema_generator=_TallySchema,
    )
    by_key = {(f"{cls.__module__}.{cls.__qualname__}", mode): r for (cls, mode), r in refs.items()}

    def replace(node: Any) -> Any:
        if isinstance(node, dict):
            if "x-tally-ref" in node:
                return ref(node["x-tally-ref"])
            if _PLACEHOLDER in node:
                return dict(by_key[(node[_PLACEHOLDER], node.get("mode", "serialization"))])
            return {k: replace(v) for k, v in node.items()}
        if isinstance(node, list):
            return [replace(v) for v in node]
        return node

    for key in ("paths", "components"):
        if key in spec:
            spec[key] = replace(spec[key])
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    schemas.update(replace(defs.get("$defs", {})))


def setting(name: str) -> dict[str, Any]:
    """A placeholder for the value of setting ``name`` (e.g. a batch limit), filled by
    ``install`` from the app's settings."""
    return {_SETTING: name}


_SETTING = "x-tally-setting"


def _fill_settings(node: Any, settings: Any) -> Any:
    if isinstance(node, dict):
        if _SETTING in node and len(node) == 1:
            return getattr(settings, node[_SETTING])
        return {k: _fill_settings(v, settings) for k, v in node.items()}
    if isinstance(node, list):
        return [_fill_settings(v, settings) for v in node]
    return node


_BOUNDS = {"ge": "minimum", "le": "maximum", "gt": "exclusiveMinimum", "lt": "exclusiveMaximum"}


def _bounds(node: Any) -> None:
    """pydantic leaves a numeric constraint of some annotated types as a raw ``ge``/``le``/...
    key: make it the JSON Schema keyword on numbers, drop it elsewhere (a decimal written as a
    string)."""
    if isinstance(node, dict):
        for raw, keyword in _BOUNDS.items():
            if raw in node:
                value = node.pop(raw)
                if node.get("type") in ("integer", "number"):
                    node[keyword] = value
        for v in node.values():
            _bounds(v)
    elif isinstance(node, list):
        for v in node:
            _bounds(v)


def _patch_components(schemas: dict[str, Any]) -> None:
    """Where a model's own schema says less than its use-case validates."""
    preview, charge = schemas.get("PreviewIn"), schemas.get("PlanCharge-Input")
    if preview is not None and charge is not None:
        # validated as a price (schemas.pricing.PriceSpec) by the preview, not as any object
        preview["properties"]["price"] = {
            "anyOf": [charge["properties"]["price"], {"type": "null"}],
            "description": "A price to rate (with `quantity`, or one `usage` entry)",
        }
    patch = schemas.get("CustomerPatch")
    if patch is not None:
        # null clears billing_anchor; for the other fields null is refused (absent = unchanged)
        for name, prop in patch["properties"].items():
            if name != "billing_anchor" and "anyOf" in prop:
                branches = [b for b in prop["anyOf"] if b != {"type": "null"}]
                prop.pop("anyOf")
                prop.pop("default", None)
                prop.update(branches[0] if len(branches) == 1 else {"anyOf": branches})


def _operation_id(spec: dict[str, Any], method: str, path: str) -> str:
    return str(spec["paths"][path][method]["operationId"])


def build(app: FastAPI) -> dict[str, Any]:
    spec = get_openapi(
        title=app.title,
        version=app.version,
        description=app.description,
        routes=app.routes,
    )
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    schemas.update(COMPONENTS)
    spec["components"]["securitySchemes"] = SECURITY_SCHEMES
    routes = {(m.lower(), path): r for path, m, r in api_routes(app)}
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            route = routes[(method, path)]
            auth = _auth_of(route)
            op["security"] = _SECURITY[auth]
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            statuses = set(op.pop("x-tally-errors", []))
            removed = set(op.pop("x-tally-no-errors", []))
            if path not in PUBLIC:
                statuses.add(503)
            if auth != "none":
                statuses |= {401, 429}
            # a parameter declared by the route (openapi_extra) replaces FastAPI's of that name
            merged: dict[tuple[str, str], dict[str, Any]] = {}
            for param in op.get("parameters", []):
                merged[(param["name"], param["in"])] = param
            if merged:
                op["parameters"] = list(merged.values())
            params = op.get("parameters", [])
            if any(p["in"] == "path" for p in params):
                statuses.add(404)
            if any(p["in"] == "query" for p in params):
                statuses.add(400)
            if "requestBody" in op:
                statuses |= {400, 413}
            for status in sorted(statuses - removed):
                responses.setdefault(str(status), error_response(status))
            # FastAPI's placeholder content ({} schema) next to the declared answers
            for key, resp in list(responses.items()):
                content = resp.get("content", {})
                if content.get(JSON, {}).get("schema") == {}:
                    del content[JSON]
                    if not content:
                        resp.pop("content", None)
                        if resp.get("description") == "Successful Response":
                            del responses[key]
    for (method, path, status), targets in LINKS.items():
        resp = spec["paths"][path][method.lower()]["responses"][str(status)]
        out = resp.setdefault("links", {})
        for name, t_method, t_path, parameters in targets:
            out[name] = {
                "operationId": _operation_id(spec, t_method, t_path),
                "parameters": parameters,
            }
    _resolve_models(spec)
    _patch_components(spec["components"]["schemas"])
    _bounds(spec["components"]["schemas"])
    state = getattr(app.state, "tally", None)
    if state is not None:
        spec["paths"] = _fill_settings(spec["paths"], state.settings)
    return spec


def install(app: FastAPI) -> None:
    """Serve the post-processed document at ``/openapi.json`` (built once, on first use)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


__all__ = [
    "BOOL_PARAM",
    "COMPONENTS",
    "DECIMAL_OUT",
    "LIMIT_PARAM",
    "OFFSET_PARAM",
    "RFC3339",
    "RFC3339_STORE",
    "TIME_IN",
    "TIME_OUT",
    "TIME_STRING",
    "api_routes",
    "decimal_in",
    "doc",
    "error_response",
    "header",
    "install",
    "link",
    "list_of",
    "model",
    "model_list",
    "nullable",
    "query",
    "ref",
    "setting",
]
