"""A real Prometheus (Debian's `prometheus` package, installed by `make tools`) scrapes a real
`tally run` while events flow.

- the stored-events rate Prometheus computes is positive;
- every PromQL expression of the alert rules and of the Grafana dashboard parses (promtool, and
  a query of each against the real Prometheus) and names only metrics Tally exports (compared
  with a scrape of the running Tally after ingest);
- the counters agree with a ground truth: N events with D duplicates (in a request and across
  requests) and R invalid ones -> accepted/duplicate_in_request/rejected at the API,
  consumed/duplicate/stored at the worker, per tenant;
- `TALLY_LOG_FORMAT=json` + `TALLY_ACCESS_LOG=true`: one JSON object per line, the request's id
  (``X-Request-ID`` echoed) and tenant and its counts on the access line.

A missing prometheus/promtool binary FAILS (run `make tools`), it never skips.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from runtime.broker import free_port
from tests.integration.e2e.harness import REPO, TallyProcess, create_tenant, start_embedded

DEPLOY = REPO / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "tally.json"
# Grafana's variables, replaced as Grafana would before sending a query
GRAFANA_VARS = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}
# names in expressions that are PromQL, not metrics
PROMQL_WORDS = {
    "sum", "min", "max", "avg", "count", "rate", "irate", "increase", "deriv", "delta", "by",
    "without", "and", "or", "unless", "topk", "bottomk", "absent", "histogram_quantile", "on",
    "ignoring", "group_left", "group_right", "le", "offset", "bool",
}  # fmt: skip


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"`{name}` is not installed: run `make tools` (it installs Debian's prometheus "
            "package, which provides prometheus and promtool)"
        )
    return path


# --- the running parts ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tally(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TallyProcess, str, Path]]:
    tmp = tmp_path_factory.mktemp("tally")
    log_path = tmp / "tally.log"
    proc, url = start_embedded(
        tmp / "data",
        log_path,
        TALLY_WORKER_HEARTBEAT_S="1",
        TALLY_LOG_FORMAT="json",
        TALLY_ACCESS_LOG="true",
        TALLY_LOG_LEVEL="INFO",
    )
    try:
        yield proc, url, log_path
    finally:
        assert proc.terminate() == 0, proc.tail()


@pytest.fixture(scope="module")
def prometheus(
    tally: tuple[TallyProcess, str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    exe = binary("prometheus")
    tmp = tmp_path_factory.mktemp("prometheus")
    target = tally[1].removeprefix("http://")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [
            {
                "job_name": "tally",
                "metrics_path": "/metrics",
                "static_configs": [{"targets": [target]}],
            }
        ],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = open(tmp / "prometheus.log", "wb")
    proc = subprocess.Popen(
        [
            exe,
            f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp / "prometheus.log").read_text()
            try:
                if httpx.get(url + "/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "prometheus did not get ready"
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


def query(prom: str, expr: str) -> list[dict[str, Any]]:
    r = httpx.get(prom + "/api/v1/query", params={"query": expr}, timeout=30)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", (expr, body)
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def scalar(prom: str, expr: str) -> float | None:
    result = query(prom, expr)
    return float(result[0]["value"][1]) if result else None


def samples(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Tally's /metrics as {(name, labels): value}."""
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$", line)
        assert m, line
        labels = frozenset(
            re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', m.group(3) or "")
        )
        out[(m.group(1), labels)] = float(m.group(4))
    return out


def value(
    s: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return s.get((name, frozenset(labels.items())), 0.0)


def post(url: str, key: str, batch: list[dict[str, Any]], **headers: str) -> httpx.Response:
    return httpx.post(
        url + "/v1/events",
        json=batch,
        headers={"Authorization": f"Bearer {key}", **headers},
        timeout=60,
    )


def event(eid: str, t: str = "2026-01-01T00:00:00.000Z") -> dict[str, Any]:
    return {"id": eid, "type": "api.call", "customer": "c1", "time": t, "properties": {"n": 1}}


def now_iso() -> str:
    from datetime import UTC, datetime

    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --- the tests ------------------------------------------------------------------------------


def test_counters_agree_with_ground_truth(tally: tuple[TallyProcess, str, Path]) -> None:
    _proc, url, _log = tally
    key = create_tenant(url, "truth")
    tenant = key.split("_")[1]
    rnd = random.Random(8)
    t = now_iso()
    unique = [f"g-{i}" for i in range(900)]
    sent_total = dup_in_request = 0
    accepted = 0
    stored_ids: set[str] = set()
    before = samples(url)
    for start in range(0, len(unique), 100):
        ids = unique[start : start + 100]
        batch = [event(i, t) for i in ids]
        # duplicates in the request, and copies of ids sent by earlier requests
        batch += [event(rnd.choice(ids), t) for _ in range(rnd.randrange(0, 15))]
        if stored_ids:
            batch += [event(e, t) for e in rnd.sample(sorted(stored_ids), 10)]
        rnd.shuffle(batch)
        r = post(url, key, batch)  # wait=stored (embedded default): stored when answered
        assert r.status_code == 202, r.text
        distinct = len({e["id"] for e in batch})
        sent_total += len(batch)
        dup_in_request += len(batch) - distinct
        accepted += distinct
        stored_ids.update(ids)
    # invalid events: a missing customer (x3), an unknown field (x2); valid neighbours accepted
    bad = [{"id": "b1", "type": "api.call", "time": t}] * 3 + [
        {**event("b2", t), "costumer": "x"}
    ] * 2
    r = post(url, key, [event("g-0", t), *bad])
    assert r.status_code == 200 and len(r.json()["rejected"]) == 5, r.text
    sent_total += 1
    accepted += 1
    n_valid = sent_total
    duplicates = n_valid - len(unique)
    after = samples(url)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    ingest = "tally_ingest_events_total"
    assert delta(ingest, source="native", outcome="accepted") == accepted
    assert delta(ingest, source="native", outcome="duplicate_in_request") == dup_in_request
    assert delta(ingest, source="native", outcome="rejected") == 5
    assert delta("tally_ingest_rejected_events_total", source="native", reason="customer") == 3
    assert delta("tally_ingest_rejected_events_total", source="native", reason="unknown_field") == 2
    worker = "tally_worker_events_total"
    assert delta(worker, outcome="consumed") == n_valid
    assert delta(worker, outcome="duplicate") == duplicates
    assert delta(worker, outcome="stored") == n_valid - duplicates == len(unique)
    assert delta(worker, outcome="poison") == 0
    assert delta("tally_tenant_events_total", tenant=tenant) == accepted
    assert delta("tally_worker_flush_rows_total", table="events") >= len(unique)
    assert value(after, "tally_producer_queue_events") == 0
    assert delta("tally_producer_delivery_seconds_count") >= 10


def test_real_prometheus_sees_events_stored_while_they_flow(
    tally: tuple[TallyProcess, str, Path], prometheus: str, record_property: Any
) -> None:
    _proc, url, _log = tally
    key = create_tenant(url, "flow")
    stop = threading.Event()
    errors: list[str] = []

    def send() -> None:
        n = 0
        t = now_iso()
        while not stop.is_set():
            batch = [event(f"flow-{n + i}", t) for i in range(200)]
            n += 200
            try:
                r = post(url, key, batch)
                if r.status_code != 202:
                    errors.append(r.text)
            except httpx.HTTPError as exc:
                errors.append(repr(exc))

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        expr = 'sum(rate(tally_worker_events_total{outcome="stored"}[10s]))'
        deadline = time.monotonic() + 120
        rate = None
        while time.monotonic() < deadline:
            rate = scalar(prometheus, expr)
            if rate is not None and rate > 0:
                break
            time.sleep(1)
        assert rate is not None and rate > 0, f"{expr} = {rate}"
        time.sleep(12)  # a full window of steady flow
        rate = scalar(prometheus, expr)
        assert rate is not None and rate > 0, f"{expr} = {rate}"
        record_property("stored_rate_events_per_s", rate)
        print(f"\nPrometheus: {expr} = {rate:.1f} events/s")
        assert scalar(prometheus, 'up{job="tally"}') == 1
        accepted = scalar(
            prometheus, 'sum(rate(tally_ingest_events_total{outcome="accepted"}[10s]))'
        )
        assert accepted is not None and accepted > 0
    finally:
        stop.set()
        sender.join(60)
    assert not errors, errors[:3]


def _dashboard_exprs() -> list[tuple[str, str]]:
    doc = json.loads(DASHBOARD.read_text())
    out = []
    for panel in doc["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for var, val in GRAFANA_VARS.items():
                expr = expr.replace(var, val)
            assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
            out.append((f"dashboard: {panel['title']}", expr))
    return out


def _alert_exprs() -> list[tuple[str, str]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [
        (f"alert: {rule['alert']}", rule["expr"])
        for group in doc["groups"]
        for rule in group["rules"]
    ]


def _metric_names(expr: str) -> set[str]:
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values are not names
    expr = re.sub(r"\{[^}]*\}", "", expr)  # nor label names
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # nor ranges
    # nor the label names of groupings: by (...), without (...), on (...), group_left (...)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    words = set(re.findall(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*\b", expr))
    return {w for w in words if w not in PROMQL_WORDS and not w.replace("_", "").isdigit()}


def test_every_dashboard_and_alert_expression_is_valid_and_names_exported_metrics(
    tally: tuple[TallyProcess, str, Path], prometheus: str
) -> None:
    _proc, url, _log = tally
    check = subprocess.run(
        [binary("promtool"), "check", "rules", str(ALERTS)], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 8 rules found" in check.stdout, check.stdout
    # what Tally exports once events went through and a usage query ran
    key = create_tenant(url, "names")
    assert post(url, key, [event("n1", now_iso()), {"id": "bad"}]).status_code == 200
    r = httpx.post(
        url + "/v1/meters",
        json={"slug": "calls", "event_type": "api.call", "aggregation": "count"},
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )
    assert r.status_code == 201, r.text
    r = httpx.get(
        url + "/v1/meters/calls/usage",
        params={"from": "2026-01-01T00:00:00Z", "to": "2026-01-02T00:00:00Z"},
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    exported = {name for name, _labels in samples(url)}
    assert _metric_names(
        'histogram_quantile(0.99, sum by (le, api) (rate(x_bucket{a="b_c"}[5m]))) / on (k) y'
    ) == {"x_bucket", "y"}
    exprs = _dashboard_exprs() + _alert_exprs()
    assert len(exprs) >= 40
    problems = []
    for where, expr in exprs:
        names = _metric_names(expr) - {"up"}  # `up` is Prometheus' own, per scrape target
        missing = sorted(n for n in names if n not in exported)
        if missing:
            problems.append(f"{where}: {missing} not exported by Tally ({expr})")
        if not names and "up{" not in expr:
            problems.append(f"{where}: no metric in {expr}")
    assert not problems, "\n".join(problems)
    # and every expression runs against the real Prometheus scraping that Tally
    time.sleep(3)  # a few scrapes after the usage query
    for where, expr in exprs:
        r = httpx.get(prometheus + "/api/v1/query", params={"query": expr}, timeout=30)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", (where, expr, body)
    # the series the dashboard's main panels draw exist in Prometheus
    for name in (
        "tally_worker_consumer_lag",
        "tally_worker_freshness_seconds",
        "tally_worker_flush_seconds_bucket",
        "tally_usage_query_duration_seconds_bucket",
        "tally_tenant_events_total",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
    ):
        assert query(prometheus, f'count({{__name__="{name}", job="tally"}})'), name


def test_json_logs_carry_request_id_tenant_and_counts(
    tally: tuple[TallyProcess, str, Path],
) -> None:
    _proc, url, log_path = tally
    key = create_tenant(url, "logs")
    tenant = key.split("_")[1]
    r = post(
        url, key, [event("l1", now_iso()), event("l1", now_iso())], **{"X-Request-ID": "req-42"}
    )
    assert r.status_code == 202 and r.headers["x-request-id"] == "req-42"
    r = post(url, key, [event("l2", now_iso())])
    generated = r.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    assert (
        httpx.get(url + "/healthz", headers={"X-Request-ID": "bad id"}).headers["x-request-id"]
        != "bad id"
    )
    deadline = time.monotonic() + 30
    while True:
        lines = [
            ln for ln in log_path.read_text(errors="replace").splitlines() if ln.startswith("{")
        ]
        records = [json.loads(ln) for ln in lines]
        mine = [
            x
            for x in records
            if x.get("request_id") == "req-42" and x.get("logger") == "api.access"
        ]
        if mine or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert mine, lines[-5:]
    (line,) = mine
    assert line["tenant"] == tenant and line["route"] == "/v1/events" and line["status"] == 202
    assert line["events"] == 2 and line["accepted"] == 1 and line["level"] == "INFO"
    assert any(x.get("request_id") == generated for x in records)
    # every line Tally itself wrote is JSON (prints of the CLI banner aside)
    assert all(set(x) >= {"time", "level", "logger", "message"} for x in records)
    assert key not in log_path.read_text()  # the API key is never logged
