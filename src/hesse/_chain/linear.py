"""The ``nn.Linear`` stage of the chain solver, and its wide form (design note:
docs/design/chain-curvature.md, "Linear stages" and "Wide stages", (W1)-(W5)).

``A = I_n (x) W`` (block diagonal over samples), ``B = Zhat (x) I_o`` with
``Zhat = [z, 1]``, ``G_zz = G_xx = 0``, ``G_xz[(o, j), (m, i)] = lam[m, o] delta_ij``:
every product is a contraction of ``S`` viewed as ``(n, o, n, o)``. A stage with more
parameters than activations (a batch below its fan-in) eliminates itself in an
orthonormal basis of the range of ``B^T`` and never forms its ``p x p`` pivot.
"""

from __future__ import annotations

from typing import NamedTuple

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
        # A^T (S A), per sample, into S's memory where it fits (S is not needed after)
        buf = S.view(-1)[: a_in * a_in] if S.is_contiguous() and S.numel() >= a_in**2 else None
        out = None if buf is None else buf.view(n, self.i, a_in)
        Q_zz = torch.bmm(self.W.T.expand(n, self.i, o), SA, out=out).view(a_in, a_in)
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
class _Delayed(NamedTuple):
    """The complement directions a wide stage delays (design note (W5)), never formed
    as ``p``-vectors: ``groups`` holds, per ``lam`` direction ``v_b`` with delayed
    directions, ``(v_b, Y_Db)`` (``(o,)``, ``(J, d_b)``): the directions
    ``Y_Db[:, a] (x) v_b`` in the stage's internal layout, in this order. ``C``
    ``(k, a_in)`` holds their couplings to the state (``X^T G_xz``); ``Lzz``
    ``(n, |F|)``, ``VF`` and ``pairs`` the eliminated complement's Schur term in factors:
    ``(Lzz Lzz^T) (x) P_z`` from the ``lam`` directions ``F = lam`` ``VF`` that delay
    nothing, plus ``(l_b l_b^T) (x) (Y_b[:i] Y_b[:i]^T)`` for each ``(l_b, v_b, Y_b)`` in
    ``pairs`` (``Y_b`` the eliminated directions of ``v_b``)."""

    groups: list[tuple[Tensor, Tensor]]
    C: Tensor
    Lzz: Tensor
    VF: Tensor
    pairs: list[tuple[Tensor, Tensor, Tensor]]

    def project(self, perp: Tensor) -> Tensor:
        """``X^T q`` (``(k, R)``) for ``q`` ``(p, R)`` (internal layout)."""
        v0, Y0 = self.groups[0]
        Q3 = perp.reshape(Y0.shape[0], v0.shape[0], -1).transpose(1, 2)  # (J, R, o)
        return torch.cat([Y.T @ torch.matmul(Q3, v) for v, Y in self.groups])

    def expand(self, vals: Tensor) -> Tensor:
        """``X vals`` (``(p, R)``) for ``vals`` ``(k, R)``."""
        v0, Y0 = self.groups[0]
        out, at = None, 0
        for v, Y in self.groups:
            w = Y @ vals[at : at + Y.shape[1]]  # (J, R)
            at += Y.shape[1]
            t = w[:, None, :] * v[None, :, None]
            out = t if out is None else out + t
        return out.reshape(Y0.shape[0] * v0.shape[0], -1)  # type: ignore[union-attr]


class _Wide:
    """A wide ``Linear`` stage, ``p = o J`` parameters against ``a = n o`` activations
    (``J > n``), eliminated without forming its ``p x p`` pivot (design note, "Wide
    stages", (W1)-(W5)). With the thin QR ``Zhat^T = Q_z R_z``,
    ``B^T = (Q_z (x) I_o)(R_z (x) I_o)``, so in the orthonormal basis
    ``[Q_z, Q_z^perp] (x) I_o`` of the parameters ``Q_xx`` is block diagonal:
    ``Q_uu = eps I + (R_z (x) I) S (R_z^T (x) I)`` (``a x a``) on the range of ``B^T``,
    ``eps I`` on its complement (``G_xx = 0``, and ``B`` vanishes there). The complement
    is eliminated first, exactly: it couples to the state only through ``G_xz`` (the
    Hessian), adding ``-G_xz^T P G_xz / eps = -(lam lam^T) (x) P_z / eps`` to ``Q_zz``
    (W3). Where its pivot ``eps`` fails the threshold test against that coupling (the
    Hessian at small ``eps``), the complement is split in the basis that diagonalises
    its coupling (the singular vectors of ``lam`` and of the complement's input rows):
    the directions that fail are delayed to the stage before, the rest eliminated
    (W5). The range part goes through a stable `Elimination` (it may delay directions).
    """

    kind = "wide"

    def __init__(
        self, d: _LinearDerivs, Qz: Tensor, Rz: Tensor, Pz: Tensor | None, dl: _Delayed | None
    ) -> None:
        self.d, self.Qz, self._Pz = d, Qz, Pz
        self.Rz = Rz
        self.delayed = dl
        self.kc = 0 if dl is None else dl.C.shape[0]  # complement directions delayed
        self.extra = d.p - d.a_out  # the complement: eigenvalue eps, this many times
        self.eps_pivots = self.extra - self.kc
        self._PG: Tensor | None = None

    @staticmethod
    def _split(d: _LinearDerivs, Pz: Tensor, ctx: StageContext) -> _Delayed | None:
        """The complement directions that fail the threshold test (W5), or ``None``
        when every one passes (the whole complement is eliminated, (W3)).

        The complement's coupling ``G_xz^T`` restricted to it is a Kronecker product:
        direction ``y (x) f`` (``y`` in the complement of the inputs' rows, ``f`` in
        ``R^o``) couples by ``(lam f) (x) y[:i]``. With ``lam = U_l diag(s_l) V_l^T`` and
        ``Y = Q_perp U_c``, ``Y[:i] = V_c diag(s_c)`` (the SVD of the complement's input
        rows), the directions ``Y_a (x) V_l,b`` are orthonormal, eigenvectors of the
        pivot ``eps I``, with orthogonal couplings of norm ``s_c,a s_l,b``: each passes
        or fails the eigen tier's test (S3) on its own, as in `Elimination`. Called where
        the parameter-basis test failed (`build`): its couplings are at most ``s_l,max``
        (``s_c <= 1``), so some direction fails here too."""
        eps, tol = abs(float(ctx.damping)), ctx.tol
        Ul, sl, Vlh = torch.linalg.svd(d.lam, full_matrices=False)  # (n, r), (r,), (r, o)
        n, i = d.n, d.i
        zq = torch.linalg.qr(d.zhat.T, mode="complete")[0]  # (J, J): [Q_z, Q_perp]
        Qp = zq[:, n:]  # the complement of the inputs' rows (J - n columns)
        Uc, sc, _ = torch.linalg.svd(Qp[:i].T, full_matrices=True)  # (J-n, J-n), (r_c,)
        Y = Qp @ Uc  # (J, J - n): its input rows Y[:i] have orthogonal columns
        cpl = sc[:, None] * sl[None, :]  # (r_c, r): the couplings' norms
        null = (cpl <= tol) & (eps <= tol)
        elim = ~null & (eps >= TAU * cpl)
        delay = ~(elim | null)
        if not bool(delay.any() or null.any()):
            return None
        Vl = Vlh.T
        groups, rows = [], []
        for b in delay.any(0).nonzero().flatten().tolist():
            Yd = Y[:, delay[:, b].nonzero().flatten()]
            groups.append((Vl[:, b], Yd))
            # coupling of Y_a (x) v_b: (lam v_b) (x) Y_a[:i], lam v_b = s_l,b U_l,b
            rows.append(((Ul[:, b] * sl[b])[None, :, None] * Yd[:i].T[:, None, :]).flatten(1))
        C = torch.cat(rows) if rows else Y.new_zeros(0, n * i)
        # the eliminated complement's Schur term, from the eliminated directions alone
        # (no cancellation against the delayed ones): per lam direction b
        full = elim.all(0)  # b with every coupled complement direction eliminated
        Lzz = Ul[:, full] * sl[full]
        pairs = []
        for b in (~full).nonzero().flatten().tolist():
            a_b = elim[:, b].nonzero().flatten()
            if a_b.numel():
                pairs.append((Ul[:, b] * sl[b], Vl[:, b], Y[:, a_b]))
        # directions beyond r_c or r (no coupling) are eliminated with pivot eps, no term
        return _Delayed(groups, C, Lzz, Vl[:, full], pairs)

    @classmethod
    def build(cls, d: _LinearDerivs, ctx: StageContext) -> _Wide:
        """The wide elimination (W1)-(W5)."""
        state, damping, gauss_newton, need_z, tol, stage = ctx
        S, S_dz, S_dd = state
        n, o, a = d.n, d.o, d.a_out
        Qz, Rz = torch.linalg.qr(d.zhat.T)  # (J, n), (n, n)
        Pz, dl = None, None
        if need_z and not gauss_newton and d.p > a:
            Pz = -(Qz @ Qz[: d.i].T)  # P = (I - Q_z Q_z^T) (x) I_o on the inputs' rows j < i
            Pz[: d.i].diagonal().add_(1.0)
            # the complement's couplings in the parameters' own basis: row (j, o) of
            # P G_xz has norm |Pz_j| |lam_:o|
            c = float(torch.linalg.vector_norm(Pz, dim=1).max()) * float(
                torch.linalg.vector_norm(d.lam, dim=0).max()
            )
            if c <= tol:
                Pz = None  # no coupling to speak of
            elif not abs(float(damping)) >= TAU * c:  # the complement's pivot fails: (W5)
                dl = cls._split(d, Pz, ctx)
        self = cls(d, Qz, Rz, Pz, dl)
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
                if self.extra and Pz is not None:
                    cls._complement_term(Q_zz.view(n, i, n, i), d, Pz, dl, self.eps)
            if m:
                Q_uz = torch.cat([Q_uz, Q_dz])
        # where the complement delays directions, the range part goes to the eigen tier:
        # the tier the stage's whole pivot would take, its block tiers failing on the
        # complement's growth (W5)
        lead = a if (m and need_z and dl is None) else 0  # the range part first (S8)
        self.elim = Elimination(small, Q_uz, Q_zz, tol, stage, eigen=dl is not None, lead=lead)
        inner = self.elim
        self.pivots = inner.pivots
        self.scale, self.ref, self.growth = inner.scale, inner.ref, inner.growth
        return self

    @staticmethod
    def _complement_term(
        Q4: Tensor, d: _LinearDerivs, Pz: Tensor, dl: _Delayed | None, eps: float
    ) -> None:
        """Adds the eliminated complement's Schur term to ``Q_zz`` (viewed ``(n, i, n,
        i)``): ``-(lam lam^T) (x) P_z / eps`` (W3), or with the delayed directions left
        out, from `_Delayed`'s factors (W5)."""
        n, i = d.n, d.i
        if dl is None:
            Q4.addcmul_((d.lam @ d.lam.T).view(n, 1, n, 1), Pz[:i].view(1, i, 1, i), value=-1 / eps)
            return
        if dl.Lzz.shape[1]:
            Q4.addcmul_(
                (dl.Lzz @ dl.Lzz.T).view(n, 1, n, 1), Pz[:i].view(1, i, 1, i), value=-1 / eps
            )
        for lb, _, Yb in dl.pairs:
            Yi = Yb[:i]
            Q4.addcmul_(
                torch.outer(lb, lb).view(n, 1, n, 1), (Yi @ Yi.T).view(1, i, 1, i), value=-1 / eps
            )

    def _coupled_T(self, perp: Tensor) -> Tensor:
        """``G_xz^T P_E q`` (``(a_in, R)``) for ``perp = P_E q`` of the eliminated
        complement (W5), from the eliminated directions alone: no cancellation against
        the delayed directions' larger couplings."""
        dl, d = self.delayed, self.d
        n, i, J, o = d.n, d.i, d.J, d.o
        R = perp.shape[1]
        Q3 = perp.reshape(J, o, R)
        # (lam V_F V_F^T q)[:i]: L_F (V_F^T q[:i]), as (i, n, R) then (n, i, R)
        out = torch.matmul(dl.Lzz, torch.matmul(dl.VF.T, Q3[:i])).transpose(0, 1)  # type: ignore[union-attr]
        for lb, vb, Yb in dl.pairs:  # type: ignore[union-attr]
            t = torch.matmul(Q3.transpose(1, 2), vb)  # q v_b: (J, R)
            w = Yb[:i] @ (Yb.T @ t)  # (Y_b Y_b^T q v_b)[:i]
            out = out + lb[:, None, None] * w[None]
        return out.reshape(n * i, R)

    def _coupled(self, dz: Tensor) -> Tensor:
        """``P_E G_xz dz`` (``(p, R)``) onto the eliminated complement (W5), from the
        eliminated directions alone."""
        dl, d = self.delayed, self.d
        n, i, J, o = d.n, d.i, d.J, d.o
        R = dz.shape[1]
        D3 = dz.reshape(n, i, R)
        F = dl.Lzz.shape[1]  # type: ignore[union-attr]
        gF = dz.new_zeros(J, F, R)  # g V_F = E_i dz^T L_F, on the inputs' rows
        gF[:i] = torch.matmul(D3.permute(1, 2, 0), dl.Lzz).transpose(1, 2)  # type: ignore[union-attr]
        g2 = gF.view(J, F * R)
        g2 -= self.Qz @ (self.Qz.T @ g2)  # P (g V_F)
        out = torch.matmul(dl.VF, gF)  # type: ignore[union-attr]  # (J, o, R)
        for lb, vb, Yb in dl.pairs:  # type: ignore[union-attr]
            t = torch.matmul(D3.permute(1, 2, 0), lb)  # (g v_b)[:i]: (i, R)
            w = Yb @ (Yb[:i].T @ t)  # Y_b Y_b^T g v_b
            out = out + w[:, None, :] * vb[None, :, None]
        return out.reshape(J * o, R)

    def take_state(self) -> SweepState:
        """The range part's state, with the delayed complement directions (W5)
        appended: ``S_dz`` gains their couplings, ``S_dd`` their pivot ``eps``."""
        st = self.elim.take_state()
        if not self.kc:
            return st
        C = self.delayed.C  # type: ignore[union-attr]
        Edd = torch.eye(self.kc, dtype=C.dtype, device=C.device) * self.eps
        if st.S_dz is None:
            return SweepState(st.S_zz, C, Edd)
        return SweepState(st.S_zz, torch.cat([st.S_dz, C]), torch.block_diag(st.S_dd, Edd))

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
        the elimination; on the eliminated complement ``Q_xx = eps I`` and
        ``Q_zx = G_xz^T``; the delayed complement directions' linear term is passed on
        (W5). Returns what `Elimination.backward` does, ``k`` holding both parts."""
        q, q_d = q[: self.d.p], q[self.d.p :]
        qu = self._to_u(q)
        perp = q - self._from_u(qu)
        s_k = None
        if self.kc:
            s_k = self.delayed.project(perp)  # type: ignore[union-attr]
            perp = perp - self.delayed.expand(s_k)  # type: ignore[union-attr]  # P_E q
        ku, corr, sd = self.elim.backward(torch.cat([qu, q_d]) if self.m else qu)
        if corr is not None and self._Pz is not None and self.extra:
            # G_xz^T P_E k_perp = -G_xz^T P_E q / eps: from the eliminated directions
            # alone where some are delayed (W5), else through P G_xz / eps (W4)
            coupled = (
                self._coupled_T(perp) / self.eps if self.delayed is not None else self.PG.T @ perp
            )  # type: ignore[union-attr]
            corr = corr - coupled
        if s_k is not None:
            sd = s_k if sd is None else torch.cat([sd, s_k])
        return torch.cat([ku, perp / -self.eps if self.extra else perp[:0]]), corr, sd

    def forward(self, k: Tensor, dz: Tensor | None, dval: Tensor | None) -> Tensor:
        """``[x; d]``: the stage's parameters and its incoming delayed directions, from
        ``k``, the state and the values of the directions this stage delayed (the range
        part's, then the complement's (W5))."""
        nk = k.shape[0] - (self.d.p if self.extra else 0)
        mr = self.elim.num_delayed
        u = self.elim.forward(k[:nk], dz, None if dval is None or not mr else dval[:mr])
        a = self.d.a_out
        x = self._from_u(u[:a])
        if self.extra:
            x = x + k[nk:]
            if self._Pz is not None and dz is not None:  # K_perp dz = -P_E G_xz dz / eps
                x = x - (self._coupled(dz) / self.eps if self.delayed is not None else self.PG @ dz)  # type: ignore[operator]
            if self.kc and dval is not None:
                x = x + self.delayed.expand(dval[mr:])  # type: ignore[union-attr]
        return torch.cat([x, u[a:]]) if self.m else x
