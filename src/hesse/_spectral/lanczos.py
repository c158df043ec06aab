"""Extreme eigenpairs of symmetric operators by Lanczos with full reorthogonalisation,
and every eigenvalue of a small one from its dense matrix.

Every function takes a `CurvatureOperator` (or a dense symmetric ``(P, P)`` tensor) and
an optional ``torch.Generator`` that makes the result reproducible.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from hesse._operators.base import CurvatureOperator
from hesse._util.checks import check_int, check_positive
from hesse._util.memory import check_memory, renamed_chunk_memory

__all__ = ["Counted", "EigResult", "Operator", "eigs", "eigvalsh", "lanczos", "tridiag"]

Operator = CurvatureOperator | Tensor


class Counted:
    """``op`` as a counted ``(P, k) -> (P, k)`` map, validated once."""

    def __init__(self, op: Operator) -> None:
        if isinstance(op, CurvatureOperator):
            if not op.symmetric:
                raise ValueError(
                    f"{type(op).__name__} is not symmetric; this method needs a symmetric operator"
                )
            self.P, self.dtype, self.device = op.shape[0], op.dtype, op.device
            self._mm: Callable[[Tensor], Tensor] = op.matmat
            self.random = op.random
            self.share = op.space.shared_random
            self.agree = op.space.agree  # type: ignore[method-assign]
            if self.random:
                warnings.warn(
                    f"{type(op).__name__} is random: the model has Dropout in training mode, "
                    "so every product draws new masks and spectra, traces and densities are "
                    "of no fixed matrix (eigs reports converged=False). Call model.eval() "
                    "for the deterministic curvature.",
                    stacklevel=3,
                )
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

    random: bool = False

    @staticmethod
    def agree(call: str, **args: object) -> None:
        """Refuse arguments that differ between the ranks of a distributed problem's
        operator (`Problem.agree`); nothing else."""

    @staticmethod
    def share(t: Tensor) -> Tensor:
        """Rank 0's ``t`` on every rank for a distributed problem's operator (random
        start vectors and probes must agree), else ``t``."""
        return t

    def __call__(self, V: Tensor) -> Tensor:
        self.count += V.shape[1]
        return self._mm(V)


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


def lanczos(
    A: Counted,
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

    A numerical kernel: its length is the algorithm's (the recurrence, the two passes of
    reorthogonalisation, the restart and the stopping test share the loop's state).
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
            w = A.share(w)
            for _ in range(2):
                w = w - Qj.T @ (Qj @ w)
            basis.append(w / w.norm())
            betas.append(0.0)
            continue
        basis.append(w / b)
        if stop is not None and (m % check_every == 0):
            T = tridiag(alphas, betas, A.dtype)
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


def tridiag(alphas: Sequence[float], betas: Sequence[float], dtype: torch.dtype) -> Tensor:
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


def _ritz(T: Tensor, b: float, k: int, which: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Ritz values ``theta`` and vectors ``S`` of the tridiagonal ``T``, the wanted
    ones' indices and their residual norms ``|b S[-1, i]|``."""
    theta, S = torch.linalg.eigh(T)
    idx = _select(theta, min(k, len(theta)), which)
    return theta, S, idx, (b * S[-1, idx]).abs()


def _eigs_arguments(
    A: Counted,
    k: object,
    which: str,
    tol: object,
    max_steps: object,
    generator: torch.Generator | None,
    v0: Tensor | None,
) -> tuple[int, Tensor]:
    """`eigs`' arguments validated: the number of steps and the start vector."""
    P = A.P
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= P:
        raise ValueError(f"k must be in [1, {P}] (an integer) for a {P} x {P} operator; got {k!r}")
    _select(torch.zeros(1), 1, which)  # validate `which` early
    check_positive("tol", tol)
    if max_steps is not None:
        check_int("max_steps", max_steps, 1)
    steps = min(P, max_steps if max_steps is not None else 300 + 10 * int(k))
    if v0 is None:
        v0 = torch.randn(P, generator=generator, dtype=torch.float64).to(A.dtype).to(A.device)
        v0 = A.share(v0)
    elif not isinstance(v0, Tensor) or v0.shape != (P,):
        shape = tuple(v0.shape) if isinstance(v0, Tensor) else type(v0).__name__
        raise ValueError(f"v0 must be a tensor of shape ({P},); got {shape}")
    elif not bool(torch.isfinite(v0).all()) or float(v0.norm()) == 0.0:
        raise ValueError("v0 must be finite and nonzero (it starts the Krylov space)")
    return steps, v0


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
    A = Counted(op)
    steps, v0 = _eigs_arguments(A, k, which, tol, max_steps, generator, v0)
    A.agree("eigs", k=k, which=which, tol=tol, max_steps=steps, v0=v0)

    def stop(T: Tensor, Q: Tensor, b: float) -> bool:
        if T.shape[0] < k:
            return False
        theta, _S, _idx, res = _ritz(T, b, k, which)
        return bool((res <= tol * float(theta.abs().max())).all())

    restart = generator if generator is not None else torch.Generator().manual_seed(0)
    Q, alpha, beta, b = lanczos(A, v0, steps, stop=stop, restart=restart)
    theta, S, idx, res = _ritz(tridiag(alpha.tolist(), beta.tolist(), A.dtype), b, k, which)
    if len(idx) < k:
        raise ValueError(
            f"the Krylov space of the start vector has dimension {len(theta)} < "
            f"k = {k}; pass another v0 or generator"
        )
    scale = float(theta.abs().max()) if len(theta) else 1.0
    # a random operator (train-mode Dropout) has no eigenpairs to converge to
    converged = bool((res <= tol * max(scale, 1e-300)).all()) and not A.random
    if not converged and not A.random:
        warnings.warn(
            f"Lanczos did not converge in {Q.shape[1]} steps: largest Ritz residual "
            f"{float(res.max()):.2e} against the requested {tol * scale:.2e}; raise max_steps",
            stacklevel=2,
        )
    X = Q @ S[:, idx].to(device=Q.device, dtype=Q.dtype)  # T lives on the CPU
    return EigResult(theta[idx].to(A.device), X, A.count, res, converged)


def eigvalsh(
    op: Operator, *, chunk_memory: int | None = None, max_memory: int | None = None
) -> Tensor:
    """All eigenvalues, ascending, from the dense matrix (``P`` products and
    ``O(P^3)``): the reference for small models."""
    chunk_memory = renamed_chunk_memory(chunk_memory, max_memory, "hesse.eigvalsh")
    A = Counted(op)
    M = op if isinstance(op, Tensor) else op.to_dense(chunk_memory=chunk_memory, progress=False)
    return torch.linalg.eigvalsh(M.to(A.dtype))
