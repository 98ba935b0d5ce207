"""The billing services of an app (one set per app, created on first use): the catalog, the
invoicing service, webhooks and corrections, all on one ``ClickHouseBilling`` adapter."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import Request

from api.state import AppState
from billing.catalog import Catalog
from billing.corrections import Corrections
from billing.invoices import Invoicing, InvoicingConfig
from billing.ports import BillingStore, open_billing_store
from billing.webhooks import Webhooks


@dataclass
class BillingServices:
    rows: BillingStore
    catalog: Catalog
    invoicing: Invoicing
    webhooks: Webhooks
    corrections: Corrections


def build_services(settings: Any, store: Any, repo: Any = None) -> BillingServices:
    rows = open_billing_store(store, repo)
    catalog = Catalog(rows)
    webhooks = Webhooks(rows, settings)
    invoicing = Invoicing(
        rows, catalog, InvoicingConfig.from_settings(settings), webhooks.emit_many
    )
    webhooks.sources.append(invoicing)  # what the dispatcher's reconciliation checks
    from api.matching import WorkerMatching

    corrections = Corrections(rows, WorkerMatching())
    rows.set_window_repair(corrections.repair)
    return BillingServices(rows, catalog, invoicing, webhooks, corrections)


def billing(request: Request, st: AppState) -> BillingServices:
    svc = getattr(request.app.state, "billing", None)
    if svc is None:
        svc = build_services(st.settings, st.store, st.repo)
        request.app.state.billing = svc
    return svc


def actor_of(request: Request) -> str:
    """Who acts: the API key's public prefix (``tly_<tenant>_<4 chars>``, also stored in clear
    in ``api_keys.key_prefix``), never the key."""
    header = request.headers.get("authorization", "")
    token = header.partition(" ")[2].strip()
    return "api_key:" + token[:21] if token else "api"
