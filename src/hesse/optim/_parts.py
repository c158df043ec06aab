"""Reusable parts of the second-order optimisers, each tested on its own: the
Levenberg-Marquardt damping rule, truncated conjugate gradients with Martens' stopping
rule and iterate backtracking, an Armijo line search, and the exact trust-region
subproblem (Moré and Sorensen 1983)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from hesse._factor.results import SingularPivotError

_SINGULAR = (SingularPivotError, torch.linalg.LinAlgError)


__all__ = [
    "CGResult",
    "TrustRegionResult",
    "armijo",
    "cg_backtrack",
    "lm_damping",
    "reduction_ratio",
    "rounding_slack",
    "truncated_cg",
    "trust_radius_update",
    "trust_region_subproblem",
]


def reduction_ratio(actual: float, predicted: float) -> float:
    """``rho = (f(x + d) - f(x)) / (q(d) - q(0))``: how well the quadratic model
    predicted the change (``nan`` when it predicted none)."""
    if predicted == 0 or not math.isfinite(predicted) or not math.isfinite(actual):
        return float("nan")
    return actual / predicted


def rounding_slack(f0: float) -> float:
    """A few ulps of ``f0``: loss changes below this are rounding, not information."""
    return 4.0 * 2.220446049250313e-16 * max(1.0, abs(f0))


def lm_damping(
    damping: float,
    rho: float,
    *,
    lower: float = 0.25,
    upper: float = 0.75,
    boost: float = 1.5,
    drop: float = 2.0 / 3.0,
    min_damping: float = 1e-10,
    max_damping: float = 1e10,
) -> float:
    """Levenberg-Marquardt rule of Martens (2010), sec. 4.1: raise the damping by
    ``boost`` when ``rho < lower`` (the model over-promised, or ``rho`` is nan), lower
    it by ``drop`` when ``rho > upper``; clip to ``[min_damping, max_damping]``."""
    if not math.isfinite(rho) or rho < lower:
        damping *= boost
    elif rho > upper:
        damping *= drop
    return min(max(damping, min_damping), max_damping)


class CGResult(NamedTuple):
    """``x`` the last iterate; ``iterates`` ``[(i, x_i)]`` kept at ``i = ceil(gamma^j)``
    and the last one, for backtracking; ``iterations``; ``phi`` the quadratic
    ``1/2 x^T A x - b^T x`` at ``x``; ``reason`` why it stopped."""

    x: Tensor
    iterates: list[tuple[int, Tensor]]
    iterations: int
    phi: float
    reason: str


def _stalled(phis: list[float], progress_tol: float) -> bool:
    """Martens' relative-progress rule at iteration ``i = len(phis)``: ``phi_i < 0`` and
    ``(phi_i - phi_{i-k}) / phi_i < k * progress_tol`` with ``k = max(10, 0.1 i)``;
    ``progress_tol = 0`` switches it off."""
    i = len(phis)
    k = max(10, int(0.1 * i))
    if not (progress_tol > 0 and i > k and phis[-1] < 0):
        return False
    return (phis[-1] - phis[-1 - k]) / phis[-1] < k * progress_tol


def truncated_cg(
    matvec: Callable[[Tensor], Tensor],
    b: Tensor,
    x0: Tensor | None = None,
    *,
    max_iter: int = 250,
    min_iter: int = 1,
    progress_tol: float = 5e-4,
    rtol: float = 1e-10,
    precond: Tensor | None = None,
    gamma: float = 1.3,
) -> CGResult:
    """Preconditioned conjugate gradients for ``A x = b``, truncated as in Martens (2010),
    sec. 4.4: stop at iteration ``i`` when ``phi(x_i) < 0`` and the relative progress
    over the last ``k = max(10, 0.1 i)`` iterations, ``(phi(x_i) - phi(x_{i-k})) /
    phi(x_i)``, is below ``k * progress_tol``; or when the residual is below ``rtol |b|``;
    or on negative curvature ``p^T A p <= 0`` (a Hessian), keeping the iterate so far.
    ``progress_tol=0`` switches the progress rule off (rounding can make ``phi`` tick up
    once converged, which that rule would read as a stall).

    Args:
        matvec: ``v -> A v`` for ``(P,)`` vectors.
        precond: the diagonal of the preconditioner ``M`` (``M^-1`` is applied).

    A numerical kernel: its length is the algorithm's (the recurrence, the kept iterates
    and the three stopping rules share the loop's state).
    """
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0:
        raise ValueError(f"max_iter must be an integer >= 0; got {max_iter!r}")
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b - matvec(x) if x0 is not None else b.clone()
    minv = None if precond is None else 1.0 / precond
    z = r if minv is None else minv * r
    p = z.clone()
    rz = float(r @ z)
    bnorm = float(b.norm())
    phis: list[float] = []

    def phi(xv: Tensor, rv: Tensor) -> float:  # 1/2 x^T A x - b^T x = -1/2 x^T (r + b)
        return -0.5 * float(xv @ (rv + b))

    keep = {math.ceil(gamma**j) for j in range(200)}
    iterates: list[tuple[int, Tensor]] = []
    reason = "max_iter"
    i = 0
    for i in range(1, max_iter + 1):
        Ap = matvec(p)
        curv = float(p @ Ap)
        if curv <= 0:
            reason = "negative curvature"
            i -= 1
            break
        alpha = rz / curv
        x = x + alpha * p
        r = r - alpha * Ap
        phis.append(phi(x, r))
        if i in keep:
            iterates.append((i, x.clone()))
        if float(r.norm()) <= rtol * bnorm:
            reason = "residual"
            break
        if i >= min_iter and _stalled(phis, progress_tol):
            reason = "progress"
            break
        z = r if minv is None else minv * r
        rz_new = float(r @ z)
        p = z + (rz_new / rz) * p
        rz = rz_new
    if not iterates or iterates[-1][0] != i:
        iterates.append((i, x.clone()))
    return CGResult(x, iterates, i, phi(x, r) if i else 0.0, reason)


def cg_backtrack(
    iterates: list[tuple[int, Tensor]], loss_at: Callable[[Tensor], float]
) -> tuple[Tensor, float, int]:
    """Martens (2010), sec. 4.6: from the last CG iterate, step back through the kept
    iterates while the loss keeps decreasing; returns ``(x, loss, iteration)``."""
    i_best, x_best = iterates[-1]
    f_best = loss_at(x_best)
    for i, x in reversed(iterates[:-1]):
        f = loss_at(x)
        if not f < f_best:
            break
        i_best, x_best, f_best = i, x, f
    return x_best, f_best, i_best


def armijo(
    loss_at: Callable[[float], float],
    f0: float,
    slope: float,
    *,
    c: float = 1e-2,
    shrink: float = 0.8,
    max_iter: int = 60,
    alpha0: float = 1.0,
) -> tuple[float, float]:
    """Backtracking line search: the first ``alpha = alpha0 shrink^j`` with
    ``f(alpha) <= f0 + c alpha slope`` (``slope = g . d < 0``), up to the rounding of
    ``f0`` (near a minimiser a good step changes the loss by less than an ulp). Returns
    ``(alpha, f(alpha))``, or ``(0, f0)`` when none qualifies."""
    alpha = alpha0
    slack = rounding_slack(f0)
    for _ in range(max_iter):
        f = loss_at(alpha)
        if math.isfinite(f) and f <= f0 + c * alpha * slope + slack:
            return alpha, f
        alpha *= shrink
    return 0.0, f0


def trust_radius_update(
    radius: float,
    rho: float,
    step_norm: float,
    *,
    max_radius: float = 1e3,
    shrink_below: float = 0.25,
    grow_above: float = 0.75,
    accept_above: float = 1e-4,
) -> tuple[float, bool]:
    """The classical trust-radius rule (Nocedal and Wright, *Numerical Optimization*,
    alg. 4.1): shrink the radius to a quarter when the model over-promised
    (``rho < shrink_below`` or ``rho`` not finite), double it (up to ``max_radius``) when
    ``rho > grow_above`` and the step reached the boundary (``|d| >= 0.99 radius``);
    accept the step when ``rho > accept_above``. Returns ``(new radius, accepted)``."""
    finite = math.isfinite(rho)
    if not finite or rho < shrink_below:
        radius = 0.25 * radius
    elif rho > grow_above and step_norm >= 0.99 * radius:
        radius = min(2.0 * radius, max_radius)
    return radius, finite and rho > accept_above


# ----------------------------------------------------------------------------- trust region
class ShiftedFactor(Protocol):
    """What the trust-region solver needs of ``C + lam I``: solves and the inertia."""

    def solve(self, v: Tensor) -> Tensor: ...
    def inertia(self) -> tuple[int, int, int]: ...


class TrustRegionResult(NamedTuple):
    """The solution ``step`` of ``min g.d + 1/2 d^T C d`` s.t. ``|d| <= radius``, its
    multiplier ``lam`` (``(C + lam I) d = -g``, ``lam (radius - |d|) = 0``,
    ``C + lam I`` PSD), whether the hard case occurred, and the factorisations used."""

    step: Tensor
    lam: float
    hard_case: bool
    factorizations: int


def trust_region_subproblem(
    g: Tensor,
    radius: float,
    factor: Callable[[float], ShiftedFactor],
    smallest: Callable[[], tuple[float, Tensor]],
    *,
    rtol: float = 1e-9,
    max_iter: int = 100,
) -> TrustRegionResult:
    """Solve the trust-region subproblem exactly (Moré and Sorensen 1983; Nocedal and
    Wright, *Numerical Optimization*, alg. 4.3).

    Args:
        g: the gradient ``(P,)``.
        radius: ``Delta > 0``.
        factor: ``lam -> C + lam I`` factored (a chain factorisation, or dense).
        smallest: ``() -> (lambda_1, u_1)``, the smallest eigenvalue of ``C`` and a unit
            eigenvector (asked for only when ``C`` is not positive definite or the step
            is outside the region).
        rtol: stop when ``| |d| - Delta | <= rtol Delta``.

    The exact inertia decides whether ``C + lam I`` is positive definite; the hard case
    (``g`` orthogonal to the eigenvectors of ``lambda_1``) adds ``t u_1`` to reach the
    boundary.
    """
    if not (math.isfinite(radius) and radius > 0):
        raise ValueError(f"radius must be positive and finite; got {radius}")
    count = 0

    def fac(lam: float) -> ShiftedFactor:
        nonlocal count
        count += 1
        return factor(lam)

    try:
        f0 = fac(0.0)
        neg, zero, _pos = f0.inertia()
        if neg == 0 and zero == 0:
            d = -f0.solve(g)
            if float(d.norm()) <= radius:
                return TrustRegionResult(d, 0.0, False, count)
    except _SINGULAR:  # C is singular: not positive definite
        pass
    lam1, u = smallest()
    lo = max(0.0, -lam1)
    hi = lo + float(g.norm()) / radius + 1e-12 * max(1.0, abs(lo))
    lam_lo, d_lo = _just_above(fac, g, lo, max(1.0, abs(lo), float(g.norm()) / radius))
    if float(d_lo.norm()) < radius and lo > 0:  # the hard case
        return TrustRegionResult(_hard_case_step(g, d_lo, u, radius), lo, True, count)
    lam = lam_lo if float(d_lo.norm()) > radius else hi
    d, lam = _secular_newton(fac, g, radius, lam, (lo, hi), d_lo, rtol, max_iter)
    return TrustRegionResult(d, lam, False, count)


def _just_above(
    fac: Callable[[float], ShiftedFactor], g: Tensor, lo: float, scale: float
) -> tuple[float, Tensor]:
    """The smallest shift ``lo + e`` at which ``C + lam I`` is numerically non-singular,
    and its step ``-(C + lam I)^-1 g``."""
    for j in range(6):
        shift = lo + 1e-10 * 10.0**j * scale
        try:
            return shift, -fac(shift).solve(g)
        except _SINGULAR:
            continue
    raise ArithmeticError("C + lam I stays singular just above -lambda_1")


def _hard_case_step(g: Tensor, d_lo: Tensor, u: Tensor, radius: float) -> Tensor:
    """Just above ``-lambda_1`` the step is still inside the region: add ``t u_1`` to
    reach the boundary (the component of ``d`` along ``u`` is unreliable this close to
    singular: it is removed first)."""
    d_h = d_lo - (u @ d_lo) * u
    a, b_, c = float(u @ u), 2 * float(u @ d_h), float(d_h @ d_h) - radius**2
    disc = math.sqrt(max(b_ * b_ - 4 * a * c, 0.0))
    taus = [(-b_ + disc) / (2 * a), (-b_ - disc) / (2 * a)]
    # on the boundary the model is 1/2 g.d - 1/2 lam Delta^2: the smaller g.d wins
    return min((d_h + t * u for t in taus), key=lambda dv: float(g @ dv))


def _secular_newton(
    fac: Callable[[float], ShiftedFactor],
    g: Tensor,
    radius: float,
    lam: float,
    bracket: tuple[float, float],
    d: Tensor,
    rtol: float,
    max_iter: int,
) -> tuple[Tensor, float]:
    """Newton's method on ``1/|d(lam)| = 1/Delta`` (Moré-Sorensen), safeguarded by the
    bracket; returns the step and its multiplier."""
    lo_b, hi_b = bracket
    for _ in range(max_iter):
        try:
            f = fac(lam)
            d = -f.solve(g)
        except _SINGULAR:  # lam met an eigenvalue of -C: move inside the bracket
            lam = 0.5 * (lam + hi_b)
            continue
        dn = float(d.norm())
        if abs(dn - radius) <= rtol * radius:
            break
        if dn > radius:
            lo_b = lam
        else:
            hi_b = lam
        q2 = float(d @ f.solve(d))  # |L^-1 d|^2 = d^T (C + lam I)^-1 d
        new = lam + (dn / radius - 1.0) * dn**2 / max(q2, 1e-300)  # Newton on 1/|d| = 1/Delta
        lam = new if lo_b < new < hi_b else 0.5 * (lo_b + hi_b)
    return d, lam
