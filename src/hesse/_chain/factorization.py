"""The chain solver: exact ``(C + eps I)^-1 v``, ``log|det(C + eps I)|`` and inertia in
time linear in the number of stages, for ``C`` the Hessian or the Gauss-Newton matrix.

Math and names: docs/design/chain-curvature.md, whose equation numbers the comments
cite. The backward (Riccati) sweep (R1)-(R7) is block Gaussian elimination of
``C + eps I`` in the order ``x_L, ..., x_1`` with threshold pivoting and delayed pivots
(S1)-(S6, `hesse._factor.elimination`); the log-determinant and (Sylvester) the inertia come
from the pivots (L1, L2), and solves are refined against the true operator (S7). The
sweep knows no layer type: it sees stages only through `StageDerivatives` (their A, B
and G products, the blocks of Q, and a stage's own structured elimination where it has
one, e.g. a wide ``Linear`` stage's (W1)-(W5); `hesse._chain.stages`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from hesse._autodiff.problem import Problem, float64_problem
from hesse._chain.chain import Chain
from hesse._chain.stages import Stage, StageDerivatives
from hesse._factor.base import Factorization, PivotSummary
from hesse._factor.elimination import Elimination, StageContext, StageElimination, SweepState
from hesse._factor.results import FactorizationStatus
from hesse._util.progress import progress_bar

__all__ = ["ChainFactorization", "as_chain", "promoted"]


# ----------------------------------------------------------------------------- factorisation
EIGEN_CHOLESKIES = 20
"""The eigen tier's price in Cholesky factorisations of the same size (LAPACK's
``syevd`` with vectors: 17-20 from ``n = 200`` to ``3,000`` on this project's CPUs, and
the tiers tried before it), for the hand-over test (H1)."""


class FrontGrewError(ArithmeticError):
    """The sweep's delayed front outgrew its break-even against the dense engine
    (``handover``): the rest of the sweep would cost more than factoring densely."""


@dataclass
class _StageFactor:
    stage: Stage
    d: StageDerivatives
    m_in: int  # delayed directions entering this stage's pivot (from the stage after it)
    elim: StageElimination | None  # None: a pass-through stage (no pivot variables)

    @property
    def kind(self) -> str:
        return "none" if self.elim is None else self.elim.kind


class ChainFactorization(Factorization):
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

    Cost: time and memory linear in the number of stages, ``O(a^3 + p^3 + a p (a + p))``
    per stage for ``a`` activations (batch x width) and ``p`` parameters; a ``Linear``
    stage with ``p > a`` (batch below its fan-in) costs ``O(a^3 + a p)``. Pivots that
    fail the threshold test are delayed to the stage before (``m`` of them add ``m`` to
    that stage's pivot size; ``status.max_delayed``). Reference: design note
    ``docs/design/chain-curvature.md``; A. Rahimi, arXiv 2601.06096.
    """

    def __init__(
        self,
        chain: Chain,
        damping: float | Tensor,
        curvature: str,
        progress: bool | None = None,
        rank_rtol: float | None = None,
        *,
        linearisation: tuple[list[Tensor], list[Tensor]] | None = None,
        handover: float | None = None,
    ) -> None:
        self.chain, self.curvature = chain, curvature
        self.damping = damping if isinstance(damping, Tensor) else float(damping)
        self.problem = chain.problem
        self.num_params = P = chain.num_params
        dtype = chain.inputs.dtype
        self._out_dtype = chain.problem.dtype
        self.rank_rtol = (
            10.0 * max(P, 1) * torch.finfo(dtype).eps if rank_rtol is None else float(rank_rtol)
        )
        gn = curvature == "ggn"
        zs, lams = chain.forward_backward() if linearisation is None else linearisation
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
            eps = self._stage_damping(l_, dtype)
            elim = d.eliminate(StageContext(state, eps, gn, need_z, tol, stage.name))
            if elim is not None:
                state = elim.take_state()
            else:
                elim, state = self._stage(d, state, gn, need_z, tol, stage.name, eps)
            if elim is not None:
                scale = max(scale, elim.scale)
                growth = max(growth, elim.growth / max(elim.ref, 1e-300))
            factors.append(_StageFactor(stage, d, m_in, elim))
            if handover is not None and state.m and l_ > 0:
                self._check_front(state.m, l_, handover, bar)
        bar.close()
        factors.reverse()
        self._factors = factors
        self.status = self._summarise(scale, growth, dtype)

    def _check_front(self, m: int, left: int, dense_seconds: float, bar: object) -> None:
        """Raise `FrontGrewError` when the ``left`` stages still to go are predicted to
        cost more than the dense engine's whole ``dense_seconds`` (design note, (H1)):
        each stage ``j`` of them with a state eliminates its ``p_j`` parameters and the
        ``m`` delayed directions at the eigen tier's price (``EIGEN_CHOLESKIES``
        Cholesky factorisations of that size, at that size's rate); the first stage has
        no state to delay to, so its pivot is one Bunch-Kaufman factorisation."""
        from hesse._factor.cost import factor_rate

        chain = self.chain
        where, dtype = str(chain.inputs.device), chain.inputs.dtype
        rest = 0.0
        for j in range(left):
            n = chain.stages[j].num_params + m
            if j == 0:
                rest += n**3 / 3 / factor_rate(where, dtype, "ldl", n)
            else:
                rest += EIGEN_CHOLESKIES * n**3 / 3 / factor_rate(where, dtype, "chol", n)
        if rest > dense_seconds:
            bar.close()  # type: ignore[attr-defined]
            raise FrontGrewError(
                f"the delayed front reached {m} directions with {left} stages to go "
                f"(predicted {rest:.3g} s for the rest of the sweep, {dense_seconds:.3g} s "
                "for the dense engine)"
            )

    def _stage_damping(self, l_: int, dtype: torch.dtype) -> float | Tensor:
        """Stage ``l``'s part of ``D`` in its internal order: ``eps`` for ``C + eps I``
        or a ``D`` constant on the stage, else a tensor."""
        if not isinstance(self.damping, Tensor):
            return self.damping
        perm = self.chain.perm
        d = self.damping if perm is None else self.damping[perm.to(self.damping.device)]
        part = d[self.chain.blocks[l_]].to(dtype=dtype, device=self.chain.inputs.device)
        if part.numel() == 0 or bool((part == part[0]).all()):
            return float(part[0]) if part.numel() else 0.0
        return part

    def _stage(
        self,
        d: StageDerivatives,
        state: SweepState,
        gn: bool,
        need_z: bool,
        tol: float,
        name: str,
        eps: float | Tensor,
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
            Q_xx.diagonal().add_(eps)  # (R2): Q_xx = G_xx + D_l + B^T S B
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
        # where delayed directions join the stage's parameters, those may go first (S8)
        lead = p if (m and need_z) else 0
        elim = Elimination(Q_uu, Q_uz, Q_zz if need_z else None, tol, name, lead=lead)
        return elim, elim.take_state()

    def _summarise(self, scale: float, growth: float, dtype: torch.dtype) -> FactorizationStatus:
        """Inertia, log-determinant and the status from the pivots (Sylvester's law over
        an orthogonal change of variables: design note (S6))."""
        elims = [f.elim for f in self._factors if f.elim is not None]
        piv = torch.cat([e.pivots.double().cpu() for e in elims]) if elims else torch.zeros(0)
        # pivots equal to the stage's eps (wide complements), never formed
        extras = [(e.eps, e.eps_pivots) for e in elims if e.eps_pivots]
        zero_tol = self.rank_rtol * scale
        delayed = (0, *(f.m_in for f in self._factors[:-1]))
        return self._status(
            PivotSummary(piv, zero_tol, extras),
            kinds=tuple(f.kind for f in self._factors),
            delayed=delayed,
            max_delayed=max(delayed),
            growth=growth,
            scale=scale,
            zero_tol=zero_tol,
            dtype=dtype,
            method="chain",
        )

    def _apply_inverse(self, V: Tensor) -> Tensor:
        """One backward and one forward sweep: ``(C + eps I)^-1 V`` for ``V`` ``(P, k)``
        in the problem's order, from the factors."""
        # minimise 1/2 dx^T (C + eps I) dx + r^T dx with r = -v (stages' internal orders)
        perm = self.chain.perm
        perm = None if perm is None else perm.to(V.device)
        R = -(V if perm is None else V[perm])
        r = [R[blk] for blk in self.chain.blocks]
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
        for l_, (f, blk) in enumerate(zip(self._factors, self.chain.blocks, strict=True)):
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


def as_chain(obj: Problem | Chain) -> Chain:
    """``obj`` itself, or the chain of a `Problem` whose model is an ``nn.Sequential``."""
    if isinstance(obj, Chain):
        return obj
    if isinstance(obj, Problem):
        return Chain.from_problem(obj)
    raise TypeError(f"expected a hesse.Problem or hesse.Chain; got {type(obj).__name__}")


def promoted(chain: Chain) -> Chain:
    """The same chain on a float64 copy of the model and data."""
    prob = chain.problem
    p64 = float64_problem(prob.model, prob.loss_fn, chain.inputs, chain.targets, prob.names)
    return Chain.from_problem(p64, generic=chain.generic)
