"""JSON text with exact money: `Decimal` is written as a JSON number, a float never is.

How money is written in JSON (the ledger, `embedd report --format json`, manifests):
as a JSON *number* in plain fixed-point notation (`embedd.money.prices.format_usd`). Because
the text is the exact decimal, a reader that parses numbers as decimals
(`json.loads(line, parse_float=Decimal)`) gets the exact value back, and one that
parses floats gets the nearest float, which prints as the same text.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from decimal import Decimal

from embedd.money.prices import format_usd


def dumps_exact(obj: object) -> str:
    """JSON text like `json.dumps`, but `Decimal` is written as an exact number.

    Floats are refused: money must never pass through one.
    """
    if isinstance(obj, Decimal):
        return format_usd(obj) if obj.is_finite() else _refuse(obj)
    if obj is None or isinstance(obj, bool | int | str):
        return json.dumps(obj)
    if isinstance(obj, Mapping):
        items = (f"{json.dumps(str(k))}: {dumps_exact(v)}" for k, v in obj.items())
        return "{" + ", ".join(items) + "}"
    if isinstance(obj, list | tuple):
        return "[" + ", ".join(dumps_exact(v) for v in obj) + "]"
    return _refuse(obj)


def dumps_document(obj: object, indent: int = 2, _level: int = 0) -> str:
    """Indented JSON like `json.dumps(obj, indent=2, allow_nan=False)`, except that a
    `Decimal` is written as an exact number (see `dumps_exact`).

    For documents that hold money next to other data (a manifest's `cost_usd` beside
    a record's `meta`, which may have floats of its own): floats stay as json writes
    them, money never becomes one. Strings are ASCII-escaped as json does by default.
    """
    if isinstance(obj, Decimal):
        return format_usd(obj) if obj.is_finite() else _refuse(obj)
    inner = "\n" + " " * (indent * (_level + 1))
    outer = "\n" + " " * (indent * _level)
    if isinstance(obj, Mapping):
        if not obj:
            return "{}"
        items = (
            f"{json.dumps(str(k))}: {dumps_document(v, indent, _level + 1)}" for k, v in obj.items()
        )
        return "{" + inner + ("," + inner).join(items) + outer + "}"
    if isinstance(obj, list | tuple):
        if not obj:
            return "[]"
        values = (dumps_document(v, indent, _level + 1) for v in obj)
        return "[" + inner + ("," + inner).join(values) + outer + "]"
    return json.dumps(obj, allow_nan=False)


def _refuse(obj: object) -> str:
    raise TypeError(f"cannot write {type(obj).__name__} {obj!r} as exact JSON")
