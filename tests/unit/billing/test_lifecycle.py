"""The invoice lifecycle, ids, numbering and period close (pure)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from billing import lifecycle
from rating.periods import Period
from schemas.billing import InvoiceStatus
from schemas.catalog import Subscription, SubscriptionStatus, Transition, TransitionKind
from tally.errors import Conflict

S = InvoiceStatus


@pytest.mark.parametrize(("status", "action"), sorted(lifecycle.TRANSITIONS, key=str))
def test_every_transition_is_legal_or_409_with_a_reason(status: S, action: str) -> None:
    target = lifecycle.TRANSITIONS[(status, action)]
    if isinstance(target, S):
        assert lifecycle.check("inv_x", status, action) is target
    else:
        with pytest.raises(Conflict) as exc:
            lifecycle.check("inv_x", status, action)
        assert target in exc.value.message
        assert exc.value.details == [{"field": "status", "message": f"{status.value}: {target}"}]


def test_lifecycle_shape() -> None:
    assert lifecycle.check("i", S.DRAFT, "finalize") is S.FINALIZED
    assert lifecycle.check("i", S.FINALIZED, "void") is S.VOID
    for action in ("finalize", "void", "refresh", "credit"):
        with pytest.raises(Conflict):
            lifecycle.check("i", S.VOID, action)  # void is final
    with pytest.raises(Conflict, match="immutable"):
        lifecycle.check("i", S.FINALIZED, "refresh")


def test_ids_are_deterministic_and_distinct() -> None:
    p = Period(datetime(2025, 1, 1, tzinfo=UTC), datetime(2025, 2, 1, tzinfo=UTC))
    q = Period(datetime(2025, 2, 1, tzinfo=UTC), datetime(2025, 3, 1, tzinfo=UTC))
    a = lifecycle.invoice_id("t1", "sub_1", p)
    assert a == lifecycle.invoice_id("t1", "sub_1", p) and a.startswith("inv_")
    others = {
        lifecycle.invoice_id("t2", "sub_1", p),
        lifecycle.invoice_id("t1", "sub_2", p),
        lifecycle.invoice_id("t1", "sub_1", q),
        lifecycle.invoice_id("t1", "sub_1", p, 1),
    }
    assert a not in others and len(others) == 4
    assert lifecycle.format_number("INV", 42) == "INV-000042"
    assert lifecycle.format_number("CN", 1234567) == "CN-1234567"


def _sub(start: datetime, canceled: datetime | None = None) -> Subscription:
    hist = [
        Transition(
            at=start,
            kind=TransitionKind.CREATE,
            status=SubscriptionStatus.ACTIVE,
            plan_code="p",
            plan_version=1,
        )
    ]
    if canceled:
        hist.append(
            Transition(
                at=canceled,
                kind=TransitionKind.CANCEL,
                status=SubscriptionStatus.CANCELED,
                plan_code="p",
                plan_version=1,
            )
        )
    return Subscription(
        id="sub_1",
        customer_id="c",
        status=SubscriptionStatus.CANCELED if canceled else SubscriptionStatus.ACTIVE,
        plan_code="p",
        plan_version=1,
        currency="USD",
        interval="month",
        timezone="UTC",
        alignment="calendar",
        anchor=start,
        start_at=start,
        canceled_at=canceled,
        history=hist,
        created_at=start,
        updated_at=start,
    )


def test_closed_periods_respect_grace_start_and_cancel() -> None:
    sub = _sub(datetime(2025, 1, 15, tzinfo=UTC))
    h = timedelta(hours=1)
    got = list(lifecycle.closed_periods(sub, datetime(2025, 3, 1, 1, tzinfo=UTC), h))
    assert [p.start.month for p in got] == [1, 2]
    # One millisecond before the grace ends, February is still open.
    got = list(
        lifecycle.closed_periods(
            sub, datetime(2025, 3, 1, 1, tzinfo=UTC) - timedelta(milliseconds=1), h
        )
    )
    assert [p.start.month for p in got] == [1]
    canceled = _sub(datetime(2025, 1, 15, tzinfo=UTC), datetime(2025, 2, 10, tzinfo=UTC))
    got = list(lifecycle.closed_periods(canceled, datetime(2025, 6, 1, tzinfo=UTC), h))
    assert [p.start.month for p in got] == [1, 2]
