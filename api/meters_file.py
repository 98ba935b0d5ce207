"""Load meters from a YAML file at startup (``settings.meters_file``), idempotently.

Format (several tenants)::

    tenants:
      <tenant_id>:
        meters:
          - slug: api_calls
            event_type: api_call        # or eventType
            aggregation: COUNT
          - slug: tokens
            eventType: llm
            aggregation: SUM
            valueProperty: $.tokens
            groupBy: {model: $.model}

A single-tenant shorthand is accepted too: ``{tenant: <tenant_id>, meters: [...]}``.

Each entry is a ``schemas.meters.MeterSpec``. A missing meter is created like ``POST /v1/meters``
(stored pending, activation markers produced to every partition, then active); a slug that
already exists with the same spec is left alone (a pending one has its activation finished); one
that exists with a different spec is an error naming it (delete the meter first: changing a meter
in place would silently change history). The tenants must exist.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pydantic
import yaml

from schemas.meters import MeterSpec
from tally.errors import Conflict, NotFound, ValidationError

log = logging.getLogger(__name__)


def parse_meters_file(text: str, source: str = "meters file") -> dict[str, list[MeterSpec]]:
    """tenant id -> meter specs. Pure; raises ValidationError naming the bad entry."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValidationError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise ValidationError(f"{source}: expected a mapping with 'tenants' or 'tenant'")
    raw: dict[str, Any]
    if "tenants" in doc:
        if set(doc) - {"tenants"}:
            raise ValidationError(f"{source}: unexpected keys {sorted(set(doc) - {'tenants'})}")
        if not isinstance(doc["tenants"], dict):
            raise ValidationError(f"{source}: 'tenants' must map tenant ids to {{meters: [...]}}")
        raw = {}
        for tenant_id, entry in doc["tenants"].items():
            if not isinstance(entry, dict) or set(entry) - {"meters"}:
                raise ValidationError(f"{source}: tenants.{tenant_id} must be {{meters: [...]}}")
            raw[str(tenant_id)] = entry.get("meters") or []
    elif "tenant" in doc:
        if set(doc) - {"tenant", "meters"}:
            raise ValidationError(
                f"{source}: unexpected keys {sorted(set(doc) - {'tenant', 'meters'})}"
            )
        raw = {str(doc["tenant"]): doc.get("meters") or []}
    else:
        raise ValidationError(f"{source}: expected a top-level 'tenants' or 'tenant' key")
    out: dict[str, list[MeterSpec]] = {}
    for tenant_id, meters in raw.items():
        if not isinstance(meters, list):
            raise ValidationError(f"{source}: meters of tenant {tenant_id} must be a list")
        specs: list[MeterSpec] = []
        seen: set[str] = set()
        for i, m in enumerate(meters):
            try:
                spec = MeterSpec.model_validate(m)
            except pydantic.ValidationError as exc:
                raise ValidationError.from_pydantic(
                    exc, f"{source}: tenant {tenant_id} meter #{i}", prefix=f"meters.{i}"
                ) from None
            if spec.slug in seen:
                raise ValidationError(f"{source}: tenant {tenant_id}: duplicate slug {spec.slug!r}")
            seen.add(spec.slug)
            specs.append(spec)
        out[tenant_id] = specs
    return out


async def apply_meters(st: Any, specs: dict[str, list[MeterSpec]]) -> list[str]:
    """Create the missing meters (activation markers included, ``api.meters.activate_meter``) and
    finish the activation of pending ones; returns ``tenant/slug`` of those created now."""
    from api.meters import activate_meter

    created: list[str] = []
    for tenant_id, meters in specs.items():
        try:
            await st.run(st.repo.get_tenant, tenant_id)
        except NotFound:
            raise ValidationError(f"meters file: tenant {tenant_id!r} does not exist") from None
        for spec in meters:
            try:
                _meter, done_now = await activate_meter(st, tenant_id, spec, existing_ok=True)
            except Conflict as exc:
                raise Conflict(
                    f"meters file: meter {spec.slug!r} of tenant {tenant_id}: {exc.message}",
                    details=exc.details,
                ) from None
            if done_now:
                created.append(f"{tenant_id}/{spec.slug}")
    if created:
        log.info("meters file: created %d meters: %s", len(created), ", ".join(created))
    return created


async def load_meters_file(st: Any, path: Path) -> list[str]:
    """Load ``path`` (``settings.meters_file``) into the app state ``st`` (``api.state.AppState``)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValidationError(f"meters file {path}: cannot read: {exc}") from None
    return await apply_meters(st, parse_meters_file(text, str(path)))
