"""`tally events send` and `tally doctor` as a user runs them, against a running `tally run`."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from tests.integration.e2e.harness import (
    REPO,
    TallyProcess,
    create_tenant,
    start_embedded,
    tally_env,
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    tmp = tmp_path_factory.mktemp("cli-e2e")
    proc: TallyProcess
    proc, url = start_embedded(tmp / "data", tmp / "tally.log")
    try:
        yield url, tmp / "data"
    finally:
        assert proc.terminate() == 0, proc.tail()


def _default_sigint() -> None:
    """(in the child, before exec) Ctrl-C as in a terminal. A test run started in the
    background by a non-interactive shell inherits SIGINT ignored, and Python then installs no
    KeyboardInterrupt handler: the Ctrl-C test would not test anything."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def tally_cli(*args: str, **kw: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "runtime", *args],
        cwd=REPO,
        env=tally_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_sigint,
        **kw,  # type: ignore[call-overload]
    )


def run_cli(*args: str, timeout: float = 300) -> tuple[int, str, str]:
    p = tally_cli(*args)
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


def counts(url: str, key: str) -> dict[str, Decimal]:
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    r = httpx.get(
        f"{url}/v1/meters/calls/usage",
        params={"from": (now - timedelta(days=30)).isoformat(),
                "to": (now + timedelta(minutes=10)).isoformat(), "group_by": "customer"},
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )  # fmt: skip
    assert r.status_code == 200, r.text
    return {row["customer"]: Decimal(row["value"]) for row in r.json()["data"]}


def tenant_with_meter(url: str, name: str) -> str:
    key = create_tenant(url, name)
    r = httpx.post(
        url + "/v1/meters",
        json={"slug": "calls", "event_type": "api.call", "aggregation": "count"},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert r.status_code == 201, r.text
    return key


def test_events_send_resumes_after_ctrl_c_and_counts_exactly(
    server: tuple[str, Path], tmp_path: Path
) -> None:
    url, _ = server
    key = tenant_with_meter(url, "cli-send")
    base = int((datetime.now(UTC) - timedelta(days=2)).timestamp() * 1000)
    path = tmp_path / "history.ndjson"
    want: Counter[str] = Counter()
    with open(path, "w") as f:
        for i in range(40_000):
            customer = f"c{i % 5}"
            # no ids: derived from each line, so a resend keeps them
            f.write(json.dumps({"type": "api.call", "customer": customer, "time": base + i,
                                "properties": {"i": i}}) + "\n")  # fmt: skip
            want[customer] += 1
        f.write('{"type": "api.call"}\n')  # rejected: no customer
    args = ("events", "send", str(path), "--url", url, "--api-key", key, "--batch-size", "500")
    checkpoint = Path(str(path) + ".tally-checkpoint.json")
    first = tally_cli(*args)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # interrupt once a part is acknowledged
        if checkpoint.exists() and json.loads(checkpoint.read_text())["records"] >= 5000:
            break
        time.sleep(0.05)
    first.send_signal(signal.SIGINT)
    _out, err = first.communicate(timeout=120)
    assert first.returncode == 130, err
    assert "interrupted" in err and "Rerun the same command" in err
    stopped_at = json.loads(checkpoint.read_text())["records"]
    assert 5000 <= stopped_at < 40_001

    code, out, err = run_cli(*args)
    assert code == 1, err  # one record rejected
    assert f"resuming after record {stopped_at}" in err
    assert "1 rejected" in out and "rejected records are in" in err
    rejected = Path(str(path) + ".rejected.ndjson").read_text().splitlines()
    assert [json.loads(x)["record"] for x in rejected] == [40_001]
    assert counts(url, key) == {c: Decimal(n) for c, n in want.items()}

    code, _out, err = run_cli(*args)
    assert code == 0 and "sent completely already" in err
    # Sending the whole file again from the start changes nothing: the ids are the same.
    code, out, err = run_cli(*args, "--restart")
    assert code == 1 and "40000 events accepted" in out, err
    assert counts(url, key) == {c: Decimal(n) for c, n in want.items()}


def test_events_send_csv_and_json(server: tuple[str, Path], tmp_path: Path) -> None:
    url, _ = server
    key = tenant_with_meter(url, "cli-formats")
    now = datetime.now(UTC) - timedelta(hours=1)
    path = tmp_path / "export.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "type", "customer", "time", "tokens"])
        for i in range(1200):
            w.writerow([f"csv-{i}", "api.call", "csv-cust", now.isoformat(), i])
    code, out, err = run_cli("events", "send", str(path), "--url", url, "--api-key", key)
    assert code == 0, err
    assert "1200 events accepted" in out
    js = tmp_path / "export.json"
    js.write_text(json.dumps([{"id": f"js-{i}", "type": "api.call", "customer": "json-cust"}
                              for i in range(300)]))  # fmt: skip
    code, out, err = run_cli("events", "send", str(js), "--url", url, "--api-key", key)
    assert code == 0 and "300 events accepted" in out, err
    assert counts(url, key) == {"csv-cust": Decimal(1200), "json-cust": Decimal(300)}
    code, _out, err = run_cli(
        "events", "send", str(js), "--url", url, "--api-key", "tly_bad", "--restart"
    )
    assert code == 3 and "401" in err, err


def test_doctor(server: tuple[str, Path]) -> None:
    _url, data = server
    code, out, err = run_cli("doctor", "--data-dir", str(data))
    assert code == 0, out + err
    assert "ok   server: the server at" in out and "no problems" in out
    assert "ok   broker: ok, says the server's /readyz" in out
    code, out, err = run_cli("doctor", "--url", "http://127.0.0.1:9", "--data-dir", str(data))
    assert code == 1, out + err
    assert "FAIL server: cannot reach the Tally server at http://127.0.0.1:9" in out
    assert "fix:" in out
