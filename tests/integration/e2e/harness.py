"""Test harness: real Tally processes, a client that retries, and an independent ground truth.

Nothing here imports Tally's own aggregation code: the expected values are computed from the
generated events with plain Python, so a bug in Tally cannot hide in the oracle.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx

ADMIN_TOKEN = "test-admin-token-0123456789"
REPO = Path(__file__).resolve().parents[3]


def tally_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
    env.update(
        TALLY_ADMIN_TOKEN=ADMIN_TOKEN,
        TALLY_LOG_LEVEL="WARNING",
        TALLY_BROKER_SESSION_TIMEOUT_S="10",
        # several `tally worker` processes share this machine: each takes a free metrics port
        TALLY_WORKER_METRICS_PORT="0",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


class TallyProcess:
    """`python -m runtime <args>` (the `tally` CLI) as a child process with its output in a log file."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.args = args
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> TallyProcess:
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "runtime", *self.args],
            env=self.env,
            cwd=REPO,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def terminate(self, timeout: float = 60) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return int(self.proc.returncode)

    def tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def start_embedded(
    data_dir: Path, log_path: Path, timeout: float = 90, **env: str
) -> tuple[TallyProcess, str]:
    """Start `tally run` on a free port (``env``: extra TALLY_* variables); return it and its
    URL once /healthz answers."""
    run_file = data_dir / "run.json"
    run_file.unlink(missing_ok=True)
    proc = TallyProcess(
        ["run", "--data-dir", str(data_dir), "--port", "0"], tally_env(**env), log_path
    ).start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise AssertionError(f"tally run exited early:\n{proc.tail()}")
        if run_file.exists():
            try:
                info = json.loads(run_file.read_text())
                if info.get("pid") == proc.proc.pid:  # type: ignore[union-attr]
                    url = info["url"]
                    if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                        return proc, url
            except (ValueError, httpx.HTTPError):
                pass
        time.sleep(0.2)
    proc.kill9()
    raise AssertionError(f"tally run did not come up in {timeout}s:\n{proc.tail()}")


def child_pids(pid: int) -> list[int]:
    """The direct children of a process (all its threads'), from /proc."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(x) for x in (task / "children").read_text().split()]
        except OSError:
            pass
    return sorted(set(out))


def cmdline(pid: int) -> str:
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return ""


def broker_pids(pid: int) -> list[int]:
    """The embedded broker children (Tansu) of a `tally run`."""
    return [c for c in child_pids(pid) if "tansu" in cmdline(c)]


def api_pids(pid: int) -> list[int]:
    """The API children of a `tally run` in split mode."""
    return [c for c in child_pids(pid) if "runtime.split" in cmdline(c)]


def rss_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM = peak RSS) of a process in kB, from /proc."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        fields[k] = v.strip()
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def wait_http(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} did not answer /healthz in {timeout}s")


def create_tenant(url: str, name: str) -> str:
    r = httpx.post(
        url + "/v1/admin/tenants",
        json={"name": name},
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        timeout=30,
    )
    assert r.status_code in (200, 201), r.text
    return str(r.json()["api_key"])


METERS: list[dict[str, Any]] = [
    {"slug": "calls", "event_type": "api.call", "aggregation": "count"},
    {"slug": "bytes", "event_type": "api.call", "aggregation": "sum", "value_property": "$.bytes"},
    {
        "slug": "bytes-min",
        "event_type": "api.call",
        "aggregation": "min",
        "value_property": "$.bytes",
    },
    {
        "slug": "bytes-max",
        "event_type": "api.call",
        "aggregation": "max",
        "value_property": "$.bytes",
    },
    {
        "slug": "bytes-avg",
        "event_type": "api.call",
        "aggregation": "avg",
        "value_property": "$.bytes",
    },
    {
        "slug": "users",
        "event_type": "api.call",
        "aggregation": "unique_count",
        "value_property": "$.user",
    },
    {
        "slug": "last-bytes",
        "event_type": "api.call",
        "aggregation": "latest",
        "value_property": "$.bytes",
    },
    {
        "slug": "bytes-by-region",
        "event_type": "api.call",
        "aggregation": "sum",
        "value_property": "$.bytes",
        "group_by": {"region": "$.region"},
    },
    {
        "slug": "eu-calls",
        "event_type": "api.call",
        "aggregation": "count",
        "filters": [{"property": "$.region", "op": "eq", "value": "eu"}],
    },
]


def create_meters(url: str, key: str) -> None:
    for m in METERS:
        r = httpx.post(
            url + "/v1/meters", json=m, headers={"Authorization": f"Bearer {key}"}, timeout=30
        )
        assert r.status_code in (200, 201), r.text


@dataclass
class Workload:
    """Generated events (with duplicates and late ones) and their ground truth."""

    seed: int
    n_unique: int
    customers: int = 7
    now: datetime = field(default_factory=lambda: datetime.now(UTC))
    events: list[dict[str, Any]] = field(default_factory=list)  # what is sent, incl. duplicates
    unique: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> first copy

    def generate(self, dup_rate: float = 0.15, late_rate: float = 0.05) -> Workload:
        rnd = random.Random(self.seed)
        base = self.now.replace(second=0, microsecond=0) - timedelta(hours=2)
        for i in range(self.n_unique):
            if rnd.random() < late_rate:
                t = self.now - timedelta(days=rnd.uniform(1, 20))
            else:
                t = base + timedelta(milliseconds=rnd.randrange(0, 2 * 3600 * 1000))
            ev = {
                "id": f"ev-{self.seed}-{i}",
                "type": "api.call",
                "customer": f"cust-{rnd.randrange(self.customers)}",
                "time": t.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                "properties": {
                    "bytes": rnd.choice([rnd.randrange(1, 5000), f"{rnd.randrange(1, 10**6)}.125"]),
                    "region": rnd.choice(["eu", "us", "ap"]),
                    "user": f"u{rnd.randrange(40)}",
                },
            }
            self.unique[ev["id"]] = ev
            self.events.append(ev)
            if rnd.random() < dup_rate:  # an exact duplicate, sent later
                self.events.insert(rnd.randrange(len(self.events) + 1), dict(ev))
        return self

    @property
    def window(self) -> tuple[str, str]:
        start = (self.now - timedelta(days=30)).replace(second=0, microsecond=0)
        end = (self.now + timedelta(minutes=10)).replace(second=0, microsecond=0)
        fmt = "%Y-%m-%dT%H:%M:%SZ"
        return start.strftime(fmt), end.strftime(fmt)

    def truth(self) -> dict[str, dict[str, Decimal | None]]:
        """meter slug -> customer (or customer|region) -> expected value."""
        per: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for ev in self.unique.values():
            per[ev["customer"]].append(ev)
        out: dict[str, dict[str, Decimal | None]] = defaultdict(dict)
        for cust, evs in per.items():
            vals = [Decimal(str(e["properties"]["bytes"])) for e in evs]
            out["calls"][cust] = Decimal(len(evs))
            out["bytes"][cust] = sum(vals, Decimal(0))
            out["bytes-min"][cust] = min(vals)
            out["bytes-max"][cust] = max(vals)
            out["bytes-avg"][cust] = sum(vals, Decimal(0)) / len(vals)
            out["users"][cust] = Decimal(len({e["properties"]["user"] for e in evs}))
            last = max(evs, key=lambda e: (e["time"], e["id"]))
            out["last-bytes"][cust] = Decimal(str(last["properties"]["bytes"]))
            out["eu-calls"][cust] = Decimal(
                sum(1 for e in evs if e["properties"]["region"] == "eu")
            )
            for region in ("eu", "us", "ap"):
                rv = [
                    Decimal(str(e["properties"]["bytes"]))
                    for e in evs
                    if e["properties"]["region"] == region
                ]
                if rv:
                    out["bytes-by-region"][f"{cust}|{region}"] = sum(rv, Decimal(0))
        return out


def query_all(url: str, key: str, wl: Workload) -> dict[str, dict[str, Decimal | None]]:
    """What Tally answers, in the shape of Workload.truth()."""
    frm, to = wl.window
    got: dict[str, dict[str, Decimal | None]] = defaultdict(dict)
    for m in METERS:
        params: list[tuple[str, str]] = [("from", frm), ("to", to), ("group_by", "customer")]
        if m["slug"] == "bytes-by-region":
            params.append(("group_by", "region"))
        r = httpx.get(
            f"{url}/v1/meters/{m['slug']}/usage",
            params=params,
            headers={"Authorization": f"Bearer {key}"},
            timeout=30,
        )
        assert r.status_code == 200, r.text
        for row in r.json()["data"]:
            cust = row["group_by"]["customer"] if "customer" in row["group_by"] else row["customer"]
            k = f"{cust}|{row['group_by']['region']}" if m["slug"] == "bytes-by-region" else cust
            got[m["slug"]][k] = None if row["value"] is None else Decimal(str(row["value"]))
    return got


def assert_matches(
    got: dict[str, dict[str, Decimal | None]], want: dict[str, dict[str, Decimal | None]]
) -> None:
    problems = []
    for slug, exp in want.items():
        for k, v in exp.items():
            g = got.get(slug, {}).get(k)
            if slug == "bytes-avg" and g is not None and v is not None:
                ok = abs(g - v) <= Decimal("1e-6") * max(Decimal(1), abs(v))
            else:
                ok = g == v
            if not ok:
                problems.append(f"{slug}[{k}]: got {g}, want {v}")
        extra = set(got.get(slug, {})) - set(exp)
        problems += [f"{slug}[{k}]: unexpected {got[slug][k]}" for k in extra]
    assert not problems, "\n".join(problems[:40]) + f"\n({len(problems)} mismatches)"


class RetryingClient:
    """Sends batches until each is acknowledged (2xx); retries connection errors and 5xx."""

    def __init__(self, key: str, url_fn: Any, wait: str | None = None) -> None:
        self.key = key
        self.url_fn = url_fn
        self.wait = wait
        self.attempts = 0
        self.failures = 0

    def send(self, batch: list[dict[str, Any]], deadline_s: float = 180) -> None:
        deadline = time.monotonic() + deadline_s
        params = {"wait": self.wait} if self.wait else None
        while True:
            self.attempts += 1
            try:
                r = httpx.post(
                    self.url_fn() + "/v1/events",
                    json=batch,
                    params=params,
                    headers={"Authorization": f"Bearer {self.key}"},
                    timeout=30,
                )
                if r.status_code < 300:
                    body = r.json() if r.content else {}
                    assert not body.get("rejected"), body
                    return
                assert r.status_code >= 500, f"{r.status_code}: {r.text}"
            except (httpx.HTTPError, OSError):
                pass
            self.failures += 1
            if time.monotonic() > deadline:
                raise AssertionError("a batch was never acknowledged")
            time.sleep(0.3)


class BackgroundSender:
    """Sends ``batches`` in order from a thread, each until acknowledged (``RetryingClient``), so
    a test can break things while a client keeps going."""

    def __init__(
        self, client: RetryingClient, batches: list[list[dict[str, Any]]], deadline_s: float = 240
    ) -> None:
        self.client = client
        self.batches = batches
        self.deadline_s = deadline_s
        self.sent = 0
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for b in self.batches:
                self.client.send(b, deadline_s=self.deadline_s)
                self.sent += 1
        except BaseException as exc:
            self.errors.append(exc)

    def wait_sent(self, n: int) -> None:
        """Until ``n`` batches are acknowledged (or the sender stopped)."""
        while self.sent < n and self.thread.is_alive():
            time.sleep(0.05)

    def finish(self, timeout: float = 600) -> None:
        """Every batch acknowledged, none given up on."""
        self.thread.join(timeout)
        assert not self.errors, self.errors
        assert not self.thread.is_alive()


def wait_log(proc: TallyProcess, needle: str, count: int = 1, timeout: float = 120) -> None:
    """Until ``needle`` stands ``count`` times in the process's log; the process must stay up."""
    deadline = time.monotonic() + timeout
    while proc.log_path.read_text(errors="replace").count(needle) < count:
        assert proc.alive(), proc.tail()
        assert time.monotonic() < deadline, proc.tail()
        time.sleep(0.2)
