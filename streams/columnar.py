"""Columnar matching and minute aggregation of one link (pure).

The worker's hot path: the kept events of a link arrive as columns (``KeptEvents``); they are
grouped by ``(tenant, event type)`` once, and for each group every candidate meter is applied to
the whole group. What several meters of a group share is computed once per group: the value at a
``value_property`` (parsed to ``Decimal`` once, whatever number of meters reads it), the canonical
scalar for ``unique_count``, the group key of a ``group_by``, the minute window. The minute
windows are accumulated per kind (count: a ``Counter``; numeric: sum/min/max/count; unique: sets;
latest: max of ``(time_ms, event_id, value)``) and written straight into the Arrow columns of
``schemas.columns.USAGE_SCHEMA``.

Semantics are exactly those of ``MeterIndex``/``CompiledMeter.match`` and ``WindowTable`` (the
per-event reference; ``tests/unit/streams/test_columnar.py`` checks equality on random batches):
same filters, same value rules (``ValueProblem`` -> the event does not feed that meter and is
reported as a ``ValueIssue``: counted, and a dead letter), exact ``Decimal`` sums, latest by ``(time_ms, event_id)``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Context, Decimal
from typing import Any, NamedTuple

import pyarrow as pa

from schemas.columns import USAGE_SCHEMA
from schemas.jsonpath import MISSING, JsonPath
from schemas.meters import Aggregation
from streams.aggregation import MINUTE_MS, ORIGIN_STREAM
from streams.matching import (
    MAX_ABS,
    CompiledMeter,
    MeterIndex,
    ValueProblem,
    canonical_scalar,
    group_key_of,
    group_value,
    to_decimal,
)

_CTX = Context(prec=80)
_NUMERIC = frozenset(
    {Aggregation.SUM, Aggregation.MIN, Aggregation.MAX, Aggregation.AVG, Aggregation.LATEST}
)
_ZERO = Decimal(0)


class _Bad:
    """A value the meter cannot use (what ``ValueProblem`` said about it)."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


_INT_LIMIT = int(MAX_ABS)


@dataclass(slots=True)
class KeptEvents:
    """The kept (deduplicated) events of a link, as parallel columns."""

    tenants: list[str] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    types: list[str] = field(default_factory=list)
    customers: list[str] = field(default_factory=list)
    times_ms: list[int] = field(default_factory=list)
    properties: list[dict[str, Any]] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)


# threshold(meter) -> the meter feeds events at offsets > threshold (None: no event of the link)
Threshold = Callable[[CompiledMeter], int | None]


class ValueIssue(NamedTuple):
    """Kept event ``event`` (its position in ``KeptEvents``) that meter ``meter_id`` applies to
    but cannot count (the same message as ``CompiledMeter.match``'s ``ValueProblem``)."""

    event: int
    meter_id: str
    message: str


@dataclass(slots=True)
class ColumnarResult:
    usage: pa.Table
    issues: list[ValueIssue]
    windows: int

    @property
    def value_errors(self) -> int:
        return len(self.issues)


def _raw_values(path: JsonPath, props: list[dict[str, Any]]) -> list[Any]:
    """``path.extract`` of every event (a one-name path, the common case, without the call)."""
    steps = path.steps
    if len(steps) == 1 and isinstance(steps[0], str):
        name = steps[0]
        return [p.get(name, MISSING) if type(p) is dict else MISSING for p in props]
    extract = path.extract
    return [extract(p) for p in props]


def _numeric_values(path: JsonPath, props: list[dict[str, Any]]) -> list[Any]:
    """``to_decimal`` of every event's value, a ``_Bad`` where it raises. Integers in range take a
    short cut: ``Decimal(v)`` equals ``to_decimal(v)`` (only the exponent differs; every use
    compares, adds, or stores it as ``Decimal(38, 9)``)."""
    out: list[Any] = []
    for v in _raw_values(path, props):
        if type(v) is int and -_INT_LIMIT < v < _INT_LIMIT:
            out.append(Decimal(v))
            continue
        try:
            out.append(to_decimal(v))
        except ValueProblem as exc:
            out.append(_Bad(str(exc)))
    return out


def _uniq_values(path: JsonPath, props: list[dict[str, Any]]) -> list[Any]:
    out: list[Any] = []
    for v in _raw_values(path, props):
        if type(v) is str:
            out.append(v)
            continue
        s = canonical_scalar(v)
        out.append(_Bad(f"unique_count needs a scalar value, got {v!r}") if s is None else s)
    return out


def _group_columns(
    group_paths: tuple[tuple[str, JsonPath], ...], props: list[dict[str, Any]]
) -> tuple[list[str], list[dict[str, str]]]:
    """Group key and group values of every event, computed once per distinct raw value
    combination (group_by properties have few distinct values)."""
    names = [name for name, _p in group_paths]
    raw = list(zip(*(_raw_values(p, props) for _n, p in group_paths), strict=True))
    memo: dict[Any, tuple[str, dict[str, str]]] = {}
    gks: list[str] = []
    gvs: list[dict[str, str]] = []
    for values in raw:
        try:
            # the type is part of the key: 1, 1.0 and True are equal in Python, not in JSON
            memo_key: Any = (values, tuple(map(type, values)))
            hit = memo.get(memo_key)
        except TypeError:  # an object or array: not hashable, computed every time
            memo_key, hit = None, None
        if hit is None:
            gv = {name: group_value(v) for name, v in zip(names, values, strict=True)}
            hit = (group_key_of(gv), gv)
            if memo_key is not None:
                memo[memo_key] = hit
        gks.append(hit[0])
        gvs.append(hit[1])
    return gks, gvs


# window key within one meter: (customer, window_ms) or (customer, group_key, window_ms)
_Key = tuple[Any, ...]


@dataclass(slots=True)
class _MeterWindows:
    """The windows of one meter in one link."""

    tenant_id: str
    meter_id: str
    grouped: bool
    counts: Counter[_Key]
    group_values: dict[_Key, dict[str, str]]
    # numeric meters: key -> [value_count, sum, min, max]
    values: dict[_Key, list[Any]] | None = None
    uniq: dict[_Key, set[str]] | None = None
    latest: dict[_Key, tuple[int, str, Decimal]] | None = None


def aggregate(
    kept: KeptEvents,
    meter_index: MeterIndex,
    threshold: Threshold,
) -> ColumnarResult:
    """Match every kept event against its tenant's meters and aggregate minute windows."""
    groups: dict[tuple[str, str], list[int]] = {}
    for j, tenant_type in enumerate(zip(kept.tenants, kept.types, strict=True)):
        g = groups.get(tenant_type)
        if g is None:
            groups[tenant_type] = [j]
        else:
            g.append(j)
    out: list[_MeterWindows] = []
    issues: list[ValueIssue] = []
    add = _CTX.add
    for (tenant, etype), gidx in groups.items():
        cands = meter_index.candidates(tenant, etype)
        if not cands:
            continue
        # the group's columns (positions n = 0..len-1 below are positions in the group)
        props = [kept.properties[j] for j in gidx]
        offsets = [kept.offsets[j] for j in gidx]
        customers = [kept.customers[j] for j in gidx]
        times = [kept.times_ms[j] for j in gidx]
        windows = [t - t % MINUTE_MS for t in times]
        everyone = range(len(gidx))
        base_keys: list[_Key] | None = None
        value_cache: dict[tuple[bool, str], list[Any]] = {}
        group_cache: dict[Any, tuple[list[_Key], list[dict[str, str]]]] = {}
        for cm in cands:
            low = threshold(cm)
            if low is None:
                continue
            sel: range | list[int] = (
                everyone if low < 0 else [n for n in everyone if offsets[n] > low]
            )
            if cm.filters:
                filters = cm.filters
                sel = [n for n in sel if all(f(props[n]) for f in filters)]
            if not sel:
                continue
            agg = cm.aggregation
            vals: list[Any] | None = None
            if agg in _NUMERIC or agg == Aggregation.UNIQUE_COUNT:
                assert cm.value_path is not None
                uniq = agg == Aggregation.UNIQUE_COUNT
                ck = (uniq, cm.value_path.text)
                vals = value_cache.get(ck)
                if vals is None:
                    fn = _uniq_values if uniq else _numeric_values
                    vals = value_cache[ck] = fn(cm.value_path, props)
                bad = [n for n in sel if type(vals[n]) is _Bad]
                if bad:
                    issues.extend(ValueIssue(gidx[n], cm.id, vals[n].message) for n in bad)
                    sel = [n for n in sel if type(vals[n]) is not _Bad]
                    if not sel:
                        continue
            whole = sel is everyone
            if cm.group_paths:
                cached = group_cache.get(cm.group_paths)
                if cached is None:
                    gks, gvs = _group_columns(cm.group_paths, props)
                    cached = group_cache[cm.group_paths] = (
                        list(zip(customers, gks, windows, strict=True)),
                        gvs,
                    )
                all_keys, gvs = cached
                keys = all_keys if whole else [all_keys[n] for n in sel]
                gv_of = dict(zip(keys, gvs if whole else [gvs[n] for n in sel], strict=True))
            else:
                if base_keys is None:
                    base_keys = list(zip(customers, windows, strict=True))
                keys = base_keys if whole else [base_keys[n] for n in sel]
                gv_of = {}
            mw = _MeterWindows(tenant, cm.id, bool(cm.group_paths), Counter(keys), gv_of)
            out.append(mw)
            if vals is None:
                continue
            vs = vals if whole else [vals[n] for n in sel]
            if agg == Aggregation.UNIQUE_COUNT:
                uniq_sets: dict[_Key, set[str]] = {}
                for key, v in zip(keys, vs, strict=True):
                    us = uniq_sets.get(key)
                    if us is None:
                        uniq_sets[key] = {v}
                    else:
                        us.add(v)
                mw.uniq = uniq_sets
                continue
            acc: dict[_Key, list[Any]] = {}
            for key, v in zip(keys, vs, strict=True):
                a = acc.get(key)
                if a is None:
                    acc[key] = [1, v, v, v]
                else:
                    a[0] += 1
                    a[1] = add(a[1], v)
                    if v < a[2]:
                        a[2] = v
                    elif v > a[3]:
                        a[3] = v
            mw.values = acc
            if agg == Aggregation.LATEST:
                ids = [kept.ids[gidx[n]] for n in sel]
                ts = times if whole else [times[n] for n in sel]
                best: dict[_Key, tuple[int, str, Decimal]] = {}
                for key, cand in zip(keys, zip(ts, ids, vs, strict=True), strict=True):
                    cur = best.get(key)
                    if cur is None or cand > cur:
                        best[key] = cand
                mw.latest = best
    return _usage_columns(out, issues)


def _usage_columns(out: list[_MeterWindows], issues: list[ValueIssue]) -> ColumnarResult:
    tenants: list[str] = []
    meters: list[str] = []
    customers: list[str] = []
    gks: list[str] = []
    wms: list[int] = []
    gvals: list[list[tuple[str, str]]] = []
    events: list[int] = []
    vcount: list[int] = []
    vsum: list[Decimal] = []
    vmin: list[Decimal | None] = []
    vmax: list[Decimal | None] = []
    uniq: list[list[str]] = []
    latest_t: list[int] = []
    latest_id: list[str] = []
    latest_v: list[Decimal] = []
    for mw in out:
        keys = list(mw.counts)
        n = len(keys)
        tenants.extend([mw.tenant_id] * n)
        meters.extend([mw.meter_id] * n)
        customers.extend(k[0] for k in keys)
        wms.extend(k[-1] for k in keys)
        if mw.grouped:
            gks.extend(k[1] for k in keys)
            gv = mw.group_values
            gvals.extend(list(gv[k].items()) for k in keys)
        else:
            gks.extend([""] * n)
            gvals.extend([] for _ in keys)
        counts = mw.counts
        events.extend(counts[k] for k in keys)
        if mw.values is not None:
            acc = mw.values
            rows = [acc[k] for k in keys]
            vcount.extend(r[0] for r in rows)
            vsum.extend(r[1] for r in rows)
            vmin.extend(r[2] for r in rows)
            vmax.extend(r[3] for r in rows)
        else:
            vcount.extend([0] * n)
            vsum.extend([_ZERO] * n)
            vmin.extend([None] * n)
            vmax.extend([None] * n)
        if mw.uniq is not None:
            sets = mw.uniq
            uniq.extend(sorted(sets[k]) for k in keys)
        else:
            uniq.extend([] for _ in keys)
        if mw.latest is not None:
            best = mw.latest
            lts = [best[k] for k in keys]
            latest_t.extend(x[0] for x in lts)
            latest_id.extend(x[1] for x in lts)
            latest_v.extend(x[2] for x in lts)
        else:
            latest_t.extend([0] * n)
            latest_id.extend([""] * n)
            latest_v.extend([_ZERO] * n)
    total = len(tenants)
    schema = USAGE_SCHEMA
    dec = schema.field("value_sum").type
    arrays = [
        pa.array(tenants, pa.string()),
        pa.array(meters, pa.string()),
        pa.array(customers, pa.string()),
        pa.array(wms, schema.field("window_start").type),
        pa.array(gks, pa.string()),
        pa.array([ORIGIN_STREAM] * total, pa.string()),
        pa.array(gvals, schema.field("group_values").type),
        pa.array(events, pa.uint64()),
        pa.array(vcount, pa.uint64()),
        pa.array(vsum, dec),
        pa.array(vmin, dec),
        pa.array(vmax, dec),
        pa.array(uniq, schema.field("uniq_values").type),
        pa.StructArray.from_arrays(
            [
                pa.array(latest_t, pa.int64()),
                pa.array(latest_id, pa.string()),
                pa.array(latest_v, dec),
            ],
            fields=list(schema.field("latest").type),
        ),
        pa.array([0] * total, pa.int64()),
    ]
    return ColumnarResult(pa.Table.from_arrays(arrays, schema=schema), issues, total)
