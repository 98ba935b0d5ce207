"""Event corrections are exact for every aggregation and count once whatever counted the event
(the stream or a backfill run), across re-backfills, a backfill running while corrections are
made, late events into a corrected window and a crash before a window was recomputed. Real chDB;
the ground truth is plain Python over the generated events (tests/integration/billing/world.py).
"""

from __future__ import annotations

import random
import threading
from pathlib import Path
from typing import Any

import pytest

from api.billing_state import BillingServices
from clickhouse.backfill import BackfillStore
from clickhouse.store import Store
from schemas.billing import CorrectionIn
from streams.backfill import BackfillRunner
from tally.errors import Conflict

from .world import SPECS, TOPIC, Ev, World, make_world

SLUGS = [s["slug"] for s in SPECS]


def check(w: World, svc: BillingServices, *, backfilled: bool) -> None:
    """Every meter, per customer (and per region for the grouped ones), equals the truth."""
    repair = svc.corrections.repair
    for slug in SLUGS:
        got, want = w.usage(slug, repair), w.truth(slug, backfilled=backfilled)
        if slug == "mean":  # a quotient: equal to the 9 decimals the store keeps
            assert got.keys() == want.keys()
            assert all(abs(got[k] - want[k]) < 1e-8 for k in want), (slug, got, want)
        else:
            assert got == want, slug
    for slug in ("total", "high"):
        got = w.usage(slug, repair, by_region=True)
        assert got == w.truth(slug, backfilled=backfilled, by_region=True), slug


def void(w: World, svc: BillingServices, e: Ev) -> Any:
    w.fixes[e.id] = None
    return svc.corrections.correct(w.tenant, e.id, CorrectionIn(action="void", reason="test"))


def amend(w: World, svc: BillingServices, e: Ev, **changes: Any) -> Any:
    props = {**w.props(e), **changes}
    w.fixes[e.id] = props
    return svc.corrections.correct(
        w.tenant, e.id, CorrectionIn(action="amend", properties=props, reason="test")
    )


def backfill(w: World, **kw: Any) -> None:
    for slug in SLUGS:
        res = BackfillRunner(
            BackfillStore(w.store), w.meters[slug], live=None, chunk_events=50, **kw
        ).run()
        assert res.state == "complete"


def test_corrections_count_once_on_either_side_of_the_boundary(
    store: Store, services: BillingServices
) -> None:
    w = make_world(store)
    rnd = random.Random(1)
    check(w, services, backfilled=False)  # the stream's share only, before any backfill

    # Stream-counted events: a void of the window minimum, an amend that lowers a value and moves
    # the event to the other region, an amend of the user, a void of the newest event.
    s_low = min((e for e in w.events if w.stream_side(e)), key=lambda e: float(e.props["v"]))
    c = void(w, services, s_low)
    assert c.seq == 1 and {"meter": "low", "origin": "stream"} in c.targets
    s2 = w.pick(True, rnd)
    amend(w, services, s2, v="0.5", r="us" if w.props(s2)["r"] == "eu" else "eu")
    amend(w, services, w.pick(True, rnd), user="u-new")
    newest = max((e for e in w.events if w.stream_side(e)), key=lambda e: (e.time, e.id))
    void(w, services, newest)
    # Backfill-side events before any run: no run counted them, nothing is taken away now...
    b1 = w.pick(False, rnd)
    c = void(w, services, b1)
    assert {"meter": "n", "origin": "backfill"} in c.targets
    amend(w, services, w.pick(False, rnd), v=999, r="eu")
    check(w, services, backfilled=False)
    # ... and the first run applies them in its scan.
    backfill(w)
    check(w, services, backfilled=True)

    # Corrections of events the visible run counted (effect rows / windows above its snapshot).
    void(w, services, w.pick(False, rnd))
    amend(w, services, w.pick(False, rnd), v="0.01", user="u-b")
    b_max = max(
        (e for e in w.events if not w.stream_side(e) and w.fixes.get(e.id, 0) is not None),
        key=lambda e: float(w.props(e)["v"]),
    )
    void(w, services, b_max)
    amend(w, services, w.pick(True, rnd), v=77)
    check(w, services, backfilled=True)

    # A re-backfill applies everything in its scan: still exactly once.
    backfill(w)
    check(w, services, backfilled=True)

    # An amend of an amended event, then a void of it; a second void is refused.
    e = w.pick(True, rnd)
    amend(w, services, e, v=3)
    amend(w, services, e, v=4, r="eu")
    void(w, services, e)
    with pytest.raises(Conflict, match="already void"):
        services.corrections.correct(w.tenant, e.id, CorrectionIn(action="void", reason="x"))
    check(w, services, backfilled=True)
    hist = services.corrections.history(w.tenant, e.id)
    assert [h.action.value for h in hist] == ["amend", "amend", "void"]
    assert [h.seq for h in hist] == sorted(h.seq for h in hist)


def test_corrections_while_a_backfill_runs(store: Store, services: BillingServices) -> None:
    """Corrections made while a run scans (of events it already scanned and of events it has not
    reached yet) count once when the run becomes visible, and once after the next run."""
    w = make_world(store, seed=8)
    rnd = random.Random(2)
    backfill(w)
    history = sorted((e for e in w.events if not w.stream_side(e)), key=lambda e: e.id)
    scanned, later = history[5], history[-3]  # chunk 1 is history[:50]
    made = threading.Event()

    def correct_mid_run(chunk: int) -> None:
        if chunk == 1 and not made.is_set():
            made.set()
            void(w, services, scanned)
            amend(w, services, later, v="0.75", user="u-mid")

    runner = BackfillRunner(
        BackfillStore(store), w.meters["low"], live=None, chunk_events=50, on_chunk=correct_mid_run
    )
    assert runner.run().state == "complete" and made.is_set()
    for slug in SLUGS:
        if slug != "low":  # the other meters' visible runs predate the corrections
            BackfillRunner(BackfillStore(store), w.meters[slug], live=None, chunk_events=50).run()
    check(w, services, backfilled=True)
    backfill(w)
    check(w, services, backfilled=True)
    amend(w, services, w.pick(False, rnd), v=1)
    check(w, services, backfilled=True)


def test_late_events_and_a_crash_before_the_window_was_recomputed(
    store: Store, services: BillingServices, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = make_world(store, seed=5)
    rnd = random.Random(3)
    backfill(w)
    victim = w.pick(True, rnd)
    void(w, services, victim)
    check(w, services, backfilled=True)
    # A late event lands in the corrected window with a new minimum, maximum and newest value:
    # the window's recomputation is out of date and is redone before the query uses it.
    late = Ev(
        "zz-late",
        victim.customer,
        victim.time.replace(second=59, microsecond=999_000),
        {"v": "0.001", "r": victim.props["r"], "user": "u-late"},
        TOPIC,
        0,
        10_000,
    )
    w.add_late(late)
    check(w, services, backfilled=True)
    late2 = Ev(
        "zz-late2",
        victim.customer,
        late.time,
        {"v": 5000, "r": victim.props["r"], "user": "u-late2"},
        TOPIC,
        1,
        10_001,
    )
    w.add_late(late2)
    check(w, services, backfilled=True)

    # A crash between the correction's commit and the recomputation of its window: the next
    # usage query finds the window out of date and recomputes it.
    def crash(*_a: Any, **_k: Any) -> None:
        raise RuntimeError("killed before the override was written")

    monkeypatch.setattr(services.rows, "write_overrides", crash)
    target = w.pick(True, rnd, r="eu")
    void(w, services, target)
    monkeypatch.undo()
    check(w, services, backfilled=True)
    # Without a repair function the stale window would be wrong: the check above needed it.
    assert services.rows.overrides(w.tenant, w.meters["low"].id)


def test_concurrent_corrections_of_one_event_chain_once(
    store: Store, services: BillingServices, settings: Any, chdb_dir: Path
) -> None:
    """Two API replicas correct the same event at once: one void wins, the other gets 409;
    concurrent corrections of different events all land (seqs 1..n, each once)."""
    from api.billing_state import build_services

    w = make_world(store, seed=9)
    other = build_services(settings, Store.open(f"chdb://{chdb_dir}", store.database))
    e = w.pick(True, random.Random(4))
    outcomes: list[Any] = []
    barrier = threading.Barrier(2)

    def go(svc: BillingServices) -> None:
        barrier.wait()
        try:
            outcomes.append(
                svc.corrections.correct(w.tenant, e.id, CorrectionIn(action="void", reason="r"))
            )
        except Conflict as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=go, args=(s,)) for s in (services, other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(type(o).__name__ for o in outcomes) == ["Conflict", "Correction"]
    w.fixes[e.id] = None
    evs = [w.pick(True, random.Random(k), r="us") for k in range(6)]
    evs = list({x.id: x for x in evs}.values())

    def amend_one(svc: BillingServices, x: Ev) -> None:
        svc.corrections.correct(
            w.tenant, x.id, CorrectionIn(action="amend", properties={**x.props, "v": 2}, reason="r")
        )

    threads = [
        threading.Thread(target=amend_one, args=(services if i % 2 else other, x))
        for i, x in enumerate(evs)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for x in evs:
        w.fixes[x.id] = {**x.props, "v": 2}
    seqs = [c.seq for c in services.rows.corrections(w.tenant)]
    assert seqs == list(range(1, len(evs) + 2))
    check(w, services, backfilled=False)
