"""Where the time goes: ``py-spy record -p PID -f raw`` on every thread of `tally run` under load,
summarised by thread, by function (self and inclusive), by first-party caller and by component.

Raw format: one line per distinct stack, ``<frame>;<frame>;...;<leaf> <count>``, root first; with
``--threads`` the first frame names the thread. py-spy samples Python frames only: time spent in a
C extension (orjson, sqlite3, chDB, librdkafka) is charged to the Python function that called it.
"""

from __future__ import annotations

import gzip
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.target import REPO, BenchError

FIRST_PARTY = ("api", "streams", "schemas", "clickhouse", "runtime", "tally", "rating")
# Inclusive time is listed for these (runtime/ only wires the roles: its frames hold everything).
_WORK_PACKAGES = frozenset(FIRST_PARTY) - {"runtime"}
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>.*?)(?::(?P<line>\d+))?\)$")
_THREAD = re.compile(
    r'^(?:process \d+:"[^"]*";)?thread \((?P<tid>[^)]*)\)(?::\s*"?(?P<name>[^";]*)"?)?'
)


def py_spy() -> str:
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(exe).exists():
        raise BenchError("py-spy is not installed: make .venv/.installed (it is a dev dependency)")
    return exe


# The full run's profile: every thread of `tally run` and, in split mode, of its API child (the
# broker is not Python); sampled without pausing the process (less perturbation, and py-spy then
# tells idle threads, sleeping in a wait, from running ones).
PROFILE_FLAGS = ("--threads", "--subprocesses", "--full-filenames", "--nonblocking")


class Recorder:
    """Runs py-spy against ``pid`` for ``seconds`` in the background, with ``flags``."""

    def __init__(
        self,
        pid: int,
        seconds: float,
        out: Path,
        rate: int = 100,
        flags: Sequence[str] = PROFILE_FLAGS,
    ) -> None:
        self.out = out
        self.log = out.with_suffix(".log")
        out.unlink(missing_ok=True)  # never read the profile of an earlier run
        self._logf = open(self.log, "wb")
        cmd = [py_spy(), "record", "-p", str(pid), "-f", "raw", "-o", str(out)]
        cmd += ["-d", str(max(1, round(seconds))), "-r", str(rate), *flags]
        self.proc = subprocess.Popen(
            cmd,
            stdout=self._logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    def wait(self, timeout: float) -> None:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        finally:
            self._logf.close()
        if not self.out.exists() or self.out.stat().st_size == 0:
            raise BenchError(
                f"py-spy wrote no profile:\n{self.log.read_text(errors='replace')[-2000:]}"
            )


@dataclass
class Frame:
    func: str
    file: str

    @property
    def where(self) -> str:
        return f"{self.func} ({short_path(self.file)})"


_SITE = [p for p in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]} if p]
_STDLIB = sysconfig.get_paths()["stdlib"]


def short_path(path: str) -> str:
    for base in _SITE:
        if path.startswith(base + "/"):
            return path[len(base) + 1 :]
    root = str(REPO) + "/"
    if path.startswith(root):
        return path[len(root) :]
    if path.startswith(_STDLIB + "/"):
        return "stdlib/" + path[len(_STDLIB) + 1 :]
    return path


def component(path: str) -> str:
    """First-party package, library (top-level import name) or stdlib module of a file."""
    p = short_path(path)
    if p.startswith("stdlib/"):
        name = p[len("stdlib/") :].split("/")[0]
        return "stdlib:" + name.removesuffix(".py")
    head = p.split("/")[0].removesuffix(".py")
    return head or p


def parse_frame(text: str) -> Frame:
    m = _FRAME.match(text.strip())
    if not m:
        return Frame(text.strip(), "")
    return Frame(m.group("func"), m.group("file"))


def thread_name(label: str) -> str:
    m = _THREAD.match(label)
    if not m:
        return label
    return (m.group("name") or "").strip() or f"tid {m.group('tid')}"


def _thread_group(name: str) -> str:
    """Group pool threads: 'asyncio_3' -> 'asyncio_*', 'tally-flush_0' -> 'tally-flush_*'."""
    return re.sub(r"_\d+$", "_*", name)


# Leaf frames of a thread that waits (py-spy samples Python frames, so a thread blocked in C under
# one of these shows it as its leaf). Their samples are counted apart, not as work.
IDLE_LEAVES = {
    ("threading.py", "Condition.wait"),
    ("threading.py", "Event.wait"),
    ("threading.py", "Thread.join"),
    ("threading.py", "Thread._wait_for_tstate_lock"),
    ("threading.py", "Semaphore.acquire"),
    ("queue.py", "Queue.get"),
    ("selectors.py", "EpollSelector.select"),
    ("selectors.py", "PollSelector.select"),
    ("selectors.py", "SelectSelector.select"),
}


def is_idle(leaf: Frame) -> bool:
    return (leaf.file.rsplit("/", 1)[-1], leaf.func) in IDLE_LEAVES


def summarise(raw: str, ticks: int | None = None, top: int = 20) -> dict[str, Any]:
    """Tables of the profile. ``ticks``: how many times py-spy sampled (its "Samples:" count);
    ``cores`` = samples / ticks = how many cores' worth of time went there."""
    threads: Counter[str] = Counter()
    idle: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    first_party: Counter[str] = Counter()
    components: Counter[str] = Counter()
    by_thread_fn: dict[str, Counter[str]] = {}
    total = 0
    for line in raw.splitlines():
        line = line.strip()
        if not line:
            continue
        stack, _, count_s = line.rpartition(" ")
        try:
            count = int(count_s)
        except ValueError:
            continue
        parts = stack.split(";")
        thread = "?"
        if parts and (parts[0].startswith("thread (") or parts[0].startswith("process ")):
            label = parts.pop(0)
            prefix = ""
            # --subprocesses nests: "process <main>;process <child>;thread (...)". Split mode's
            # API child's threads are named apart from the main process's.
            while label.startswith("process ") and parts and parts[0].startswith("process "):
                label = parts.pop(0)
            if "runtime.split" in label:
                prefix = "api "
            if label.startswith("process ") and parts and parts[0].startswith("thread ("):
                label = parts.pop(0)
            thread = prefix + _thread_group(thread_name(label))
        frames = [parse_frame(p) for p in parts if p]
        if not frames:
            continue
        if is_idle(frames[-1]):
            idle[thread] += count
            continue
        total += count
        threads[thread] += count
        leaf = frames[-1]
        self_time[leaf.where] += count
        components[component(leaf.file)] += count
        for w in {f.where for f in frames if component(f.file) in _WORK_PACKAGES}:
            inclusive[w] += count
        fp = next(
            (f for f in reversed(frames) if component(f.file) in FIRST_PARTY),
            None,
        )
        key = fp.where if fp is not None else f"[{component(leaf.file)}] {leaf.func}"
        first_party[key] += count
        by_thread_fn.setdefault(thread, Counter())[key] += count
    if total == 0:
        raise BenchError("the profile has no samples")

    def shares(c: Counter[str], n: int = top) -> list[dict[str, Any]]:
        return [
            {"name": k, "share": v / total, "samples": v, "cores": v / ticks if ticks else None}
            for k, v in c.most_common(n)
        ]

    return {
        "samples": total,
        "ticks": ticks,
        "cores": total / ticks if ticks else None,
        "idle_samples": sum(idle.values()),
        "by_thread": shares(threads, 50),
        "top_self": shares(self_time),
        "top_inclusive": shares(inclusive),
        "by_first_party_caller": shares(first_party),
        "by_component": shares(components),
        "by_thread_first_party": {
            t: shares(c, 8) for t, c in sorted(by_thread_fn.items(), key=lambda kv: -threads[kv[0]])
        },
    }


def record(pid: int, seconds: float, out_dir: Path) -> tuple[Recorder, float]:
    out = out_dir / "profile.raw"
    return Recorder(pid, seconds, out), time.time()


def finish(rec: Recorder, timeout: float) -> dict[str, Any]:
    rec.wait(timeout)
    raw = rec.out.read_text(errors="replace")
    m = re.search(r"Samples: (\d+)", rec.log.read_text(errors="replace"))
    summary = summarise(raw, int(m.group(1)) if m else None)
    with gzip.open(rec.out.with_suffix(".raw.gz"), "wt") as f:
        f.write(raw)
    rec.out.unlink()
    rec.log.unlink(missing_ok=True)
    return summary


def render(summary: dict[str, Any]) -> str:
    """The profile summary as text tables (profile.txt)."""
    cores = summary.get("cores")
    lines = [
        f"samples: {summary['samples']} (idle waits left out: {summary['idle_samples']}); "
        f"py-spy ticks: {summary.get('ticks')}; busy cores: "
        + (f"{cores:.2f}" if cores is not None else "?"),
        "share = of the busy samples; cores = samples / ticks",
        "",
    ]
    for title, key in (
        ("by thread", "by_thread"),
        ("by component (leaf frame)", "by_component"),
        (
            "by first-party caller (deepest api/streams/schemas/clickhouse/runtime frame)",
            "by_first_party_caller",
        ),
        ("top self (leaf function)", "top_self"),
        ("top inclusive (first-party functions, callees included)", "top_inclusive"),
    ):
        lines.append(f"== {title}")
        for row in summary[key]:
            c = row.get("cores")
            lines.append(
                f"{row['share'] * 100:6.1f}%  {c if c is not None else float('nan'):5.2f}  {row['name']}"
            )
        lines.append("")
    lines.append("== per thread, by first-party caller")
    for thread, rows in summary["by_thread_first_party"].items():
        lines.append(f"-- {thread}")
        for row in rows:
            lines.append(f"{row['share'] * 100:6.1f}%  {row['name']}")
    return "\n".join(lines) + "\n"
