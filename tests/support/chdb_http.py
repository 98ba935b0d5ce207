"""The chDB store server for multi-process tests: ``clickhouse.server`` (production code since
`tally run` serves its store to its API process with it). Kept so tests import it from here."""

from clickhouse.server import (
    REPO_ROOT,
    Bridge,
    Engine,
    ServerError,
    StoreServer,
    main,
    serve,
    start_server,
    stop,
    stop_server,
)

__all__ = [
    "REPO_ROOT",
    "Bridge",
    "Engine",
    "ServerError",
    "StoreServer",
    "main",
    "serve",
    "start_server",
    "stop",
    "stop_server",
]
