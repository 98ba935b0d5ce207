"""Python client for Tally: ``Tally`` (sync) and ``AsyncTally`` (asyncio). See docs/sdk.md.

from tally_client import Tally

with Tally("http://127.0.0.1:8000", api_key="tly_...") as tally:
    tally.track("llm.call", "cust-1", {"tokens": 120})   # batched in the background
    usage = tally.meters.usage("tokens", customers=["cust-1"], window="DAY")
"""

from __future__ import annotations

from tally_client._core import RetryPolicy
from tally_client.aio import AsyncTally
from tally_client.client import Tally
from tally_client.errors import (
    ApiError,
    AuthenticationError,
    BadRequestError,
    ClientClosedError,
    ConflictError,
    ConnectionFailedError,
    DeliveryError,
    NotFoundError,
    PayloadTooLargeError,
    QueueFullError,
    RateLimitedError,
    TallyClientError,
    UnavailableError,
)

__all__ = [
    "ApiError",
    "AsyncTally",
    "AuthenticationError",
    "BadRequestError",
    "ClientClosedError",
    "ConflictError",
    "ConnectionFailedError",
    "DeliveryError",
    "NotFoundError",
    "PayloadTooLargeError",
    "QueueFullError",
    "RateLimitedError",
    "RetryPolicy",
    "Tally",
    "TallyClientError",
    "UnavailableError",
]
