"""A tenant's "world" built through the HTTP API of a running Tally: one object of every kind,
so that every operation with an id in its path can be reached (schemathesis, tenant isolation).

``build_world(url, admin_token, name)`` returns the tenant, its key and the ids:

- meters ``fz-count`` (count), ``fz-sum`` (sum of ``$.n`` by ``region``), ``fz-del`` (to delete);
- plan ``fz-plan`` (a flat fee and a per-unit charge on fz-sum); customers ``fz-cust`` (with a
  subscription from 2025-01-01) and ``fz-patch`` (no subscription: free to patch);
- events of January..March 2025 (one with a value fz-sum cannot use: a ``meter_value`` dead
  letter), invoices for January (finalized, with a credit note), February (draft) and March
  (to void); a discount, a threshold, a webhook endpoint (and its deliveries), a correction;
- spare API keys ``rotate`` and ``revoke``, a spare admin token, a Segment webhook secret.

Nothing here asserts Tally's answers beyond the status: the world is test data, not a test.
The events lie in 2025: the server needs ``WORLD_SETTINGS`` (a lateness bound reaching them).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import httpx

T0 = "2025-01-01T00:00:00Z"
# settings a server needs for a world (events of January..March 2025 are accepted)
WORLD_SETTINGS = {"max_lateness": timedelta(days=3650), "dedupe_horizon": timedelta(days=3650)}
SEGMENT_SECRET = "fz-segment-secret-0123456789"


@dataclass
class World:
    url: str
    tenant_id: str
    key: str
    ids: dict[str, str] = field(default_factory=dict)

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


class _Api:
    def __init__(self, url: str, token: str) -> None:
        self.client = httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=120
        )

    def __call__(self, method: str, path: str, body: Any = None, ok: tuple[int, ...] = ()) -> Any:
        r = self.client.request(method, path, json=body)
        allowed = ok or (200, 201, 202, 204)
        assert r.status_code in allowed, f"{method} {path}: {r.status_code} {r.text}"
        if r.headers.get("content-type", "").startswith("application/json"):
            return r.json()
        return r

    def close(self) -> None:
        self.client.close()


def ev(event_id: str, typ: str, customer: str, when: str, **props: Any) -> dict[str, Any]:
    return {"id": event_id, "type": typ, "customer": customer, "time": when, "properties": props}


def build_world(url: str, admin_token: str, name: str, *, prefix: str = "fz") -> World:
    """Create a tenant named ``name`` and one object of every kind for it."""
    admin = _Api(url, admin_token)
    created = admin("POST", "/v1/admin/tenants", {"name": name})
    world = World(url, created["tenant_id"], created["api_key"])
    api = _Api(url, world.key)
    ids = world.ids
    try:
        for slug, spec in (
            ("count", {"event_type": f"{prefix}.call", "aggregation": "count"}),
            (
                "sum",
                {
                    "event_type": f"{prefix}.use",
                    "aggregation": "sum",
                    "value_property": "$.n",
                    "group_by": {"region": "$.region"},
                },
            ),
            ("del", {"event_type": f"{prefix}.del", "aggregation": "count"}),
        ):
            api("POST", "/v1/meters", {"slug": f"{prefix}-{slug}", **spec})
        ids["meter"] = f"{prefix}-sum"
        ids["meter_delete"] = f"{prefix}-del"
        ids["endpoint"] = api("POST", "/v1/webhooks/endpoints", {"url": "http://127.0.0.1:9/hook"})[
            "id"
        ]
        plan = api(
            "POST",
            "/v1/plans",
            {
                "code": f"{prefix}-plan",
                "name": "Fuzz plan",
                "currency": "USD",
                "charges": [
                    {"key": "base", "price": {"model": "flat", "amount": "1000000"}},
                    {
                        "key": "use",
                        "meter_slug": f"{prefix}-sum",
                        "price": {"model": "per_unit", "unit_amount": "0.5"},
                    },
                ],
            },
        )
        ids["plan"] = plan["code"]
        ids["plan_version"] = str(plan["version"])
        for cust in ("cust", "patch"):
            api(
                "POST",
                "/v1/customers",
                {"external_id": f"{prefix}-{cust}", "name": f"Customer {cust}", "currency": "USD"},
            )
        ids["customer"] = f"{prefix}-cust"
        ids["customer_patch"] = f"{prefix}-patch"
        sub = api(
            "POST",
            "/v1/subscriptions",
            {"customer_id": f"{prefix}-cust", "plan_code": f"{prefix}-plan", "start_at": T0},
        )
        ids["subscription"] = sub["id"]
        events = [
            ev(
                f"{prefix}-e{m}",
                f"{prefix}.use",
                f"{prefix}-cust",
                f"2025-0{m}-10T00:00:00Z",
                n=m,
                region="eu",
            )
            for m in (1, 2, 3)
        ]
        events.append(
            ev(f"{prefix}-bad", f"{prefix}.use", f"{prefix}-cust", "2025-01-11T00:00:00Z", n="lots")
        )
        api("POST", "/v1/events?wait=stored", events)
        ids["event"] = f"{prefix}-e1"
        run = api("POST", "/v1/invoices/run", {"as_of": "2025-04-01T01:00:00Z"})
        invoices = sorted(
            api("GET", "/v1/invoices")["data"], key=lambda inv: str(inv["period_start"])
        )
        assert len(invoices) >= 3, run
        jan, feb, mar = invoices[0]["id"], invoices[1]["id"], invoices[2]["id"]
        api("POST", f"/v1/invoices/{jan}/finalize")
        ids["invoice"] = jan
        ids["invoice_draft"] = feb
        ids["invoice_void"] = mar
        ids["credit_note"] = api(
            "POST", f"/v1/invoices/{jan}/credit-notes", {"reason": "goodwill", "amount": "1"}
        )["id"]
        ids["discount"] = api(
            "POST", f"/v1/customers/{prefix}-cust/discounts", {"percentage": "10"}
        )["id"]
        ids["threshold"] = api(
            "POST",
            f"/v1/customers/{prefix}-cust/thresholds",
            {"meter_slug": f"{prefix}-sum", "value": "100"},
        )["id"]
        api(
            "POST",
            f"/v1/events/{prefix}-e1/corrections",
            {"action": "amend", "properties": {"n": 2, "region": "eu"}, "reason": "typo"},
        )
        api("POST", f"/v1/meters/{prefix}-sum/backfill")
        for label in ("rotate", "revoke"):
            ids[f"key_{label}"] = api("POST", "/v1/api-keys", {"name": label})["id"]
        ids["admin_token"] = admin("POST", "/v1/admin/tokens", {"name": f"{prefix}-spare"})["id"]
        ids["key_main"] = next(
            k["id"] for k in api("GET", "/v1/api-keys")["data"] if k["name"] == "default"
        )
        ids["admin_token_main"] = next(
            t["id"]
            for t in admin("GET", "/v1/admin/tokens")["data"]
            if t["name"] == "TALLY_ADMIN_TOKEN"
        )
        api("POST", "/v1/segment/webhook-secret", {"secret": SEGMENT_SECRET})
        ids["delivery"] = _first(api, "/v1/webhooks/deliveries", "delivery")
        ids["dead_letter"] = _first(api, "/v1/dead-letters", "dead letter")
    finally:
        api.close()
        admin.close()
    return world


def _first(api: _Api, path: str, what: str, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        data = api("GET", path)["data"]
        if data:
            return str(data[0]["id"])
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} appeared at {path} within {timeout:.0f} s")
        time.sleep(0.5)
