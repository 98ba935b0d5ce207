"""Invoicing end to end against `tally run`: events over HTTP → worker → chDB → invoice run →
finalize → rerun → late event → adjustment → void → credit note → PDF (pdftoppm to PNG,
pdftotext finds the total). Totals are checked to the cent against hand computations."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from tests.integration.e2e.harness import (
    ADMIN_TOKEN,
    REPO,
    create_tenant,
    start_embedded,
    tally_env,
)

LATENESS = "P1100D"  # the scenario is in 2025: accept events that old

METERS = [
    {"slug": "calls", "event_type": "api.call", "aggregation": "count"},
    {"slug": "gb", "event_type": "storage", "aggregation": "max", "value_property": "$.gb"},
    {"slug": "mb", "event_type": "transfer", "aggregation": "sum", "value_property": "$.mb"},
]
PLAN = {
    "code": "pro",
    "name": "Pro",
    "currency": "USD",
    "charges": [
        {"key": "base", "description": "Pro plan", "price": {"model": "flat", "amount": "20.00"}},
        {
            "key": "calls",
            "meter_slug": "calls",
            "description": "API calls",
            "price": {
                "model": "graduated",
                "tiers": [
                    {"up_to": "100", "unit_amount": "0"},
                    {"up_to": None, "unit_amount": "0.05"},
                ],
            },
        },
        {
            "key": "transfer",
            "meter_slug": "mb",
            "description": "Transfer (MB)",
            "price": {"model": "per_unit", "unit_amount": "0.10"},
        },
        {
            "key": "storage",
            "meter_slug": "gb",
            "description": "Storage (GB peak)",
            "price": {"model": "per_unit", "unit_amount": "1.50"},
        },
    ],
}


class Api:
    def __init__(self, url: str, key: str) -> None:
        self.url, self.h = url, {"Authorization": f"Bearer {key}"}

    def __call__(self, method: str, path: str, body: Any = None, status: int = 200) -> Any:
        r = httpx.request(method, self.url + path, json=body, headers=self.h, timeout=120)
        assert r.status_code == status, f"{method} {path}: {r.status_code} {r.text}"
        return r.json() if "json" in r.headers.get("content-type", "") else r


def ev(i: str, typ: str, cust: str, time: str, **props: Any) -> dict[str, Any]:
    return {"id": i, "type": typ, "customer": cust, "time": time, "properties": props}


def amounts(inv: dict[str, Any]) -> list[tuple[str, str]]:
    return [(ln["kind"], ln["amount"]) for ln in inv["lines"]]


def test_invoicing_end_to_end(tmp_path: Path) -> None:
    pdftoppm, pdftotext = shutil.which("pdftoppm"), shutil.which("pdftotext")
    assert pdftoppm and pdftotext, (
        "poppler-utils missing: run `make tools` (apt-get install poppler-utils)"
    )
    data = tmp_path / "data"
    proc, url = start_embedded(
        data, tmp_path / "tally.log", TALLY_MAX_LATENESS=LATENESS, TALLY_DEDUPE_HORIZON=LATENESS
    )
    try:
        api = Api(url, create_tenant(url, "Acme Metering Inc"))
        for m in METERS:
            api("POST", "/v1/meters", m, 201)
        api("POST", "/v1/plans", PLAN, 201)
        api(
            "POST",
            "/v1/customers",
            {
                "external_id": "ann",
                "name": "Ann's Bakery",
                "currency": "USD",
                "tax_rates": {"VAT": "10"},
            },
            201,
        )
        api(
            "POST",
            "/v1/customers",
            {"external_id": "bob", "name": "Bob Ltd", "currency": "USD"},
            201,
        )
        for c in ("ann", "bob"):
            api(
                "POST",
                "/v1/subscriptions",
                {"customer_id": c, "plan_code": "pro", "start_at": "2025-01-01T00:00:00Z"},
                201,
            )
        events = [
            ev(f"a{i}", "api.call", "ann", f"2025-01-{1 + i % 28:02d}T10:00:00Z")
            for i in range(250)
        ]
        events += [ev(f"b{i}", "api.call", "bob", "2025-01-20T08:00:00Z") for i in range(40)]
        events += [
            ev("t1", "transfer", "ann", "2025-01-05T00:00:00Z", mb="12.5"),
            ev("t2", "transfer", "ann", "2025-01-06T00:00:00Z", mb="30"),
            ev("s1", "storage", "ann", "2025-01-07T00:00:00Z", gb=3),
            ev("s2", "storage", "ann", "2025-01-09T00:00:00Z", gb="7.5"),
            ev("s3", "storage", "bob", "2025-01-09T00:00:00Z", gb=1),
        ]
        # Grace: stored before the run, timed in the last minute of January.
        events += [ev("late-in-grace", "api.call", "ann", "2025-01-31T23:59:59Z")]
        # Not January: February usage must not show on January's invoice.
        events += [ev("feb1", "api.call", "ann", "2025-02-01T00:00:00Z")]
        r = httpx.post(url + "/v1/events", json=events, headers=api.h, timeout=120)
        assert r.status_code in (200, 202), r.text

        out = api("POST", "/v1/invoices/run", {"as_of": "2025-02-01T01:00:00Z"})
        assert len(out["created"]) == 2 and out["existing"] == 0, out
        invs = {i["customer_id"]: i for i in api("GET", "/v1/invoices")["data"]}
        ann, bob = invs["ann"], invs["bob"]
        # Ann, January: base 20.00; calls 251: 100 free + 151 * 0.05 = 7.55; transfer 42.5 MB *
        # 0.10 = 4.25; storage peak 7.5 GB * 1.50 = 11.25. Subtotal 43.05; VAT 10 % per line
        # 2.00 + 0.76 (0.755 half-up) + 0.43 (0.425) + 1.13 (1.125) = 4.32; total 47.37.
        assert amounts(ann) == [
            ("fixed", "20.00"),
            ("usage", "7.55"),
            ("usage", "4.25"),
            ("usage", "11.25"),
        ]
        assert (ann["subtotal"], ann["tax"], ann["total"]) == ("43.05", "4.32", "47.37")
        # Bob: base 20.00; calls 40 (free tier) 0.00; transfer 0.00; storage 1 GB 1.50 -> 21.50.
        assert (bob["subtotal"], bob["tax"], bob["total"]) == ("21.50", "0.00", "21.50")

        fa = api("POST", f"/v1/invoices/{ann['id']}/finalize")
        fb = api("POST", f"/v1/invoices/{bob['id']}/finalize")
        assert (fa["number"], fb["number"]) == ("INV-000001", "INV-000002")
        assert fa["total"] == "47.37"
        rerun = api("POST", "/v1/invoices/run", {"as_of": "2025-02-01T01:00:00Z"})
        assert rerun["created"] == [] and rerun["existing"] == 2

        # A late event for closed, finalized January: 20 more calls for Ann (7.55 -> 8.55).
        late = [ev(f"late{i}", "api.call", "ann", "2025-01-15T12:00:00Z") for i in range(20)]
        r = httpx.post(url + "/v1/events", json=late, headers=api.h, timeout=120)
        assert r.status_code in (200, 202), r.text
        # The CLI talks to the running server (admin endpoint) and prints the outcome.
        cli = subprocess.run(
            [
                sys.executable,
                "-m",
                "runtime",
                "invoices",
                "run",
                "--data-dir",
                str(data),
                "--as-of",
                "2025-03-01T01:00:00Z",
                "--admin-token",
                ADMIN_TOKEN,
            ],
            cwd=REPO,
            env=tally_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert cli.returncode == 0, cli.stdout + cli.stderr
        assert "2 created, 2 existing" in cli.stdout, cli.stdout
        feb = {i["customer_id"]: i for i in api("GET", "/v1/invoices?status=draft")["data"]}
        ann_feb = feb["ann"]
        # Ann, February: base 20.00; calls 1 (free) 0.00; transfer 0.00; storage 0.00; late
        # January calls: adjustment +1.00 (20 * 0.05). Subtotal 21.00; VAT 2.00 + 0.10; total 23.10.
        assert amounts(ann_feb) == [
            ("fixed", "20.00"),
            ("usage", "0.00"),
            ("usage", "0.00"),
            ("usage", "0.00"),
            ("adjustment", "1.00"),
        ]
        assert ann_feb["lines"][4]["period_start"].startswith("2025-01-01")
        assert (ann_feb["subtotal"], ann_feb["tax"], ann_feb["total"]) == ("21.00", "2.10", "23.10")

        voided = api(
            "POST", f"/v1/invoices/{feb['bob']['id']}/void", {"reason": "duplicate account"}
        )
        assert voided["status"] == "void" and voided["void_reason"] == "duplicate account"
        note = api(
            "POST",
            f"/v1/invoices/{ann['id']}/credit-notes",
            {"reason": "service outage", "amount": "5.00"},
            201,
        )
        # 5.00 + 10 % VAT = 5.50
        assert (note["number"], note["total"]) == ("CN-000001", "5.50")

        final = api("POST", f"/v1/invoices/{ann_feb['id']}/finalize")
        assert final["number"] == "INV-000003" and final["total"] == "23.10"
        pdf = api("GET", f"/v1/invoices/{ann_feb['id']}/pdf")
        assert pdf.headers["content-type"] == "application/pdf"
        path = tmp_path / "inv.pdf"
        path.write_bytes(pdf.content)
        subprocess.run(
            [pdftoppm, "-png", "-r", "60", str(path), str(tmp_path / "page")], check=True
        )
        pages = sorted(tmp_path.glob("page*.png"))
        assert pages and pages[0].stat().st_size > 2000
        assert pages[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        text = subprocess.run(
            [pdftotext, "-layout", str(path), "-"], check=True, capture_output=True, text=True
        ).stdout
        for needle in (
            "Acme Metering Inc",
            "Ann's Bakery",
            "INV-000003",
            "2025-02-01 to 2025-03-01",
            "Total",
            "23.10 USD",
            "VAT 10%",
            "2.10 USD",
        ):
            assert needle in text, (needle, text)
        cn_pdf = api("GET", f"/v1/credit-notes/{note['id']}/pdf")
        assert cn_pdf.content.startswith(b"%PDF")
        csv_text = api("GET", f"/v1/invoices/{ann_feb['id']}?format=csv").text
        assert csv_text.splitlines()[-1].split(",")[-3:] == ["23.10", "", "USD"]
        assert proc.terminate() == 0, proc.tail()
    finally:
        if proc.alive():
            proc.terminate()
