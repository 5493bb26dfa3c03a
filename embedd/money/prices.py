"""Prices and exact money arithmetic: the one price table, pure, no I/O.

Money is `Decimal` from the price table to the ledger file; a float never touches it.
A cost is `tokens x USD per 1M tokens`, computed exactly (`cost`), then rounded once,
half-to-even, to the ledger's 12 decimal places (`money`). With OpenAI's prices (at
most 3 decimals per 1M tokens) a cost has at most 9 places, so nothing is rounded at
all. `format_usd` writes an amount as plain fixed-point text (`0.528`, `0.00000078`,
`3`): never an exponent, trailing zeros dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Context, Decimal, Inexact, InvalidOperation
from types import MappingProxyType
from typing import Literal, TypeAlias

from embedd.errors import ConfigError

MONEY_PLACES = 12
_QUANTUM = Decimal(1).scaleb(-MONEY_PLACES)
# Enough digits that tokens x price is never rounded; Inexact traps if it ever were.
_EXACT = Context(prec=60, rounding=ROUND_HALF_EVEN, traps=[InvalidOperation, Inexact])

Lane: TypeAlias = Literal["batch", "sync"]

# The full output size of each known embedding model.
NATIVE_DIMENSIONS: Mapping[str, int] = MappingProxyType(
    {
        "text-embedding-3-large": 3072,
        "text-embedding-3-small": 1536,
        "text-embedding-ada-002": 1536,
    }
)


@dataclass(frozen=True, slots=True)
class Price:
    """USD per 1M tokens on the synchronous API (`standard`) and the Batch API (`batch`)."""

    standard: Decimal
    batch: Decimal

    def __post_init__(self) -> None:
        for name in ("standard", "batch"):
            value = getattr(self, name)
            if not isinstance(value, Decimal) or not value.is_finite() or value < 0:
                raise ValueError(f"price {name} must be a finite Decimal >= 0, got {value!r}")

    def on(self, lane: str) -> Decimal:
        """The price per 1M tokens on `lane`: `batch`, else the standard (sync) price."""
        return self.batch if lane == "batch" else self.standard


# The default `[cost.prices]` table (config.toml shows the same values).
DEFAULT_PRICES: Mapping[str, Price] = MappingProxyType(
    {
        "text-embedding-3-large": Price(Decimal("0.13"), Decimal("0.065")),
        "text-embedding-3-small": Price(Decimal("0.02"), Decimal("0.01")),
        "text-embedding-ada-002": Price(Decimal("0.10"), Decimal("0.05")),
    }
)


def to_decimal(value: object, what: str) -> Decimal:
    """A finite Decimal from a config or JSON value; floats go through their shortest
    repr. `ValueError` naming `what` otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a number, got {value!r}")
    if isinstance(value, Decimal):
        result = value
    elif isinstance(value, int):
        result = Decimal(value)
    elif isinstance(value, float | str):
        # repr() of a float is the shortest text that reads back as it: 0.065 -> "0.065".
        try:
            result = Decimal(repr(value) if isinstance(value, float) else value.strip())
        except InvalidOperation:
            raise ValueError(f"{what} must be a number, got {value!r}") from None
    else:
        raise ValueError(f"{what} must be a number, got {value!r}")
    if not result.is_finite():
        raise ValueError(f"{what} must be finite, got {value!r}")
    return result


def price_for(prices: Mapping[str, Price], model: str) -> Price:
    """The price of `model`, or `ConfigError` naming the missing `[cost.prices]` entry."""
    try:
        return prices[model]
    except KeyError:
        raise ConfigError(f"no price for model {model!r}: add it to [cost.prices]") from None


def cost(tokens: int, price_per_million: Decimal) -> Decimal:
    """The exact USD cost of `tokens` at `price_per_million` (no rounding at all)."""
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
        raise ValueError(f"tokens must be an int >= 0, got {tokens!r}")
    return _EXACT.multiply(Decimal(tokens), price_per_million).scaleb(-6, _EXACT)


def money(value: Decimal) -> Decimal:
    """`value` rounded (half-to-even) to the ledger's 12 decimal places."""
    return value.quantize(_QUANTUM, rounding=ROUND_HALF_EVEN)


def lane_cost(prices: Mapping[str, Price], model: str, tokens: int, lane: str) -> Decimal:
    """What `tokens` (negative counts as 0) cost on `lane` for `model`, in ledger money."""
    return money(cost(max(tokens, 0), price_for(prices, model).on(lane)))


def format_usd(value: Decimal) -> str:
    """The JSON-number text for an amount: fixed-point, <= 12 places, no trailing zeros."""
    text = format(money(value), "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text
