"""Leaves every layer may use: progress bars, atomic file writes, memory budgets and
shared argument checks (no hesse imports)."""
