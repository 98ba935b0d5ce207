"""A ClickHouse HTTP interface over one chDB directory (the embedded store server).

chDB lets only one process open a data directory and cannot open a listener itself, while other
processes talk to ClickHouse through clickhouse-connect's ``HttpClient``. This module is a small
ClickHouse server stand-in: the process that owns the chDB directory answers the parts of the
ClickHouse HTTP protocol that clickhouse-connect uses (URL parameters, ``param_*`` binds, Native
and Arrow inserts, compression, error headers). Users:

- `tally run` in its default ``split`` mode (``runtime.split``): the worker process owns chDB and
  serves it to the API process with ``serve_in_thread`` (loopback only);
- the multi-process tests (scale-out roles over one chDB directory, ``tests.support.chdb_http``).

Run it as a process::

    python -m clickhouse.server --path DIR --port 0      # prints "LISTENING <port>"

or from a test::

    proc, url = start_server(tmp_path / "ch")                  # url = "http://127.0.0.1:<port>"
    client = clickhouse_connect.get_client(dsn=url)
    ...
    stop_server(proc)                                           # or proc.kill() for a crash

What it implements (see ``Engine.execute`` and ``_Handler``):

- ``GET /ping`` and ``GET /`` without a query: ``Ok.``.
- ``GET``/``POST /`` with the SQL in the ``query`` parameter and/or the body (joined by a newline,
  like ClickHouse), or in ``multipart/form-data`` fields; ``param_<name>`` binds; ``database``;
  ``default_format``; ``session_id``/``session_timeout``/``session_check`` (one chDB handle per
  session, so ``SET``, ``USE`` and temporary tables persist like ClickHouse sessions); every other
  parameter that is not a transport parameter is applied as a setting for that query.
- ``INSERT ... FORMAT <fmt>`` followed by data (any format chDB reads): the data is written to a
  temporary file and inserted with ``INSERT ... FROM INFILE``.
- Request bodies with ``Content-Encoding`` lz4 / zstd / gzip / deflate and chunked transfer
  encoding; response compression (lz4 / zstd / gzip / deflate) when the client sends
  ``enable_http_compression=1`` and ``Accept-Encoding``.
- Response headers ``X-ClickHouse-Query-Id``, ``-Format`` (only for statements that produce a
  result set, as clickhouse-connect's ``command`` expects), ``-Timezone``, ``-Summary``,
  ``-Server-Display-Name``; errors as HTTP 4xx/5xx with ``X-ClickHouse-Exception-Code`` and a
  ``Code: N. DB::Exception: ...`` body.

Not implemented (answered with a ``NOT_IMPLEMENTED`` error, never silently): external data
(file parts of a multipart request), ClickHouse's own block compression (``compress=1`` /
``decompress=1``), ``br`` request bodies. Progress headers are not sent; every response is
buffered (as with ``wait_end_of_query=1``). Authentication: any user and password are accepted;
bind to loopback only. One lock serializes every chDB call of the server, so its queries run one
at a time (statements the owning process runs on its own chDB client do not take that lock).
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import logging
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zlib
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP as HTTP_POLICY
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]

DISPLAY_NAME = "chdb-http"
DEFAULT_SESSION_TIMEOUT_S = 60.0
MAX_POOLED_HANDLES = 16
MAX_SESSIONS = 1024

# URL parameters the HTTP layer consumes itself; everything else except param_* is a setting.
TRANSPORT_PARAMS = frozenset(
    {
        "query",
        "database",
        "default_format",
        "user",
        "password",
        "quota_key",
        "query_id",
        "session_id",
        "session_timeout",
        "session_check",
        "compress",
        "decompress",
        "buffer_size",
        "wait_end_of_query",
        "client_protocol_version",
        "role",
        "send_progress_in_http_headers",
        "http_headers_progress_interval_ms",
        "enable_http_compression",
        "http_zlib_compression_level",
        "http_native_compression_disable_checksumming_on_decompress",
        "cancel_http_readonly_queries_on_client_close",
        "max_query_size_in_url",
    }
)

# ClickHouse error codes used by the bridge itself, and the HTTP status ClickHouse gives them.
NOT_IMPLEMENTED = 48
SYNTAX_ERROR = 62
SESSION_NOT_FOUND = 372
CANNOT_DECOMPRESS = 271
STD_EXCEPTION = 1001
_STATUS_BY_CODE = {
    **dict.fromkeys((62, 36, 47, 53, 42, 43, 44, 115, 117, 6, 27, 32, 38, 41, 72, 271), 400),
    **dict.fromkeys((46, 50, 60, 73, 81), 404),
    164: 403,
    **dict.fromkeys((192, 194, 195, 516), 401),
    NOT_IMPLEMENTED: 501,
}
_CODE_RE = re.compile(r"Code: (\d+)\.")
_NAME_RE = re.compile(r"\(([A-Z][A-Z0-9_]+)\)\s*$")

# "INSERT INTO t (a, b) [SETTINGS k = v] FORMAT Native\n<data>" -> statement, settings, format, data
_INSERT_FORMAT_RE = re.compile(
    rb"^\s*INSERT\s+INTO\s+.*?\bFORMAT\s+([A-Za-z][A-Za-z0-9_]*)[ \t]*(?:\r?\n)?",
    re.IGNORECASE | re.DOTALL,
)
_INSERT_SETTINGS_RE = re.compile(rb"\bSETTINGS\s+[A-Za-z_]\w*\s*=", re.IGNORECASE)
_TRAILING_FORMAT_RE = re.compile(r"\bFORMAT\s+([A-Za-z][A-Za-z0-9_]*)\s*;?\s*$", re.IGNORECASE)
_LEADING_KEYWORD_RE = re.compile(r"^\s*(?:(?:--[^\n]*\n|/\*.*?\*/)\s*)*([A-Za-z]+)", re.DOTALL)
_SETTING_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_RESULT_KEYWORDS = frozenset({"SELECT", "WITH", "SHOW", "DESC", "DESCRIBE", "EXISTS", "EXPLAIN"})
_CONTENT_TYPES = {
    "TabSeparated": "text/tab-separated-values; charset=UTF-8",
    "TSV": "text/tab-separated-values; charset=UTF-8",
    "CSV": "text/csv; charset=UTF-8; header=absent",
    "JSON": "application/json; charset=UTF-8",
    "JSONEachRow": "application/x-ndjson; charset=UTF-8",
}
_WITH_NAMES = {"TabSeparated": "TabSeparatedWithNames", "TSV": "TSVWithNames"}


class ServerError(Exception):
    """An error answered to the client as a ClickHouse exception."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    @classmethod
    def from_engine(cls, ex: BaseException) -> ServerError:
        text = str(ex).strip()
        idx = text.find("Code: ")
        if idx > 0:
            text = text[idx:]
        m = _CODE_RE.match(text)
        return cls(int(m.group(1)) if m else STD_EXCEPTION, text)

    def body(self, version: str) -> bytes:
        text = self.message
        if not text.startswith("Code: "):
            name = {
                NOT_IMPLEMENTED: "NOT_IMPLEMENTED",
                SYNTAX_ERROR: "SYNTAX_ERROR",
                SESSION_NOT_FOUND: "SESSION_NOT_FOUND",
                CANNOT_DECOMPRESS: "CANNOT_DECOMPRESS",
            }.get(self.code, "STD_EXCEPTION")
            text = f"Code: {self.code}. DB::Exception: {text}. ({name})"
        return f"{text} (version {version} ({DISPLAY_NAME}))\n".encode()

    @property
    def http_status(self) -> int:
        return _STATUS_BY_CODE.get(self.code, 500)


@dataclass
class Result:
    body: bytes
    fmt: str | None  # None: the statement produced no result set
    summary: dict[str, str]
    timezone: str


@dataclass
class _Handle:
    conn: Any
    database: str | None = None
    applied: dict[str, str] = field(default_factory=dict)
    last_used: float = 0.0
    timeout: float = DEFAULT_SESSION_TIMEOUT_S


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _quote_ident(name: str) -> str:
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


def _setting_literal(value: str) -> str:
    # Map / array settings (additional_table_filters, ...) arrive as ClickHouse literals.
    stripped = value.strip()
    if stripped[:1] in ("{", "[") and stripped[-1:] in ("}", "]"):
        return stripped
    return _quote(value)


def _leading_keyword(sql: str) -> str:
    m = _LEADING_KEYWORD_RE.match(sql)
    return m.group(1).upper() if m else ""


class Engine:
    """Owns the chDB engine of one directory; every call is serialized by one lock."""

    def __init__(self, path: Path) -> None:
        import chdb

        self._chdb = chdb
        self._path = str(path)
        path.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # The root handle keeps the engine open for the life of the server.
        self._root = chdb.connect(self._path)
        row = self._root.query("SELECT version(), timezone()", "TabSeparated").bytes()
        self.version, self.timezone = row.decode().rstrip("\n").split("\t")
        self._sessions: dict[str, _Handle] = {}
        self._pool: OrderedDict[tuple[str, tuple[tuple[str, str], ...]], _Handle] = OrderedDict()
        self._tmp = Path(tempfile.mkdtemp(prefix="chdb-http-"))
        self._closed = False

    # ---- handles -------------------------------------------------------------------------

    def _open(self) -> _Handle:
        return _Handle(conn=self._chdb.connect(self._path))

    @staticmethod
    def _close_handle(handle: _Handle) -> None:
        with contextlib.suppress(Exception):
            handle.conn.close()

    def _expire_sessions(self, now: float) -> None:
        for sid, h in list(self._sessions.items()):
            if now - h.last_used > h.timeout:
                del self._sessions[sid]
                self._close_handle(h)

    def _session_handle(self, params: Mapping[str, str], now: float) -> _Handle:
        sid = params["session_id"]
        handle = self._sessions.get(sid)
        if handle is None:
            if params.get("session_check") in ("1", "true"):
                raise ServerError(SESSION_NOT_FOUND, f"Session {sid} not found")
            if len(self._sessions) >= MAX_SESSIONS:
                oldest = min(self._sessions, key=lambda s: self._sessions[s].last_used)
                self._close_handle(self._sessions.pop(oldest))
            handle = self._open()
            self._sessions[sid] = handle
        if "session_timeout" in params:
            try:
                handle.timeout = float(params["session_timeout"])
            except ValueError:
                raise ServerError(
                    36, f"Invalid session timeout: {params['session_timeout']!r}"
                ) from None
        handle.last_used = now
        return handle

    def _pooled_handle(self, database: str, settings: dict[str, str]) -> _Handle:
        key = (database, tuple(sorted(settings.items())))
        handle = self._pool.pop(key, None)
        if handle is None:
            handle = self._open()
            if len(self._pool) >= MAX_POOLED_HANDLES:
                _, old = self._pool.popitem(last=False)
                self._close_handle(old)
        self._pool[key] = handle
        return handle

    def _call(self, handle: _Handle, sql: str | bytes, fmt: str, params: dict[str, str]) -> Any:
        try:
            return handle.conn.query(sql, fmt, params=params)
        except Exception as ex:
            raise ServerError.from_engine(ex) from ex

    def _prepare(self, handle: _Handle, database: str | None, settings: dict[str, str]) -> None:
        """Bring the handle's current database and settings to what this request asks."""
        if database and database != handle.database:
            self._call(handle, f"USE {_quote_ident(database)}", "TabSeparated", {})
            handle.database = database
        for key in [k for k in handle.applied if k not in settings]:
            self._call(handle, f"SET {key} = DEFAULT", "TabSeparated", {})
            del handle.applied[key]
        for key, value in settings.items():
            if handle.applied.get(key) == value:
                continue
            if not _SETTING_NAME_RE.match(key):
                raise ServerError(115, f"Unknown setting {key!r}")
            self._call(handle, f"SET {key} = {_setting_literal(value)}", "TabSeparated", {})
            handle.applied[key] = value

    # ---- execution -----------------------------------------------------------------------

    def execute(self, text: bytes, params: Mapping[str, str]) -> Result:
        if self._closed:
            raise ServerError(STD_EXCEPTION, "Server is shutting down")
        if not text.strip():
            raise ServerError(SYNTAX_ERROR, "Empty query")
        settings = {
            k: v
            for k, v in params.items()
            if k not in TRANSPORT_PARAMS and not k.startswith("param_")
        }
        binds = {k[6:]: v for k, v in params.items() if k.startswith("param_")}
        database = params.get("database") or None

        infile: Path | None = None
        m = _INSERT_FORMAT_RE.match(text[: 1 << 20])
        try:
            if m:
                fmt = m.group(1).decode()
                head = text[: m.start(1)].rstrip()
                head = head[: -len(b"FORMAT")].rstrip()
                clause = b""
                sm = _INSERT_SETTINGS_RE.search(head)
                if sm:
                    head, clause = head[: sm.start()].rstrip(), b" " + head[sm.start() :]
                infile = self._tmp / f"{uuid.uuid4().hex}.data"
                with infile.open("wb") as f:
                    f.write(memoryview(text)[m.end() :])
                sql = (
                    f"{head.decode()} FROM INFILE {_quote(str(infile))}"
                    f"{clause.decode()} FORMAT {fmt}"
                )
                return self._run(sql, None, False, settings, binds, database, params)
            try:
                sql_text: str | bytes = text.decode()
            except UnicodeDecodeError:
                sql_text = text
            as_str = sql_text if isinstance(sql_text, str) else text.decode("latin-1")
            fm = _TRAILING_FORMAT_RE.search(as_str)
            keyword = _leading_keyword(as_str)
            if fm:
                return self._run(sql_text, fm.group(1), True, settings, binds, database, params)
            fmt = params.get("default_format") or "TabSeparated"
            return self._run(
                sql_text, fmt, keyword in _RESULT_KEYWORDS, settings, binds, database, params
            )
        finally:
            if infile is not None:
                with contextlib.suppress(OSError):
                    infile.unlink()

    def _run(
        self,
        sql: str | bytes,
        fmt: str | None,
        known_result: bool,
        settings: dict[str, str],
        binds: dict[str, str],
        database: str | None,
        params: Mapping[str, str],
    ) -> Result:
        run_fmt = fmt or "TabSeparated"
        names_line = False
        if fmt and not known_result and fmt in _WITH_NAMES:
            # A statement that produces a result set always emits the names line; DDL emits
            # nothing. That tells ClickHouse's X-ClickHouse-Format behaviour apart.
            run_fmt, names_line = _WITH_NAMES[fmt], True
        keyword = _leading_keyword(sql if isinstance(sql, str) else sql.decode("latin-1"))
        now = time.monotonic()
        with self._lock:
            if self._closed:
                raise ServerError(STD_EXCEPTION, "Server is shutting down")
            self._expire_sessions(now)
            throwaway = False
            if params.get("session_id"):
                handle = self._session_handle(params, now)
            elif keyword in ("SET", "USE"):
                # Without a session, SET and USE must not leak into later queries.
                handle, throwaway = self._open(), True
            else:
                handle = self._pooled_handle(database or "default", settings)
                database = database or "default"
            try:
                self._prepare(handle, database, settings)
                result = self._call(handle, sql, run_fmt, binds)
                if keyword == "USE":
                    handle.database = None
                # Copy the result out before another request can use this handle.
                body = bytes(result.bytes() or b"")
                summary = self._summary(result)
            finally:
                if throwaway:
                    self._close_handle(handle)
        if names_line:
            if body:
                nl = body.find(b"\n")
                body = body[nl + 1 :] if nl >= 0 else b""
                out_fmt: str | None = fmt
            else:
                out_fmt = None
        elif known_result:
            out_fmt = fmt
        else:
            out_fmt = fmt if body else None
        summary["result_bytes"] = str(len(body))
        tz = settings.get("session_timezone") or self.timezone
        return Result(body=body, fmt=out_fmt, summary=summary, timezone=tz)

    @staticmethod
    def _summary(result: Any) -> dict[str, str]:
        out: dict[str, str] = {}
        for key, attr in (
            ("read_rows", "rows_read"),
            ("read_bytes", "bytes_read"),
            ("written_rows", "rows_written"),
            ("written_bytes", "bytes_written"),
        ):
            try:
                out[key] = str(int(getattr(result, attr)()))
            except Exception:
                out[key] = "0"
        out["total_rows_to_read"] = out["read_rows"]
        try:
            out["elapsed_ns"] = str(int(result.elapsed() * 1_000_000_000))
        except Exception:
            out["elapsed_ns"] = "0"
        return out

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for h in list(self._sessions.values()) + list(self._pool.values()):
                self._close_handle(h)
            self._sessions.clear()
            self._pool.clear()
            with contextlib.suppress(Exception):
                self._root.close()
            shutil.rmtree(self._tmp, ignore_errors=True)


# ---- HTTP ----------------------------------------------------------------------------------


def _decompress_body(data: bytes, encoding: str) -> bytes:
    enc = encoding.strip().lower()
    if enc in ("", "identity", "none"):
        return data
    try:
        if enc == "lz4":
            import lz4.frame

            out = bytearray()
            rest = data
            while rest:
                d = lz4.frame.LZ4FrameDecompressor()
                out += d.decompress(rest)
                if not d.eof:
                    raise ValueError("truncated lz4 frame")
                rest = d.unused_data
            return bytes(out)
        if enc == "zstd":
            from backports import zstd

            return zstd.decompress(data)
        if enc in ("gzip", "x-gzip"):
            return gzip.decompress(data)
        if enc == "deflate":
            return zlib.decompress(data)
    except Exception as ex:
        raise ServerError(CANNOT_DECOMPRESS, f"Cannot decompress {enc} request body: {ex}") from ex
    raise ServerError(NOT_IMPLEMENTED, f"Unsupported Content-Encoding {encoding!r}")


def _compress_body(data: bytes, accept: str) -> tuple[bytes, str | None]:
    for coding in (t.split(";")[0].strip().lower() for t in accept.split(",")):
        if coding == "lz4":
            import lz4.frame

            return lz4.frame.compress(data), "lz4"
        if coding == "zstd":
            from backports import zstd

            return zstd.compress(data), "zstd"
        if coding == "gzip":
            return gzip.compress(data), "gzip"
        if coding == "deflate":
            return zlib.compress(data), "deflate"
    return data, None


def _parse_multipart(content_type: str, body: bytes) -> dict[str, str]:
    msg = BytesParser(policy=HTTP_POLICY).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body
    )
    fields: dict[str, str] = {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if part.get_filename() is not None or not name:
            raise ServerError(NOT_IMPLEMENTED, "External data is not supported by chdb-http")
        payload = part.get_payload(decode=True)
        fields[str(name)] = payload.decode() if isinstance(payload, bytes) else ""
    return fields


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], engine: Engine, compress: bool) -> None:
        super().__init__(addr, _Handler)
        self.engine = engine
        self.compress_responses = compress


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = DISPLAY_NAME
    disable_nagle_algorithm = True  # headers and body are separate writes: avoid the 40 ms stall
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            out = bytearray()
            while True:
                line = self.rfile.readline(65537)
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline(65537)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes, headers: Mapping[str, str]) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _serve(self) -> None:
        engine = self.server.engine
        url = urlsplit(self.path)
        params = dict(parse_qsl(url.query, keep_blank_values=True))
        query_id = params.get("query_id") or str(uuid.uuid4())
        base = {
            "X-ClickHouse-Server-Display-Name": DISPLAY_NAME,
            "X-ClickHouse-Query-Id": query_id,
            "X-ClickHouse-Timezone": engine.timezone,
        }
        try:
            body = self._read_body()
            if url.path not in ("", "/"):
                if url.path == "/ping":
                    self._send(200, b"Ok.\n", {"Content-Type": "text/html; charset=UTF-8"})
                else:
                    self._send(404, b"There is no handle " + url.path.encode() + b"\n", base)
                return
            if body:
                body = _decompress_body(body, self.headers.get("Content-Encoding", ""))
            ctype = self.headers.get("Content-Type", "")
            if ctype.lower().startswith("multipart/form-data"):
                params.update(_parse_multipart(ctype, body))
                body = b""
            if params.get("compress") in ("1", "true") or params.get("decompress") in ("1", "true"):
                raise ServerError(
                    NOT_IMPLEMENTED, "ClickHouse block compression (compress/decompress)"
                )
            query = params.get("query", "").encode()
            if query and body:
                text = query + b"\n" + body
            else:
                text = query or body
            if not text and self.command == "GET":
                self._send(200, b"Ok.\n", {"Content-Type": "text/html; charset=UTF-8"})
                return
            log.debug(
                "query %s session=%s encoding=%r: %.200r",
                query_id,
                params.get("session_id"),
                self.headers.get("Content-Encoding"),
                text[:200],
            )
            result = engine.execute(text, params)
        except ServerError as ex:
            log.debug("query %s failed: %s", query_id, ex.message)
            headers = dict(base)
            headers["X-ClickHouse-Exception-Code"] = str(ex.code)
            headers["Content-Type"] = "text/plain; charset=UTF-8"
            self._send(ex.http_status, ex.body(engine.version), headers)
            return
        except (ConnectionError, TimeoutError):
            self.close_connection = True
            return
        except Exception as ex:
            log.exception("chdb-http internal error")
            err = ServerError(STD_EXCEPTION, f"{type(ex).__name__}: {ex}")
            headers = dict(base)
            headers["X-ClickHouse-Exception-Code"] = str(err.code)
            self._send(500, err.body(engine.version), headers)
            return
        headers = dict(base)
        headers["X-ClickHouse-Timezone"] = result.timezone
        headers["X-ClickHouse-Summary"] = json.dumps(result.summary, separators=(",", ":"))
        headers["Content-Type"] = _CONTENT_TYPES.get(result.fmt or "", "application/octet-stream")
        if result.fmt:
            headers["X-ClickHouse-Format"] = result.fmt
        out = result.body
        accept = self.headers.get("Accept-Encoding", "")
        if (
            out
            and accept
            and self.server.compress_responses
            and params.get("enable_http_compression") in ("1", "true")
        ):
            out, encoding = _compress_body(out, accept)
            if encoding:
                headers["Content-Encoding"] = encoding
        try:
            self._send(200, out, headers)
        except (ConnectionError, TimeoutError):
            self.close_connection = True


# ---- process entry point -------------------------------------------------------------------


def _parent_alive(pid: int, initial_ppid: int) -> bool:
    if pid == initial_ppid and os.getppid() != pid:
        return False  # our parent died and we were re-parented
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def serve(
    path: Path,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    parent_pid: int | None = None,
    compress_responses: bool = True,
) -> None:
    """Serve until SIGTERM/SIGINT (or until ``parent_pid`` exits)."""
    engine = Engine(path)
    httpd = _Server((host, port), engine, compress_responses)
    stop = threading.Event()
    initial_ppid = os.getppid()

    def _on_signal(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    thread = threading.Thread(target=httpd.serve_forever, name="chdb-http", daemon=True)
    thread.start()
    log.info("chdb-http on %s:%s serving %s (ClickHouse %s)", host, port, path, engine.version)
    print(f"LISTENING {httpd.server_address[1]}", flush=True)
    try:
        while not stop.wait(0.5):
            if parent_pid is not None and not _parent_alive(parent_pid, initial_ppid):
                log.warning("parent %s is gone; shutting down", parent_pid)
                break
    finally:
        httpd.shutdown()
        httpd.server_close()
        engine.close()


class StoreServer:
    """The store server inside the process that owns the chDB directory (threads, loopback).

    ``url`` is ``http://<host>:<port>`` for clickhouse-connect (``TALLY_CLICKHOUSE_URL``).
    """

    def __init__(self, path: Path, host: str = "127.0.0.1", port: int = 0) -> None:
        self.engine = Engine(path)
        self.httpd = _Server((host, port), self.engine, True)
        self.url = f"http://{host}:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, name="tally-store-server", daemon=True
        )

    def start(self) -> StoreServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.engine.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m clickhouse.server", description=__doc__)
    ap.add_argument("--path", required=True, type=Path, help="chDB data directory")
    ap.add_argument("--port", type=int, default=0, help="0 = pick a free port")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--parent-pid", type=int, default=None, help="exit when this process exits")
    ap.add_argument(
        "--no-response-compression", action="store_true", help="never compress responses"
    )
    ap.add_argument("--log-level", default=os.environ.get("CHDB_HTTP_LOG_LEVEL", "WARNING"))
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s chdb-http %(levelname)s %(message)s"
    )
    serve(
        args.path,
        args.host,
        args.port,
        parent_pid=args.parent_pid,
        compress_responses=not args.no_response_compression,
    )
    return 0


# ---- helpers for tests ---------------------------------------------------------------------


def start_server(
    path: Path | str,
    port: int = 0,
    *,
    host: str = "127.0.0.1",
    timeout: float = 60.0,
    log_file: Path | str | None = None,
    exit_with_parent: bool = True,
) -> tuple[subprocess.Popen[bytes], str]:
    """Start a bridge subprocess on ``path`` and wait until it accepts connections.

    Returns ``(process, url)`` with ``url`` = ``http://<host>:<port>`` (give it to
    ``clickhouse_connect.get_client(dsn=url)`` or ``TALLY_CLICKHOUSE_URL``). Server logs go to
    ``log_file`` (appended) or to this process's stderr. Stop it with ``stop_server``; a crash is
    ``process.kill()`` followed by ``process.wait()``.
    """
    cmd = [
        sys.executable,
        "-m",
        "clickhouse.server",
        "--path",
        str(path),
        "--port",
        str(port),
        "--host",
        host,
    ]
    if exit_with_parent:
        cmd += ["--parent-pid", str(os.getpid())]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    stderr_file = open(log_file, "ab") if log_file is not None else None
    try:
        proc = subprocess.Popen(
            cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=stderr_file
        )
    finally:
        if stderr_file is not None:
            stderr_file.close()
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    buf = b""
    fd = proc.stdout.fileno()
    # selectors (epoll), not select(): a long test session may hold fds numbered above 1024.
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            stop_server(proc)
            raise TimeoutError(f"chdb-http on {path} not ready after {timeout}s")
        if sel.select(min(left, 0.5)):
            chunk = os.read(fd, 4096)
            if not chunk:
                code = proc.wait()
                raise RuntimeError(
                    f"chdb-http on {path} exited with {code} before listening "
                    f"(see {log_file or 'stderr'})"
                )
            buf += chunk
    sel.close()
    line = buf.split(b"\n", 1)[0].decode().strip()
    if not line.startswith("LISTENING "):
        stop_server(proc)
        raise RuntimeError(f"chdb-http printed {line!r} instead of LISTENING <port>")
    return proc, f"http://{host}:{int(line.split()[1])}"


def stop_server(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> int:
    """Stop a bridge started by ``start_server`` (SIGTERM, then SIGKILL); returns its exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()
    return proc.returncode


stop = stop_server


class Bridge:
    """A restartable bridge process on one directory; keeps its port across restarts.

    ``with Bridge(dir) as b:`` starts it; ``b.url`` is stable across ``b.kill()`` (SIGKILL, a
    crash) and ``b.start()`` (same directory, same port), so clients configured with the URL
    reconnect to the restarted server.
    """

    def __init__(
        self, path: Path | str, port: int = 0, *, log_file: Path | str | None = None
    ) -> None:
        self.path = Path(path)
        self.port = port
        self.log_file = log_file
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self, timeout: float = 60.0) -> str:
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError(f"chdb-http on {self.path} is already running")
        self.proc, self.url = start_server(
            self.path, self.port, timeout=timeout, log_file=self.log_file
        )
        self.port = int(self.url.rsplit(":", 1)[1])
        return self.url

    def kill(self) -> None:
        """SIGKILL the server and reap it (no shutdown of chDB: a crash)."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            stop_server(self.proc)

    def stop(self) -> int:
        """Graceful stop; returns the exit code (0 after a clean shutdown)."""
        return stop_server(self.proc) if self.proc is not None else 0

    def __enter__(self) -> Bridge:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    sys.exit(main())
