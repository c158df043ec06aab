"""Solves, log-determinants, inertia and Newton steps for curvature matrices: one entry
point each, through the exact engines of `hesse.factorize` or Krylov methods."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from hesse._autodiff import products as _products
from hesse._autodiff.problem import Problem
from hesse._chain.chain import Chain
from hesse._factor.base import shift
from hesse._factor.cost import problem_of
from hesse._factor.results import Inertia
from hesse._linalg.factorize import ENGINES, check_method, factorize
from hesse._operators.curvature import curvature_operator
from hesse._util.checks import check_curvature
from hesse._util.memory import MemoryBudgetError

__all__ = [
    "NewtonStep",
    "inertia",
    "logdet",
    "newton_step",
    "solve",
]


def solve(
    problem: Problem | Chain,
    v: Tensor | Sequence[Tensor],
    damping: float = 0.0,
    curvature: str = "hessian",
    *,
    method: str = "auto",
    rtol: float = 1e-10,
    maxiter: int | None = None,
) -> Tensor | list[Tensor]:
    """``x = (C + eps I)^-1 v`` with ``C`` the Hessian or the Gauss-Newton matrix.

    Args:
        problem: a `Problem` or a `Chain`.
        v: ``(P,)``, ``(P, k)`` or a list of per-parameter tensors (same form returned).
        damping: ``eps``.
        curvature: ``"hessian"`` or ``"ggn"``.
        method: an exact engine of `hesse.factorize` (``"dense"``, ``"gram"``,
            ``"chain"``), refined until the residual checks; ``"cg"`` (conjugate
            gradients on the GGN with ``eps > 0``, MINRES otherwise, on the matrix-free
            operator: any model, any size); or ``"auto"`` (the cheapest exact engine that
            fits in memory, else cg).
        rtol, maxiter: stopping rule of the Krylov methods (``scipy.sparse.linalg``
            conventions); a warning reports the residual when they do not converge.
    """
    check_curvature(curvature)
    check_method(method, "cg")
    prob = problem_of(problem)
    d = prob.parameters.as_diagonal(damping)  # before any work, on every route
    prob.agree("solve", v=prob.as_flat(v, "v"), damping=damping, method=method, rtol=rtol)
    if method == "auto":
        try:
            return factorize(problem, damping, curvature, method="auto").solve(v)
        except MemoryBudgetError:
            method = "cg"
    if method in ENGINES:
        return factorize(problem, damping, curvature, method=method).solve(v)
    as_list = isinstance(v, (list, tuple))
    x = _krylov(prob, prob.as_flat(v, "v"), d, curvature, rtol, maxiter)
    return prob.unflatten(x) if as_list else x


def _krylov(
    prob: Problem,
    V: Tensor,
    damping: float | Tensor,
    curvature: str,
    rtol: float,
    maxiter: int | None,
) -> Tensor:
    import scipy.sparse.linalg as sla  # half a second to import: only when a Krylov solve runs

    shifted = (curvature_operator(prob, curvature) + damping).to_scipy()  # C + D
    use_cg = curvature == "ggn" and (isinstance(damping, Tensor) or damping > 0)
    cols = V.unsqueeze(1) if V.ndim == 1 else V
    out = []
    for j in range(cols.shape[1]):
        b = cols[:, j].detach().cpu().numpy().astype(np.float64)
        if use_cg:
            x, info = sla.cg(shifted, b, rtol=rtol, maxiter=maxiter)
        else:
            x, info = sla.minres(shifted, b, rtol=rtol, maxiter=maxiter)
        # the residual reached, measured (MINRES stops on an estimate, which can be far
        # below the true one on an indefinite matrix)
        res = np.linalg.norm(shifted @ x - b) / max(np.linalg.norm(b), 1e-300)
        if info != 0 or not res <= rtol:
            why = f"stopped after maxiter (info={info})" if info > 0 else "stopped early"
            warnings.warn(
                f"{'CG' if use_cg else 'MINRES'} {why} at a relative residual of {res:.2e}, "
                f"not the requested rtol={rtol:.1e}. Raise maxiter or the damping, or use an "
                "exact engine (method='auto').",
                stacklevel=3,
            )
        out.append(torch.as_tensor(x, dtype=prob.dtype, device=prob.device))
    X = torch.stack(out, 1)
    return X.squeeze(1) if V.ndim == 1 else X


def logdet(
    problem: Problem | Chain,
    damping: float = 0.0,
    curvature: str = "hessian",
    *,
    method: str = "auto",
) -> tuple[float, float]:
    """``(sign, log|det(C + eps I)|)`` from an exact factorisation (`hesse.factorize`),
    as ``torch.linalg.slogdet`` (``(0.0, -inf)`` for a singular matrix)."""
    return factorize(problem, damping, curvature, method=method).logdet()


def inertia(
    problem: Problem | Chain,
    damping: float = 0.0,
    curvature: str = "hessian",
    *,
    method: str = "auto",
) -> Inertia:
    """Counts of negative, zero and positive eigenvalues of ``C + eps I`` (an exact
    factorisation; zero under the rank tolerance of `factorize`)."""
    return factorize(problem, damping, curvature, method=method).inertia()


class NewtonStep(NamedTuple):
    """A damped Newton-type step ``dx = -(C + eps I)^-1 g`` and the change of the
    quadratic model ``m(dx) = g . dx + 1/2 dx^T C dx`` it predicts."""

    step: Tensor
    predicted_change: float
    gradient: Tensor


def newton_step(
    problem: Problem | Chain, damping: float = 0.0, curvature: str = "ggn", *, method: str = "auto"
) -> NewtonStep:
    """The damped Gauss-Newton (default) or Newton step ``-(C + eps I)^-1 g`` in one call.

    Returns a `NewtonStep` (flat tensors, shape ``(P,)``). The predicted change uses
    ``dx^T (C + eps I) dx = -g . dx``: ``m = 1/2 g . dx - 1/2 eps |dx|^2``.
    """
    prob = problem_of(problem)
    d = prob.parameters.as_diagonal(damping)
    g = _products.gradient(prob)
    dx = solve(problem, -g, d, curvature, method=method)
    assert isinstance(dx, Tensor)
    pred = 0.5 * float(g @ dx) - 0.5 * float(dx @ shift(d, dx))
    if not math.isfinite(pred):
        raise FloatingPointError("the Newton step is not finite; increase the damping")
    return NewtonStep(dx, pred, g)
