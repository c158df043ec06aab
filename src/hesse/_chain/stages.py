"""The stage interface of the chain solver and its simplest stages (design note:
docs/design/chain-curvature.md, equations (R1)-(R7)).

A stage maps the previous activations ``z_{l-1}`` (the whole batch, ``(n, ...)``) and
its own parameters ``x_l`` to ``z_l = f_l(z_{l-1}; x_l)``. The sweep sees a stage only
through `StageDerivatives`: products with ``A = df/dz`` and ``B = df/dx``, their
transposes, and the blocks of ``Q = G + [A B]^T S [A B]`` (``G`` = Hessian of
``lam . f`` over ``(z, x)`` with the adjoint ``lam`` fixed). Activations are flattened
sample-major: ``a_l = n * prod(z_l.shape[1:])``.

Structured stages never form matrices they do not need:

- `hesse._chain.linear.LinearStage` (``nn.Linear``): ``A = I_n (x) W`` (block diagonal
  over samples), ``B = Zhat (x) I_o`` with ``Zhat = [z, 1]``, ``G_zz = G_xx = 0``,
  ``G_xz[(o, j), (m, i)] = lam[m, o] delta_ij``; a wide one (more parameters than
  activations) eliminates itself in a basis of the range of ``B^T`` (W1)-(W5).
- `ElementwiseStage` (activations): ``A = diag(h'(z))``, ``G_zz = diag(lam * h''(z))``.
- `IdentityStage` (``Flatten``, eval-mode ``Dropout``): ``A = I``.
- `LossStage`: the scalar loss; only its ``G_zz`` (the loss Hessian) matters, since
  ``S_L = 0`` and ``s_L = 0``.
- `hesse._chain.generic.GenericStage` (any module, e.g. a residual block or
  ``Conv2d``): ``A``, ``B``, ``G`` from ``torch.func``, per sample (block diagonal ``A``)
  when the module treats samples independently, else dense over the flattened batch.

To add a structured stage: subclass `Stage` (``forward``, ``derivatives``,
``num_params``, ``param_names``, optionally ``perm`` and ``pivot_size``) and
`StageDerivatives` (``A``, ``At``, ``B``, ``Bt``, ``q_blocks``, optionally
``eliminate``), and return it from `hesse._chain.chain.make_stage`. The tests compare
every stage with the dense `GenericStage` and every sweep with ``torch.linalg``.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from hesse._autodiff import losses
from hesse._autodiff.layers import activation_derivatives
from hesse._factor.elimination import StageContext, StageElimination

__all__ = [
    "ElementwiseStage",
    "IdentityStage",
    "LossStage",
    "Stage",
    "StageDerivatives",
]


class StageDerivatives(abc.ABC):
    """Derivatives of one stage at its input ``z`` and output adjoint ``lam``: the only
    view of a stage that the sweep has (design note (R1)-(R4)).

    Shapes: ``a_in``, ``a_out`` activations (the whole batch, sample-major), ``p``
    parameters (in the stage's internal order, see `Stage.perm`); right-hand sides are
    columns, ``(a, R)`` or ``(p, R)``.
    """

    a_in: int
    a_out: int
    p: int

    @abc.abstractmethod
    def A(self, dz: Tensor) -> Tensor:
        """``A dz`` with ``A = d f / d z_{l-1}``: ``(a_in, R) -> (a_out, R)``."""

    @abc.abstractmethod
    def At(self, s: Tensor) -> Tensor:
        """``A^T s``: ``(a_out, R) -> (a_in, R)`` (the adjoint's back-propagation, (R4))."""

    @abc.abstractmethod
    def B(self, dx: Tensor) -> Tensor:
        """``B dx`` with ``B = d f / d x_l``: ``(p, R) -> (a_out, R)``."""

    @abc.abstractmethod
    def Bt(self, s: Tensor) -> Tensor:
        """``B^T s``: ``(a_out, R) -> (p, R)``."""

    @abc.abstractmethod
    def q_blocks(
        self, S: Tensor, gauss_newton: bool, need_z: bool
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """``(Q_zz, Q_xx, Q_xz)`` without damping (R1)-(R3): ``Q_zz = G_zz + A^T S A``,
        ``Q_xx = G_xx + B^T S B``, ``Q_xz = G_xz + B^T S A``; ``G`` is dropped for
        the Gauss-Newton matrix. ``S`` is ``S_l``, ``(a_out, a_out)``: the sweep's own
        state, which the stage may overwrite (its memory may hold ``Q_zz``: a fresh
        ``a x a`` array costs its page faults, 2-3 GB/s on the 2-core CPU, more than the
        pass itself). With ``need_z=False`` (first stage: ``dz_0 = 0``) ``Q_zz`` and
        ``Q_xz`` are not formed. A stage without parameters returns
        ``Q_xx = Q_xz = None``."""

    def eliminate(self, ctx: StageContext) -> StageElimination | None:
        """The stage's own elimination of its pivot variables ``[x; d]`` (design note
        (S1)), for a stage whose structure makes it cheaper than the dense blocks of
        `q_blocks` (a wide ``Linear`` stage: W1-W4), given the state the later stages
        left (its delayed directions included). ``None`` (the default): the sweep forms
        the blocks and eliminates them itself."""
        return None


class Stage(abc.ABC):
    """A stage: ``forward(z) -> z_next`` with parameters (possibly none).

    Attributes:
        name: a label for messages (the module's name in the model).
        param_names: names of the stage's parameters in the model, in the problem's
            order.
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
        """``p``, the number of the stage's selected parameters."""
        return 0

    @abc.abstractmethod
    def forward(self, z: Tensor) -> Tensor:
        """``z_l = f_l(z_{l-1})`` for the whole batch, samples along dim 0."""

    @abc.abstractmethod
    def derivatives(self, z: Tensor, lam: Tensor) -> StageDerivatives:
        """The stage's `StageDerivatives` at input ``z`` and output adjoint ``lam``
        (``dL/dz_l``, shaped like the output)."""

    def describe(self) -> str:
        return f"{type(self).__name__}({self.name})"

    def pivot_size(self, a_out: int) -> int:
        """The size of the stage's pivot for ``a_out`` output activations (for memory
        estimates): its number of parameters, unless its `StageDerivatives.eliminate`
        works in a smaller space."""
        return self.num_params

    def block_flops(self, n: int, a_in: int, a_out: int) -> int:
        """Floating-point operations of forming the stage's blocks of ``Q`` (R1)-(R3)
        in one sweep (the cost model of `hesse.plan`): dense ``A`` and ``B`` by default,
        ``2 a_out^2 (a_in + p)``; structured stages say less."""
        return 2 * a_out * a_out * (a_in + self.num_params)


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
        Q_zz = S.mul_(self.d1[:, None]).mul_(self.d1)  # D S D, in the state's memory
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

    def block_flops(self, n: int, a_in: int, a_out: int) -> int:
        return 2 * a_out * a_out  # diagonal A: Q_zz = D S D

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

    def block_flops(self, n: int, a_in: int, a_out: int) -> int:
        return a_out * a_out  # A = I: Q_zz = S

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
        return losses.weighted_loss(self.loss_fn, z, self.targets, self.weight)

    def derivatives(self, z: Tensor, lam: Tensor) -> StageDerivatives:
        """The loss's gradient and its dense Hessian over the flattened outputs (the loss
        module's, `hesse._autodiff.losses.output_hessian`)."""
        args = (self.loss_fn, z.detach(), self.targets, self.weight)
        g = losses.output_gradient(*args).reshape(-1)
        return _LossDerivs(g, losses.output_hessian(*args))
