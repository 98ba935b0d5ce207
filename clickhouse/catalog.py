"""Catalog rows: plan versions, customers and subscriptions (010_catalog.sql). SQL and rows only;
the use-cases (validation, the state machine, invoices) live in ``billing.catalog``.

Every method takes the tenant id and filters on it; reads use ``FINAL``. Plan versions are
first-writer-wins (``rank = 2^63 - write time``); customers and subscriptions keep the row with
the highest ``version`` (strictly increasing wall-clock microseconds in this process).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from clickhouse.store import Store
from schemas.catalog import Customer, PlanVersion, Subscription

_RANK_BASE = 1 << 63


def micros(dt: datetime) -> int:
    delta = dt - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


class RowVersions:
    """Strictly increasing row versions from the wall clock (never the logical ``now``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = 0

    def next(self) -> int:
        with self._lock:
            self._last = max(micros(datetime.now(UTC)), self._last + 1)
            return self._last


def first_writer_rank() -> int:
    """``2^63 - now``: under ReplacingMergeTree(rank) the earliest write keeps winning."""
    return _RANK_BASE - micros(datetime.now(UTC))


class CatalogStore:
    """Rows of the catalog tables of every tenant in one store."""

    def __init__(self, store: Store, versions: RowVersions | None = None) -> None:
        self.store = store
        self.db = store.database
        self.versions = versions or RowVersions()

    # --- plans --------------------------------------------------------------------------------

    def plans(
        self,
        tenant_id: str,
        code: str | None = None,
        version: int | None = None,
        codes: Iterable[str] | None = None,
        latest: bool = False,
    ) -> list[PlanVersion]:
        """Plan versions ordered by (code, version), optionally of one code / version / codes;
        ``latest``: only the highest version (of each code: use with ``code``)."""
        where = ["tenant_id = {tenant:String}"]
        params: dict[str, Any] = {"tenant": tenant_id}
        if code is not None:
            where.append("code = {code:String}")
            params["code"] = code
        if version is not None:
            where.append("version = {version:UInt32}")
            params["version"] = version
        if codes is not None:
            where.append("code IN {codes:Array(String)}")
            params["codes"] = sorted(set(codes))
        rows = self.store.query_rows(
            f"SELECT doc FROM {self.db}.plans FINAL WHERE {' AND '.join(where)} "
            + (
                "ORDER BY code, version DESC LIMIT 1 BY code"
                if latest
                else "ORDER BY code, version"
            ),
            params,
        )
        return [PlanVersion.model_validate_json(r[0]) for r in rows]

    def insert_plan(self, tenant_id: str, plan: PlanVersion) -> None:
        self.store.insert(
            "plans",
            [
                (
                    tenant_id,
                    plan.code,
                    plan.version,
                    plan.name,
                    plan.currency,
                    plan.model_dump_json(),
                    plan.created_at,
                    first_writer_rank(),
                )
            ],
            ["tenant_id", "code", "version", "name", "currency", "doc", "created_at", "rank"],
        )

    # --- customers ----------------------------------------------------------------------------

    def customers(
        self,
        tenant_id: str,
        external_id: str | None = None,
        limit: int | None = None,
        offset: int = 0,
        external_ids: Iterable[str] | None = None,
    ) -> list[Customer]:
        where = ["tenant_id = {tenant:String}"]
        params: dict[str, Any] = {"tenant": tenant_id}
        if external_id is not None:
            where.append("external_id = {ext:String}")
            params["ext"] = external_id
        if external_ids is not None:
            where.append("external_id IN {exts:Array(String)}")
            params["exts"] = sorted(set(external_ids))
        tail = ""
        if limit is not None:
            tail = " LIMIT {limit:UInt32} OFFSET {offset:UInt32}"
            params.update(limit=limit, offset=offset)
        rows = self.store.query_rows(
            f"SELECT doc FROM {self.db}.customers FINAL WHERE {' AND '.join(where)} "
            f"ORDER BY external_id{tail}",
            params,
        )
        return [Customer.model_validate_json(r[0]) for r in rows]

    def write_customer(self, tenant_id: str, c: Customer) -> None:
        self.store.insert(
            "customers",
            [
                (
                    tenant_id,
                    c.external_id,
                    c.name,
                    c.currency,
                    c.model_dump_json(),
                    c.created_at,
                    c.updated_at,
                    self.versions.next(),
                )
            ],
            [
                "tenant_id",
                "external_id",
                "name",
                "currency",
                "doc",
                "created_at",
                "updated_at",
                "version",
            ],
        )

    # --- subscriptions ------------------------------------------------------------------------

    def subscriptions(
        self, tenant_id: str, sub_id: str | None = None, customer_id: str | None = None
    ) -> list[Subscription]:
        where = ["tenant_id = {tenant:String}"]
        params: dict[str, Any] = {"tenant": tenant_id}
        if sub_id is not None:
            where.append("subscription_id = {id:String}")
            params["id"] = sub_id
        if customer_id is not None:
            where.append("customer_id = {cust:String}")
            params["cust"] = customer_id
        rows = self.store.query_rows(
            f"SELECT doc FROM {self.db}.subscriptions FINAL WHERE {' AND '.join(where)} "
            "ORDER BY created_at, subscription_id",
            params,
        )
        return [Subscription.model_validate_json(r[0]) for r in rows]

    def write_subscription(self, tenant_id: str, sub: Subscription) -> None:
        self.store.insert(
            "subscriptions",
            [
                (
                    tenant_id,
                    sub.id,
                    sub.customer_id,
                    sub.status.value,
                    sub.plan_code,
                    sub.plan_version,
                    sub.model_dump_json(),
                    sub.created_at,
                    sub.updated_at,
                    self.versions.next(),
                )
            ],
            [
                "tenant_id",
                "subscription_id",
                "customer_id",
                "status",
                "plan_code",
                "plan_version",
                "doc",
                "created_at",
                "updated_at",
                "version",
            ],
        )
