"""The result types every exact factorisation shares (the chain sweep, the dense and the
observation-space engines): its status, the inertia, a solve's result, and the two
errors (no hesse imports: the lowest layer)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "FactorizationStatus",
    "InaccurateSolveError",
    "Inertia",
    "SingularPivotError",
    "SolveResult",
]


class Inertia(NamedTuple):
    """Numbers of negative, zero and positive eigenvalues."""

    negative: int
    zero: int
    positive: int


class SingularPivotError(ValueError):
    """``C + eps I`` is singular (within the rank tolerance): a solve is asked for where
    none exists. The message gives the dimension of the near-null space found; more
    damping helps."""


class FactorizationStatus(NamedTuple):
    """What the factorisation did and how far its answers can be trusted (data, not
    warnings).

    Attributes:
        kinds: each stage's elimination (``"cholesky"``, ``"ldl"``, ``"eigen"``,
            ``"wide"``, ``"none"`` for a stage without pivots; two joined by ``"+"``,
            e.g. ``"ldl+eigen"``, where the stage's parameters went first and the
            delayed directions after them, design note (S8)), first stage first.
        delayed: the number of pivot directions each stage handed on to the one
            before it (the delayed front); 0 everywhere when no pivoting was needed.
        max_delayed: the largest delayed front.
        growth: the largest Schur update's entry over the largest entry of its stage's
            matrix (at most ``1 / TAU = 10`` by the threshold test; a positive definite
            ``C + eps I`` gives at most 1).
        scale: the largest entry of the stages' pivot blocks, an estimate of
            ``||C + eps I||`` from below.
        zero_tol: pivots of magnitude at most this count as zero
            (``rank_rtol * scale``).
        inertia: ``(negative, zero, positive)`` of ``C + eps I``.
        min_pivot: the smallest pivot magnitude over ``scale`` (a reciprocal condition
            indicator: ``C + eps I`` is within ``min_pivot * scale * growth`` of a
            singular matrix).
        dtype: the dtype the sweep ran in (float64 for a promoted float32 model).
        method: the engine that factored: ``"chain"``, ``"dense"`` or ``"gram"``
            (`hesse.factorize`); the chain-only fields (``delayed``) are empty or 0 for
            the others.
        handed_over: why ``method="auto"``'s chain sweep handed this damping over to
            the dense engine (its delayed front outgrew the break-even: design note,
            "The hand-over"); empty when it did not.
    """

    kinds: tuple[str, ...]
    delayed: tuple[int, ...]
    max_delayed: int
    growth: float
    scale: float
    zero_tol: float
    inertia: Inertia
    min_pivot: float
    dtype: torch.dtype
    method: str = "chain"
    handed_over: str = ""


class SolveResult(NamedTuple):
    """`Factorization.solve_ex`'s answer (lineax's ``Solution``, torch's ``_ex``).

    Attributes:
        x: the solution, shaped like the right-hand side.
        residual: ``max_j ||(C + eps I) x_j - v_j|| / ||v_j||`` over the columns,
            measured with products of the true operator (``nan`` when not measured).
        backward_error: ``max_j ||r_j|| / (scale ||x_j|| + ||v_j||)``: the relative
            perturbation of ``C + eps I`` and ``v`` that ``x`` solves exactly; float64
            can reach about ``1e-16`` times a small factor, whatever the conditioning.
        refinement_steps: iterative-refinement steps taken.
        converged: whether ``rtol`` was met (or, with ``rtol=None``, the backward error
            reached the rounding level).
    """

    x: Tensor | list[Tensor]
    residual: float
    backward_error: float
    refinement_steps: int
    converged: bool


class InaccurateSolveError(ArithmeticError):
    """The requested accuracy could not be reached; the message says what was."""
