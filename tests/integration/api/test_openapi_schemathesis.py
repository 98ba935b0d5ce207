"""schemathesis against the served OpenAPI document of a real Tally (API + worker, real Tansu
broker, real chDB: ``live.live_tally``), every operation, with a bounded example budget.

Two tenants' worlds (``world.build_world``) give every operation with an id in its path an
object to work on (``schemathesis_config``); the hooks (``schemathesis_hooks``) sign Segment's
webhook, keep the fuzzer's own credentials alive and make positive cases obey the rules JSON
Schema cannot state. The run fails on any check failure or warning (``warnings.fail-on``):

- ``not_a_server_error`` (no 5xx), ``status_code_conformance``, ``content_type_conformance``,
  ``response_headers_conformance``, ``response_schema_conformance`` (answers as documented);
- ``positive_data_acceptance`` (valid data accepted), ``negative_data_rejection`` (invalid data
  refused with a 4xx), ``unsupported_method``, ``missing_required_header``, ``ignored_auth``,
  ``use_after_free``, ``ensure_resource_availability`` (the links: what a create operation made
  is there for the operations its links lead to);
- ``error_shape`` (ours): every 4xx/5xx body is ``{error, message, details: [{field, message}]}``.

Budget: the examples, fuzzing (positive and negative) and stateful phases (the coverage phase
is off: it is not bounded by the budget), ``TALLY_FUZZ_EXAMPLES`` examples per operation
(default 20), ``TALLY_FUZZ_SEED`` (default fixed, for a reproducible CI run). What the run tried is printed (operations, cases,
failures) for the record.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx

from tests.integration.api.conftest import ADMIN_TOKEN
from tests.integration.api.live import live_tally
from tests.integration.api.schemathesis_config import config, environment
from tests.integration.api.world import WORLD_SETTINGS, build_world

REPO = Path(__file__).resolve().parents[3]
CLI = Path(sys.executable).parent / "schemathesis"
METHODS = {"GET", "POST", "PUT", "PATCH", "DELETE"}


def _summary(report: Path) -> dict[str, Any]:
    """Operations and cases the run tried (from the ndjson event stream), and its failures."""
    ops: set[str] = set()
    cases = 0
    failures: list[str] = []
    for line in report.read_text().splitlines():
        if not line.strip():
            continue
        ev = json.loads(line)
        for kind, body in ev.items():
            if kind == "ScenarioFinished":
                label = (body.get("recorder") or {}).get("label")
                if label and label.split(" ", 1)[0] in METHODS:
                    ops.add(label)
                cases += len((body.get("recorder") or {}).get("cases") or {})
            if kind == "ScenarioFinished" and body.get("status") in ("failure", "error"):
                failures.append(str((body.get("recorder") or {}).get("label")))
    return {"operations": len(ops), "cases": cases, "failed_scenarios": failures}


def test_schemathesis_finds_nothing(
    broker: Any, topic: str, store: Any, unique: str, tmp_path: Path
) -> None:
    assert CLI.exists(), f"schemathesis is a dev dependency: {CLI} is missing"
    examples = int(os.environ.get("TALLY_FUZZ_EXAMPLES", "20"))
    seed = int(os.environ.get("TALLY_FUZZ_SEED", "20261130"))
    with live_tally(
        broker,
        topic,
        store,
        unique,
        tmp_path,
        auth_failure_burst=100_000,
        auth_failures_per_s=10_000.0,
        auth_lookups_per_s=10_000.0,
        **WORLD_SETTINGS,
    ) as live:
        w = build_world(live.url, ADMIN_TOKEN, "fuzz", prefix="fz")
        other = build_world(live.url, ADMIN_TOKEN, "fuzz-other", prefix="fo")
        r = httpx.post(
            live.url + "/v1/admin/tenants",
            json={"name": f"fuzz-limits-{uuid.uuid4().hex[:6]}"},
            headers=live.admin,
            timeout=60,
        )
        assert r.status_code == 201, r.text
        limits_tenant = r.json()["tenant_id"]
        spec = httpx.get(live.url + "/openapi.json", timeout=60).json()
        served = sum(len(ops) for ops in spec["paths"].values())
        report = tmp_path / "events.ndjson"
        cfg = tmp_path / "schemathesis.toml"
        cfg.write_text(
            config(
                w,
                other,
                limits_tenant,
                ADMIN_TOKEN,
                max_examples=examples,
                report=str(tmp_path / "report.json"),
                seed=seed,
                workers=2,
            )
        )
        env = {
            **os.environ,
            **environment(w, other, limits_tenant),
            "PYTHONPATH": str(REPO),
            "NO_COLOR": "1",
        }
        proc = subprocess.run(
            [
                str(CLI),
                "--config-file",
                str(cfg),
                "run",
                f"{live.url}/openapi.json",
                "--report",
                "ndjson",
                "--report-ndjson-path",
                str(report),
                "--request-timeout",
                "60",
            ],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=1500,
        )
    out = proc.stdout + proc.stderr
    summary = _summary(report) if report.exists() else {}
    generated = re.search(r"(\d+) generated", out)
    summary["generated"] = int(generated.group(1)) if generated else None
    print(f"schemathesis: {summary}\n{out[-6000:]}")
    assert proc.returncode == 0, out[-20000:]
    assert summary.get("operations") == served, (served, summary)  # every operation tried


def _op_doc(path: str) -> dict[str, Any]:
    names = [seg[1:-1] for seg in path.split("/") if seg.startswith("{")]
    params = [
        {"name": n, "in": "path", "required": True, "schema": {"type": "string"}} for n in names
    ]
    return {"parameters": params, "responses": {"200": {"description": "ok"}}}


def test_use_after_free_is_off_only_for_reading_a_revoked_key() -> None:
    """A revoked key stays readable on purpose; every other read after a DELETE is still checked
    (separate include-path and include-method filters would have matched every GET)."""
    import tomllib

    import schemathesis
    from schemathesis.config import SchemathesisConfig
    from schemathesis.core.result import Ok

    from tests.integration.api.schemathesis_config import _KEPT_AFTER_REVOKE

    keys, admin_keys, meter = (
        "/v1/api-keys/{key_id}",
        "/v1/admin/tenants/{tenant_id}/keys/{key_id}",
        "/v1/meters/{slug}",
    )
    paths = {
        keys: {"get": _op_doc(keys), "delete": _op_doc(keys)},
        admin_keys: {"get": _op_doc(admin_keys)},
        meter: {"get": _op_doc(meter)},
    }
    raw = {"openapi": "3.0.0", "info": {"title": "t", "version": "1"}, "paths": paths}
    cfg = SchemathesisConfig.from_dict(tomllib.loads(_KEPT_AFTER_REVOKE))
    schema = schemathesis.openapi.from_dict(raw, config=cfg)
    enabled = {}
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result
        op = result.ok()
        checks = schema.config.checks_config_for(operation=op, phase="stateful")
        enabled[op.label] = checks.use_after_free.enabled
    assert enabled == {
        f"GET {keys}": False,
        f"DELETE {keys}": True,
        f"GET {admin_keys}": False,
        f"GET {meter}": True,
    }
