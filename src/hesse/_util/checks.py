"""Argument checks shared by every layer (the lowest one: it imports nothing of hesse)."""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "check_budget",
    "check_curvature",
    "check_int",
    "check_number",
    "check_positive",
    "check_rank_rtol",
    "check_shift",
]


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


def check_shift(name: str, value: object) -> float:
    """``value`` as a finite real float (a damping or a spectral shift, of either sign),
    or a ValueError naming what was expected."""
    try:
        ok = not isinstance(value, (bool, str, complex)) and math.isfinite(float(value))  # type: ignore[arg-type]
    except (TypeError, ValueError, RuntimeError):
        ok = False
    if not ok:
        raise ValueError(f"{name} must be a finite number; got {value!r}")
    return float(value)  # type: ignore[arg-type]


def check_rank_rtol(value: object) -> float | None:
    """``rank_rtol``: ``None`` (the default tolerance) or a float in ``[0, 1)``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"rank_rtol must be a number in [0, 1) or None; got {value!r}")
    return float(value)


_UNITS = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}
_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def check_budget(name: str, value: object) -> float | None:
    """A memory budget: ``None`` (the default), a positive number of bytes, or a string
    such as ``"2GB"`` / ``"512 MiB"``; anything else is a ValueError naming the forms."""
    if value is None:
        return None
    num: float | None = None
    if isinstance(value, str):
        text = value.strip().upper().replace(" ", "")
        digits = text.rstrip("KMGTIB")
        unit = text[len(digits) :]
        if unit in _UNITS:
            try:
                num = float(digits) * _UNITS[unit]
            except ValueError:
                num = None
    elif isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
        num = float(value)
    if num is None or not (math.isfinite(num) and num > 0):
        raise ValueError(
            f"{name} must be a positive number of bytes (e.g. 2e9) or a string such as "
            f"'2GB' or '512MiB'; got {value!r}"
        )
    return num


def check_number(
    name: str,
    value: object,
    *,
    above: float | None = None,
    at_least: float | None = None,
    at_most: float | None = None,
    integer: bool = False,
    optional: bool = False,
) -> None:
    """The one check of a numeric option (the optimisers' at construction): a finite real
    (``integer``: an ``int``) with the given bounds, or ``None`` when ``optional``; else a
    `ValueError` naming the option, what it must be and what was given."""
    if value is None and optional:
        return
    kind = "an integer" if integer else "a finite number"
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    ok = ok and not isinstance(value, bool) and math.isfinite(value)  # type: ignore[arg-type]
    parts = []
    if above is not None:
        parts.append(f"> {above:g}")
        ok = ok and value > above  # type: ignore[operator]
    if at_least is not None:
        parts.append(f">= {at_least:g}")
        ok = ok and value >= at_least  # type: ignore[operator]
    if at_most is not None:
        parts.append(f"<= {at_most:g}")
        ok = ok and value <= at_most  # type: ignore[operator]
    if not ok:
        bounds = f" {' and '.join(parts)}" if parts else ""
        none = " (or None)" if optional else ""
        raise ValueError(f"{name} must be {kind}{bounds}{none}; got {value!r}")
