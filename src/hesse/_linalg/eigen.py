"""Exact eigenvalue counts and certified eigenvalues of curvature matrices, from the
exact factorisations' inertia (Sylvester's law of inertia): counts below a value,
histograms over bins, and the ``k``-th eigenvalue by bisection on counts."""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from hesse._autodiff.problem import Problem
from hesse._chain.chain import Chain
from hesse._factor.cost import problem_of
from hesse._linalg.factorize import Engine, factorize, prepared
from hesse._operators.curvature import curvature_operator
from hesse._spectral.lanczos import eigs
from hesse._util.progress import progress_bar

__all__ = ["count_eigenvalues", "eigenvalue", "eigenvalue_histogram"]


def count_eigenvalues(
    problem: Problem | Chain,
    below: float,
    curvature: str = "hessian",
    *,
    method: str = "auto",
    rank_rtol: float | None = None,
    progress: bool | None = None,
) -> int:
    """The exact number of eigenvalues of ``C`` below ``sigma`` (``below``): the
    negative inertia of ``C - sigma I`` (Sylvester), from one stable factorisation
    (`hesse.factorize`; ``method`` picks the engine, ``"auto"`` the cheapest).

    Eigenvalues within the rank tolerance of ``sigma`` (``rank_rtol`` times the scale
    of ``C - sigma I``, see `factorize`) count as equal to it, not below: so
    ``below=0.0`` counts the negative eigenvalues of a rank-deficient Hessian and leaves
    its exact zeros out. Every other eigenvalue is counted exactly (up to the
    factorisation's backward error, about ``1e-13 ||C||`` in float64).
    """
    sigma = _edge("below", below)
    if math.isinf(sigma):  # nothing lies below -inf, everything below +inf
        return 0 if sigma < 0 else problem_of(problem).num_params
    f = factorize(problem, -sigma, curvature, method=method, rank_rtol=rank_rtol, progress=progress)
    return f.inertia().negative


def _edge(name: str, value: object) -> float:
    """A count's threshold: a real number, ``-inf`` and ``inf`` included."""
    try:
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        x = math.nan
    if math.isnan(x) or isinstance(value, (bool, str)):
        raise ValueError(f"{name} must be a real number (inf allowed); got {value!r}")
    return x


def _counter(eng: Engine) -> Callable[[float], int]:
    """``sigma -> #{lambda < sigma}`` from one engine (``C`` prepared once; ``-inf`` and
    ``inf`` need no factorisation)."""
    P = eng.problem.num_params

    def count(sigma: float) -> int:
        if math.isinf(sigma):
            return 0 if sigma < 0 else P
        return eng.factor(-float(sigma)).inertia().negative

    return count


def eigenvalue_histogram(
    problem: Problem | Chain,
    edges: Sequence[float] | Tensor,
    curvature: str = "hessian",
    *,
    method: str = "auto",
) -> Tensor:
    """Exact numbers of eigenvalues in the bins ``[e_i, e_{i+1})`` from the counts of one
    engine (``C`` prepared once, one factorisation per edge).

    Returns ``(len(edges) - 1,)`` integer counts; ``-inf`` / ``inf`` edges make open bins.
    """
    e = [_edge("edges", x) for x in (edges.tolist() if isinstance(edges, Tensor) else edges)]
    if len(e) < 2 or any(not b > a for a, b in itertools.pairwise(e)):
        raise ValueError(
            f"edges must be at least two strictly increasing numbers (-inf and inf "
            f"allowed); got {e}"
        )
    count = _counter(prepared(problem, curvature, method=method))
    below = [count(x) for x in e]
    return torch.tensor([b - a for a, b in itertools.pairwise(below)])


def _spectral_bracket(
    eng: Engine, curvature: str, k: int, count: Callable[[float], int]
) -> tuple[float, float, float, float]:
    """``(lo, hi, theta, r)``: an interval holding the whole spectrum, certified by
    counts (``count(lo) = 0``, ``count(hi) = P``), and the Lanczos estimate of the wanted
    eigenvalue with its residual norm (``nan`` for an interior ``k``): an eigenvalue lies
    within ``r`` of ``theta``, and the extreme Ritz values lie inside the spectrum."""
    P = eng.problem.num_params
    op = curvature_operator(eng.problem, curvature)
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
        if count(lo) == 0:
            break
        lo -= max(hi - lo, norm)
    else:
        raise ArithmeticError(f"no lower bound of the spectrum found (last tried {lo:.3e})")
    for _ in range(64):
        if count(hi) == P:
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
    method: str = "auto",
) -> float:
    """The ``k``-th smallest eigenvalue of ``C`` (``k = 1`` the smallest, ``k = P`` the
    largest), certified by exact eigenvalue counts (one factorisation each).

    The spectrum is bracketed by Lanczos (`eigs`, a few dozen operator products) and
    the bracket certified by two counts; the smallest and largest eigenvalues start
    from their Lanczos estimate, so a few sweeps certify them; an interior eigenvalue is
    found by bisection on counts. Which tool answers which question: `eigs` for a few
    extreme eigenpairs (fast, not certified), `eigenvalue` for one eigenvalue, any ``k``,
    certified to ``tol``; `count_eigenvalues` / `eigenvalue_histogram` for how many lie
    below a value or in bins. One engine serves every count (``method``, as for
    `hesse.factorize`): the dense matrix, the kernel or the chain's linearisation is
    prepared once.

    Args:
        k: an integer, ``1 <= k <= P``.
        tol: the absolute accuracy, relative to the spectrum's scale:
            ``|returned - lambda_k| <= tol * max|lambda|``, down to the float spacing
            (a smaller ``tol`` stops there instead of looping).
        bounds: an interval known to hold the eigenvalue (skips the bracketing).
        progress: a bar over the bisection's sweeps (default: when stderr is a terminal).

    Cost: two Lanczos runs and ``O(log2(width / tol))`` sweeps, at most 200.
    """
    eng = prepared(problem, curvature, method=method)  # C prepared once, not once a count
    P = eng.problem.num_params
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= P:
        raise ValueError(f"k must be in [1, {P}], an integer; got {k!r}")
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be a positive finite number; got {tol!r}")

    count = _counter(eng)
    if bounds is None:
        lo, hi, scale = _bracket(eng, curvature, int(k), tol, count)
    else:
        lo, hi = (float(x) for x in bounds)
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"bounds must be two finite numbers lo < hi; got {bounds}")
        if not (count(lo) < k <= count(hi)):
            raise ValueError(f"bounds {bounds} do not hold the {k}-th eigenvalue")
        scale = max(abs(lo), abs(hi))
    return _bisect(lo, hi, int(k), tol * scale, count, progress)


def _bracket(
    eng: Engine, curvature: str, k: int, tol: float, count: Callable[[float], int]
) -> tuple[float, float, float]:
    """An interval certified by counts to hold ``lambda_k`` (the whole spectrum, or, for
    an extreme eigenvalue, ``[theta - r, theta]`` from its Ritz value and residual when
    the counts confirm it: ``lambda_1`` lies there), and the spectrum's scale."""
    lo, hi, theta, r = _spectral_bracket(eng, curvature, k, count)
    scale = max(abs(lo), abs(hi))
    if math.isfinite(theta):  # an extreme eigenvalue: lambda_1 in [theta - r, theta]
        pad = 0.5 * tol * scale
        if k == 1:
            a, b = theta - 1.01 * r - pad, theta + pad
        else:
            a, b = theta - pad, theta + 1.01 * r + pad
        if lo <= a and b <= hi and count(a) < k <= count(b):
            return a, b, scale
    return lo, hi, scale


def _bisect(
    lo: float,
    hi: float,
    k: int,
    goal: float,
    count: Callable[[float], int],
    progress: bool | None,
) -> float:
    """Bisection on counts (``count(lo) < k <= count(hi)`` holds throughout) until the
    interval is ``goal`` wide or the float spacing; at most 200 sweeps."""
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
