"""Argument checks shared by every layer (the lowest one: it imports nothing of hesse)."""

from __future__ import annotations

__all__ = ["check_curvature"]


def check_curvature(curvature: str) -> str:
    """Validate the name of a curvature matrix the solvers and optimisers accept."""
    if curvature not in ("hessian", "ggn"):
        raise ValueError(f"curvature must be 'hessian' or 'ggn'; got {curvature!r}")
    return curvature
