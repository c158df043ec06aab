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

import torch
from torch import Tensor

from hesse._autodiff import products
from hesse._autodiff.problem import Problem
from hesse._linalg.results import (
    FactorizationStatus,
    InaccurateSolveError,
    Inertia,
    SingularPivotError,
    SolveResult,
)

__all__ = ["Factorization", "PivotSummary", "backward_floor"]


def backward_floor(P: int, dtype: torch.dtype) -> float:
    """The backward error that refinement in working precision aims at, ``sqrt(P) u``
    (design note (S7)); it stops earlier only when a step no longer halves the
    residual."""
    return math.sqrt(max(P, 1)) * torch.finfo(dtype).eps


class PivotSummary:
    """Inertia and log-determinant from pivots (Sylvester's law over a congruence, design
    note (L1), (L2)): ``pivots`` a 1-D tensor, plus ``eps_count`` further pivots equal to
    ``eps`` (directions on which ``C`` vanishes, never formed); pivots of magnitude at
    most ``zero_tol`` count as zero."""

    def __init__(self, pivots: Tensor, eps_count: int, eps: float, zero_tol: float) -> None:
        piv = pivots.double().cpu()
        mult = torch.ones(len(piv), dtype=torch.float64)
        if eps_count:
            piv = torch.cat([piv, torch.full((1,), eps, dtype=torch.float64)])
            mult = torch.cat([mult, torch.full((1,), float(eps_count), dtype=torch.float64)])
        neg = int(mult[piv < -zero_tol].sum())
        zero = int(mult[piv.abs() <= zero_tol].sum())
        pos = int(mult[piv > zero_tol].sum())
        self.inertia = Inertia(neg, zero, pos)
        if zero:
            self.logdet = (0.0, -math.inf)
        else:
            self.logdet = ((-1.0) ** neg, float((mult * piv.abs().log()).sum()))
        self.min_abs = float(piv.abs().min()) if len(piv) else math.inf


class Factorization(abc.ABC):
    """``C + eps I`` factored once (``C`` the Hessian or the GGN of a `Problem`); cheap
    ``solve``, ``logdet`` and ``inertia`` afterwards. Every result is fixed when the
    factorisation is built: no method changes what another returns.

    Subclasses (the engines) set ``problem`` (the problem they factor: a float64 copy
    for a promoted model), ``damping``, ``curvature``, ``num_params``, ``rank_rtol``,
    ``status`` and ``_logdet``, and implement `_apply_inverse`.

    Attributes:
        damping: ``eps`` of ``C + eps I``.
        curvature: ``"hessian"`` or ``"ggn"``.
        num_params: ``P``.
        status: a `FactorizationStatus` (``status.method`` names the engine).
    """

    problem: Problem
    damping: float
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
                f"C + eps I is singular (eps = {self.damping:g}): the {self.status.method} "
                f"factorisation found a near-null space of dimension {zero} (pivots below "
                f"{self.status.zero_tol:.1e} = rank_rtol {self.rank_rtol:.1e} x scale "
                f"{self.status.scale:.2e}); increase the damping eps"
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
        return CX + self.damping * X

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
