"""What every exact factorisation of ``C + eps I`` shares, whichever engine built it (the
chain sweep, a dense ``LDL^T`` or Cholesky, the observation-space Woodbury form):
solves refined against the true operator, the log-determinant and the inertia from the
pivots, and the status as data (lineax's ``init``/``compute`` split: the expensive work
happens once, in the engine's constructor; every query afterwards is cheap and returns
what was fixed then).

Design note: docs/design/chain-curvature.md, (L1)-(L2) (log-determinant and inertia
from pivots) and (S7) (iterative refinement against the true operator).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from hesse._autodiff import products
from hesse._autodiff.problem import Problem
from hesse._factor.results import (
    FactorizationStatus,
    InaccurateSolveError,
    Inertia,
    SingularPivotError,
    SolveResult,
)
from hesse._operators.base import CurvatureOperator
from hesse._util.checks import check_rank_rtol

__all__ = [
    "Engine",
    "Factorization",
    "InverseOperator",
    "PivotSummary",
    "backward_floor",
    "shift",
]


def backward_floor(P: int, dtype: torch.dtype) -> float:
    """The backward error that refinement in working precision aims at, ``sqrt(P) u``
    (design note (S7)); it stops earlier only when a step no longer halves the
    residual."""
    return math.sqrt(max(P, 1)) * torch.finfo(dtype).eps


class PivotSummary:
    """Inertia and log-determinant from pivots (Sylvester's law over a congruence, design
    note (L1), (L2)): ``pivots`` a 1-D tensor, plus ``extras``, pairs ``(value, count)``
    of further pivots never formed (a wide stage's complement, ``C``'s null directions
    of the observation-space engine, both equal to ``eps``); a negative count removes
    pivots (the observation-space kernel's ``M - P`` surplus eigenvalues ``eps``, (O2)).
    Pivots of magnitude at most ``zero_tol`` count as zero."""

    def __init__(
        self, pivots: Tensor, zero_tol: float, extras: Sequence[tuple[float, int]] = ()
    ) -> None:
        piv = pivots.double().cpu().reshape(-1)
        mult = torch.ones(len(piv), dtype=torch.float64)
        extras = [(v, c) for v, c in extras if c]
        if extras:
            piv = torch.cat([piv, torch.tensor([float(v) for v, _ in extras], dtype=torch.float64)])
            mult = torch.cat(
                [mult, torch.tensor([float(c) for _, c in extras], dtype=torch.float64)]
            )
        neg = int(mult[piv < -zero_tol].sum())
        zero = int(mult[piv.abs() <= zero_tol].sum())
        pos = int(mult[piv > zero_tol].sum())
        self.inertia = Inertia(neg, zero, pos)
        if zero:
            self.logdet = (0.0, -math.inf)
        else:
            self.logdet = ((-1.0) ** neg, float((mult * piv.abs().log()).sum()))
        present = piv[mult > 0]
        self.min_abs = float(present.abs().min()) if len(present) else math.inf


class Engine(abc.ABC):
    """An exact engine: ``C`` (the Hessian or the GGN of a `Problem`) prepared once, then
    ``factor(damping)`` for each damping. The contract every engine follows (the
    dense matrix, the observation-space kernel, the chain's linearisation):

    - `factor` validates the damping and the rank tolerance here, for every engine:
      ``damping`` is a number ``eps`` (``C + eps I``, either sign) or a positive
      diagonal ``D`` (``C + D``: a ``(P,)`` tensor, a dict ``{name: value}`` or a
      sequence of per-tensor values, `Parameters.as_diagonal`);
    - the factorisation answers in ``out_dtype``, the model's dtype (an engine built on
      a float64 copy of a float32 model answers in float32).

    Subclasses set ``method``, ``problem``, ``curvature`` and implement `_factor`.
    """

    method: str
    problem: Problem
    curvature: str
    out_dtype: torch.dtype | None = None
    group: Any = None  # the process group of a distributed problem (the ranks agree)

    def factor(self, damping: object = 0.0, rank_rtol: float | None = None) -> Factorization:
        """``C + D`` factored (``D = eps I`` for a number ``eps``), with cheap `solve`,
        `logdet` and `inertia` afterwards."""
        d = self.problem.parameters.as_diagonal(damping)
        if self.group is not None:
            self.group.check_same("Engine.factor", {"damping": damping, "rank_rtol": rank_rtol})
        f = self._factor(d, check_rank_rtol(rank_rtol))
        f._out_dtype = self.out_dtype or self.problem.dtype
        return f

    @abc.abstractmethod
    def _factor(self, damping: float | Tensor, rank_rtol: float | None) -> Factorization:
        """The factorisation for a validated damping: a float ``eps`` or a positive
        ``(P,)`` diagonal (float64, in the problem's parameter order)."""


def shift(damping: float | Tensor, X: Tensor) -> Tensor:
    """``D X`` for ``D = eps I`` (a float) or ``diag(d)`` (a ``(P,)`` tensor), ``X`` of
    shape ``(P,)`` or ``(P, k)``."""
    if isinstance(damping, Tensor):
        d = damping.to(X)
        return d * X if X.ndim == 1 else d[:, None] * X
    return damping * X


class Factorization(abc.ABC):
    """``C + eps I`` factored once (``C`` the Hessian or the GGN of a `Problem`); cheap
    ``solve``, ``logdet`` and ``inertia`` afterwards. Every result is fixed when the
    factorisation is built: no method changes what another returns.

    Subclasses (the engines) set ``problem`` (the problem they factor: a float64 copy
    for a promoted model), ``damping``, ``curvature``, ``num_params``, ``rank_rtol``,
    ``status`` and ``_logdet``, and implement `_apply_inverse`.

    Attributes:
        damping: ``eps`` of ``C + eps I`` (a float), or the diagonal ``d`` of ``C + D``
            (a ``(P,)`` tensor).
        curvature: ``"hessian"`` or ``"ggn"``.
        num_params: ``P``.
        status: a `FactorizationStatus` (``status.method`` names the engine).
    """

    problem: Problem
    damping: float | Tensor
    curvature: str
    num_params: int
    rank_rtol: float
    status: FactorizationStatus
    _logdet: tuple[float, float]
    _out_dtype: torch.dtype

    @abc.abstractmethod
    def _apply_inverse(self, V: Tensor) -> Tensor:
        """``(C + eps I)^-1 V`` from the factors, ``V`` of shape ``(P, k)`` in the
        factorisation's dtype (no refinement)."""

    # ------------------------------------------------------------------------- queries
    def logdet(self) -> tuple[float, float]:
        """``(sign, log|det(C + eps I)|)`` as ``torch.linalg.slogdet`` returns them: the
        sum of the pivots' log-magnitudes, the sign ``(-1)^negative``. A singular matrix
        (a pivot within the rank tolerance of zero) gives ``(0.0, -inf)``."""
        return self._logdet

    def inertia(self) -> Inertia:
        """Counts of negative, zero and positive eigenvalues of ``C + eps I``
        (Sylvester's law of inertia over the pivots). Zero counts the pivots of magnitude
        at most ``status.zero_tol = rank_rtol * status.scale``: each is an eigenvalue of
        ``C + eps I`` within about ``zero_tol`` times the growth of zero."""
        return self.status.inertia

    @property
    def damping_text(self) -> str:
        """``eps I`` or ``D`` in words, for messages."""
        d = self.damping
        if isinstance(d, Tensor):
            return f"D (diagonal, {float(d.min()):.3g} to {float(d.max()):.3g})"
        return f"eps I (eps = {d:g})"

    @property
    def near_singular(self) -> bool:
        """Whether ``C + eps I`` is singular or nearly so: a pivot below ``1e-10`` of the
        scale."""
        return self.status.inertia.zero > 0 or self.status.min_pivot < 1e-10

    def solve(
        self, v: Tensor | Sequence[Tensor], *, rtol: float | None = None, max_refine: int = 10
    ) -> Tensor | list[Tensor]:
        """``(C + eps I)^-1 v`` for ``v`` of shape ``(P,)``, ``(P, k)`` or a list of
        per-parameter tensors (returned in the same form), refined until it checks.

        Args:
            rtol: the relative residual ``||(C + eps I) x - v|| / ||v||`` to reach (per
                column). ``None`` (default): as accurate as the arithmetic allows,
                i.e. refine until the backward error stops improving.
            max_refine: at most this many steps of iterative refinement (each one
                application of the factors and one product with the true operator); 0
                measures nothing.

        Raises:
            SingularPivotError: ``C + eps I`` is singular (its near-null space's
                dimension is in the message).
            InaccurateSolveError: ``rtol`` was not reached (or, with ``rtol=None``, the
                backward error stayed above ``1e-10``); the message says what was.

        `solve_ex` returns the residual and the refinement steps too.
        """
        res = self.solve_ex(v, rtol=rtol, max_refine=max_refine)
        if not res.converged and max_refine > 0:
            floor = backward_floor(self.num_params, self.status.dtype)
            if rtol is not None:
                raise InaccurateSolveError(
                    f"the solve reached a relative residual of {res.residual:.2e} after "
                    f"{res.refinement_steps} refinement steps, not the requested rtol={rtol:.1e}; "
                    f"its backward error is {res.backward_error:.1e} (rounding level "
                    f"{floor:.0e}): at this conditioning {self.status.dtype} cannot do "
                    "better; ask for a larger rtol or damping"
                )
            if res.backward_error > 1e-10:
                raise InaccurateSolveError(
                    f"the solve reached only a backward error of {res.backward_error:.2e} "
                    f"(relative residual {res.residual:.2e}) after {res.refinement_steps} "
                    "refinement steps; increase the damping"
                )
        return res.x

    def inverse(self, max_refine: int = 10) -> InverseOperator:
        """``(C + D)^-1`` as an operator like every other (`InverseOperator`): ``@`` on
        ``(P,)``, ``(P, k)`` and per-parameter lists, ``.shape``, ``.dtype``,
        ``.to_dense(chunk_memory=)``, ``.to_scipy()``; `hesse.trace`, `hesse.diagonal`,
        `hesse.eigs` and ``scipy.sparse.linalg`` take it. Each product is a refined
        solve (``max_refine`` steps at most); a singular ``C + D`` is refused here."""
        if self.status.inertia.zero:
            raise SingularPivotError(
                f"C + {self.damping_text} is singular ({self.status.inertia.zero} zero "
                "eigenvalues): it has no inverse; increase the damping"
            )
        return InverseOperator(self, max_refine)

    def solve_ex(
        self, v: Tensor | Sequence[Tensor], *, rtol: float | None = None, max_refine: int = 10
    ) -> SolveResult:
        """As `solve`, but returns a `SolveResult` (the solution, its residual, backward
        error and refinement steps) and raises only for a singular ``C + eps I``."""
        if rtol is not None and not (rtol >= 0 and math.isfinite(rtol)):
            raise ValueError(f"rtol must be a finite number >= 0 or None; got {rtol}")
        if isinstance(max_refine, bool) or not isinstance(max_refine, int) or max_refine < 0:
            raise ValueError(f"max_refine must be an integer >= 0; got {max_refine!r}")
        zero = self.status.inertia.zero
        if zero:
            raise SingularPivotError(
                f"C + {self.damping_text} is singular: the {self.status.method} "
                f"factorisation found a near-null space of dimension {zero} (pivots below "
                f"{self.status.zero_tol:.1e} = rank_rtol {self.rank_rtol:.1e} x scale "
                f"{self.status.scale:.2e}); increase the damping"
            )
        prob = self.problem
        as_list = isinstance(v, (list, tuple))
        V = prob.as_flat(v, "v")
        vec = V.ndim == 1
        V = V.unsqueeze(1) if vec else V
        X, res, be, steps, converged = self._refine(V, rtol, max_refine)
        X = (X.squeeze(1) if vec else X).to(self._out_dtype)
        out = [t.to(self._out_dtype) for t in prob.unflatten(X)] if as_list else X
        return SolveResult(out, res, be, steps, converged)

    def _refine(
        self, V: Tensor, rtol: float | None, max_refine: int
    ) -> tuple[Tensor, float, float, int, bool]:
        """Iterative refinement (S7): ``x <- x + F^-1 (v - (C + eps I) x)`` with the true
        operator's products, while each step at least halves the residual."""
        X = self._apply_inverse(V)
        res = be = math.nan
        steps, converged = 0, False
        if max_refine == 0:
            return X, res, be, steps, converged
        floor = backward_floor(self.num_params, self.status.dtype)
        tiny = torch.finfo(V.dtype).tiny
        vn = torch.linalg.vector_norm(V, dim=0).clamp_min(tiny)
        scale = self.status.scale
        best = None
        while True:
            R = V - self.operator(X)
            rn = torch.linalg.vector_norm(R, dim=0)
            res = float((rn / vn).max())
            xn = torch.linalg.vector_norm(X, dim=0)
            be = float((rn / (scale * xn + vn).clamp_min(tiny)).max())
            if best is not None and not res < best[0]:  # no better: keep the best
                res, be, X = best
                break
            converged = res <= rtol if rtol is not None else be <= floor
            if converged or steps >= max_refine or (best is not None and res > 0.5 * best[0]):
                break
            best = (res, be, X)
            X = X + self._apply_inverse(R)
            steps += 1
        return X, res, be, steps, converged

    def operator(self, X: Tensor) -> Tensor:
        """``(C + eps I) X`` with the true operator's products (design note (S7)), for
        ``X`` of shape ``(P, k)`` in the factorisation's dtype."""
        if self.curvature == "ggn":
            CX = products.ggn_matmat(self.problem, X)
        else:
            CX = products.hessian_matmat(self.problem, X)
        return CX + shift(self.damping, X)

    def _status(self, summary: PivotSummary, **fields: object) -> FactorizationStatus:
        """The status from a `PivotSummary` and the engine's own fields (``kinds``,
        ``growth``, ``scale``, ``zero_tol``, ``dtype``, ``method``, ...)."""
        self._logdet = summary.logdet
        scale = float(fields["scale"])  # type: ignore[arg-type]
        min_pivot = (
            summary.min_abs / scale if scale > 0 and math.isfinite(summary.min_abs) else (math.inf)
        )
        base: dict[str, object] = {"delayed": (), "max_delayed": 0, "growth": 1.0}
        return FactorizationStatus(
            **(base | fields),  # type: ignore[arg-type]
            inertia=summary.inertia,
            min_pivot=min_pivot,
        )


class InverseOperator(CurvatureOperator):
    """``(C + D)^-1`` of a `Factorization` as a symmetric operator: each product is one
    application of the factors refined against the true operator (S7), so products are
    exact to the arithmetic's floor. In the model's dtype (a float32 model's
    factorisation runs in float64 and answers in float32).

    Attributes:
        factorization: the `Factorization` it inverts.
        psd: whether ``(C + D)^-1`` is positive definite (``C + D`` has no negative
            eigenvalue, by its inertia).
    """

    name = "inverse"

    def __init__(self, factorization: Factorization, max_refine: int = 10) -> None:
        super().__init__(factorization.problem)
        self.factorization = factorization
        self.max_refine = max_refine
        self.psd = factorization.inertia().negative == 0

    @property
    def dtype(self) -> torch.dtype:
        return self.factorization._out_dtype

    def _matmat(self, V: Tensor) -> Tensor:
        f = self.factorization
        X, *_ = f._refine(V.to(f.status.dtype), None, self.max_refine)
        return X.to(self.dtype)

    def __repr__(self) -> str:
        f = self.factorization
        return (
            f"InverseOperator(({self.shape[0]}, {self.shape[1]}), {f.status.method}, "
            f"C + {f.damping_text}, dtype={self.dtype})"
        )
