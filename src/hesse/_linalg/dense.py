"""The dense engine: ``C`` (``P x P``) formed once in memory-bounded column chunks, then
``C + eps I`` factored by the same stable tiers as one chain stage (design note, "Stable
elimination": Cholesky, else Bunch-Kaufman ``LDL^T`` under a growth test, else the eigen
basis with a rank tolerance), so that inertia and zeros are counted exactly as the chain
counts them. ``O(P^3)`` time and ``O(P^2)`` memory: the engine for a few thousand
parameters. The matrix is kept, so several dampings cost one factorisation each."""

from __future__ import annotations

import torch
from torch import Tensor

from hesse._autodiff.bishop import bishop_hessian, bishop_route
from hesse._autodiff.problem import Problem
from hesse._factor.base import Engine, Factorization, PivotSummary, shift
from hesse._factor.cost import EngineCost, EngineSpec, Timing, problem_of
from hesse._factor.elimination import Elimination, maxabs
from hesse._operators.curvature import curvature_operator
from hesse._util.memory import check_memory

__all__ = ["DenseEngine", "DenseFactorization"]


class DenseEngine(Engine):
    """``C`` of a `Problem` as a dense matrix, formed once (`factor` repeats only the
    factorisation): by Bishop's propagation for an MLP (design note (B1); ``formed_by ==
    "bishop"``) when its working memory fits, else from ``P`` products in chunks.

    Args:
        problem: the problem (in the dtype to factor in).
        curvature: ``"hessian"`` or ``"ggn"``.
        chunk_memory: working memory of the column chunks (bytes; default 1 GiB).
        progress: a bar over the columns (default: when stderr is a terminal).
    """

    method = "dense"

    def __init__(
        self,
        problem: Problem,
        curvature: str,
        *,
        chunk_memory: int | None = None,
        progress: bool | None = None,
    ) -> None:
        self.problem, self.curvature = problem, curvature
        op = curvature_operator(problem, curvature)
        # an MLP's matrix by Bishop's propagation (B1): one pass over the data instead of
        # P products, when its working memory fits in chunk_memory (default 1 GiB), the
        # bound the products' column chunks keep to
        self.formed_by = "products"
        work = bishop_route(problem, chunk_memory)
        if work is not None:
            P = problem.num_params
            check_memory(
                P * P * op.dtype.itemsize + work,
                f"the dense {P} x {P} {op.name} matrix",
                "use the chain or observation-space engine (hesse.plan lists them)",
                problem.device,
            )
            self.matrix = bishop_hessian(problem, curvature == "ggn", chunk_memory)
            self.formed_by = "bishop"
        else:
            self.matrix = op.to_dense(chunk_memory=chunk_memory, progress=progress)

    def _factor(self, damping: float | Tensor, rank_rtol: float | None) -> DenseFactorization:
        """``C + D`` factored (``D = eps I`` or a positive diagonal: (D1))."""
        return DenseFactorization(self, damping, rank_rtol)


class DenseFactorization(Factorization):
    """``C + eps I`` of a `DenseEngine`, factored by one `Elimination` (no state to carry:
    everything is eliminated, zeros counted under the rank tolerance; design note (D1))."""

    def __init__(
        self, engine: DenseEngine, damping: float | Tensor, rank_rtol: float | None
    ) -> None:
        self.problem, self.curvature = engine.problem, engine.curvature
        self.damping = damping
        self.num_params = P = engine.matrix.shape[0]
        dtype = engine.matrix.dtype
        self._out_dtype = dtype
        self.rank_rtol = (
            10.0 * max(P, 1) * torch.finfo(dtype).eps if rank_rtol is None else float(rank_rtol)
        )
        self._matrix = engine.matrix
        M = engine.matrix.clone()
        M.diagonal().add_(damping.to(M) if isinstance(damping, Tensor) else damping)
        scale = maxabs(M)
        zero_tol = self.rank_rtol * scale
        self._elim = Elimination(M, None, None, zero_tol, "dense")
        del M
        self.status = self._status(
            PivotSummary(self._elim.pivots, zero_tol),
            kinds=(self._elim.kind,),
            growth=1.0,
            scale=scale,
            zero_tol=zero_tol,
            dtype=dtype,
            method="dense",
        )

    def inverse_diagonal(self) -> Tensor | None:
        """The diagonal of ``(C + D)^-1`` ``(P,)`` from the factorisation's own Cholesky
        factor ``C + D = L L^T``: ``torch.cholesky_inverse`` (LAPACK's ``potri``, a
        triangular inverse and the product ``L^-T L^-1``, ``2 P^3 / 3`` flops, three
        quarters of the time a triangular solve against the identity takes; ``None`` when
        ``C + D`` is not positive definite)."""
        if self._elim.kind != "cholesky":
            return None
        return torch.cholesky_inverse(self._elim.L).diagonal().clone()  # not the P x P

    def inverse_trace_products(self, weights: Tensor) -> tuple[Tensor, Tensor] | None:
        """Traces of ``A^-1 = (C + D)^-1`` against diagonal weights, first and second order,
        from one ``torch.cholesky_inverse`` of the factorisation's own factor (A4).

        Args:
            weights: ``(P, k)``, column ``j`` the diagonal of ``U_j`` (say, a parameter
                tensor's indicator times its prior).

        Returns:
            ``(t, T)``: ``t`` ``(k,)`` with ``t_j = tr(A^-1 U_j)``, and ``T`` ``(k, k)`` with
            ``T_ij = tr(A^-1 U_i A^-1 U_j) = u_i^T (A^-1 o A^-1) u_j`` (``o`` elementwise;
            ``2 P^3 / 3`` flops for the inverse, ``P^2 k`` for the rest, one ``P x P``
            buffer); ``None`` when ``C + D`` is not positive definite.
        """
        if self._elim.kind != "cholesky":
            return None
        S = torch.cholesky_inverse(self._elim.L)
        U = weights.to(S)
        t = S.diagonal() @ U
        T = U.T @ (S.square_() @ U)  # in place: A^-1 is not needed after its diagonal
        return t, 0.5 * (T + T.T)

    def operator(self, X: Tensor) -> Tensor:
        """``(C + D) X`` with the formed matrix (``C`` from the true operator's products
        once, in the engine): refinement (S7) without a pass over the data."""
        return self._matrix @ X + shift(self.damping, X)

    def _apply_inverse(self, V: Tensor) -> Tensor:
        k, _, _ = self._elim.backward(-V)  # k = -Q^-1 q with q = -v
        return self._elim.forward(k, None, None)


def dense_memory(problem: Problem, curvature: str) -> float:
    """Peak memory of the dense engine: forming ``C`` (the matrix and Bishop's or the
    products' working memory) or factoring it (measured, tests/test_memory.py: Cholesky
    and Bunch-Kaufman's LDL^T alike about 3.5 ``P x P`` arrays: ``C``, the shifted copy,
    the factor and LAPACK's copies)."""
    P = problem.num_params
    item = torch.empty((), dtype=problem.dtype).element_size()
    work = bishop_route(problem)  # DenseEngine's own rule (it is built without chunk_memory)
    if work is not None:
        build = P * P * item + work
    else:
        build = curvature_operator(problem, curvature).dense_memory()
    return max(build, 3.5 * P * P * item)


def dense_cost(problem: Problem, curvature: str, timing: Timing) -> tuple[EngineCost, None]:
    """``C`` formed from ``P`` products, or for an MLP by Bishop's one pass (``N P^2``
    flops at about a quarter of the matrix-product rate, plus ``1000 P^2 / gemm`` seconds
    for assembling the ``P x P`` matrix: fitted on the 2-core CPU, digits MLPs of 10 to
    1,000 samples, 12 ns an entry), then Cholesky (the GGN) or Bunch-Kaufman (the
    Hessian), ``P^3 / 3`` flops each at the rate LAPACK reaches at that size
    (`Timing.factor_rate`)."""
    problem = problem_of(problem)
    P = problem.num_params
    factor_flops = P**3 / 3
    rate = timing.factor_rate("chol" if curvature == "ggn" else "ldl", P)
    if bishop_route(problem) is not None:
        form = (4 * problem.local_samples + 1000) * P * P / timing.gemm
    else:
        form = P * timing.column
    seconds = form + factor_flops / rate
    memory = dense_memory(problem, curvature)
    return EngineCost("dense", True, factor_flops, memory, seconds), None


def dense_floor(problem: Problem, curvature: str, timing: Timing) -> float:
    """`dense_cost`'s factorisation alone, ``P^3 / 3`` flops at LAPACK's rate (its lower
    bound, from ``P`` alone)."""
    P = problem_of(problem).num_params
    return P**3 / 3 / timing.factor_rate("chol" if curvature == "ggn" else "ldl", P)


def build_dense(
    problem: Problem, curvature: str, budget: float, built: None, progress: bool | None
) -> DenseEngine:
    problem = problem_of(problem)
    P = problem.num_params
    check_memory(
        dense_memory(problem, curvature),
        f"the dense {P} x {P} {curvature} factorisation",
        "use method='gram' (GGN) or 'chain' (nn.Sequential), or fewer parameters",
        budget=budget,
    )
    return DenseEngine(problem, curvature, progress=progress)


DENSE = EngineSpec(
    "dense",
    dense_cost,
    build_dense,
    "C formed in column chunks (Bishop's propagation for an MLP), factored by Cholesky / "
    "Bunch-Kaufman / eigen tiers: O(P^3), O(P^2) memory",
    dense_floor,
)
