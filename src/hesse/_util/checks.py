"""Argument checks shared by every layer (the lowest one: it imports nothing of hesse)."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["check_curvature", "check_int", "check_positive"]


def check_curvature(curvature: str) -> str:
    """Validate the name of a curvature matrix the solvers and optimisers accept."""
    if curvature not in ("hessian", "ggn"):
        raise ValueError(f"curvature must be 'hessian' or 'ggn'; got {curvature!r}")
    return curvature


def check_int(name: str, value: object, low: int) -> int:
    """``value`` as an int ``>= low``, or a ValueError naming what was expected."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}; got {value!r}")
    return int(value)


def check_positive(name: str, value: object) -> float:
    """``value`` as a positive finite float, or a ValueError naming what was expected."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number; got {value!r}")
    return float(value)
