"""One block's stable elimination, with threshold pivoting and delayed pivots: a stage of
the chain sweep, or the whole matrix in the dense engine.

Design note: docs/design/chain-curvature.md, section "Stable elimination" (equations
(S1)-(S6)). At stage ``l`` the sweep holds the quadratic

    M = [[Q_uu, Q_uz], [Q_zu, Q_zz]]                                           (S1)

over the stage's pivot variables ``u`` (its parameters ``x_l`` and the directions that
later stages delayed, ``d_l``) and the state ``z = dz_{l-1}``. `Elimination` removes
as much of ``u`` as it can *stably* and hands the rest on as delayed directions:

1. ``cholesky``: ``Q_uu = L L^T`` and ``W = L^-1 Q_uz``; accepted when the Schur update
   ``W^T W`` stays within ``1 / tau`` of the entries of ``M`` (always so when ``M`` is
   positive semi-definite, e.g. the GGN) and no pivot is within the rank tolerance of 0;
2. ``ldl``: a symmetric indefinite ``Q_uu``, Bunch-Kaufman ``P^T Q_uu P = L D L^T``
   (`BunchKaufman`) for the inertia, the update ``W^T D^-1 W`` (``W = L^-1 P^T Q_uz``)
   and the solves, accepted under the same growth test; LU forms the update instead
   where Bunch-Kaufman's majorant ``|W|^T |D^-1| |W|`` exceeds ``ref / tau^2`` (S2b);
2b. ``lead``: where ``u`` holds delayed directions and tiers 1-2 fail on the whole of
   it, the stage's own parameters (the leading ``lead`` variables) alone by tier 1 or 2,
   the delayed directions joining the state; then the delayed directions from what is
   left, by any tier (S8);
3. ``eigen``: ``Q_uu = V diag(mu) V^T``. In that basis the pivots are decoupled 1x1
   blocks, and direction ``i`` is eliminated only when ``|mu_i| >= tau |c_i|`` with
   ``c_i`` its row of ``C = V^T Q_uz`` (the coupling to the state): each such step adds
   at most ``|c_i| / tau`` to the Schur complement (S3). Directions that fail are
   *delayed*: they become variables of the next stage's elimination, with
   ``S_dd = diag(mu_D)`` and ``S_dz = C_D`` (S4). Directions with ``|mu_i|`` and
   ``|c_i|`` both below the rank tolerance are exact zeros of ``C + eps I``: counted in
   the inertia as zero, never divided by.

The first stage has no state (``dz_0 = 0``): everything left is eliminated there.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from hesse._factor.results import SingularPivotError

__all__ = [
    "TAU",
    "BunchKaufman",
    "Elimination",
    "SingularPivotError",
    "StageContext",
    "StageElimination",
    "SweepState",
    "maxabs",
]


class SweepState(NamedTuple):
    """What the stages after ``l`` leave over: the quadratic in ``y = (dz_l, d_l)``
    (design note (S1)), ``S_zz`` ``(a, a)`` and, for the ``m`` delayed directions,
    ``S_dz`` ``(m, a)`` and ``S_dd`` ``(m, m)`` (``None`` when there are none).
    ``S_zz`` is ``None`` after the first stage (it has no state: ``dz_0 = 0``)."""

    S_zz: Tensor | None
    S_dz: Tensor | None = None
    S_dd: Tensor | None = None

    @property
    def m(self) -> int:
        """The number of delayed directions."""
        return 0 if self.S_dz is None else self.S_dz.shape[0]


class StageContext(NamedTuple):
    """What a stage's own elimination is given (`StageDerivatives.eliminate`): the
    state the later stages left (its delayed directions included), the damping ``eps``,
    whether ``C`` is the Gauss-Newton matrix, whether the stage has a state to couple to
    (``dz_{l-1}``: not at the first stage), the rank tolerance so far, and the stage's
    name for messages."""

    state: SweepState
    damping: float | Tensor  # the stage's part of D in its internal order, or eps
    gauss_newton: bool
    need_z: bool
    tol: float
    stage: str


class StageElimination(Protocol):
    """What the sweep needs of one stage's elimination (`Elimination`, or a stage's own
    structured one such as a wide ``Linear`` stage's).

    Attributes:
        kind: a label for the status (``"cholesky"``, ``"ldl"``, ``"eigen"``, ``"wide"``).
        pivots: the eliminated pivots' values (Sylvester: their signs are the inertia,
            their product the determinant), a 1-D tensor.
        eps_pivots: how many further pivots equal ``eps`` exactly (a wide stage's
            complement), not listed in ``pivots``.
        scale, ref, growth: the largest entry of the pivot block, of the whole stage
            matrix, and of the Schur update (for the status and the rank tolerance).
    """

    kind: str
    pivots: Tensor
    eps_pivots: int
    scale: float
    ref: float
    growth: float

    def take_state(self) -> SweepState:
        """The state for the next stage (S2)-(S4)."""
        ...

    def backward(self, q: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """``(k, Q_zu k, s_d)`` for the linear term ``q = [q_x; s_d]`` (S5)."""
        ...

    def forward(self, k: Tensor, dz: Tensor | None, d: Tensor | None) -> Tensor:
        """``[x; d]`` from ``k``, the state and the delayed directions' values (S6)."""
        ...


TAU = 0.1
"""The threshold of the pivoting test: a pivot ``mu`` is accepted against a coupling ``c``
when ``|mu| >= TAU |c|`` (growth at most ``|c| / TAU`` a step, design note (S3)), and a
block tier when its Schur update stays within ``1 / TAU`` of its stage's entries.
Measured: 0.01 (MA57's default) or a block growth of 30 already miscounts and loses
digits on the deep chains of tests/test_chain_stress.py (16-32 stages: growth compounds
over stages); 0.1 passes them, at the price of delaying directions on some nets that
would not have needed it (bench/bench_chain_accuracy.py)."""


PROBE = 32
"""How many columns of ``Q_uz`` the Cholesky and Bunch-Kaufman tiers' growth tests probe
before their full triangular solves (`Elimination._cholesky_probe`, `Elimination._probe`),
on stages with more than twice as many: the
columns with the largest norms, where the update's diagonal is likely largest. The
diagonal on them is part of the diagonal the full test maximises, so a probe over the
limit rejects exactly what the full test would, at ``PROBE`` of the ``a`` right-hand
sides (the paper configuration's near-singular stages: 815 and 948 pivots against
1,536 columns)."""


def _probe_columns(Q_uz: Tensor | None) -> Tensor | None:
    """The `PROBE` columns of ``Q_uz`` with the largest norms, where it has more than
    twice as many (else ``None``: no probe)."""
    if Q_uz is None or Q_uz.shape[1] <= 2 * PROBE:
        return None
    return torch.topk(torch.linalg.vector_norm(Q_uz, dim=0), PROBE).indices


def _column_probe(diag: Tensor, columns: Callable[[Tensor], Tensor], limit: float) -> bool:
    """Whether the Schur update's columns where its diagonal ``diag`` is largest in
    magnitude (`PROBE` of them, where it has more than twice as many; else ``True``:
    no probe) stay within ``limit``; ``columns(c)`` forms the update's columns ``c``.
    They are entries of the update that the full test maximises over, so a probe over
    the limit rejects exactly what the full product would, before it is formed. On the
    paper configuration's Hessian the largest entry of a rejected update (stage 10's
    LU route, 859 pivots, 1.06 times the limit) lay in the column with the second
    largest diagonal, where the columns of ``Q_uz`` by norm put it 1,430th."""
    if diag.numel() <= 2 * PROBE:
        return True
    return maxabs(columns(torch.topk(diag.abs(), PROBE).indices)) <= limit


def maxabs(T: Tensor | None) -> float:
    """The largest magnitude of an entry (0 for none), without a temporary copy."""
    if T is None or not T.numel():
        return 0.0
    lo, hi = T.aminmax()
    return max(-float(lo), float(hi))


SYMMETRIC_BLOCKS = 4
"""A symmetric Schur update ``A^T B`` of ``a x a`` with ``a >= 1024`` and at least 256
rows is formed as this many block rows of its upper triangle, mirrored
(`symmetric_product`): ``(k + 1) / 2k`` of the flops, 0.58-0.85 of the time of the full
product on 2 cores for ``a = 1024 .. 2112``, no gain below. Used where both factors
come from one matrix (Cholesky's ``W^T W``, Bunch-Kaufman's ``W^T D^-1 W``, the eigen
tier's ``C_E^T K_E``); the LU route's ``Q_zu K`` takes the symmetric part of the full
product instead."""


def symmetric_product(A: Tensor, B: Tensor, C: Tensor | None = None, alpha: float = 1.0) -> Tensor:
    """``C + alpha A^T B`` (``A``, ``B`` ``(n, a)``; ``C`` ``(a, a)``, updated in place, or
    none) for a product known to be symmetric (Cholesky's ``W^T W``, Bunch-Kaufman's
    ``W^T D^-1 W``, the eigen tier's ``C_E^T K_E`` with ``K_E`` a row scaling of
    ``C_E``): above the sizes of
    `SYMMETRIC_BLOCKS` only the block rows of the upper triangle are multiplied and the
    blocks below them are their transposes. ``C`` must be symmetric too."""
    n, a = A.shape
    if a < 1024 or n < 256:
        if C is None:
            return A.T @ B if alpha == 1.0 else torch.mm(A.T, B).mul_(alpha)
        return C.addmm_(A.T, B, alpha=alpha)
    out = A.new_empty(a, a) if C is None else C  # beta = 0 below: nothing read
    beta = 0.0 if C is None else 1.0
    e = [a * i // SYMMETRIC_BLOCKS for i in range(SYMMETRIC_BLOCKS + 1)]
    for lo, hi in itertools.pairwise(e):
        out[lo:hi, lo:].addmm_(A[:, lo:hi].T, B[:, lo:], beta=beta, alpha=alpha)
    for lo, hi in itertools.pairwise(e[1:]):
        out[lo:hi, :lo] = out[:lo, lo:hi].T
    return out


def _block_eigenvalues(LD: Tensor, piv: Tensor) -> Tensor:
    """Eigenvalues of the 1x1 and 2x2 blocks of the ``D`` of a Bunch-Kaufman factor
    (LAPACK ``sytrf`` convention: a negative pivot pair marks a 2x2 block). By Sylvester's
    law they have the inertia of the factored matrix, and their product is its
    determinant."""
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
    return torch.tensor(out, dtype=LD.dtype, device=LD.device)


class BunchKaufman(NamedTuple):
    """``P^T A P = L D L^T`` from LAPACK's ``sytrf`` output (`torch.linalg.ldl_factor`):
    ``perm`` (``A[perm][:, perm] = L D L^T``), ``L`` unit lower triangular (zeros below the
    diagonal of ``D``'s 2x2 blocks) and ``D^-1`` as its diagonal ``di`` and first
    off-diagonal ``do`` (non-zero only inside 2x2 blocks). ``sytrf`` stores
    ``L = P_1 L_1 P_2 L_2 ...`` with each interchange applied to the trailing matrix
    only; the interchanges of later steps are applied here to the rows of the earlier
    columns (``O(n^2)``, one row swap per interchange)."""

    perm: Tensor
    L: Tensor
    di: Tensor
    do: Tensor

    @staticmethod
    def of(LD: Tensor, piv: Tensor) -> BunchKaufman:
        n = LD.shape[0]
        pv = piv.tolist()
        L = torch.tril(LD, -1)
        diag = torch.diagonal(LD)
        di, do = 1.0 / diag, LD.new_zeros(max(n - 1, 0))
        perm, swaps, two, k = list(range(n)), [], [], 0
        while k < n:
            if pv[k] > 0:  # 1x1 block, rows k and pv[k] - 1 interchanged
                r, kp, step = k, pv[k] - 1, 1
            else:  # 2x2 block, rows k + 1 and -pv[k] - 1 interchanged
                r, kp, step = k + 1, -pv[k] - 1, 2
                two.append(k)
            if kp != r:
                swaps.append((k, r, kp))
            k += step
        if two:  # D^-1 of [[a, b], [b, c]], scaled as LAPACK's sytrs: b^-1 [[c', -1], [-1, a']]
            t = torch.tensor(two, device=LD.device)
            b = LD[t + 1, t]
            a, c = diag[t] / b, diag[t + 1] / b
            den = b * (a * c - 1.0)
            di[t], di[t + 1], do[t] = c / den, a / den, -1.0 / den
            L[t + 1, t] = 0.0
        for k, r, kp in swaps:
            if k:
                L[[r, kp], :k] = L[[kp, r], :k]
            perm[r], perm[kp] = perm[kp], perm[r]
        L.diagonal().fill_(1.0)
        return BunchKaufman(torch.tensor(perm, device=LD.device), L, di, do)

    def half(self, B: Tensor) -> Tensor:
        """``L^-1 P^T B`` (``B`` ``(n, R)``)."""
        return torch.linalg.solve_triangular(self.L, B[self.perm], upper=False, unitriangular=True)

    def dinv(self, Y: Tensor, absolute: bool = False) -> Tensor:
        """``D^-1 Y``, or ``|D^-1| Y`` (entrywise magnitudes) with ``absolute``."""
        di, do = (self.di.abs(), self.do.abs()) if absolute else (self.di, self.do)
        Z = di[:, None] * Y
        if do.numel():
            Z[:-1] += do[:, None] * Y[1:]
            Z[1:] += do[:, None] * Y[:-1]
        return Z

    def back(self, Y: Tensor) -> Tensor:
        """``P L^-T Y``."""
        X = torch.linalg.solve_triangular(self.L.T, Y, upper=True, unitriangular=True)
        out = torch.empty_like(X)
        out[self.perm] = X
        return out


class Elimination:
    """Eliminates the pivot variables ``u`` (``n``) of one stage from ``M`` (S1).

    Args:
        Q_uu: ``(n, n)``, symmetric (read in full: pass a symmetric matrix).
        Q_uz: ``(n, a)`` coupling to the state, or ``None`` for the first stage.
        Q_zz: ``(a, a)``, or ``None`` for the first stage; the elimination's own (the
            Cholesky tier updates it in place into ``S_zz``).
        tol: the rank tolerance so far (pivots at most this are zero).
        stage: a label for messages.
        eigen: go to the eigen tier at once (the caller knows the block tiers fail).
        lead: how many leading variables of ``u`` are the stage's own parameters, the
            rest delayed directions (0: no such split): where the block tiers fail on the
            whole of ``u``, those are eliminated first, alone (S8).
        limit: the growth test's bound (default ``ref / TAU``, ``ref`` the largest entry
            of ``M``).

    After construction: ``kind``, ``pivots`` (the eliminated pivots' values: Sylvester's
    law gives the inertia and determinant from them), ``num_delayed``, ``growth`` (the
    Schur update's largest entry over ``M``'s) and the new state ``S_zz``, ``S_dz``,
    ``S_dd`` (taken by the sweep, then dropped here).
    """

    eps_pivots = 0

    def __init__(
        self,
        Q_uu: Tensor,
        Q_uz: Tensor | None,
        Q_zz: Tensor | None,
        tol: float,
        stage: str,
        eigen: bool = False,
        lead: int = 0,
        limit: float | None = None,
    ) -> None:
        self._setup(Q_uu, Q_uz, Q_zz, stage)
        if self.n == 0:
            self.kind, self.pivots = "none", Q_uu.new_zeros(0)
            return
        if eigen:  # the caller knows the block tiers would fail (a wide stage's (W5))
            self._eigen(Q_uu, Q_uz, Q_zz, tol)
            return
        limit = self.ref / TAU if limit is None else limit
        if self._blocks(Q_uu, Q_uz, Q_zz, tol, limit):
            return
        split = Q_uz is not None and 0 < lead < self.n
        if split and self._lead(Q_uu, Q_uz, Q_zz, tol, limit, lead):
            return
        self._eigen(Q_uu, Q_uz, Q_zz, tol)

    def _setup(self, Q_uu: Tensor, Q_uz: Tensor | None, Q_zz: Tensor | None, stage: str) -> None:
        self.n, self.stage = Q_uu.shape[0], stage
        self.scale = maxabs(Q_uu)
        self.ref = max(self.scale, maxabs(Q_uz), maxabs(Q_zz))
        self.num_delayed, self.growth = 0, 0.0
        self.S_dz: Tensor | None = None
        self.S_dd: Tensor | None = None
        self.S_zz: Tensor | None = Q_zz

    def _blocks(
        self, Q_uu: Tensor, Q_uz: Tensor | None, Q_zz: Tensor | None, tol: float, limit: float
    ) -> bool:
        """The block tiers in turn: Cholesky, then Bunch-Kaufman, each accepted when its
        Schur update stays below ``limit`` (S2) and no pivot is within ``tol`` of 0."""
        cols = _probe_columns(Q_uz)  # one choice for both tiers' probes
        diag = torch.diagonal(Q_uu)
        if float(diag.min()) > 10 * tol and self._cholesky(Q_uu, Q_uz, Q_zz, tol, limit, cols):
            return True
        return self._ldl(Q_uu, Q_uz, Q_zz, tol, limit, cols)

    def _lead(
        self, Q: Tensor, Q_uz: Tensor, Q_zz: Tensor | None, tol: float, limit: float, p: int
    ) -> bool:
        """(S8): the stage's parameters ``x = u[:p]`` by a block tier, with state
        ``s = [d; z]`` and under the whole stage's ``limit``; then the delayed directions
        ``d = u[p:]`` from the Schur complement over ``s``, by any tier, with state ``z``.
        ``False`` (nothing changed) when ``x``'s block tiers fail."""
        assert Q_zz is not None
        m = self.n - p
        Q_xs = torch.cat([Q[:p, p:], Q_uz[:p]], 1)
        first = Elimination.__new__(Elimination)
        first._setup(Q[:p, :p], Q_xs, None, self.stage)
        # the tiers test their update alone: Q_ss = [[Q_dd, Q_dz], [Q_zd, Q_zz]] is added
        # to it only once one passes, and never formed
        if not first._blocks(Q[:p, :p], Q_xs, None, tol, limit):
            return False
        S = first.take_state().S_zz  # the update -Q_sx Q_xx^-1 Q_xs over s = [d; z]
        assert S is not None
        S[:m, :m] += Q[p:, p:]
        S[:m, m:] += Q_uz[p:]
        S[m:, :m] += Q_uz[p:].T
        S[m:, m:] += Q_zz
        second = Elimination(S[:m, :m], S[:m, m:], S[m:, m:], tol, self.stage, limit=limit)
        self.first, self.second, self.p = first, second, p
        self.kind = f"{first.kind}+{second.kind}"
        self.pivots = torch.cat([first.pivots, second.pivots])
        self.growth = max(first.growth, second.growth)
        self.num_delayed = second.num_delayed
        self.S_zz, self.S_dz, self.S_dd = second.take_state()
        return True

    # ------------------------------------------------------------------------- tiers
    def _cholesky(
        self,
        Q: Tensor,
        Q_uz: Tensor | None,
        Q_zz: Tensor | None,
        tol: float,
        limit: float,
        cols: Tensor | None,
    ) -> bool:
        L, info = torch.linalg.cholesky_ex(Q)
        if int(info) != 0:
            return False
        d = torch.diagonal(L) ** 2
        if float(d.min()) <= 10 * tol:  # too close to singular to tell: rank-revealing tier
            return False
        W = None
        if Q_uz is not None:
            if cols is not None and not self._cholesky_probe(L, Q_uz, cols, limit):
                return False
            W = torch.linalg.solve_triangular(L, Q_uz, upper=False)
            # W^T W is positive semi-definite: its largest entry is on its diagonal
            self.growth = float((W * W).sum(0).max()) if W.numel() else 0.0
            if self.growth > limit:
                return False
            self.S_zz = symmetric_product(W, W, Q_zz, -1.0)  # (S2): S = Q_zz - W^T W, in place
        self.kind, self.pivots, self.L, self.W = "cholesky", d, L, W
        return True

    @staticmethod
    def _cholesky_probe(L: Tensor, Q_uz: Tensor, cols: Tensor, limit: float) -> bool:
        """The Cholesky tier's growth on the columns ``cols`` of ``Q_uz`` (`_probe_columns`):
        ``False`` when one is over ``limit`` (the full test maximises over every
        column, so it would reject the tier too). On the paper configuration's Hessian a
        stage whose factor succeeded and whose growth failed paid its full triangular
        solve, 15-19 ms; a PSD stage (the GGN), where the test always passes, pays
        ``PROBE`` of its ``a`` columns."""
        Ws = torch.linalg.solve_triangular(L, Q_uz[:, cols], upper=False)
        return bool(float((Ws * Ws).sum(0).max()) <= limit)

    def _ldl(
        self,
        Q: Tensor,
        Q_uz: Tensor | None,
        Q_zz: Tensor | None,
        tol: float,
        limit: float,
        cols: Tensor | None,
    ) -> bool:
        """Bunch-Kaufman. Its own factor serves the update and the solves where the
        update's majorant (`_update_diagonal`) stays within ``limit / TAU``; LU
        (``|L| <= 1``) where it does not (`_lu_update`). Either way the tier is accepted
        when the update's entries stay within ``limit`` (S2)."""
        if Q_uz is None:  # no Schur update (the dense engine, a first stage): one factor
            return self._ldl_alone(Q, tol)
        # Bunch-Kaufman for the inertia and the determinant (Sylvester over D's blocks)
        LD, piv, info = torch.linalg.ldl_factor_ex(Q)
        mu = _block_eigenvalues(LD, piv) if int(info) == 0 else Q.new_zeros(0)
        if int(info) != 0 or float(mu.abs().min()) <= 10 * tol:
            return False
        bk = BunchKaufman.of(LD, piv)
        own = True  # whether Bunch-Kaufman's factor forms the update
        if cols is not None:
            passes, own = self._probe(bk, Q_uz, cols, limit)
            if not passes:
                return False
        if own:
            W = bk.half(Q_uz)
            Z = bk.dinv(W)
            diag, majorant = self._update_diagonal(bk, W, Z)
            if not maxabs(diag) <= limit:
                return False
            if majorant <= limit / TAU:
                if not _column_probe(diag, lambda c: W.T @ Z[:, c], limit):
                    return False
                U = symmetric_product(W, Z, None, -1.0)  # -W^T D^-1 W
                self.growth = maxabs(U)
                if not self.growth <= limit:
                    return False
                self.S_zz = U if Q_zz is None else U.add_(Q_zz)  # (S2), in U's memory
                self.kind, self.pivots, self.bk, self.W = "ldl", mu, bk, W
                self.LU = self.K = None
                return True
        return self._lu_update(Q, Q_uz, Q_zz, tol, limit, mu)

    @staticmethod
    def _probe(bk: BunchKaufman, Q_uz: Tensor, cols: Tensor, limit: float) -> tuple[bool, bool]:
        """The update's diagonal and majorant on the columns ``cols`` of ``Q_uz``
        (`_probe_columns`): whether the diagonal stays within ``limit`` (``False``: the full
        test, which maximises over every column, would reject the tier too), and whether
        the majorant stays within ``limit / TAU`` (``False``: LU forms the update)."""
        W = bk.half(Q_uz[:, cols])
        diag, majorant = Elimination._update_diagonal(bk, W, bk.dinv(W))
        return maxabs(diag) <= limit, majorant <= limit / TAU

    @staticmethod
    def _update_diagonal(bk: BunchKaufman, W: Tensor, Z: Tensor) -> tuple[Tensor, float]:
        """For ``W = L^-1 P^T Q_uz`` (some of its columns) and ``Z = D^-1 W``: the
        diagonal of the update ``W^T D^-1 W``, and the largest entry of
        the majorant ``|W|^T |D^-1| |W| <= (g_j + g_l) / 2`` entrywise,
        ``g = (r W^2).sum(0)`` with ``r`` the row sums of ``|D^-1|`` (1x1 blocks:
        ``|W|^T |D^-1| |W|``'s diagonal itself). The majorant bounds the update's entries
        and the rounding of the product that forms it; Bunch-Kaufman's ``L`` is not
        bounded, so ``W`` may be large where the update is not (cancellation), and then
        LU serves the tier instead."""
        if not W.numel():
            return W.new_zeros(W.shape[1]), 0.0
        r = bk.dinv(W.new_ones(W.shape[0], 1), absolute=True)[:, 0]  # |D^-1| 1
        return (W * Z).sum(0), float((W * W).T.mv(r).max())

    def _lu_update(
        self,
        Q: Tensor,
        Q_uz: Tensor,
        Q_zz: Tensor | None,
        tol: float,
        limit: float,
        mu: Tensor,
    ) -> bool:
        """The Bunch-Kaufman tier's update through LU (``|L| <= 1``), where Bunch-Kaufman's
        own factor would form it with cancellation: ``K = -Q_uu^-1 Q_uz``, ``S = Q_zz +
        Q_zu K``."""
        LU, lpiv, info = torch.linalg.lu_factor_ex(Q)
        if int(info) != 0 or float(torch.diagonal(LU).abs().min()) <= 10 * tol:
            return False
        K = -torch.linalg.lu_solve(LU, lpiv, Q_uz)  # K = -Q_uu^-1 Q_uz
        # the update's diagonal first (O(n a)), then its columns where the diagonal is
        # largest: cheap rejections before the O(n a^2) product
        diag = (Q_uz * K).sum(0)
        if not maxabs(diag) <= limit:
            return False
        if not _column_probe(diag, lambda c: 0.5 * (Q_uz.T @ K[:, c] + K.T @ Q_uz[:, c]), limit):
            return False
        # the exact update is symmetric, LU's is not: its antisymmetric part is
        # rounding, and the symmetric part is never further from the exact one (a
        # projection). On the paper configuration the sweep's own residual went from
        # 1.6e-8 (as computed; 3.4e-7 with one triangle mirrored) to 6.7e-11.
        U = Q_uz.T @ K
        U = torch.add(U, U.T).mul_(0.5)
        self.growth = maxabs(U)
        if not self.growth <= limit:
            return False
        self.S_zz = U if Q_zz is None else U.add_(Q_zz)  # (S2), in U's memory
        self.kind, self.pivots, self.LU, self.lpiv, self.K = "ldl", mu, LU, lpiv, K
        self.bk = None
        return True

    def _ldl_alone(self, Q: Tensor, tol: float) -> bool:
        """Bunch-Kaufman alone where nothing is updated: its factor serves the solves
        (``ldl_solve``) as well as the inertia, so the LU of the same matrix, which the
        update's ``K`` needs elsewhere, is not computed (``P^3 / 3`` flops, not ``P^3``)."""
        LD, piv, info = torch.linalg.ldl_factor_ex(Q)
        mu = _block_eigenvalues(LD, piv) if int(info) == 0 else Q.new_zeros(0)
        if int(info) != 0 or float(mu.abs().min()) <= 10 * tol:
            return False
        self.kind, self.pivots, self.K, self.bk = "ldl", mu, None, None
        self.LU, self.LD, self.lpiv = None, LD, piv
        return True

    def _eigen(self, Q: Tensor, Q_uz: Tensor | None, Q_zz: Tensor | None, tol: float) -> None:
        mu, V = torch.linalg.eigh(0.5 * (Q + Q.T))
        small = mu.abs() <= tol
        if Q_uz is None:  # the first stage: no state, eliminate everything
            elim, null = ~small, small
            C = None
        else:
            C = V.T @ Q_uz
            cn = torch.linalg.vector_norm(C, dim=1)
            null = small & (cn <= tol)
            elim = ~null & (mu.abs() >= TAU * cn)  # the threshold test (S3)
        delay = ~(elim | null)
        self.E = elim.nonzero().squeeze(1)
        self.D = delay.nonzero().squeeze(1)
        self.num_delayed = int(self.D.numel())
        self.V, self.mu_E = V, mu[self.E]
        self.pivots = torch.cat([self.mu_E, mu[null]])
        self.KE: Tensor | None = None  # K_E = -mu_E^-1 C_E (None at the first stage)
        if C is not None:
            C_E = C[self.E]
            self.KE = KE = -C_E / self.mu_E[:, None]
            U = symmetric_product(C_E, KE)
            self.growth = maxabs(U)
            self.S_zz = U.add_(Q_zz)  # (S3): S = Q_zz - C_E^T diag(mu_E)^-1 C_E
            if self.num_delayed:  # (S4): the delayed directions' state
                self.S_dz, self.S_dd = C[self.D], torch.diag(mu[self.D])
        self.kind = "eigen"

    # ------------------------------------------------------------------------- sweeps
    def take_state(self) -> SweepState:
        """The state for the next stage; dropped here."""
        out = SweepState(self.S_zz, self.S_dz, self.S_dd)
        self.S_zz = self.S_dz = self.S_dd = None
        return out

    def backward(self, q: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """The backward sweep's step for the linear term ``q_u`` (``(n, R)``): returns
        ``k`` (what the forward step needs), ``Q_zu k`` (the change of ``s_z``; ``None``
        at the first stage) and ``s_d`` (the delayed directions' linear term)."""
        if "+" in self.kind:  # (S8): x's step, then d's with the linear term x's left
            p, m = self.p, self.n - self.p
            k1, corr1, _ = self.first.backward(q[:p])
            assert corr1 is not None
            k2, corr2, s_d = self.second.backward(q[p:] + corr1[:m])
            assert corr2 is not None
            return torch.cat([k1, k2]), corr1[m:] + corr2, s_d
        if self.kind == "cholesky":
            y = torch.linalg.solve_triangular(self.L, q, upper=False)
            k = -torch.linalg.solve_triangular(self.L.T, y, upper=True)
            return k, (None if self.W is None else -(self.W.T @ y)), None
        if self.kind == "ldl":
            if self.bk is not None:  # Bunch-Kaufman's factor and W = L^-1 P^T Q_uz
                z = self.bk.dinv(self.bk.half(q))
                return -self.bk.back(z), -(self.W.T @ z), None
            if self.LU is None:  # Bunch-Kaufman's own factor (`_ldl_alone`)
                return -torch.linalg.ldl_solve(self.LD, self.lpiv, q), None, None
            k = -torch.linalg.lu_solve(self.LU, self.lpiv, q)
            return k, (None if self.K is None else self.K.T @ q), None
        if self.kind == "none":
            return q[:0], None, None
        w = self.V.T @ q
        k = -w[self.E] / self.mu_E[:, None]  # (S5): k_E = -mu_E^-1 (V^T q)_E
        corr = None
        if self.KE is not None:
            corr = self.KE.T @ w[self.E]  # Q_zu k = C_E^T k_E = K_E^T (V^T q)_E
        return k, corr, (w[self.D] if self.num_delayed else None)

    def forward(self, k: Tensor, dz: Tensor | None, d: Tensor | None) -> Tensor:
        """``u`` from ``k``, the state ``dz`` and the delayed directions' values ``d``."""
        if "+" in self.kind:  # (S8): d's values first, then x's from s = [d; z]
            assert dz is not None
            u_d = self.second.forward(k[self.p :], dz, d)
            x = self.first.forward(k[: self.p], torch.cat([u_d, dz]), None)
            return torch.cat([x, u_d])
        if self.kind == "cholesky":
            if dz is None or self.W is None:
                return k
            return k - torch.linalg.solve_triangular(self.L.T, self.W @ dz, upper=True)
        if self.kind == "ldl":
            if dz is None:
                return k
            if self.bk is not None:  # K dz = -P L^-T D^-1 W dz
                return k - self.bk.back(self.bk.dinv(self.W @ dz))
            return k if self.K is None else k + self.K @ dz
        if self.kind == "none":
            return k
        w = k.new_zeros(self.n, k.shape[1])
        wE = k if (dz is None or self.KE is None) else k + self.KE @ dz
        w[self.E] = wE  # (S6): w_E = k_E + K_E dz, w_D = d, w_null = 0
        if self.num_delayed:
            w[self.D] = d
        return self.V @ w
