"""Load generator: separate processes, each running C asyncio HTTP clients that send batches.

The parent (``LoadGenerator``) spawns the processes once and drives them step by step: every step
has an offered load (events/s for all processes together, or unthrottled), a number of concurrent
clients, a duration and an ingest ``wait`` mode. Clients send at the pace of a shared schedule
(open loop, capped by the number of clients: a client waits for its answer before it sends again),
retry 5xx answers and connection errors with the same body (as a real client does), and report
per-step counts and answer latencies back to the parent.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import orjson

from benchmarks.http1 import Connection as HttpConnection
from benchmarks.http1 import HttpError, Target
from benchmarks.workload import BodyFactory

MAX_ATTEMPTS = 6
REQUEST_TIMEOUT_S = 120.0
RETRY_SLEEP_MAX_S = 1.0


@dataclass
class Tenant:
    tenant_id: str
    key: str


@dataclass
class GenConfig:
    tenants: list[Tenant]
    customers: int
    zipf_s: float
    dup_rate: float
    late_rate: float
    batch: int
    seed: int
    run_id: str


@dataclass
class StepSpec:
    name: str
    rate: float | None  # offered events/s for all processes together; None = unthrottled
    clients: int  # concurrent clients in all processes together
    duration_s: float
    wait: str | None = None  # ingest ?wait=; None = the server's default mode
    urls: list[str] = field(default_factory=list)  # API base URLs, spread over the clients
    warm_s: float = 0.0  # answers in the first warm_s seconds do not count toward the rate


@dataclass
class StepStats:
    """Counts of one step. Rates use events answered 2xx inside [window_start, ended]."""

    name: str
    started: float = 0.0  # wall clock (time.time)
    window_start: float = 0.0  # started + the step's warm-up
    ended: float = 0.0
    requests_ok: int = 0
    failed_attempts: int = 0  # non-2xx answers and transport errors (each attempt)
    attempts: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # "503", "timeout", ...
    events_sent: int = 0  # events in requests that were answered 2xx (incl. duplicates)
    events_in_window: int = 0  # of those, answered inside [window_start, ended]
    unique_acked: int = 0  # new (non-duplicate) events of acknowledged requests
    unique_unacked: int = 0  # new events of requests that were given up (may be stored or not)
    events_rejected: int = 0  # per-event 4xx inside a 200 answer
    latencies_s: list[float] = field(default_factory=list)  # every 2xx answer
    cpu_s: float = 0.0  # CPU time the generator process(es) used

    def merge(self, other: StepStats) -> None:
        self.started = min(self.started, other.started) if self.started else other.started
        self.window_start = (
            min(self.window_start, other.window_start) if self.window_start else other.window_start
        )
        self.ended = max(self.ended, other.ended)
        for name in (
            "requests_ok",
            "failed_attempts",
            "attempts",
            "events_sent",
            "events_in_window",
            "unique_acked",
            "unique_unacked",
            "events_rejected",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for k, v in other.errors.items():
            self.errors[k] = self.errors.get(k, 0) + v
        self.latencies_s.extend(other.latencies_s)
        self.cpu_s += other.cpu_s

    @property
    def seconds(self) -> float:
        return max(self.ended - self.started, 1e-9)

    @property
    def accepted_per_s(self) -> float:
        return self.events_in_window / max(self.ended - self.window_start, 1e-9)

    @property
    def error_rate(self) -> float:
        return self.failed_attempts / self.attempts if self.attempts else 0.0


# --- the child process ------------------------------------------------------------------------


class _Client:
    def __init__(self, cfg: GenConfig, proc: int, procs: int) -> None:
        self.cfg = cfg
        self.proc = proc
        self.procs = procs
        self.factory = BodyFactory(
            seed=cfg.seed * 1000 + proc,
            prefix=f"{cfg.run_id}-{proc}-",
            customers=cfg.customers,
            zipf_s=cfg.zipf_s,
            dup_rate=cfg.dup_rate,
            late_rate=cfg.late_rate,
        )
        self.headers = [
            {"Authorization": f"Bearer {t.key}", "content-type": "application/json"}
            for t in cfg.tenants
        ]

    async def step(self, spec: StepSpec, clients: int, rate: float | None, stop: Any) -> StepStats:
        st = StepStats(spec.name)
        cpu0 = time.process_time()
        t0 = time.time()
        deadline = t0 + spec.duration_s
        st.started = t0
        st.window_start = t0 + min(spec.warm_s, spec.duration_s / 2)
        interval = self.cfg.batch / rate if rate else 0.0
        next_slot = [t0]
        params = {"wait": spec.wait} if spec.wait else None
        if clients < 1:
            st.ended = st.window_start = t0
            return st
        n_urls = len(spec.urls)
        n_tenants = len(self.cfg.tenants)

        async def one(worker: int) -> None:
            tenant = (self.proc + worker * self.procs) % n_tenants
            # one keep-alive connection per client, its request head written once
            target = Target.of(spec.urls[(self.proc + worker) % n_urls] + "/v1/events", params)
            conn = HttpConnection(target, self.headers[tenant], timeout_s=REQUEST_TIMEOUT_S)
            try:
                while True:
                    now = time.time()
                    if now >= deadline or stop.is_set():
                        return
                    if interval:
                        slot = next_slot[0]
                        if slot < now - 1.0:  # far behind: do not build up a burst
                            slot = now
                        next_slot[0] = slot + interval
                        if slot > now:
                            await asyncio.sleep(slot - now)
                            if time.time() >= deadline or stop.is_set():
                                return
                    n = self.cfg.batch
                    body, new = self.factory.body(tenant, n, int(time.time() * 1000))
                    await self._send(conn, body, n, new, st, deadline)
            finally:
                conn.close()

        await asyncio.gather(*(one(i) for i in range(clients)))
        st.ended = min(time.time(), deadline)
        st.cpu_s = time.process_time() - cpu0
        return st

    async def _send(
        self,
        conn: HttpConnection,
        body: bytes,
        n: int,
        new: int,
        st: StepStats,
        deadline: float,
    ) -> None:
        for attempt in range(MAX_ATTEMPTS):
            st.attempts += 1
            t = time.perf_counter()
            retry_after = 0.2 * (attempt + 1)
            try:
                r = await conn.post(body)
            except TimeoutError:
                kind = "timeout"
            except HttpError as exc:
                kind = exc.kind
            else:
                if r.status < 300:
                    st.latencies_s.append(time.perf_counter() - t)
                    st.requests_ok += 1
                    st.events_sent += n
                    st.unique_acked += new
                    if st.window_start <= time.time() <= deadline:
                        st.events_in_window += n
                    if r.status == 200:  # some events rejected (should not happen)
                        rejected = len(orjson.loads(r.body).get("rejected", []))
                        st.events_rejected += rejected
                        st.errors["rejected_events"] = (
                            st.errors.get("rejected_events", 0) + rejected
                        )
                    return
                kind = str(r.status)
                if r.status < 500 and r.status != 429:
                    st.failed_attempts += 1
                    st.errors[kind] = st.errors.get(kind, 0) + 1
                    break  # a 4xx will not get better
                with contextlib.suppress(ValueError):
                    retry_after = float(r.headers.get("retry-after", retry_after))
            st.failed_attempts += 1
            st.errors[kind] = st.errors.get(kind, 0) + 1
            await asyncio.sleep(min(retry_after, RETRY_SLEEP_MAX_S))
        st.unique_unacked += new


def _child(cfg: GenConfig, proc: int, procs: int, conn: Connection, stop: Any) -> None:
    client = _Client(cfg, proc, procs)
    while True:
        msg = conn.recv()
        if msg is None:
            return
        spec, clients, rate = msg
        st = asyncio.run(client.step(spec, clients, rate, stop))
        conn.send(st)


# --- the parent ---------------------------------------------------------------------------------


class LoadGenerator:
    """``procs`` generator processes; ``run`` one step at a time, or ``start`` + ``collect``."""

    def __init__(self, cfg: GenConfig, procs: int) -> None:
        ctx = mp.get_context("spawn")
        self.cfg = cfg
        self.stop_event = ctx.Event()
        self._conns: list[Connection] = []
        self._procs: list[Any] = []
        for i in range(procs):
            parent, child = ctx.Pipe()
            p = ctx.Process(
                target=_child, args=(cfg, i, procs, child, self.stop_event), daemon=True
            )
            p.start()
            self._conns.append(parent)
            self._procs.append(p)
        self._running: StepSpec | None = None

    @property
    def pids(self) -> list[int]:
        return [int(p.pid) for p in self._procs]

    def start(self, spec: StepSpec) -> None:
        """Start a step in every process (clients and rate split between them)."""
        if self._running is not None:
            raise RuntimeError("a step is already running")
        self.stop_event.clear()
        n = len(self._procs)
        active = min(n, max(spec.clients, 1))
        for i, conn in enumerate(self._conns):
            clients = spec.clients // active + (1 if i < spec.clients % active else 0)
            if i >= active:
                clients = 0
            rate = spec.rate * clients / spec.clients if spec.rate else None
            conn.send((spec, clients, rate))
        self._running = spec

    def stop(self) -> None:
        """Ask the running step to end now (clients finish their request in flight)."""
        self.stop_event.set()

    def collect(self) -> StepStats:
        spec = self._running
        if spec is None:
            raise RuntimeError("no step is running")
        total = StepStats(spec.name)
        for conn in self._conns:
            total.merge(conn.recv())
        self._running = None
        return total

    def run(self, spec: StepSpec) -> StepStats:
        self.start(spec)
        return self.collect()

    def close(self) -> None:
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.send(None)
        for p in self._procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join(5)
