"""Late usage (pure): the difference between a period re-rated on today's usage and what was
already billed for it, as ``adjustment`` lines that name the period.

Lines are matched by ``line_key`` (kind, charge, group, segment), so a late event changes
exactly the line of its charge and segment; the adjustment is ``new - billed`` per key, where
``billed`` is the original invoice's line plus every adjustment already issued for that key
(rounded amounts throughout, so the adjustments add up to the re-rated lines exactly).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import orjson

from rating.lines import make_line
from schemas.pricing import BreakdownPart, LineItem, LineKind

RATED_KINDS = (LineKind.USAGE, LineKind.MINIMUM_ADJUSTMENT)


def line_key(
    kind: str,
    charge_key: str | None,
    group: Mapping[str, str] | None,
    period_start: object,
    period_end: object,
) -> str:
    g = orjson.dumps(dict(group or {}), option=orjson.OPT_SORT_KEYS).decode()
    start = period_start.isoformat() if hasattr(period_start, "isoformat") else str(period_start)
    end = period_end.isoformat() if hasattr(period_end, "isoformat") else str(period_end)
    return f"{kind}|{charge_key or ''}|{g}|{start}|{end}"


def key_of(line: LineItem) -> str:
    return line_key(
        line.kind.value, line.charge_key, line.group, line.period_start, line.period_end
    )


@dataclass(frozen=True)
class Billed:
    """What was billed so far for one line key: quantity and rounded amount, and a template
    line (description, charge, group, segment) for the adjustment."""

    quantity: Decimal
    amount: Decimal
    template: Any  # a LineItem or a stored invoice line (kind, description, charge, group...)


def late_adjustments(
    rerated: Sequence[LineItem],
    billed: Mapping[str, Billed],
    currency: str,
    period_label: str,
) -> list[tuple[str, LineItem]]:
    """``(key, adjustment line)`` for every key whose re-rated amount or quantity differs from
    what was billed. A key that vanished from the re-rating counts as 0."""
    new: dict[str, LineItem] = {}
    for rl in rerated:
        if rl.kind in RATED_KINDS:
            new[key_of(rl)] = rl
    out: list[tuple[str, LineItem]] = []
    for key in sorted(set(new) | set(billed)):
        line: LineItem | None = new.get(key)
        old = billed.get(key)
        amount = (line.amount if line else Decimal(0)) - (old.amount if old else Decimal(0))
        quantity = (line.quantity if line else Decimal(0)) - (old.quantity if old else Decimal(0))
        if line is not None and line.kind is LineKind.MINIMUM_ADJUSTMENT:
            quantity = Decimal(0)
        if amount == 0 and quantity == 0:
            continue
        template: Any = line if line is not None else old.template if old is not None else None
        what = (
            "minimum commitment true-up"
            if template.kind == LineKind.MINIMUM_ADJUSTMENT
            else "usage"
        )
        out.append(
            (
                key,
                make_line(
                    LineKind.ADJUSTMENT,
                    amount,
                    currency,
                    quantity=quantity,
                    breakdown=[
                        BreakdownPart(
                            label=f"re-rated {line.amount if line else 0} - billed "
                            f"{old.amount if old else 0}",
                            amount=amount,
                        )
                    ],
                    description=f"Late {what}: {template.description} for {period_label}",
                    charge_key=template.charge_key,
                    meter_slug=template.meter_slug,
                    group=template.group,
                    period_start=template.period_start,
                    period_end=template.period_end,
                ),
            )
        )
    return out
