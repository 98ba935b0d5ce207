"""A lean HTTP/1.1 client for the load generator: one keep-alive connection per simulated client,
requests written as bytes, answers read with ``asyncio`` streams.

Why not httpx here: the load generator shares the 2 cores with the Tally it measures, and every
CPU-second it spends is one Tally does not get. httpx's ``AsyncClient`` spent 2.2-2.3 ms of CPU
per 214 KB ingest request with 32 connections in one process (0.7-0.9 ms with 8), against
0.06-0.07 ms for the same requests written on an ``asyncio`` stream (docs/performance.md, "The
load generator's HTTP client"). The rest of the harness (queries, probes) keeps httpx.

What it speaks: HTTP/1.1 over TCP or TLS (``https://``), answers with ``content-length``, chunked
answers, and answers delimited by the server closing the connection. A connection the server
closed while idle is opened again before the request is written; a failure after that (reset,
timeout, a malformed answer) closes it and is raised to the caller, who decides to retry.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from dataclasses import dataclass
from urllib.parse import urlencode, urlsplit

HEAD_LIMIT = 64 * 1024  # status line and headers of one answer
_HEX = re.compile(rb"[0-9A-Fa-f]+")


class HttpError(Exception):
    """The request got no complete answer (connection refused, reset or closed, or an answer
    this client cannot read). A timeout raises ``TimeoutError`` instead. ``kind``: a short name
    of what happened, for counting (the exception's type name, or ``bad_answer``)."""

    def __init__(self, message: str, kind: str = "bad_answer") -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]  # names in lower case; a repeated header keeps its last value
    body: bytes


@dataclass(frozen=True)
class Target:
    """Where requests go: the connection's address and the request target (path and query)."""

    scheme: str
    host: str
    port: int
    target: str

    @classmethod
    def of(cls, url: str, params: dict[str, str] | None = None) -> Target:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"url must start with http:// or https://, got {url!r}")
        if not parts.hostname:
            raise ValueError(f"url has no host: {url!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        query = "&".join(q for q in (parts.query, urlencode(params or {})) if q)
        target = (parts.path or "/") + (f"?{query}" if query else "")
        return cls(parts.scheme, parts.hostname, port, target)

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"


class Connection:
    """One keep-alive connection to ``target``; requests on it run one at a time."""

    def __init__(self, target: Target, headers: dict[str, str], timeout_s: float) -> None:
        self.target = target
        self.timeout_s = timeout_s
        fixed = {"host": target.host_header, **{k.lower(): v for k, v in headers.items()}}
        self._head = (
            f"POST {target.target} HTTP/1.1\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in fixed.items())
            + "content-length: "
        ).encode("latin-1")
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._ssl: ssl.SSLContext | None = None  # built on the first open of an https target

    async def post(self, body: bytes) -> Answer:
        """POST ``body``; the answer, or ``HttpError`` / ``TimeoutError`` (connection closed)."""
        try:
            async with asyncio.timeout(self.timeout_s):
                reader, writer = await self._open()
                writer.write(self._head + b"%d\r\n\r\n" % len(body))
                writer.write(body)
                await writer.drain()
                answer, keep = await _read_answer(reader)
        except (TimeoutError, HttpError):
            self.close()
            raise
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            self.close()
            raise HttpError(f"{type(exc).__name__}: {exc}", type(exc).__name__) from exc
        if not keep:
            self.close()
        return answer

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._reader is not None and self._writer is not None:
            if not self._reader.at_eof() and not self._writer.is_closing():
                return self._reader, self._writer
            self.close()  # closed by the server while idle: open a new one
        if self.target.scheme == "https" and self._ssl is None:
            self._ssl = ssl.create_default_context()
        context = self._ssl
        self._reader, self._writer = await asyncio.open_connection(
            self.target.host,
            self.target.port,
            ssl=context,
            limit=HEAD_LIMIT,
            server_hostname=self.target.host if context else None,
        )
        return self._reader, self._writer

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


def _digits(text: str) -> bool:
    """ASCII digits only (``str.isdigit`` alone also takes e.g. the superscripts a latin-1
    header can hold, which ``int`` refuses)."""
    return text.isascii() and text.isdigit()  # False for an empty text too


async def _read_answer(reader: asyncio.StreamReader) -> tuple[Answer, bool]:
    """One answer; and whether the connection can carry the next request."""
    while True:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head[:-4].decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        code = rest[:3]
        if not version.startswith("HTTP/1.") or len(code) != 3 or not _digits(code):
            raise HttpError(f"not an HTTP/1.x status line: {lines[0][:100]!r}")
        status = int(code)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise HttpError(f"malformed header line: {line[:100]!r}")
            headers[name.strip().lower()] = value.strip()
        if status >= 200:
            break  # 1xx (100 Continue, 103 Early Hints): a final answer follows
    connection = headers.get("connection", "").lower()
    keep = "close" not in connection and (version != "HTTP/1.0" or "keep-alive" in connection)
    if status in (204, 304):
        return Answer(status, headers, b""), keep
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return Answer(status, headers, await _read_chunked(reader)), keep
    length = headers.get("content-length")
    if length is not None:
        if not _digits(length):
            raise HttpError(f"invalid content-length {length[:40]!r}")
        return Answer(status, headers, await reader.readexactly(int(length))), keep
    return Answer(status, headers, await reader.read()), False  # delimited by the close


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    chunks: list[bytes] = []
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size_text = size_line[:-2].split(b";", 1)[0].strip()
        if _HEX.fullmatch(size_text) is None:  # not ``int``'s signs, ``0x`` or underscores
            raise HttpError(f"invalid chunk size {size_text[:40]!r}")
        size = int(size_text, 16)
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":  # trailer fields, then the end
                pass
            return b"".join(chunks)
        chunks.append(await reader.readexactly(size))
        if await reader.readexactly(2) != b"\r\n":
            raise HttpError("a chunk is not followed by CRLF")
