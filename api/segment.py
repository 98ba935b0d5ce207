"""Segment sources: the tracking API (``/v1/batch``, ``/v1/track``) and the webhook destination.

Tracking API (what Segment's libraries speak, e.g. ``segment-analytics-python`` with ``host``
pointing at Tally). The **write key is the tenant's Tally API key**: as the HTTP Basic user with
an empty password (what the libraries send), as ``Authorization: Bearer``, or as ``writeKey`` in
the body. Bodies may be gzip-compressed (``Content-Encoding: gzip``). Limits are Segment's: 500 KB
per batch, 32 KB per message (and per ``/v1/track`` body), 2500 messages per batch. Answers:

- 200 ``{"success": true, "accepted": n, "ignored": k, "rejected": [{index, field, message}]}``:
  valid ``track`` messages are stored, ``identify``/``page``/``screen``/``group``/``alias`` are
  ignored (counted in ``tally_segment_messages_ignored``), invalid ones are listed;
- 400 when the body is not JSON, too large, or no message at all is valid (as Segment);
- 401 without a valid write key; 503 + Retry-After when the broker is down (nothing counts;
  Segment's libraries retry, and the retry is deduplicated by ``messageId``).

Webhook destination: ``POST /v1/segment/webhook/{tenant_id}``, one message per request, signed
``X-Signature: hex(HMAC-SHA1(shared secret, raw body))``; a missing or wrong signature is 401.
The secret is set and rotated through ``POST /v1/segment/webhook-secret`` and is stored sealed
(``api.secretbox``); it is never logged. Replays are harmless: ``messageId`` deduplicates.

Every path reuses native ingest (``api.ingest.deliver``): the same envelopes, acks=all,
``wait=stored`` in embedded mode, lateness bounds and tenant scoping.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time
import zlib
from datetime import timedelta
from typing import Any

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from api.auth import Tenant, client_address, tenant_of_api_key
from api.bodies import parse_body, read_body
from api.errors import json_response
from api.ingest import (
    UnencodableEvents,
    count_rejected,
    deliver,
    limits_of,
    parse_wait,
    reject_unencodable,
)
from api.ingest_parse import load_json
from api.openapi import doc, model, query
from api.secretbox import SecretBox
from api.segment_parse import (
    MAX_BATCH_BYTES,
    MAX_MESSAGE_BYTES,
    CustomerRule,
    SegmentParse,
    parse_messages,
    summary,
)
from api.state import AppState, get_state, state_of
from clickhouse.segment import SegmentRepo, SegmentSettings
from schemas.envelope import STORE_MS_MAX, STORE_MS_MIN, EventColumns
from schemas.events import ID_MAX
from schemas.jsonschema import INT64, JSON_OBJECT, RFC3339_STORE, component
from schemas.segment import (
    IGNORED_TYPES,
    SegmentAnswer,
    SegmentConfig,
    SegmentConfigIn,
    SegmentWebhook,
    WebhookSecretIn,
    WebhookSecretOut,
)
from schemas.timeutil import utc_now
from tally import log as tally_log
from tally.errors import (
    AuthenticationError,
    PayloadTooLarge,
    UnsupportedMediaType,
    ValidationError,
)

router = APIRouter()

CACHE_TTL_S = 5.0  # another replica sees a settings change within this long
MAX_WEBHOOK_BYTES = 64 * 1024  # one message, plus what Segment adds to it
MAX_CONFIG_BYTES = 16 * 1024
_JSON_TYPES = ("application/json", "text/plain")  # text/plain: browsers' sendBeacon


# --- OpenAPI -----------------------------------------------------------------------------------


_ANY = component("JsonValue")


def _cases(*names: str) -> list[str]:
    return sorted({v for n in names for v in (n, n.upper(), n.capitalize())})


_ID = {
    "description": "a non-blank string or an integer",
    "anyOf": [
        {"type": "string", "minLength": 1, "maxLength": ID_MAX, "pattern": r"\S"},
        INT64,
    ],
}
_MSG_TIME = {
    "description": "RFC 3339 with an offset, or epoch ms (years 1900..2299, within the lateness "
    "bounds)",
    "anyOf": [
        {"type": "string", "pattern": RFC3339_STORE},
        {"type": "integer", "minimum": STORE_MS_MIN, "maximum": STORE_MS_MAX},
        {"type": "null"},
    ],
}
_TEXT = {"type": "string", "minLength": 1, "maxLength": ID_MAX}
# timestamp when given (not null), else originalTimestamp (else the receive time)
_WHEN = {
    "anyOf": [
        {"required": ["timestamp"], "properties": {"timestamp": {"not": {"type": "null"}}}},
        {"properties": {"originalTimestamp": _MSG_TIME}},
    ]
}
_CUSTOMER = {
    "anyOf": [
        {"required": ["userId"], "properties": {"userId": _ID}},
        {"required": ["anonymousId"], "properties": {"anonymousId": _ID}},
    ]
}


def _track(with_type: bool) -> dict[str, Any]:
    props: dict[str, Any] = {
        "messageId": {**_TEXT, "description": "the dedupe key"},
        "event": {**_TEXT, "description": "the event type"},
        "userId": {"anyOf": [_ID, {"type": "null"}]},
        "properties": {"anyOf": [JSON_OBJECT, {"type": "null"}]},
        "timestamp": _MSG_TIME,
        "originalTimestamp": {**_ANY, "description": "used when timestamp is absent or null"},
    }
    required = ["messageId", "event"]
    if with_type:
        props["type"] = {"type": "string", "enum": _cases("track")}
        required.append("type")
    return {
        "type": "object",
        "description": "A track message: messageId -> id, event -> type, userId (else "
        "anonymousId, or the tenant's customer_property) -> customer, properties, timestamp "
        "(else originalTimestamp, else now) -> time. Other fields are ignored. At most 32 KB.",
        "required": required,
        "properties": props,
        "additionalProperties": _ANY,
        "allOf": [_CUSTOMER, _WHEN],
    }


_IGNORED = {
    "type": "object",
    "description": "identify, page, screen, group and alias messages are accepted and ignored",
    "required": ["type"],
    "properties": {"type": {"type": "string", "enum": _cases(*sorted(IGNORED_TYPES))}},
    "additionalProperties": _ANY,
}
_MESSAGE = {"anyOf": [_track(True), _IGNORED]}
BATCH_IN = {
    "type": "object",
    "required": ["batch"],
    "properties": {
        "batch": {
            "type": "array",
            "description": "Messages (at most 2500, 500 KB in all); invalid ones are rejected one "
            "by one (listed in `rejected`)",
            "minItems": 1,
            "contains": _MESSAGE,
        },
        "writeKey": {
            **_ANY,
            "description": "the write key (a string), when not in Authorization; otherwise ignored",
        },
        "sentAt": _ANY,
        "context": {
            **_ANY,
            "description": "applies to every message that has no context of its own",
        },
    },
}
ANY_OBJECT = {**JSON_OBJECT, "description": "The message (accepted and ignored)"}
SEGMENT_MEDIA = ("application/json",)  # text/plain (sendBeacon) and +json are read too
_ANSWER = model(SegmentAnswer)
_WAIT = [query("wait", {"type": "string", "enum": ["broker", "stored"]}, "as for /v1/events")]
# --- per-app service: settings cache and the secret box ----------------------------------------


class SegmentService:
    """Per-app: the tenants' Segment settings (cached ``CACHE_TTL_S``) and opened secrets."""

    def __init__(self, st: AppState) -> None:
        self.store = st.store
        self.repo = SegmentRepo(st.store)
        self._keys = st.settings.secrets_key.get_secret_value()
        self._box: SecretBox | None = None
        self._cache: dict[str, tuple[float, SegmentSettings]] = {}
        self._opened: dict[str, str | None] = {}

    @property
    def box(self) -> SecretBox:
        if self._box is None:
            self._box = SecretBox(self._keys)  # NotConfigured (503) without a key
        return self._box

    async def settings(self, st: AppState, tenant_id: str) -> SegmentSettings:
        hit = self._cache.get(tenant_id)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        value: SegmentSettings = await st.run(self.repo.get, tenant_id)
        if len(self._cache) >= 10_000:
            self._cache.clear()
        self._cache[tenant_id] = (time.monotonic() + CACHE_TTL_S, value)
        return value

    async def save(self, st: AppState, value: SegmentSettings) -> None:
        await st.run(self.repo.put, value)
        self._cache[value.tenant_id] = (time.monotonic() + CACHE_TTL_S, value)

    def open(self, sealed: str) -> str | None:
        if sealed not in self._opened:
            if len(self._opened) >= 10_000:
                self._opened.clear()
            self._opened[sealed] = self.box.open(sealed)
        return self._opened[sealed]


async def service(request: Request, st: AppState = Depends(get_state)) -> SegmentService:
    svc = getattr(request.app.state, "segment", None)
    if svc is None or svc.store is not st.store:
        svc = SegmentService(st)
        request.app.state.segment = svc
    return svc


# --- request reading ---------------------------------------------------------------------------


async def _read(request: Request, limit: int, what: str) -> bytes:
    """The body, gunzipped if ``Content-Encoding: gzip``; 400 past ``limit`` bytes (Segment)."""
    media = (request.headers.get("content-type") or "application/json").split(";")[0]
    media = media.strip().lower()
    if media not in _JSON_TYPES and not media.endswith("+json"):
        raise UnsupportedMediaType(
            f"Content-Type {media!r} is not supported; send application/json",
            details=[{"field": "content-type", "message": "unsupported media type"}],
        )
    encoding = (request.headers.get("content-encoding") or "identity").strip().lower()
    if encoding not in ("identity", "gzip", "x-gzip"):
        raise UnsupportedMediaType(
            f"Content-Encoding {encoding!r} is not supported; send gzip or no encoding",
            details=[{"field": "content-encoding", "message": "expected gzip or identity"}],
        )
    try:
        raw = await read_body(request, limit)
    except PayloadTooLarge:
        raise _too_large(what, limit) from None
    state_of(request).metrics.ingest_bytes.labels("segment").inc(len(raw))
    if encoding == "identity":
        return raw
    inflater = zlib.decompressobj(wbits=31)
    try:
        out = inflater.decompress(raw, limit + 1)
    except zlib.error as exc:
        raise ValidationError(
            f"the body is not valid gzip: {exc}",
            details=[{"field": "content-encoding", "message": "invalid gzip data"}],
        ) from None
    if len(out) > limit:
        raise _too_large(what, limit)
    if not inflater.eof:
        raise ValidationError(
            "the gzip body is truncated",
            details=[{"field": "content-encoding", "message": "truncated gzip data"}],
        )
    return out


def _too_large(what: str, limit: int) -> ValidationError:
    # Segment answers 400 (not 413) for a payload over its limits; so does Tally here.
    return ValidationError(
        f"{what} is larger than {limit // 1024} KB (Segment's limit)",
        details=[{"field": "body", "message": f"at most {limit} bytes"}],
    )


def _basic_user(value: str) -> str:
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise AuthenticationError(
            "malformed Basic credentials: expected base64 of '<write key>:'",
            details=[{"field": "authorization", "message": "invalid base64"}],
        ) from None
    return decoded.partition(":")[0]


def write_key(request: Request, doc: Any) -> str:
    """The write key: the Basic user, a Bearer token, else ``writeKey`` in the body."""
    header = request.headers.get("authorization")
    if header is not None and header.strip():
        scheme, _, value = header.strip().partition(" ")
        scheme = scheme.lower()
        key = _basic_user(value) if scheme == "basic" else value.strip()
        if scheme not in ("basic", "bearer"):
            raise AuthenticationError(
                "unsupported Authorization scheme; send the write key (a Tally API key) as the "
                "Basic user with an empty password, or as a Bearer token",
                details=[{"field": "authorization", "message": "expected Basic or Bearer"}],
            )
        if key:
            return key
    body_key = doc.get("writeKey") if isinstance(doc, dict) else None
    if isinstance(body_key, str) and body_key:
        return body_key
    raise AuthenticationError(
        "missing write key: send the tenant's Tally API key as the HTTP Basic user (empty "
        "password) or as writeKey in the body",
        details=[{"field": "writeKey", "message": "missing"}],
    )


# --- the common answer -------------------------------------------------------------------------


async def _store(
    request: Request, st: AppState, tenant_id: str, res: SegmentParse, api: str, now_ms: int
) -> Response:
    wait = parse_wait(request.query_params.get("wait"), st)
    metrics = st.metrics
    if res.errors and not res.rows and not res.ignored:
        count_rejected(metrics, api, res.errors)
        raise ValidationError(summary(res), details=res.errors)
    if res.rows:
        try:
            await deliver(st, tenant_id, EventColumns.of_rows(res.rows), now_ms, wait, api)
        except UnencodableEvents as exc:  # rare: reject those messages, deliver the others
            reject_unencodable(res, exc.positions)
            if not res.rows and not res.ignored:
                count_rejected(metrics, api, res.errors)
                raise ValidationError(summary(res), details=res.errors) from None
            if res.rows:
                await deliver(st, tenant_id, EventColumns.of_rows(res.rows), now_ms, wait, api)
    for kind, n in res.ignored.items():
        metrics.segment_ignored.labels(kind).inc(n)
    if res.errors:
        count_rejected(metrics, api, res.errors)
    answer = SegmentAnswer(accepted=len(res.rows), ignored=res.n_ignored, rejected=res.errors)
    return json_response(200, answer.model_dump(mode="json"))


def _rule(s: SegmentSettings) -> CustomerRule:
    return CustomerRule.of(s.customer_property, s.fallback_to_user)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


# --- tracking API ------------------------------------------------------------------------------


@router.post(
    "/v1/batch",
    tags=["segment"],
    **doc(
        ok={200: _ANSWER},
        body=BATCH_IN,
        media=SEGMENT_MEDIA,
        params=_WAIT,
        errors=(415,),
        no_errors=(413,),
    ),
)
async def segment_batch(
    request: Request,
    st: AppState = Depends(get_state),
    svc: SegmentService = Depends(service),
) -> Response:
    """Segment's batch call: ``{"batch": [message, ...], "sentAt"?, "context"?, "writeKey"?}``."""
    doc = load_json(await _read(request, MAX_BATCH_BYTES, "a batch request"))
    tenant_id = await tenant_of_api_key(st, write_key(request, doc), client_address(request))
    if not isinstance(doc, dict) or not isinstance(doc.get("batch"), list):
        raise ValidationError(
            'a batch request is an object {"batch": [message, ...]}',
            details=[{"field": "batch", "message": "expected an array of messages"}],
        )
    if not doc["batch"]:
        raise ValidationError(
            "the batch is empty", details=[{"field": "batch", "message": "empty array"}]
        )
    cfg = await svc.settings(st, tenant_id)
    now_ms = _now_ms()
    res = parse_messages(
        doc["batch"],
        now_ms=now_ms,
        limits=limits_of(st),
        rule=_rule(cfg),
        batch_context=doc.get("context"),
    )
    return await _store(request, st, tenant_id, res, "segment", now_ms)


@router.post(
    "/v1/track",
    tags=["segment"],
    **doc(
        ok={200: _ANSWER},
        body=_track(False),
        media=SEGMENT_MEDIA,
        params=_WAIT,
        errors=(415,),
        no_errors=(413,),
    ),
)
async def segment_track(
    request: Request,
    st: AppState = Depends(get_state),
    svc: SegmentService = Depends(service),
) -> Response:
    """Segment's track call: one message object (its ``type`` is implied)."""
    doc = load_json(await _read(request, MAX_MESSAGE_BYTES, "a track request"))
    tenant_id = await tenant_of_api_key(st, write_key(request, doc), client_address(request))
    if not isinstance(doc, dict):
        raise ValidationError(
            "a track request is one message object",
            details=[{"field": "body", "message": "expected a JSON object"}],
        )
    cfg = await svc.settings(st, tenant_id)
    now_ms = _now_ms()
    res = parse_messages(
        [doc],
        now_ms=now_ms,
        limits=limits_of(st),
        rule=_rule(cfg),
        implied_type="track",
        max_message_bytes=None,
    )
    return await _store(request, st, tenant_id, res, "segment", now_ms)


def _ignored_route(kind: str) -> None:
    async def handler(request: Request, st: AppState = Depends(get_state)) -> Response:
        doc = load_json(await _read(request, MAX_MESSAGE_BYTES, f"a {kind} request"))
        await tenant_of_api_key(st, write_key(request, doc), client_address(request))
        if not isinstance(doc, dict):
            raise ValidationError(
                f"a {kind} request is one message object",
                details=[{"field": "body", "message": "expected a JSON object"}],
            )
        st.metrics.segment_ignored.labels(kind).inc()
        return json_response(200, SegmentAnswer(ignored=1).model_dump(mode="json"))

    handler.__name__ = f"segment_{kind}"
    handler.__doc__ = f"Segment's {kind} call: accepted and ignored (Tally meters track events)."
    router.add_api_route(
        f"/v1/{kind}",
        handler,
        methods=["POST"],
        tags=["segment"],
        **doc(
            ok={200: _ANSWER}, body=ANY_OBJECT, media=SEGMENT_MEDIA, errors=(415,), no_errors=(413,)
        ),
    )


for _kind in sorted(IGNORED_TYPES):
    _ignored_route(_kind)


# --- webhook destination -----------------------------------------------------------------------


def _refuse(st: AppState, reason: str, message: str) -> AuthenticationError:
    st.metrics.segment_webhook_refused.labels(reason).inc()
    return AuthenticationError(message, details=[{"field": "x-signature", "message": reason}])


def _valid_secrets(svc: SegmentService, cfg: SegmentSettings) -> list[str]:
    sealed = [cfg.secret_sealed] if cfg.secret_sealed else []
    if cfg.previous_sealed and cfg.previous_until is not None and cfg.previous_until > utc_now():
        sealed.append(cfg.previous_sealed)
    out = []
    for s in sealed:
        plain = svc.open(s)
        if plain is not None:
            out.append(plain)
    return out


@router.post(
    "/v1/segment/webhook/{tenant_id}",
    tags=["segment"],
    **doc(
        ok={200: _ANSWER},
        body=_MESSAGE,
        media=SEGMENT_MEDIA,
        params=_WAIT,
        errors=(415,),
        no_errors=(404, 413),
    ),
)
async def segment_webhook(
    tenant_id: str,
    request: Request,
    st: AppState = Depends(get_state),
    svc: SegmentService = Depends(service),
) -> Response:
    """Segment's webhook destination: one message, ``X-Signature`` = hex HMAC-SHA1 of the body."""
    raw = await _read(request, MAX_WEBHOOK_BYTES, "a webhook message")
    signature = (request.headers.get("x-signature") or "").strip().lower()
    if not signature:
        raise _refuse(
            st, "missing", "missing X-Signature header (hex HMAC-SHA1 of the body, shared secret)"
        )
    cfg = await svc.settings(st, tenant_id) if len(tenant_id) <= 64 else None
    valid = _valid_secrets(svc, cfg) if cfg is not None else []
    if not valid:
        raise _refuse(
            st,
            "not_enabled",
            "the Segment webhook is not enabled for this tenant: set its shared secret with "
            "POST /v1/segment/webhook-secret",
        )
    given = signature.encode("utf-8", "replace")
    if not any(
        hmac.compare_digest(hmac.new(s.encode(), raw, hashlib.sha1).hexdigest().encode(), given)
        for s in valid
    ):
        raise _refuse(
            st, "bad_signature", "X-Signature does not match the body under the shared secret"
        )
    tally_log.note_tenant(tenant_id)
    doc = load_json(raw)
    if not isinstance(doc, dict):
        raise ValidationError(
            "a webhook request is one message object",
            details=[{"field": "body", "message": "expected a JSON object"}],
        )
    assert cfg is not None  # a secret verified
    now_ms = _now_ms()
    res = parse_messages(
        [doc], now_ms=now_ms, limits=limits_of(st), rule=_rule(cfg), max_message_bytes=None
    )
    return await _store(request, st, tenant_id, res, "segment_webhook", now_ms)


# --- settings ----------------------------------------------------------------------------------


def _webhook(cfg: SegmentSettings) -> SegmentWebhook:
    now = utc_now()
    prev = cfg.previous_until if cfg.previous_sealed and cfg.previous_until else None
    return SegmentWebhook(
        enabled=bool(cfg.secret_sealed),
        path=f"/v1/segment/webhook/{cfg.tenant_id}",
        secret_set_at=cfg.secret_set_at if cfg.secret_sealed else None,
        previous_secret_valid_until=prev if prev is not None and prev > now else None,
    )


def _config(cfg: SegmentSettings) -> SegmentConfig:
    return SegmentConfig(
        customer_property=cfg.customer_property or None,
        fallback_to_user_id=cfg.fallback_to_user,
        webhook=_webhook(cfg),
    )


@router.get("/v1/segment/config", tags=["segment"], **doc(ok={200: model(SegmentConfig)}))
async def get_config(
    tenant_id: Tenant,
    st: AppState = Depends(get_state),
    svc: SegmentService = Depends(service),
) -> Response:
    cfg = await st.run(svc.repo.get, tenant_id)
    return json_response(200, _config(cfg).model_dump(mode="json"))


@router.put(
    "/v1/segment/config",
    tags=["segment"],
    **doc(ok={200: model(SegmentConfig)}, body=model(SegmentConfigIn, "validation")),
)
async def put_config(
    request: Request,
    tenant_id: Tenant,
    st: AppState = Depends(get_state),
    svc: SegmentService = Depends(service),
) -> Response:
    """Where a message's customer comes from (``customer_property``; null = userId)."""
    body = await parse_body(request, SegmentConfigIn, "Segment config", limit=MAX_CONFIG_BYTES)
    cur: SegmentSettings = await st.run(svc.repo.get, tenant_id)
    new = cur.changed(
        customer_property=body.customer_property or "",
        fallback_to_user=body.fallback_to_user_id,
    )
    await svc.save(st, new)
    return json_response(200, _config(new).model_dump(mode="json"))


@router.post(
    "/v1/segment/webhook-secret",
    tags=["segment"],
    **doc(
        ok={200: model(WebhookSecretOut)},
        body=model(WebhookSecretIn, "validation"),
        body_required=False,
    ),
)
async def set_webhook_secret(
    request: Request,
    tenant_id: Tenant,
    st: AppState = Depends(get_state),
    svc: SegmentService = Depends(service),
) -> Response:
    """Set or rotate the webhook's shared secret (generated and shown once when not given)."""
    body = await parse_body(
        request, WebhookSecretIn, "webhook secret", limit=MAX_CONFIG_BYTES, optional=True
    )
    box = svc.box
    plain = body.secret or secrets.token_urlsafe(32)
    now = utc_now()
    cur: SegmentSettings = await st.run(svc.repo.get, tenant_id)
    keep_previous = bool(cur.secret_sealed) and body.previous_valid_for_s > 0
    until = now + timedelta(seconds=body.previous_valid_for_s)
    new = cur.changed(
        secret_sealed=box.seal(plain),
        secret_set_at=now,
        previous_sealed=cur.secret_sealed if keep_previous else "",
        previous_until=until if keep_previous else None,
    )
    await svc.save(st, new)
    out = WebhookSecretOut(secret=None if body.secret else plain, webhook=_webhook(new))
    return json_response(200, out.model_dump(mode="json"))


@router.delete(
    "/v1/segment/webhook-secret", status_code=204, tags=["segment"], **doc(ok={204: None})
)
async def delete_webhook_secret(
    tenant_id: Tenant,
    st: AppState = Depends(get_state),
    svc: SegmentService = Depends(service),
) -> Response:
    """Disable the webhook destination: every secret stops verifying at once."""
    cur: SegmentSettings = await st.run(svc.repo.get, tenant_id)
    await svc.save(
        st,
        cur.changed(secret_sealed="", secret_set_at=None, previous_sealed="", previous_until=None),
    )
    return Response(status_code=204)
