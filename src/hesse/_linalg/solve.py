"""Solves, log-determinants, eigenvalue counts and Newton steps for curvature matrices:
one entry point each, with the chain solver, Krylov methods or a dense reference."""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import scipy.sparse.linalg as sla
import torch
from torch import Tensor

from hesse._autodiff import products as _products
from hesse._autodiff.problem import Problem
from hesse._chain.chain import Chain
from hesse._chain.factorization import as_chain, factorize, promoted
from hesse._linalg.results import Inertia
from hesse._operators.curvature import curvature_operator
from hesse._spectral.lanczos import eigs
from hesse._util.checks import check_curvature
from hesse._util.progress import progress_bar

__all__ = [
    "NewtonStep",
    "count_eigenvalues",
    "eigenvalue",
    "eigenvalue_histogram",
    "inertia",
    "logdet",
    "newton_step",
    "solve",
]


def _problem_of(obj: Problem | Chain) -> Problem:
    return obj.problem if isinstance(obj, Chain) else obj


def _chainable(obj: Problem | Chain) -> bool:
    if isinstance(obj, Chain):
        return True
    try:
        Chain.from_problem(obj)
    except (ValueError, TypeError):
        return False
    return True


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
        method: ``"chain"`` (exact, linear in depth; ``nn.Sequential`` models),
            ``"cg"`` (conjugate gradients on the GGN with ``eps > 0``, MINRES otherwise,
            on the matrix-free operator: any model), ``"dense"`` (the reference: dense
            matrix and ``torch.linalg.solve``), or ``"auto"`` (chain when the model is a
            chain, else cg).
        rtol, maxiter: stopping rule of the Krylov methods (``scipy.sparse.linalg``
            conventions); a warning reports the residual when they do not converge.
    """
    check_curvature(curvature)
    if method == "auto":
        method = "chain" if _chainable(problem) else "cg"
    if method == "chain":
        return factorize(problem, damping, curvature).solve(v)
    prob = _problem_of(problem)
    as_list = isinstance(v, (list, tuple))
    V = prob.as_flat(v, "v")
    if method == "dense":
        C = curvature_operator(prob, curvature).to_dense()
        x = torch.linalg.solve(C + damping * torch.eye(len(C), dtype=C.dtype, device=C.device), V)
    elif method == "cg":
        x = _krylov(prob, V, damping, curvature, rtol, maxiter)
    else:
        raise ValueError(f"method must be 'auto', 'chain', 'cg' or 'dense'; got {method!r}")
    return prob.unflatten(x) if as_list else x


def _krylov(
    prob: Problem, V: Tensor, damping: float, curvature: str, rtol: float, maxiter: int | None
) -> Tensor:
    op = curvature_operator(prob, curvature).to_scipy()
    P = prob.num_params
    shifted = sla.LinearOperator((P, P), matvec=lambda x: op @ x + damping * x, dtype=op.dtype)
    use_cg = curvature == "ggn" and damping > 0
    cols = V.unsqueeze(1) if V.ndim == 1 else V
    out = []
    for j in range(cols.shape[1]):
        b = cols[:, j].detach().cpu().numpy().astype(np.float64)
        if use_cg:
            x, info = sla.cg(shifted, b, rtol=rtol, maxiter=maxiter)
        else:
            x, info = sla.minres(shifted, b, rtol=rtol, maxiter=maxiter)
        if info != 0:
            res = np.linalg.norm(shifted @ x - b) / max(np.linalg.norm(b), 1e-300)
            warnings.warn(
                f"{'CG' if use_cg else 'MINRES'} did not converge (info={info}); relative "
                f"residual {res:.2e}. Raise maxiter or the damping, or use method='chain'.",
                stacklevel=3,
            )
        out.append(torch.as_tensor(x, dtype=prob.dtype, device=prob.device))
    X = torch.stack(out, 1)
    return X.squeeze(1) if V.ndim == 1 else X


def logdet(
    problem: Problem | Chain, damping: float = 0.0, curvature: str = "hessian"
) -> tuple[float, float]:
    """``(sign, log|det(C + eps I)|)`` from the chain sweep, as ``torch.linalg.slogdet``
    (``(0.0, -inf)`` for a singular matrix)."""
    return factorize(problem, damping, curvature).logdet()


def inertia(problem: Problem | Chain, damping: float = 0.0, curvature: str = "hessian") -> Inertia:
    """Counts of negative, zero and positive eigenvalues of ``C + eps I`` (chain sweep;
    zero under the rank tolerance of `factorize`)."""
    return factorize(problem, damping, curvature).inertia()


def count_eigenvalues(
    problem: Problem | Chain,
    below: float,
    curvature: str = "hessian",
    *,
    rank_rtol: float | None = None,
    progress: bool | None = None,
) -> int:
    """The exact number of eigenvalues of ``C`` below ``sigma`` (``below``): the
    negative inertia of ``C - sigma I`` (Sylvester), from one stable chain sweep.

    Eigenvalues within the rank tolerance of ``sigma`` (``rank_rtol`` times the scale
    of ``C - sigma I``, see `factorize`) count as equal to it, not below: so
    ``below=0.0`` counts the negative eigenvalues of a rank-deficient Hessian and leaves
    its exact zeros out. Every other eigenvalue is counted exactly (up to the sweep's
    backward error, about ``1e-13 ||C||`` in float64).
    """
    sigma = float(below)
    if not math.isfinite(sigma):
        raise ValueError(f"below must be a finite number; got {below}")
    return (
        factorize(problem, -sigma, curvature, rank_rtol=rank_rtol, progress=progress)
        .inertia()
        .negative
    )


def eigenvalue_histogram(
    problem: Problem | Chain, edges: Sequence[float] | Tensor, curvature: str = "hessian"
) -> Tensor:
    """Exact numbers of eigenvalues in the bins ``[e_i, e_{i+1})`` from the chain
    sweep's counts (one sweep per edge), for models that are chains.

    Returns ``(len(edges) - 1,)`` integer counts.
    """
    e = [float(x) for x in (edges.tolist() if isinstance(edges, Tensor) else edges)]
    if len(e) < 2 or any(not b > a for a, b in itertools.pairwise(e)):
        raise ValueError(f"edges must be at least two strictly increasing numbers; got {e}")
    chain = _float64_chain(problem)
    below = [count_eigenvalues(chain, x, curvature) for x in e]
    return torch.tensor([b - a for a, b in itertools.pairwise(below)])


def _float64_chain(problem: Problem | Chain) -> Chain:
    chain = as_chain(problem)
    return chain if chain.problem.dtype == torch.float64 else promoted(chain)


def _spectral_bracket(chain: Chain, curvature: str, k: int) -> tuple[float, float, float, float]:
    """``(lo, hi, theta, r)``: an interval holding the whole spectrum, certified by
    counts (``count(lo) = 0``, ``count(hi) = P``), and the Lanczos estimate of the wanted
    eigenvalue with its residual norm (``nan`` for an interior ``k``): an eigenvalue lies
    within ``r`` of ``theta``, and the extreme Ritz values lie inside the spectrum."""
    P = chain.num_params
    op = curvature_operator(chain.problem, curvature)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a rough estimate is enough here
        gen = torch.Generator().manual_seed(0)
        top = eigs(op, 1, "largest", tol=1e-10, max_steps=min(P, 80), generator=gen)
        bottom = eigs(op, 1, "smallest", tol=1e-10, max_steps=min(P, 80), generator=gen)
    lmax, rmax = float(top.eigenvalues[0]), float(top.residuals[0])
    lmin, rmin = float(bottom.eigenvalues[0]), float(bottom.residuals[0])
    norm = max(abs(lmax), abs(lmin), 1e-300)
    lo, hi = lmin - rmin - 1e-3 * norm, lmax + rmax + 1e-3 * norm
    # certify with counts, widening until they hold (Ritz values lie inside the spectrum)
    for _ in range(64):
        if count_eigenvalues(chain, lo, curvature) == 0:
            break
        lo -= max(hi - lo, norm)
    else:
        raise ArithmeticError(f"no lower bound of the spectrum found (last tried {lo:.3e})")
    for _ in range(64):
        if count_eigenvalues(chain, hi, curvature) == P:
            break
        hi += max(hi - lo, norm)
    else:
        raise ArithmeticError(f"no upper bound of the spectrum found (last tried {hi:.3e})")
    theta, r = (lmin, rmin) if k == 1 else (lmax, rmax) if k == P else (math.nan, math.nan)
    return lo, hi, theta, r


def eigenvalue(
    problem: Problem | Chain,
    k: int,
    curvature: str = "hessian",
    *,
    tol: float = 1e-10,
    bounds: tuple[float, float] | None = None,
    progress: bool | None = None,
) -> float:
    """The ``k``-th smallest eigenvalue of ``C`` (``k = 1`` the smallest, ``k = P`` the
    largest), certified by exact eigenvalue counts (one chain sweep each).

    The spectrum is bracketed by Lanczos (`eigs`, a few dozen operator products) and
    the bracket certified by two counts; the smallest and largest eigenvalues start
    from their Lanczos estimate, so a few sweeps certify them; an interior eigenvalue is
    found by bisection on counts. Which tool answers which question: `eigs` for a few
    extreme eigenpairs (fast, not certified), `eigenvalue` for one eigenvalue, any ``k``,
    certified to ``tol``; `count_eigenvalues` / `eigenvalue_histogram` for how many lie
    below a value or in bins.

    Args:
        k: an integer, ``1 <= k <= P``.
        tol: the absolute accuracy, relative to the spectrum's scale:
            ``|returned - lambda_k| <= tol * max|lambda|``, down to the float spacing
            (a smaller ``tol`` stops there instead of looping).
        bounds: an interval known to hold the eigenvalue (skips the bracketing).
        progress: a bar over the bisection's sweeps (default: when stderr is a terminal).

    Cost: two Lanczos runs and ``O(log2(width / tol))`` sweeps, at most 200.
    """
    chain = _float64_chain(problem)  # promoted once, not once a sweep
    P = chain.num_params
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= P:
        raise ValueError(f"k must be in [1, {P}], an integer; got {k!r}")
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be a positive finite number; got {tol!r}")

    def count(sigma: float) -> int:  # eigenvalues < sigma
        return count_eigenvalues(chain, sigma, curvature, progress=False)

    if bounds is None:
        lo, hi, theta, r = _spectral_bracket(chain, curvature, int(k))
        scale = max(abs(lo), abs(hi))
        if math.isfinite(theta):  # an extreme eigenvalue: lambda_1 in [theta - r, theta]
            pad = 0.5 * tol * scale
            a, b = (
                (theta - 1.01 * r - pad, theta + pad)
                if k == 1
                else (
                    theta - pad,
                    theta + 1.01 * r + pad,
                )
            )
            if lo <= a and b <= hi and count(a) < k <= count(b):
                lo, hi = a, b
    else:
        lo, hi = (float(x) for x in bounds)
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"bounds must be two finite numbers lo < hi; got {bounds}")
        if not (count(lo) < k <= count(hi)):
            raise ValueError(f"bounds {bounds} do not hold the {k}-th eigenvalue")
        scale = max(abs(lo), abs(hi))
    goal = tol * scale
    steps = min(200, max(0, math.ceil(math.log2(max(hi - lo, 1e-300) / max(goal, 1e-300)))))
    bar = progress_bar(steps, f"bisection (k={k})", progress, unit="sweep")
    for _ in range(steps):
        if hi - lo <= goal:
            break
        mid = 0.5 * (lo + hi)
        if not lo < mid < hi:  # the float spacing: nothing left to halve
            break
        if count(mid) >= k:
            hi = mid
        else:
            lo = mid
        bar.update()
        bar.set_postfix(width=f"{hi - lo:.1e}")
    bar.close()
    return 0.5 * (lo + hi)


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
    prob = _problem_of(problem)
    g = _products.gradient(prob)
    dx = solve(problem, -g, damping, curvature, method=method)
    assert isinstance(dx, Tensor)
    pred = 0.5 * float(g @ dx) - 0.5 * damping * float(dx @ dx)
    if not math.isfinite(pred):
        raise FloatingPointError("the Newton step is not finite; increase the damping")
    return NewtonStep(dx, pred, g)
