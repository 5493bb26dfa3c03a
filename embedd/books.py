"""What the money code needs from the running daemon: the ledger and its edges.

Passed explicitly to accounting (ledger lines) and budgeting (budget checks) by the
stages that bill work: collector, delivery, submitter, sync lane.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from embedd.config import Settings
from embedd.cost import Price
from embedd.ledger import Ledger
from embedd.store import Store


def prices_of(settings: Settings) -> dict[str, Price]:
    """The configured price table, by model."""
    return {
        model: Price(standard=standard, batch=batch)
        for model, (standard, batch) in settings.prices.items()
    }


@dataclass(frozen=True)
class Books:
    settings: Settings
    store: Store
    ledger: Ledger
    clock: Callable[[], float]
    log: Any
    emulated: bool
    prices: dict[str, Price]
