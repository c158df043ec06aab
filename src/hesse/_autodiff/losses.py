"""The loss module: the one place that dispatches on the loss function.

Everything hesse needs of a loss ``loss_fn(outputs, targets)`` goes through here: the
weighted batch loss with its shape check, the loss's Hessian with respect to the outputs
(``Lambda`` of the Gauss-Newton matrix, as products, as per-sample blocks and as a dense
matrix), and, for the losses that are negative log-likelihoods, the per-sample losses and
the closed-form Fisher matrices in output space.

Convention (curvlinops'): a weighted batch loss is ``w_b loss_b = c sum_n l_n`` with
``l_n`` the per-sample loss summed over its output elements and ``c`` the *reduction
factor*: ``w_b / N_valid`` for cross-entropy with ``reduction="mean"`` (``N_valid`` the
samples whose target is not ``ignore_index``), ``w_b / (n * elements)`` for MSE and BCE
with ``"mean"``, ``w_b`` for ``"sum"``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "FISHER_LOSSES",
    "ce_target_mass",
    "check_loss_shapes",
    "empirical_fisher_product",
    "fisher_loss",
    "output_hessian",
    "output_hessian_blocks",
    "output_hessian_product",
    "per_sample_loss",
    "per_sample_output_grads",
    "reduction_factor",
    "true_fisher_product",
    "valid_samples",
    "weighted_loss",
]

_ELEMENTWISE_LOSSES = (
    nn.MSELoss,
    nn.L1Loss,
    nn.SmoothL1Loss,
    nn.HuberLoss,
    nn.BCELoss,
    nn.BCEWithLogitsLoss,
    nn.SoftMarginLoss,
)

FISHER_LOSSES = (nn.CrossEntropyLoss, nn.MSELoss, nn.BCEWithLogitsLoss)
"""The losses that are negative log-likelihoods with a closed-form Fisher matrix."""


def _broadcast(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...] | None:
    """NumPy's broadcast of two shapes, ``None`` where they do not broadcast (as
    ``torch.broadcast_shapes``, whose first call imports half a second of ``torch._refs``)."""
    n = max(len(a), len(b))
    a, b = (1,) * (n - len(a)) + a, (1,) * (n - len(b)) + b
    out = []
    for x, y in zip(a, b, strict=True):
        if x != y and 1 not in (x, y):
            return None
        out.append(y if x == 1 else x)
    return tuple(out)


def check_loss_shapes(loss_fn: Any, outputs: Any, targets: Any) -> None:
    """Refuse the silent broadcast of element-wise losses: ``MSELoss`` of outputs
    ``(N, 1)`` against targets ``(N,)`` is the mean over an ``(N, N)`` grid, not the
    loss anyone meant (torch only warns). For any other loss (a function such as
    ``F.mse_loss``, a lambda), the shapes whose broadcast is larger than both."""
    if not (isinstance(outputs, Tensor) and isinstance(targets, Tensor)):
        return
    if outputs.shape == targets.shape:
        return
    if not isinstance(loss_fn, _ELEMENTWISE_LOSSES):
        shape = _broadcast(tuple(outputs.shape), tuple(targets.shape))
        if shape is None or shape in (tuple(outputs.shape), tuple(targets.shape)):
            return
    name = type(loss_fn).__name__ if isinstance(loss_fn, nn.Module) else "loss_fn"
    dims = ", ".join(str(d) for d in outputs.shape)
    raise ValueError(
        f"{name}: the model's outputs have shape {tuple(outputs.shape)} but the targets "
        f"{tuple(targets.shape)}; torch would broadcast them into a different loss. Reshape "
        f"the targets to the outputs' shape (e.g. y.reshape({dims}))"
    )


def weighted_loss(loss_fn: Any, outputs: Any, targets: Any, weight: float) -> Tensor:
    """``w_b * loss_fn(outputs, targets)``, refusing broadcasting targets and losses that
    do not reduce to a scalar."""
    check_loss_shapes(loss_fn, outputs, targets)
    loss = loss_fn(outputs, targets)
    if not isinstance(loss, Tensor) or loss.ndim != 0:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(
            f"loss_fn must return a scalar (0-dim) tensor; got {shape}. Use "
            "reduction='mean' or 'sum'."
        )
    return loss if weight == 1.0 else loss * weight


# ------------------------------------------------------------------ Lambda = d2 loss / d f2
def output_hessian_product(
    loss_fn: Any, outputs: Tensor, targets: Any, weight: float, U: Tensor
) -> Tensor:
    """``Lambda U`` with ``Lambda`` the Hessian of the weighted batch loss with respect to
    the outputs (autodiff, any loss), for ``U`` of shape ``(k, *outputs.shape)``; one
    batched double backward for all ``k`` columns, or in closed form for the likelihoods
    (`_likelihood_hessian_product`)."""
    closed = _likelihood_hessian_product(loss_fn, outputs, targets, weight, U)
    if closed is not None:
        return closed
    o = outputs.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(weighted_loss(loss_fn, o, targets, weight), [o], create_graph=True)
    if not g.requires_grad:  # a loss linear in its outputs
        return torch.zeros_like(U)
    k = U.shape[0]
    if k == 1:
        (hu,) = torch.autograd.grad(g, [o], U[0], allow_unused=True, materialize_grads=True)
        return hu.unsqueeze(0)
    try:
        (hu,) = torch.autograd.grad(
            g, [o], U, is_grads_batched=True, allow_unused=True, materialize_grads=True
        )
    except RuntimeError:  # an operation without a batching rule: one column at a time
        cols = [
            torch.autograd.grad(g, [o], u, retain_graph=True, materialize_grads=True)[0] for u in U
        ]
        hu = torch.stack(cols)
    return hu


def _likelihood_hessian_product(
    loss_fn: Any, o: Tensor, targets: Any, weight: float, U: Tensor
) -> Tensor | None:
    """``Lambda U`` in closed form where the loss is a likelihood whose Hessian in the
    outputs is known (module docstring): ``c s_n (diag(p) - p p^T)`` for cross-entropy
    on ``(n, C)`` outputs without class weights or label smoothing (``s_n`` its target's
    mass, `ce_target_mass`), ``2 c I`` for MSE, ``c diag(s (1 - s))`` for BCE with
    logits without weights; ``None`` for any other loss (autodiff then). Exact: the
    same derivatives, without the double backward's graph."""
    kind = type(loss_fn)
    if kind not in (nn.CrossEntropyLoss, nn.MSELoss, nn.BCEWithLogitsLoss):
        return None
    if loss_fn.reduction not in ("mean", "sum") or not isinstance(targets, Tensor):
        return None
    check_loss_shapes(loss_fn, o, targets)
    if kind is nn.CrossEntropyLoss:
        if loss_fn.weight is not None or loss_fn.label_smoothing != 0.0 or o.ndim != 2:
            return None
        if not targets.is_floating_point() and targets.shape != o.shape[:1]:
            return None
    elif o.shape != targets.shape or (
        kind is nn.BCEWithLogitsLoss
        and (loss_fn.weight is not None or loss_fn.pos_weight is not None)
    ):
        return None
    # the Fisher's closed form is the loss Hessian for these likelihoods, up to soft
    # cross-entropy targets' mass s_n (1 for labels, where it also masks ignore_index)
    out = true_fisher_product(loss_fn, o.detach(), targets, weight, U)
    if kind is nn.CrossEntropyLoss and targets.is_floating_point():
        out = out * ce_target_mass(loss_fn, o, targets)[:, None]
    return out


def output_gradient(loss_fn: Any, outputs: Tensor, targets: Any, weight: float) -> Tensor:
    """``d (w_b loss_b) / d outputs``, shaped like the outputs (the output adjoint): in
    closed form for cross-entropy over class labels (``c (softmax(o) - onehot(y))``,
    without class weights or label smoothing; ``ignore_index`` rows zero) and for MSE
    (``2 c (o - y)``), by autodiff otherwise."""
    closed = _likelihood_gradient(loss_fn, outputs.detach(), targets, weight)
    if closed is not None:
        return closed
    o = outputs.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(weighted_loss(loss_fn, o, targets, weight), [o])
    return g


def _likelihood_gradient(loss_fn: Any, o: Tensor, targets: Any, weight: float) -> Tensor | None:
    """`output_gradient` in closed form where it is short (see there); ``None``: autodiff."""
    kind = type(loss_fn)
    if kind not in (nn.CrossEntropyLoss, nn.MSELoss) or not isinstance(targets, Tensor):
        return None
    if loss_fn.reduction not in ("mean", "sum"):
        return None
    if kind is nn.MSELoss:
        if targets.shape != o.shape or targets.dtype != o.dtype:
            return None
        return (2.0 * reduction_factor(loss_fn, o, targets, weight)) * (o - targets.detach())
    if (
        loss_fn.weight is not None
        or loss_fn.label_smoothing != 0.0
        or o.ndim != 2
        or targets.is_floating_point()
        or targets.shape != o.shape[:1]
    ):
        return None
    valid = valid_samples(loss_fn, o, targets)
    assert valid is not None  # class labels (n,)
    c = reduction_factor(loss_fn, o, targets, weight)
    g = torch.softmax(o, dim=-1)
    rows = torch.arange(o.shape[0], device=o.device)
    g[rows, targets.where(valid, 0)] -= 1.0
    g.mul_(valid[:, None].to(g.dtype) * c)
    return g


def output_hessian(loss_fn: Any, outputs: Tensor, targets: Any, weight: float) -> Tensor:
    """The dense ``(a, a)`` Hessian of the weighted batch loss over the flattened outputs
    (``a = outputs.numel()``, sample-major), symmetrised; ``a`` products."""
    a = outputs.numel()
    eye = torch.eye(a, dtype=outputs.dtype, device=outputs.device).reshape(a, *outputs.shape)
    H = output_hessian_product(loss_fn, outputs, targets, weight, eye).reshape(a, a)
    return 0.5 * (H + H.T)


def output_hessian_blocks(loss_fn: Any, outputs: Tensor, targets: Any, weight: float) -> Tensor:
    """Per-sample blocks ``(n, C, C)`` of the loss Hessian for outputs ``(n, C)`` of a loss
    that is a sum over samples (its Hessian block diagonal): ``C`` products, column ``c``
    the unit vector ``e_c`` of every sample at once."""
    n, C = outputs.shape
    U = torch.zeros(C, n, C, dtype=outputs.dtype, device=outputs.device)
    U[torch.arange(C), :, torch.arange(C)] = 1.0
    HU = output_hessian_product(loss_fn, outputs, targets, weight, U)  # (c, n, :)
    return HU.permute(1, 2, 0)


# ----------------------------------------------------------------------------- likelihoods
def fisher_loss(loss_fn: Any) -> nn.Module:
    """``loss_fn`` when it is a likelihood hesse knows the Fisher of, else a
    `NotImplementedError` naming the supported losses."""
    if not isinstance(loss_fn, FISHER_LOSSES):
        raise NotImplementedError(
            "Fisher products need a likelihood: loss_fn must be one of "
            f"{[c.__name__ for c in FISHER_LOSSES]}; got {type(loss_fn).__name__}"
        )
    if isinstance(loss_fn, nn.CrossEntropyLoss) and (
        loss_fn.weight is not None or loss_fn.label_smoothing != 0.0
    ):
        raise NotImplementedError(
            "Fisher products for CrossEntropyLoss with class weights or "
            "label smoothing are not supported"
        )
    if isinstance(loss_fn, nn.BCEWithLogitsLoss) and (
        loss_fn.weight is not None or loss_fn.pos_weight is not None
    ):
        raise NotImplementedError(
            "Fisher products for BCEWithLogitsLoss with weights are not supported"
        )
    return loss_fn


def _check_ce_output(o: Tensor) -> None:
    if o.ndim != 2:
        raise NotImplementedError(
            f"Fisher products for CrossEntropyLoss need outputs of shape (n, C); got "
            f"{tuple(o.shape)}"
        )


def valid_samples(loss_fn: nn.Module, o: Tensor, targets: Any) -> Tensor | None:
    """The samples that count (cross-entropy's ``ignore_index``), ``(n,)`` bool; ``None``:
    all of them."""
    if (
        isinstance(loss_fn, nn.CrossEntropyLoss)
        and isinstance(targets, Tensor)
        and not targets.is_floating_point()
        and targets.ndim == 1
    ):
        return targets != loss_fn.ignore_index
    return None


def ce_target_mass(loss_fn: nn.Module, o: Tensor, targets: Any) -> Tensor:
    """Cross-entropy's loss Hessian of sample ``n`` is ``s_n (diag(p) - p p^T)`` with
    ``s_n`` the mass of its target: 1 for a class label (0 for ``ignore_index``), the
    sum of the probabilities for soft targets (multi-hot or unnormalised ones too).
    ``(n,)``; a negative mass (an indefinite loss Hessian) is refused."""
    if isinstance(targets, Tensor) and targets.is_floating_point():
        if targets.shape != o.shape:
            raise ValueError(
                f"CrossEntropyLoss: soft targets must have the outputs' shape "
                f"{tuple(o.shape)}; got {tuple(targets.shape)}"
            )
        mass = targets.detach().reshape(o.shape[0], -1).sum(1).to(o.dtype)
        if bool((mass < 0).any()):
            raise ValueError(
                "CrossEntropyLoss: a soft target sums to a negative mass (sample "
                f"{int((mass < 0).nonzero()[0])}); the loss is then not convex in the outputs "
                "and has no Gauss-Newton factor"
            )
        return mass
    valid = valid_samples(loss_fn, o, targets)
    ones = torch.ones(o.shape[0], dtype=o.dtype, device=o.device)
    return ones if valid is None else valid.to(o.dtype)


def reduction_factor(loss_fn: nn.Module, o: Tensor, targets: Any, weight: float) -> float:
    """``c`` of ``w_b loss_b = c sum_n l_n`` for this batch (module docstring)."""
    if loss_fn.reduction == "sum":
        return weight
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        valid = valid_samples(loss_fn, o, targets)
        count = o.shape[0] if valid is None else int(valid.sum())
        return weight / max(count, 1)
    return weight / o.numel()


def per_sample_loss(loss_fn: nn.Module) -> Callable[[Tensor, Tensor], Tensor]:
    """``(outputs, targets) -> sum_n l_n`` with ``reduction="sum"`` and the loss's own
    options (cross-entropy's ``ignore_index``)."""
    fisher_loss(loss_fn)
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        ignore = loss_fn.ignore_index

        def ce(o: Tensor, t: Tensor) -> Tensor:
            _check_ce_output(o)
            return F.cross_entropy(o, t, reduction="sum", ignore_index=ignore)

        return ce
    if isinstance(loss_fn, nn.MSELoss):
        return lambda o, t: F.mse_loss(o, t, reduction="sum")
    return lambda o, t: F.binary_cross_entropy_with_logits(o, t, reduction="sum")


def per_sample_output_grads(loss_fn: nn.Module, o: Tensor, targets: Tensor) -> Tensor:
    """``grad_f l_n`` for each sample (``l_n`` summed over its output elements; zero for a
    sample whose target is ``ignore_index``)."""
    o = o.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(per_sample_loss(loss_fn)(o, targets), [o])
    return g


def true_fisher_product(
    loss_fn: nn.Module, o: Tensor, targets: Any, weight: float, U: Tensor
) -> Tensor:
    """``Lambda U`` for ``Lambda = c E_{y~p(y|f)}[grad_f l grad_f l^T]`` in closed form:
    ``diag(p) - p p^T`` (softmax), ``2 I`` (Gaussian of MSE), ``diag(s (1 - s))``
    (Bernoulli of BCE with logits); ``U`` is ``(k, *o.shape)``. Samples whose target is
    ``ignore_index`` are not in the objective and contribute nothing."""
    c = reduction_factor(loss_fn, o, targets, weight)
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        _check_ce_output(o)
        p = torch.softmax(o, dim=-1)
        out = c * (p * U - p * (p * U).sum(-1, keepdim=True))
        valid = valid_samples(loss_fn, o, targets)
        return out if valid is None else out * valid[:, None].to(out.dtype)
    if isinstance(loss_fn, nn.MSELoss):
        return 2.0 * c * U
    s = torch.sigmoid(o)
    return c * s * (1 - s) * U


def empirical_fisher_product(
    loss_fn: nn.Module, o: Tensor, targets: Any, weight: float, U: Tensor
) -> Tensor:
    """``Lambda U`` for ``Lambda_n = c g_n g_n^T`` with ``g_n = grad_f l_n`` (the observed
    labels); ``U`` is ``(k, *o.shape)``."""
    c = reduction_factor(loss_fn, o, targets, weight)
    g = per_sample_output_grads(loss_fn, o, targets)  # (n, ...)
    dims = tuple(range(2, U.ndim))
    coef = (g.unsqueeze(0) * U).sum(dim=dims, keepdim=True) if dims else g * U
    return c * coef * g.unsqueeze(0)
