"""A real HTTP reverse proxy in front of a running Tally that injects faults (tests only).

Clients under test talk to the proxy; it forwards each request to Tally unchanged, except the
requests that a fault rule picks:

- ``unavailable``: answered 503 (with ``Retry-After`` if given) *without* reaching Tally;
- ``lose``: forwarded (Tally stores the events) and then the connection is dropped without an
  answer -- the client cannot know its events arrived and must resend them;
- ``bad_gateway``: forwarded, then answered 502 without ``Retry-After``.

Rules apply to the next ``count`` requests whose path starts with ``prefix``, or to every such
request until ``seconds`` have passed. Nothing is mocked: Tally answers every forwarded request.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}


@dataclass
class Fault:
    mode: str  # unavailable | lose | bad_gateway
    prefix: str = "/"
    count: int | None = None
    until: float | None = None
    retry_after: int | None = None

    def active(self) -> bool:
        if self.count is not None:
            return self.count > 0
        return self.until is not None and time.monotonic() < self.until


class FaultProxy:
    def __init__(self, target: str) -> None:
        self.target = target.rstrip("/")
        self.faults: list[Fault] = []
        self.lock = threading.Lock()
        self.forwarded = 0
        self.injected: dict[str, int] = {"unavailable": 0, "lose": 0, "bad_gateway": 0}
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status or -1 = dropped)
        self._http = httpx.Client(timeout=120)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._http.close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- plans ----------------------------------------------------------------------------------

    def add(
        self,
        mode: str,
        *,
        prefix: str = "/",
        count: int | None = None,
        seconds: float | None = None,
        retry_after: int | None = None,
    ) -> None:
        assert mode in self.injected and (count is None) != (seconds is None)
        until = time.monotonic() + seconds if seconds is not None else None
        with self.lock:
            self.faults.append(Fault(mode, prefix, count, until, retry_after))

    def clear(self) -> None:
        with self.lock:
            self.faults.clear()

    def _pick(self, path: str) -> Fault | None:
        with self.lock:
            for f in self.faults:
                if path.startswith(f.prefix) and f.active():
                    if f.count is not None:
                        f.count -= 1
                    self.injected[f.mode] += 1
                    return f
        return None

    # -- serving --------------------------------------------------------------------------------

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_args: Any) -> None:
                pass

            def _body(self) -> bytes:
                n = int(self.headers.get("content-length") or 0)
                return self.rfile.read(n) if n else b""

            def _answer(self, status: int, headers: dict[str, str], body: bytes) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                proxy.requests.append((self.command, self.path, status))

            def _forward(self, body: bytes) -> httpx.Response:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                resp = proxy._http.request(
                    self.command, proxy.target + self.path, content=body, headers=headers
                )
                with proxy.lock:
                    proxy.forwarded += 1
                return resp

            def _handle(self) -> None:
                body = self._body()
                fault = proxy._pick(self.path)
                if fault is not None and fault.mode == "unavailable":
                    headers = {"Content-Type": "application/json"}
                    if fault.retry_after is not None:
                        headers["Retry-After"] = str(fault.retry_after)
                    msg = b'{"error":"unavailable","message":"injected by the test proxy"}'
                    self._answer(503, headers, msg)
                    return
                resp = self._forward(body)
                if fault is not None and fault.mode == "lose":
                    proxy.requests.append((self.command, self.path, -1))
                    self.close_connection = True
                    try:
                        self.connection.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    return
                if fault is not None and fault.mode == "bad_gateway":
                    self._answer(502, {"Content-Type": "text/plain"}, b"injected bad gateway")
                    return
                keep = {
                    k: v
                    for k, v in resp.headers.items()
                    if k.lower() not in _HOP and k.lower() != "content-encoding"
                }
                self._answer(resp.status_code, keep, resp.content)

            do_GET = _handle
            do_POST = _handle
            do_PUT = _handle
            do_PATCH = _handle
            do_DELETE = _handle

        return Handler
