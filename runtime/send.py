"""``tally events send FILE``: bulk-load events from NDJSON, JSON or CSV, resumably.

Reading (pure, ``read_records``): every record gets its number (line or row, 1-based) and, for
NDJSON and CSV, the byte offset where it ends, so that a run can resume by seeking.

Ids: an event without ``id`` gets one derived from its content (``derive_id``: a hash of type,
customer, time and properties), so sending the same line again gives the same id and Tally
counts it once. Two identical lines without ids are therefore one event -- give ids when
identical events are really distinct.

Resuming (``Checkpoint``): after every acknowledged stretch of records the position is written
to ``<FILE>.tally-checkpoint.json`` (atomically). A rerun of the same command continues from
there; batches that were in flight when the run stopped are sent again, which is safe because
their ids are the same. Batches are sent concurrently; the checkpoint only moves past a record
once every batch before it was acknowledged.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from schemas.events import IngestResult
from tally_client import Tally

FINGERPRINT_BYTES = 64 * 1024
EVENT_FIELDS = ("id", "type", "customer", "time", "properties")


class Format(StrEnum):
    NDJSON = "ndjson"
    JSON = "json"
    CSV = "csv"

    @classmethod
    def of(cls, path: Path, given: str | None) -> Format:
        if given:
            return cls(given.lower())
        suffix = path.suffix.lower()
        if suffix == ".csv":
            return cls.CSV
        if suffix == ".json":
            return cls.JSON
        return cls.NDJSON  # .ndjson, .jsonl, anything else


@dataclass(frozen=True, slots=True)
class Record:
    number: int  # line (NDJSON), element (JSON) or data row (CSV), 1-based
    end: int | None  # byte offset just after the record (None for JSON)
    event: dict[str, Any] | None
    error: str | None = None


def derive_id(event: dict[str, Any]) -> str:
    """A stable id from the event's content: the same line always gives the same id."""
    basis = {k: event.get(k) for k in ("type", "customer", "time", "properties")}
    digest = hashlib.sha256(orjson.dumps(basis, option=orjson.OPT_SORT_KEYS)).hexdigest()
    return "h-" + digest[:40]


def normalize(doc: Any) -> tuple[dict[str, Any] | None, str | None]:
    """A decoded record as an event (id derived when missing), or the reason it is not one."""
    if not isinstance(doc, dict):
        return None, f"expected a JSON object, got {type(doc).__name__}"
    event = dict(doc)
    if event.get("id") in (None, ""):
        event["id"] = derive_id(event)
    return event, None


def _csv_event(row: dict[str, str]) -> tuple[dict[str, Any] | None, str | None]:
    """A CSV row: columns id, type, customer, time; ``properties`` (a JSON object) and every
    other non-empty column become properties (values stay strings: meters read numeric
    strings exactly)."""
    event: dict[str, Any] = {}
    props: dict[str, Any] = {}
    for name, value in row.items():
        if name is None:
            return None, "the row has more cells than the header"
        if value is None or value == "":
            continue
        if name in ("id", "type", "customer", "time"):
            event[name] = value
        elif name == "properties":
            try:
                extra = orjson.loads(value)
            except orjson.JSONDecodeError as exc:
                return None, f"properties is not valid JSON: {exc}"
            if not isinstance(extra, dict):
                return None, "properties must be a JSON object"
            props.update(extra)
        else:
            props[name] = value
    event["properties"] = props
    return normalize(event)


class _Lines:
    """Iterate the lines of a binary file as text, tracking the byte offset consumed."""

    def __init__(self, f: BinaryIO, pos: int) -> None:
        self.f = f
        self.pos = pos

    def __iter__(self) -> Iterator[str]:
        for raw in self.f:
            self.pos += len(raw)
            yield raw.decode("utf-8-sig" if self.pos == len(raw) else "utf-8")


def read_records(
    path: Path, fmt: Format, *, skip_records: int = 0, offset: int = 0
) -> Iterator[Record]:
    """The records of ``path`` after ``skip_records`` (JSON) or from byte ``offset``
    (NDJSON, CSV; record numbers continue from ``skip_records``)."""
    if fmt is Format.JSON:
        try:
            doc = orjson.loads(path.read_bytes())
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from None
        items = doc if isinstance(doc, list) else [doc]
        for number, item in enumerate(items[skip_records:], start=skip_records + 1):
            event, error = normalize(item)
            yield Record(number, None, event, error)
        return
    with open(path, "rb") as f:
        if fmt is Format.NDJSON:
            f.seek(offset)
            pos, number = offset, skip_records
            for raw in f:
                if pos == 0 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]  # a UTF-8 byte order mark
                    pos = 3
                pos += len(raw)
                number += 1
                text = raw.strip()
                if not text:
                    continue
                try:
                    event, error = normalize(orjson.loads(text))
                except orjson.JSONDecodeError as exc:
                    event, error = None, f"not valid JSON: {exc}"
                yield Record(number, pos, event, error)
            return
        header_lines = _Lines(f, 0)
        header = next(csv.reader(header_lines), None)
        if header is None:
            return
        header = [h.strip() for h in header]
        missing = {"type", "customer"} - set(header)
        if missing:
            raise ValueError(
                f"{path}: the CSV header needs the columns type and customer "
                f"(missing: {', '.join(sorted(missing))})"
            )
        start = max(offset, header_lines.pos)
        f.seek(start)
        lines = _Lines(f, start)
        number = skip_records
        for cells in csv.reader(lines):
            number += 1
            if not cells or all(not c for c in cells):
                continue
            row = dict(zip(header, cells, strict=False))
            if len(cells) > len(header):
                row[None] = ""  # type: ignore[index]
            event, error = _csv_event(row)
            yield Record(number, lines.pos, event, error)


# --- checkpoint --------------------------------------------------------------------------------


def fingerprint(path: Path, n: int = FINGERPRINT_BYTES) -> str:
    """A hash of the first ``n`` bytes: a file that was only appended to keeps it."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(n)).hexdigest()


@dataclass
class Checkpoint:
    file: str
    format: str
    fingerprint: str
    fingerprint_bytes: int = FINGERPRINT_BYTES
    records: int = 0  # records fully handled (acknowledged or rejected), from the start
    offset: int = 0  # byte offset after them (NDJSON, CSV)
    accepted: int = 0
    rejected: int = 0
    done: bool = False
    updated_at: str = ""

    @classmethod
    def load(cls, path: Path) -> Checkpoint | None:
        try:
            return cls(**orjson.loads(path.read_bytes()))
        except FileNotFoundError:
            return None
        except (orjson.JSONDecodeError, TypeError) as exc:
            raise ValueError(
                f"the checkpoint {path} is unreadable ({exc}); use --restart"
            ) from None

    def save(self, path: Path) -> None:
        self.updated_at = datetime.now(UTC).isoformat(timespec="seconds")
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(orjson.dumps(asdict(self), option=orjson.OPT_INDENT_2))
        os.replace(tmp, path)


class CheckpointLock:
    """An exclusive lock next to the checkpoint: two runs on one file would race."""

    def __init__(self, checkpoint: Path) -> None:
        self.path = checkpoint.with_name(checkpoint.name + ".lock")
        self._f: BinaryIO | None = None

    def acquire(self) -> bool:
        import fcntl

        f = open(self.path, "ab")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            return False
        self._f = f
        return True

    def release(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
            self.path.unlink(missing_ok=True)


def default_checkpoint(path: Path) -> Path:
    return path.with_name(path.name + ".tally-checkpoint.json")


def default_rejects(path: Path) -> Path:
    return path.with_name(path.name + ".rejected.ndjson")


# --- sending -----------------------------------------------------------------------------------


@dataclass
class Batch:
    seq: int
    records: list[Record]
    result: IngestResult | None = None

    @property
    def last(self) -> Record:
        return self.records[-1]


@dataclass
class SendStats:
    sent: int = 0  # events acknowledged in this run
    rejected: int = 0  # records rejected (by Tally or unreadable) in this run
    records: int = 0  # records handled in this run
    bytes_done: int = 0
    resumed_from: int = 0
    interrupted: bool = False
    rejected_examples: list[str] = field(default_factory=list)


class Sender:
    """Reads records, sends them in concurrent batches, advances the checkpoint in order."""

    def __init__(
        self,
        client: Tally,
        path: Path,
        fmt: Format,
        checkpoint_path: Path,
        rejects_path: Path,
        *,
        batch_size: int = 1000,
        concurrency: int = 4,
        wait: str | None = None,
        on_progress: Callable[[SendStats], None] | None = None,
    ) -> None:
        self.client = client
        self.path = path
        self.fmt = fmt
        self.checkpoint_path = checkpoint_path
        self.rejects_path = rejects_path
        self.batch_size = batch_size
        self.concurrency = concurrency
        self.wait = wait
        self.on_progress = on_progress
        self.stats = SendStats()
        self.stop = threading.Event()
        self._rejects: io.BufferedWriter | None = None

    def _reject(self, record: Record, event: Any, errors: list[dict[str, Any]]) -> None:
        if self._rejects is None:
            self._rejects = open(self.rejects_path, "ab")
        line = {"record": record.number, "event": event, "errors": errors}
        self._rejects.write(orjson.dumps(line) + b"\n")
        self.stats.rejected += 1
        if len(self.stats.rejected_examples) < 5:
            first = errors[0] if errors else {"field": "?", "message": "?"}
            self.stats.rejected_examples.append(
                f"record {record.number}: {first['field']}: {first['message']}"
            )

    def _send(self, batch: Batch) -> Batch:
        events = [r.event for r in batch.records if r.event is not None]
        batch.result = self.client.ingest(events, wait=self.wait) if events else IngestResult()
        return batch

    def _batches(self, cp: Checkpoint) -> Iterator[Batch]:
        seq = 0
        chunk: list[Record] = []
        for rec in read_records(self.path, self.fmt, skip_records=cp.records, offset=cp.offset):
            chunk.append(rec)
            if len(chunk) >= self.batch_size:
                yield Batch(seq, chunk)
                seq += 1
                chunk = []
            if self.stop.is_set():
                break
        if chunk and not self.stop.is_set():
            yield Batch(seq, chunk)

    def _complete(self, batch: Batch, cp: Checkpoint) -> None:
        assert batch.result is not None
        sent = [r for r in batch.records if r.event is not None]
        bad: dict[int, list[dict[str, Any]]] = {}
        for e in batch.result.rejected:
            bad.setdefault(e.index, []).append({"field": e.field, "message": e.message})
        index_of = {id(rec): i for i, rec in enumerate(sent)}
        for rec in batch.records:  # in file order
            if rec.event is None:
                self._reject(rec, None, [{"field": "record", "message": rec.error or "unreadable"}])
            elif index_of[id(rec)] in bad:
                self._reject(rec, rec.event, bad[index_of[id(rec)]])
        cp.records = batch.last.number
        if batch.last.end is not None:
            cp.offset = batch.last.end
        cp.accepted += batch.result.accepted
        cp.rejected = cp.rejected + len(bad) + sum(1 for r in batch.records if r.event is None)
        self.stats.sent += batch.result.accepted
        self.stats.records += len(batch.records)
        self.stats.bytes_done = cp.offset

    def run(self, cp: Checkpoint) -> Checkpoint:
        """Send from the checkpoint on; returns the final checkpoint (saved). On an error or
        Ctrl-C the checkpoint keeps the last acknowledged position and the error propagates."""
        self.stats.resumed_from = cp.records
        self.stats.bytes_done = cp.offset
        done: dict[int, Batch] = {}
        next_seq = 0
        pending: set[Future[Batch]] = set()
        pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="tally-send")
        try:
            batches = self._batches(cp)
            exhausted = False
            while True:
                while not exhausted and len(pending) < self.concurrency:
                    nxt = None if self.stop.is_set() else next(batches, None)
                    if nxt is None:
                        exhausted = True
                        break
                    pending.add(pool.submit(self._send, nxt))
                if not pending:
                    break
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    batch = fut.result()  # a delivery error ends the run here
                    done[batch.seq] = batch
                advanced = False
                while next_seq in done:
                    self._complete(done.pop(next_seq), cp)
                    next_seq += 1
                    advanced = True
                if advanced:
                    cp.save(self.checkpoint_path)
                    if self.on_progress is not None:
                        self.on_progress(self.stats)
        except BaseException:
            # Stop at once: requests still in flight are abandoned (not checkpointed, so a
            # rerun sends them again -- safe, their ids are the same).
            self.stop.set()
            self.client.transport.close()
            pool.shutdown(wait=True, cancel_futures=True)
            cp.save(self.checkpoint_path)
            raise
        finally:
            pool.shutdown(wait=False)
            if self._rejects is not None:
                self._rejects.close()
        cp.done = True
        cp.save(self.checkpoint_path)
        return cp
