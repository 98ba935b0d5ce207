"""Read the usage numbers invoices need, for many customers at once (set-based).

Every ``UsageKey(meter, group_by, start, end)`` that any customer needs becomes ONE usage query
grouped by customer (``by_customer``) through the same ``run_usage`` path as the usage API, so
an invoice run over 10k customers on calendar periods reads its usage in one query per
(meter, segment) instead of one per customer.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping
from decimal import Decimal

from billing.ports import BillingStore
from rating.invoice import UsageAmount, UsageKey
from schemas.catalog import PlanVersion
from schemas.meters import Meter
from schemas.pricing import PercentagePrice
from schemas.usage import UsageQuery
from tally.errors import NotFound

log = logging.getLogger(__name__)

# Above this many customers in one query, read the whole meter and keep the wanted customers
# (cheaper than a huge IN list).
CUSTOMER_FILTER_MAX = 1000

CustomerUsage = dict[str, dict[UsageKey, list[UsageAmount]]]


def counted_meters(plans: Iterable[PlanVersion]) -> set[str]:
    """Meters whose charges need the number of events (percentage price with a fixed fee)."""
    return {
        c.meter_slug
        for p in plans
        for c in p.usage_charges
        if c.meter_slug is not None
        and isinstance(c.price, PercentagePrice)
        and c.price.fixed_amount
    }


def fetch_usage(
    rows: BillingStore,
    tenant_id: str,
    needs: Mapping[str, Iterable[UsageKey]],
    counted: set[str] | None = None,
) -> CustomerUsage:
    """customer -> usage key -> amounts, for every (customer, key) in ``needs``."""
    counted = counted or set()
    by_key: dict[UsageKey, set[str]] = defaultdict(set)
    for customer, keys in needs.items():
        for key in keys:
            by_key[key].add(customer)
    meters: dict[str, Meter | None] = {}
    out: CustomerUsage = {c: {} for c in needs}
    for key, customers in sorted(by_key.items(), key=lambda kv: _sort_key(kv[0])):
        if key.meter_slug not in meters:
            try:
                meters[key.meter_slug] = rows.get_meter(tenant_id, key.meter_slug)
            except NotFound:
                log.warning(
                    "tenant %s: meter %r of a plan no longer exists; its usage counts 0",
                    tenant_id,
                    key.meter_slug,
                )
                meters[key.meter_slug] = None
        meter = meters[key.meter_slug]
        found: dict[str, list[UsageAmount]] = defaultdict(list)
        if meter is not None:
            wanted = sorted(customers)
            filtered = len(wanted) <= CUSTOMER_FILTER_MAX
            q = UsageQuery(
                tenant_id=tenant_id,
                meter=meter,
                from_=key.start,
                to=key.end,
                window=None,
                tz="UTC",
                customers=wanted if filtered else [],
                group_by=[key.group_by] if key.group_by else [],
                filters={},
                by_customer=True,
            )
            is_counted = key.meter_slug in counted
            counts = (
                rows.event_counts(
                    tenant_id,
                    meter,
                    key.start,
                    key.end,
                    wanted if filtered else None,
                    key.group_by,
                )
                if is_counted
                else {}
            )
            for row in rows.usage(q):
                customer = row.customer or ""
                if customer not in customers:
                    continue
                group = dict(row.group_by or {}) if key.group_by else None
                value = row.value if row.value is not None else Decimal(0)
                gval = (group or {}).get(key.group_by or "", "")
                events = counts.get((customer, gval), 0) if is_counted else None
                found[customer].append(UsageAmount(Decimal(value), group, events))
            if is_counted:
                for customer in customers:
                    if not found.get(customer):
                        found[customer].append(UsageAmount(Decimal(0), None, 0))
        for customer in customers:
            out[customer][key] = list(found.get(customer, []))
    return out


def _sort_key(key: UsageKey) -> tuple[str, str, str, str]:
    return (key.meter_slug, key.group_by or "", key.start.isoformat(), key.end.isoformat())
