"""Log formats and the request context (pure: records formatted in memory)."""

from __future__ import annotations

import json
import logging

from hypothesis import given
from hypothesis import strategies as st

from tally import log as tlog


def record(msg: str = "stored %d events", *args: object, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("streams.worker", logging.INFO, __file__, 1, msg, args or (5,), None)
    for k, v in extra.items():
        setattr(rec, k, v)
    return rec


def fmt_json(rec: logging.LogRecord) -> dict[str, object]:
    tlog.ContextFilter().filter(rec)
    out: dict[str, object] = json.loads(tlog.JsonFormatter().format(rec))
    return out


def test_json_line_has_time_level_logger_message_and_extras() -> None:
    out = fmt_json(record(events=5, lag=0))
    assert out["level"] == "INFO" and out["logger"] == "streams.worker"
    assert out["message"] == "stored 5 events"
    assert out["events"] == 5 and out["lag"] == 0
    assert str(out["time"]).endswith("Z") and len(str(out["time"])) == 24
    assert "request_id" not in out and "tenant" not in out  # outside a request


def test_json_line_inside_a_request_carries_its_id_and_tenant() -> None:
    ctx, token = tlog.begin_request("req-1")
    try:
        tlog.note_tenant("acme")
        out = fmt_json(record())
    finally:
        tlog.end_request(token)
    assert out["request_id"] == "req-1" and out["tenant"] == "acme"
    assert ctx.tenant == "acme"
    assert tlog.current_request() is None


def test_json_line_with_an_exception() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        rec = record()
        rec.exc_info = sys.exc_info()
    out = fmt_json(rec)
    assert "ValueError: boom" in str(out["exc_info"])


def test_text_line_appends_request_id_and_tenant() -> None:
    _ctx, token = tlog.begin_request("abc")
    try:
        tlog.note_tenant("t1")
        rec = record()
        tlog.ContextFilter().filter(rec)
        line = tlog.TextFormatter().format(rec)
    finally:
        tlog.end_request(token)
    assert line.endswith("INFO streams.worker: stored 5 events [request_id=abc tenant=t1]")
    rec = record()
    tlog.ContextFilter().filter(rec)
    assert tlog.TextFormatter().format(rec).endswith("streams.worker: stored 5 events")


def test_note_collects_counts_for_the_access_line() -> None:
    ctx, token = tlog.begin_request("r")
    try:
        tlog.note(events=10, accepted=9)
    finally:
        tlog.end_request(token)
    assert ctx.fields == {"events": 10, "accepted": 9}
    tlog.note(events=1)  # outside a request: nothing to note on, no error


def test_request_ids_are_accepted_only_when_sane() -> None:
    assert tlog.accept_request_id("abc-123_X.y:z/1+2=3@host") == "abc-123_X.y:z/1+2=3@host"
    assert tlog.accept_request_id("  padded  ") == "padded"
    for bad in (None, "", "a b", 'x"y', "line\nbreak", "x" * 129, "é"):
        new = tlog.accept_request_id(bad)
        assert new != bad and len(new) == 32 and int(new, 16) >= 0


@given(st.text(max_size=200))
def test_any_header_gives_a_log_safe_id(value: str) -> None:
    rid = tlog.accept_request_id(value)
    assert 1 <= len(rid) <= 128
    assert all(c.isascii() and (c.isalnum() or c in "._:/+=@-") for c in rid)
