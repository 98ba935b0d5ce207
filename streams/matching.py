"""Meter matching (pure): which meters does an event feed, with which value and group.

Compile each meter once (``CompiledMeter``); ``MeterIndex`` finds the candidate meters of an event
by ``(tenant_id, event_type)``.

Rules:
- a meter applies to an event of its ``event_type`` at a position of the log where the meter is
  active (``streams.activation``: after the meter's activation marker; the caller checks that);
  history before the marker is the job of ``tally meters backfill``;
- every filter must pass. ``eq``/``ne``/``in``/``nin`` compare numbers numerically (``1 == 1.0``)
  and everything else by JSON equality; a missing property fails ``eq``/``in``/``gt``... and passes
  ``ne``/``nin``. ``gt``/``gte``/``lt``/``lte`` need a number or a numeric string. ``exists`` (true by
  default) holds when the path resolves to a non-null value;
- the value (``value_property``) must be a finite number or numeric string (bools are not numbers)
  below 10^19 in magnitude (``VALUE_LIMIT``); it is rounded half-even to 9 decimals (the store's
  Decimal(38, 9)). The bound leaves every minute window 10 digits of headroom: a window's sum
  cannot leave Decimal(38, 9) below 10^10 events, so preparing a flush never fails on a sum
  (usage queries sum windows in Decimal(76, 9)). ``unique_count`` instead takes
  the canonical string of any scalar (see ``canonical_scalar``). An event whose value is missing or
  unusable does not feed that meter (``ValueProblem`` is reported to the caller, who counts it);
- group values: scalars as canonical strings, missing or null as ``""``, objects/arrays as
  canonical JSON. ``group_key`` is the canonical JSON of the group values ('' without group_by).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Context, Decimal, InvalidOperation
from typing import Any

import orjson

from schemas.envelope import EnvelopeEvent
from schemas.jsonpath import MISSING, JsonPath, compile_path
from schemas.meters import Aggregation, FilterOp, Meter, PropertyFilter

log = logging.getLogger(__name__)

QUANTUM = Decimal("0.000000001")
_CTX = Context(prec=80)
MAX_ABS = Decimal(10) ** 29  # Decimal(38, 9) holds 29 integer digits (filter numbers)
VALUE_LIMIT = Decimal(10) ** 19  # a meter's value: window sums keep 10 digits of headroom

_NUMERIC_AGGS = frozenset(
    {Aggregation.SUM, Aggregation.MIN, Aggregation.MAX, Aggregation.AVG, Aggregation.LATEST}
)


class ValueProblem(ValueError):
    """The event matched the meter but its value is missing or not usable."""


def to_decimal(value: Any, limit: Decimal = MAX_ABS) -> Decimal:
    """A JSON number or numeric string as a Decimal with 9 decimals, below ``limit`` in magnitude
    (``VALUE_LIMIT`` for a meter's value); ValueProblem otherwise."""
    if isinstance(value, bool) or value is None or value is MISSING:
        raise ValueProblem(f"not a number: {value!r}")
    if isinstance(value, int):
        d = Decimal(value)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueProblem(f"not a finite number: {value!r}")
        d = Decimal(repr(value))
    elif isinstance(value, str):
        try:
            d = Decimal(value.strip())
        except InvalidOperation as exc:
            raise ValueProblem(f"not a number: {value!r}") from exc
        if not d.is_finite():
            raise ValueProblem(f"not a finite number: {value!r}")
    elif isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueProblem(f"not a finite number: {value!r}")
        d = value
    else:
        raise ValueProblem(f"not a number: {type(value).__name__}")
    # copy_abs, not abs(): abs() rounds to the default 28 digits (29 nines would become 1E+29);
    # checked before quantize (which cannot take a number past its precision) and after it (the
    # quantum can round up to the limit)
    if (
        d.copy_abs() >= limit
        or (q := d.quantize(QUANTUM, rounding=ROUND_HALF_EVEN, context=_CTX)).copy_abs() >= limit
    ):
        raise ValueProblem(
            f"number out of range: {value!r} (must be below 1e{limit.adjusted()} in magnitude)"
        )
    return q


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float | Decimal) and not isinstance(value, bool)


def canonical_scalar(value: Any) -> str | None:
    """Canonical text of a JSON scalar (None for missing/null/objects/arrays).

    Strings are themselves; ``true``/``false``; integral numbers without a fraction (``2.0`` ->
    ``"2"``); other numbers in normalized decimal notation.
    """
    if value is MISSING or value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float | Decimal):
        d = Decimal(repr(value)) if isinstance(value, float) else value
        if not d.is_finite():
            return None
        if d == d.to_integral_value():
            return str(int(d))
        return format(d.normalize(), "f")
    return None


def group_value(value: Any) -> str:
    s = canonical_scalar(value)
    if s is not None:
        return s
    if value is MISSING or value is None:
        return ""
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


def group_key_of(values: dict[str, str]) -> str:
    if not values:
        return ""
    return orjson.dumps(values, option=orjson.OPT_SORT_KEYS).decode()


def _equal(a: Any, b: Any) -> bool:
    if _is_number(a) and _is_number(b):
        try:
            return to_decimal(a) == to_decimal(b)
        except ValueProblem:
            return False
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return bool(a == b)


def _numeric_or_none(value: Any) -> Decimal | None:
    try:
        return to_decimal(value)
    except ValueProblem:
        return None


def _compile_filter(f: PropertyFilter) -> Callable[[dict[str, Any]], bool]:
    path = compile_path(f.property)
    op = f.op
    target = f.value
    if op == FilterOp.EQ:
        return lambda props: (v := path.extract(props)) is not MISSING and _equal(v, target)
    if op == FilterOp.NE:
        return lambda props: (v := path.extract(props)) is MISSING or not _equal(v, target)
    if op in (FilterOp.IN, FilterOp.NIN):
        options = list(target)
        hashable = {o for o in options if isinstance(o, str)}
        others = [o for o in options if not isinstance(o, str)]

        def member(props: dict[str, Any]) -> bool:
            v = path.extract(props)
            if v is MISSING:
                return False
            if isinstance(v, str):
                return v in hashable
            return any(_equal(v, o) for o in others)

        if op == FilterOp.IN:
            return member
        return lambda props: not member(props)
    if op == FilterOp.EXISTS:
        want = target is None or bool(target)
        return lambda props: (path.extract(props) not in (MISSING, None)) == want
    bound = to_decimal(target)
    cmp: Callable[[Decimal, Decimal], bool] = {
        FilterOp.GT: Decimal.__gt__,
        FilterOp.GTE: Decimal.__ge__,
        FilterOp.LT: Decimal.__lt__,
        FilterOp.LTE: Decimal.__le__,
    }[op]

    def compare(props: dict[str, Any]) -> bool:
        d = _numeric_or_none(path.extract(props))
        return d is not None and cmp(d, bound)

    return compare


@dataclass(frozen=True, slots=True)
class Contribution:
    """What one event adds to one meter."""

    meter: CompiledMeter
    group_key: str
    group_values: dict[str, str]
    value: Decimal | None  # numeric meters
    uniq: str | None  # unique_count


class CompiledMeter:
    __slots__ = (
        "activation_topic",
        "aggregation",
        "event_type",
        "filters",
        "group_paths",
        "id",
        "meter",
        "tenant_id",
        "value_path",
    )

    def __init__(self, meter: Meter) -> None:
        self.meter = meter
        self.id = meter.id
        self.tenant_id = meter.tenant_id
        self.event_type = meter.event_type
        self.aggregation = meter.aggregation
        self.activation_topic = meter.activation_topic
        self.filters = tuple(_compile_filter(f) for f in meter.filters)
        self.value_path: JsonPath | None = (
            compile_path(meter.value_property) if meter.value_property else None
        )
        self.group_paths = tuple(
            (name, compile_path(path)) for name, path in sorted(meter.group_by.items())
        )

    def applies(self, event_type: str, properties: dict[str, Any]) -> bool:
        if event_type != self.event_type:
            return False
        return all(f(properties) for f in self.filters)  # same rule as match()

    def match(self, event: EnvelopeEvent) -> Contribution | None:
        """The event's contribution, None if the meter does not apply.

        The caller picks candidates of the event's tenant (``MeterIndex``) at a position where the
        meter is active (``streams.activation``). Raises ValueProblem when the meter applies but
        the value is unusable.
        """
        properties = event.properties
        if event.type != self.event_type:
            return None
        for f in self.filters:
            if not f(properties):
                return None
        value: Decimal | None = None
        uniq: str | None = None
        agg = self.aggregation
        if agg in _NUMERIC_AGGS:
            assert self.value_path is not None
            value = to_decimal(self.value_path.extract(properties), VALUE_LIMIT)
        elif agg == Aggregation.UNIQUE_COUNT:
            assert self.value_path is not None
            raw = self.value_path.extract(properties)
            uniq = canonical_scalar(raw)
            if uniq is None:
                raise ValueProblem(f"unique_count needs a scalar value, got {raw!r}")
        if self.group_paths:
            gv = {name: group_value(p.extract(properties)) for name, p in self.group_paths}
            gk = group_key_of(gv)
        else:
            gv = {}
            gk = ""
        return Contribution(self, gk, gv, value, uniq)


class MeterIndex:
    """Compiled meters by ``(tenant_id, event_type)``. Reuses compiled meters by id."""

    def __init__(self, meters: Iterable[Meter], previous: MeterIndex | None = None) -> None:
        old = previous.by_id if previous is not None else {}
        self.by_id: dict[str, CompiledMeter] = {}
        self._index: dict[tuple[str, str], list[CompiledMeter]] = {}
        for m in meters:
            cm = old.get(m.id)
            if cm is None or cm.meter != m:
                try:
                    cm = CompiledMeter(m)
                except ValueError as exc:  # stored by an older version that let it through
                    log.error("meter %s of tenant %s cannot be applied: %s", m.id, m.tenant_id, exc)
                    continue
            self.by_id[m.id] = cm
            self._index.setdefault((m.tenant_id, m.event_type), []).append(cm)

    def candidates(self, tenant_id: str, event_type: str) -> list[CompiledMeter]:
        return self._index.get((tenant_id, event_type), [])

    def __len__(self) -> int:
        return len(self.by_id)
