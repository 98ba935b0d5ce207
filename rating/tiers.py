"""Find the band (tier or step) a quantity falls in: the first with ``q <= up_to`` (inclusive),
else the open last one."""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from typing import Protocol, TypeVar


class Band(Protocol):
    @property
    def up_to(self) -> Decimal | None: ...


B = TypeVar("B", bound=Band)


def band_index(bands: Sequence[B], quantity: Decimal) -> int:
    for i, band in enumerate(bands):
        if band.up_to is None or quantity <= band.up_to:
            return i
    return len(bands) - 1  # unreachable for validated specs (last band is open)
