"""The ``nn.Linear`` stage of the chain solver, and its wide form (design note:
docs/design/chain-curvature.md, "Linear stages" and "Wide stages", (W1)-(W4)).

``A = I_n (x) W`` (block diagonal over samples), ``B = Zhat (x) I_o`` with
``Zhat = [z, 1]``, ``G_zz = G_xx = 0``, ``G_xz[(o, j), (m, i)] = lam[m, o] delta_ij``:
every product is a contraction of ``S`` viewed as ``(n, o, n, o)``. A stage with more
parameters than activations (a batch below its fan-in) eliminates itself in an
orthonormal basis of the range of ``B^T`` and never forms its ``p x p`` pivot.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hesse._chain.stages import Stage, StageDerivatives
from hesse._factor.elimination import TAU, Elimination, StageContext, StageElimination, SweepState
from hesse._util import memory

__all__ = ["LinearStage"]


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

    def eliminate(self, ctx: StageContext) -> StageElimination | None:
        """More parameters than activations (``J > n``): the wide form (`_Wide`)."""
        if self.p <= self.a_out:
            return None
        if isinstance(ctx.damping, Tensor):  # D not constant on the stage: no complement
            dense = 4 * self.p * self.p * ctx.state.S_zz.element_size()
            memory.check_memory(
                dense,
                f"stage {ctx.stage!r}: a damping that varies within a wide Linear stage "
                f"({self.p} parameters, {self.a_out} activations) needs its dense pivot, which",
                "give the layer's weight and bias one damping value (its wide form then "
                "applies), or select fewer parameters",
                ctx.state.S_zz.device,
            )
            return None
        return _Wide.build(self, ctx)


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

    def block_flops(self, n: int, a_in: int, a_out: int) -> int:
        # S B and S A are batched products over S viewed as (n, o, n, o): 2 a_out^2 (J + i)
        # with J = i + 1; then B^T (S B), B^T (S A) and A^T (S A) per sample
        i, o = self.module.in_features, self.module.out_features
        J = i + 1
        if self.num_params > a_out:  # wide (W1): the QR of Zhat^T, (R (x) I) S (R^T (x) I),
            # S A, its range rows and A^T S A; no p x p block is formed
            J = i + int(self.use_b)
            return (
                2 * J * n * n
                + 4 * n * a_out * a_out
                + 2 * a_out * a_out * i
                + (2 * n * a_out * a_in + 2 * o * a_in * a_in)
            )
        return 2 * a_out * a_out * (J + i) + 2 * n * J * o * (J * o + a_in) + 2 * n * i * o * a_in

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

    @staticmethod
    def _complement_coupling(
        d: _LinearDerivs, Qz: Tensor, ctx: StageContext
    ) -> tuple[Tensor | None, bool]:
        """``P_z`` (the complement projector on the inputs' rows, ``(J, i)``; ``None``
        without coupling to speak of) and whether the sweep must take the dense pivot
        instead: the complement's pivot ``eps`` fails the threshold test against its
        coupling ``|Pz_j| |lam_:o|`` (W3) and the dense pivot fits in memory."""
        Pz = -(Qz @ Qz[: d.i].T)  # P = (I - Q_z Q_z^T) (x) I_o on the inputs' rows j < i
        Pz[: d.i].diagonal().add_(1.0)
        # the complement's couplings: row (j, o) of P G_xz has norm |Pz_j| |lam_:o|
        c = float(torch.linalg.vector_norm(Pz, dim=1).max()) * float(
            torch.linalg.vector_norm(d.lam, dim=0).max()
        )
        damping, tol, stage = ctx.damping, ctx.tol, ctx.stage
        if not abs(damping) >= TAU * c and c > tol:
            S = ctx.state.S_zz
            dense = 4 * d.p * d.p * S.element_size()  # the pivot, its eigenvectors, work
            if dense <= memory.BUDGET_FRACTION * memory.available_memory(S.device):
                return Pz, True  # the dense pivot fits: eliminate it like any stage's
            if damping == 0:
                raise memory.MemoryBudgetError(
                    f"stage {stage!r}: at damping 0 the Hessian of a wide Linear stage "
                    f"({d.p} parameters, {d.a_out} activations) needs its dense pivot, about "
                    f"{memory.format_bytes(dense)}, more than is available; use a "
                    "damping != 0, the GGN, or fewer parameters in that layer"
                )
        return (None if c <= tol else Pz), False

    @classmethod
    def build(cls, d: _LinearDerivs, ctx: StageContext) -> _Wide | None:
        """The wide elimination (W1)-(W4), or ``None`` when the dense pivot must be used
        (see `_complement_coupling`)."""
        state, damping, gauss_newton, need_z, tol, stage = ctx
        S, S_dz, S_dd = state
        n, o, a = d.n, d.o, d.a_out
        Qz, Rz = torch.linalg.qr(d.zhat.T)  # (J, n), (n, n)
        Pz = None
        if need_z and not gauss_newton and d.p > a:
            Pz, dense = cls._complement_coupling(d, Qz, ctx)
            if dense:
                return None
        self = cls(d, Qz, Rz, Pz)
        self.eps = float(damping)
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
