"""``tally doctor``: check a deployment and say in plain words what is wrong and how to fix it.

Each check is a small function ``(Context) -> list[Finding]`` in ``CHECKS``; add one by writing
a function and appending it. A check reports what it can judge from where the doctor runs:

- with a server URL (``--url``, ``TALLY_URL``, or the ``tally run`` of the data directory): the
  server answers, its ``/readyz`` (every entry it reports, so richer readiness shows up here
  without a change), and the clock of this machine against the server's;
- with ``TALLY_KAFKA_BOOTSTRAP`` / ``TALLY_CLICKHOUSE_URL`` (scale-out), or an embedded data
  directory no server holds: the broker and the events topic, the store, the migrations, the
  store's clock, and the worker's lag (messages in the topic not yet stored) and freshness.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from enum import StrEnum
from typing import Any

from tally.settings import Settings


class Status(StrEnum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"
    SKIP = "skip"


@dataclass(frozen=True)
class Finding:
    check: str
    status: Status
    message: str
    fix: str = ""


@dataclass
class Context:
    settings: Settings
    url: str | None
    timeout: float = 5.0
    embedded_server_running: bool = False
    # filled by the checks, read by later ones
    server_ok: bool = False
    server_date: tuple[float, float, datetime] | None = None  # local t0, t1, server Date
    _store: Any = None
    _store_error: str | None = None
    _store_tried: bool = False
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def direct_store(self) -> bool:
        """The store can be opened from here: a ClickHouse URL, or an embedded data directory
        that exists and no running `tally run` holds."""
        if self.settings.clickhouse_url:
            return True
        return not self.embedded_server_running and self.settings.chdb_dir.exists()

    def store(self) -> Any:
        if not self._store_tried:
            self._store_tried = True
            from clickhouse.store import open_store

            try:
                self._store = open_store(self.settings)
            except Exception as exc:
                self._store_error = _first_line(exc)
        return self._store

    def close(self) -> None:
        if self._store is not None:
            self._store.close()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# --- pure judgements ---------------------------------------------------------------------------


def judge_skew(what: str, skew_s: float, uncertainty_s: float) -> Finding:
    """Clock skew (other clock minus this machine's) measured within ``uncertainty_s``."""
    beyond = abs(skew_s) - uncertainty_s
    direction = "ahead of" if skew_s > 0 else "behind"
    text = f"{what}'s clock is {abs(skew_s):.1f} s {direction} this machine's"
    fix = (
        "run NTP (e.g. chrony or systemd-timesyncd) on both machines; event times from this "
        "machine are judged against the server's clock (lateness bounds, 5 min into the future)"
    )
    if beyond > 60:
        return Finding("clock", Status.FAIL, text, fix)
    if beyond > 2:
        return Finding("clock", Status.WARN, text, fix)
    return Finding(
        "clock",
        Status.OK,
        f"{what}'s clock agrees with this machine's (±{max(uncertainty_s, abs(skew_s)):.1f} s)",
    )


def judge_lag(
    lag: int,
    before: dict[int, int],
    after: dict[int, int],
    seconds: float,
    newest_age: float | None,
) -> Finding:
    """Worker lag: ``lag`` messages in the topic not yet stored; progress sampled twice."""
    fresh = (
        f"; newest stored event ingested {_ago(newest_age)} ago" if newest_age is not None else ""
    )
    if lag <= 0:
        return Finding(
            "worker", Status.OK, "the worker has stored every message of the topic" + fresh
        )
    moved = sum(max(0, after.get(p, -1) - before.get(p, -1)) for p in set(before) | set(after))
    if moved > 0:
        return Finding(
            "worker",
            Status.WARN,
            f"the worker is {lag} messages behind and catching up "
            f"({moved / max(seconds, 0.001):.0f} messages/s)" + fresh,
            "nothing to do if it keeps catching up; otherwise add workers "
            "(partitions >= workers) or check the store's insert rate",
        )
    return Finding(
        "worker",
        Status.FAIL,
        f"{lag} messages wait in the topic and the worker stored none of them in "
        f"{seconds:.0f} s" + fresh,
        "start `tally worker` (scale-out) or `tally run`; if it runs, read its log: a store "
        "that refuses inserts stops it (it never drops events)",
    )


# --- checks ------------------------------------------------------------------------------------


def check_server(ctx: Context) -> list[Finding]:
    import httpx

    if ctx.url is None:
        if ctx.settings.embedded:
            d = ctx.settings.data_dir
            return [
                Finding(
                    "server",
                    Status.FAIL,
                    f"no Tally server is running for the data directory {d}",
                    f"start it: `tally run --data-dir {d}`, or pass --url of a running server",
                )
            ]
        return [Finding("server", Status.SKIP, "no --url given: the HTTP API was not checked")]
    t0 = time.time()
    try:
        r = httpx.get(ctx.url + "/healthz", timeout=ctx.timeout)
    except httpx.HTTPError as exc:
        return [
            Finding(
                "server",
                Status.FAIL,
                f"cannot reach the Tally server at {ctx.url}: {_first_line(exc)}",
                "check the URL and that `tally run` / `tally api` is up (and the firewall)",
            )
        ]
    t1 = time.time()
    date = r.headers.get("date")
    if date:
        try:
            ctx.server_date = (t0, t1, parsedate_to_datetime(date))
        except (TypeError, ValueError):
            pass
    if r.status_code != 200:
        return [
            Finding(
                "server",
                Status.FAIL,
                f"{ctx.url}/healthz answered {r.status_code}: {r.text[:200]}",
                "is this URL a Tally server? read the server's log",
            )
        ]
    ctx.server_ok = True
    return [Finding("server", Status.OK, f"the server at {ctx.url} answers")]


def _entry_ok(value: Any) -> tuple[bool, str]:
    if isinstance(value, dict):
        status = str(value.get("status", value.get("ok", ""))).lower()
        detail = (
            value.get("message")
            or value.get("detail")
            or ", ".join(f"{k}={v}" for k, v in value.items() if k not in ("status", "ok"))
        )
        return status in ("ok", "true", "ready"), str(detail or status)
    return str(value).lower() == "ok", str(value)


def check_readiness(ctx: Context) -> list[Finding]:
    import httpx

    if not ctx.server_ok or ctx.url is None:
        return []
    try:
        r = httpx.get(ctx.url + "/readyz", timeout=ctx.timeout + 5)
        body = r.json()
    except (httpx.HTTPError, ValueError) as exc:
        return [Finding("readiness", Status.FAIL, f"/readyz failed: {_first_line(exc)}")]
    checks = body.get("checks") if isinstance(body, dict) else None
    if not isinstance(checks, dict) or not checks:
        status = Status.OK if r.status_code == 200 else Status.FAIL
        return [Finding("readiness", status, f"/readyz answered {r.status_code}")]
    out = []
    for name, value in checks.items():
        ok, detail = _entry_ok(value)
        out.append(
            Finding(
                name,
                Status.OK if ok else Status.FAIL,
                "ok, says the server's /readyz" if ok else f"not ready: {detail} (/readyz)",
                "" if ok else f"the server cannot use its {name}; read the server's log",
            )
        )
    return out


def check_server_clock(ctx: Context) -> list[Finding]:
    if ctx.server_date is None:
        return []
    t0, t1, date = ctx.server_date
    # Date has 1 s resolution: the server's time was in [date, date + 1) while we waited.
    skew = date.timestamp() + 0.5 - (t0 + t1) / 2
    return [judge_skew("the server", skew, 0.5 + (t1 - t0) / 2)]


def check_broker(ctx: Context) -> list[Finding]:
    s = ctx.settings
    if not s.kafka_bootstrap:
        if ctx.embedded_server_running:
            return [
                Finding(
                    "broker",
                    Status.SKIP,
                    "embedded: the broker runs inside `tally run` (see its /readyz above)",
                )
            ]
        return []
    from confluent_kafka.admin import AdminClient

    try:
        admin = AdminClient(
            {"bootstrap.servers": s.kafka_bootstrap, "socket.timeout.ms": int(ctx.timeout * 1000)}
        )
        md = admin.list_topics(timeout=ctx.timeout)
    except Exception as exc:
        return [
            Finding(
                "broker",
                Status.FAIL,
                f"cannot reach the broker at {s.kafka_bootstrap}: {_first_line(exc)}",
                "check TALLY_KAFKA_BOOTSTRAP and that Kafka is up; ingest answers 503 meanwhile",
            )
        ]
    out = [
        Finding(
            "broker",
            Status.OK,
            f"the broker at {s.kafka_bootstrap} answers ({len(md.brokers)} broker(s))",
        )
    ]
    topic = md.topics.get(s.events_topic)
    if topic is None or topic.error is not None:
        out.append(
            Finding(
                "topic",
                Status.WARN,
                f"the events topic {s.events_topic} does not exist yet",
                "`tally api` and `tally worker` create it when they start",
            )
        )
    elif len(topic.partitions) != s.events_partitions:
        out.append(
            Finding(
                "topic",
                Status.WARN,
                f"{s.events_topic} has {len(topic.partitions)} partitions, the settings say "
                f"{s.events_partitions}",
                "keep TALLY_EVENTS_PARTITIONS equal to the topic's partition count everywhere",
            )
        )
    else:
        out.append(
            Finding("topic", Status.OK, f"{s.events_topic} has {len(topic.partitions)} partitions")
        )
    ctx.notes["partitions"] = (
        sorted(topic.partitions) if topic is not None and topic.error is None else []
    )
    return out


def check_store(ctx: Context) -> list[Finding]:
    if not ctx.direct_store:
        if ctx.embedded_server_running:
            return [
                Finding(
                    "store",
                    Status.SKIP,
                    "embedded: `tally run` holds the store (see its /readyz above)",
                )
            ]
        return [Finding("store", Status.SKIP, f"no embedded store in {ctx.settings.data_dir} yet")]
    store = ctx.store()
    where = ctx.settings.clickhouse_url or f"chDB in {ctx.settings.chdb_dir}"
    if store is None:
        return [
            Finding(
                "store",
                Status.FAIL,
                f"cannot open the store ({where}): {ctx._store_error}",
                "check TALLY_CLICKHOUSE_URL (user, password, host) and that ClickHouse is up",
            )
        ]
    try:
        version = store.query_rows("SELECT version()")[0][0]
    except Exception as exc:
        return [Finding("store", Status.FAIL, f"the store does not answer: {_first_line(exc)}")]
    return [
        Finding(
            "store",
            Status.OK,
            f"the store answers (ClickHouse {version}, database {store.database})",
        )
    ]


def check_migrations(ctx: Context) -> list[Finding]:
    store = ctx.store() if ctx.direct_store else None
    if store is None:
        return []
    from clickhouse.store import migration_files

    known = [p.name for p in migration_files()]
    try:
        applied = {
            r[0] for r in store.query_rows(f"SELECT name FROM {store.database}.schema_migrations")
        }
    except Exception:
        applied = set()
    missing = [n for n in known if n not in applied]
    unknown = sorted(applied - set(known))
    out = []
    if missing:
        out.append(
            Finding(
                "migrations",
                Status.FAIL,
                f"{len(missing)} of {len(known)} migrations are not applied: {', '.join(missing)}",
                "run `tally migrate` with the same settings (roles also apply them at start)",
            )
        )
    else:
        out.append(Finding("migrations", Status.OK, f"all {len(known)} migrations are applied"))
    if unknown:
        out.append(
            Finding(
                "migrations",
                Status.WARN,
                f"the database has migrations this version does not know: {', '.join(unknown)}",
                "this `tally` is older than the one that migrated the database; upgrade it",
            )
        )
    return out


def check_store_clock(ctx: Context) -> list[Finding]:
    if not ctx.settings.clickhouse_url.startswith(("http://", "https://")):
        return []  # chDB runs on this machine: same clock
    store = ctx.store()
    if store is None:
        return []
    t0 = time.time()
    try:
        (value,) = store.query_rows("SELECT toUnixTimestamp64Milli(now64(3))")[0]
    except Exception:
        return []
    t1 = time.time()
    return [judge_skew("the store", int(value) / 1000 - (t0 + t1) / 2, (t1 - t0) / 2 + 0.01)]


def _lag(bootstrap: str, topic: str, stored: dict[int, int], timeout: float) -> int:
    """Messages not stored yet, measured as the worker measures it (``streams.lag``: the log end
    from a fetch's high watermark; ListOffsets understates it on Tansu)."""
    from streams.lag import LogProbe

    probe = LogProbe(bootstrap, topic, group="tally-doctor")
    try:
        return probe.measure(stored, timeout=timeout).total_lag
    finally:
        probe.close()


def check_worker(ctx: Context, sample_s: float = 3.0) -> list[Finding]:
    s = ctx.settings
    partitions = ctx.notes.get("partitions")
    store = ctx.store() if ctx.direct_store else None
    if not s.kafka_bootstrap or not partitions or store is None:
        if ctx.embedded_server_running:
            return [
                Finding(
                    "worker",
                    Status.SKIP,
                    "embedded: lag is judged by `tally run` itself (its /readyz, when it reports the worker)",
                )
            ]
        return []
    from clickhouse.sink import ClickHouseSink

    sink = ClickHouseSink(store)
    try:
        before = sink.progress(s.events_topic)
        time.sleep(sample_s)
        after = sink.progress(s.events_topic)
        stored = {p: after.get(p, -1) for p in partitions}
        lag = _lag(s.kafka_bootstrap, s.events_topic, stored, ctx.timeout)
        newest = store.query_rows(f"SELECT max(ingested_at) FROM {store.database}.events")[0][0]
    except Exception as exc:
        return [
            Finding("worker", Status.WARN, f"could not judge the worker's lag: {_first_line(exc)}")
        ]
    age = None
    if isinstance(newest, datetime) and newest.year > 1970:
        newest = newest.replace(tzinfo=UTC) if newest.tzinfo is None else newest
        age = (datetime.now(UTC) - newest).total_seconds()
    return [judge_lag(lag, before, after, sample_s, age)]


def check_secrets_key(ctx: Context) -> list[Finding]:
    s = ctx.settings
    keys = s.secrets_key.get_secret_value()
    if not keys:
        if s.embedded:
            return []  # `tally run` keeps one in <data_dir>/secrets.key
        return [
            Finding(
                "secrets key",
                Status.WARN,
                "TALLY_SECRETS_KEY is not set: Segment webhook secrets cannot be stored",
                "create one with `tally secrets-key` and set it on every API replica",
            )
        ]
    from api.secretbox import SecretBox
    from tally.errors import NotConfigured

    try:
        SecretBox(keys)
    except NotConfigured as exc:
        return [
            Finding("secrets key", Status.FAIL, exc.message, "create one with `tally secrets-key`")
        ]
    return [Finding("secrets key", Status.OK, "TALLY_SECRETS_KEY is valid")]


CHECKS: list[Callable[[Context], list[Finding]]] = [
    check_server,
    check_readiness,
    check_server_clock,
    check_broker,
    check_store,
    check_migrations,
    check_store_clock,
    check_worker,
    check_secrets_key,
]


def run_checks(ctx: Context, on_finding: Callable[[Finding], None] | None = None) -> list[Finding]:
    out: list[Finding] = []
    try:
        for check in CHECKS:
            try:
                found = check(ctx)
            except Exception as exc:  # a broken check must not hide the others
                found = [
                    Finding(
                        check.__name__.removeprefix("check_"),
                        Status.WARN,
                        f"the check failed: {_first_line(exc)}",
                    )
                ]
            for f in found:
                out.append(f)
                if on_finding is not None:
                    on_finding(f)
    finally:
        ctx.close()
    return out
