"""Billing: the use-cases (plans, customers, subscriptions, upcoming invoices, invoice runs and
the invoice lifecycle, credit notes, corrections, webhooks, thresholds, reconciliation). It calls
the pure money math in ``rating/`` and reaches storage through the protocols of
``billing.ports`` (implemented by ``clickhouse.billing.ClickHouseBilling``). See
docs/invoicing.md and docs/catalog.md."""
