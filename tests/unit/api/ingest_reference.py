"""A frozen copy of the ingest validation as it was before the columnar fast path (issue 7).

The reference the property tests compare ``api.ingest_parse`` against: for any input, the fast
parser must keep exactly the same rows and report exactly the same ``{index, field, message}``
errors. Not used by the application.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from api.ingest_parse import NATIVE_FIELDS, Limits, ParseResult
from schemas.envelope import STORE_MS_MAX, STORE_MS_MIN
from schemas.events import ID_MAX
from schemas.timeutil import EPOCH_MS_MAX, EPOCH_MS_MIN, epoch_ms, parse_time

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS = timedelta(milliseconds=1)


def _err(out: list[dict[str, Any]], index: int, name: str, message: str) -> None:
    out.append({"index": index, "field": name, "message": message})


def _string(
    item: dict[str, Any], name: str, index: int, errors: list[dict[str, Any]], label: str = ""
) -> str | None:
    v = item.get(name)
    fld = label or name
    if v is None:
        _err(errors, index, fld, f"{fld} is required")
        return None
    if not isinstance(v, str):
        _err(errors, index, fld, f"{fld} must be a string, got {_json_type(v)}")
        return None
    if not v:
        _err(errors, index, fld, f"{fld} must not be empty")
        return None
    if len(v) > ID_MAX:
        _err(errors, index, fld, f"{fld} is longer than {ID_MAX} characters")
        return None
    return v


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int | float):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    if isinstance(v, dict):
        return "object"
    return type(v).__name__


def _time(
    v: Any, index: int, now_ms: int, limits: Limits, errors: list[dict[str, Any]]
) -> int | None:
    """Parse ``time`` to epoch ms and apply the lateness bound (None = error recorded)."""
    if v is None:
        return now_ms
    if type(v) is int:
        if not EPOCH_MS_MIN <= v <= EPOCH_MS_MAX:
            _err(errors, index, "time", "invalid time: epoch milliseconds out of range")
            return None
        ms = v
    elif isinstance(v, str):
        try:
            dt = datetime.fromisoformat(v)
            if dt.tzinfo is None or dt.utcoffset() is None:
                raise ValueError("no offset")  # let parse_time word the error
            ms = (dt - _EPOCH) // _ONE_MS
        except (ValueError, OverflowError):
            try:  # the slow path: lower-case 'z', surrounding blanks, precise error message
                ms = epoch_ms(parse_time(v))
            except (ValueError, OverflowError) as exc:
                _err(errors, index, "time", f"invalid time: {exc}")
                return None
    elif isinstance(v, float) and v.is_integer() and EPOCH_MS_MIN <= v <= EPOCH_MS_MAX:
        ms = int(v)
    else:
        _err(
            errors,
            index,
            "time",
            f"time must be an RFC 3339 string or integer epoch milliseconds, got {_json_type(v)}",
        )
        return None
    problem = time_bounds_problem(ms, now_ms, limits, "time")
    if problem is not None:
        _err(errors, index, "time", problem)
        return None
    return ms


def time_bounds_problem(ms: int, now_ms: int, limits: Limits, name: str) -> str | None:
    """Why event time ``ms`` (field ``name``) is outside the lateness bounds (or the store's
    range, years 1900..2299), or None."""
    if ms < now_ms - limits.max_lateness_ms:
        return (
            f"{name} {_iso(ms)} is older than the lateness bound "
            f"({_span(limits.max_lateness_ms)} before now); the event is not accepted"
        )
    if ms > now_ms + limits.max_future_ms:
        return f"{name} {_iso(ms)} is more than {_span(limits.max_future_ms)} in the future"
    if not STORE_MS_MIN <= ms <= STORE_MS_MAX:
        return f"{name} {_iso(ms)} is outside the range Tally stores (years 1900..2299)"
    return None


def _iso(ms: int) -> str:
    return (_EPOCH + timedelta(milliseconds=ms)).isoformat(timespec="milliseconds")


def _span(ms: int) -> str:
    return str(timedelta(milliseconds=ms))


def parse_native(items: list[Any], now_ms: int, limits: Limits) -> ParseResult:
    """Validate native events. Every valid event is returned; every problem is listed."""
    res = ParseResult(total=len(items))
    errors = res.errors
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            _err(errors, index, "event", f"an event must be a JSON object, got {_json_type(item)}")
            continue
        # Fast path: a well-formed event (the common case) is checked inline.
        ev_id = item.get("id")
        ev_type = item.get("type")
        customer = item.get("customer")
        props = item.get("properties")
        if (
            type(ev_id) is str
            and type(ev_type) is str
            and type(customer) is str
            and 0 < len(ev_id) <= ID_MAX
            and 0 < len(ev_type) <= ID_MAX
            and 0 < len(customer) <= ID_MAX
            and (props is None or type(props) is dict)
            and NATIVE_FIELDS.issuperset(item)
        ):
            t = _time(item.get("time"), index, now_ms, limits, errors)
            if t is not None:
                res.rows.append((ev_id, ev_type, customer, t, {} if props is None else props))
                res.indexes.append(index)
            continue
        # Slow path: report every problem of the event.
        n_err = len(errors)
        if not NATIVE_FIELDS.issuperset(item):
            for extra in sorted(set(item) - NATIVE_FIELDS):
                _err(errors, index, extra, f"unknown field {extra!r}")
        ev_id = _string(item, "id", index, errors)
        ev_type = _string(item, "type", index, errors)
        customer = _string(item, "customer", index, errors)
        t = _time(item.get("time"), index, now_ms, limits, errors)
        props = item.get("properties")
        if props is None:
            props = {}
        elif not isinstance(props, dict):
            _err(
                errors,
                index,
                "properties",
                f"properties must be an object, got {_json_type(props)}",
            )
        if len(errors) != n_err:
            continue
        assert ev_id is not None and ev_type is not None and customer is not None and t is not None
        res.rows.append((ev_id, ev_type, customer, t, props))
        res.indexes.append(index)
    return res


def parse_cloudevents(items: list[Any], now_ms: int, limits: Limits) -> ParseResult:
    """Validate CloudEvents (OpenMeter wire format) and map them to events."""
    res = ParseResult(total=len(items))
    errors = res.errors
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            _err(errors, index, "event", f"an event must be a JSON object, got {_json_type(item)}")
            continue
        n_err = len(errors)
        ev_id = _string(item, "id", index, errors)
        _string(item, "source", index, errors)
        _string(item, "specversion", index, errors)
        ev_type = _string(item, "type", index, errors)
        customer = _string(item, "subject", index, errors)
        t = _time(item.get("time"), index, now_ms, limits, errors)
        data = item.get("data")
        if data is None:
            data = {}
        elif not isinstance(data, dict):
            _err(errors, index, "data", f"data must be a JSON object, got {_json_type(data)}")
        if len(errors) != n_err:
            continue
        assert ev_id is not None and ev_type is not None and customer is not None and t is not None
        res.rows.append((ev_id, ev_type, customer, t, data))
        res.indexes.append(index)
    return res
