"""The chain solver: exact ``(C + eps I)^-1 v``, ``log|det(C + eps I)|`` and inertia in
time linear in the number of stages, for ``C`` the Hessian or the Gauss-Newton matrix.

Math and names: ../shared/design/chain-curvature.md. The backward (Riccati) sweep is
block Gaussian elimination of ``C + eps I`` in the order ``x_L, ..., x_1``; its pivots
are the ``Q_xx`` of the stages, so the log-determinant is the sum of the pivots'
log-determinants and (Sylvester) the inertia is the sum of their inertias. The sweep
sees stages only through their A, B and G products (`hesse._chain_stages`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from hesse._bishop import _flatten_sequential
from hesse._chain_stages import LossStage, Stage, StageDerivatives, _LinearDerivs, make_stage
from hesse._operators import check_curvature
from hesse._problem import Problem, float64_problem
from hesse._progress import progress_bar

__all__ = ["Chain", "ChainFactorization", "Inertia", "SingularPivotError", "factorize"]


class SingularPivotError(ValueError):
    """A pivot ``Q_xx`` of the sweep is singular: ``C + eps I`` is singular or the
    elimination order breaks down at that stage; more damping helps."""


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
                f"hesse.Chain([...])); got {type(problem.model).__name__}. Use method='cg' "
                "for models that are not chains."
            )
        self = cls.__new__(cls)
        self._init(problem, _flatten_sequential(problem.model), _generic)
        return self

    def _init(self, problem: Problem, modules: list[tuple[str, nn.Module]], generic: bool) -> None:
        self.problem = problem
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
                out = stage.forward(z)
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


# ----------------------------------------------------------------------------- pivots
class _Pivot:
    """One stage's pivot ``Q_xx``, factored once.

    Positive definite pivots (the GGN with ``eps > 0``, and often the Hessian's stages too:
    Cholesky is tried first, a failed attempt costs a fraction of a factorisation) use
    Cholesky ``L L^T``;
    the Schur update is then ``W = L^-1 Q_xz``, ``S -= W^T W`` (design note: half the
    flops of ``Q_zx Q_xx^-1 Q_xz``, and ``S`` stays symmetric). Indefinite pivots use
    LU with partial pivoting for the solves (BLAS-3 triangular solves; LAPACK's
    symmetric-indefinite solve is BLAS-2 and several times slower) and read
    ``log|det|`` and its sign off ``U``; the inertia comes from a Bunch-Kaufman
    ``LDL^T`` (``torch.linalg.ldl_factor``), computed when first asked for.
    """

    def __init__(self, Q: Tensor, stage: str) -> None:
        p = Q.shape[0]
        self.Q: Tensor | None = Q
        self.stage, self.p = stage, p
        self._inertia: Inertia | None = None
        eps = torch.finfo(Q.dtype).eps
        # Cholesky first (it reads the lower triangle) unless a diagonal entry is not
        # positive: a failed attempt costs a fraction of a factorisation. For a positive
        # definite Q, max |Q_ij| is on the diagonal.
        if p == 0 or float(torch.diagonal(Q).min()) > 0:
            L, info = torch.linalg.cholesky_ex(Q)
            d = torch.diagonal(L) ** 2
            dmin = float(d.min()) if p else math.inf
            self.scale = float(torch.diagonal(Q).max()) if p else 0.0
            self.tol = max(p, 1) * eps * self.scale
            if int(info) == 0 and dmin > self.tol:  # Q is no longer needed: inertia known
                self.kind, self.L, self.Q = "cholesky", L, None
                self.sign, self.logabs = 1.0, float(torch.log(d).sum())
                self._inertia = Inertia(0, 0, p)
                self._check(dmin)
                return
        Q = self.Q = 0.5 * (Q + Q.T)
        self.scale = float(Q.abs().max()) if p else 0.0
        self.tol = max(p, 1) * eps * self.scale
        self.kind = "lu"
        self.LU, self.piv, _ = torch.linalg.lu_factor_ex(Q)
        u = torch.diagonal(self.LU)
        swaps = int(
            (self.piv != torch.arange(1, p + 1, device=Q.device, dtype=self.piv.dtype)).sum()
        )
        self.sign = float(torch.prod(torch.sign(u))) * (-1.0) ** swaps
        self.logabs = float(torch.log(u.abs()).sum())
        self._check(float(u.abs().min()) if p else math.inf)

    def _check(self, smallest: float) -> None:
        """Flags from the smallest pivot magnitude (Cholesky's ``d`` or LU's ``|u|``)."""
        self.singular = smallest <= self.tol
        self.near_singular = self.singular or (self.scale > 0 and smallest < 1e-10 * self.scale)
        if self.near_singular and not self.singular:
            warnings.warn(
                f"the pivot of stage {self.stage!r} is nearly singular (smallest "
                f"{smallest:.2e} against scale {self.scale:.2e}); the solve may be "
                "inaccurate: increase the damping",
                stacklevel=5,
            )

    @property
    def inertia(self) -> Inertia:
        if self._inertia is None:
            LD, piv, _ = torch.linalg.ldl_factor_ex(self.Q)
            evs = _block_eigenvalues(LD, piv)
            tol = self.tol
            self._inertia = Inertia(
                int((evs < -tol).sum()), int((evs.abs() <= tol).sum()), int((evs > tol).sum())
            )
            if evs.numel():  # trust the symmetric factor's view of near-singularity too
                small = float(evs.abs().min())
                self.singular = self.singular or small <= tol
                self.near_singular = self.near_singular or small < 1e-10 * self.scale
        return self._inertia

    def _raise_if_singular(self) -> None:
        if self.singular:
            raise SingularPivotError(
                f"the pivot Q_xx of stage {self.stage!r} is singular: C + eps I is singular "
                "(or nearly so) there; increase the damping eps"
            )

    def eliminate(self, Q_zz: Tensor, Q_xz: Tensor) -> tuple[Tensor, Tensor]:
        """The Schur complement ``S_{l-1} = Q_zz - Q_zx Q_xx^-1 Q_xz`` and what the
        sweeps keep of ``K_l = -Q_xx^-1 Q_xz``: ``W = L^-1 Q_xz`` (Cholesky) or ``K``."""
        self._raise_if_singular()
        # S is symmetric up to rounding; the next pivots read one triangle (Cholesky)
        # or are symmetrised (LU), so it is not symmetrised here
        if self.kind == "cholesky":
            W = torch.linalg.solve_triangular(self.L, Q_xz, upper=False)
            return torch.addmm(Q_zz, W.T, W, alpha=-1.0), W
        K = -torch.linalg.lu_solve(self.LU, self.piv, Q_xz)
        return torch.addmm(Q_zz, Q_xz.T, K), K

    def backward(self, store: Tensor | None, q: Tensor) -> tuple[Tensor, Tensor | None]:
        """The backward sweep's step: ``k_l = -Q_xx^-1 q`` and ``Q_zx k_l = K_l^T q``
        (``None`` without ``store``: the first stage). Cholesky shares ``L^-1 q``."""
        self._raise_if_singular()
        if self.kind == "cholesky":
            y = torch.linalg.solve_triangular(self.L, q, upper=False)
            k = -torch.linalg.solve_triangular(self.L.T, y, upper=True)
            return k, (None if store is None else -(store.T @ y))
        k = -torch.linalg.lu_solve(self.LU, self.piv, q)
        return k, (None if store is None else store.T @ q)

    def K_times(self, store: Tensor, dz: Tensor) -> Tensor:
        """``K_l dz``."""
        if self.kind == "cholesky":  # K = -L^-T W
            return -torch.linalg.solve_triangular(self.L.T, store @ dz, upper=True)
        return store @ dz


class _WidePivot:
    """The pivot of a wide ``Linear`` stage, ``Q_xx = eps I_p + B^T S B`` with more
    parameters ``p = o J`` than activations ``a = n o`` (``J > n``), never formed (design
    note, "Wide stages"). With the thin QR ``Zhat^T = Q_z R_z``,
    ``B^T = (Q_z (x) I_o)(R_z (x) I_o)``, so in the orthonormal basis
    ``[Q_z, Q_z^perp] (x) I_o`` of the parameters the pivot is block diagonal:
    ``Q_uu = eps I + (R_z (x) I) S (R_z^T (x) I)`` (``a x a``, factored by `_Pivot`) on the
    range of ``B^T`` and ``eps I`` on its complement (``G_xx = 0`` for a linear stage).
    Hence

    - ``Q_xx^-1 r = Q (Q_uu^-1 Q^T r) + (r - Q Q^T r) / eps`` (no cancellation);
    - ``log|det Q_xx| = log|det Q_uu| + (p - a) log|eps|``;
    - inertia: that of ``Q_uu``, plus ``p - a`` copies of ``sign(eps)``;
    - the Schur update splits the same way: with ``Q_uz = (R_z (x) I) S A + Q^T G_xz``,
      ``S_{l-1} = A^T S A - Q_uz^T Q_uu^-1 Q_uz - G_xz^T P G_xz / eps``, where
      ``P = (I - Q_z Q_z^T) (x) I_o`` and ``G_xz^T P G_xz = (lam lam^T) (x) P_z`` is a
      Kronecker product: only the ``a x a`` pivot costs cubic time.

    Memory ``O(a^2 + a_in a + n p)`` instead of ``O(p^2 + p a_in)``. The orthogonal change
    of basis keeps the elimination as stable as the plain one, for any ``Zhat``.
    """

    kind = "wide"

    def __init__(
        self,
        d: _LinearDerivs,
        S: Tensor,
        eps: float,
        stage: str,
        gauss_newton: bool = False,
        need_z: bool = False,
    ) -> None:
        self.d, self.eps, self.stage = d, float(eps), stage
        self.p = d.p
        n, o, a = d.n, d.o, d.a_out
        self.extra = self.p - a  # eigenvalue eps, this many times
        if self.eps == 0 and self.extra > 0:
            raise SingularPivotError(
                f"the pivot Q_xx of stage {stage!r} is singular: the stage has more "
                "parameters than activations, so C + eps I needs eps != 0 there; increase "
                "the damping eps"
            )
        self.Qz, Rz = torch.linalg.qr(d.zhat.T)  # (J, n), (n, n)
        # (R (x) I) S [(r, o), (m, q)], then the same on the right (a batched product)
        RS = (Rz @ S.reshape(n, o * a)).view(a, n, o)
        small = torch.bmm(Rz.expand(a, n, n), RS).view(a, a)
        small.diagonal().add_(self.eps)
        self.small = _Pivot(small, stage)
        sgn = 1.0 if self.eps > 0 else -1.0
        self.sign = self.small.sign * sgn**self.extra
        self.logabs = self.small.logabs + (
            self.extra * math.log(abs(self.eps)) if self.extra else 0.0
        )
        self.singular = self.small.singular
        self.near_singular = self.small.near_singular
        if self.extra and not self.near_singular:  # the eigenvalue eps of the complement
            self.small._check(min(abs(self.eps), self.small.scale))
            self.singular, self.near_singular = self.small.singular, self.small.near_singular
        self.schur: Tensor | None = None
        self.store: Tensor | None = None
        self._Pz: Tensor | None = None
        self._PG: Tensor | None = None
        if need_z:
            a_in, i = d.a_in, d.i
            SA = (S.reshape(a * n, o) @ d.W).view(n, o, a_in)  # S A
            Q_uz = (Rz @ SA.view(n, o * a_in)).view(a, a_in)
            Q_zz = torch.bmm(d.W.T.expand(n, i, o), SA).view(a_in, a_in)  # A^T S A
            # G_xz[(j, o), (m, k)] = lam[m, o] delta_jk (the Hessian only); J >= i: every
            # input has its row j = i in [W | b]
            if not gauss_newton:
                # Q^T G_xz[(r, o), (m, i)] = Q_z[i, r] lam[m, o]
                Q_uz.view(n, o, n, i).addcmul_(
                    self.Qz[:i].T.reshape(n, 1, 1, i), d.lam.T.reshape(1, o, n, 1)
                )
                if self.extra:  # the complement: P = (I - Q_z Q_z^T) (x) I_o
                    Pz = -(self.Qz @ self.Qz[:i].T)  # (J, i)
                    Pz[:i].diagonal().add_(1.0)
                    self._Pz = Pz  # for P G_xz, built when a solve first needs it
                    # - G_xz^T P G_xz / eps = - (lam lam^T) (x) Pz[:i] / eps
                    Q_zz.view(n, i, n, i).addcmul_(
                        (d.lam @ d.lam.T).view(n, 1, n, 1),
                        Pz[:i].view(1, i, 1, i),
                        value=-1 / self.eps,
                    )
            self.schur, self.store = self.small.eliminate(Q_zz, Q_uz)

    @property
    def PG(self) -> Tensor | None:
        """``P G_xz / eps`` (``p x a_in``; ``None`` without a complement or ``G``):
        ``PG[(j, o), (m, i)] = Pz[j, i] lam[m, o] / eps``."""
        if self._PG is None and self._Pz is not None:
            d, Pz = self.d, self._Pz
            self._PG = Pz.new_empty(self.p, d.a_in)
            torch.mul(
                Pz.view(d.J, 1, 1, d.i),
                (d.lam.T / self.eps).reshape(1, d.o, d.n, 1),
                out=self._PG.view(d.J, d.o, d.n, d.i),
            )
        return self._PG

    @property
    def inertia(self) -> Inertia:
        i = self.small.inertia
        self.singular = self.singular or self.small.singular
        self.near_singular = self.near_singular or self.small.near_singular
        if self.eps > 0:
            return Inertia(i.negative, i.zero, i.positive + self.extra)
        return Inertia(i.negative + self.extra, i.zero, i.positive)

    # the parameter space in the stage's internal layout (j, o), columns k
    def _to_u(self, R: Tensor) -> Tensor:  # Q^T r: (p, k) -> (a, k)
        k = R.shape[1]
        return (self.Qz.T @ R.reshape(self.d.J, -1)).view(-1, k)

    def _from_u(self, U: Tensor) -> Tensor:  # Q u: (a, k) -> (p, k)
        k = U.shape[1]
        return (self.Qz @ U.reshape(self.d.n, -1)).view(-1, k)

    def backward(self, store: Tensor | None, q: Tensor) -> tuple[Tensor, Tensor | None]:
        """``k_l = -Q_xx^-1 q`` and ``K_l^T q = -Q_zx Q_xx^-1 q``: the range part through
        ``Q_uu``; on the complement ``Q_xx = eps I`` and ``Q_zx = G_xz^T`` (``B``
        vanishes there)."""
        qu = self._to_u(q)
        perp = q - self._from_u(qu)
        ku, corr = self.small.backward(store, qu)
        k = self._from_u(ku) - perp / self.eps
        PG = self.PG
        if corr is not None and PG is not None:  # G_xz^T P q / eps
            corr = corr - PG.T @ q
        return k, corr

    def K_times(self, store: Tensor, dz: Tensor) -> Tensor:
        """``K_l dz = -Q_xx^-1 Q_xz dz``."""
        out = self._from_u(self.small.K_times(store, dz))
        PG = self.PG
        return out if PG is None else out - PG @ dz


def _block_eigenvalues(LD: Tensor, piv: Tensor) -> Tensor:
    """Eigenvalues of the 1x1 and 2x2 blocks of the ``D`` of a Bunch-Kaufman factor
    (LAPACK ``sytrf`` convention: a negative pivot pair marks a 2x2 block)."""
    p = LD.shape[0]
    if p == 0:
        return LD.new_zeros(0)
    diag = torch.diagonal(LD).tolist()
    sub = [*torch.diagonal(LD, -1).tolist(), 0.0]
    pv = piv.tolist()
    out, k = [], 0
    while k < p:
        if pv[k] > 0:
            out.append(diag[k])
            k += 1
        else:
            a, b, c = diag[k], sub[k], diag[k + 1]
            mid, rad = 0.5 * (a + c), math.hypot(0.5 * (a - c), b)
            out += [mid - rad, mid + rad]
            k += 2
    return torch.tensor(out, dtype=LD.dtype)


# ----------------------------------------------------------------------------- factorisation
@dataclass
class _StageFactor:
    stage: Stage
    d: StageDerivatives
    pivot: _Pivot | _WidePivot | None
    K: Tensor | None  # K_l = -Q_xx^-1 Q_xz (p x a_in), or W = L^-1 Q_xz; None: first stage


class ChainFactorization:
    """The backward sweep of a `Chain`, done once; cheap ``solve``, ``logdet`` and
    ``inertia`` afterwards (lineax's init/compute split).

    Attributes:
        damping: ``eps`` of ``C + eps I``.
        curvature: ``"hessian"`` or ``"ggn"``.
        num_params: ``P``.
    """

    def __init__(
        self, chain: Chain, damping: float, curvature: str, progress: bool | None = None
    ) -> None:
        self.chain, self.damping, self.curvature = chain, float(damping), curvature
        self.num_params = chain.num_params
        gn = curvature == "ggn"
        zs, lams = chain._forward_backward()
        stages = chain.stages
        # the loss stage: S_L = 0, so S_{L-1} = Q_zz = the loss Hessian
        loss_d = chain.loss_stage.derivatives(zs[-1], lams[-1])
        S_L = torch.zeros(1, 1, dtype=chain.inputs.dtype, device=chain.inputs.device)
        S = loss_d.q_blocks(S_L, gn, True)[0]
        factors: list[_StageFactor] = []
        bar = progress_bar(
            len(stages), "chain sweep", progress, unit="stage", delay=1.0 if progress is None else 0
        )
        for l_ in range(len(stages) - 1, -1, -1):
            bar.update()
            stage = stages[l_]
            d = stage.derivatives(zs[l_], lams[l_])
            need_z = l_ > 0  # dz_0 = 0: the first stage needs no Q_xz or S_0
            if isinstance(d, _LinearDerivs) and d.p > d.a_out:
                # a wide Linear stage: its p x p pivot through an a x a one, never formed
                wide = _WidePivot(d, S, self.damping, stage.name, gn, need_z)
                factors.append(_StageFactor(stage, d, wide, wide.store))
                if need_z:
                    S, wide.schur = wide.schur, None
                continue
            Q_zz, Q_xx, Q_xz = d.q_blocks(S, gn, need_z)
            pivot = K = None
            if d.p > 0:
                Q_xx.diagonal().add_(self.damping)  # Q_xx = G_xx + eps I + B^T S B
                pivot = _Pivot(Q_xx, stage.name)
                if need_z:  # S_{l-1} = Q_zz + Q_zx K_l,  K_l = -Q_xx^-1 Q_xz
                    S, K = pivot.eliminate(Q_zz, Q_xz)
            else:
                S = Q_zz  # a stage without parameters passes S_{l-1} = Q_zz
            factors.append(_StageFactor(stage, d, pivot, K))
        bar.close()
        factors.reverse()
        self._factors = factors

    # ------------------------------------------------------------------------- queries
    def logdet(self) -> tuple[float, float]:
        """``(sign, log|det(C + eps I)|)`` as ``torch.linalg.slogdet`` returns them:
        the sum of the pivots' log-determinants, their signs multiplied. A singular
        matrix gives ``(0.0, -inf)``."""
        sign, total = 1.0, 0.0
        for f in self._factors:
            if f.pivot is not None:
                if f.pivot.singular:
                    return 0.0, -math.inf
                sign *= f.pivot.sign
                total += f.pivot.logabs
        return sign, total

    @property
    def near_singular(self) -> bool:
        """Whether a pivot is singular or nearly so (relative size below 1e-10): an
        eigenvalue of ``C + eps I`` lies within rounding of zero."""
        return any(f.pivot is not None and f.pivot.near_singular for f in self._factors)

    def inertia(self) -> Inertia:
        """Counts of negative, zero and positive eigenvalues of ``C + eps I``
        (Sylvester: the sum of the pivots' inertias)."""
        neg = zero = pos = 0
        for f in self._factors:
            if f.pivot is not None:
                i = f.pivot.inertia
                neg, zero, pos = neg + i.negative, zero + i.zero, pos + i.positive
        return Inertia(neg, zero, pos)

    def solve(self, v: Tensor | Sequence[Tensor]) -> Tensor | list[Tensor]:
        """``(C + eps I)^-1 v`` for ``v`` of shape ``(P,)``, ``(P, k)`` or a list of
        per-parameter tensors (returned in the same form). Cost: one backward and one
        forward pass over the stages, ``O(sum_l (a_l + p_l)^2 k)``."""
        prob = self.chain.problem
        as_list = isinstance(v, (list, tuple))
        V = prob.as_flat(v, "v")
        vec = V.ndim == 1
        V = V.unsqueeze(1) if vec else V
        # minimise 1/2 dx^T (C + eps I) dx + r^T dx with r = -v (stages' internal orders)
        perm = self.chain._perm
        perm = None if perm is None else perm.to(V.device)
        R = -(V if perm is None else V[perm])
        r = [R[blk] for blk in self.chain._blocks]
        # backward sweep: s_L = 0 (the loss stage has no parameters and S_L = 0)
        s = None
        ks: list[Tensor | None] = [None] * len(self._factors)
        for l_ in range(len(self._factors) - 1, -1, -1):
            f = self._factors[l_]
            need_z = l_ > 0
            q_z = f.d.At(s) if (s is not None and need_z) else None  # q_z = A^T s_l
            if f.d.p > 0:
                q_x = r[l_] + (f.d.Bt(s) if s is not None else 0.0)  # q_x = r_l + B^T s_l
                # k_l = -Q_xx^-1 q_x and Q_zx k_l = K_l^T q_x
                ks[l_], corr = f.pivot.backward(f.K if need_z else None, q_x)
                if need_z:
                    s = corr if q_z is None else q_z + corr  # s_{l-1} = q_z + Q_zx k_l
            else:
                s = q_z
        # forward sweep: dz_0 = 0, dx_l = k_l + K_l dz_{l-1}, dz_l = A dz_{l-1} + B dx_l
        dz = None
        out = torch.empty_like(V)
        for l_, (f, blk) in enumerate(zip(self._factors, self.chain._blocks, strict=True)):
            dx = None
            if f.d.p > 0:
                dx = ks[l_] if (dz is None or f.K is None) else ks[l_] + f.pivot.K_times(f.K, dz)
                out[blk] = dx
            if l_ + 1 < len(self._factors):
                nxt = f.d.A(dz) if dz is not None else None
                if dx is not None:
                    bdx = f.d.B(dx)
                    nxt = bdx if nxt is None else nxt + bdx
                dz = nxt
        if perm is not None:
            internal, out = out, torch.empty_like(out)
            out[perm] = internal
        out = out.squeeze(1) if vec else out
        return prob.unflatten(out) if as_list else out


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
    promote: bool = False,
    progress: bool | None = None,
) -> ChainFactorization:
    """Run the backward sweep once for ``C + eps I`` (``C`` the Hessian or the GGN).

    Args:
        problem_or_chain: a `Chain`, or a `Problem` whose model is an ``nn.Sequential``.
        damping: ``eps`` (may be negative: ``eps = -sigma`` counts eigenvalues below
            ``sigma``).
        curvature: ``"hessian"`` or ``"ggn"``.
        promote: compute in float64 on a copy when the model is float32 (otherwise
            float32 only warns: solves and log-determinants lose digits).
        progress: a bar over the stages (default: when stderr is a terminal and the
            sweep takes over a second).

    Returns:
        a `ChainFactorization` with ``.solve(v)``, ``.logdet()`` and ``.inertia()``.

    Cost: time and memory linear in the number of stages, ``O(a^3 + p^3 + a p (a + p))``
    per stage for ``a`` activations (batch x width) and ``p`` parameters; a ``Linear``
    stage with ``p > a`` (batch below its fan-in) costs ``O(a^3 + a p)``: its pivot is
    factored on the range of ``B^T`` only (`_WidePivot`).
    Reference: design note ``chain-curvature.md``; A. Rahimi, arXiv 2601.06096.
    """
    check_curvature(curvature)
    if not math.isfinite(float(damping)):
        raise ValueError(f"damping must be finite; got {damping}")
    chain = _as_chain(problem_or_chain)
    if chain.problem.dtype != torch.float64:
        if promote:
            chain = _promoted(chain)
        else:
            warnings.warn(
                f"the chain solver runs in {chain.problem.dtype}; float64 is recommended for "
                "solves and log-determinants (pass promote=True to compute in float64)",
                stacklevel=2,
            )
    return ChainFactorization(chain, damping, curvature, progress)
