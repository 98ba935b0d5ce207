"""The package rule of docs/architecture.md, checked against the real imports (no I/O).

Arrows point one way: ``runtime`` (entry points) at the top, ``tally`` (settings, errors,
logging) at the bottom. A first-party import that is not in ``ALLOWED`` fails this test, and so
does an I/O library imported by the pure core.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# package -> first-party packages it may import (besides itself). Keep in step with the table in
# docs/architecture.md.
ALLOWED: dict[str, set[str]] = {
    "tally": set(),
    "schemas": {"tally"},
    "rating": {"schemas", "tally"},
    "streams": {"schemas", "tally"},
    "clickhouse": {"schemas", "tally"},
    "billing": {"rating", "schemas", "tally", "clickhouse"},
    "api": {"schemas", "tally", "rating", "streams", "clickhouse", "billing"},
    "runtime": {
        "schemas",
        "tally",
        "rating",
        "streams",
        "clickhouse",
        "billing",
        "api",
        "tally_client",
    },
    # The Python SDK: shares the wire models, never the server's internals.
    "tally_client": {"schemas"},
}
FIRST_PARTY = set(ALLOWED)

# The pure core: pricing math and the aggregation/matching/dedupe logic do no network I/O.
IO_LIBRARIES = {
    "faust",
    "aiokafka",
    "confluent_kafka",
    "clickhouse_connect",
    "chdb",
    "fastapi",
    "starlette",
    "httpx",
    "uvicorn",
    "requests",
}
PURE_MODULES = [
    "rating",
    "streams/aggregation.py",
    "streams/columnar.py",
    "streams/matching.py",
    "streams/activation.py",
    "streams/dedupe.py",
]


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_every_package_is_listed() -> None:
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py") if p.parent.name not in {"tests"}}
    assert packages - {"benchmarks"} <= set(ALLOWED), (
        f"new top-level package(s) {sorted(packages - set(ALLOWED))}: add them to ALLOWED "
        "and to the package table in docs/architecture.md"
    )


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_follow_the_package_rule(package: str) -> None:
    bad = []
    for path in _modules(package):
        for root in _imported_roots(path) & FIRST_PARTY:
            if root != package and root not in ALLOWED[package]:
                bad.append(f"{path.relative_to(ROOT)} imports {root}")
    assert not bad, "imports running against the package rule:\n" + "\n".join(bad)


@pytest.mark.parametrize("place", PURE_MODULES)
def test_pure_core_does_no_io(place: str) -> None:
    target = ROOT / place
    paths = [target] if target.is_file() else _modules(place)
    bad = [
        f"{p.relative_to(ROOT)} imports {root}"
        for p in paths
        for root in _imported_roots(p) & IO_LIBRARIES
    ]
    assert not bad, "\n".join(bad)


def test_the_rule_catches_a_violation(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from runtime.cli import app\n    return app\n")
    assert "runtime" in _imported_roots(probe)
    assert "runtime" not in ALLOWED["api"]
