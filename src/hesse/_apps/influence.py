"""Influence functions (Koh & Liang 2017) with exact inverse curvature.

For the objective ``L(theta) = sum_i t_i(theta)`` (`hesse.Problem`: ``t_i = l_i / N`` for
``reduction="mean"``, ``t_i = l_i`` for ``"sum"``) minimised at ``theta`` with the
Hessian ``H`` (plus ``eps I`` for an L2 regulariser ``eps/2 |theta|^2`` the model was
trained with), removing training point ``i`` moves the minimiser to ``theta_{-i} ~
theta + (H + eps I)^-1 grad t_i``, so a test point's loss ``L_j`` (the loss function on
that point alone) changes by

    scores[j, i] = grad L_j^T (H + eps I)^-1 grad t_i  ~  L_j(theta_{-i}) - L_j(theta)  (I1)

Positive: removing ``i`` raises the test loss (``i`` helps the test point); negative: it
lowers it (``i`` harms). One exact factorisation serves every pair (solves with the
test gradients, then one matrix product with the training gradients). Design note,
"Influence functions".
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import torch
from torch import Tensor

from hesse._apps.per_sample import per_sample_gradient_chunks, per_sample_gradients
from hesse._autodiff.problem import Problem
from hesse._factor.base import Factorization, shift
from hesse._linalg.factorize import factorize
from hesse._linalg.solve import solve as krylov_solve
from hesse._operators.curvature import curvature_operator
from hesse._util.checks import check_curvature, check_int
from hesse._util.memory import MemoryBudgetError, check_memory

__all__ = ["InfluenceScores", "influence", "self_influence", "top_influences"]


class InfluenceScores(NamedTuple):
    """`influence`'s answer.

    Attributes:
        scores: ``(n_test, n_train)``, (I1).
        method: the engine that solved (``"dense"``, ``"gram"``, ``"chain"``) or
            ``"cg"`` (the Krylov fallback).
        residual: the largest relative residual of the solves (measured with the true
            operator; ``nan`` where not measured).
    """

    scores: Tensor
    method: str
    residual: float


def _test_problem(problem: Problem, test: Any) -> Problem:
    """The test points as a `Problem` on the same model, loss and parameters."""
    if isinstance(test, Problem):
        if test.names != problem.names:
            raise ValueError(
                f"the test problem selects {test.names}; the training problem {problem.names}"
            )
        return test
    return problem.with_data(test)


def _test_gradients(test: Problem) -> Tensor:
    """``grad L_j`` ``(n_test, P)``: the loss function on test point ``j`` alone."""
    G = per_sample_gradients(test)
    return G * test.num_samples if test.reduction == "mean" else G


def _factor(problem: Problem, damping: Any, curvature: str, method: str) -> Factorization | None:
    try:
        return factorize(problem, damping, curvature, method=method)
    except MemoryBudgetError:
        if method != "auto":
            raise
        return None  # no exact engine fits: Krylov solves below


def _solve_all(
    problem: Problem, f: Factorization | None, damping: Any, curvature: str, V: Tensor
) -> tuple[Tensor, str, float]:
    """``(C + D)^-1 V`` for ``V`` ``(P, k)``: refined exact solves, or (no engine fits)
    CG / MINRES with the reached residual measured."""
    if f is not None:
        res = f.solve_ex(V)
        if not res.converged and res.backward_error > 1e-10:
            raise ArithmeticError(
                f"the influence solves reached only a backward error of "
                f"{res.backward_error:.1e}: increase the damping"
            )
        assert isinstance(res.x, Tensor)
        return res.x, f.status.method, res.residual
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        X = krylov_solve(problem, V, damping, curvature, method="cg", rtol=1e-10)
    assert isinstance(X, Tensor)
    op = curvature_operator(problem, curvature)
    R = V - op.matmat(X) - shift(problem.parameters.as_diagonal(damping), X)
    residual = float((R.norm(dim=0) / V.norm(dim=0).clamp_min(1e-300)).max())
    for w in caught:
        warnings.warn(str(w.message), stacklevel=3)
    return X, "cg", residual


def influence(
    problem: Problem,
    test: Any,
    *,
    damping: Any = 0.0,
    curvature: str = "hessian",
    method: str = "auto",
) -> InfluenceScores:
    """The predicted change of each test point's loss when each training point is
    removed and the model refit: ``scores[j, i] = grad L_j^T (C + eps I)^-1 grad t_i``
    (module docstring, (I1)).

    Args:
        problem: the training objective at the trained parameters (its reduction
            decides ``t_i``: ``l_i / N`` for ``"mean"``).
        test: the test points in any of `Problem`'s data forms (or a `Problem` on the
            same model and parameters).
        damping: ``eps``: the L2 regulariser's coefficient when the model was trained
            with ``eps/2 |theta|^2`` added to the objective (weight decay ``wd`` of
            ``torch.optim.SGD`` on a ``"mean"`` loss is ``eps = wd``); a number, a
            ``(P,)`` tensor or a dict per parameter tensor, as everywhere.
        curvature: ``"hessian"`` (Koh & Liang) or ``"ggn"``.
        method: the exact engine (`hesse.factorize`); with ``"auto"``, when none fits
            the memory budget, CG / MINRES, and the result says so (``method="cg"``,
            ``residual``).

    Returns:
        `InfluenceScores` ``(scores (n_test, n_train), method, residual)``.
    """
    check_curvature(curvature)
    tp = _test_problem(problem, test)
    N, T, P = problem.num_samples, tp.num_samples, problem.num_params
    item = torch.empty((), dtype=problem.dtype).element_size()
    check_memory(
        item * (N * P + 2 * T * P + T * N),
        f"the influence of {N} training points on {T} test points (P = {P})",
        "use fewer test points a call, or select parameters (params=)",
        problem.device,
    )
    f = _factor(problem, damping, curvature, method)
    Gt = _test_gradients(tp)  # (T, P)
    S, used, residual = _solve_all(problem, f, damping, curvature, Gt.T)
    rows = [S.T @ g.T for g in per_sample_gradient_chunks(problem)]
    return InfluenceScores(torch.cat(rows, 1), used, residual)


def self_influence(
    problem: Problem,
    *,
    damping: Any = 0.0,
    curvature: str = "hessian",
    method: str = "auto",
) -> Tensor:
    """Each training point's influence on its own loss, ``grad l_i^T (C + eps I)^-1
    grad t_i`` ``(N,)`` (large: a point the model memorises, often mislabelled)."""
    check_curvature(curvature)
    f = _factor(problem, damping, curvature, method)
    scale = problem.num_samples if problem.reduction == "mean" else 1.0
    out = []
    for G in per_sample_gradient_chunks(problem):
        S, _m, _r = _solve_all(problem, f, damping, curvature, G.T)
        out.append(scale * (S * G.T).sum(0))
    return torch.cat(out)


def top_influences(scores: Tensor, k: int = 5) -> tuple[Tensor, Tensor]:
    """For each test point (row of ``scores``), the indices of the ``k`` most helpful
    training points (largest scores: removing them raises its loss most) and the ``k``
    most harmful (most negative): two ``(n_test, k)`` integer tensors (a 1-D score
    vector gives ``(k,)`` each)."""
    check_int("k", k, 1)
    if not isinstance(scores, Tensor) or scores.ndim not in (1, 2):
        raise ValueError("scores must be an (n_test, n_train) or (n_train,) tensor")
    n = scores.shape[-1]
    if k > n:
        raise ValueError(f"k = {k} is more than the {n} training points")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("scores contain NaN or inf")
    helpful = torch.topk(scores, k, dim=-1).indices
    harmful = torch.topk(-scores, k, dim=-1).indices
    return helpful, harmful
