"""The chain solver: exact ``(C + eps I)^-1 v``, ``log|det(C + eps I)|`` and inertia in
time linear in the number of stages, for ``C`` the Hessian or the Gauss-Newton matrix.

Math and names: docs/design/chain-curvature.md, whose equation numbers the comments
cite. The backward (Riccati) sweep (R1)-(R7) is block Gaussian elimination of
``C + eps I`` in the order ``x_L, ..., x_1`` with threshold pivoting and delayed pivots
(S1)-(S6, `hesse._chain_pivots`); the log-determinant and (Sylvester) the inertia come
from the pivots (L1, L2), and solves are refined against the true operator (S7). The
sweep knows no layer type: it sees stages only through `StageDerivatives` (their A, B
and G products, the blocks of Q, and a stage's own structured elimination where it has
one, e.g. a wide ``Linear`` stage's (W1)-(W4); `hesse._chain_stages`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from hesse._autodiff import products as _products
from hesse._autodiff.bishop import _flatten_sequential
from hesse._autodiff.problem import Problem, float64_problem
from hesse._chain.pivots import Elimination, SingularPivotError, StageElimination, SweepState
from hesse._chain.stages import LossStage, Stage, StageDerivatives, make_stage
from hesse._util.checks import check_curvature
from hesse._util.memory import check_memory
from hesse._util.progress import progress_bar

__all__ = [
    "Chain",
    "ChainFactorization",
    "FactorizationStatus",
    "InaccurateSolveError",
    "Inertia",
    "SingularPivotError",
    "SolveResult",
    "factorize",
]


class Inertia(NamedTuple):
    """Numbers of negative, zero and positive eigenvalues."""

    negative: int
    zero: int
    positive: int


# ----------------------------------------------------------------------------- the chain
class Chain:
    """A network as a chain of stages ``z_l = f_l(z_{l-1}; x_l)`` ending in its loss.

    Build one with `Chain.from_sequential` (an ``nn.Sequential``; nested Sequentials are
    flattened, each module becomes a stage) or `Chain.from_problem`, or declare the
    stages by hand: ``Chain([m1, m2, ...], loss_fn, data)`` makes each module one stage
    (a residual block, a convolution: any module that maps ``(n, ...)`` activations to
    ``(n, ...)`` activations). ``nn.Linear`` and element-wise activations get structured
    fast paths (a ``Linear`` stage with more parameters than activations, e.g. at a batch
    below its fan-in, never forms its ``p x p`` pivot); every other module goes through
    ``torch.func``, per sample when it treats samples independently.

    The batch is part of the activations, so all data is used as one batch (several
    batches are concatenated; the loss's reduction is honoured as in `Problem`).
    Memory grows with ``(n * width)^2`` per stage: the solver is for deep, narrow
    networks and moderate batches.
    """

    def __init__(
        self,
        stages: Sequence[nn.Module],
        loss_fn: Any,
        data: Any,
        params: Sequence[str | Tensor] | None = None,
        *,
        _generic: bool = False,
    ) -> None:
        if isinstance(stages, nn.Module):
            raise TypeError(
                "stages must be a list of modules; use Chain.from_sequential for an nn.Sequential"
            )
        model = nn.Sequential(*stages)
        self._init(
            Problem(model, loss_fn, data, params=params),
            [(str(i), m) for i, m in enumerate(stages)],
            _generic,
        )

    @classmethod
    def from_sequential(
        cls, model: nn.Module, loss_fn: Any, data: Any, params: Sequence[str | Tensor] | None = None
    ) -> Chain:
        """A chain from an ``nn.Sequential`` (nested Sequentials flattened)."""
        return cls.from_problem(Problem(model, loss_fn, data, params=params))

    @classmethod
    def from_problem(cls, problem: Problem, *, _generic: bool = False) -> Chain:
        """The chain of a `Problem` whose model is an ``nn.Sequential``."""
        if not isinstance(problem.model, nn.Sequential):
            raise ValueError(
                f"the chain solver needs an nn.Sequential model (or stages declared with "
                f"hesse.Chain([...])); got {type(problem.model).__name__}. For other "
                "models: hesse.solve(..., method='cg') solves, hesse.eigs finds extreme "
                "eigenvalues; exact log-determinants and counts need a chain."
            )
        self = cls.__new__(cls)
        self._init(problem, _flatten_sequential(problem.model), _generic)
        return self

    def _init(self, problem: Problem, modules: list[tuple[str, nn.Module]], generic: bool) -> None:
        self.problem = problem
        self._memory_estimate: int | None = None
        self._generic = generic
        selected = set(problem.names)
        self.stages: list[Stage] = [make_stage(n, m, selected, generic) for n, m in modules]
        order = [n for s in self.stages for n in s.param_names]
        if order != problem.names:
            raise ValueError(
                f"the chain's stages hold parameters {order}, but the problem selects "
                f"{problem.names}; every selected parameter must belong to exactly one stage"
            )
        # one batch: concatenate the problem's batches (tensor inputs only)
        xs, ys = [], []
        for inputs, targets, _w in problem.batches():
            if not isinstance(inputs, Tensor):
                raise TypeError(
                    f"the chain solver needs tensor inputs (n, ...); got {type(inputs).__name__}"
                )
            xs.append(inputs)
            ys.append(targets)
        self.inputs = torch.cat(xs) if len(xs) > 1 else xs[0]
        if all(isinstance(y, Tensor) for y in ys):
            self.targets: Any = torch.cat(ys) if len(ys) > 1 else ys[0]
        elif all(y is None for y in ys):
            self.targets = None
        else:
            raise TypeError("targets must all be tensors or all None")
        self.loss_stage = LossStage(problem.loss_fn, self.targets)
        offsets, perms, start = [], [], 0
        for s in self.stages:
            offsets.append(slice(start, start + s.num_params))
            perms.append(start + (torch.arange(s.num_params) if s.perm is None else s.perm))
            start += s.num_params
        self._blocks = offsets
        # x_internal = x[perm] over all stages (each stage's internal order, see Stage.perm)
        perm = torch.cat(perms) if perms else torch.zeros(0, dtype=torch.long)
        self._perm = None if bool((perm == torch.arange(len(perm))).all()) else perm

    @property
    def num_params(self) -> int:
        return self.problem.num_params

    def __len__(self) -> int:
        return len(self.stages) + 1

    def __repr__(self) -> str:
        kinds = ", ".join(s.describe() for s in self.stages)
        return f"Chain([{kinds}], loss, n={self.inputs.shape[0]}, P={self.num_params})"

    def memory_estimate(self) -> int:
        """Bytes a sweep needs at its peak, from the stages' sizes (one forward pass
        without gradients): the factors every stage keeps (its pivot's factor, ``n_u^2``,
        and its coupling, ``n_u a_in``, with ``n_u = min(p, a_out)`` for a wide ``Linear``
        stage) plus the largest stage's transient blocks (``S``, ``Q_zz``, ``Q_xx``,
        ``Q_xz`` and the products that form them) and the loss stage's Hessian (built
        from ``a_L`` unit vectors). Delayed directions, which depend on the values, add
        ``m (m + a)`` a stage; the estimate assumes none (the GGN never delays). Sizes
        only: computed once a chain (bisection sweeps the same chain many times)."""
        if self._memory_estimate is None:
            self._memory_estimate = self._estimate_memory()
        return self._memory_estimate

    def _estimate_memory(self) -> int:
        n = self.inputs.shape[0]
        itemsize = torch.empty((), dtype=self.inputs.dtype).element_size()
        z = self.inputs.detach()
        stored, transient = 0, 0
        with torch.no_grad():
            for index, stage in enumerate(self.stages):
                # the first stage has no state (dz_0 = 0): no coupling, no Q_zz
                a_in = z.numel() if index > 0 else 0
                z = stage.forward(z.clone())
                a_out, p = z.numel(), stage.num_params
                if p == 0:
                    transient = max(transient, 2 * a_out * a_out + 2 * a_in * a_in)
                    continue
                n_u = stage.pivot_size(a_out)
                wide = n_u < p
                stored += n_u * n_u + n_u * a_in + (p * n // max(a_out, 1) if wide else 0)
                blocks = a_out * a_out + 2 * a_in * a_in + a_out * a_in
                blocks += 2 * n_u * a_in + (0 if wide else 2 * p * p + a_out * p)
                transient = max(transient, blocks)
        a_L = z.numel()
        transient = max(transient, 3 * a_L * a_L)  # the loss Hessian: eye, grads, result
        return itemsize * (stored + transient)

    # ------------------------------------------------------------------------- passes
    def _forward_backward(self) -> tuple[list[Tensor], list[Tensor]]:
        """Stage inputs ``z_0..z_{L-1}`` and output adjoints ``lam_1..lam_L`` (one forward
        pass and one backward pass for all adjoints, ``lam_{l-1} = A_l^T lam_l``)."""
        n = self.inputs.shape[0]
        z = self.inputs.detach()
        ins: list[Tensor] = []
        with torch.enable_grad():
            for stage in [*self.stages, self.loss_stage]:
                if ins and not z.requires_grad:  # e.g. a stage without parameters first
                    z = z.detach().requires_grad_(True)
                ins.append(z)
                # a clone: an in-place activation (ReLU(inplace=True)) must not write
                # into the stage input kept for the derivatives (nor into a leaf)
                out = stage.forward(z.clone())
                if stage is not self.loss_stage and (
                    not isinstance(out, Tensor) or out.ndim == 0 or out.shape[0] != n
                ):
                    shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                    raise ValueError(
                        f"stage {stage.name!r} ({stage.describe()}) maps a batch of {n} to "
                        f"{shape}; the chain solver needs every stage to keep the samples "
                        "along dim 0"
                    )
                z = out
            one = torch.ones((), dtype=self.inputs.dtype, device=self.inputs.device)
            if out.requires_grad and len(ins) > 1:
                lams = torch.autograd.grad(
                    out, ins[1:], one, allow_unused=True, materialize_grads=True
                )
            else:
                lams = tuple(torch.zeros_like(t) for t in ins[1:])
        return [t.detach() for t in ins], [*(lam.detach() for lam in lams), one]


# ----------------------------------------------------------------------------- factorisation
class FactorizationStatus(NamedTuple):
    """What the sweep did and how far its answers can be trusted (data, not warnings).

    Attributes:
        kinds: each stage's elimination (``"cholesky"``, ``"ldl"``, ``"eigen"``,
            ``"wide"``, ``"none"`` for a stage without pivots), first stage first.
        delayed: the number of pivot directions each stage handed on to the one
            before it (the delayed front); 0 everywhere when no pivoting was needed.
        max_delayed: the largest delayed front.
        growth: the largest Schur update's entry over the largest entry of its stage's
            matrix (at most ``1 / TAU = 10`` by the threshold test; a positive definite
            ``C + eps I`` gives at most 1).
        scale: the largest entry of the stages' pivot blocks, an estimate of
            ``||C + eps I||`` from below.
        zero_tol: pivots of magnitude at most this count as zero
            (``rank_rtol * scale``).
        inertia: ``(negative, zero, positive)`` of ``C + eps I``.
        min_pivot: the smallest pivot magnitude over ``scale`` (a reciprocal condition
            indicator: ``C + eps I`` is within ``min_pivot * scale * growth`` of a
            singular matrix).
        dtype: the dtype the sweep ran in (float64 for a promoted float32 model).
    """

    kinds: tuple[str, ...]
    delayed: tuple[int, ...]
    max_delayed: int
    growth: float
    scale: float
    zero_tol: float
    inertia: Inertia
    min_pivot: float
    dtype: torch.dtype


class SolveResult(NamedTuple):
    """`ChainFactorization.solve_ex`'s answer (lineax's ``Solution``, torch's ``_ex``).

    Attributes:
        x: the solution, shaped like the right-hand side.
        residual: ``max_j ||(C + eps I) x_j - v_j|| / ||v_j||`` over the columns,
            measured with products of the true operator (``nan`` when not measured).
        backward_error: ``max_j ||r_j|| / (scale ||x_j|| + ||v_j||)``: the relative
            perturbation of ``C + eps I`` and ``v`` that ``x`` solves exactly; float64
            can reach about ``1e-16`` times a small factor, whatever the conditioning.
        refinement_steps: iterative-refinement steps taken.
        converged: whether ``rtol`` was met (or, with ``rtol=None``, the backward error
            reached the rounding level).
    """

    x: Tensor | list[Tensor]
    residual: float
    backward_error: float
    refinement_steps: int
    converged: bool


class InaccurateSolveError(ArithmeticError):
    """The requested accuracy could not be reached; the message says what was."""


@dataclass
class _StageFactor:
    stage: Stage
    d: StageDerivatives
    m_in: int  # delayed directions entering this stage's pivot (from the stage after it)
    elim: StageElimination | None  # None: a pass-through stage (no pivot variables)

    @property
    def kind(self) -> str:
        return "none" if self.elim is None else self.elim.kind


class ChainFactorization:
    """The backward sweep of a `Chain` for ``C + eps I``, done once; cheap ``solve``,
    ``logdet`` and ``inertia`` afterwards (lineax's init/compute split). Every result is
    fixed when the sweep ends: no method changes what another returns.

    The sweep is block Gaussian elimination of ``C + eps I`` in the order
    ``x_L, ..., x_1`` with threshold pivoting and delayed pivots (design note, "Stable
    elimination"): stable on symmetric indefinite chains, exact inertia with zeros
    counted under a rank tolerance, and ``status`` reports what it did.

    Attributes:
        damping: ``eps`` of ``C + eps I``.
        curvature: ``"hessian"`` or ``"ggn"``.
        num_params: ``P``.
        status: a `FactorizationStatus`.
    """

    def __init__(
        self,
        chain: Chain,
        damping: float,
        curvature: str,
        progress: bool | None = None,
        rank_rtol: float | None = None,
    ) -> None:
        self.chain, self.damping, self.curvature = chain, float(damping), curvature
        self.num_params = P = chain.num_params
        dtype = chain.inputs.dtype
        self._out_dtype = chain.problem.dtype
        self.rank_rtol = (
            10.0 * max(P, 1) * torch.finfo(dtype).eps if rank_rtol is None else float(rank_rtol)
        )
        gn = curvature == "ggn"
        zs, lams = chain._forward_backward()
        stages = chain.stages
        # the loss stage: S_L = 0, so S_{L-1} = Q_zz = the loss Hessian
        loss_d = chain.loss_stage.derivatives(zs[-1], lams[-1])
        S_L = torch.zeros(1, 1, dtype=dtype, device=chain.inputs.device)
        state = SweepState(loss_d.q_blocks(S_L, gn, True)[0])
        scale, growth = 0.0, 0.0
        factors: list[_StageFactor] = []
        bar = progress_bar(
            len(stages), "chain sweep", progress, unit="stage", delay=1.0 if progress is None else 0
        )
        for l_ in range(len(stages) - 1, -1, -1):
            bar.update()
            stage = stages[l_]
            d = stage.derivatives(zs[l_], lams[l_])
            need_z = l_ > 0  # dz_0 = 0: the first stage needs no Q_xz or S_0
            tol = self.rank_rtol * scale
            # a stage with structure eliminates its own pivot variables (a wide Linear
            # stage: W1-W4); otherwise the sweep forms its blocks (R1-R3) and eliminates
            m_in = state.m  # delayed directions carried into this stage
            elim = d.eliminate(state, self.damping, gn, need_z, tol, stage.name)
            if elim is not None:
                state = elim.take_state()
            else:
                elim, state = self._stage(d, state, gn, need_z, tol, stage.name)
            if elim is not None:
                scale = max(scale, elim.scale)
                growth = max(growth, elim.growth / max(elim.ref, 1e-300))
            factors.append(_StageFactor(stage, d, m_in, elim))
        bar.close()
        factors.reverse()
        self._factors = factors
        self.status = self._summarise(scale, growth, dtype)

    def _stage(
        self,
        d: StageDerivatives,
        state: SweepState,
        gn: bool,
        need_z: bool,
        tol: float,
        name: str,
    ) -> tuple[Elimination | None, SweepState]:
        """One stage of the sweep over ``u = [x_l; d_l]`` (design note (S1)): the blocks
        of ``Q`` from the stage's products, the delayed directions' rows from
        ``S_dz``, then a stable elimination. Returns the elimination (``None``: the stage
        passes the state on) and the state for the stage before."""
        S, S_dz, S_dd = state
        m = state.m
        Q_zz, Q_xx, Q_xz = d.q_blocks(S, gn, need_z)
        p = d.p
        if p > 0:
            Q_xx.diagonal().add_(self.damping)  # (R2): Q_xx = G_xx + eps I + B^T S B
        Q_dz = None
        if m:
            Q_dz = d.At(S_dz.T).T if need_z else None  # S_dz A
        if p == 0 and (need_z or m == 0):  # no pivot here: pass the state on
            return None, SweepState(Q_zz, Q_dz, S_dd)
        if m and p:  # (S1): u = [x; d]
            Q_dx = d.Bt(S_dz.T).T  # S_dz B
            Q_uu = torch.cat([torch.cat([Q_xx, Q_dx.T], 1), torch.cat([Q_dx, S_dd], 1)])
            Q_uz = torch.cat([Q_xz, Q_dz]) if need_z else None
        elif m:  # the first stage has no parameters: the delayed directions alone
            Q_uu, Q_uz = S_dd, None
        else:
            Q_uu, Q_uz = Q_xx, Q_xz
        elim = Elimination(Q_uu, Q_uz, Q_zz if need_z else None, tol, name)
        return elim, elim.take_state()

    def _summarise(self, scale: float, growth: float, dtype: torch.dtype) -> FactorizationStatus:
        """Inertia, log-determinant and the status from the pivots (Sylvester's law over
        an orthogonal change of variables: design note (S6))."""
        pivs: list[Tensor] = []
        extra = 0  # pivots equal to eps (wide stages' complements), this many
        for f in self._factors:
            if f.elim is not None:
                pivs.append(f.elim.pivots)
                extra += f.elim.eps_pivots
        piv = torch.cat(pivs).double().cpu() if pivs else torch.zeros(0, dtype=torch.float64)
        eps = self.damping
        if extra:
            piv = torch.cat([piv, torch.full((1,), eps, dtype=torch.float64)])
        mult = torch.ones(len(piv), dtype=torch.float64)
        if extra:
            mult[-1] = extra
        zero_tol = self.rank_rtol * scale
        neg = int(mult[piv < -zero_tol].sum())
        zero = int(mult[piv.abs() <= zero_tol].sum())
        pos = int(mult[piv > zero_tol].sum())
        if zero:
            self._logdet = (0.0, -math.inf)
        else:
            self._logdet = ((-1.0) ** neg, float((mult * piv.abs().log()).sum()))
        min_pivot = float(piv.abs().min()) / scale if len(piv) and scale > 0 else math.inf
        delayed = (0, *(f.m_in for f in self._factors[:-1]))
        return FactorizationStatus(
            kinds=tuple(f.kind for f in self._factors),
            delayed=delayed,
            max_delayed=max(delayed),
            growth=growth,
            scale=scale,
            zero_tol=zero_tol,
            inertia=Inertia(neg, zero, pos),
            min_pivot=min_pivot,
            dtype=dtype,
        )

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
            max_refine: at most this many steps of iterative refinement (each one sweep
                and one product with the true operator); 0 measures nothing.

        Raises:
            SingularPivotError: ``C + eps I`` is singular (its near-null space's
                dimension is in the message).
            InaccurateSolveError: ``rtol`` was not reached (or, with ``rtol=None``, the
                backward error stayed above ``1e-10``); the message says what was.

        Cost: one backward and one forward pass over the stages per sweep,
        ``O(sum_l (a_l + p_l + m_l)^2 k)`` for ``m_l`` delayed directions.
        `solve_ex` returns the residual and the refinement steps too.
        """
        res = self.solve_ex(v, rtol=rtol, max_refine=max_refine)
        if not res.converged and max_refine > 0:
            floor = _backward_floor(self.num_params, self.status.dtype)
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
                f"C + eps I is singular (eps = {self.damping:g}): the sweep found a near-null "
                f"space of dimension {zero} (pivots below {self.status.zero_tol:.1e} = "
                f"rank_rtol {self.rank_rtol:.1e} x scale {self.status.scale:.2e}); increase "
                "the damping eps"
            )
        prob = self.chain.problem
        as_list = isinstance(v, (list, tuple))
        V = prob.as_flat(v, "v")
        if not bool(torch.isfinite(V).all()):
            raise ValueError("v has non-finite entries (nan or inf)")
        vec = V.ndim == 1
        V = V.unsqueeze(1) if vec else V
        X = self._sweep_solve(V)
        res = be = math.nan
        steps, converged = 0, False
        if max_refine > 0:
            floor = _backward_floor(self.num_params, self.status.dtype)
            tiny = torch.finfo(V.dtype).tiny
            vn = torch.linalg.vector_norm(V, dim=0).clamp_min(tiny)
            scale = self.status.scale
            best = None
            while True:
                R = V - self._operator(X)
                rn = torch.linalg.vector_norm(R, dim=0)
                res = float((rn / vn).max())
                xn = torch.linalg.vector_norm(X, dim=0)
                be = float((rn / (scale * xn + vn).clamp_min(tiny)).max())
                if best is not None and not res < best[0]:  # no better: keep the best
                    res, be, X = best[0], best[1], best[2]
                    break
                converged = res <= rtol if rtol is not None else be <= floor
                if converged or steps >= max_refine or (best is not None and res > 0.5 * best[0]):
                    break
                best = (res, be, X)
                X = X + self._sweep_solve(R)
                steps += 1
        X = X.squeeze(1) if vec else X
        X = X.to(self._out_dtype)
        out = [t.to(self._out_dtype) for t in prob.unflatten(X)] if as_list else X
        return SolveResult(out, res, be, steps, converged)

    def _operator(self, X: Tensor) -> Tensor:
        """``(C + eps I) X`` with the true operator's products (design note (S7))."""
        prob = self.chain.problem
        if self.curvature == "ggn":
            CX = _products.ggn_matmat(prob, X)
        else:
            CX = _products.hessian_matmat(prob, X)
        return CX + self.damping * X

    def _sweep_solve(self, V: Tensor) -> Tensor:
        """One backward and one forward sweep: ``(C + eps I)^-1 V`` for ``V`` ``(P, k)``
        in the problem's order, from the factors."""
        # minimise 1/2 dx^T (C + eps I) dx + r^T dx with r = -v (stages' internal orders)
        perm = self.chain._perm
        perm = None if perm is None else perm.to(V.device)
        R = -(V if perm is None else V[perm])
        r = [R[blk] for blk in self.chain._blocks]
        # backward sweep: s_L = 0 (the loss stage has no parameters and S_L = 0)
        s: Tensor | None = None
        s_d: Tensor | None = None  # the delayed directions' linear term
        ks: list[Tensor | None] = [None] * len(self._factors)
        for l_ in range(len(self._factors) - 1, -1, -1):
            f = self._factors[l_]
            need_z = l_ > 0
            q_z = f.d.At(s) if (s is not None and need_z) else None  # (R4): q_z = A^T s_l
            if f.elim is None:  # pass-through: s_d unchanged
                s = q_z
                continue
            parts = []
            if f.d.p > 0:
                parts.append(r[l_] + (f.d.Bt(s) if s is not None else 0.0))  # r_l + B^T s_l
            if f.m_in:
                parts.append(s_d)
            q_u = parts[0] if len(parts) == 1 else torch.cat(parts)
            ks[l_], corr, s_d = f.elim.backward(q_u)  # k_l and Q_zu k_l: (R5), (S5)
            if need_z:
                s = corr if q_z is None else (q_z if corr is None else q_z + corr)  # (R7)
        # forward sweep: dz_0 = 0, u_l = k_l + K_l dz_{l-1} (S6), dz_l = A dz + B dx
        dz: Tensor | None = None
        dval: Tensor | None = None  # the values of the directions this stage delayed
        out = torch.empty_like(V)
        for l_, (f, blk) in enumerate(zip(self._factors, self.chain._blocks, strict=True)):
            dx = None
            if f.elim is not None:
                u = f.elim.forward(ks[l_], dz, dval)
                p = f.d.p
                dx, dval = u[:p], (u[p:] if f.m_in else None)
                if p > 0:
                    out[blk] = dx
            if l_ + 1 < len(self._factors):
                nxt = f.d.A(dz) if dz is not None else None
                if dx is not None and f.d.p > 0:
                    bdx = f.d.B(dx)
                    nxt = bdx if nxt is None else nxt + bdx
                dz = nxt
        if perm is not None:
            internal, out = out, torch.empty_like(out)
            out[perm] = internal
        return out


def _backward_floor(P: int, dtype: torch.dtype) -> float:
    """The backward error that refinement in working precision aims at, ``sqrt(P) u``
    (design note (S7)); it stops earlier only when a step no longer halves the
    residual."""
    return math.sqrt(max(P, 1)) * torch.finfo(dtype).eps


def _as_chain(obj: Problem | Chain) -> Chain:
    if isinstance(obj, Chain):
        return obj
    if isinstance(obj, Problem):
        return Chain.from_problem(obj)
    raise TypeError(f"expected a hesse.Problem or hesse.Chain; got {type(obj).__name__}")


def _promoted(chain: Chain) -> Chain:
    """The same chain on a float64 copy of the model and data."""
    prob = chain.problem
    p64 = float64_problem(prob.model, prob.loss_fn, chain.inputs, chain.targets, prob.names)
    return Chain.from_problem(p64, _generic=chain._generic)


def factorize(
    problem_or_chain: Problem | Chain,
    damping: float = 0.0,
    curvature: str = "hessian",
    *,
    promote: bool = True,
    rank_rtol: float | None = None,
    progress: bool | None = None,
) -> ChainFactorization:
    """Run the backward sweep once for ``C + eps I`` (``C`` the Hessian or the GGN).

    Args:
        problem_or_chain: a `Chain`, or a `Problem` whose model is an ``nn.Sequential``.
        damping: ``eps`` (may be negative: ``eps = -sigma`` counts eigenvalues below
            ``sigma``).
        curvature: ``"hessian"`` or ``"ggn"``.
        promote: a model in another dtype than float64 (float32, bfloat16) is factored
            on a float64 copy (default; answers come back in the model's dtype);
            ``False`` runs in the model's dtype, with a warning: solves and counts then
            lose digits in proportion to the conditioning.
        rank_rtol: pivots at most ``rank_rtol * scale`` count as zero eigenvalues
            (default ``10 P u``, ``u`` the unit roundoff: numpy's ``matrix_rank``
            tolerance with a margin for the elimination's growth).
        progress: a bar over the stages (default: when stderr is a terminal and the
            sweep takes over a second).

    Returns:
        a `ChainFactorization` with ``.solve(v)``, ``.logdet()``, ``.inertia()`` and
        ``.status`` (pivot kinds, delayed directions, growth, inertia).

    Cost: time and memory linear in the number of stages, ``O(a^3 + p^3 + a p (a + p))``
    per stage for ``a`` activations (batch x width) and ``p`` parameters; a ``Linear``
    stage with ``p > a`` (batch below its fan-in) costs ``O(a^3 + a p)``. Pivots that
    fail the threshold test are delayed to the stage before (``m`` of them add ``m`` to
    that stage's pivot size; ``status.max_delayed``). Reference: design note
    ``docs/design/chain-curvature.md``; A. Rahimi, arXiv 2601.06096.
    """
    check_curvature(curvature)
    if not math.isfinite(float(damping)):
        raise ValueError(f"damping must be a finite number; got {damping}")
    if rank_rtol is not None and not (0 <= float(rank_rtol) < 1):
        raise ValueError(f"rank_rtol must be in [0, 1); got {rank_rtol}")
    chain = _as_chain(problem_or_chain)
    out_dtype = chain.problem.dtype
    if out_dtype != torch.float64:
        if promote:
            chain = _promoted(chain)
        else:
            warnings.warn(
                f"the chain solver runs in {out_dtype}; float64 is recommended for "
                "solves and log-determinants (promote=True, the default, computes in "
                "float64)",
                stacklevel=2,
            )
    check_memory(
        chain.memory_estimate(),
        f"the chain sweep ({chain.inputs.shape[0]} samples, P = {chain.num_params})",
        "its state is (samples x width)^2 a stage: use fewer samples (a curvature batch), "
        "or hesse.solve(..., method='cg') for solves without the exact factorisation",
        chain.inputs.device,
    )
    f = ChainFactorization(chain, damping, curvature, progress, rank_rtol)
    f._out_dtype = out_dtype
    return f
