"""Fixtures: the catalog fixtures (real app on real chDB, tenants with meters, usage stored
through the worker's real aggregation and sink) plus a billing-services helper."""

from __future__ import annotations

from typing import Any

import pytest

from api.billing_state import BillingServices, build_services
from tally.settings import Settings
from tests.integration.catalog.conftest import (  # noqa: F401  (fixtures)
    Tenant,
    anyio_backend,
    client,
    other,
    repo,
    tenant,
)


@pytest.fixture
def settings(tmp_path: Any) -> Settings:
    return Settings.model_validate(
        {"data_dir": tmp_path / "data", "billing_tasks": False, "invoice_run_workers": 1}
    )


@pytest.fixture
def services(store: Any, settings: Settings) -> BillingServices:
    return build_services(settings, store)
