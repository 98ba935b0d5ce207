"""The schemathesis configuration of the OpenAPI test: credentials, the ids of the world
(``tests.integration.api.world``) for path parameters, checks and warnings.

Operations whose path names an object get an existing one (schemathesis cannot create a tenant's
objects for every operation by itself); destructive operations get objects of their own (an
invoice to void, a customer to patch) so they do not destroy what the others use, or, when a
create operation links to them (revoke a key, delete a meter, a discount, ...), the objects the
stateful phase creates through those links. Operations that change a tenant's Segment settings run as a second tenant, so the
first one's Segment messages keep the default customer mapping.
"""

from __future__ import annotations

import json
from typing import Any

from tests.integration.api.world import World

HOOKS = "tests.integration.api.schemathesis_hooks"


_PATHS: dict[str, dict[str, Any]] = {}  # "METHOD path" or "path" -> path parameters (the hooks)


def _op(path: str, params: dict[str, Any], method: str | None = None) -> str:
    """Record the world's ids for ``path`` (all methods, or ``method``). They are set by the
    hooks on positive cases outside the stateful phase, not through the config's
    ``[[operations]] parameters``: schemathesis applies those in the stateful phase too, over
    the ids the links supply (a DELETE meant for a just-created meter hit the world's)."""
    _PATHS[f"{method} {path}" if method else path] = dict(params)
    return ""


# A revoked API key stays readable (``status: revoked``, ``revoked_at``): the record of which key
# could write when is kept for audit, and the OpenAPI description of these GETs says so. The
# ``use_after_free`` check (a read after a successful DELETE must not succeed) is off for them only.
_KEPT_AFTER_REVOKE = "".join(
    f"""
[[operations]]
include-name = {json.dumps(name)}
checks.use_after_free.enabled = false
"""
    # one name filter: separate include-path and include-method filters match either
    for name in ("GET /v1/api-keys/{key_id}", "GET /v1/admin/tenants/{tenant_id}/keys/{key_id}")
)


def operations(w: World, other: World, limits_tenant: str) -> list[str]:
    i = w.ids
    t = w.tenant_id
    ops = [
        _op("/v1/meters/{slug}", {"slug": i["meter"]}, "GET"),
        _op("/api/v1/meters/{slug}", {"slug": i["meter"]}),
        _op("/v1/meters/{slug}/backfill", {"slug": i["meter"]}),
        _op("/v1/meters/{slug}/usage", {"slug": i["meter"]}),
        _op("/api/v1/meters/{slug}/query", {"slug": i["meter"]}),
        _op("/v1/admin/tenants/{tenant_id}/keys", {"tenant_id": t}),
        _op(
            "/v1/admin/tenants/{tenant_id}/keys/{key_id}",
            {"tenant_id": t, "key_id": i["key_rotate"]},
            "GET",
        ),
        _op("/v1/admin/tenants/{tenant_id}/limits", {"tenant_id": limits_tenant}),
        _op(
            "/v1/admin/tenants/{tenant_id}/meters/{slug}/backfill",
            {"tenant_id": t, "slug": i["meter"]},
        ),
        _op("/v1/admin/tenants/{tenant_id}/invoices/run", {"tenant_id": t}),
        _op("/v1/api-keys/{key_id}", {"key_id": i["key_rotate"]}, "GET"),
        _op("/v1/plans/{code}", {"code": i["plan"]}),
        _op("/v1/plans/{code}/versions", {"code": i["plan"]}),
        _op(
            "/v1/plans/{code}/versions/{version}", {"code": i["plan"], "version": i["plan_version"]}
        ),
        _op("/v1/customers/{external_id}", {"external_id": i["customer"]}, "GET"),
        _op("/v1/customers/{external_id}", {"external_id": i["customer_patch"]}, "PATCH"),
        _op("/v1/customers/{external_id}/upcoming-invoice", {"external_id": i["customer"]}),
        _op("/v1/subscriptions/{sub_id}", {"sub_id": i["subscription"]}),
        _op("/v1/subscriptions/{sub_id}/actions", {"sub_id": i["subscription"]}),
        _op("/v1/subscriptions/{sub_id}/change-plan", {"sub_id": i["subscription"]}),
        _op("/v1/invoices/{invoice_id}", {"invoice_id": i["invoice"]}),
        _op("/v1/invoices/{invoice_id}/csv", {"invoice_id": i["invoice"]}),
        _op("/v1/invoices/{invoice_id}/pdf", {"invoice_id": i["invoice"]}),
        _op("/v1/invoices/{invoice_id}/finalize", {"invoice_id": i["invoice_draft"]}),
        _op("/v1/invoices/{invoice_id}/refresh", {"invoice_id": i["invoice_draft"]}),
        _op("/v1/invoices/{invoice_id}/void", {"invoice_id": i["invoice_void"]}),
        _op("/v1/invoices/{invoice_id}/credit-notes", {"invoice_id": i["invoice"]}),
        _op("/v1/credit-notes/{note_id}", {"note_id": i["credit_note"]}),
        _op("/v1/credit-notes/{note_id}/pdf", {"note_id": i["credit_note"]}),
        _op("/v1/customers/{customer_id}/discounts", {"customer_id": i["customer"]}),
        _op("/v1/events/{event_id}/corrections", {"event_id": i["event"]}),
        _op("/v1/webhooks/endpoints/{endpoint_id}/rotate-secret", {"endpoint_id": i["endpoint"]}),
        _op("/v1/webhooks/deliveries/{delivery_id}", {"delivery_id": i["delivery"]}),
        _op("/v1/customers/{customer_id}/thresholds", {"customer_id": i["customer"]}),
        _op("/v1/segment/webhook/{tenant_id}", {"tenant_id": t}),
        _op("/v1/dead-letters/{dead_letter_id}", {"dead_letter_id": i["dead_letter"]}),
        _op("/v1/admin/dead-letters/{dead_letter_id}", {"dead_letter_id": i["dead_letter"]}),
        _op(
            "/v1/admin/dead-letters/{dead_letter_id}/redrive", {"dead_letter_id": i["dead_letter"]}
        ),
    ]
    return ops


def config(
    w: World,
    other: World,
    limits_tenant: str,
    admin_token: str,
    *,
    max_examples: int,
    report: str,
    seed: int | None = None,
    workers: int = 1,
) -> str:
    head = f"""# generated by tests/integration/api/test_openapi_schemathesis.py
hooks = "{HOOKS}"
workers = {workers}
{"seed = " + str(seed) if seed is not None else ""}

[generation]
max-examples = {max_examples}

[reports.json]
path = {json.dumps(report)}

[warnings]
fail-on = true

[phases.coverage]
enabled = false

[phases.stateful.inference]
algorithms = []

[auth.openapi.ApiKey]
bearer = {json.dumps(w.key)}
[auth.openapi.AdminToken]
bearer = {json.dumps(admin_token)}
[auth.openapi.SegmentWriteKey]
username = {json.dumps(w.key)}
password = ""
[auth.openapi.SegmentSignature]
api_key = "signed-by-the-hooks"

[checks.negative_data_rejection]
expected-statuses = ["400", "401", "404", "409", "413", "415", "429"]
[checks.positive_data_acceptance]
expected-statuses = ["2xx", "404", "409"]
{_KEPT_AFTER_REVOKE}"""
    operations(w, other, limits_tenant)
    return head


def environment(w: World, other: World, limits_tenant: str) -> dict[str, str]:
    """What the hooks need: the two tenants' keys and the ids they must not destroy."""
    protect = {
        w.ids["key_main"]: w.ids["key_revoke"],
        other.ids["key_main"]: w.ids["key_revoke"],
        w.ids["admin_token_main"]: w.ids["admin_token"],
        w.ids["meter"]: w.ids["meter_delete"],
        f"{w.ids['meter'].rsplit('-', 1)[0]}-count": w.ids["meter_delete"],
    }
    operations(w, other, limits_tenant)  # fills _PATHS
    return {
        "TALLY_FUZZ_PATHS": json.dumps(_PATHS),
        "TALLY_FUZZ_KEY": w.key,
        "TALLY_FUZZ_OTHER_KEY": other.key,
        "TALLY_FUZZ_PROTECT": json.dumps(protect),
    }


__all__ = ["HOOKS", "config", "environment", "operations"]
