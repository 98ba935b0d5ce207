"""The subscription state machine: every (state, action) pair, scheduled transitions, plan
changes and their 409 reasons."""

from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rating.subscriptions import (
    TRANSITIONS,
    advance,
    apply_action,
    change_plan,
    check_transition,
    current_period,
    state_at,
)
from schemas.catalog import (
    Action,
    ActionIn,
    ActionTiming,
    ChangeTiming,
    Subscription,
    SubscriptionStatus,
    TransitionKind,
)
from tally.errors import Conflict, ValidationError
from tests.unit.catalog.helpers import at, customer, error_field, plan, subscribe

S = SubscriptionStatus
BASIC = plan("basic", "10")
PRO = plan("pro", "30")
START = "2024-03-01T00:00:00Z"
NOW = at("2024-03-10T12:00:00Z")

LEGAL = {
    (S.TRIALING, Action.ACTIVATE): S.ACTIVE,
    (S.TRIALING, Action.CANCEL): S.CANCELED,
    (S.ACTIVE, Action.PAUSE): S.PAUSED,
    (S.ACTIVE, Action.CANCEL): S.CANCELED,
    (S.PAUSED, Action.RESUME): S.ACTIVE,
    (S.PAUSED, Action.CANCEL): S.CANCELED,
}
ILLEGAL_REASONS = {
    (S.TRIALING, Action.PAUSE): "cannot be paused; activate it first",
    (S.TRIALING, Action.RESUME): "only a paused subscription can be resumed",
    (S.ACTIVE, Action.ACTIVATE): "already active",
    (S.ACTIVE, Action.RESUME): "only a paused subscription can be resumed",
    (S.PAUSED, Action.ACTIVATE): "restarted with 'resume'",
    (S.PAUSED, Action.PAUSE): "already paused",
    (S.CANCELED, Action.ACTIVATE): "canceled, which is final",
    (S.CANCELED, Action.PAUSE): "canceled, which is final",
    (S.CANCELED, Action.RESUME): "canceled, which is final",
    (S.CANCELED, Action.CANCEL): "already canceled",
}


def in_state(status: SubscriptionStatus) -> Subscription:
    """A subscription that reached ``status`` through legal transitions, before NOW."""
    if status is S.TRIALING:
        return subscribe(BASIC, START, trial_end="2024-03-20T00:00:00Z")
    sub = subscribe(BASIC, START)
    if status is S.PAUSED:
        sub = apply_action(sub, Action.PAUSE, at("2024-03-05T00:00:00Z"))
    if status is S.CANCELED:
        sub = apply_action(sub, Action.CANCEL, at("2024-03-05T00:00:00Z"))
    assert sub.status is status
    return sub


def test_the_table_covers_every_pair_and_matches_the_spec() -> None:
    assert set(TRANSITIONS) == {(s, a) for s in S for a in Action}
    assert set(LEGAL) | set(ILLEGAL_REASONS) == set(TRANSITIONS)
    for pair, target in LEGAL.items():
        assert TRANSITIONS[pair] is target


@pytest.mark.parametrize(("status", "action"), sorted(LEGAL, key=str))
def test_legal_transition(status: SubscriptionStatus, action: Action) -> None:
    sub = in_state(status)
    after = apply_action(sub, action, NOW)
    assert after.status is LEGAL[(status, action)]
    last = after.history[-1]
    assert last.at == NOW
    assert last.status is after.status
    assert last.kind.value == action.value
    assert (last.plan_code, last.plan_version) == ("basic", 1)
    assert after.history[:-1] == sub.history
    if after.status is S.CANCELED:
        assert after.canceled_at == NOW
    assert check_transition(status, action) is LEGAL[(status, action)]


@pytest.mark.parametrize(("status", "action"), sorted(ILLEGAL_REASONS, key=str))
def test_illegal_transition_is_409_with_reason(status: SubscriptionStatus, action: Action) -> None:
    sub = in_state(status)
    with pytest.raises(Conflict) as exc:
        apply_action(sub, action, NOW)
    assert exc.value.status == 409
    reason = ILLEGAL_REASONS[(status, action)]
    assert reason in exc.value.message
    [d] = exc.value.details
    assert d["field"] == "action"
    assert str(TRANSITIONS[(status, action)]) in d["message"]
    assert str(status.value) in d["message"]
    with pytest.raises(Conflict):
        check_transition(status, action)


def test_trial_ends_by_itself_at_trial_end() -> None:
    sub = subscribe(BASIC, START, trial_end="2024-03-15T00:00:00Z")
    assert sub.status is S.TRIALING
    assert advance(sub, at("2024-03-14T23:59:59Z")).status is S.TRIALING
    later = advance(sub, at("2024-04-02T00:00:00Z"))
    assert later.status is S.ACTIVE
    assert later.history[-1].kind is TransitionKind.TRIAL_END
    assert later.history[-1].at == at("2024-03-15T00:00:00Z")
    # advancing twice changes nothing more
    assert advance(later, at("2024-05-01T00:00:00Z")) == later


def test_activate_ends_the_trial_early() -> None:
    sub = subscribe(BASIC, START, trial_end="2024-03-15T00:00:00Z")
    sub = apply_action(sub, Action.ACTIVATE, NOW)
    assert sub.status is S.ACTIVE
    assert advance(sub, at("2024-03-20T00:00:00Z")).history == sub.history


def test_cancel_at_period_end_is_scheduled_then_applied() -> None:
    sub = subscribe(BASIC, START)
    sched = apply_action(sub, Action.CANCEL, NOW, ActionTiming.PERIOD_END)
    assert sched.status is S.ACTIVE
    assert sched.cancel_at == at("2024-04-01T00:00:00Z")
    with pytest.raises(Conflict, match="already scheduled"):
        apply_action(sched, Action.CANCEL, NOW, ActionTiming.PERIOD_END)
    done = advance(sched, at("2024-04-03T00:00:00Z"))
    assert done.status is S.CANCELED
    assert done.canceled_at == at("2024-04-01T00:00:00Z")
    assert done.cancel_at is None
    # The last billed period is March, not the one the read happened in.
    assert current_period(done, at("2024-04-03T00:00:00Z")).start == at("2024-03-01T00:00:00Z")
    # A scheduled cancellation can still be made immediate.
    now_cancel = apply_action(sched, Action.CANCEL, NOW)
    assert now_cancel.canceled_at == NOW


def test_period_end_only_for_cancel() -> None:
    with pytest.raises(ValidationError) as exc:
        apply_action(subscribe(BASIC, START), Action.PAUSE, NOW, ActionTiming.PERIOD_END)
    assert error_field(exc.value) == "at"
    with pytest.raises(Exception, match="period_end"):
        ActionIn.model_validate({"action": "pause", "at": "period_end"})


def test_before_start_only_cancel() -> None:
    sub = subscribe(BASIC, "2024-04-01T00:00:00Z", now="2024-03-10T00:00:00Z")
    with pytest.raises(Conflict, match="not started yet"):
        apply_action(sub, Action.PAUSE, NOW)
    canceled = apply_action(sub, Action.CANCEL, NOW)
    assert canceled.canceled_at == at("2024-04-01T00:00:00Z")  # never billed


def test_upgrade_is_immediate_by_default() -> None:
    sub = subscribe(BASIC, START)
    up = change_plan(sub, BASIC, PRO, NOW)
    assert (up.plan_code, up.status) == ("pro", S.ACTIVE)
    assert up.history[-1].kind is TransitionKind.CHANGE_PLAN
    assert up.history[-1].at == NOW
    assert state_at(up, NOW - timedelta(milliseconds=1)).plan_code == "basic"  # type: ignore[union-attr]
    assert state_at(up, NOW).plan_code == "pro"  # type: ignore[union-attr]


def test_downgrade_waits_for_period_end_by_default() -> None:
    sub = subscribe(PRO, START)
    down = change_plan(sub, PRO, BASIC, NOW)
    assert down.plan_code == "pro"
    assert down.pending_change is not None
    assert down.pending_change.effective_at == at("2024-04-01T00:00:00Z")
    applied = advance(down, at("2024-04-01T00:00:00Z"))
    assert applied.plan_code == "basic"
    assert applied.pending_change is None
    assert applied.history[-1].at == at("2024-04-01T00:00:00Z")
    # Explicit timing overrides the default.
    assert change_plan(sub, PRO, BASIC, NOW, ChangeTiming.IMMEDIATE).plan_code == "basic"


def test_cancel_drops_a_pending_change_at_the_same_time() -> None:
    sub = change_plan(subscribe(PRO, START), PRO, BASIC, NOW)
    sub = apply_action(sub, Action.CANCEL, NOW, ActionTiming.PERIOD_END)
    done = advance(sub, at("2024-05-01T00:00:00Z"))
    assert done.status is S.CANCELED
    assert done.plan_code == "pro"
    assert done.pending_change is None


def test_period_end_change_refused_when_cancel_scheduled() -> None:
    sub = apply_action(subscribe(PRO, START), Action.CANCEL, NOW, ActionTiming.PERIOD_END)
    with pytest.raises(Conflict, match="scheduled to cancel"):
        change_plan(sub, PRO, BASIC, NOW, ChangeTiming.PERIOD_END)


@pytest.mark.parametrize(
    ("status", "reason"),
    [(S.CANCELED, "canceled, which is final"), (S.PAUSED, "paused; resume it first")],
)
def test_change_plan_illegal_states(status: SubscriptionStatus, reason: str) -> None:
    with pytest.raises(Conflict, match=reason) as exc:
        change_plan(in_state(status), BASIC, PRO, NOW)
    assert exc.value.status == 409


def test_change_to_the_same_version_is_409() -> None:
    with pytest.raises(Conflict, match="already on basic v1"):
        change_plan(subscribe(BASIC, START), BASIC, BASIC, NOW)


def test_change_plan_keeps_currency_and_interval() -> None:
    sub = subscribe(BASIC, START)
    with pytest.raises(ValidationError, match="EUR") as exc:
        change_plan(sub, BASIC, plan("euro", "5", currency="EUR"), NOW)
    assert error_field(exc.value) == "plan_code"
    with pytest.raises(ValidationError, match="interval"):
        change_plan(sub, BASIC, plan("yearly", "100", interval="year"), NOW)


def test_currency_must_match_the_customer() -> None:
    with pytest.raises(ValidationError, match="EUR") as exc:
        subscribe(plan("euro", "5", currency="EUR"), START)
    assert error_field(exc.value) == "plan_code"


def test_trial_end_after_start() -> None:
    with pytest.raises(Exception, match="trial_end must be after start_at"):
        subscribe(BASIC, START, trial_end=START)


def test_periods_are_in_the_customers_time_zone_and_pinned() -> None:
    cust = customer(timezone="America/New_York")
    sub = subscribe(BASIC, "2024-03-05T00:00:00Z", cust=cust)
    p = current_period(sub, NOW)
    assert p.start == at("2024-03-01T05:00:00Z")  # midnight EST
    assert p.end == at("2024-04-01T04:00:00Z")  # midnight EDT
    assert sub.timezone == "America/New_York"


def test_anniversary_uses_the_customer_anchor_or_the_start() -> None:
    sub = subscribe(BASIC, "2024-03-05T10:00:00Z", alignment="anniversary")
    assert current_period(sub, NOW).start == at("2024-03-05T10:00:00Z")
    cust = customer(anchor=at("2024-01-20T00:00:00Z"))
    sub2 = subscribe(BASIC, "2024-03-05T10:00:00Z", alignment="anniversary", cust=cust)
    p = current_period(sub2, at("2024-03-05T10:00:00Z"))
    assert (p.start, p.end) == (at("2024-02-20T00:00:00Z"), at("2024-03-20T00:00:00Z"))


# --- invariants under any sequence of actions -------------------------------------------------

OPS = st.lists(
    st.tuples(
        st.sampled_from(["activate", "pause", "resume", "cancel", "cancel_end", "up", "down"]),
        st.integers(min_value=0, max_value=90 * 24 * 3600),
    ),
    max_size=12,
)


@settings(max_examples=200, deadline=None)
@given(ops=OPS, trial=st.booleans())
def test_any_action_sequence_keeps_the_invariants(ops: list[tuple[str, int]], trial: bool) -> None:
    sub = subscribe(BASIC, START, trial_end="2024-03-15T00:00:00Z" if trial else None)
    plans = {("basic", 1): BASIC, ("pro", 1): PRO}
    t = at(START)
    for op, dt in ops:
        t = t + timedelta(seconds=dt)
        before = advance(sub, t)
        try:
            if op in ("up", "down"):
                target = PRO if op == "up" else BASIC
                old = plans[(before.plan_code, before.plan_version)]
                sub = change_plan(
                    sub, old, target, t, ChangeTiming.IMMEDIATE if op == "up" else None
                )
            elif op == "cancel_end":
                sub = apply_action(sub, Action.CANCEL, t, ActionTiming.PERIOD_END)
            else:
                action = Action(op)
                sub = apply_action(sub, action, t)
                assert TRANSITIONS[(before.status, action)] is sub.status
        except Conflict as exc:
            sub = before
            if op not in ("up", "down", "cancel_end"):
                assert not isinstance(TRANSITIONS[(before.status, Action(op))], SubscriptionStatus)
            assert exc.details[0]["field"] == "action" and exc.details[0]["message"]
        sub = advance(sub, t)
        times = [tr.at for tr in sub.history]
        assert times == sorted(times)
        assert sub.history[-1].status is sub.status
        assert (sub.history[-1].plan_code, sub.history[-1].plan_version) == (
            sub.plan_code,
            sub.plan_version,
        )
        canceled = [i for i, tr in enumerate(sub.history) if tr.status is S.CANCELED]
        if canceled:  # canceled is absorbing and final
            assert canceled[0] == len(sub.history) - 1
            assert sub.canceled_at == sub.history[-1].at
