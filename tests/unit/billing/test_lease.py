"""The lease protocol (billing.lease) against an in-memory model of its two store rules: of two
inserts of one (tenant, name, seq) with the deduplication token only the first is kept, and the
newest version of a row wins. Clocks are fake (no sleeping, no I/O)."""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from billing.lease import Lease
from schemas.leases import LeaseRow


@dataclass
class Rows:
    rows: dict[tuple[str, str, int], tuple[int, LeaseRow]] = field(default_factory=dict)

    def lease_head(self, tenant_id: str, name: str) -> LeaseRow | None:
        mine = [(k[2], v[1]) for k, v in self.rows.items() if k[:2] == (tenant_id, name)]
        return max(mine, key=lambda kv: kv[0])[1] if mine else None

    def lease_at(self, tenant_id: str, name: str, seq: int) -> LeaseRow | None:
        found = self.rows.get((tenant_id, name, seq))
        return found[1] if found else None

    def acquire_lease(self, row: LeaseRow) -> None:
        self.rows.setdefault((row.tenant_id, row.name, row.seq), (1, row))  # token: first wins

    def renew_lease(self, row: LeaseRow, version: int) -> None:
        key = (row.tenant_id, row.name, row.seq)
        if key not in self.rows or self.rows[key][0] <= version:
            self.rows[key] = (version, row)


class Clock:
    def __init__(self) -> None:
        self.t = 1_000.0

    def wall_ms(self) -> int:
        return int(self.t * 1000)

    def mono(self) -> float:
        return self.t


def lease(rows: Rows, clock: Clock, owner: str, ttl: float = 30.0) -> Lease:
    return Lease(rows, "t", "x", ttl, owner=owner, wall_ms=clock.wall_ms, monotonic=clock.mono)


def test_one_holder_renewal_expiry_and_release() -> None:
    rows, clock = Rows(), Clock()
    a, b = lease(rows, clock, "a"), lease(rows, clock, "b")
    assert a.hold() and not b.hold()
    assert a.valid_for() == 25.0  # ttl minus the 5 s margin
    clock.t += 10
    assert a.hold() and a.valid_for() == 25.0  # renewed (due after a quarter of the ttl)
    assert not b.hold()
    clock.t += 29  # a stops renewing (dead): its row expires after 30 s
    assert a.valid_for() == 0
    assert not b.hold()  # 39 s after a's acquisition, 29 s after its renewal: still a's
    clock.t += 2
    assert b.hold() and rows.lease_head("t", "x").owner == "b"  # type: ignore[union-attr]
    assert not a.hold() and a.valid_for() == 0  # the dead holder cannot come back
    b.release()
    assert a.hold()  # released: free at once


def test_concurrent_acquisitions_one_wins() -> None:
    rows, clock = Rows(), Clock()
    contenders = [lease(rows, clock, f"o{i}") for i in range(5)]
    heads = [rows.lease_head("t", "x") for _ in contenders]  # all read the same (empty) head
    assert heads == [None] * 5
    won = [c.hold() for c in contenders]
    assert won.count(True) == 1


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.floats(0, 12)), min_size=1, max_size=60))
def test_never_two_holders(steps: list[tuple[int, float]]) -> None:
    """Whatever the interleaving of hold() calls and elapsed time (one shared clock: no skew),
    at no instant do two processes both believe they may act."""
    rows, clock = Rows(), Clock()
    ls = [lease(rows, clock, f"p{i}") for i in range(3)]
    for who, dt in steps:
        clock.t += dt
        ls[who].hold()
        assert sum(1 for x in ls if x.valid_for() > 0) <= 1
