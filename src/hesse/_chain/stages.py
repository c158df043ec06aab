"""Stages of a chain and their derivatives (design note: docs/design/chain-curvature.md).

A stage maps the previous activations ``z_{l-1}`` (the whole batch, ``(n, ...)``) and
its own parameters ``x_l`` to ``z_l = f_l(z_{l-1}; x_l)``. The sweep sees a stage only
through `StageDerivatives`: products with ``A = df/dz`` and ``B = df/dx``, their
transposes, and the blocks of ``Q = G + [A B]^T S [A B]`` (``G`` = Hessian of
``lam . f`` over ``(z, x)`` with the adjoint ``lam`` fixed). Activations are flattened
sample-major: ``a_l = n * prod(z_l.shape[1:])``.

Structured stages never form matrices they do not need:

- `LinearStage` (``nn.Linear``): ``A = I_n (x) W`` (block diagonal over samples),
  ``B = Zhat (x) I_o`` with ``Zhat = [z, 1]``, ``G_zz = G_xx = 0``,
  ``G_xz[(o, j), (m, i)] = lam[m, o] delta_ij``. All products are contractions of
  ``S`` viewed as ``(n, o, n, o)``.
- `ElementwiseStage` (activations): ``A = diag(h'(z))``, ``G_zz = diag(lam * h''(z))``.
- `IdentityStage` (``Flatten``, eval-mode ``Dropout``): ``A = I``.
- `LossStage`: the scalar loss; only its ``G_zz`` (the loss Hessian) matters, since
  ``S_L = 0`` and ``s_L = 0``.
- `GenericStage` (any module, e.g. a residual block or ``Conv2d``): ``A``, ``B``, ``G``
  from ``torch.func``, per sample (block diagonal ``A``) when the module treats samples
  independently, else dense over the flattened batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev, vmap

from hesse._autodiff.bishop import ELEMENTWISE, activation_derivatives
from hesse._autodiff.problem import check_loss_shapes
from hesse._chain import pivots as _chain_pivots
from hesse._chain.pivots import TAU, Elimination, StageElimination, SweepState
from hesse._util import memory as _memory

__all__ = [
    "ElementwiseStage",
    "GenericStage",
    "IdentityStage",
    "LinearStage",
    "LossStage",
    "Stage",
    "StageDerivatives",
    "make_stage",
]


class StageDerivatives:
    """Derivatives of one stage at its input ``z`` and output adjoint ``lam``.

    Shapes: ``a_in``, ``a_out`` activations, ``p`` parameters (in the stage's internal
    order, see `Stage.perm`); right-hand sides are columns, ``(a, R)`` or ``(p, R)``.
    """

    a_in: int
    a_out: int
    p: int

    def A(self, dz: Tensor) -> Tensor:  # (a_in, R) -> (a_out, R)
        raise NotImplementedError

    def At(self, s: Tensor) -> Tensor:  # (a_out, R) -> (a_in, R)
        raise NotImplementedError

    def B(self, dx: Tensor) -> Tensor:  # (p, R) -> (a_out, R)
        raise NotImplementedError

    def Bt(self, s: Tensor) -> Tensor:  # (a_out, R) -> (p, R)
        raise NotImplementedError

    def q_blocks(
        self, S: Tensor, gauss_newton: bool, need_z: bool
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """``(Q_zz, Q_xx, Q_xz)`` without damping: ``Q_zz = G_zz + A^T S A``,
        ``Q_xx = G_xx + B^T S B``, ``Q_xz = G_xz + B^T S A``; ``G`` is dropped for
        the Gauss-Newton matrix. ``S`` is ``S_l``, ``(a_out, a_out)``. With ``need_z=False``
        (first stage: ``dz_0 = 0``) ``Q_zz`` and ``Q_xz`` are not formed."""
        raise NotImplementedError

    def eliminate(
        self,
        state: SweepState,
        eps: float,
        gauss_newton: bool,
        need_z: bool,
        tol: float,
        stage: str,
    ) -> StageElimination | None:
        """The stage's own elimination of its pivot variables ``[x; d]`` (design note
        (S1)), for a stage whose structure makes it cheaper than the dense blocks of
        `q_blocks` (a wide ``Linear`` stage: W1-W4), given the state the later stages
        left (its delayed directions included). ``None`` (the default): the sweep forms
        the blocks and eliminates them itself."""
        return None


class Stage:
    """A stage: ``forward(z) -> z_next`` with parameters ``params`` (possibly none).

    Attributes:
        name: a label for messages (the module's name in the model).
        param_names: names of the stage's parameters in the model.
        perm: ``x_internal = x_problem[perm]`` for this stage's block (``None``: same).
    """

    name: str = ""
    param_names: list[str]
    perm: Tensor | None = None

    def __init__(self, name: str) -> None:
        self.name = name
        self.param_names = []

    @property
    def num_params(self) -> int:
        return 0

    def forward(self, z: Tensor) -> Tensor:
        raise NotImplementedError

    def derivatives(self, z: Tensor, lam: Tensor) -> StageDerivatives:
        raise NotImplementedError

    def describe(self) -> str:
        return f"{type(self).__name__}({self.name})"

    def pivot_size(self, a_out: int) -> int:
        """The size of the stage's pivot for ``a_out`` output activations (for memory
        estimates): its number of parameters, unless its `StageDerivatives.eliminate`
        works in a smaller space."""
        return self.num_params


# ----------------------------------------------------------------------------- Linear
class _LinearDerivs(StageDerivatives):
    """Parameters in the internal order ``(j, o)``: ``x[j * o_dim + o] = [W | b][o, j]``,
    so that ``B = Zhat (x) I_o`` and every product below is a plain matrix product over
    a view of ``S`` (activations are ``(n, o)``, sample-major)."""

    def __init__(self, W: Tensor, zhat: Tensor, lam: Tensor) -> None:
        self.W, self.zhat, self.lam = W, zhat, lam
        self.n, self.J = zhat.shape
        self.o, self.i = W.shape
        self.a_in, self.a_out, self.p = self.n * self.i, self.n * self.o, self.o * self.J

    def A(self, dz: Tensor) -> Tensor:
        return torch.matmul(self.W, dz.reshape(self.n, self.i, -1)).view(self.a_out, -1)

    def At(self, s: Tensor) -> Tensor:
        return torch.matmul(self.W.T, s.reshape(self.n, self.o, -1)).view(self.a_in, -1)

    def B(self, dx: Tensor) -> Tensor:
        R = dx.shape[1]
        return (self.zhat @ dx.reshape(self.J, self.o * R)).view(self.a_out, R)

    def Bt(self, s: Tensor) -> Tensor:
        R = s.shape[1]
        return (self.zhat.T @ s.reshape(self.n, self.o * R)).view(self.p, R)

    def q_blocks(
        self, S: Tensor, gauss_newton: bool, need_z: bool
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        n, o, J, p, a_in = self.n, self.o, self.J, self.p, self.a_in
        ZT = self.zhat.T
        # S B[(n, o), (k, q)] = sum_m S[(n, o), (m, q)] Zhat[m, k]: a batched product
        SB = torch.bmm(ZT.expand(self.a_out, J, n), S.reshape(self.a_out, n, o))
        Q_xx = (ZT @ SB.view(n, o * p)).view(p, p)  # B^T (S B)
        if not need_z:
            return None, Q_xx, None
        # S A[(n, o), (m, k)] = sum_q S[(n, o), (m, q)] W[q, k]
        SA = (S.reshape(self.a_out * n, o) @ self.W).view(n, o, a_in)
        Q_xz = (ZT @ SA.view(n, o * a_in)).view(p, a_in)  # B^T (S A)
        Q_zz = torch.bmm(self.W.T.expand(n, self.i, o), SA).view(
            a_in, a_in
        )  # A^T (S A), per sample
        if not gauss_newton:  # G_xz[(j, o), (m, k)] = lam[m, o] delta_jk (no bias row)
            i = self.i
            k = min(i, J)
            torch.diagonal(Q_xz.view(J, o, n, i)[:k], dim1=0, dim2=3).add_(self.lam.T.unsqueeze(-1))
        return Q_zz, Q_xx, Q_xz

    def eliminate(
        self,
        state: SweepState,
        eps: float,
        gauss_newton: bool,
        need_z: bool,
        tol: float,
        stage: str,
    ) -> StageElimination | None:
        """More parameters than activations (``J > n``): the wide form (`_Wide`)."""
        if self.p <= self.a_out:
            return None
        return _Wide.build(self, state, eps, gauss_newton, need_z, tol, stage)


class LinearStage(Stage):
    """``nn.Linear`` on ``(n, in)`` inputs; parameters weight (and bias) as selected.

    Internal parameter order is ``[W | b]`` column by column (``(in + 1, o)``); `perm`
    maps it from the model's order (all of ``weight``, then ``bias``).
    """

    def __init__(
        self, name: str, module: nn.Linear, weight: bool = True, bias: bool = True
    ) -> None:
        super().__init__(name)
        self.module = module
        self.use_w = weight
        self.use_b = bias and module.bias is not None
        if not self.use_w and self.use_b:  # bias only: treat as a generic stage would; rare
            raise ValueError(
                f"stage {name!r}: selecting a Linear bias without its weight "
                "is not supported by the chain solver"
            )
        prefix = f"{name}." if name else ""
        self.param_names = ([f"{prefix}weight"] if self.use_w else []) + (
            [f"{prefix}bias"] if self.use_b else []
        )
        o, i = module.out_features, module.in_features
        if self.use_w:
            J = i + self.use_b
            prob_index = torch.empty(o, J, dtype=torch.long)  # [W | b][o, j] -> its index
            prob_index[:, :i] = torch.arange(o * i).reshape(o, i)
            if self.use_b:
                prob_index[:, i] = o * i + torch.arange(o)
            self.perm = prob_index.T.reshape(-1)

    @property
    def num_params(self) -> int:
        o, i = self.module.out_features, self.module.in_features
        return (o * i if self.use_w else 0) + (o if self.use_b else 0)

    def forward(self, z: Tensor) -> Tensor:
        return self.module(z)

    def pivot_size(self, a_out: int) -> int:
        p = self.num_params
        return min(p, a_out)  # a wide stage's pivot lives on the range of B^T

    def derivatives(self, z: Tensor, lam: Tensor) -> StageDerivatives:
        if z.ndim != 2:
            raise ValueError(
                f"stage {self.name!r} (Linear) expects inputs (n, features); got {tuple(z.shape)}"
            )
        W = self.module.weight.detach()
        if self.use_w:
            zhat = torch.cat([z, torch.ones_like(z[:, :1])], 1) if self.use_b else z
            return _LinearDerivs(W, zhat, lam)
        # no selected parameters: A only
        return _LinearDerivs(W, z[:, :0], lam)


# ----------------------------------------------------------------------------- wide stages
class _Wide:
    """A wide ``Linear`` stage, ``p = o J`` parameters against ``a = n o`` activations
    (``J > n``), eliminated without forming its ``p x p`` pivot (design note, "Wide
    stages", (W1)-(W4)). With the thin QR ``Zhat^T = Q_z R_z``,
    ``B^T = (Q_z (x) I_o)(R_z (x) I_o)``, so in the orthonormal basis
    ``[Q_z, Q_z^perp] (x) I_o`` of the parameters ``Q_xx`` is block diagonal:
    ``Q_uu = eps I + (R_z (x) I) S (R_z^T (x) I)`` (``a x a``) on the range of ``B^T``,
    ``eps I`` on its complement (``G_xx = 0``, and ``B`` vanishes there). The complement
    is eliminated first, exactly: it couples to the state only through ``G_xz`` (the
    Hessian), adding ``-G_xz^T P G_xz / eps = -(lam lam^T) (x) P_z / eps`` to ``Q_zz``
    (W3). The range part goes through a stable `Elimination` (it may delay directions).

    `build` returns ``None`` when the complement's pivot ``eps`` fails the threshold test
    against its coupling (the Hessian at small ``eps``) and the dense pivot is affordable:
    the sweep then treats the stage like any other.
    """

    kind = "wide"

    def __init__(self, d: _LinearDerivs, Qz: Tensor, Rz: Tensor, Pz: Tensor | None) -> None:
        self.d, self.Qz, self._Pz = d, Qz, Pz
        self.Rz = Rz
        self.extra = d.p - d.a_out  # the complement: eigenvalue eps, this many times
        self.eps_pivots = self.extra
        self._PG: Tensor | None = None

    @classmethod
    def build(
        cls,
        d: _LinearDerivs,
        state: SweepState,
        eps: float,
        gauss_newton: bool,
        need_z: bool,
        tol: float,
        stage: str,
    ) -> _Wide | None:
        S, S_dz, S_dd = state
        n, o, a = d.n, d.o, d.a_out
        Qz, Rz = torch.linalg.qr(d.zhat.T)  # (J, n), (n, n)
        coupled = need_z and not gauss_newton
        Pz = None
        if coupled and d.p > a:  # P = (I - Q_z Q_z^T) (x) I_o on the inputs' rows j < i
            Pz = -(Qz @ Qz[: d.i].T)  # (J, i)
            Pz[: d.i].diagonal().add_(1.0)
            # the complement's couplings: row (j, o) of P G_xz has norm |Pz_j| |lam_:o|
            c = float(torch.linalg.vector_norm(Pz, dim=1).max()) * float(
                torch.linalg.vector_norm(d.lam, dim=0).max()
            )
            if not abs(eps) >= TAU * c and c > tol and not _chain_pivots.UNPIVOTED:
                dense = 4 * d.p * d.p * S.element_size()  # the pivot, its eigenvectors, work
                if dense <= _memory.BUDGET_FRACTION * _memory.available_memory(S.device):
                    return None  # the dense pivot fits: eliminate it like any stage's
                if eps == 0:
                    raise _memory.MemoryBudgetError(
                        f"stage {stage!r}: at eps = 0 the Hessian of a wide Linear stage "
                        f"({d.p} parameters, {a} activations) needs its dense pivot, about "
                        f"{_memory.format_bytes(dense)}, more than is available; use a "
                        "damping eps != 0, the GGN, or fewer parameters in that layer"
                    )
            if c <= tol:
                Pz = None  # no coupling to speak of
        self = cls(d, Qz, Rz, Pz)
        self.eps = float(eps)
        self.m = m = state.m
        # (W1): (R (x) I) S (R^T (x) I), a batched product
        RS = (Rz @ S.reshape(n, o * a)).view(a, n, o)
        small = torch.bmm(Rz.expand(a, n, n), RS).view(a, a)
        small.diagonal().add_(self.eps)
        Q_uz = Q_zz = Q_dz = None
        if m:  # the delayed directions: Q_dr^T = (R (x) I) S_dz^T, as B^T is in range coords
            Q_rd = (Rz @ S_dz.T.reshape(n, o * m)).view(a, m)
            small = torch.cat([torch.cat([small, Q_rd], 1), torch.cat([Q_rd.T, S_dd], 1)])
            Q_dz = d.At(S_dz.T).T if need_z else None  # S_dz A
        if need_z:
            a_in, i = d.a_in, d.i
            SA = (S.reshape(a * n, o) @ d.W).view(n, o, a_in)  # S A
            Q_uz = (Rz @ SA.view(n, o * a_in)).view(a, a_in)
            Q_zz = torch.bmm(d.W.T.expand(n, i, o), SA).view(a_in, a_in)  # A^T S A
            if not gauss_newton:
                # (W2): Q^T G_xz[(r, o), (m, i)] = Q_z[i, r] lam[m, o]
                Q_uz.view(n, o, n, i).addcmul_(
                    Qz[:i].T.reshape(n, 1, 1, i), d.lam.T.reshape(1, o, n, 1)
                )
                if self.extra and Pz is not None:  # (W3)
                    Q_zz.view(n, i, n, i).addcmul_(
                        (d.lam @ d.lam.T).view(n, 1, n, 1),
                        Pz[:i].view(1, i, 1, i),
                        value=-1 / self.eps,
                    )
            if m:
                Q_uz = torch.cat([Q_uz, Q_dz])
        self.elim = Elimination(small, Q_uz, Q_zz, tol, stage)
        inner = self.elim
        self.pivots = inner.pivots
        self.scale, self.ref, self.growth = inner.scale, inner.ref, inner.growth
        return self

    def take_state(self) -> SweepState:
        return self.elim.take_state()

    @property
    def PG(self) -> Tensor | None:
        """``P G_xz / eps`` (``p x a_in``; ``None`` without coupling):
        ``PG[(j, o), (m, i)] = Pz[j, i] lam[m, o] / eps``."""
        if self._PG is None and self._Pz is not None and self.extra:
            d, Pz = self.d, self._Pz
            self._PG = Pz.new_empty(d.p, d.a_in)
            torch.mul(
                Pz.view(d.J, 1, 1, d.i),
                (d.lam.T / self.eps).reshape(1, d.o, d.n, 1),
                out=self._PG.view(d.J, d.o, d.n, d.i),
            )
        return self._PG

    # the parameter space in the stage's internal layout (j, o), columns k
    def _to_u(self, R: Tensor) -> Tensor:  # Q^T r: (p, k) -> (a, k)
        k = R.shape[1]
        return (self.Qz.T @ R.reshape(self.d.J, -1)).view(-1, k)

    def _from_u(self, U: Tensor) -> Tensor:  # Q u: (a, k) -> (p, k)
        k = U.shape[1]
        return (self.Qz @ U.reshape(self.d.n, -1)).view(-1, k)

    def backward(self, q: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """(W4): ``q = [q_x; s_d]``; the range part and the delayed directions through
        the elimination; on the complement ``Q_xx = eps I`` and ``Q_zx = G_xz^T``.
        Returns what `Elimination.backward` does, ``k`` holding both parts."""
        q, q_d = q[: self.d.p], q[self.d.p :]
        qu = self._to_u(q)
        perp = q - self._from_u(qu)
        ku, corr, sd = self.elim.backward(torch.cat([qu, q_d]) if self.m else qu)
        PG = self.PG
        if corr is not None and PG is not None:  # G_xz^T P k_perp = -G_xz^T P q / eps
            corr = corr - PG.T @ q
        return torch.cat([ku, perp / -self.eps if self.extra else perp[:0]]), corr, sd

    def forward(self, k: Tensor, dz: Tensor | None, dval: Tensor | None) -> Tensor:
        """``[x; d]``: the stage's parameters and its incoming delayed directions."""
        nk = k.shape[0] - (self.d.p if self.extra else 0)
        u = self.elim.forward(k[:nk], dz, dval)
        a = self.d.a_out
        x = self._from_u(u[:a])
        if self.extra:
            x = x + k[nk:]
            PG = self.PG
            if PG is not None and dz is not None:  # K_perp dz = -P G_xz dz / eps
                x = x - PG @ dz
        return torch.cat([x, u[a:]]) if self.m else x


# ----------------------------------------------------------------------------- element-wise
class _DiagDerivs(StageDerivatives):
    def __init__(self, d1: Tensor, gzz: Tensor | None) -> None:
        self.d1, self.gzz = d1, gzz
        self.a_in = self.a_out = d1.numel()
        self.p = 0

    def A(self, dz: Tensor) -> Tensor:
        return self.d1[:, None] * dz

    def At(self, s: Tensor) -> Tensor:
        return self.d1[:, None] * s

    def B(self, dx: Tensor) -> Tensor:
        return torch.zeros(self.a_out, dx.shape[1], dtype=self.d1.dtype, device=self.d1.device)

    def Bt(self, s: Tensor) -> Tensor:
        return s[:0]

    def q_blocks(
        self, S: Tensor, gauss_newton: bool, need_z: bool
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        Q_zz = torch.mul(S, self.d1[:, None]).mul_(self.d1)
        if self.gzz is not None and not gauss_newton:
            Q_zz.diagonal().add_(self.gzz)
        return Q_zz, None, None


class ElementwiseStage(Stage):
    """A parameter-free element-wise activation: diagonal ``A`` and ``G_zz``."""

    def __init__(self, name: str, fn: Callable[[Tensor], Tensor]) -> None:
        super().__init__(name)
        self.fn = fn

    def forward(self, z: Tensor) -> Tensor:
        return self.fn(z)

    def derivatives(self, z: Tensor, lam: Tensor) -> StageDerivatives:
        _z, d1, d2 = activation_derivatives([self.fn], z.reshape(-1))
        return _DiagDerivs(d1, lam.reshape(-1) * d2)


class IdentityStage(Stage):
    """A stage that reshapes or passes through (``Flatten``, eval-mode ``Dropout``):
    sample-major flattening makes its ``A`` the identity."""

    def __init__(self, name: str, module: nn.Module) -> None:
        super().__init__(name)
        self.module = module

    def forward(self, z: Tensor) -> Tensor:
        return self.module(z)

    def derivatives(self, z: Tensor, lam: Tensor) -> StageDerivatives:
        return _DiagDerivs(torch.ones(z.numel(), dtype=z.dtype, device=z.device), None)


# ----------------------------------------------------------------------------- loss
class _LossDerivs(StageDerivatives):
    def __init__(self, grad: Tensor, hess: Tensor) -> None:
        self.grad, self.hess = grad, hess
        self.a_in, self.a_out, self.p = grad.numel(), 1, 0

    def A(self, dz: Tensor) -> Tensor:
        return self.grad[None, :] @ dz

    def At(self, s: Tensor) -> Tensor:
        return self.grad[:, None] * s

    def B(self, dx: Tensor) -> Tensor:
        return torch.zeros(1, dx.shape[1], dtype=self.grad.dtype, device=self.grad.device)

    def Bt(self, s: Tensor) -> Tensor:
        return s[:0]

    def q_blocks(
        self, S: Tensor, gauss_newton: bool, need_z: bool
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        # S_L is 1 x 1; the loss Hessian is kept by the Gauss-Newton matrix too
        return self.hess + S[0, 0] * torch.outer(self.grad, self.grad), None, None


class LossStage(Stage):
    """The last stage: ``z -> weight * loss_fn(z, targets)``, a scalar."""

    def __init__(
        self, loss_fn: Callable[[Any, Any], Tensor], targets: Any, weight: float = 1.0
    ) -> None:
        super().__init__("loss")
        self.loss_fn, self.targets, self.weight = loss_fn, targets, weight

    def forward(self, z: Tensor) -> Tensor:
        check_loss_shapes(self.loss_fn, z, self.targets)
        loss = self.loss_fn(z, self.targets)
        if not isinstance(loss, Tensor) or loss.ndim != 0:
            raise ValueError("loss_fn must return a scalar (0-dim) tensor")
        return self.weight * loss

    def derivatives(self, z: Tensor, lam: Tensor) -> StageDerivatives:
        shape = z.shape
        zf = z.detach().reshape(-1).requires_grad_(True)
        loss = self.forward(zf.view(shape))
        (g,) = torch.autograd.grad(loss, zf, create_graph=True)
        a = zf.numel()
        if g.requires_grad:
            eye = torch.eye(a, dtype=z.dtype, device=z.device)
            try:
                (H,) = torch.autograd.grad(g, zf, eye, is_grads_batched=True, allow_unused=True)
            except RuntimeError:
                H = torch.stack([torch.autograd.grad(g, zf, e, retain_graph=True)[0] for e in eye])
            H = torch.zeros(a, a, dtype=z.dtype, device=z.device) if H is None else H
        else:
            H = torch.zeros(a, a, dtype=z.dtype, device=z.device)
        return _LossDerivs(g.detach(), 0.5 * (H + H.T).detach())


# ----------------------------------------------------------------------------- generic
class _DenseDerivs(StageDerivatives):
    def __init__(self, A: Tensor, B: Tensor, Gzz: Tensor, Gxx: Tensor, Gxz: Tensor) -> None:
        self.Am, self.Bm, self.Gzz, self.Gxx, self.Gxz = A, B, Gzz, Gxx, Gxz
        self.a_out, self.a_in = A.shape
        self.p = B.shape[1]

    def A(self, dz: Tensor) -> Tensor:
        return self.Am @ dz

    def At(self, s: Tensor) -> Tensor:
        return self.Am.T @ s

    def B(self, dx: Tensor) -> Tensor:
        return self.Bm @ dx

    def Bt(self, s: Tensor) -> Tensor:
        return self.Bm.T @ s

    def q_blocks(
        self, S: Tensor, gauss_newton: bool, need_z: bool
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        SB = S @ self.Bm
        Q_xx = self.Bm.T @ SB
        Q_zz = Q_xz = None
        if need_z:
            SA = S @ self.Am
            Q_zz, Q_xz = self.Am.T @ SA, self.Bm.T @ SA
        if not gauss_newton:
            Q_xx = Q_xx + self.Gxx
            if need_z:
                Q_zz, Q_xz = Q_zz + self.Gzz, Q_xz + self.Gxz
        return Q_zz, Q_xx, Q_xz


class _BlockDerivs(StageDerivatives):
    """Per-sample derivatives of a stage that treats samples independently: ``A`` and
    ``G_zz`` are block diagonal over the ``n`` samples (blocks ``(d_out, d_in)`` and
    ``(d_in, d_in)``), ``B`` and ``G_zx`` are stacks of per-sample blocks; every product
    is a blockwise contraction of ``S`` viewed as ``(n, d_out, n, d_out)``, a factor
    ``n`` cheaper than the dense path."""

    def __init__(self, A: Tensor, B: Tensor, Gzz: Tensor, Gzx: Tensor, Gxx: Tensor) -> None:
        self.Ab, self.Bb, self.Gzz, self.Gzx, self.Gxx = A, B, Gzz, Gzx, Gxx
        self.n, self.do, self.di = A.shape
        self.p = B.shape[2]
        self.a_in, self.a_out = self.n * self.di, self.n * self.do

    def A(self, dz: Tensor) -> Tensor:
        out = torch.einsum("nab,nbR->naR", self.Ab, dz.view(self.n, self.di, -1))
        return out.reshape(self.a_out, -1)

    def At(self, s: Tensor) -> Tensor:
        out = torch.einsum("nab,naR->nbR", self.Ab, s.view(self.n, self.do, -1))
        return out.reshape(self.a_in, -1)

    def B(self, dx: Tensor) -> Tensor:
        return torch.einsum("nap,pR->naR", self.Bb, dx).reshape(self.a_out, -1)

    def Bt(self, s: Tensor) -> Tensor:
        return torch.einsum("nap,naR->pR", self.Bb, s.view(self.n, self.do, -1))

    def q_blocks(
        self, S: Tensor, gauss_newton: bool, need_z: bool
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        n, do, p = self.n, self.do, self.p
        S4 = S.view(n, do, n, do)
        SB = torch.einsum("iajb,jbp->iap", S4, self.Bb)  # S B
        Q_xx = torch.einsum("iap,iaq->pq", self.Bb, SB)  # B^T S B
        Q_zz = Q_xz = None
        if need_z:
            Q_xz = torch.einsum("iap,iab->pib", SB, self.Ab).reshape(p, self.a_in)
            SA = torch.einsum("iajb,jbc->iajc", S4, self.Ab)  # S A
            Q_zz = torch.einsum("iad,iajc->idjc", self.Ab, SA).reshape(self.a_in, self.a_in)
        if not gauss_newton:
            Q_xx = Q_xx + self.Gxx
            if need_z:
                Q_zz = Q_zz + torch.block_diag(*self.Gzz)
                Q_xz = Q_xz + self.Gzx.permute(2, 0, 1).reshape(p, self.a_in)
        return Q_zz, Q_xx, Q_xz


class GenericStage(Stage):
    """Any module as one stage, with derivatives from ``torch.func``.

    When the module treats samples independently (checked once per sweep: the batched
    forward must equal the per-sample one), ``A``, ``B`` and ``G`` are per-sample blocks
    from ``vmap`` (``A`` block diagonal over samples); otherwise, or with
    ``per_sample=False`` (the benchmark's naive baseline), they are dense over the
    flattened batch (``jacrev`` for ``A`` and ``B``, ``hessian`` of ``lam . f`` for ``G``).
    """

    def __init__(
        self,
        name: str,
        module: nn.Module,
        param_names: list[str] | None = None,
        per_sample: bool = True,
    ) -> None:
        super().__init__(name)
        self.module = module
        self.per_sample = per_sample
        own = [n for n, p in module.named_parameters() if p.requires_grad]
        local = own if param_names is None else param_names
        self._local = local
        prefix = f"{name}." if name else ""
        self.param_names = [f"{prefix}{n}" for n in local]
        shapes = dict(module.named_parameters())
        self._shapes = [shapes[n].shape for n in local]
        self._sizes = [shapes[n].numel() for n in local]

    @property
    def num_params(self) -> int:
        return sum(self._sizes)

    def forward(self, z: Tensor) -> Tensor:
        return self.module(z)

    def _f(self, zf: Tensor, xf: Tensor, shape: torch.Size) -> Tensor:
        params, i = {}, 0
        for n, s, k in zip(self._local, self._shapes, self._sizes, strict=True):
            params[n] = xf[i : i + k].view(s)
            i += k
        return functional_call(self.module, params, (zf.view(shape),)).reshape(-1)

    def _blockwise(self, z: Tensor, lam: Tensor, x0: Tensor) -> StageDerivatives | None:
        """Per-sample blocks by ``vmap``; ``None`` when the samples interact or the
        module cannot be vmapped."""
        n = z.shape[0]
        one = torch.Size((1, *z.shape[1:]))

        def f1(zi: Tensor, xx: Tensor) -> Tensor:  # one sample's output, flattened
            return self._f(zi.reshape(-1), xx, one)

        def g1(zi: Tensor, xx: Tensor, li: Tensor) -> Tensor:
            return li @ f1(zi, xx)

        zd = z.detach()
        try:
            with torch.no_grad():
                joint = self.module(zd).reshape(n, -1)
                single = vmap(f1, in_dims=(0, None))(zd, x0)
            if single.shape != joint.shape or not torch.allclose(
                single, joint, rtol=1e-10, atol=1e-13
            ):
                return None
            A, B = vmap(jacrev(f1, argnums=(0, 1)), in_dims=(0, None))(zd, x0)
            li = lam.detach().reshape(n, -1)
            (Gzz, Gzx), (_Gxz, Gxx) = vmap(hessian(g1, argnums=(0, 1)), in_dims=(0, None, 0))(
                zd, x0, li
            )
        except (RuntimeError, ValueError, NotImplementedError):
            return None
        di = zd[0].numel()
        return _BlockDerivs(
            A.reshape(n, -1, di), B, Gzz.reshape(n, di, di), Gzx.reshape(n, di, -1), Gxx.sum(0)
        )

    def derivatives(self, z: Tensor, lam: Tensor) -> StageDerivatives:
        named = dict(self.module.named_parameters())
        x0 = (
            torch.cat([named[n].detach().reshape(-1) for n in self._local])
            if self._local
            else torch.zeros(0, dtype=z.dtype, device=z.device)
        )
        if self.per_sample:
            blocks = self._blockwise(z, lam, x0)
            if blocks is not None:
                return blocks
        zf = z.detach().reshape(-1)
        shape = z.shape
        A, B = jacrev(self._f, argnums=(0, 1))(zf, x0, shape)
        lam_f = lam.detach().reshape(-1)

        def lf(zz: Tensor, xx: Tensor) -> Tensor:
            return lam_f @ self._f(zz, xx, shape)

        (Gzz, _Gzx), (Gxz, Gxx) = hessian(lf, argnums=(0, 1))(zf, x0)
        return _DenseDerivs(A, B, Gzz, Gxx, Gxz)


def make_stage(
    name: str, module: nn.Module, selected: set[str] | None, generic: bool = False
) -> Stage:
    """The structured stage for ``module`` if there is one, else a `GenericStage`.

    ``selected`` holds the model-level parameter names to differentiate (``None``: all
    that require grad); ``generic=True`` forces the dense path (the benchmark's
    naive baseline).
    """
    prefix = f"{name}." if name else ""
    own = [n for n, p in module.named_parameters() if p.requires_grad]
    local = (
        own
        if selected is None
        else [n for n, _ in module.named_parameters() if f"{prefix}{n}" in selected]
    )
    if isinstance(module, nn.Dropout) and module.training and module.p > 0:
        raise ValueError(
            f"stage {name!r}: Dropout in training mode makes the chain random; call model.eval()"
        )
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
        raise ValueError(
            f"stage {name!r}: BatchNorm in training mode couples the samples and "
            "updates its running statistics on every pass; call model.eval()"
        )
    if generic:  # the naive baseline: dense derivatives over the flattened batch
        return GenericStage(name, module, local, per_sample=False)
    if isinstance(module, nn.Linear):
        return LinearStage(name, module, weight="weight" in local, bias="bias" in local)
    if isinstance(module, ELEMENTWISE) and not any(True for _ in module.parameters()):
        return ElementwiseStage(name, module)
    if isinstance(module, (nn.Flatten, nn.Dropout)) and not local:
        return IdentityStage(name, module)
    return GenericStage(name, module, local)
