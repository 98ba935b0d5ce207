"""The subscription state machine (pure: no I/O, the caller passes ``now`` and the plans).

States and explicit transitions::

    trialing --activate--> active --pause--> paused --resume--> active
    trialing --(trial_end reached)--> active
    trialing | active | paused --cancel(now)--> canceled          (final)
    trialing | active | paused --cancel(period_end)--> (same state, cancel_at = period end)

Every other (state, action) pair is illegal and raises ``tally.errors.Conflict`` (HTTP 409) whose
message gives the reason. Plan changes: ``immediate`` appends a ``change_plan`` transition at
``now`` (billing prorates the fixed fees, see rating.invoice); ``period_end`` schedules a
``PendingChange``. Scheduled things (trial end, pending change, cancel_at) are applied by
``advance(sub, now)`` once due, at their own time, so history is exact even if nobody looked at
the subscription when they happened.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from rating.engine import rate
from rating.periods import Period, period_containing
from schemas.catalog import (
    Action,
    ActionTiming,
    ChangeTiming,
    Customer,
    PendingChange,
    PlanVersion,
    Subscription,
    SubscriptionIn,
    SubscriptionStatus,
    Transition,
    TransitionKind,
)
from schemas.pricing import Alignment
from schemas.timeutil import to_ms
from tally.errors import Conflict, ValidationError, detail

S = SubscriptionStatus

# (state, action) -> new state (legal) or the reason it is illegal.
TRANSITIONS: dict[tuple[SubscriptionStatus, Action], SubscriptionStatus | str] = {
    (S.TRIALING, Action.ACTIVATE): S.ACTIVE,
    (S.TRIALING, Action.PAUSE): "a trialing subscription cannot be paused; activate it first",
    (S.TRIALING, Action.RESUME): "only a paused subscription can be resumed (it is trialing)",
    (S.TRIALING, Action.CANCEL): S.CANCELED,
    (S.ACTIVE, Action.ACTIVATE): "the subscription is already active",
    (S.ACTIVE, Action.PAUSE): S.PAUSED,
    (S.ACTIVE, Action.RESUME): "only a paused subscription can be resumed (it is active)",
    (S.ACTIVE, Action.CANCEL): S.CANCELED,
    (S.PAUSED, Action.ACTIVATE): "a paused subscription is restarted with 'resume', not 'activate'",
    (S.PAUSED, Action.PAUSE): "the subscription is already paused",
    (S.PAUSED, Action.RESUME): S.ACTIVE,
    (S.PAUSED, Action.CANCEL): S.CANCELED,
    (S.CANCELED, Action.ACTIVATE): "the subscription is canceled, which is final",
    (S.CANCELED, Action.PAUSE): "the subscription is canceled, which is final",
    (S.CANCELED, Action.RESUME): "the subscription is canceled, which is final",
    (S.CANCELED, Action.CANCEL): "the subscription is already canceled",
}

_KIND = {
    Action.ACTIVATE: TransitionKind.ACTIVATE,
    Action.PAUSE: TransitionKind.PAUSE,
    Action.RESUME: TransitionKind.RESUME,
    Action.CANCEL: TransitionKind.CANCEL,
}

_MS = timedelta(milliseconds=1)


def _conflict(sub: Subscription, action: str, reason: str) -> Conflict:
    return Conflict(
        f"cannot {action} subscription {sub.id}: {reason}",
        details=[detail("action", f"cannot {action} a {sub.status} subscription: {reason}")],
    )


def _aware(value: datetime, field: str) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValidationError(f"{field} must be timezone-aware", field=field)
    return to_ms(value)


# ---------------------------------------------------------------------------------------------
# Creation and periods
# ---------------------------------------------------------------------------------------------


def new_subscription(
    sub_id: str,
    req: SubscriptionIn,
    customer: Customer,
    plan: PlanVersion,
    now: datetime,
) -> Subscription:
    """A new subscription of ``customer`` to ``plan`` (already resolved to a version).

    The currency must match; the customer's time zone is pinned; the anniversary anchor is the
    customer's ``billing_anchor`` or else the start.
    """
    now = _aware(now, "now")
    if plan.currency != customer.currency:
        raise ValidationError(
            f"plan {plan.code} v{plan.version} is priced in {plan.currency} but customer "
            f"{customer.external_id} is billed in {customer.currency}",
            field="plan_code",
        )
    start = to_ms(req.start_at) if req.start_at is not None else now
    trial_end = to_ms(req.trial_end) if req.trial_end is not None else None
    if trial_end is not None and trial_end <= start:
        raise ValidationError("trial_end must be after start_at", field="trial_end")
    anchor = start
    if req.alignment is Alignment.ANNIVERSARY and customer.billing_anchor is not None:
        anchor = to_ms(customer.billing_anchor)
    status = S.TRIALING if trial_end is not None else S.ACTIVE
    sub = Subscription(
        id=sub_id,
        customer_id=customer.external_id,
        status=status,
        plan_code=plan.code,
        plan_version=plan.version,
        currency=plan.currency,
        interval=plan.interval,
        timezone=customer.timezone,
        alignment=req.alignment,
        anchor=anchor,
        start_at=start,
        trial_end=trial_end,
        history=[
            Transition(
                at=start,
                kind=TransitionKind.CREATE,
                status=status,
                plan_code=plan.code,
                plan_version=plan.version,
            )
        ],
        created_at=now,
        updated_at=now,
    )
    return advance(sub, now)


def billing_period(sub: Subscription, at: datetime) -> Period:
    """The subscription's billing period containing ``at`` (in its pinned time zone)."""
    return period_containing(sub.anchor, sub.interval, at, sub.timezone, sub.alignment)


def current_period(sub: Subscription, now: datetime) -> Period:
    """The period an upcoming invoice covers: the one containing ``now``; before the start, the
    first one; after a cancellation, the one the cancellation fell in (the last one billed)."""
    now = _aware(now, "now")
    if sub.canceled_at is not None:
        last = max(sub.canceled_at - _MS, sub.start_at)
        return billing_period(sub, min(now, last))
    return billing_period(sub, max(now, sub.start_at))


# ---------------------------------------------------------------------------------------------
# Scheduled transitions
# ---------------------------------------------------------------------------------------------


def _append(sub: Subscription, transition: Transition, **changes: Any) -> Subscription:
    history = [*sub.history, transition]
    return sub.model_copy(
        update={
            "history": history,
            "status": transition.status,
            "plan_code": transition.plan_code,
            "plan_version": transition.plan_version,
            **changes,
        }
    )


def advance(sub: Subscription, now: datetime) -> Subscription:
    """Apply every scheduled transition due at or before ``now``, each at its own time.

    Order at equal times: trial end, then cancellation, then a pending plan change (a
    cancellation drops a pending change: canceled is final).
    """
    now = _aware(now, "now")
    while True:
        due: list[tuple[datetime, int, str]] = []
        if sub.status is S.TRIALING and sub.trial_end is not None:
            due.append((sub.trial_end, 0, "trial_end"))
        if sub.status is not S.CANCELED and sub.cancel_at is not None:
            due.append((sub.cancel_at, 1, "cancel"))
        if sub.status is not S.CANCELED and sub.pending_change is not None:
            due.append((sub.pending_change.effective_at, 2, "change"))
        due = [d for d in due if d[0] <= now]
        if not due:
            return sub
        at, _, what = min(due)
        at = max(at, sub.history[-1].at)  # history stays ordered
        if what == "trial_end":
            sub = _append(
                sub,
                Transition(
                    at=at,
                    kind=TransitionKind.TRIAL_END,
                    status=S.ACTIVE,
                    plan_code=sub.plan_code,
                    plan_version=sub.plan_version,
                ),
            )
        elif what == "cancel":
            sub = _append(
                sub,
                Transition(
                    at=at,
                    kind=TransitionKind.CANCEL,
                    status=S.CANCELED,
                    plan_code=sub.plan_code,
                    plan_version=sub.plan_version,
                ),
                canceled_at=at,
                cancel_at=None,
                pending_change=None,
            )
        else:
            pending = sub.pending_change
            assert pending is not None
            sub = _append(
                sub,
                Transition(
                    at=at,
                    kind=TransitionKind.CHANGE_PLAN,
                    status=sub.status,
                    plan_code=pending.plan_code,
                    plan_version=pending.plan_version,
                ),
                pending_change=None,
            )


# ---------------------------------------------------------------------------------------------
# Explicit actions
# ---------------------------------------------------------------------------------------------


def check_transition(status: SubscriptionStatus, action: Action) -> SubscriptionStatus:
    """The state ``action`` leads to from ``status``; ``Conflict`` with the reason if illegal."""
    target = TRANSITIONS[(status, action)]
    if not isinstance(target, SubscriptionStatus):
        raise Conflict(
            f"cannot {action.value} a {status.value} subscription: {target}",
            details=[
                detail("action", f"cannot {action.value} a {status.value} subscription: {target}")
            ],
        )
    return target


def apply_action(
    sub: Subscription,
    action: Action,
    now: datetime,
    at: ActionTiming = ActionTiming.NOW,
) -> Subscription:
    """Apply ``action`` at ``now`` (after the scheduled transitions due by then).

    ``cancel`` with ``at=period_end`` schedules the cancellation for the end of the current
    period (the state does not change until then). Before the start only ``cancel`` is allowed;
    it takes effect at the start (nothing is billed).
    """
    now = _aware(now, "now")
    sub = advance(sub, now)
    if at is ActionTiming.PERIOD_END and action is not Action.CANCEL:
        raise ValidationError("at: 'period_end' is only allowed with action 'cancel'", field="at")
    target = TRANSITIONS[(sub.status, action)]
    if not isinstance(target, SubscriptionStatus):
        raise _conflict(sub, action.value, target)
    if now < sub.start_at and action is not Action.CANCEL:
        raise _conflict(
            sub,
            action.value,
            f"the subscription has not started yet (it starts at {sub.start_at.isoformat()})",
        )
    if action is Action.CANCEL and at is ActionTiming.PERIOD_END:
        if sub.cancel_at is not None:
            raise _conflict(
                sub,
                action.value,
                f"a cancellation is already scheduled at {sub.cancel_at.isoformat()}",
            )
        end = billing_period(sub, max(now, sub.start_at)).end
        return sub.model_copy(update={"cancel_at": end, "updated_at": now})
    when = max(now, sub.start_at, sub.history[-1].at)
    changes: dict[str, Any] = {"updated_at": now}
    if target is S.CANCELED:
        changes.update(canceled_at=when, cancel_at=None, pending_change=None)
    return _append(
        sub,
        Transition(
            at=when,
            kind=_KIND[action],
            status=target,
            plan_code=sub.plan_code,
            plan_version=sub.plan_version,
        ),
        **changes,
    )


def fixed_fee_per_period(plan: PlanVersion) -> Decimal:
    """The exact full-period amount of a plan's fixed charges (quantity 1 each)."""
    return sum((rate(c.price, Decimal(1)).amount for c in plan.fixed_charges), Decimal(0))


def is_upgrade(old: PlanVersion, new: PlanVersion) -> bool:
    """An upgrade costs at least as much in fixed fees per period as the old plan."""
    return fixed_fee_per_period(new) >= fixed_fee_per_period(old)


def change_plan(
    sub: Subscription,
    old: PlanVersion,
    new: PlanVersion,
    now: datetime,
    timing: ChangeTiming | None = None,
) -> Subscription:
    """Move ``sub`` from ``old`` (its current plan) to ``new``.

    ``immediate``: a ``change_plan`` transition at ``now`` (the invoice credits the unused part
    of the old fixed fees and charges the rest of the period at the new ones). ``period_end``:
    a pending change at the end of the current period (replacing an earlier pending one).
    Without ``timing``: immediate for an upgrade, period end for a downgrade.
    """
    now = _aware(now, "now")
    sub = advance(sub, now)
    if (old.code, old.version) != (sub.plan_code, sub.plan_version):
        raise ValueError("old must be the subscription's current plan version")
    reason: str | None = None
    if sub.status is S.CANCELED:
        reason = "the subscription is canceled, which is final"
    elif sub.status is S.PAUSED:
        reason = "the subscription is paused; resume it first"
    elif (new.code, new.version) == (sub.plan_code, sub.plan_version):
        reason = f"the subscription is already on {new.code} v{new.version}"
    if reason is not None:
        raise _conflict(sub, "change the plan of", reason)
    if new.currency != sub.currency:
        raise ValidationError(
            f"plan {new.code} v{new.version} is priced in {new.currency}, the subscription "
            f"in {sub.currency}",
            field="plan_code",
        )
    if new.interval != sub.interval:
        raise ValidationError(
            f"plan {new.code} v{new.version} bills every {new.interval.value}, the "
            f"subscription every {sub.interval.value}; a plan change keeps the interval",
            field="plan_code",
        )
    if timing is None:
        timing = ChangeTiming.IMMEDIATE if is_upgrade(old, new) else ChangeTiming.PERIOD_END
    if now < sub.start_at:
        # Not started: nothing was billed; the new plan simply replaces the old one.
        first = sub.history[0].model_copy(
            update={"plan_code": new.code, "plan_version": new.version}
        )
        return sub.model_copy(
            update={
                "history": [first, *sub.history[1:]],
                "plan_code": new.code,
                "plan_version": new.version,
                "pending_change": None,
                "updated_at": now,
            }
        )
    if timing is ChangeTiming.PERIOD_END:
        end = billing_period(sub, now).end
        if sub.cancel_at is not None and sub.cancel_at <= end:
            raise _conflict(
                sub,
                "change the plan of",
                f"the subscription is scheduled to cancel at {sub.cancel_at.isoformat()}",
            )
        pending = PendingChange(plan_code=new.code, plan_version=new.version, effective_at=end)
        return sub.model_copy(update={"pending_change": pending, "updated_at": now})
    when = max(now, sub.history[-1].at)
    return _append(
        sub,
        Transition(
            at=when,
            kind=TransitionKind.CHANGE_PLAN,
            status=sub.status,
            plan_code=new.code,
            plan_version=new.version,
        ),
        pending_change=None,
        updated_at=now,
    )


# ---------------------------------------------------------------------------------------------
# Reading the history
# ---------------------------------------------------------------------------------------------


def state_at(sub: Subscription, at: datetime) -> Transition | None:
    """The state in force at ``at`` (the last transition with ``t <= at``); None before start."""
    found: Transition | None = None
    for tr in sub.history:
        if tr.at <= at:
            found = tr
        else:
            break
    return found
