"""Columnar matching and minute aggregation of one link (pure).

The worker's hot path: the kept events of a link arrive as columns (``KeptEvents``); they are
grouped by ``(tenant, event type)`` once, and for each group every candidate meter is applied to
the whole group, in native code (pyarrow, numpy) wherever that is exactly the per-event rule.
What several meters of a group share is computed once per group: the column at a property
(read once, typed by Arrow: plain integers stay ``int64``, strings stay strings; other columns go
through ``to_decimal`` / ``canonical_scalar`` per value into ``decimal128(38, 9)`` / strings),
the group keys of a ``group_by`` (once per distinct value combination), the window code of each
event (``_WindowKeys``: customer, minute and group key as one ``int64``). Each meter's windows
are an Arrow group-by of those codes (count, sum, min, max, the latest time), unique values a
sort of integer (window, value rank) pairs; the ``schemas.columns.USAGE_SCHEMA`` table is
assembled from those arrays. Sums never wrap: an ``int64`` sum is used only where the values'
bound times their count fits (``_sums_fit``), a ``decimal128`` one otherwise (a meter's values
are below ``VALUE_LIMIT``, so it cannot leave ``Decimal(38, 9)``).

Semantics are exactly those of ``MeterIndex``/``CompiledMeter.match`` and ``WindowTable`` (the
per-event reference; ``tests/unit/streams/test_columnar.py`` checks equality on random batches):
same filters, same value rules (``ValueProblem`` -> the event does not feed that meter and is
reported as a ``ValueIssue``: counted, and a dead letter), exact ``Decimal(38, 9)`` sums,
latest by ``(time_ms, event_id)``.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from itertools import repeat
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas.columns import DECIMAL, GROUP_VALUES, LATEST, TIME, USAGE_SCHEMA
from schemas.jsonpath import MISSING, JsonPath, compile_path
from schemas.meters import Aggregation, FilterOp, PropertyFilter
from streams.aggregation import MINUTE_MS, ORIGIN_STREAM
from streams.matching import (
    MAX_ABS,
    VALUE_LIMIT,
    CompiledMeter,
    MeterIndex,
    ValueProblem,
    canonical_scalar,
    group_key_of,
    group_value,
    to_decimal,
)

_NUMERIC = frozenset(
    {Aggregation.SUM, Aggregation.MIN, Aggregation.MAX, Aggregation.AVG, Aggregation.LATEST}
)


class _Bad:
    """A value the meter cannot use (what ``ValueProblem`` said about it)."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


# integers below this (in absolute value) take a short cut past ``to_decimal`` (same result);
# wider ones go through it and its range check
_INT_LIMIT = int(VALUE_LIMIT)


@dataclass(slots=True)
class KeptEvents:
    """A link's events as parallel columns and which of them are kept (deduplicated): the
    events at ``positions`` (ascending), or every event when ``positions`` is None. The
    columns may hold the dropped copies too, so that the worker does not copy every column to
    leave a few copies out; only the kept events are matched and aggregated."""

    tenants: list[str] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    types: list[str] = field(default_factory=list)
    customers: list[str] = field(default_factory=list)
    times_ms: list[int] = field(default_factory=list)
    properties: list[dict[str, Any]] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    positions: list[int] | None = None

    def __len__(self) -> int:
        """The events in the columns (kept or not)."""
        return len(self.ids)


# threshold(meter) -> the meter feeds events at offsets > threshold (None: no event of the link)
Threshold = Callable[[CompiledMeter], int | None]


class ValueIssue(NamedTuple):
    """Kept event ``event`` (its position in the ``KeptEvents``' columns) that meter
    ``meter_id`` applies to but cannot count (the same message as ``CompiledMeter.match``'s
    ``ValueProblem``)."""

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
    name = _one_name(path)
    if name is not None:
        return [p.get(name, MISSING) if type(p) is dict else MISSING for p in props]
    extract = path.extract
    return [extract(p) for p in props]


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


class _Values(NamedTuple):
    """The values of one value path over a whole group: an Arrow array (``int64`` for a column of
    plain integers, else ``decimal128(38, 9)``; ``string`` for unique_count), null where the value
    is unusable, and the ``ValueProblem`` message of each such position."""

    array: pa.Array
    bad: dict[int, str]


def _one_name(path: JsonPath) -> str | None:
    steps = path.steps
    if len(steps) == 1 and isinstance(steps[0], str):
        return steps[0]
    return None


class _Props:
    """The properties of one group; the column at a one-name path is inferred by Arrow once."""

    __slots__ = ("_columns", "props")

    def __init__(self, props: list[dict[str, Any]]) -> None:
        self.props = props
        self._columns: dict[str, pa.Array | None] = {}

    def inferred(self, path: JsonPath) -> pa.Array | None:
        """The values at ``path`` as an Arrow array of the type Arrow infers (null where missing
        or null), None when the path is longer or Arrow infers nothing (mixed types)."""
        name = _one_name(path)
        if name is None:
            return None
        if name in self._columns:
            return self._columns[name]
        try:  # the loop in C: one dict.get per event, no Python frame
            raw = list(map(dict.get, self.props, repeat(name)))
        except TypeError:  # properties that are not an object (no value at any path)
            raw = [p.get(name) if isinstance(p, dict) else None for p in self.props]
        arr: pa.Array | None
        try:
            arr = pa.array(raw, from_pandas=False)
        except (ValueError, TypeError, OverflowError):  # Arrow's errors are among them
            arr = None
        self._columns[name] = arr
        return arr


def _null_positions(arr: pa.Array) -> list[int]:
    if not arr.null_count:
        return []
    return [int(n) for n in np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))]


def _numeric_one(v: Any) -> Any:
    if type(v) is int and -_INT_LIMIT < v < _INT_LIMIT:
        return Decimal(v)
    try:
        return to_decimal(v, VALUE_LIMIT)
    except ValueProblem as exc:
        return _Bad(str(exc))


def _uniq_one(v: Any) -> Any:
    if type(v) is str:
        return v
    s = canonical_scalar(v)
    return _Bad(f"unique_count needs a scalar value, got {v!r}") if s is None else s


def _bad_at(
    path: JsonPath, props: list[dict[str, Any]], positions: list[int], one: Any
) -> dict[int, str]:
    out: dict[int, str] = {}
    for n in positions:
        p = props[n]
        v = one(path.extract(p) if type(p) is dict else MISSING)
        assert type(v) is _Bad
        out[n] = v.message
    return out


def _numeric_values(path: JsonPath, cols: _Props) -> _Values:
    """``to_decimal`` of every event's value. A column of plain integers (Arrow infers ``int64``:
    no bool, float, string or out-of-range integer in it) stays ``int64`` (exact: every such
    integer is below ``VALUE_LIMIT``, its ``Decimal(38, 9)`` is the integer itself); any other
    column goes through ``to_decimal`` per value (the reference's own conversion) into
    ``decimal128(38, 9)``."""
    arr = cols.inferred(path)
    if arr is not None and arr.type == pa.int64():
        return _Values(arr, _bad_at(path, cols.props, _null_positions(arr), _numeric_one))
    return _per_value(path, cols.props, _numeric_one, DECIMAL)


def _uniq_values(path: JsonPath, cols: _Props) -> _Values:
    """``canonical_scalar`` of every event's value (strings as they are, integers in decimal)."""
    arr = cols.inferred(path)
    if arr is not None and arr.type in (pa.string(), pa.int64()):
        bad = _bad_at(path, cols.props, _null_positions(arr), _uniq_one)
        return _Values(arr.cast(pa.string()), bad)
    return _per_value(path, cols.props, _uniq_one, pa.string())


def _per_value(
    path: JsonPath, props: list[dict[str, Any]], one: Callable[[Any], Any], typ: pa.DataType
) -> _Values:
    """``one`` of every event's value into an array of ``typ`` (null where ``one`` said
    ``_Bad``, with its message): the path for columns Arrow cannot type natively."""
    vals = [one(v) for v in _raw_values(path, props)]
    bad = {n: v.message for n, v in enumerate(vals) if type(v) is _Bad}
    if bad:
        vals = [None if type(v) is _Bad else v for v in vals]
    return _Values(pa.array(vals, typ), bad)


def _filter_mask(f: PropertyFilter, cols: _Props) -> np.ndarray | None:
    """The events that pass filter ``f``, computed natively for the cases where that is exactly
    the rule of ``streams.matching`` (None otherwise: the caller applies the filter per event):
    ``exists`` on any inferred column; ``eq``/``ne``/``in``/``nin`` with string targets on a
    column of strings (a string equals only an equal string; a null value passes ``in`` only if
    the options hold null, ``eq`` only against null: those stay per event);
    ``gt``/``gte``/``lt``/``lte`` on a column of integers (compared with the bound's floor or
    ceiling, exact for integers)."""
    arr = cols.inferred(compile_path(f.property))
    if arr is None:
        return None
    op, target = f.op, f.value
    if op == FilterOp.EXISTS:
        want = target is None or bool(target)
        valid = arr.is_valid().to_numpy(zero_copy_only=False)
        return valid if want else ~valid
    typ = arr.type
    if typ == pa.null():
        arr, typ = arr.cast(pa.string()), pa.string()
    if typ == pa.string() and op in (FilterOp.EQ, FilterOp.NE, FilterOp.IN, FilterOp.NIN):
        if op in (FilterOp.EQ, FilterOp.NE):
            if target is None:
                return None
            if type(target) is str:
                hit = pc.equal(arr, pa.scalar(target, pa.string()))
            else:  # a string never equals a number, bool, object or array
                hit = pa.array(np.zeros(len(arr), dtype=bool))
        else:
            if any(o is None for o in target):
                return None
            options = pa.array([o for o in target if type(o) is str], pa.string())
            hit = pc.is_in(arr, value_set=options)
        mask = hit.fill_null(False).to_numpy(zero_copy_only=False)
        return mask if op in (FilterOp.EQ, FilterOp.IN) else ~mask
    if typ == pa.int64() and op in (FilterOp.GT, FilterOp.GTE, FilterOp.LT, FilterOp.LTE):
        bound = to_decimal(target)
        lo = int(bound.to_integral_value(rounding=ROUND_FLOOR))
        hi = int(bound.to_integral_value(rounding=ROUND_CEILING))
        if not (-(2**62) < lo and hi < 2**62):
            return None
        if op == FilterOp.GT:
            hit = pc.greater(arr, lo)
        elif op == FilterOp.GTE:
            hit = pc.greater_equal(arr, hi)
        elif op == FilterOp.LT:
            hit = pc.less(arr, hi)
        else:
            hit = pc.less_equal(arr, lo)
        return hit.fill_null(False).to_numpy(zero_copy_only=False)
    return None


def _select(cm: CompiledMeter, sel: range | list[int], cols: _Props) -> range | list[int]:
    """The positions of ``sel`` whose events pass every filter of the meter."""
    mask: np.ndarray | None = None
    rest = []
    for spec, fn in zip(cm.meter.filters, cm.filters, strict=True):
        m = _filter_mask(spec, cols)
        if m is None:
            rest.append(fn)
        else:
            mask = m if mask is None else mask & m
    if mask is not None:
        if isinstance(sel, range):
            sel = [int(n) for n in np.flatnonzero(mask)]
        else:
            at = np.array(sel, dtype=np.int64)
            sel = [int(n) for n in at[mask[at]]]
    if rest:
        props = cols.props
        sel = [n for n in sel if all(f(props[n]) for f in rest)]
    return sel


# the types whose Python values (``to_pylist``) are exactly the JSON values Arrow read
_EXACT_TYPES = (pa.string(), pa.int64(), pa.bool_(), pa.null())


def _native_group_columns(
    group_paths: tuple[tuple[str, JsonPath], ...], cols: _Props
) -> tuple[pa.Array, dict[str, dict[str, str]]] | None:
    """Group key of every event and the group values of every key, with ``group_value`` called
    once per distinct combination of values (None when a column is not one of strings, integers
    or bools: the caller computes per event)."""
    codes: np.ndarray | None = None
    decoders: list[tuple[str, list[Any], int]] = []
    span = 1
    for name, path in group_paths:
        arr = cols.inferred(path)
        if arr is None or arr.type not in _EXACT_TYPES:
            return None
        if arr.type == pa.null():
            values: list[Any] = [None]
            idx = np.zeros(len(arr), dtype=np.int64)
        else:
            enc = arr.dictionary_encode()
            values = [*enc.dictionary.to_pylist(), None]  # None: missing or null -> ""
            idx = enc.indices.fill_null(len(values) - 1).to_numpy().astype(np.int64)
        span *= len(values)
        if span >= 2**62:
            return None
        codes = idx if codes is None else codes * len(values) + idx
        decoders.append((name, values, len(values)))
    assert codes is not None
    uniq, inverse = np.unique(codes, return_inverse=True)
    gks: list[str] = []
    gv_of: dict[str, dict[str, str]] = {}
    for code in uniq.tolist():
        picked: list[tuple[str, Any]] = []
        for name, values, size in reversed(decoders):
            code, at = divmod(code, size)
            picked.append((name, values[at]))
        gv = {name: group_value(v) for name, v in reversed(picked)}
        gk = group_key_of(gv)
        gks.append(gk)
        gv_of[gk] = gv
    return pa.array(gks, pa.string()).take(pa.array(inverse.reshape(-1))), gv_of


_I64_MAX = 2**63 - 1
# a decimal128(38, 9) sum of fewer values than this, each below VALUE_LIMIT, stays inside
# Decimal(38, 9) (``MAX_ABS``): a count check, no pass over the values
_DEC_MAX_COUNT = int(MAX_ABS / VALUE_LIMIT)


def _sums_fit(v: pa.Array, limit: int) -> bool:
    """Whether no sum of any subset of ``v`` can reach ``limit`` (so a native sum is exact)."""
    mm = pc.min_max(v)
    lo, hi = mm["min"].as_py(), mm["max"].as_py()
    if lo is None:
        return True
    return bool(max(abs(lo), abs(hi)) * len(v) < limit)


class _WindowKeys:
    """The window key of every event of a group as one ``int64`` code (hashing one integer
    column is several times cheaper than customer strings + windows): ``pair`` numbers the
    distinct ``(customer, minute)`` pairs (``(link, customer, minute)`` when the events of several
    links are aggregated at once); a grouped meter's code is ``pair * G + group``."""

    __slots__ = ("customers", "cws", "links", "ncw", "nwin", "pair", "pairs", "windows")

    def __init__(
        self, customers: list[str], times: np.ndarray, links: np.ndarray | None = None
    ) -> None:
        enc = pa.array(customers, pa.string()).dictionary_encode()
        self.customers: pa.Array = enc.dictionary
        cust = enc.indices.to_numpy().astype(np.int64)
        self.windows, win = np.unique(times - times % MINUTE_MS, return_inverse=True)
        self.nwin = len(self.windows)
        # cust * nwin + win < len(times) ** 2; the pair numbers < len(times)
        key = cust * self.nwin + win.reshape(-1)
        self.links = links is not None
        self.cws: np.ndarray | None = None
        self.ncw = 0
        if links is not None:  # (customer, minute) numbered first: link * ncw + cw < len ** 2
            self.cws, cw = np.unique(key, return_inverse=True)
            self.ncw = len(self.cws)
            key = links * self.ncw + cw.reshape(-1)
        self.pairs, pair = np.unique(key, return_inverse=True)
        self.pair: np.ndarray = pair.reshape(-1).astype(np.int64)

    def grouped(self, group_keys: pa.Array) -> tuple[np.ndarray, pa.Array]:
        enc = group_keys.dictionary_encode()
        size = len(enc.dictionary)
        return self.pair * size + enc.indices.to_numpy().astype(np.int64), enc.dictionary

    def decode(
        self, codes: np.ndarray, groups: pa.Array | None
    ) -> tuple[pa.Array, pa.Array, pa.Array | None, np.ndarray | None]:
        """Customer, window start, group key (None: not grouped) and link (None: one link) of
        window codes."""
        gkey = None
        if groups is not None:
            codes, gi = np.divmod(codes, len(groups))
            gkey = groups.take(pa.array(gi))
        key = self.pairs[codes]
        link = None
        if self.cws is not None:
            link, cw = np.divmod(key, self.ncw)
            key = self.cws[cw]
        cust, win = np.divmod(key, self.nwin)
        customer = self.customers.take(pa.array(cust))
        return customer, pa.array(self.windows[win]).cast(TIME), gkey, link


def _distinct_values(codes: np.ndarray, vals: pa.Array) -> tuple[np.ndarray, np.ndarray, pa.Array]:
    """Windows of a unique_count meter: the distinct window codes, the events of each, and the
    sorted distinct values of each (one sort of integer codes: the values are numbered in their
    sorted order, each (window, value) pair becomes one integer)."""
    out, win, counts = np.unique(codes, return_inverse=True, return_counts=True)
    enc = vals.dictionary_encode()
    order = pc.array_sort_indices(enc.dictionary).to_numpy()
    size = len(order)
    rank = np.empty(size, dtype=np.int64)
    rank[order] = np.arange(size, dtype=np.int64)
    pairs = np.unique(win.reshape(-1).astype(np.int64) * size + rank[enc.indices.to_numpy()])
    of_window = pairs // size
    offsets = np.zeros(len(out) + 1, dtype=np.int32)
    np.cumsum(np.bincount(of_window, minlength=len(out)), out=offsets[1:])
    values = enc.dictionary.take(pa.array(order[pairs % size]))
    return out, counts, pa.ListArray.from_arrays(pa.array(offsets), values)


def _latest_rows(
    codes: np.ndarray, times: pa.Array, ids: pa.Array, out: np.ndarray, tmax: pa.Array
) -> pa.Array:
    """For each window ``out`` (its latest time ``tmax``), the row of its latest event: the one
    at the latest time, ties broken by the greater event id."""
    at = pc.index_in(pa.array(codes), value_set=pa.array(out)).to_numpy()
    top = np.flatnonzero(times.to_numpy() == tmax.to_numpy()[at])
    owner = at[top]
    if len(top) == len(out):  # one event at the latest time of each window
        rows = np.empty(len(out), dtype=np.int64)
        rows[owner] = top
        return pa.array(rows)
    # ties on time: among the rows at the latest time, the greatest id of each window
    t = pa.table({"w": pa.array(owner), "i": ids.take(pa.array(top)), "r": pa.array(top)})
    t = t.take(pc.sort_indices(t, [("w", "ascending"), ("i", "ascending")]))
    w = _col(t, "w").to_numpy()
    last = np.flatnonzero(np.append(w[1:] != w[:-1], True))
    rows = np.empty(len(out), dtype=np.int64)
    rows[w[last]] = _col(t, "r").to_numpy()[last]
    return pa.array(rows)


def _meter_windows(
    cm: CompiledMeter,
    tenant: str,
    codes: np.ndarray,
    wk: _WindowKeys,
    groups: pa.Array | None,
    vals: pa.Array | None,
    latest: tuple[pa.Array, pa.Array] | None,
    gv_of: dict[str, dict[str, str]],
) -> tuple[pa.Table, np.ndarray | None]:
    """The minute windows of one meter as a ``USAGE_SCHEMA`` table, and the link of each window
    (None: one link). ``codes``: the window codes of the selected events (``_WindowKeys``;
    ``groups`` the group keys of a grouped meter), ``vals`` their values, ``latest`` their times
    and ids (latest meters)."""
    agg = cm.aggregation
    latest_arr: pa.Array | None = None
    if agg == Aggregation.UNIQUE_COUNT:
        assert vals is not None
        out, counts, uniq = _distinct_values(codes, vals)
        n = len(out)
        events = pa.array(counts.astype(np.uint64))
        vcount = pa.array(np.zeros(n, dtype=np.uint64))
        vsum = _zeros(n)
        vmin = vmax = pa.nulls(n, DECIMAL)
    else:
        t = pa.table({"k": pa.array(codes)})
        aggs: list[tuple[Any, ...]] = [([], "count_all")]
        if vals is not None:
            v = vals
            if v.type == pa.int64() and not _sums_fit(v, _I64_MAX):
                v = v.cast(DECIMAL)
            if v.type != pa.int64() and len(v) >= _DEC_MAX_COUNT:  # no flush holds 10^10
                raise OverflowError(f"{len(v)} values could sum past Decimal(38, 9)")
            t = t.append_column("v", v)
            aggs.append(("v", "sum"))
            aggs += [("v", "min"), ("v", "max")]
            if latest is not None:
                t = t.append_column("t", latest[0])
                aggs.append(("t", "max"))
        # one thread: faster on batches of this size
        g = t.group_by(["k"], use_threads=False).aggregate(aggs)
        out = _col(g, "k").to_numpy()
        n = len(out)
        events = _col(g, "count_all").cast(pa.uint64())
        if vals is not None:
            vsum = _col(g, "v_sum").cast(DECIMAL)
            vcount = events
            vmin = _col(g, "v_min").cast(DECIMAL)
            vmax = _col(g, "v_max").cast(DECIMAL)
            if latest is not None:
                at = _latest_rows(codes, latest[0], latest[1], out, _col(g, "t_max"))
                latest_arr = pa.StructArray.from_arrays(
                    [latest[0].take(at), latest[1].take(at), _col(t, "v").take(at).cast(DECIMAL)],
                    fields=list(LATEST),
                )
        else:
            vcount = pa.array(np.zeros(n, dtype=np.uint64))
            vsum = _zeros(n)
            vmin = vmax = pa.nulls(n, DECIMAL)
        uniq = pa.ListArray.from_arrays(
            pa.array(np.zeros(n + 1, dtype=np.int32)), pa.array([], pa.string())
        )
    customer, window, gkey, link = wk.decode(out, groups)
    if latest_arr is None:
        latest_arr = pa.StructArray.from_arrays(
            [pa.array(np.zeros(n, dtype=np.int64)), pa.array([""] * n, pa.string()), _zeros(n)],
            fields=list(LATEST),
        )
    if gkey is not None:
        assert groups is not None
        gv_dict = pa.array([list(gv_of[k].items()) for k in groups.to_pylist()], GROUP_VALUES)
        gvals = gv_dict.take(pa.array(np.divmod(out, len(groups))[1]))
    else:
        gvals = pa.MapArray.from_arrays(
            pa.array(np.zeros(n + 1, dtype=np.int32)),
            pa.array([], pa.string()),
            pa.array([], pa.string()),
        )
        gkey = pa.array([""] * n, pa.string())
    arrays = [
        pa.array([tenant] * n, pa.string()),
        pa.array([cm.id] * n, pa.string()),
        customer,
        window,
        gkey,
        pa.array([ORIGIN_STREAM] * n, pa.string()),
        gvals,
        events,
        vcount,
        vsum,
        vmin,
        vmax,
        uniq,
        latest_arr,
        pa.array(np.zeros(n, dtype=np.int64)),
    ]
    return pa.Table.from_arrays(arrays, schema=USAGE_SCHEMA), link


def _col(t: pa.Table, name: str) -> pa.Array:
    return t.column(name).combine_chunks()


def _zeros(n: int) -> pa.Array:
    return pa.array(np.zeros(n, dtype=np.int64)).cast(DECIMAL)


def _groups(kept: KeptEvents) -> list[tuple[tuple[str, str], list[int] | None]]:
    """The kept events' ``(tenant, event type)`` groups: their positions in the columns, None
    for every position."""
    pos = kept.positions
    if not kept.tenants or pos == []:
        return []
    if len(set(kept.tenants)) == 1 and len(set(kept.types)) == 1:
        return [((kept.tenants[0], kept.types[0]), pos)]
    groups: dict[tuple[str, str], list[int]] = {}
    pairs: Iterable[tuple[int, tuple[str, str]]]
    if pos is None:
        pairs = enumerate(zip(kept.tenants, kept.types, strict=True))
    else:
        pairs = zip(
            pos,
            zip(map(kept.tenants.__getitem__, pos), map(kept.types.__getitem__, pos), strict=True),
            strict=True,
        )
    for j, tenant_type in pairs:
        g = groups.get(tenant_type)
        if g is None:
            groups[tenant_type] = [j]
        else:
            g.append(j)
    return list(groups.items())


def aggregate(
    kept: KeptEvents,
    meter_index: MeterIndex,
    threshold: Threshold,
) -> ColumnarResult:
    """Match every kept event against its tenant's meters and aggregate minute windows."""
    return aggregate_links([(kept, threshold)], meter_index)[0]


def _concat(kepts: list[KeptEvents]) -> KeptEvents:
    out = KeptEvents()
    positions: list[int] = []
    some_dropped = any(k.positions is not None for k in kepts)
    for k in kepts:
        if some_dropped:
            at = len(out.ids)
            pos = range(len(k)) if k.positions is None else k.positions
            positions += [at + j for j in pos]
        out.tenants += k.tenants
        out.ids += k.ids
        out.types += k.types
        out.customers += k.customers
        out.times_ms += k.times_ms
        out.properties += k.properties
        out.offsets += k.offsets
    if some_dropped:
        out.positions = positions
    return out


_NEVER = 2**62  # a threshold no offset passes (a meter that feeds no event of a link)


def aggregate_links(
    links: list[tuple[KeptEvents, Threshold]], meter_index: MeterIndex
) -> list[ColumnarResult]:
    """``aggregate`` of several links (each its kept events and threshold) at once: the same
    result per link as one call per link (the link is part of every window key, so a window
    never mixes links), with the fixed cost of every Arrow/numpy step paid once per
    ``(tenant, event type, meter)`` of all the links instead of once per link."""
    if len(links) == 1:
        kept = links[0][0]
        link_of: np.ndarray | None = None
    else:
        kept = _concat([k for k, _t in links])
        link_of = np.repeat(np.arange(len(links), dtype=np.int64), [len(k) for k, _t in links])
    thresholds = [t for _k, t in links]
    parts: list[pa.Table] = []
    part_links: list[np.ndarray] = []
    issues: list[ValueIssue] = []
    for (tenant, etype), gidx in _groups(kept):
        cands = meter_index.candidates(tenant, etype)
        if not cands:
            continue
        # the group's columns (positions n = 0..len-1 below are positions in the group)
        if gidx is None:
            props, offsets = kept.properties, kept.offsets
            customers, times, ids = kept.customers, kept.times_ms, kept.ids
            glinks = link_of
        else:
            props = [kept.properties[j] for j in gidx]
            offsets = [kept.offsets[j] for j in gidx]
            customers = [kept.customers[j] for j in gidx]
            times = [kept.times_ms[j] for j in gidx]
            ids = [kept.ids[j] for j in gidx]
            glinks = None if link_of is None else link_of[np.array(gidx, dtype=np.int64)]
        size = len(props)
        cols = _Props(props)
        everyone = range(size)
        offsets_np: np.ndarray | None = None
        bounds: tuple[int, int] | None = None  # (min, max) of the group's offsets
        wk: _WindowKeys | None = None
        times_arr: pa.Array | None = None
        ids_arr: pa.Array | None = None
        value_cache: dict[tuple[bool, str], _Values] = {}
        group_cache: dict[Any, tuple[pa.Array, dict[str, dict[str, str]]]] = {}
        for cm in cands:
            lows = [th(cm) for th in thresholds]
            if all(low is None for low in lows):
                continue
            sel: range | list[int]
            if all(low is not None and low < 0 for low in lows):
                sel = everyone
            elif glinks is None:
                low = lows[0]
                assert low is not None
                # A meter activated by a marker of this topic: the events after the marker. Past
                # the link that holds the marker that is every event of the group, found from
                # its offsets' bounds alone (then no take of the group's columns below).
                if bounds is None:
                    bounds = (min(offsets), max(offsets))
                if bounds[0] > low:
                    sel = everyone
                elif bounds[1] <= low:
                    continue
                else:
                    sel = [n for n in everyone if offsets[n] > low]
            else:
                if offsets_np is None:
                    offsets_np = np.array(offsets, dtype=np.int64)
                bound = np.array([_NEVER if low is None else low for low in lows], dtype=np.int64)
                after = offsets_np > bound[glinks]
                sel = everyone if after.all() else np.flatnonzero(after).tolist()
            if cm.filters:
                sel = _select(cm, sel, cols)
            if not sel:
                continue
            agg = cm.aggregation
            vals: _Values | None = None
            if agg in _NUMERIC or agg == Aggregation.UNIQUE_COUNT:
                assert cm.value_path is not None
                uniq = agg == Aggregation.UNIQUE_COUNT
                ck = (uniq, cm.value_path.text)
                vals = value_cache.get(ck)
                if vals is None:
                    vals = value_cache[ck] = (_uniq_values if uniq else _numeric_values)(
                        cm.value_path, cols
                    )
                if vals.bad:
                    bad = vals.bad
                    hits = [n for n in sel if n in bad]
                    if hits:
                        issues.extend(
                            ValueIssue(n if gidx is None else gidx[n], cm.id, bad[n]) for n in hits
                        )
                        sel = [n for n in sel if n not in bad]
                        if not sel:
                            continue
            if wk is None:
                t_np = np.array(times, dtype=np.int64)
                times_arr = pa.array(t_np)
                wk = _WindowKeys(customers, t_np, glinks)
            codes = wk.pair
            groups: pa.Array | None = None
            gv_of: dict[str, dict[str, str]] = {}
            if cm.group_paths:
                cached = group_cache.get(cm.group_paths)
                if cached is None:
                    cached = _native_group_columns(cm.group_paths, cols)
                    if cached is None:
                        gks, gvs = _group_columns(cm.group_paths, props)
                        cached = (pa.array(gks, pa.string()), dict(zip(gks, gvs, strict=True)))
                    group_cache[cm.group_paths] = cached
                gk_arr, gv_of = cached
                codes, groups = wk.grouped(gk_arr)
            whole = sel is everyone
            take = None if whole else pa.array(sel, pa.int64())
            if take is not None:
                codes = codes[np.array(sel, dtype=np.int64)]
            varr: pa.Array | None = None
            if vals is not None:
                varr = vals.array if take is None else vals.array.take(take)
            latest: tuple[pa.Array, pa.Array] | None = None
            if agg == Aggregation.LATEST:
                assert times_arr is not None
                if ids_arr is None:
                    ids_arr = pa.array(ids, pa.string())
                latest = (
                    (times_arr, ids_arr)
                    if take is None
                    else (times_arr.take(take), ids_arr.take(take))
                )
            table, of_link = _meter_windows(cm, tenant, codes, wk, groups, varr, latest, gv_of)
            parts.append(table)
            if of_link is not None:
                part_links.append(of_link)
    usage = pa.concat_tables(parts) if parts else USAGE_SCHEMA.empty_table()
    if link_of is None:
        return [ColumnarResult(usage, issues, usage.num_rows)]
    return _split(usage, part_links, issues, [len(k) for k, _t in links])


def _split(
    usage: pa.Table, part_links: list[np.ndarray], issues: list[ValueIssue], sizes: list[int]
) -> list[ColumnarResult]:
    """The windows and issues of several links apart (issues renumbered within their link)."""
    nlinks = len(sizes)
    starts = np.concatenate([[0], np.cumsum(sizes)]).tolist()
    by_link: list[list[ValueIssue]] = [[] for _ in range(nlinks)]
    for issue in issues:
        k = bisect_right(starts, issue.event) - 1
        by_link[k].append(issue._replace(event=issue.event - starts[k]))
    if usage.num_rows:
        of_link = np.concatenate(part_links)
        usage = usage.take(pa.array(np.argsort(of_link, kind="stable")))
        counts = np.bincount(of_link, minlength=nlinks).tolist()
    else:
        counts = [0] * nlinks
    out: list[ColumnarResult] = []
    at = 0
    for k in range(nlinks):
        part = usage.slice(at, counts[k])
        at += counts[k]
        out.append(ColumnarResult(part, by_link[k], part.num_rows))
    return out
