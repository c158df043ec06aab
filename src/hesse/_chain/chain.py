"""A network as a chain of stages ending in its loss (design note:
docs/design/chain-curvature.md, "Setting"): the stages made from a model's modules, the
one batch they see, and the forward and backward passes that give every stage's input
and output adjoint."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from hesse._autodiff.layers import (
    ELEMENTWISE,
    flatten_sequential,
    is_sequential,
    runs_forward_of,
)
from hesse._autodiff.problem import Problem
from hesse._chain.generic import GenericStage
from hesse._chain.linear import LinearStage
from hesse._chain.stages import ElementwiseStage, IdentityStage, LossStage, Stage

__all__ = ["Chain", "make_stage", "train_mode_refusal"]


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

    Args:
        stages: the modules, one stage each, in order.
        loss_fn, data, params: as for `Problem`.
        generic: every stage through ``torch.func``'s dense derivatives of the flattened
            batch, without the structured fast paths (the same answers, slower: a
            reference for tests and ``bench/bench_chain.py``).
    """

    def __init__(
        self,
        stages: Sequence[nn.Module],
        loss_fn: Any,
        data: Any,
        params: Sequence[str | Tensor] | None = None,
        *,
        generic: bool = False,
    ) -> None:
        if isinstance(stages, nn.Module):
            raise TypeError(
                "stages must be a list of modules; use Chain.from_sequential for an nn.Sequential"
            )
        model = nn.Sequential(*stages)
        self._init(
            Problem(model, loss_fn, data, params=params),
            [(str(i), m) for i, m in enumerate(stages)],
            generic,
        )

    @classmethod
    def from_sequential(
        cls, model: nn.Module, loss_fn: Any, data: Any, params: Sequence[str | Tensor] | None = None
    ) -> Chain:
        """A chain from an ``nn.Sequential`` (nested Sequentials flattened)."""
        return cls.from_problem(Problem(model, loss_fn, data, params=params))

    @classmethod
    def from_problem(cls, problem: Problem, *, generic: bool = False) -> Chain:
        """The chain of a `Problem` whose model is an ``nn.Sequential`` (``generic`` as
        for the constructor)."""
        if not is_sequential(problem.model):
            own = (
                " (an nn.Sequential that overrides forward: not a chain of its children)"
                if isinstance(problem.model, nn.Sequential)
                else ""
            )
            raise ValueError(
                f"the chain solver needs an nn.Sequential model (or stages declared with "
                f"hesse.Chain([...])); got {type(problem.model).__name__}{own}. For other "
                "models, hesse.factorize's dense and observation-space engines "
                "(method='auto', 'dense' or 'gram') give exact solves, log-determinants and "
                "counts, and hesse.solve(..., method='cg') solves at any size."
            )
        self = cls.__new__(cls)
        self._init(problem, flatten_sequential(problem.model), generic)
        return self

    def _init(self, problem: Problem, modules: list[tuple[str, nn.Module]], generic: bool) -> None:
        problem = problem.gathered()  # distributed: the whole batch on every rank
        self.problem = problem
        self._memory_estimate: int | None = None
        self._flops_estimate = 0
        self.generic = generic  # dense derivatives everywhere (the benchmark's baseline)
        why = problem._direct_refusal()
        if why is not None:
            raise ValueError(
                f"the chain solver differentiates each stage's module by its own rule, "
                f"not by running the model: {why}. method='dense' (or 'gram' for the "
                "GGN) differentiates the model as it runs"
            )
        sel = problem.parameters
        sel.refuse_shared(
            "the chain solver",
            "Use method='dense' (or 'gram' for the GGN): they differentiate through every use.",
        )
        self.stages: list[Stage] = [make_stage(n, m, sel.within(n), generic) for n, m in modules]
        order = [n for s in self.stages for n in s.param_names]
        if order != problem.names:
            raise ValueError(
                f"the chain's stages hold parameters {order}, but the problem selects "
                f"{problem.names}; every selected parameter must belong to exactly one stage"
            )
        self.inputs, self.targets = problem.as_one_batch()
        if not isinstance(self.inputs, Tensor) or not self.inputs.is_floating_point():
            got = (
                f"{self.inputs.dtype} inputs"
                if isinstance(self.inputs, Tensor)
                else f"inputs of type {type(self.inputs).__name__}"
            )
            raise ValueError(
                "the chain solver needs one floating-point input tensor (it differentiates "
                f"every stage through its input activations); got {got}. "
                "method='dense' takes integer inputs (an nn.Embedding first), "
                "'gram' too for the GGN"
            )
        self.loss_stage = LossStage(problem.loss_fn, self.targets)
        # each stage's block of a flat vector, and x_internal = x[perm] over all stages
        # (each stage's internal order, see Stage.perm)
        self.blocks: list[slice] = []
        perms, start = [], 0
        for s in self.stages:
            self.blocks.append(slice(start, start + s.num_params))
            perms.append(start + (torch.arange(s.num_params) if s.perm is None else s.perm))
            start += s.num_params
        perm = torch.cat(perms) if perms else torch.zeros(0, dtype=torch.long)
        self.perm = None if bool((perm == torch.arange(len(perm))).all()) else perm

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
        ``m (m + a)`` a stage (and a transient ``(a + m)^2`` where the stage's parameters
        go first, design note (S8)); the estimate assumes none (the GGN never delays). Sizes
        only: computed once a chain (bisection sweeps the same chain many times)."""
        return self._estimates()[0]

    def flops_estimate(self) -> int:
        """Floating-point operations of one sweep, from the same sizes: each stage's pivot
        factorisation ``n_u^3 / 3``, its coupling ``n_u^2 a_in``, its Schur update
        ``2 n_u a_in^2`` (a product) and the forming of its blocks (`Stage.block_flops`) (the cost
        model of `hesse.plan`; delayed directions, which depend on the values, are not
        counted)."""
        return self._estimates()[1]

    def pivot_sizes(self) -> list[int]:
        """Each parameterised stage's pivot size ``n_u`` (no delayed directions), from the
        same sizes: what the eigen tier factors where a pivot is near-singular."""
        self._estimates()
        return self._pivot_sizes

    def _estimates(self) -> tuple[int, int]:
        if self._memory_estimate is None:
            self._memory_estimate, self._flops_estimate = self._estimate()
        return self._memory_estimate, self._flops_estimate

    def _estimate(self) -> tuple[int, int]:
        n = self.inputs.shape[0]
        itemsize = torch.empty((), dtype=self.inputs.dtype).element_size()
        z = self.inputs.detach()
        stored, transient, flops = 0, 0, 0
        self._pivot_sizes: list[int] = []
        with torch.no_grad():
            for index, stage in enumerate(self.stages):
                # the first stage has no state (dz_0 = 0): no coupling, no Q_zz
                a_in = z.numel() if index > 0 else 0
                z = stage.forward(z.clone())
                a_out, p = z.numel(), stage.num_params
                flops += stage.block_flops(n, a_in, a_out)
                if p == 0:  # a diagonal stage scales S in place (D S D); others form Q_zz
                    diag = isinstance(stage, ElementwiseStage | IdentityStage)
                    own = a_out * a_out if diag else 2 * a_out * a_out + 2 * a_in * a_in
                    transient = max(transient, own)
                    continue
                n_u = stage.pivot_size(a_out)
                self._pivot_sizes.append(n_u)
                wide = n_u < p
                stored += n_u * n_u + n_u * a_in + (p * n // max(a_out, 1) if wide else 0)
                # S, S A, Q_zz (in S's memory where it fits) and the tier's update
                # (the Bunch-Kaufman and eigen tiers' U; Cholesky updates Q_zz in place)
                fits = a_in * a_in <= a_out * a_out
                blocks = a_out * a_out + a_out * a_in + (0 if fits else a_in * a_in) + a_in * a_in
                blocks += 2 * n_u * a_in + (0 if wide else 2 * p * p + a_out * p)
                transient = max(transient, blocks)
                flops += n_u**3 // 3 + n_u * n_u * a_in + 2 * n_u * a_in * a_in
        a_L = z.numel()
        transient = max(transient, 3 * a_L * a_L)  # the loss Hessian: eye, grads, result
        return itemsize * (stored + transient), flops

    # ------------------------------------------------------------------------- passes
    def forward_backward(self) -> tuple[list[Tensor], list[Tensor]]:
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


def train_mode_refusal(module: nn.Module) -> str | None:
    """Why the chain cannot take ``module`` in its current (training) mode, else ``None``:
    a Dropout that draws, a BatchNorm that couples the samples."""
    if isinstance(module, nn.Dropout) and module.training and module.p > 0:
        return "Dropout in training mode makes the chain random"
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
        return (
            "BatchNorm in training mode couples the samples and updates its running "
            "statistics on every pass"
        )
    return None


def make_stage(name: str, module: nn.Module, local: list[str], generic: bool = False) -> Stage:
    """The structured stage for ``module`` if there is one, else a `GenericStage` (an
    ``nn.Linear``, ``nn.Dropout`` or ``nn.Flatten`` subclass with its own ``forward``
    too: the structured stage's closed form would not be that forward's).

    ``local`` names the module's parameters to differentiate (as in the module:
    ``"weight"``, ``"bias"``; `Parameters.within`); ``generic=True`` forces the dense
    path (the benchmark's naive baseline).
    """
    why = train_mode_refusal(module)
    if why is not None:
        raise ValueError(f"stage {name!r}: {why}; call model.eval()")
    if generic:  # the naive baseline: dense derivatives over the flattened batch
        return GenericStage(name, module, local, per_sample=False)
    if runs_forward_of(module, nn.Linear):
        return LinearStage(name, module, weight="weight" in local, bias="bias" in local)
    if isinstance(module, ELEMENTWISE) and not any(True for _ in module.parameters()):
        return ElementwiseStage(name, module)
    if (runs_forward_of(module, nn.Flatten) or runs_forward_of(module, nn.Dropout)) and not local:
        return IdentityStage(name, module)
    return GenericStage(name, module, local)
