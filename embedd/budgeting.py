"""Budgets at run time: may this submission go out, given what was spent?

Placeholder wiring: the decision logic lives in `embedd.budget` (pure); this module
connects it to the ledger rows in the state database.
"""

from __future__ import annotations

from embedd.runtime import Runtime


async def submission_allowed(rt: Runtime, tokens: int, lane: str) -> bool:
    """True when submitting `tokens` more on `lane` keeps within the budgets."""
    return True
