"""Pure parsing of usage-query parameters and rendering of results (JSON/CSV). No I/O.

Native ``GET /v1/meters/{slug}/usage``: ``from``, ``to`` (RFC 3339 with offset or epoch ms;
whole minutes), ``window`` (MINUTE|HOUR|DAY|MONTH; absent = one total for the whole range),
``tz`` (IANA name, default UTC), ``customer`` (repeatable filter), ``group_by`` (repeatable: the
meter's group_by dimensions, and ``customer`` for one row per customer -- also implied by a
``customer`` filter), ``filter[<dimension>]=value`` (repeatable: any of the values).
Defaults: ``to`` = the end of the current minute, ``from`` = the start of the current day in
``tz``. ``from`` is inclusive, ``to`` exclusive.

OpenMeter ``/api/v1/meters/{slug}/query``: ``from``, ``to``, ``windowSize``, ``windowTimeZone``,
``subject`` (repeatable), ``groupBy`` (repeatable; ``subject`` is reserved and means per-customer
rows), ``filterGroupBy[<dimension>]=value``. ``from`` is floored and ``to`` ceiled to whole
minutes (usage is stored per minute); the answer echoes the effective range.
"""

from __future__ import annotations

import ast
import csv
import io
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson

from schemas.timeutil import parse_time, to_ms
from tally.errors import ValidationError

WINDOWS = ("MINUTE", "HOUR", "DAY", "MONTH")
_WINDOW_LEN = {
    "MINUTE": timedelta(minutes=1),
    "HOUR": timedelta(hours=1),
    "DAY": timedelta(days=1),
    "MONTH": timedelta(days=28),
}
MAX_WINDOWS = 100_000
MAX_VALUES = 1000
# values of one repeated query-string parameter: the whole URL must fit the HTTP server's
# request-line limit (64 KB), so the query string takes fewer than a JSON body
MAX_QUERY_VALUES = 50
_MINUTE = timedelta(minutes=1)
_OM_SUBJECT = "subject"


def bad(param: str, message: str) -> ValidationError:
    return ValidationError(
        f"query parameter {param!r}: {message}", details=[{"field": param, "message": message}]
    )


@dataclass(frozen=True)
class UsageParams:
    from_: datetime
    to: datetime
    window: str | None  # one of WINDOWS, or None = whole range
    tz: str
    customers: tuple[str, ...] = ()
    group_by: tuple[str, ...] = ()
    filters: dict[str, tuple[str, ...]] = field(default_factory=dict)
    by_customer: bool = False  # rows per customer (group_by=customer / groupBy=subject / a filter)


def parse_instant(param: str, value: str) -> datetime:
    v = value.strip()
    try:
        if v.lstrip("-").isdigit():
            return parse_time(int(v))
        return parse_time(v)
    except (ValueError, OverflowError) as exc:
        raise bad(param, f"expected an RFC 3339 time with offset or epoch ms ({exc})") from None


def parse_window(param: str, value: str | None) -> str | None:
    if value is None or value.strip() == "":
        return None
    w = value.strip().upper()
    if w not in WINDOWS:
        raise bad(param, f"must be one of {', '.join(WINDOWS)}, got {value!r}")
    return w


def parse_tz(param: str, value: str | None) -> str:
    if value is None or value.strip() == "":
        return "UTC"
    name = value.strip()
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise bad(param, f"unknown IANA time zone {value!r}") from None
    return name


def _count(param: str, values: Sequence[Any], limit: int) -> None:
    if len(values) > limit:
        raise bad(param, f"at most {limit} values")


def _strings(param: str, values: Sequence[str], limit: int = MAX_VALUES) -> tuple[str, ...]:
    _count(param, values, limit)
    out: list[str] = []
    for v in values:
        if not v or len(v) > 256:
            raise bad(param, "values must be 1..256 characters")
        if v not in out:
            out.append(v)
    return tuple(out)


def _check_dims(param: str, names: Iterable[str], dims: Mapping[str, str]) -> None:
    for n in names:
        if n not in dims:
            known = ", ".join(sorted(dims)) or "none"
            raise bad(param, f"{n!r} is not a group_by dimension of this meter (known: {known})")


def _ceil_minute(dt: datetime) -> datetime:
    floored = dt.replace(second=0, microsecond=0)
    return floored if floored == dt else floored + _MINUTE


def default_range(now: datetime, tz: str) -> tuple[datetime, datetime]:
    to = _ceil_minute(to_ms(now))
    local = now.astimezone(ZoneInfo(tz))
    start = local.replace(hour=0, minute=0, second=0, microsecond=0)
    return to_ms(start), to


def _check_range(
    from_: datetime, to: datetime, window: str | None, names: tuple[str, str, str]
) -> None:
    if from_ >= to:
        raise bad(names[0], f"must be before {names[1]} ({from_.isoformat()} >= {to.isoformat()})")
    if window is not None and (to - from_) / _WINDOW_LEN[window] > MAX_WINDOWS:
        raise bad(
            names[2],
            f"range {from_.isoformat()}..{to.isoformat()} has more than "
            f"{MAX_WINDOWS} {window} windows; use a larger window or a shorter range",
        )


def native_params(
    query: Sequence[tuple[str, str]], group_dims: Mapping[str, str], now: datetime
) -> UsageParams:
    """Parse the native usage query string (as a list of key/value pairs)."""
    single: dict[str, str] = {}
    customers: list[str] = []
    group_by: list[str] = []
    filters: dict[str, list[str]] = {}
    allowed = {"from", "to", "window", "tz", "format"}
    for k, v in query:
        if k == "customer":
            customers.append(v)
        elif k == "group_by":
            group_by.append(v)
        elif k.startswith("filter[") and k.endswith("]"):
            filters.setdefault(k[7:-1], []).append(v)
        elif k in allowed:
            if k in single:
                raise bad(k, "given more than once")
            single[k] = v
        else:
            raise bad(
                k,
                "unknown parameter (known: from, to, window, tz, customer, group_by, "
                "filter[<dimension>], format)",
            )
    window = parse_window("window", single.get("window"))
    tz = parse_tz("tz", single.get("tz"))
    d_from, d_to = default_range(now, tz)
    from_ = parse_instant("from", single["from"]) if "from" in single else d_from
    to = parse_instant("to", single["to"]) if "to" in single else d_to
    for name, dt in (("from", from_), ("to", to)):
        if dt.second or dt.microsecond:
            raise bad(
                name, f"must be a whole minute (usage is stored per minute), got {dt.isoformat()}"
            )
    _check_range(from_, to, window, ("from", "to", "window"))
    _count("group_by", group_by, MAX_QUERY_VALUES)
    by_customer = "customer" in group_by or bool(customers)
    gb = _strings("group_by", [g for g in group_by if g != "customer"], MAX_QUERY_VALUES)
    _check_dims("group_by", gb, group_dims)
    _check_dims("filter", filters, group_dims)
    return UsageParams(
        from_=from_,
        to=to,
        window=window,
        tz=tz,
        customers=_strings("customer", customers, MAX_QUERY_VALUES),
        group_by=gb,
        filters={k: _strings(f"filter[{k}]", v, MAX_QUERY_VALUES) for k, v in filters.items()},
        by_customer=by_customer,
    )


def _om_filter_value(param: str, raw: str) -> dict[str, list[str]]:
    """``filterGroupBy=<object>``: the official SDK sends a dict's Python repr; JSON works too."""
    try:
        obj: Any = orjson.loads(raw)
    except orjson.JSONDecodeError:
        try:
            obj = ast.literal_eval(raw) if len(raw) <= 8192 else None
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            obj = None
    if not isinstance(obj, dict):
        raise bad(param, "expected filterGroupBy[<dimension>]=<value> or a JSON object")
    out: dict[str, list[str]] = {}
    for k, v in obj.items():
        vals = v if isinstance(v, list) else [v]
        if not isinstance(k, str) or not all(isinstance(x, str) for x in vals):
            raise bad(param, "dimension names and values must be strings")
        out.setdefault(k, []).extend(vals)
    return out


def openmeter_params(
    fields: Mapping[str, Any],
    group_dims: Mapping[str, str],
    now: datetime,
    max_values: int = MAX_VALUES,
) -> UsageParams:
    """Parse OpenMeter query fields, already collected from a query string or a JSON body:
    ``from``, ``to``, ``windowSize``, ``windowTimeZone`` (str); ``subject``, ``groupBy``,
    ``filterCustomerId`` (list[str]); ``filterGroupBy`` (dict[str, list[str]]). ``max_values``:
    values per list (``MAX_QUERY_VALUES`` for a query string)."""
    window = parse_window("windowSize", fields.get("windowSize"))
    tz = parse_tz("windowTimeZone", fields.get("windowTimeZone"))
    d_from, d_to = default_range(now, tz)
    from_ = parse_instant("from", fields["from"]) if fields.get("from") else d_from
    to = parse_instant("to", fields["to"]) if fields.get("to") else d_to
    from_ = from_.replace(second=0, microsecond=0)
    to = _ceil_minute(to)
    _check_range(from_, to, window, ("from", "to", "windowSize"))
    subjects = _strings("subject", list(fields.get("subject") or []), max_values)
    customers_ids = _strings(
        "filterCustomerId", list(fields.get("filterCustomerId") or []), max_values
    )
    raw_gb = list(fields.get("groupBy") or [])
    _count("groupBy", raw_gb, max_values)
    by_customer = _OM_SUBJECT in raw_gb or bool(subjects) or bool(customers_ids)
    gb = _strings("groupBy", [g for g in raw_gb if g != _OM_SUBJECT], max_values)
    _check_dims("groupBy", gb, group_dims)
    filters = dict(fields.get("filterGroupBy") or {})
    _check_dims("filterGroupBy", filters, group_dims)
    return UsageParams(
        from_=from_,
        to=to,
        window=window,
        tz=tz,
        customers=tuple(dict.fromkeys(subjects + customers_ids)),
        group_by=gb,
        filters={
            k: _strings(f"filterGroupBy[{k}]", list(v), max_values) for k, v in filters.items()
        },
        by_customer=by_customer,
    )


def openmeter_query_fields(query: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """Collect OpenMeter GET parameters (arrays repeated: ``subject=a&subject=b``)."""
    out: dict[str, Any] = {}
    lists = ("subject", "groupBy", "filterCustomerId")
    filters: dict[str, list[str]] = {}
    for k, v in query:
        if k in lists:
            out.setdefault(k, []).append(v)
        elif k.startswith("filterGroupBy[") and k.endswith("]"):
            filters.setdefault(k[14:-1], []).append(v)
        elif k == "filterGroupBy":
            for fk, fv in _om_filter_value(k, v).items():
                filters.setdefault(fk, []).extend(fv)
        elif k in ("from", "to", "windowSize", "windowTimeZone", "clientId"):
            out[k] = v
        elif k == "advancedMeterGroupByFilters":
            raise bad(k, "not supported; use filterGroupBy[<dimension>]=<value>")
        # other OpenMeter parameters are ignored, as OpenMeter ignores unknown ones
    if filters:
        out["filterGroupBy"] = filters
    return out


def openmeter_body_fields(doc: Any) -> dict[str, Any]:
    """Validate the JSON body of POST /api/v1/meters/{slug}/query into the same fields."""
    if not isinstance(doc, dict):
        raise ValidationError(
            "the query body must be a JSON object",
            details=[{"field": "body", "message": "expected a JSON object"}],
        )
    out: dict[str, Any] = {}
    for k in ("from", "to", "windowSize", "windowTimeZone", "clientId"):
        v = doc.get(k)
        if v is not None:
            if not isinstance(v, str):
                raise bad(k, "must be a string")
            out[k] = v
    for k in ("subject", "groupBy", "filterCustomerId"):
        v = doc.get(k)
        if v is not None:
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                raise bad(k, "must be an array of strings")
            out[k] = v
    fg = doc.get("filterGroupBy")
    if fg is not None:
        if not isinstance(fg, dict):
            raise bad("filterGroupBy", "must be an object of dimension -> [values]")
        filters: dict[str, list[str]] = {}
        for fk, fv in fg.items():
            vals = fv if isinstance(fv, list) else [fv]
            if not all(isinstance(x, str) for x in vals):
                raise bad("filterGroupBy", f"values of {fk!r} must be strings")
            filters[fk] = vals
        out["filterGroupBy"] = filters
    if doc.get("advancedMeterGroupByFilters"):
        raise bad("advancedMeterGroupByFilters", "not supported; use filterGroupBy")
    return out


# --- rendering -----------------------------------------------------------------------------


def iso(dt: datetime) -> str:
    return to_ms(dt).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def decimal_str(v: Decimal | None) -> str | None:
    if v is None:
        return None
    if v == v.to_integral_value():
        return str(v.quantize(Decimal(1)))
    return format(v.normalize(), "f")


class _Isos(dict[datetime, str]):
    """``iso`` of the window bounds of one answer, each formatted once (its rows share a few
    bounds: one pair without a window, one per window with one)."""

    def __missing__(self, dt: datetime) -> str:
        text = self[dt] = iso(dt)
        return text


def native_rows(rows: Iterable[Any], by_customer: bool = True) -> list[dict[str, Any]]:
    isos = _Isos()
    out = []
    for r in rows:
        item: dict[str, Any] = {
            "window_start": isos[r.window_start],
            "window_end": isos[r.window_end],
        }
        if by_customer and r.customer is not None:
            item["customer"] = r.customer
        item["group_by"] = dict(r.group_by or {})
        item["value"] = decimal_str(r.value)
        out.append(item)
    return out


def openmeter_rows(
    rows: Iterable[Any], by_customer: bool, exact: bool = False
) -> list[dict[str, Any]]:
    """OpenMeter's MeterQueryRow: value is a JSON number (``exact``: the decimal string, for
    CSV); rows without a value (e.g. MIN over events without the property) are left out."""
    isos = _Isos()
    out = []
    for r in rows:
        if r.value is None:
            continue
        out.append(
            {
                "value": decimal_str(r.value) if exact else float(r.value),
                "windowStart": isos[r.window_start],
                "windowEnd": isos[r.window_end],
                "subject": r.customer if by_customer else None,
                "groupBy": {k: v for k, v in (r.group_by or {}).items()},
            }
        )
    return out


def to_csv(header: Sequence[str], records: Iterable[Sequence[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for rec in records:
        w.writerow(["" if x is None else _csv_safe(x) for x in rec])
    return buf.getvalue()


def _csv_safe(x: Any) -> Any:
    """Neutralise spreadsheet formulas in text cells (CSV injection)."""
    if isinstance(x, str) and x and x[0] in "=+-@\t\r" and not _is_number(x):
        return "'" + x
    return x


def _is_number(s: str) -> bool:
    try:
        Decimal(s)
    except ArithmeticError:
        return False
    return True


def native_csv(rows: list[dict[str, Any]], group_by: Sequence[str], by_customer: bool) -> str:
    header = ["window_start", "window_end"] + (["customer"] if by_customer else [])
    header += [*list(group_by), "value"]
    return to_csv(
        header,
        (
            [r["window_start"], r["window_end"]]
            + ([r.get("customer")] if by_customer else [])
            + [r["group_by"].get(g) for g in group_by]
            + [r["value"]]
            for r in rows
        ),
    )


def openmeter_csv(rows: list[dict[str, Any]], group_by: Sequence[str], by_customer: bool) -> str:
    header = ["window_start", "window_end"] + (["subject"] if by_customer else [])
    header += [*list(group_by), "value"]
    return to_csv(
        header,
        (
            [r["windowStart"], r["windowEnd"]]
            + ([r["subject"]] if by_customer else [])
            + [r["groupBy"].get(g) for g in group_by]
            + [r["value"]]
            for r in rows
        ),
    )


def wants_csv(accept: str | None, fmt: str | None) -> bool:
    if fmt is not None:
        f = fmt.strip().lower()
        if f not in ("csv", "json"):
            raise bad("format", f"must be csv or json, got {fmt!r}")
        return f == "csv"
    if not accept:
        return False
    types = [p.split(";", 1)[0].strip().lower() for p in accept.split(",")]
    return "text/csv" in types and "application/json" not in types[: types.index("text/csv")]
