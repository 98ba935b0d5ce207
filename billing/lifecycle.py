"""The invoice lifecycle and identities (pure).

::

    draft --finalize--> finalized --void--> void
    draft --void------> void            (a draft never had a number: no gap)
    draft --refresh---> draft           (re-rated from live usage)

Everything else is illegal: ``Conflict`` (HTTP 409) with the reason. Ids are deterministic per
(tenant, subscription, period, revision), so two runs closing the same period write the same
invoice; numbers are given on finalization from a gapless per-tenant sequence.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any

from rating.periods import Period, period_containing
from schemas.billing import InvoiceStatus
from schemas.catalog import Subscription
from schemas.timeutil import epoch_ms
from tally.errors import Conflict

S = InvoiceStatus

ACTIONS = ("finalize", "void", "refresh", "credit")

# (status, action) -> new status, or the reason the action is illegal.
TRANSITIONS: dict[tuple[InvoiceStatus, str], InvoiceStatus | str] = {
    (S.DRAFT, "finalize"): S.FINALIZED,
    (S.DRAFT, "void"): S.VOID,
    (S.DRAFT, "refresh"): S.DRAFT,
    (S.DRAFT, "credit"): "a draft cannot be credited; finalize it first (or refresh it)",
    (S.FINALIZED, "finalize"): "the invoice is already finalized",
    (S.FINALIZED, "void"): S.VOID,
    (S.FINALIZED, "refresh"): "a finalized invoice is immutable; late usage goes on the next "
    "invoice as an adjustment",
    (S.FINALIZED, "credit"): S.FINALIZED,
    (S.VOID, "finalize"): "the invoice is void, which is final",
    (S.VOID, "void"): "the invoice is already void",
    (S.VOID, "refresh"): "the invoice is void, which is final",
    (S.VOID, "credit"): "the invoice is void; a void invoice cannot be credited",
}


def check(invoice_id: str, status: InvoiceStatus, action: str) -> InvoiceStatus:
    """The status ``action`` leads to; ``Conflict`` naming the reason if it is illegal."""
    target = TRANSITIONS[(status, action)]
    if not isinstance(target, InvoiceStatus):
        raise Conflict(
            f"cannot {action} invoice {invoice_id}: {target}",
            details=[{"field": "status", "message": f"{status.value}: {target}"}],
        )
    return target


def invoice_id(tenant_id: str, subscription_id: str, period: Period, revision: int = 0) -> str:
    """Deterministic per (tenant, subscription, period, revision)."""
    raw = f"{tenant_id}\0{subscription_id}\0{epoch_ms(period.start)}\0{epoch_ms(period.end)}\0{revision}"
    return "inv_" + hashlib.sha256(raw.encode()).hexdigest()[:24]


def credit_note_id(tenant_id: str, invoice_id: str, key: str) -> str:
    raw = f"{tenant_id}\0{invoice_id}\0{key}"
    return "cn_" + hashlib.sha256(raw.encode()).hexdigest()[:24]


def format_number(prefix: str, seq: int) -> str:
    """``INV-000042``: the prefix and the per-tenant sequence number, zero-padded to 6."""
    return f"{prefix}-{seq:06d}"


@lru_cache(maxsize=65_536)
def _period(anchor: Any, interval: Any, tz: str, alignment: Any, at: datetime) -> Period:
    """``period_containing`` (pure) memoized: the subscriptions of a run share a few calendars,
    so an invoice run computes each period once, not once per subscription."""
    return period_containing(anchor, interval, at, tz, alignment)


def closed_periods(sub: Subscription, as_of: datetime, grace: timedelta) -> Iterator[Period]:
    """The billing periods of ``sub`` that ended (plus ``grace``) by ``as_of`` and during which
    the subscription existed (started before the period end, not canceled before its start)."""
    if sub.canceled_at is not None and sub.canceled_at <= sub.start_at:
        return  # canceled before it started: never billed
    cal = (sub.anchor, sub.interval, sub.timezone, sub.alignment)
    period = _period(*cal, sub.start_at)
    while period.end + grace <= as_of:
        if sub.canceled_at is not None and sub.canceled_at <= period.start:
            return
        yield period
        period = _period(*cal, period.end)
