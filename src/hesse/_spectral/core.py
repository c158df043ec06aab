"""Spectra of curvature operators: Lanczos eigenpairs, Hutchinson / Hutch++ traces,
diagonals, stochastic Lanczos quadrature densities, and exact counts for chains.

Every function takes a `CurvatureOperator` (or a dense symmetric ``(P, P)`` tensor) and
an optional ``torch.Generator`` that makes the estimate reproducible.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from hesse._autodiff import products as _products
from hesse._autodiff.problem import Problem
from hesse._operators.curvature import CurvatureOperator, FisherOperator
from hesse._util.memory import check_memory

__all__ = [
    "EigResult",
    "SpectralDensity",
    "TraceEstimate",
    "diagonal",
    "eigs",
    "eigvalsh",
    "spectral_density",
    "trace",
]

Operator = CurvatureOperator | Tensor


class _Counted:
    """``op`` as a counted ``(P, k) -> (P, k)`` map, validated once."""

    def __init__(self, op: Operator) -> None:
        if isinstance(op, CurvatureOperator):
            if not op.symmetric:
                raise ValueError(
                    f"{type(op).__name__} is not symmetric; this method needs a symmetric operator"
                )
            self.P, self.dtype, self.device = op.shape[0], op.dtype, op.device
            self._mm: Callable[[Tensor], Tensor] = op._matmat
        elif isinstance(op, Tensor):
            if op.ndim != 2 or op.shape[0] != op.shape[1]:
                raise ValueError(f"expected a square (P, P) matrix; got {tuple(op.shape)}")
            if not op.is_floating_point():
                raise TypeError(f"expected a floating-point matrix; got {op.dtype}")
            scale = float(op.abs().max()) if op.numel() else 0.0
            if float((op - op.T).abs().max()) > 1e-10 * max(scale, 1e-300):
                raise ValueError(
                    "the matrix is not symmetric; this method needs a symmetric operator"
                )
            self.P, self.dtype, self.device = op.shape[0], op.dtype, op.device
            self._mm = op.__matmul__
        else:
            raise TypeError(
                f"expected a CurvatureOperator or a square tensor; got {type(op).__name__}"
            )
        self.count = 0

    def __call__(self, V: Tensor) -> Tensor:
        self.count += V.shape[1]
        return self._mm(V)


def _check_int(name: str, value: object, low: int) -> int:
    """``value`` as an int ``>= low``, or a ValueError naming what was expected."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}; got {value!r}")
    return int(value)


def _check_positive(name: str, value: object) -> float:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number; got {value!r}")
    return float(value)


def _rademacher(
    P: int, k: int, gen: torch.Generator | None, dtype: torch.dtype, device: torch.device
) -> Tensor:
    bits = torch.randint(0, 2, (P, k), generator=gen)
    return (2.0 * bits - 1.0).to(dtype=dtype, device=device)


# ----------------------------------------------------------------------------- Lanczos
class _Basis:
    """Lanczos vectors as the rows of a buffer that doubles when full (up to ``limit``
    rows); each growth is checked against the memory budget first."""

    def __init__(self, P: int, limit: int, dtype: torch.dtype, device: torch.device) -> None:
        self.P, self.limit, self.n = P, limit, 0
        self.buf = torch.empty(min(limit, 16), P, dtype=dtype, device=device)

    def append(self, v: Tensor) -> None:
        if self.n == self.buf.shape[0]:
            cap = min(self.limit, 2 * self.buf.shape[0])
            check_memory(
                cap * self.P * self.buf.element_size() + self.buf.numel() * self.buf.element_size(),
                f"a Lanczos basis of {cap} vectors of {self.P} numbers",
                "pass a smaller max_steps (or fewer eigenpairs)",
                self.buf.device,
            )
            grown = torch.empty(cap, self.P, dtype=self.buf.dtype, device=self.buf.device)
            grown[: self.n] = self.buf[: self.n]
            self.buf = grown
        self.buf[self.n] = v
        self.n += 1

    def rows(self, m: int) -> Tensor:
        return self.buf[:m]


def _lanczos(
    A: _Counted,
    v0: Tensor,
    steps: int,
    *,
    stop: Callable[[Tensor, Tensor, float], bool] | None = None,
    check_every: int = 5,
    restart: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor, float]:
    """Lanczos with full reorthogonalisation (twice is enough, Parlett) from ``v0``.

    When the Krylov space becomes invariant before ``steps`` (a degenerate spectrum) and
    ``restart`` is given, Lanczos goes on from a fresh random vector orthogonal to the
    basis (coupling ``beta = 0``): the tridiagonal becomes block diagonal and repeated
    eigenvalues are found one copy per block (deflation).

    Returns the basis ``Q (P, m)``, the tridiagonal's ``alpha (m,)``, ``beta (m-1,)``
    and the last ``beta_m`` (zero when the Krylov space became invariant).
    """
    P = A.P
    full = min(steps, P) + 1
    # the basis, one vector a row (contiguous for the reorthogonalisation's products),
    # grown by doubling: memory follows the steps taken, not the steps allowed
    basis = _Basis(P, full, A.dtype, A.device)
    q = v0 / v0.norm()
    basis.append(q)
    alphas: list[float] = []
    betas: list[float] = []
    beta_last = 0.0
    for j in range(min(steps, P)):
        Qj = basis.rows(j + 1)
        w = A(Qj[j].unsqueeze(1))[:, 0]
        a = float(Qj[j] @ w)
        alphas.append(a)
        w = w - a * Qj[j] - (betas[-1] * Qj[j - 1] if j > 0 else 0.0)
        for _ in range(2):  # full reorthogonalisation against all earlier vectors
            w = w - Qj.T @ (Qj @ w)
        b = float(w.norm())
        beta_last = b
        m = j + 1
        invariant = b <= 1e-12 * max(1.0, max(abs(x) for x in alphas))
        if m == P or (invariant and (restart is None or m >= min(steps, P))):
            beta_last = 0.0 if m == P or invariant else b
            break
        if invariant:  # restart orthogonally: a new Krylov block, beta = 0 between blocks
            w = torch.randn(P, generator=restart, dtype=torch.float64).to(A.dtype).to(A.device)
            for _ in range(2):
                w = w - Qj.T @ (Qj @ w)
            basis.append(w / w.norm())
            betas.append(0.0)
            continue
        basis.append(w / b)
        if stop is not None and (m % check_every == 0):
            T = _tridiag(alphas, betas, A.dtype)
            if stop(T, basis.rows(m).T, b):
                break
        betas.append(b)
    m = len(alphas)
    return (
        basis.rows(m).T,
        torch.tensor(alphas, dtype=A.dtype),
        torch.tensor(betas[: m - 1], dtype=A.dtype),
        beta_last,
    )


def _tridiag(alphas: Sequence[float], betas: Sequence[float], dtype: torch.dtype) -> Tensor:
    m = len(alphas)
    T = torch.diag(torch.tensor(alphas, dtype=dtype))
    if m > 1:
        off = torch.tensor(list(betas[: m - 1]), dtype=dtype)
        T += torch.diag(off, 1) + torch.diag(off, -1)
    return T


def _select(theta: Tensor, k: int, which: str) -> Tensor:
    if which == "largest":
        return torch.argsort(theta, descending=True)[:k]
    if which == "smallest":
        return torch.argsort(theta)[:k]
    if which == "magnitude":
        return torch.argsort(theta.abs(), descending=True)[:k]
    raise ValueError(f"which must be 'largest', 'smallest' or 'magnitude'; got {which!r}")


class EigResult(NamedTuple):
    """Eigenpairs from `eigs`: ``eigenvalues (k,)`` in the order asked for,
    ``eigenvectors (P, k)``, the operator products used, the Ritz residual norms
    ``|A x - theta x|`` ``(k,)`` and whether all met the tolerance."""

    eigenvalues: Tensor
    eigenvectors: Tensor
    num_products: int
    residuals: Tensor
    converged: bool


def eigs(
    op: Operator,
    k: int = 1,
    which: str = "largest",
    *,
    tol: float = 1e-10,
    max_steps: int | None = None,
    generator: torch.Generator | None = None,
    v0: Tensor | None = None,
) -> EigResult:
    """``k`` eigenpairs of a symmetric operator by Lanczos with full reorthogonalisation.

    Args:
        op: a `CurvatureOperator` (Hessian, GGN, Fisher) or a dense symmetric tensor.
        k: number of eigenpairs, ``1 <= k <= P``.
        which: ``"largest"`` (algebraic), ``"smallest"`` (algebraic: the most negative
            curvature of a Hessian) or ``"magnitude"``.
        tol: stop when every wanted Ritz pair has residual ``|A x - theta x| <= tol *
            max|theta|``.
        max_steps: Lanczos steps at most (default ``min(P, 300 + 10 k)``); the basis
            grows with the steps taken (``P`` numbers a step, doubling its buffer; each
            growth is checked against the memory budget first).
        generator: seeds the start vector; ``v0`` gives it instead.

    Returns:
        an `EigResult`. A warning reports the achieved residual if ``tol`` was not met.

    Cost: one operator product per step. Reference: Lanczos (1950); Parlett, *The
    Symmetric Eigenvalue Problem* (1998), ch. 13 (full reorthogonalisation).
    """
    A = _Counted(op)
    P = A.P
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= P:
        raise ValueError(f"k must be in [1, {P}] (an integer) for a {P} x {P} operator; got {k!r}")
    _select(torch.zeros(1), 1, which)  # validate `which` early
    _check_positive("tol", tol)
    if max_steps is not None:
        _check_int("max_steps", max_steps, 1)
    steps = min(P, max_steps if max_steps is not None else 300 + 10 * k)
    if v0 is None:
        v0 = torch.randn(P, generator=generator, dtype=torch.float64).to(A.dtype).to(A.device)
    elif not isinstance(v0, Tensor) or v0.shape != (P,):
        shape = tuple(v0.shape) if isinstance(v0, Tensor) else type(v0).__name__
        raise ValueError(f"v0 must be a tensor of shape ({P},); got {shape}")
    elif not bool(torch.isfinite(v0).all()) or float(v0.norm()) == 0.0:
        raise ValueError("v0 must be finite and nonzero (it starts the Krylov space)")

    def ritz(T: Tensor, Q: Tensor, b: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        theta, S = torch.linalg.eigh(T)
        idx = _select(theta, min(k, len(theta)), which)
        res = (b * S[-1, idx]).abs()
        return theta, S, idx, res

    def stop(T: Tensor, Q: Tensor, b: float) -> bool:
        if T.shape[0] < k:
            return False
        theta, _S, _idx, res = ritz(T, Q, b)
        return bool((res <= tol * float(theta.abs().max())).all())

    restart = generator if generator is not None else torch.Generator().manual_seed(0)
    Q, alpha, beta, b = _lanczos(A, v0, steps, stop=stop, restart=restart)
    T = _tridiag(alpha.tolist(), beta.tolist(), A.dtype)
    theta, S, idx, res = ritz(T, Q, b)
    if len(idx) < k:
        raise ValueError(
            f"the Krylov space of the start vector has dimension {len(theta)} < "
            f"k = {k}; pass another v0 or generator"
        )
    scale = float(theta.abs().max()) if len(theta) else 1.0
    converged = bool((res <= tol * max(scale, 1e-300)).all())
    if not converged:
        warnings.warn(
            f"Lanczos did not converge in {Q.shape[1]} steps: largest Ritz residual "
            f"{float(res.max()):.2e} against the requested {tol * scale:.2e}; raise max_steps",
            stacklevel=2,
        )
    X = Q @ S[:, idx].to(device=Q.device, dtype=Q.dtype)  # T lives on the CPU
    return EigResult(theta[idx].to(A.device), X, A.count, res, converged)


# ----------------------------------------------------------------------------- trace, diagonal
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
    A = _Counted(op)
    P = A.P
    _check_int("num_products", num_products, 2 if method == "hutchinson" else 3)
    if method == "exact":
        return TraceEstimate(float(diagonal(op, method="exact").sum()), 0.0, P, "exact")
    if method == "hutchinson":
        if num_products < 2:
            raise ValueError("hutchinson needs num_products >= 2")
        V = _rademacher(P, num_products, generator, A.dtype, A.device)
        vals = (V * A(V)).sum(0)
        return TraceEstimate(
            float(vals.mean()), float(vals.std() / math.sqrt(len(vals))), A.count, method
        )
    if method == "hutch++":
        if num_products < 3:
            raise ValueError("hutch++ needs num_products >= 3")
        s = max(1, num_products // 3)
        g = num_products - 2 * s
        S = _rademacher(P, s, generator, A.dtype, A.device)
        Q, _ = torch.linalg.qr(A(S))
        exact_part = float(torch.trace(Q.T @ A(Q)))
        G = _rademacher(P, g, generator, A.dtype, A.device)
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
    max_memory: int | None = None,
) -> Tensor:
    """The diagonal ``(P,)`` of a symmetric operator: ``"exact"`` (``P`` products in
    memory-bounded chunks) or ``"hutchinson"`` (Bekas, Kokiopoulou, Saad 2007:
    ``mean(v * A v)`` over Rademacher ``v``, unbiased)."""
    A = _Counted(op)
    if method == "exact":
        if isinstance(op, Tensor):
            return torch.diagonal(op).clone()
        P = A.P
        chunk = op._chunk_size(max_memory)
        out = torch.empty(P, dtype=A.dtype, device=A.device)
        for start in range(0, P, chunk):  # one chunk of columns at a time: P x chunk memory
            stop = min(P, start + chunk)
            out[start:stop] = op._columns(range(start, stop), max_memory, False)[
                start:stop
            ].diagonal()
        return out
    if method == "hutchinson":
        V = _rademacher(A.P, num_products, generator, A.dtype, A.device)
        return (V * A(V)).mean(1)
    raise ValueError(f"method must be 'exact' or 'hutchinson'; got {method!r}")


# ----------------------------------------------------------------------------- densities
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
    _check_int("num_probes", num_probes, 1)
    _check_int("lanczos_steps", lanczos_steps, 1)
    A = _Counted(op)
    P = A.P
    m = min(lanczos_steps, P)
    nodes = torch.zeros(num_probes, m, dtype=A.dtype)
    weights = torch.zeros(num_probes, m, dtype=A.dtype)
    for i in range(num_probes):
        v = _rademacher(P, 1, generator, A.dtype, A.device)[:, 0]
        _Q, alpha, beta, _b = _lanczos(A, v, m)
        theta, S = torch.linalg.eigh(_tridiag(alpha.tolist(), beta.tolist(), A.dtype))
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


# ----------------------------------------------------------------------------- exact
def empirical_fisher_diagonal(problem: Problem) -> Tensor:
    """The diagonal ``(P,)`` of the empirical Fisher: from per-sample gradients
    (`hesse._autodiff.products.empirical_fisher_diagonal_vmap`, about one gradient of work), or
    from ``P`` operator products when the model cannot be vmapped over samples."""
    fast = _products.empirical_fisher_diagonal_vmap(problem)
    if fast is not None:
        return fast
    return diagonal(FisherOperator(problem, kind="empirical"), method="exact")


def eigvalsh(op: Operator, *, max_memory: int | None = None) -> Tensor:
    """All eigenvalues, ascending, from the dense matrix (``P`` products and
    ``O(P^3)``): the reference for small models."""
    A = _Counted(op)
    M = op if isinstance(op, Tensor) else op.to_dense(max_memory=max_memory, progress=False)
    return torch.linalg.eigvalsh(M.to(A.dtype))
