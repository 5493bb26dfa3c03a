"""Money: prices and exact arithmetic, the cost ledger (its only writer), budgets, and
the cost report."""
