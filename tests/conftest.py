"""Shared fixtures. Integration tests use a real Tansu broker and a real chDB, never mocks.

- ``broker``: one Tansu process per test session (cheap), fresh topic names per test.
- ``chdb_dir``: one chDB directory per test process (chDB allows one process per directory).
- ``store``: a fresh, migrated database per test; dropped on success, kept on failure.
"""

from __future__ import annotations

import os
import resource
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from tally import log

log.configure(os.environ.get("TALLY_TEST_LOG_LEVEL", "WARNING"))

# Timings are measured by benchmarks/, never asserted in tests: Hypothesis gets no per-example
# deadline. Its default (200 ms) failed a test whose first example paid one-time imports on a
# cold cache (260-280 ms), and a loaded 2-core machine stretches any example past it.
settings.register_profile("tally", deadline=None)
settings.load_profile("tally")

# chDB keeps a few /proc stat files open per engine thread it ever started (~12 fds per new
# client); a full session opens hundreds of per-test stores, so lift the soft fd limit.
_soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if _soft != resource.RLIM_INFINITY and (_hard == resource.RLIM_INFINITY or _soft < _hard):
    resource.setrlimit(
        resource.RLIMIT_NOFILE,
        (65536 if _hard == resource.RLIM_INFINITY else min(_hard, 65536), _hard),
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, "rep_" + rep.when, rep)


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    from runtime.broker import BrokerProcess

    logf = tmp_path_factory.mktemp("broker") / "tansu.log"
    with BrokerProcess(log_file=logf) as b:
        yield b


@pytest.fixture
def unique() -> str:
    """A short unique suffix for topic, group and database names."""
    return uuid.uuid4().hex[:10]


@pytest.fixture
def topic(broker: object, unique: str) -> str:
    from api.topics import create_topic

    name = f"tally.events.{unique}"
    create_topic(broker.bootstrap, name, 4)  # type: ignore[attr-defined]
    return name


@pytest.fixture(scope="session")
def chdb_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("chdb")


@pytest.fixture
def store(chdb_dir: Path, unique: str, request: pytest.FixtureRequest) -> Iterator[object]:
    """A migrated Store on a fresh database, dropped on success, kept on failure."""
    from clickhouse.store import Store

    st = Store.open(f"chdb://{chdb_dir}", f"test_{unique}")
    st.migrate()
    yield st
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.passed:
        st.command(f"DROP DATABASE IF EXISTS {st.database}")
    st.close()
