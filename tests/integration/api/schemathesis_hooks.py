"""schemathesis hooks of the OpenAPI test (loaded by the CLI through ``hooks`` in its config).

- ``error_shape``: an extra check: every 4xx/5xx body is the one error shape.
- ``before_call``: signs the Segment webhook's body (``X-Signature`` = hex HMAC-SHA1 under the
  world's shared secret), as Segment does.
- ``map_case``: rules the OpenAPI document states in words because JSON Schema cannot express
  them (a time relative to now, one field after another, ids that must exist, a CSV body). Only
  *positive* cases are adjusted, so that "valid data is accepted" is checked against data that
  really is valid; negative cases are left as generated.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from typing import Any

# numpy imported once here, while the CLI loads its hooks and before its fuzzing workers start:
# hypothesis reads ``sys.modules["numpy"].ndarray`` whenever numpy is in ``sys.modules``
# (``check_sample``), and in one CI run (2026-12-05) a worker met numpy there while another
# thread of the CLI was still importing it mid-run (an ``AttributeError``: partially
# initialized module).
import numpy  # noqa: F401
import schemathesis

from tests.integration.api.world import SEGMENT_SECRET


@schemathesis.check
def error_shape(ctx: Any, response: Any, case: Any) -> bool | None:
    """4xx/5xx answers carry ``{error, message, details: [{field, message}]}``."""
    if response.status_code < 400:
        return None
    try:
        body = json.loads(response.content)
    except ValueError:
        raise AssertionError(
            f"{response.status_code} answer is not JSON: {response.content[:200]!r}"
        ) from None
    assert isinstance(body, dict), f"error body is not an object: {body!r}"
    assert isinstance(body.get("error"), str) and body["error"], f"no error code: {body!r}"
    assert isinstance(body.get("message"), str), f"no message: {body!r}"
    details = body.get("details")
    assert isinstance(details, list), f"details is not a list: {body!r}"
    for d in details:
        assert isinstance(d, dict), f"a detail is not an object: {body!r}"
        assert isinstance(d.get("field"), str), f"a detail without field: {body!r}"
        assert isinstance(d.get("message"), str), f"a detail without message: {body!r}"
    return True


# Operations that change the tenant's Segment settings run as the second tenant.
AS_OTHER = ("/v1/segment/config", "/v1/segment/webhook-secret")


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    """Sign the webhook's body, and act as the second tenant where it must -- only where
    schemathesis put the configured credentials: its probes without or with wrong credentials
    stay as they are. Also keeps the world's credentials and meters (``_protect``): the stateful
    phase's cases do not pass ``map_case``."""
    _protect(case)
    _known_meter(case)
    if case.operation.path in AS_OTHER and case.method.upper() != "GET":
        key, other = os.environ["TALLY_FUZZ_KEY"], os.environ["TALLY_FUZZ_OTHER_KEY"]
        if (case.headers or {}).get("Authorization") == f"Bearer {key}":
            case.headers["Authorization"] = f"Bearer {other}"
        return
    if case.operation.path != "/v1/segment/webhook/{tenant_id}":
        return
    if (case.headers or {}).get("X-Signature") != "signed-by-the-hooks":
        return
    # what the requests transport sends: raw bytes as they are, JSON as json.dumps in UTF-8
    body = case.body
    if isinstance(body, bytes):
        raw = body
    elif type(body).__name__ == "NotSet":
        raw = b""
    else:
        raw = json.dumps(body, allow_nan=False).encode()
    case.headers["X-Signature"] = hmac.new(SEGMENT_SECRET.encode(), raw, hashlib.sha1).hexdigest()


# --- positive cases: rules JSON Schema cannot state --------------------------------------------

FROM, TO = "2025-01-01T00:00:00Z", "2025-01-03T00:00:00Z"  # whole minutes, from < to, <100k
FUTURE = "2099-01-01T00:00:00Z"
METER, DIMENSION, PLAN = "fz-sum", "region", "fz-plan"
CUSTOMER_FREE = "fz-patch"  # the world's customer without a subscription


def _is_positive(case: Any) -> bool:
    meta = case.meta
    return meta is not None and meta.generation.mode.is_positive


def _listed(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _usage_query(q: dict[str, Any], group: str, groups: str, filters: str) -> None:
    """A usage query's range and dimensions: ``from`` before ``to`` (a 2-day range), group and
    filter dimensions among the meter's (the world's meter groups by ``region``)."""
    q["from"], q["to"] = FROM, TO
    if groups in q:
        q[groups] = [g for g in _listed(q[groups]) if g in (group, DIMENSION)]
    if isinstance(q.get(filters), dict):
        q[filters] = {k: v for k, v in q[filters].items() if k == DIMENSION}
    for key in [k for k in q if k.startswith(filters + "[") and k != f"{filters}[{DIMENSION}]"]:
        del q[key]


def _decimal(v: Any) -> Any:
    from decimal import Decimal

    try:
        return Decimal(str(v))
    except Exception:
        return None


def _fix_bands(bands: Any, value_key: str) -> Any:
    """Tiers/steps: strictly increasing ``up_to``, the last one open (null)."""
    if not isinstance(bands, list) or not bands:
        return [{"up_to": None, value_key: "1"}]
    bounds = sorted({d for b in bands if isinstance(b, dict) and (d := _decimal(b.get("up_to")))})
    out = []
    for i, b in enumerate(bands):
        b = dict(b) if isinstance(b, dict) else {}
        last = i == len(bands) - 1
        b["up_to"] = None if last or i >= len(bounds) else str(bounds[i])
        out.append(b)
        if b["up_to"] is None:
            break
    return out


def _fix_price(price: Any) -> Any:
    if not isinstance(price, dict):
        return price
    p = dict(price)
    p.pop("currency", None)  # a charge's currency must be the plan's
    for lo, hi in (("minimum", "maximum"), ("min_per_event", "max_per_event")):
        a, b = _decimal(p.get(lo)), _decimal(p.get(hi))
        if a is not None and b is not None and a > b:
            p[lo], p[hi] = p[hi], p[lo]
    if "tiers" in p:
        p["tiers"] = _fix_bands(p["tiers"], "unit_amount")
    if "steps" in p:
        p["steps"] = _fix_bands(p["steps"], "amount")
    return p


def _fix_charges(charges: Any) -> Any:
    """Unique keys; a metered charge names the world's meter (and its dimension); a percentage
    price or a group_by needs a meter."""
    if not isinstance(charges, list):
        return charges
    out = []
    for i, c in enumerate(charges):
        if not isinstance(c, dict):
            out.append(c)
            continue
        c = dict(c)
        c["key"] = f"c{i}"
        price = _fix_price(c.get("price"))
        c["price"] = price
        metered = c.get("meter_slug") is not None or (
            isinstance(price, dict) and price.get("model") == "percentage"
        )
        c["meter_slug"] = METER if metered else None
        if c.get("group_by") is not None:
            c["group_by"] = DIMENSION if metered else None
        out.append(c)
    return out


def _fix_plan(plan: Any) -> Any:
    if isinstance(plan, dict) and "charges" in plan:
        plan = dict(plan)
        plan["charges"] = _fix_charges(plan["charges"])
    return plan


def _no_event_bounds(price: Any) -> Any:
    """A preview has no individual events: no per-event fee or bounds on a percentage price."""
    if isinstance(price, dict) and price.get("model") == "percentage":
        drop = ("min_per_event", "max_per_event", "fixed_amount")
        price = {k: v for k, v in price.items() if k not in drop}
    return price


def _fix_preview(b: dict[str, Any]) -> dict[str, Any]:
    """Exactly one of price, plan, plan_code; quantity only with a price; usage naming only the
    meters the plan uses (none here); a currency for a price that has none; no per-event bounds
    (a preview rates totals)."""
    b = dict(b)
    if isinstance(b.get("price"), dict):
        b["price"] = _no_event_bounds(b["price"])
    plan = b.get("plan")
    if isinstance(plan, dict) and isinstance(plan.get("charges"), list):
        b["plan"] = {
            **plan,
            "charges": [
                {**c, "price": _no_event_bounds(c.get("price"))} if isinstance(c, dict) else c
                for c in plan["charges"]
            ],
        }
    if b.get("price") is not None:
        b.pop("plan", None)
        b.pop("plan_code", None)
        b.pop("plan_version", None)
        b["price"] = _fix_price(b["price"])
        if b.get("quantity") is None:
            b["usage"] = {}
        if b.get("currency") is None:
            b["currency"] = "USD"
    else:
        b.pop("price", None)
        b.pop("quantity", None)
        b.pop("currency", None)
        b["usage"] = {}
        if b.get("plan") is not None:
            b.pop("plan_code", None)
            b.pop("plan_version", None)
            b["plan"] = _fix_plan(b["plan"])
        elif b.get("plan_code") in (None, PLAN):
            # version 1: later versions the fuzzer published may hold per-event bounds
            b["plan_code"], b["plan_version"] = PLAN, 1
    return b


def _after(b: dict[str, Any], first: str, second: str) -> None:
    """``second`` after ``first`` when both are given (else ``second`` is dropped)."""
    from schemas.timeutil import parse_time

    if b.get(first) is None or b.get(second) is None:
        return
    try:
        if parse_time(b[second]) <= parse_time(b[first]):
            b.pop(second)
    except ValueError:
        pass


def _future(b: dict[str, Any], name: str) -> None:
    """``name`` in the future (an API key's expiry)."""
    from schemas.timeutil import parse_time, utc_now

    if b.get(name) is None:
        return
    try:
        if parse_time(b[name]) <= utc_now():
            b[name] = FUTURE
    except ValueError:
        pass


def _past(b: dict[str, Any], name: str) -> None:
    """``name`` not in the future (an invoice run's as_of)."""
    from schemas.timeutil import parse_time, utc_now

    if b.get(name) is None:
        return
    try:
        if parse_time(b[name]) > utc_now():
            b[name] = FROM
    except ValueError:
        pass


def _valid_events(body: Any, schema: dict[str, Any]) -> Any:
    """With ``atomic=true`` every element of a batch must be an event (else the elements that
    are not are rejected one by one)."""
    import jsonschema_rs

    if not isinstance(body, list):
        return body
    check = jsonschema_rs.validator_for(schema)
    return [e for e in body if check.is_valid(e)] or body[:0]


RECON_CSV = "customer_id,charge,group,quantity,amount\nfz-cust,base,,1,10.00\n"


def _protect(case: Any) -> None:
    """The fuzzer keeps its own credentials and the world's meters: a revoke, rotate or delete
    of them (an id schemathesis picked up from an earlier answer) goes to a spare instead
    (``TALLY_FUZZ_PROTECT``: protected id -> spare)."""
    protect = json.loads(os.environ.get("TALLY_FUZZ_PROTECT", "{}"))
    destructive = case.method.upper() == "DELETE" or case.operation.path.endswith("/rotate")
    params = case.path_parameters
    if destructive and isinstance(params, dict):
        for name, value in list(params.items()):
            if isinstance(value, str) and value in protect:
                params[name] = protect[value]


SEGMENT_TIMES = ("timestamp", "originalTimestamp")
SEGMENT_OPS = (
    "/v1/batch",
    "/v1/track",
    "/v1/alias",
    "/v1/group",
    "/v1/identify",
    "/v1/page",
    "/v1/screen",
    "/v1/segment/webhook/{tenant_id}",
)


def _segment_times(body: Any) -> None:
    """A message's time within the server's lateness bound (a setting, stated in words)."""
    messages = body.get("batch") if isinstance(body.get("batch"), list) else [body]
    for m in messages:
        if isinstance(m, dict):
            for name in SEGMENT_TIMES:
                if m.get(name) is not None:
                    m[name] = FROM


def _event_times(body: Any) -> None:
    """An event's time within the lateness bound (a setting, stated in words)."""
    for e in body if isinstance(body, list) else [body]:
        if isinstance(e, dict) and e.get("time") is not None:
            e["time"] = FROM


def _known_meter(case: Any) -> None:
    """A positive threshold names a meter of the tenant (an unknown one is a 400 naming
    ``meter_slug``), in every phase: here rather than in ``map_case``, which the stateful
    phase's cases do not pass."""
    op = f"{case.method.upper()} {case.operation.path}"
    if op == "POST /v1/customers/{customer_id}/thresholds" and _is_positive(case):
        if isinstance(case.body, dict):
            case.body["meter_slug"] = METER


def _phase(case: Any) -> str:
    meta = case.meta
    phase = getattr(meta, "phase", None) if meta is not None else None
    return str(getattr(phase, "name", ""))


def _world_ids(case: Any) -> None:
    """Path parameters of the world's objects (``TALLY_FUZZ_PATHS``: "METHOD path" or "path" ->
    {name: id}) for positive cases outside the stateful phase (there the links supply them)."""
    if _phase(case) == "stateful" or not isinstance(case.path_parameters, dict):
        return
    table = json.loads(os.environ.get("TALLY_FUZZ_PATHS", "{}"))
    path = case.operation.path
    found = table.get(f"{case.method.upper()} {path}", table.get(path))
    if found:
        case.path_parameters.update(found)


@schemathesis.hook
def map_case(context: Any, case: Any) -> Any:
    _protect(case)
    if not _is_positive(case):
        return case
    _world_ids(case)
    _protect(case)
    op = f"{case.method.upper()} {case.operation.path}"
    q = case.query if isinstance(case.query, dict) else None
    b = case.body if isinstance(case.body, dict) else None
    if op in ("POST /v1/events", "POST /api/v1/events"):
        _event_times(case.body)
    if op in ("POST /v1/events", "POST /api/v1/events") and q is not None:
        if str(q.get("atomic", "")).lower() in ("true", "1"):
            from api.ingest import CLOUD_EVENT, NATIVE_EVENT

            kept = _valid_events(
                case.body, NATIVE_EVENT if op == "POST /v1/events" else CLOUD_EVENT
            )
            if kept == []:
                q["atomic"] = "false"
            else:
                case.body = kept
    elif op == "GET /v1/meters/{slug}/usage" and q is not None:
        _usage_query(q, "customer", "group_by", "filter")
    elif op == "GET /api/v1/meters/{slug}/query" and q is not None:
        _usage_query(q, "subject", "groupBy", "filterGroupBy")
    elif op == "POST /api/v1/meters/{slug}/query" and b is not None:
        _usage_query(b, "subject", "groupBy", "filterGroupBy")
    elif op in ("POST /v1/plans", "POST /v1/plans/{code}/versions") and b is not None:
        case.body = _fix_plan(b)
    elif op == "POST /v1/rating/preview" and b is not None:
        case.body = _fix_preview(b)
    elif op == "POST /v1/subscriptions" and b is not None:
        # objects of the tenant; version 1 is in the customer's currency (later versions the
        # fuzzer published may not be)
        b["customer_id"], b["plan_code"], b["plan_version"] = CUSTOMER_FREE, PLAN, 1
        _after(b, "start_at", "trial_end")
    elif case.operation.path in SEGMENT_OPS and b is not None:
        _segment_times(b)
    elif op == "POST /v1/subscriptions/{sub_id}/change-plan" and b is not None:
        b["plan_code"], b["version"] = PLAN, 1  # a plan of the tenant, in its currency
    elif op == "POST /v1/subscriptions/{sub_id}/actions" and b is not None:
        if b.get("at") == "period_end" and b.get("action") != "cancel":
            b["at"] = "now"
    elif op == "POST /v1/customers/{customer_id}/discounts" and b is not None:
        if (b.get("percentage") is None) == (b.get("amount") is None):
            b.pop("amount", None)
            b["percentage"] = "10"
        _after(b, "starts_at", "expires_at")
    elif op.endswith(("/api-keys", "/keys", "/rotate")) and b is not None:
        _future(b, "expires_at")
    elif op.endswith("/invoices/run") and b is not None:
        _past(b, "as_of")
    elif op == "POST /v1/invoices/{invoice_id}/credit-notes" and b is not None:
        case.body = {"reason": b.get("reason") or "goodwill", "amount": "0.01"}
    elif op == "POST /v1/events/{event_id}/corrections" and b is not None:
        if b.get("action") == "void":
            b.pop("properties", None)
        elif b.get("properties") is None:
            b["properties"] = {}
    elif op == "POST /v1/reconciliations":
        if case.media_type == "text/csv":
            case.body = RECON_CSV
            case.query = {**(q or {}), "period_start": FROM, "period_end": TO}
            case.query.pop("amount_tolerance", None)
        elif b is not None:
            _after(b, "period_start", "period_end")
            if b.get("period_end") is None:
                b["period_start"], b["period_end"] = FROM, TO
    return case
