"""What the money code needs from the running daemon: the ledger and its edges.

Passed explicitly to `budget` (ledger lines and budget checks) by the
stages that bill work: collector, delivery, submitter, sync lane.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from embedd.config import Settings
from embedd.money.ledger import Ledger
from embedd.money.prices import Price
from embedd.state.store import Store


def prices_of(settings: Settings) -> dict[str, Price]:
    """The configured price table, by model."""
    return dict(settings.prices)


@dataclass(frozen=True)
class Books:
    settings: Settings
    store: Store
    ledger: Ledger
    clock: Callable[[], float]
    log: Any
    emulated: bool
    prices: dict[str, Price]
