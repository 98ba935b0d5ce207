"""Logging configuration and the request context carried by log lines.

Only entry points (CLI, test conftest) call ``configure``. Two formats (setting ``log_format``):

- ``text`` (the default, for a terminal): ``<time> <level> <logger>: <message>``, followed by
  ``[request_id=... tenant=...]`` when the line was logged while serving a request;
- ``json``: one object per line with ``time`` (UTC, ms), ``level``, ``logger``, ``message``, the
  request's ``request_id`` and ``tenant`` when there is one, every field passed in ``extra=``
  (counts such as ``events``, ``lag``; the names are free), and ``exc_info`` as text.

The request context (``RequestContext``) is set by the API's middleware for each request
(``X-Request-ID`` or a new id) and completed by authentication (``note_tenant``); a filter puts
it on every record, so any ``log.info`` made while serving the request carries them.
Secrets never go into a context or an ``extra``: API keys and tokens are not logged.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import re
import sys
import uuid
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=@-]{1,128}$")

# attributes every LogRecord has; everything else on a record came from ``extra=``
_STANDARD = frozenset(
    vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None)).keys()
    | {"message", "asctime", "request_id", "tenant", "taskName"}
)


@dataclass
class RequestContext:
    request_id: str
    tenant: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)  # counts for the access log line


_current: ContextVar[RequestContext | None] = ContextVar("tally_request", default=None)


def new_request_id() -> str:
    return uuid.uuid4().hex


def accept_request_id(value: str | None) -> str:
    """The client's ``X-Request-ID`` if it is a sane token (1-128 of ``A-Za-z0-9._:/+=@-``),
    else a new id: a client cannot inject spaces, quotes or newlines into the logs."""
    if value is not None:
        value = value.strip()
        if _REQUEST_ID.match(value):
            return value
    return new_request_id()


def begin_request(request_id: str) -> tuple[RequestContext, Any]:
    """Start a request's context; returns it and the token for ``end_request``."""
    ctx = RequestContext(request_id)
    return ctx, _current.set(ctx)


def end_request(token: Any) -> None:
    _current.reset(token)


def current_request() -> RequestContext | None:
    return _current.get()


def note_tenant(tenant_id: str) -> None:
    """Record the authenticated tenant on the current request (no-op outside a request)."""
    ctx = _current.get()
    if ctx is not None:
        ctx.tenant = tenant_id


def note(**fields: Any) -> None:
    """Add counts (e.g. ``events=``) to the current request's access log line."""
    ctx = _current.get()
    if ctx is not None:
        ctx.fields.update(fields)


class ContextFilter(logging.Filter):
    """Puts ``request_id`` and ``tenant`` of the current request on every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = _current.get()
        if not hasattr(record, "request_id"):
            record.request_id = ctx.request_id if ctx is not None else None
        if not hasattr(record, "tenant"):
            record.tenant = ctx.tenant if ctx is not None else None
        return True


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    """One JSON object per line (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, UTC)
        out: dict[str, Any] = {
            "time": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = getattr(record, "request_id", None)
        if rid is not None:
            out["request_id"] = rid
        tenant = getattr(record, "tenant", None)
        if tenant is not None:
            out["tenant"] = tenant
        for k, v in _extras(record).items():
            out.setdefault(k, v)
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack_info"] = record.stack_info
        return json.dumps(out, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """The plain format, with the request's id and tenant appended when there is one."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        rid = getattr(record, "request_id", None)
        if rid is None:
            return line
        tenant = getattr(record, "tenant", None)
        tail = f" [request_id={rid}" + (f" tenant={tenant}" if tenant else "") + "]"
        first, nl, rest = line.partition("\n")
        return first + tail + nl + rest


def configure(level: str = "INFO", fmt: str = "text") -> None:
    # a crash in native code (SIGSEGV, SIGABRT...) prints every thread's Python stack to stderr
    # instead of dying silently
    faulthandler.enable(sys.stderr, all_threads=True)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if str(fmt) == "json" else TextFormatter())
    handler.addFilter(ContextFilter())
    logging.basicConfig(level=level, handlers=[handler], force=True)
    # Faust/aiokafka are chatty at INFO.
    for noisy in ("aiokafka", "faust", "mode", "kafka"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
