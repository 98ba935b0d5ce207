"""Micro-benchmark of the `tally run` split-mode ``wait=stored`` hop: the API child waiting on the
main process's ``ProgressBoard``, old HTTP hop against the new socket hop, in the same run.

    python -m benchmarks.waithop [seconds] [clients] [rounds]     # defaults: 5 64 3

- ``http``: the hop before ``runtime.waithop`` (kept here only to compare): one httpx
  ``POST /wait`` per wait into a Starlette route served by uvicorn in a thread of the server
  process, as ``RemoteProgressWaiter`` and ``create_control_app`` did;
- ``socket``: ``runtime.waithop`` (``SocketProgressWaiter`` -> ``WaitServer``).

The server side runs in a process of its own (as the main process of `tally run` does) with a
real ``ProgressBoard`` and a "worker" thread that stores a new offset on every partition every
``TICK_S`` (each wait's target is the offset of the next tick, so it is answered then, after
really waiting on the board); ``clients`` tasks on one uvloop event loop (as in the API child's
uvicorn) wait in a loop.
Two shapes: ``pending`` (as above) and ``stored`` (the offsets are stored already: the answer is
immediate, the round trip alone). Rounds alternate the hops; per round: waits/s and CPU per wait
of the client process and of the server process. One JSON line per measurement, then the
medians and the socket/http ratios of the rounds.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.target import cpu_s
from runtime.waithop import SocketProgressWaiter, WaitServer

TICK_S = 0.005
PARTITIONS = 4
TOPIC = "events"
STORED_TOPIC = "stored"  # offsets stored at start, never waited for


# ---- the old hop, as it was (for comparison only) ---------------------------------------------


def old_control_app(board: Any) -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    async def wait(request: Request) -> Response:
        body = await request.json()
        targets = {int(p): int(o) for p, o in body["targets"].items()}
        stored = await board.wait_for(str(body["topic"]), targets, float(body["timeout"]))
        return JSONResponse({"stored": stored})

    return Starlette(routes=[Route("/wait", wait, methods=["POST"])])


class HttpWaiter:
    def __init__(self, url: str) -> None:
        import httpx

        self.url = url + "/wait"
        self.client = httpx.AsyncClient(
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=256),
            timeout=httpx.Timeout(10.0, pool=None),
        )

    async def wait_for(self, topic: str, targets: dict[int, int], timeout: float) -> bool:
        resp = await self.client.post(
            self.url,
            json={
                "topic": topic,
                "targets": {str(p): o for p, o in targets.items()},
                "timeout": timeout,
            },
            timeout=timeout + 10,
        )
        resp.raise_for_status()
        return bool(resp.json()["stored"])


def _tick() -> int:
    """The offset the "worker" has stored by now (CLOCK_MONOTONIC is one clock for every process
    of the machine): a wait for ``_tick() + 1`` is answered at the next tick, never at once."""
    return int(time.monotonic() / TICK_S)


# ---- the server process ------------------------------------------------------------------------


def serve(kind: str) -> None:
    """``python -m benchmarks.waithop serve http|socket``: prints its address, serves until
    stdin closes."""
    from runtime.roles import serve_in_thread
    from streams.progress import ProgressBoard

    board = ProgressBoard()
    for p in range(PARTITIONS):
        board.notify(STORED_TOPIC, p, 10**12)
    stop = threading.Event()

    def worker() -> None:
        while not stop.wait(TICK_S):
            offset = _tick()
            for p in range(PARTITIONS):
                board.notify(TOPIC, p, offset)

    threading.Thread(target=worker, daemon=True).start()
    if kind == "http":
        served = serve_in_thread(old_control_app(board), "127.0.0.1", 0)
        address = f"http://127.0.0.1:{served.port}"
    else:
        server = WaitServer(board).start()
        address = server.address
    print(address, flush=True)
    sys.stdin.read()
    stop.set()
    if kind == "http":
        served.stop()
    else:
        server.stop()


# ---- the client (this process) -----------------------------------------------------------------


async def _measure(waiter: Any, seconds: float, clients: int, topic: str) -> int:
    done = 0
    deadline = time.monotonic() + seconds

    async def one(i: int) -> None:
        nonlocal done
        while time.monotonic() < deadline:
            offset = _tick() + 1 if topic == TOPIC else 1  # pending: the next tick's offset
            stored = await waiter.wait_for(topic, {i % PARTITIONS: offset}, 10.0)
            assert stored, "a wait timed out"
            done += 1

    await asyncio.gather(*(one(i) for i in range(clients)))
    return done


def measure(kind: str, shape: str, seconds: float, clients: int) -> dict[str, Any]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.waithop", "serve", kind],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.stdout is not None and proc.stdin is not None
    address = proc.stdout.readline().strip()
    topic = TOPIC if shape == "pending" else STORED_TOPIC
    try:

        async def main() -> dict[str, Any]:
            waiter: Any = HttpWaiter(address) if kind == "http" else SocketProgressWaiter(address)
            await _measure(waiter, 1.0, clients, topic)  # warm up: connections, imports
            srv0, cli0, t0 = cpu_s(proc.pid) or 0.0, time.process_time(), time.monotonic()
            n = await _measure(waiter, seconds, clients, topic)
            wall = time.monotonic() - t0
            srv = (cpu_s(proc.pid) or 0.0) - srv0
            cli = time.process_time() - cli0
            return {
                "hop": kind,
                "shape": shape,
                "clients": clients,
                "waits": n,
                "waits_per_s": round(n / wall),
                "client_cpu_us_per_wait": round(cli / n * 1e6, 1),
                "server_cpu_us_per_wait": round(srv / n * 1e6, 1),
            }

        import uvloop  # what uvicorn runs the API child on

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main())
    finally:
        proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main(argv: list[str]) -> None:
    if argv[:1] == ["serve"]:
        serve(argv[1])
        return
    seconds = float(argv[0]) if argv else 5.0
    clients = int(argv[1]) if len(argv) > 1 else 64
    rounds = int(argv[2]) if len(argv) > 2 else 3
    print(
        f"# wait hop: {clients} concurrent waits, {seconds:g}s per measurement, {rounds} rounds, "
        f"cpus={os.cpu_count()}",
        flush=True,
    )
    ratios: dict[str, dict[str, list[float]]] = {}
    keys = ("waits_per_s", "client_cpu_us_per_wait", "server_cpu_us_per_wait")
    for r in range(rounds):
        for shape in ("pending", "stored"):
            got = {}
            order = ("http", "socket") if r % 2 == 0 else ("socket", "http")
            for kind in order:
                got[kind] = measure(kind, shape, seconds, clients)
                print(json.dumps({"round": r, **got[kind]}), flush=True)
            per = ratios.setdefault(shape, {k: [] for k in keys})
            for k in keys:
                per[k].append(got["socket"][k] / max(got["http"][k], 1e-9))
    for shape, per in ratios.items():
        summary = {k: round(statistics.median(v), 3) for k, v in per.items()}
        ranges = {k: [round(min(v), 3), round(max(v), 3)] for k, v in per.items()}
        print(
            json.dumps({"shape": shape, "socket_over_http_median": summary, "range": ranges}),
            flush=True,
        )


if __name__ == "__main__":
    main(sys.argv[1:])
