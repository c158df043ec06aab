"""Stochastic and exact spectral quantities of symmetric operators: Hutchinson and
Hutch++ traces, diagonals, stochastic Lanczos quadrature densities, and the empirical
Fisher's diagonal.

Every function takes a `CurvatureOperator` (or a dense symmetric ``(P, P)`` tensor) and
an optional ``torch.Generator`` that makes the estimate reproducible.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from hesse._autodiff import products
from hesse._autodiff.problem import Problem
from hesse._operators.curvature import FisherOperator
from hesse._spectral.lanczos import Counted, Operator, lanczos, tridiag
from hesse._util.checks import check_int
from hesse._util.memory import renamed_chunk_memory

__all__ = [
    "SpectralDensity",
    "TraceEstimate",
    "diagonal",
    "empirical_fisher_diagonal",
    "rademacher",
    "spectral_density",
    "trace",
]


def rademacher(
    P: int, k: int, gen: torch.Generator | None, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """``(P, k)`` random signs (Rademacher vectors) from ``gen``."""
    bits = torch.randint(0, 2, (P, k), generator=gen)
    return (2.0 * bits - 1.0).to(dtype=dtype, device=device)


class TraceEstimate(NamedTuple):
    """``estimate`` of the trace with its ``std_error`` (0 for exact), the operator
    products used and the method."""

    estimate: float
    std_error: float
    num_products: int
    method: str


def trace(
    op: Operator,
    *,
    method: str = "hutch++",
    num_products: int = 60,
    generator: torch.Generator | None = None,
) -> TraceEstimate:
    """The trace of a symmetric operator.

    Args:
        method: ``"hutch++"`` (Meyer, Musco, Musco, Woodruff 2021: a third of the budget
            sketches the top of the spectrum, which is then traced exactly; Hutchinson on
            the rest), ``"hutchinson"`` (Hutchinson 1989, Rademacher vectors) or ``"exact"``
            (``P`` products, one per unit vector).
        num_products: operator products to spend (at least 3 for Hutch++, 2 otherwise).

    Returns:
        a `TraceEstimate`; the standard error is the sample standard deviation of the
        Hutchinson part over the square root of its number of vectors.
    """
    A = Counted(op)
    P = A.P
    A.agree("trace", method=method, num_products=num_products)  # before any collective
    check_int("num_products", num_products, 2 if method == "hutchinson" else 3)
    if method == "exact":
        return TraceEstimate(float(diagonal(op, method="exact").sum()), 0.0, P, "exact")
    if method == "hutchinson":
        if num_products < 2:
            raise ValueError("hutchinson needs num_products >= 2")
        V = A.share(rademacher(P, num_products, generator, A.dtype, A.device))
        vals = (V * A(V)).sum(0)
        return TraceEstimate(
            float(vals.mean()), float(vals.std() / math.sqrt(len(vals))), A.count, method
        )
    if method == "hutch++":
        if num_products < 3:
            raise ValueError("hutch++ needs num_products >= 3")
        s = max(1, num_products // 3)
        g = num_products - 2 * s
        S = A.share(rademacher(P, s, generator, A.dtype, A.device))
        Q, _ = torch.linalg.qr(A(S))
        exact_part = float(torch.trace(Q.T @ A(Q)))
        G = A.share(rademacher(P, g, generator, A.dtype, A.device))
        G = G - Q @ (Q.T @ G)
        vals = (G * A(G)).sum(0)
        se = float(vals.std() / math.sqrt(g)) if g > 1 else float("nan")
        return TraceEstimate(exact_part + float(vals.mean()), se, A.count, method)
    raise ValueError(f"method must be 'hutch++', 'hutchinson' or 'exact'; got {method!r}")


def diagonal(
    op: Operator,
    *,
    method: str = "exact",
    num_products: int = 100,
    generator: torch.Generator | None = None,
    chunk_memory: int | None = None,
    max_memory: int | None = None,
) -> Tensor:
    """The diagonal ``(P,)`` of a symmetric operator: ``"exact"`` (``P`` products in
    memory-bounded chunks) or ``"hutchinson"`` (Bekas, Kokiopoulou, Saad 2007:
    ``mean(v * A v)`` over Rademacher ``v``, unbiased)."""
    chunk_memory = renamed_chunk_memory(chunk_memory, max_memory, "hesse.diagonal")
    A = Counted(op)
    A.agree("diagonal", method=method, num_products=num_products)
    if method == "exact":
        if isinstance(op, Tensor):
            return torch.diagonal(op).clone()
        return op.diagonal(chunk_memory)
    if method == "hutchinson":
        V = A.share(rademacher(A.P, num_products, generator, A.dtype, A.device))
        return (V * A(V)).mean(1)
    raise ValueError(f"method must be 'exact' or 'hutchinson'; got {method!r}")


class SpectralDensity(NamedTuple):
    """A spectral density by stochastic Lanczos quadrature.

    ``grid (G,)`` and ``density (G,)`` (integrates to 1); ``nodes`` and ``weights``
    ``(probes, m)``: each probe's Gauss quadrature (Ritz values and squared first
    components, weights summing to 1); ``sigma`` the Gaussian kernel width.
    """

    grid: Tensor
    density: Tensor
    nodes: Tensor
    weights: Tensor
    sigma: float
    num_products: int

    def moment(self, k: int) -> float:
        """``tr(A^k) / P`` as the quadrature estimates it (exact for the probes when
        ``2 m - 1 >= k``)."""
        return float((self.weights * self.nodes**k).sum(1).mean())


def spectral_density(
    op: Operator,
    *,
    num_probes: int = 10,
    lanczos_steps: int = 80,
    grid: Tensor | int = 500,
    sigma: float | None = None,
    generator: torch.Generator | None = None,
) -> SpectralDensity:
    """The eigenvalue density ``phi(t) = (1/P) sum_i delta(t - lambda_i)``, smoothed by a
    Gaussian of width ``sigma``, by stochastic Lanczos quadrature (Lin, Saad, Yang 2016;
    Ghorbani, Krishnan, Xiao 2019): each Rademacher probe ``v`` runs ``m`` Lanczos steps
    whose Ritz values ``theta_j`` and squared first components ``tau_j`` are a Gauss
    quadrature of ``v^T f(A) v / P``.

    Args:
        num_probes, lanczos_steps: probes and steps per probe (``num_probes *
            lanczos_steps`` products).
        grid: the evaluation points, or how many to spread over the Ritz values' range
            padded by ``5 sigma``.
        sigma: kernel width; default 1% of the Ritz values' range.
    """
    check_int("num_probes", num_probes, 1)
    check_int("lanczos_steps", lanczos_steps, 1)
    A = Counted(op)
    A.agree("spectral_density", num_probes=num_probes, lanczos_steps=lanczos_steps)
    P = A.P
    m = min(lanczos_steps, P)
    nodes = torch.zeros(num_probes, m, dtype=A.dtype)
    weights = torch.zeros(num_probes, m, dtype=A.dtype)
    for i in range(num_probes):
        v = A.share(rademacher(P, 1, generator, A.dtype, A.device))[:, 0]
        _Q, alpha, beta, _b = lanczos(A, v, m)
        theta, S = torch.linalg.eigh(tridiag(alpha.tolist(), beta.tolist(), A.dtype))
        mi = len(theta)  # fewer when the Krylov space became invariant
        nodes[i, :mi] = theta.cpu()
        weights[i, :mi] = (S[0, :] ** 2).cpu()
        if mi < m:  # pad with zero-weight copies of a node
            nodes[i, mi:] = theta[-1].cpu()
    lo, hi = float(nodes.min()), float(nodes.max())
    width = max(hi - lo, 1e-12 * max(1.0, abs(hi)))
    sig = 0.01 * width if sigma is None else float(sigma)
    if sig <= 0:
        raise ValueError(f"sigma must be positive; got {sig}")
    if isinstance(grid, int):
        grid_t = torch.linspace(lo - 5 * sig, hi + 5 * sig, grid, dtype=A.dtype)
    else:
        grid_t = grid.to(A.dtype).cpu()
    diff = grid_t[:, None, None] - nodes[None]
    kern = torch.exp(-0.5 * (diff / sig) ** 2) / (sig * math.sqrt(2 * math.pi))
    density = (kern * weights[None]).sum(2).mean(1)
    return SpectralDensity(grid_t, density, nodes, weights, sig, A.count)


def empirical_fisher_diagonal(problem: Problem) -> Tensor:
    """The diagonal ``(P,)`` of the empirical Fisher: from per-sample gradients
    (`hesse._autodiff.products.empirical_fisher_diagonal_vmap`, about one gradient of work), or
    from ``P`` operator products when the model cannot be vmapped over samples."""
    fast = products.empirical_fisher_diagonal_vmap(problem)
    if fast is not None:
        return fast
    return diagonal(FisherOperator(problem, kind="empirical"), method="exact")
