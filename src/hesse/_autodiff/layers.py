"""Layers that several exact methods share: the element-wise activations with their
closed-form first and second derivatives, and the structure of ``nn.Sequential`` models.
Used by Bishop's Hessian (`hesse._autodiff.bishop`) and the chain's element-wise stages
(`hesse._chain.stages`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module

__all__ = [
    "ELEMENTWISE",
    "activation_derivatives",
    "autograd_derivatives",
    "flatten_sequential",
    "mlp_layers",
]

ELEMENTWISE = (
    nn.Tanh,
    nn.Sigmoid,
    nn.ReLU,
    nn.LeakyReLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.GELU,
    nn.SiLU,
    nn.Softplus,
    nn.Mish,
    nn.Softsign,
    nn.Tanhshrink,
    nn.LogSigmoid,
    nn.Hardtanh,
    nn.Identity,
)


_HOOKS = (
    ("forward ", "_forward_hooks"),
    ("forward pre-", "_forward_pre_hooks"),
    ("backward ", "_backward_hooks"),
    ("backward pre-", "_backward_pre_hooks"),
)


def module_hook(model: nn.Module) -> str | None:
    """The first module hook that could change what ``model``'s forward or backward
    computes (one of its modules', or a global one), described for a message; ``None``
    when there is none. A route that computes from the modules' weights instead of
    running their forward (Bishop's propagation, the chain's stages, the MLP route of
    the products) would not run it."""
    for kind, attr in _HOOKS:
        if getattr(_module, "_global" + attr):
            return f"a global module {kind}hook is registered (torch.nn.modules.module)"
    for name, m in model.named_modules():
        for kind, attr in _HOOKS:
            if getattr(m, attr):
                where = f"module {name!r}" if name else "the model"
                return f"{where} ({type(m).__name__}) has a {kind}hook"
    return None


def runs_forward_of(module: nn.Module, cls: type[nn.Module]) -> bool:
    """Whether ``module`` is a ``cls`` that runs ``cls``'s own ``forward``: a subclass
    that overrides it may compute anything, so a closed form of ``cls`` is not its."""
    return isinstance(module, cls) and type(module).forward is cls.forward


def is_sequential(model: nn.Module) -> bool:
    """Whether ``model`` is an ``nn.Sequential`` that runs its children one after another
    (`runs_forward_of`): a subclass with its own ``forward`` (a residual connection, say)
    is not a chain of its children."""
    return runs_forward_of(model, nn.Sequential)


def flatten_sequential(model: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """The modules of an ``nn.Sequential`` in order, nested Sequentials flattened, each with
    its name in the model (``[("0", Linear), ("1.0", Tanh), ...]``); any other module is
    one entry, a Sequential with its own ``forward`` too (`is_sequential`)."""
    if is_sequential(model):
        out = []
        for name, child in model.named_children():
            out += flatten_sequential(child, f"{prefix}{name}.")
        return out
    return [(prefix[:-1], model)]


def mlp_layers(
    model: nn.Module,
) -> tuple[Callable[[Tensor], Tensor], list[tuple[str, nn.Linear, list[nn.Module]]]]:
    """Split an ``nn.Sequential`` MLP into an input transform and layers
    ``(name, Linear, [element-wise modules after it])``.

    Raises:
        ValueError: naming the first module that is neither ``nn.Linear`` nor an
            element-wise activation (``Flatten`` and eval-mode ``Dropout`` are
            accepted before the first ``Linear``, ``Dropout`` in eval mode anywhere).
    """
    if not is_sequential(model):
        own = " with its own forward" if isinstance(model, nn.Sequential) else ""
        raise ValueError(
            f"Bishop's method needs an nn.Sequential MLP; got {type(model).__name__}{own}"
        )
    pre: list[nn.Module] = []
    layers: list[tuple[str, nn.Linear, list[nn.Module]]] = []
    for name, mod in flatten_sequential(model):
        if runs_forward_of(mod, nn.Dropout) and not (mod.training and mod.p > 0):
            continue
        if isinstance(mod, nn.Linear):
            if not runs_forward_of(mod, nn.Linear):  # its own forward: not x W^T + b
                raise ValueError(
                    f"Bishop's method takes nn.Linear layers that run nn.Linear's forward; "
                    f"module {name!r} is {type(mod).__name__}, which overrides it"
                )
            layers.append((name, mod, []))
        elif isinstance(mod, ELEMENTWISE) or (isinstance(mod, nn.Flatten) and not layers):
            (layers[-1][2] if layers else pre).append(mod)
        else:
            raise ValueError(
                f"Bishop's method supports nn.Linear and element-wise activations; module "
                f"{name!r} is {type(mod).__name__}"
            )
    if not layers:
        raise ValueError("Bishop's method needs at least one nn.Linear layer")

    def pre_fn(x: Tensor) -> Tensor:
        for m in pre:
            x = m(x)
        return x

    return pre_fn, layers


def _tanh(_m: nn.Module, a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    t = torch.tanh(a)
    d1 = 1 - t * t
    return t, d1, -2 * t * d1


def _sigmoid(_m: nn.Module, a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    s = torch.sigmoid(a)
    d1 = s * (1 - s)
    return s, d1, d1 * (1 - 2 * s)


def _softplus(m: nn.Module, a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    # torch's softplus is linear above the threshold; its derivatives follow suit
    beta, linear = m.beta, a * m.beta > m.threshold
    s = torch.sigmoid(beta * a)
    d1 = torch.where(linear, torch.ones_like(a), s)
    d2 = torch.where(linear, torch.zeros_like(a), beta * s * (1 - s))
    return m(a), d1, d2


def _gelu(m: nn.Module, a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    if m.approximate != "none":
        return autograd_derivatives([m], a)
    cdf = 0.5 * (1 + torch.erf(a * math.sqrt(0.5)))
    pdf = torch.exp(-0.5 * a * a) / math.sqrt(2 * math.pi)
    return m(a), cdf + a * pdf, pdf * (2 - a * a)


def _silu(m: nn.Module, a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    s = torch.sigmoid(a)
    d1 = s * (1 + a * (1 - s))
    return m(a), d1, s * (1 - s) * (2 + a * (1 - 2 * s))


def _relu(m: nn.Module, a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    # autograd's derivative: 0 at a = 0 (threshold_backward), the slope there for LeakyReLU
    pos = a > 0
    slope = m.negative_slope if isinstance(m, nn.LeakyReLU) else 0.0
    z = torch.where(pos, a, a * slope)
    d1 = (
        pos.to(a.dtype)
        if slope == 0.0
        else torch.where(pos, torch.ones_like(a), torch.full_like(a, slope))
    )
    return z, d1, torch.zeros_like(a)


_CLOSED_FORMS: dict[type, Callable[[nn.Module, Tensor], tuple[Tensor, Tensor, Tensor]]] = {
    nn.ReLU: _relu,
    nn.LeakyReLU: _relu,
    nn.Tanh: _tanh,
    nn.Sigmoid: _sigmoid,
    nn.Softplus: _softplus,
    nn.GELU: _gelu,
    nn.SiLU: _silu,
}


def activation_derivatives(
    mods: Sequence[Callable[[Tensor], Tensor]], a: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """``z = h(a)``, ``h'(a)`` and ``h''(a)`` for an element-wise composition ``h`` of
    ``mods`` (shared with the chain solver's element-wise stages). Common activations
    use closed forms; any other composition goes through autograd (two passes)."""
    a = a.detach()
    if len(mods) == 1 and type(mods[0]) in _CLOSED_FORMS:
        return _CLOSED_FORMS[type(mods[0])](mods[0], a)
    return autograd_derivatives(mods, a)


def autograd_derivatives(
    mods: Sequence[Callable[[Tensor], Tensor]], a: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """`activation_derivatives` by autograd (two passes), for any element-wise ``mods``."""
    a = a.detach().requires_grad_(True)
    z = a.clone()  # in-place activations (ELU(inplace=True)) must not write into the leaf
    for m in mods:
        z = m(z)
    if not z.requires_grad:
        return a.detach(), torch.ones_like(a), torch.zeros_like(a)
    (d1,) = torch.autograd.grad(z.sum(), a, create_graph=True)
    if d1.requires_grad:
        (d2,) = torch.autograd.grad(d1.sum(), a, allow_unused=True, materialize_grads=True)
    else:
        d2 = torch.zeros_like(a)
    return z.detach(), d1.detach(), d2.detach()
