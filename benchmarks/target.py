"""The system under test: embedded ``tally run`` started by the harness, or a running deployment.

Also: tenant and meter set-up over the public API, the usage totals that tell how much is stored,
and a sampler of the resident memory of the Tally process and its children (``/proc``).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from benchmarks.loadgen import Tenant
from benchmarks.workload import COUNT_METER, METERS

REPO = Path(__file__).resolve().parents[1]


class BenchError(RuntimeError):
    """The benchmark cannot go on (the message says why)."""


def minute_floor(dt: datetime) -> datetime:
    return dt.replace(second=0, microsecond=0)


def fmt(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def probe_query(url: str, customer: str, now: datetime) -> tuple[str, dict[str, str]]:
    """The freshness probe's usage query: (URL, params) of one customer's count over the hour
    before and after ``now`` (``benchmarks.run``; ``benchmarks.modes --poll`` asks the same)."""
    params = {
        "customer": customer,
        "from": fmt(minute_floor(now - timedelta(hours=1))),
        "to": fmt(minute_floor(now + timedelta(hours=1))),
    }
    return f"{url}/v1/meters/{COUNT_METER}/usage", params


def tally_env(admin_token: str) -> dict[str, str]:
    """The environment of a benchmarked `tally run`: the caller's, minus any TALLY_ setting (the
    benchmark measures the defaults), plus a known admin token."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
    env.update(TALLY_ADMIN_TOKEN=admin_token, TALLY_LOG_LEVEL="WARNING", PYTHONUNBUFFERED="1")
    return env


class EmbeddedTally:
    """`python -m runtime run --data-dir DIR --port 0` as a child process."""

    def __init__(self, data_dir: Path, log_path: Path, admin_token: str | None = None) -> None:
        self.data_dir = data_dir
        self.log_path = log_path
        self.admin_token = admin_token or secrets.token_hex(16)
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self._log: Any = None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise BenchError("tally run is not started")
        return int(self.proc.pid)

    def start(self, timeout: float = 600) -> float:
        """Start and wait until /healthz answers; returns the seconds it took."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        run_file = self.data_dir / "run.json"
        run_file.unlink(missing_ok=True)
        self._log = open(self.log_path, "ab")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "runtime",
                "run",
                "--data-dir",
                str(self.data_dir),
                "--port",
                "0",
            ],
            env=tally_env(self.admin_token),
            cwd=REPO,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        deadline = t0 + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(
                    f"tally run exited early (code {self.proc.returncode}):\n{self.tail()}"
                )
            with contextlib.suppress(ValueError, OSError, httpx.HTTPError):
                info = json.loads(run_file.read_text())
                if info.get("pid") == self.proc.pid:
                    url = str(info["url"])
                    if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                        self.url = url
                        return time.monotonic() - t0
            time.sleep(0.1)
        self.kill()
        raise BenchError(f"tally run did not come up in {timeout:.0f}s:\n{self.tail()}")

    def stop(self, timeout: float = 120) -> int:
        """Graceful stop (SIGTERM: drain, final flush), kill after ``timeout``."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        if self._log is not None:
            self._log.close()
            self._log = None
        code = int(self.proc.returncode if self.proc.returncode is not None else -9)
        self.proc = None
        return code

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


# --- set-up over the public API -----------------------------------------------------------------


def create_tenants(url: str, admin_token: str, n: int, prefix: str) -> list[Tenant]:
    out = []
    for i in range(n):
        r = httpx.post(
            url + "/v1/admin/tenants",
            json={"name": f"{prefix}-{i}"},
            headers={"Authorization": f"Bearer {admin_token}"},
            timeout=60,
        )
        if r.status_code not in (200, 201):
            raise BenchError(f"creating a tenant failed: {r.status_code} {r.text[:300]}")
        body = r.json()
        out.append(Tenant(tenant_id=str(body["tenant_id"]), key=str(body["api_key"])))
    return out


def tenant_of_key(key: str) -> str:
    """Tally keys look like ``tly_<tenant_id>_<secret>``."""
    parts = key.split("_")
    if len(parts) < 3 or parts[0] != "tly":
        raise BenchError("--key must be a Tally API key (tly_<tenant>_<secret>)")
    return "_".join(parts[1:-1])


def ensure_meters(url: str, key: str) -> None:
    """Create the workload's meters; an existing meter must have the same definition."""
    headers = {"Authorization": f"Bearer {key}"}
    for m in METERS:
        r = httpx.post(url + "/v1/meters", json=m, headers=headers, timeout=60)
        if r.status_code in (200, 201):
            continue
        if r.status_code == 409:
            got = httpx.get(url + f"/v1/meters/{m['slug']}", headers=headers, timeout=60)
            got.raise_for_status()
            have = got.json()
            for k, v in m.items():
                if str(have.get(k, "")).lower() != str(v).lower():
                    raise BenchError(
                        f"meter {m['slug']!r} exists with {k}={have.get(k)!r}, the benchmark "
                        f"needs {v!r}: use a fresh tenant"
                    )
            continue
        raise BenchError(f"creating meter {m['slug']} failed: {r.status_code} {r.text[:300]}")


@dataclass
class Totals:
    """How many events are stored (visible to usage queries), summed over the tenants."""

    url: str
    tenants: list[Tenant]
    frm: str = ""
    to: str = ""

    def __post_init__(self) -> None:
        now = datetime.now(UTC)
        # Wide enough for late events and for written history; `to` is a whole minute.
        self.frm = fmt(minute_floor(now - timedelta(days=40)))
        self.to = fmt(minute_floor(now + timedelta(days=2)))

    def read(self, client: httpx.Client) -> int:
        total = 0
        for t in self.tenants:
            r = client.get(
                f"{self.url}/v1/meters/{COUNT_METER}/usage",
                params={"from": self.frm, "to": self.to},
                headers={"Authorization": f"Bearer {t.key}"},
                timeout=60,
            )
            if r.status_code != 200:
                raise BenchError(f"usage query failed: {r.status_code} {r.text[:300]}")
            total += sum(int(float(row["value"] or 0)) for row in r.json()["data"])
        return total


@dataclass(frozen=True)
class StoredSpan:
    """Two samples (wall time, stored total) of a ``StoredPoller``: a measured stored rate."""

    first: tuple[float, int]
    last: tuple[float, int]

    @property
    def seconds(self) -> float:
        return self.last[0] - self.first[0]

    @property
    def rate(self) -> float:
        return (self.last[1] - self.first[1]) / self.seconds


class StoredPoller:
    """Background thread: the stored total every ``interval`` seconds, as (wall time, total)."""

    def __init__(self, totals: Totals, interval: float = 1.0) -> None:
        self.totals = totals
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self.errors = 0
        self._stop = threading.Event()
        self.paused = threading.Event()  # set: no queries (e.g. while the server is profiled)
        self._thread = threading.Thread(target=self._run, name="stored-poller", daemon=True)
        self._lock = threading.Lock()

    def start(self) -> StoredPoller:
        self._thread.start()
        return self

    def _run(self) -> None:
        with httpx.Client() as client:
            while not self._stop.is_set():
                if self.paused.is_set():
                    self._stop.wait(self.interval)
                    continue
                try:
                    value = self.totals.read(client)
                    with self._lock:
                        self.samples.append((time.time(), value))
                except (httpx.HTTPError, BenchError):
                    self.errors += 1
                self._stop.wait(self.interval)

    def latest(self) -> int:
        with self._lock:
            return self.samples[-1][1] if self.samples else 0

    def span(self, t0: float, t1: float) -> StoredSpan | None:
        """The outermost two samples inside [t0, t1], or None if there are fewer than two."""
        with self._lock:
            inside = [s for s in self.samples if t0 <= s[0] <= t1]
        if len(inside) < 2 or inside[-1][0] - inside[0][0] <= 0:
            return None
        return StoredSpan(inside[0], inside[-1])

    def step_span(self, t0: float, t1: float, wait_s: float | None = None) -> StoredSpan | None:
        """The stored rate of a load step [t0, t1]: ``span(t0, t1)``, or -- when each poll took
        so long that fewer than two fell inside the step (a loaded machine) -- the span from
        the last sample at or before t0 (else the first inside) to the first one at or after
        t1, waiting up to ``wait_s`` for that one (default: 10 s + 5 poll intervals). Such a
        span is wider than the step (see ``StoredSpan.seconds``); None if even that is not
        there."""
        span = self.span(t0, t1)
        if span is not None:
            return span
        deadline = time.time() + (10.0 + 5 * self.interval if wait_s is None else wait_s)
        while True:
            with self._lock:
                samples = list(self.samples)
            before = [s for s in samples if s[0] <= t0]
            later = [s for s in samples if s[0] >= t0]
            start = before[-1] if before else (later[0] if later else None)
            end = next((s for s in samples if s[0] >= t1), None)
            if start is not None and end is not None and end[0] > start[0]:
                return StoredSpan(start, end)
            if time.time() >= deadline or self._stop.is_set():
                return None
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


# --- memory ---------------------------------------------------------------------------------------


def _status_kb(pid: int, field_name: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(x) for x in f.read().split()]
    return out


def _is_broker(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"tansu" in f.read()
    except OSError:
        return False


def tally_pids(pid: int) -> list[int]:
    """The processes of a `tally run`: the main one and its Python children (the API process of
    the default split mode), without the embedded broker."""
    return [pid] + [c for c in children(pid) if not _is_broker(c)]


def broker_pids(pid: int) -> list[int]:
    """The embedded broker (Tansu) children of a `tally run`."""
    return [c for c in children(pid) if _is_broker(c)]


def rss_mb(pid: int) -> float | None:
    kb = _status_kb(pid, "VmRSS")
    return None if kb is None else kb / 1024


def peak_rss_mb(pid: int) -> float | None:
    """VmHWM: the peak resident set of the process since it started."""
    kb = _status_kb(pid, "VmHWM")
    return None if kb is None else kb / 1024


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat_cpu_s(path: str) -> float | None:
    """User + system CPU seconds from a ``/proc`` ``stat`` file (a process's or a thread's)."""
    try:
        with open(path) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK
    except (OSError, ValueError, IndexError):
        return None


def cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system, all threads) the process has used so far."""
    return _stat_cpu_s(f"/proc/{pid}/stat")


# Threads of the embedded store (chDB) that run its background merges; the others it starts
# (inserts, queries, schedules: ``ThreadPool``, ``QueryPipelineEx``, ``BgSchPool``, ...) and
# librdkafka's (``rdk:*``) count as "native".
MERGE_THREAD_PREFIX = "MergeMutate"


def thread_cpu_s(pid: int) -> dict[int, tuple[str, float]]:
    """Each thread of a process (its id; the main thread's is ``pid``): its name (``comm``) and
    the CPU seconds it has used so far. Empty if the process is gone."""
    out: dict[int, tuple[str, float]] = {}
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{task}/comm") as f:
                    name = f.read().strip()
            except OSError:
                continue  # the thread ended meanwhile
            used = _stat_cpu_s(f"/proc/{pid}/task/{task}/stat")
            if used is not None:
                out[int(task)] = (name, used)
    return out


def thread_group(name: str, process: str) -> str:
    """``python`` for the interpreter's threads (they keep the process's name: Tally names its
    Python threads only inside Python), ``merges`` for the store's merge threads, ``native`` for
    every other thread a library started."""
    if name == process:
        return "python"
    if name.startswith(MERGE_THREAD_PREFIX):
        return "merges"
    return "native"


def split_cores(
    before: dict[int, tuple[str, float]],
    after: dict[int, tuple[str, float]],
    process: str,
    seconds: float,
) -> dict[str, float]:
    """Cores of each thread group (``thread_group``) between two ``thread_cpu_s`` readings. A
    thread that started meanwhile counts from 0; one that ended is left out (it undercounts,
    never overcounts)."""
    used = {"python": 0.0, "merges": 0.0, "native": 0.0}
    for tid, (name, cpu) in after.items():
        start = before.get(tid)
        used[thread_group(name, process)] += cpu - (start[1] if start else 0.0)
    return {k: max(v, 0.0) / max(seconds, 1e-9) for k, v in used.items()}


def machine_busy_s() -> float:
    """Non-idle CPU seconds of the whole machine (all cores) since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
    return (sum(vals[:8]) - idle) / _TICK


@dataclass
class CpuMeter:
    """CPU used by a process, its children and the whole machine over an interval, in cores;
    the main process's split into its Python threads, the store's merges and other native
    threads (``split_cores``)."""

    pid: int | None
    t0: float = 0.0
    own0: float | None = None
    kids0: float = 0.0
    machine0: float = 0.0
    threads0: dict[int, tuple[str, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.t0 = time.monotonic()
        self.machine0 = machine_busy_s()
        if self.pid is not None:
            self.own0 = self._own()
            self.kids0 = sum(cpu_s(c) or 0.0 for c in broker_pids(self.pid))
            self.threads0 = thread_cpu_s(self.pid)

    def _own(self) -> float | None:
        # every Tally process (split mode: the API child too); a child restarted meanwhile
        # starts again from 0, which undercounts, never overcounts
        assert self.pid is not None
        main = cpu_s(self.pid)
        if main is None:
            return None
        return main + sum(cpu_s(c) or 0.0 for c in tally_pids(self.pid)[1:])

    def cores(self) -> dict[str, float | None]:
        dt = max(time.monotonic() - self.t0, 1e-9)
        out: dict[str, float | None] = {
            "machine_busy_cores": (machine_busy_s() - self.machine0) / dt,
            "tally_cpu_cores": None,
            "broker_cpu_cores": None,
        }
        if self.pid is not None and self.own0 is not None:
            own = self._own()
            if own is not None:
                out["tally_cpu_cores"] = (own - self.own0) / dt
                kids = sum(cpu_s(c) or 0.0 for c in broker_pids(self.pid))
                out["broker_cpu_cores"] = (kids - self.kids0) / dt
                after = thread_cpu_s(self.pid)
                if self.pid in after:  # the main thread bears the process's name
                    split = split_cores(self.threads0, after, after[self.pid][0], dt)
                    out["main_python_cores"] = split["python"]
                    out["main_merge_cores"] = split["merges"]
                    out["main_native_cores"] = split["native"]
        return out


@dataclass
class MemSample:
    t: float
    phase: str
    stored: int
    tally_mb: float
    children_mb: float
    load1: float  # the machine's 1-minute load average (other users of the machine show here)


@dataclass
class MemorySampler:
    """Samples the RSS of ``pid`` (the Tally processes: the main one and, in split mode, its API
    child) and of its broker child."""

    interval: float = 0.5
    samples: list[MemSample] = field(default_factory=list)
    pid: int | None = None
    phase: str = ""
    stored: int = 0
    stored_fn: Callable[[], int] | None = None  # the stored total, when a poller knows it
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> MemorySampler:
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def sample(self) -> None:
        pid = self.pid
        if pid is None:
            return
        own = rss_mb(pid)
        if own is None:
            return
        own += sum(rss_mb(c) or 0.0 for c in tally_pids(pid)[1:])
        kids = sum(rss_mb(c) or 0.0 for c in broker_pids(pid))
        fn = self.stored_fn
        stored = fn() if fn is not None else self.stored
        load1 = os.getloadavg()[0]
        self.samples.append(MemSample(time.time(), self.phase, stored, own, kids, load1))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def peak(self, phase: str) -> tuple[float, float]:
        s = [x for x in self.samples if x.phase == phase]
        if not s:
            return 0.0, 0.0
        return max(x.tally_mb for x in s), max(x.children_mb for x in s)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
