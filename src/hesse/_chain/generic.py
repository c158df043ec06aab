"""Any module as a chain stage, with its derivatives from ``torch.func``: per-sample
blocks when the module treats samples independently (``A`` block diagonal over the
batch), else dense over the flattened batch. The reference the structured stages are
tested against, and the stage of convolutions, residual blocks and any other module."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import hessian, jacrev, vmap

from hesse._autodiff.problem import Parameters
from hesse._chain.stages import Stage, StageDerivatives
from hesse._util.calls import swapped_call

__all__ = ["GenericStage"]


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
        local = (
            [n for n, p in module.named_parameters() if p.requires_grad]
            if param_names is None
            else list(param_names)
        )
        self._space = Parameters(module, local) if local else None
        prefix = f"{name}." if name else ""
        self.param_names = [f"{prefix}{n}" for n in local]

    @property
    def num_params(self) -> int:
        return 0 if self._space is None else self._space.num_params

    def forward(self, z: Tensor) -> Tensor:
        return self.module(z)

    def _f(self, zf: Tensor, xf: Tensor, shape: torch.Size) -> Tensor:
        space = self._space
        params = {} if space is None else dict(zip(space.names, space.split(xf), strict=True))
        return swapped_call(self.module, params, (zf.view(shape),)).reshape(-1)

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
        x0 = (
            torch.zeros(0, dtype=z.dtype, device=z.device)
            if self._space is None
            else self._space.vector()
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
