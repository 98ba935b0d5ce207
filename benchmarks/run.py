"""The benchmark run: ceilings, ingest ramp, latency and freshness, profile, stored volume
(history, queries, memory, ingest burst), then the report. See docs/performance.md.
"""

from __future__ import annotations

import contextlib
import shutil
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from benchmarks import ceilings, history, profile, queries, report
from benchmarks.jobs import run_job
from benchmarks.loadgen import GenConfig, LoadGenerator, StepSpec, StepStats, Tenant
from benchmarks.params import Params
from benchmarks.target import (
    BenchError,
    CpuMeter,
    EmbeddedTally,
    MemorySampler,
    StoredPoller,
    StoredSpan,
    Totals,
    create_tenants,
    ensure_meters,
    peak_rss_mb,
    probe_query,
    tenant_of_key,
)
from benchmarks.workload import EVENT_TYPE, iso_ms
from runtime.roles import PARTITIONS_FILE

PARTITIONS = 8  # Settings.events_partitions default (scale-out)


@dataclass
class RemoteTarget:
    urls: list[str]
    keys: list[str] = field(default_factory=list)
    admin_token: str | None = None
    clickhouse_url: str | None = None
    clickhouse_database: str = "tally"
    kafka_bootstrap: str | None = None
    pid: int | None = None  # a local process to sample RSS of and to profile (optional)
    partitions: int = PARTITIONS


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


class Bars:
    """rich progress bars; one per long step."""

    def __init__(self, console: Console) -> None:
        self.progress = Progress(
            TextColumn("[bold]{task.description:<34}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )

    def __enter__(self) -> Bars:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)  # type: ignore[arg-type]

    @contextlib.contextmanager
    def task(self, name: str, total: float) -> Iterator[TaskID]:
        tid = self.progress.add_task(name, total=total)
        try:
            yield tid
        finally:
            t = self.progress.tasks[tid]
            if t.total is not None:
                self.progress.update(tid, completed=t.total)
            self.progress.refresh()

    def callback(self, tid: TaskID) -> Any:
        def cb(done: int, total: int, what: str = "") -> None:
            self.progress.update(tid, completed=done, total=total)

        return cb

    def timed(self, name: str, seconds: float, fn: Any) -> Any:
        """Run ``fn()`` (blocking) in a thread while a bar counts ``seconds`` down."""
        import threading

        box: dict[str, Any] = {}

        def target() -> None:
            try:
                box["value"] = fn()
            except BaseException as exc:  # handed to the caller
                box["error"] = exc

        th = threading.Thread(target=target, daemon=True)
        with self.task(name, round(seconds, 1)) as tid:
            t0 = time.monotonic()
            th.start()
            while th.is_alive():
                th.join(0.2)
                self.progress.update(tid, completed=min(seconds, round(time.monotonic() - t0, 1)))
        if "error" in box:
            raise box["error"]
        return box.get("value")


class Runner:
    def __init__(
        self,
        params: Params,
        out_dir: Path,
        console: Console,
        remote: RemoteTarget | None = None,
        keep_data: bool = False,
        work_dir: Path | None = None,
        quick: bool = False,
    ) -> None:
        self.p = params
        self.quick = quick
        self.out = out_dir
        self.console = console
        self.remote = remote
        self.keep_data = keep_data
        self.run_id = uuid.uuid4().hex[:6]
        if work_dir is not None:
            work_dir.mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix="tally-bench-", dir=work_dir))
        self.tally: EmbeddedTally | None = None
        self.data_dir = self.work / "ingest"
        self.gen: LoadGenerator | None = None
        self.mem = MemorySampler()
        self.urls: list[str] = []
        self.tenants: list[Tenant] = []
        self.baseline = 0
        self.acked_unique = 0
        self.unacked_unique = 0
        self.probes = 0
        self.steps: list[dict[str, Any]] = []
        self.result: dict[str, Any] = {}

    # --- helpers ------------------------------------------------------------------------------

    @property
    def embedded(self) -> bool:
        return self.remote is None

    @property
    def pid(self) -> int | None:
        if self.tally is not None and self.tally.proc is not None:
            return self.tally.pid
        return self.remote.pid if self.remote is not None else None

    def log(self, msg: str) -> None:
        self.console.log(msg)

    def totals(self) -> Totals:
        return Totals(self.urls[0], self.tenants)

    def stored_now(self) -> int:
        with httpx.Client() as c:
            return self.totals().read(c)

    def account(self, st: StepStats) -> None:
        self.acked_unique += st.unique_acked
        self.unacked_unique += st.unique_unacked

    def expected(self) -> int:
        return self.baseline + self.acked_unique + self.probes

    def step(self, name: str, rate: float | None, clients: int, seconds: float) -> StepSpec:
        warm = min(2.0, seconds * 0.2)
        return StepSpec(name, rate, clients, seconds, self.p.wait, self.urls, warm)

    def start_tally(self, bars: Bars, label: str) -> dict[str, float]:
        """(embedded) Start `tally run` on the data dir; wait until an event is stored."""
        assert self.tally is not None
        t0 = time.monotonic()
        up = bars.timed(f"start tally ({label})", 20, self.tally.start)
        self.urls = [self.tally.url]
        self.mem.pid = self.tally.pid
        if self.tenants:
            self.first_stored()
        return {"startup_s": up, "ready_s": time.monotonic() - t0}

    def first_stored(self, timeout: float = 900) -> float:
        """Send one event with the default wait mode until it is acknowledged (the worker is up
        and storing); returns the seconds it took."""
        t0 = time.monotonic()
        t = self.tenants[0]
        body = [
            {
                "id": f"ready-{self.run_id}-{uuid.uuid4().hex[:8]}",
                "type": EVENT_TYPE,
                "customer": "probe-ready",
                "properties": {"endpoint": "/", "region": "eu-west-1", "tokens": 1, "user": "u"},
            }
        ]
        with httpx.Client(timeout=60) as c:
            while time.monotonic() - t0 < timeout:
                with contextlib.suppress(httpx.HTTPError):
                    r = c.post(
                        self.urls[0] + "/v1/events",
                        json=body,
                        headers={"Authorization": f"Bearer {t.key}"},
                    )
                    if r.status_code < 300:
                        self.probes += 1
                        return time.monotonic() - t0
                    if r.status_code < 500:
                        raise BenchError(f"ready probe: {r.status_code} {r.text[:300]}")
                time.sleep(0.5)
        raise BenchError(f"no event was stored within {timeout:.0f}s of the start")

    def drain(self, bars: Bars, label: str) -> dict[str, Any]:
        """Wait until every acknowledged event is visible in usage queries; check the count."""
        want = self.expected()
        upper = want + self.unacked_unique
        deadline = time.monotonic() + self.p.drain_timeout_s
        got = 0
        t0 = time.monotonic()
        with (
            httpx.Client() as c,
            bars.task(f"drain ({label})", max(want - self.baseline, 1)) as tid,
        ):
            while True:
                got = self.totals().read(c)
                bars.progress.update(tid, completed=max(0, min(got, want) - self.baseline))
                if got >= want or time.monotonic() > deadline:
                    break
                time.sleep(0.25)
        return {
            "expected_min": want - self.baseline,
            "expected_max": upper - self.baseline,
            "stored": got - self.baseline,
            "ok": want <= got <= upper,
            "drain_s": time.monotonic() - t0,
        }

    # --- phases ------------------------------------------------------------------------------

    def measure_ceilings(self, bars: Bars) -> dict[str, Any]:
        p = self.p
        quick = self.quick
        out: dict[str, Any] = {}
        with bars.task("ceiling: JSON parse", 1):
            out["json"] = ceilings.json_ceiling(0.6 if quick else 3.0, p.batch)
        bootstrap = self.remote.kafka_bootstrap if self.remote else None
        with bars.task("ceiling: broker produce/consume", 1) as tid:
            out["broker"] = ceilings.broker_ceiling(
                4000 if quick else 15_000, p.batch, bootstrap, bars.callback(tid)
            )
            out["broker"]["where"] = bootstrap or "embedded Tansu (fresh)"
        ch = self.remote.clickhouse_url if self.remote else None
        with bars.task("ceiling: store insert_arrow", 1) as tid:
            out["store"] = run_job(
                ceilings.store_ceiling_job,
                200_000 if quick else 2_000_000,
                ch,
                progress=bars.callback(tid),
            )
            out["store"]["where"] = "ClickHouse " + ch if ch else "embedded chDB (fresh)"
        return out

    def setup(self, bars: Bars, store: str) -> dict[str, Any]:
        """Start on a fresh store (embedded) or connect (remote); tenants and meters; the
        ground-truth counters start from what the store holds now."""
        info: dict[str, Any] = {}
        self.acked_unique = self.unacked_unique = self.probes = 0
        self.tenants = []
        if self.embedded:
            self.data_dir = self.work / store
            self.tally = EmbeddedTally(self.data_dir, self.out / "tally.log")
            info.update(self.start_tally(bars, f"empty {store} store"))
            with bars.task("create tenants and meters", self.p.tenants):
                self.tenants = create_tenants(
                    self.urls[0], self.tally.admin_token, self.p.tenants, f"bench-{self.run_id}"
                )
                for t in self.tenants:
                    ensure_meters(self.urls[0], t.key)
            self.first_stored()
        else:
            r = self.remote
            assert r is not None
            self.urls = list(r.urls)
            if r.keys:
                self.tenants = [Tenant(tenant_of_key(k), k) for k in r.keys]
            elif r.admin_token:
                self.tenants = create_tenants(
                    self.urls[0], r.admin_token, self.p.tenants, f"bench-{self.run_id}"
                )
            else:
                raise BenchError("a remote target needs --key (one or more) or --admin-token")
            for t in self.tenants:
                ensure_meters(self.urls[0], t.key)
            self.mem.pid = r.pid
        self.baseline = self.stored_now() - self.probes
        return info

    def ingest(self, bars: Bars) -> dict[str, Any]:
        p = self.p
        gen = self.gen
        assert gen is not None
        self.mem.phase = "ingest"
        poller = StoredPoller(self.totals(), p.poll_s).start()
        self.mem.stored_fn = poller.latest
        out: dict[str, Any] = {}
        try:
            st = bars.timed(
                "warm-up",
                p.warmup_s,
                lambda: gen.run(self.step("warmup", p.ramp_start, p.clients, p.warmup_s)),
            )
            self.account(st)
            best = 0.0
            no_gain = 0
            rate = p.ramp_start
            for i in range(p.max_steps):
                spec = self.step(f"ramp-{i + 1}", rate, p.clients, p.step_s)
                cpu = CpuMeter(self.pid)
                st = bars.timed(
                    f"ramp {i + 1}: offered {rate:,.0f} ev/s", p.step_s, lambda s=spec: gen.run(s)
                )
                self.account(st)
                cores = cpu.cores()
                span = poller.step_span(st.window_start, st.ended)
                row = step_row(st, rate, p.clients, span, cores)
                self.steps.append(row)
                self.log(
                    f"ramp {i + 1}: offered {rate:,.0f}/s accepted {row['accepted_events_per_s']:,.0f}/s "
                    f"stored {stored_text(span)} errors {row['error_rate']:.1%}"
                )
                stored = row["stored_events_per_s"]
                if self.remote is not None:
                    self.drain(bars, f"after ramp {i + 1}")
                s = stored or 0.0
                if s >= best * 1.10:
                    best = max(best, s)
                    no_gain = 0
                else:
                    best = max(best, s)
                    no_gain += 1
                    if no_gain >= p.patience:
                        break
                rate *= p.ramp_factor
            max_stored = max((r["stored_events_per_s"] or 0.0) for r in self.steps)
            max_accepted = max(r["accepted_events_per_s"] for r in self.steps)
            out["steps"] = self.steps
            out["max_stored_events_per_s"] = max_stored
            per_cpu = [
                r["stored_per_tally_cpu_s"] for r in self.steps if r["stored_per_tally_cpu_s"]
            ]
            out["max_stored_per_tally_cpu_s"] = max(per_cpu) if per_cpu else None
            out["max_accepted_events_per_s"] = max_accepted

            # A single sequential client (SDKs send one batch at a time).
            spec = self.step("sequential", None, 1, p.sequential_s)
            cpu = CpuMeter(self.pid)
            st = bars.timed("sequential client", p.sequential_s, lambda: gen.run(spec))
            self.account(st)
            out["sequential"] = {
                **cpu.cores(),
                "events_per_s": st.accepted_per_s,
                "latency_p50_s": pct(st.latencies_s, 0.5),
                "latency_p99_s": pct(st.latencies_s, 0.99),
                "requests": st.requests_ok,
                "error_rate": st.error_rate,
            }

            # Half of the measured maximum: answer latency of the load, freshness probes.
            half = max(max_stored / 2, p.batch)
            out["half_load"] = self.half_load(bars, half)
            out["profile"] = None
            if p.profile_s > 0 and self.pid:
                poller.paused.set()  # its queries would show in the profile
                try:
                    out["profile"] = self.profile(bars)
                finally:
                    poller.paused.clear()
        finally:
            poller.stop()
            self.mem.stored_fn = None
        out["count_check"] = self.drain(bars, "ingest")
        out["stored_after"] = self.stored_now()
        return out

    def half_load(self, bars: Bars, rate: float) -> dict[str, Any]:
        p = self.p
        gen = self.gen
        assert gen is not None
        spec = self.step("half-load", rate, p.clients, 3600)
        cpu = CpuMeter(self.pid)
        gen.start(spec)
        lat: list[float] = []
        failed = 0
        t0 = time.monotonic()
        try:
            time.sleep(min(2.0, p.half_min_s / 2))
            with bars.task("half load: freshness probes", p.freshness_probes) as tid:
                with httpx.Client(timeout=60) as c:
                    for i in range(p.freshness_probes):
                        v = self.probe_freshness(c)
                        if v is None:
                            failed += 1
                        else:
                            lat.append(v)
                        bars.progress.update(tid, completed=i + 1)
            rest = p.half_min_s - (time.monotonic() - t0)
            if rest > 0:
                bars.timed("half load: answer latency", rest, lambda: time.sleep(rest))
        finally:
            gen.stop()
            st = gen.collect()
        self.account(st)
        seconds = time.monotonic() - t0
        return {
            **cpu.cores(),
            "offered_events_per_s": rate,
            "accepted_events_per_s": st.events_sent / seconds,
            "latency_p50_s": pct(st.latencies_s, 0.5),
            "latency_p99_s": pct(st.latencies_s, 0.99),
            "requests": st.requests_ok,
            "error_rate": st.error_rate,
            "freshness": {
                "n": len(lat),
                "failed": failed,
                "p50_s": pct(lat, 0.5),
                "p95_s": pct(lat, 0.95),
                "p99_s": pct(lat, 0.99),
                "max_s": max(lat) if lat else None,
            },
        }

    def probe_freshness(self, c: httpx.Client) -> float | None:
        """One event acknowledged by the broker (wait=broker) -> seconds until a usage query sees
        it. None if it never shows up within 60 s."""
        t = self.tenants[0]
        cust = f"probe-{uuid.uuid4().hex[:10]}"
        now = datetime.now(UTC)
        hdr = {"Authorization": f"Bearer {t.key}"}
        r = c.post(
            self.urls[0] + "/v1/events",
            params={"wait": "broker"},
            headers=hdr,
            json=[
                {
                    "id": f"fresh-{self.run_id}-{uuid.uuid4().hex}",
                    "type": EVENT_TYPE,
                    "customer": cust,
                    "time": iso_ms(int(now.timestamp() * 1000)),
                    "properties": {
                        "endpoint": "/",
                        "region": "eu-west-1",
                        "tokens": 1,
                        "user": "u",
                    },
                }
            ],
        )
        if r.status_code >= 300:
            return None
        t_ack = time.perf_counter()
        self.probes += 1
        url, params = probe_query(self.urls[0], cust, now)
        while time.perf_counter() - t_ack < 60:
            q = c.get(url, params=params, headers=hdr)
            if q.status_code == 200 and any(
                float(row["value"] or 0) >= 1 for row in q.json()["data"]
            ):
                return time.perf_counter() - t_ack
            time.sleep(0.01)
        return None

    def profile(self, bars: Bars) -> dict[str, Any]:
        p = self.p
        gen = self.gen
        pid = self.pid
        assert gen is not None and pid is not None
        spec = self.step("profile", None, p.clients, p.profile_s + 4)
        cpu = CpuMeter(pid)
        gen.start(spec)
        try:
            time.sleep(1.5)
            rec, _ = profile.record(pid, p.profile_s, self.out)
            bars.timed(
                "py-spy profile of tally (all threads)",
                p.profile_s,
                lambda: rec.wait(p.profile_s + 60),
            )
        finally:
            st = gen.collect()
        self.account(st)
        summary = profile.finish(rec, 60)
        (self.out / "profile.txt").write_text(profile.render(summary))
        return {
            **cpu.cores(),
            "seconds": p.profile_s,
            "offered": "unthrottled",
            "clients": p.clients,
            "accepted_events_per_s": st.accepted_per_s,
            "summary": summary,
        }

    def queries_http(self, bars: Bars, label: str) -> dict[str, Any]:
        p = self.p
        total = len(queries.SHAPES) * (p.query_n + p.query_warmup)
        with bars.task(f"queries ({label})", total) as tid:
            return queries.time_http(
                self.urls[0],
                [t.key for t in self.tenants],
                p.query_n,
                p.query_warmup,
                p.customers,
                p.zipf_s,
                p.seed,
                bars.callback(tid),
                p.query_budget_s,
            )

    def burst(self, bars: Bars, label: str) -> dict[str, Any]:
        """Unthrottled ingest for burst_s at this stored volume: does the maximum move?"""
        p = self.p
        gen = self.gen
        assert gen is not None
        # Tenant-wide totals over a large store are not free: poll less often than in the ramp.
        poller = StoredPoller(self.totals(), max(p.poll_s, p.burst_s / 6)).start()
        self.mem.stored_fn = poller.latest
        try:
            before = self.stored_now()
            spec = self.step(f"burst {label}", None, p.clients, p.burst_s)
            cpu = CpuMeter(self.pid)
            st = bars.timed(f"ingest burst ({label})", p.burst_s, lambda: gen.run(spec))
            cores = cpu.cores()
            self.account(st)
            span = poller.step_span(st.window_start, st.ended)
        finally:
            poller.stop()
            self.mem.stored_fn = None
        return {
            **cores,
            "stored_before": before,
            "accepted_events_per_s": st.accepted_per_s,
            "stored_events_per_s": span.rate if span is not None else None,
            "stored_span_s": span.seconds if span is not None else None,
            "error_rate": st.error_rate,
            "latency_p50_s": pct(st.latencies_s, 0.5),
            "latency_p99_s": pct(st.latencies_s, 0.99),
        }

    def new_generator(self) -> None:
        """(Re)start the generator processes for the current tenants."""
        if self.gen is not None:
            self.gen.close()
        p = self.p
        self.gen = LoadGenerator(
            GenConfig(
                tenants=self.tenants,
                customers=p.customers,
                zipf_s=p.zipf_s,
                dup_rate=p.dup_rate,
                late_rate=p.late_rate,
                batch=p.batch,
                seed=p.seed,
                run_id=self.run_id,
            ),
            p.procs,
        )

    def volume_point(
        self, bars: Bars, target: int | None, label: str, burst: bool = True
    ) -> dict[str, Any]:
        """Bring the store to ``target`` events (history), then queries, memory and a burst."""
        p = self.p
        point: dict[str, Any] = {"label": label, "target_events": target}
        now_ms = int(time.time() * 1000)
        tenant_ids = [t.tenant_id for t in self.tenants]
        hist_spec = None
        if target is not None:
            if self.embedded:
                assert self.tally is not None
                with bars.task(f"stop tally ({label})", 1):
                    self.tally.stop()
                self.mem.pid = None
                store_url = f"chdb://{(self.data_dir / 'clickhouse').resolve()}"
                database = "tally"
                # the count `tally run` fixed for this data directory (runtime.roles)
                partitions = int((self.data_dir / PARTITIONS_FILE).read_text())
            else:
                assert self.remote is not None and self.remote.clickhouse_url
                store_url = self.remote.clickhouse_url
                database = self.remote.clickhouse_database
                partitions = self.remote.partitions
            hist_spec = history.HistorySpec(
                store_url=store_url,
                database=database,
                tenant_ids=tenant_ids,
                target_events=target,
                span_start_ms=now_ms - p.history_days * 86_400_000,
                span_end_ms=now_ms - 60_000,
                customers=p.customers,
                zipf_s=p.zipf_s,
                late_rate=p.late_rate,
                partitions=partitions,
                seed=p.seed + len(label),
                tag=f"{self.run_id}{label}",
                query_n=p.query_n if self.embedded else 0,
                query_warmup=p.query_warmup,
                query_budget_s=p.query_budget_s,
            )
            with bars.task(f"history to {target:,} events", 1) as tid:
                hist = run_job(history.write_history, hist_spec, progress=bars.callback(tid))
            self.baseline += hist["events_written"]
            point["history"] = {k: v for k, v in hist.items() if k != "direct_queries"}
            point["direct_queries"] = hist.get("direct_queries")
            if self.embedded:
                self.mem.phase = f"start {label}"
                point["start"] = self.start_tally(bars, label)
        self.mem.phase = f"volume {label}"
        point["stored_events"] = self.stored_now()
        self.mem.stored = point["stored_events"]
        point["queries"] = self.queries_http(bars, label)
        if burst and p.burst_s > 0:
            point["burst"] = self.burst(bars, label)
        self.mem.sample()
        peak_tally, peak_children = self.mem.peak(f"volume {label}")
        start_peak = self.mem.peak(f"start {label}")
        pid = self.pid
        point["memory"] = {
            "tally_peak_mb": max(peak_tally, start_peak[0]),
            "broker_peak_mb": max(peak_children, start_peak[1]),
            "tally_hwm_mb": peak_rss_mb(pid) if pid else None,
        }
        return point

    # --- the whole run -----------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        p = self.p
        started = datetime.now(UTC)
        res: dict[str, Any] = self.result
        res.update(report.meta(p, started, self.embedded, self.quick))
        self.out.mkdir(parents=True, exist_ok=True)
        self.mem.start()
        try:
            with Bars(self.console) as bars:
                res["ceilings"] = self.measure_ceilings(bars)
                res["setup"] = self.setup(bars, "ingest")
                self.new_generator()
                res["ingest"] = self.ingest(bars)
                ingest_mem = self.mem.peak("ingest")
                res["ingest"]["memory"] = {
                    "tally_peak_mb": ingest_mem[0],
                    "broker_peak_mb": ingest_mem[1],
                }
                volumes: list[dict[str, Any]] = [
                    self.volume_point(bars, None, "after ingest", burst=False)
                ]
                can_write = self.embedded or (
                    self.remote is not None and self.remote.clickhouse_url
                )
                if can_write and p.volumes:
                    if self.embedded:
                        # The volumes on a fresh store, so that they are exact whatever the
                        # ingest phase stored. The ingest server stops meanwhile.
                        old, old_dir = self.tally, self.data_dir
                        assert old is not None
                        stopping = threading.Thread(target=old.stop, name="stop-ingest-tally")
                        stopping.start()
                        try:
                            res["volume_setup"] = self.setup(bars, "volumes")
                        finally:
                            stopping.join()
                        shutil.rmtree(old_dir, ignore_errors=True)
                        self.new_generator()
                    for v in p.volumes:
                        volumes.append(self.volume_point(bars, v, human(v)))
                res["volumes"] = volumes
                res["count_check_final"] = self.drain(bars, "final")
                if self.embedded and self.tally is not None:
                    with bars.task("stop tally", 1):
                        res["stop_exit_code"] = self.tally.stop()
        finally:
            self.close()
        res["finished"] = datetime.now(UTC).isoformat()
        res["duration_s"] = (datetime.now(UTC) - started).total_seconds()
        res["memory_samples"] = [
            {
                "t": round(s.t - started.timestamp(), 2),
                "phase": s.phase,
                "stored": s.stored,
                "tally_mb": round(s.tally_mb, 1),
                "children_mb": round(s.children_mb, 1),
                "load1": round(s.load1, 2),
            }
            for s in self.mem.samples
        ]
        res["ratios"] = report.ratios(res)
        report.write(res, self.out)
        return res

    def close(self) -> None:
        self.mem.stop()
        if self.gen is not None:
            self.gen.close()
            self.gen = None
        if self.tally is not None:
            with contextlib.suppress(Exception):
                self.tally.stop(timeout=60)
        if not self.keep_data:
            shutil.rmtree(self.work, ignore_errors=True)


def stored_text(span: StoredSpan | None) -> str:
    """A step's stored rate for the log: 'n/a' when the polls measured none (never 0)."""
    if span is None:
        return "n/a"
    return f"{span.rate:,.0f}/s (over {span.seconds:.1f} s)"


def step_row(
    st: StepStats,
    offered: float | None,
    clients: int,
    span: StoredSpan | None,
    cpu: dict[str, float | None],
) -> dict[str, Any]:
    tally_cores = cpu.get("tally_cpu_cores")
    stored = span.rate if span is not None else None
    return {
        **cpu,
        "name": st.name,
        "offered_events_per_s": offered,
        "clients": clients,
        "seconds": st.seconds,
        "accepted_events_per_s": st.accepted_per_s,
        "stored_events_per_s": stored,
        # the samples the rate came from span this long (> seconds: the polls were slow)
        "stored_span_s": span.seconds if span is not None else None,
        # Per CPU-second the Tally process got: robust to other users of the machine.
        "stored_per_tally_cpu_s": stored / tally_cores if stored and tally_cores else None,
        "error_rate": st.error_rate,
        "errors": st.errors,
        "requests_ok": st.requests_ok,
        "latency_p50_s": pct(st.latencies_s, 0.5),
        "latency_p99_s": pct(st.latencies_s, 0.99),
        "latency_mean_s": statistics.fmean(st.latencies_s) if st.latencies_s else None,
        "generator_cpu_s": st.cpu_s,
    }


def human(n: int) -> str:
    if n >= 1_000_000 and n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    if n >= 1000 and n % 1000 == 0:
        return f"{n // 1000}k"
    return str(n)
