"""Connection to ClickHouse (server over HTTP, or embedded chDB on disk) and schema migrations.

``Store.open("chdb:///abs/dir", db)`` uses chDB in this process (one process per directory, several
clients on the same directory in one process are fine); ``Store.open("http://user:pass@host:8123",
db)`` talks to a server. Every statement names its tables as ``<database>.<table>``.

Every driver or connection error is re-raised as :class:`tally.errors.StoreUnavailable` (retryable,
HTTP 503). Callers validate their input before it reaches the store, so no input error can become
a database error (and never a 500).

Migrations are the files ``clickhouse/migrations/NNN_name.sql``: ``{db}`` is replaced by the
database name, full-line ``--`` comments are dropped and statements are split at lines ending in
``;``. Applied names are recorded in ``<db>.schema_migrations``. Statements must be idempotent
(``IF NOT EXISTS``), because a file that failed half-way is re-run as a whole, and two processes
may migrate at the same time.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import clickhouse_connect
from clickhouse_connect.driver.exceptions import ClickHouseError

from schemas.timeutil import utc_now
from tally.errors import StoreUnavailable, ValidationError

if TYPE_CHECKING:
    from tally.settings import Settings

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_MIGRATION_FILE = re.compile(r"^(\d{3})_[A-Za-z0-9_]+\.sql$")
_STATEMENT_END = re.compile(r";[ \t]*(?:\r?\n|$)")
_DRIVER_ERRORS: tuple[type[BaseException], ...] = (ClickHouseError, OSError)


def check_identifier(name: str, field: str = "database") -> str:
    """Return ``name`` if it is a plain SQL identifier, else raise ValidationError naming ``field``."""
    if not isinstance(name, str) or not IDENTIFIER.match(name) or len(name) > 128:
        raise ValidationError(
            f"{field} must match {IDENTIFIER.pattern} (got {name!r})", field=field
        )
    return name


def split_statements(sql: str) -> list[str]:
    """Split a migration file into statements (full-line ``--`` comments removed)."""
    lines = [ln for ln in sql.splitlines() if not ln.strip().startswith("--")]
    parts = _STATEMENT_END.split("\n".join(lines) + "\n")
    return [p.strip() for p in parts if p.strip()]


def migration_files(directory: Path = MIGRATIONS_DIR) -> list[Path]:
    """The migration files in apply order (by their numeric prefix)."""
    files = [p for p in directory.iterdir() if _MIGRATION_FILE.match(p.name)]
    numbers = [p.name[:3] for p in files]
    if len(set(numbers)) != len(numbers):
        raise RuntimeError(f"duplicate migration numbers in {directory}: {sorted(numbers)}")
    return sorted(files, key=lambda p: p.name)


def _unavailable(action: str, exc: BaseException) -> StoreUnavailable:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    log.warning("clickhouse %s failed: %s", action, text)
    return StoreUnavailable(f"ClickHouse is unavailable ({action}): {text[:300]}")


def _connect(url: str) -> Any:
    if url.startswith("chdb://"):
        path = url[len("chdb://") :]
        if not path.startswith("/"):
            raise ValidationError(
                f"clickhouse_url: chDB needs an absolute directory (chdb:///abs/dir), got {url!r}",
                field="clickhouse_url",
            )
        return clickhouse_connect.get_client(dsn=f"chdb://{path}")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValidationError(
            "clickhouse_url must be chdb:///abs/dir or http(s)://[user:pass@]host[:port]",
            field="clickhouse_url",
        )
    # The database is created by Store.open and always named in SQL; drop any path from the URL
    # so that connecting does not fail before the database exists.
    dsn = urlunsplit((parts.scheme, parts.netloc, "", parts.query, ""))
    # No session id: the HTTP client is then safe to share between threads.
    return clickhouse_connect.get_client(dsn=dsn, autogenerate_session_id=False)


class Store:
    """A ClickHouse client bound to one database. Thread-safe."""

    def __init__(self, client: Any, database: str) -> None:
        self.client = client
        self.database = check_identifier(database)
        self._closed = False
        self._lock = threading.Lock()

    @classmethod
    def open(cls, url: str, database: str) -> Store:
        check_identifier(database)
        try:
            client = _connect(url)
        except _DRIVER_ERRORS as exc:
            raise _unavailable("connect", exc) from exc
        store = cls(client, database)
        store.command(f"CREATE DATABASE IF NOT EXISTS {database}")
        return store

    # --- statements ---------------------------------------------------------------------------

    def command(
        self,
        sql: str,
        params: dict[str, Any] | None = None,
        *,
        settings: dict[str, Any] | None = None,
    ) -> Any:
        try:
            return self.client.command(sql, parameters=params or None, settings=settings)
        except _DRIVER_ERRORS as exc:
            raise _unavailable("command", exc) from exc

    def query_rows(self, sql: str, params: dict[str, Any] | None = None) -> list[tuple]:
        try:
            return list(self.client.query(sql, parameters=params or None).result_rows)
        except _DRIVER_ERRORS as exc:
            raise _unavailable("query", exc) from exc

    def stream_rows(self, sql: str, params: dict[str, Any] | None = None) -> Iterator[list[tuple]]:
        """Run a query and yield its rows in blocks (lists of tuples), without loading them all."""
        try:
            with self.client.query_row_block_stream(sql, parameters=params or None) as stream:
                for block in stream:
                    if block:
                        yield [tuple(r) for r in block]
        except _DRIVER_ERRORS as exc:
            raise _unavailable("query", exc) from exc

    def insert(
        self,
        table: str,
        rows: list[tuple] | list[list[Any]],
        column_names: list[str],
        settings: dict[str, Any] | None = None,
        *,
        column_oriented: bool = False,
    ) -> None:
        """INSERT ``rows`` (or columns, with ``column_oriented``) into ``<database>.<table>``."""
        check_identifier(table, "table")
        if not rows:
            return
        try:
            self.client.insert(
                f"{self.database}.{table}",
                rows,
                column_names=column_names,
                settings=settings,
                column_oriented=column_oriented,
            )
        except _DRIVER_ERRORS as exc:
            raise _unavailable(f"insert into {table}", exc) from exc

    def insert_arrow(self, table: str, data: Any, settings: dict[str, Any] | None = None) -> None:
        """INSERT a pyarrow Table (columns named as in the table) into ``<database>.<table>``:
        the columns go to the server in Arrow format, with no per-value Python encoding."""
        check_identifier(table, "table")
        if data.num_rows == 0:
            return
        if any(column.num_chunks > 1 for column in data.columns):
            # One record batch, read by the server as one block. A link's usage rows arrive in
            # ~40 chunks (one per tenant and meter, then the day rows and the progress row);
            # sent as they were, the server read ~40 blocks and squashed them into one, and the
            # commit insert took ~1.5x as long (docs/performance.md, "The store's calls of a
            # flush").
            data = data.combine_chunks()
        try:
            self.client.insert_arrow(f"{self.database}.{table}", data, settings=settings)
        except _DRIVER_ERRORS as exc:
            raise _unavailable(f"insert into {table}", exc) from exc

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self.client.close()
        except _DRIVER_ERRORS as exc:  # closing a broken connection is not an error
            log.debug("closing clickhouse client: %s", exc)

    # --- migrations ---------------------------------------------------------------------------

    def migrate(self, directory: Path = MIGRATIONS_DIR) -> list[str]:
        """Apply the migrations not applied yet, in order; return the names applied now."""
        db = self.database
        with self._lock:
            self.command(
                f"CREATE TABLE IF NOT EXISTS {db}.schema_migrations "
                "(name String, applied_at DateTime64(3, 'UTC')) "
                "ENGINE = ReplacingMergeTree ORDER BY name"
            )
            done = {r[0] for r in self.query_rows(f"SELECT name FROM {db}.schema_migrations")}
            applied: list[str] = []
            for path in migration_files(directory):
                if path.name in done:
                    continue
                sql = path.read_text(encoding="utf-8").replace("{db}", db)
                for stmt in split_statements(sql):
                    self.command(stmt)
                self.insert("schema_migrations", [(path.name, utc_now())], ["name", "applied_at"])
                log.info("applied migration %s to %s", path.name, db)
                applied.append(path.name)
            return applied

    def pending_migrations(self, directory: Path = MIGRATIONS_DIR) -> list[str]:
        """Names of the migration files not recorded as applied (all of them on a new store)."""
        try:
            done = {
                r[0] for r in self.query_rows(f"SELECT name FROM {self.database}.schema_migrations")
            }
        except StoreUnavailable as exc:
            if "UNKNOWN_TABLE" in str(exc) or "doesn't exist" in str(exc):
                done = set()
            else:
                raise
        return [p.name for p in migration_files(directory) if p.name not in done]


def open_store(settings: Settings) -> Store:
    """Open the store the settings point at: ``clickhouse_url``, or embedded chDB in ``chdb_dir``."""
    url = settings.clickhouse_url
    if not url:
        directory = settings.chdb_dir.expanduser().resolve()
        directory.mkdir(parents=True, exist_ok=True)
        url = f"chdb://{directory}"
    return Store.open(url, settings.clickhouse_database)
