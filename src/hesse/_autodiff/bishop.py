"""Bishop's exact Hessian of a multilayer perceptron (C. M. Bishop, "Exact calculation
of the Hessian matrix for the multilayer perceptron", Neural Computation 4(4), 1992).

An MLP is ``a_k = W_k z_{k-1} + b_k``, ``z_k = h_k(a_k)`` for ``k = 1..K`` and a loss
``E(z_K)``. With units indexed by their pre-activations, Bishop propagates

- forward:   ``g_{li} = da_l / da_i``  (``g^{(k,k)} = I``,
  ``g^{(l,k)} = W_l diag(h'(a_{l-1})) g^{(l-1,k)}``);
- backward:  ``sigma_n = dE/da_n``     (``sigma^{(m)} = h'(a_m) * W_{m+1}^T sigma^{(m+1)}``);
- backward:  ``b_{ni} = d sigma_n / da_i``
  (``b^{(K,k)} = (d^2E/da_K^2) g^{(K,k)}``,
  ``b^{(m,k)} = h''(a_m) g^{(m,k)} (W_{m+1}^T sigma^{(m+1)}) + h'(a_m) W_{m+1}^T b^{(m+1,k)}``),

and then, for a weight ``w_ij`` into unit ``i`` (layer ``k``) and ``w_nl`` into unit ``n``
(layer ``m >= k``),

    d^2E / dw_ij dw_nl = z_j sigma_n h'(a_l) g_li + z_j z_l b_ni        (Bishop eq. 13)

Biases are weights from a unit with ``z = 1``. Everything is summed over samples;
the loss must be a sum of per-sample terms (its output Hessian block diagonal).
This module is an independent route to the dense Hessian: the tests check it
against ``torch.func.hessian``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from hesse._autodiff.problem import Problem

__all__ = ["activation_derivatives", "bishop_hessian", "mlp_layers"]

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


def _flatten_sequential(model: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    if isinstance(model, nn.Sequential):
        out = []
        for name, child in model.named_children():
            out += _flatten_sequential(child, f"{prefix}{name}.")
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
    if not isinstance(model, nn.Sequential):
        raise ValueError(f"Bishop's method needs an nn.Sequential MLP; got {type(model).__name__}")
    pre: list[nn.Module] = []
    layers: list[tuple[str, nn.Linear, list[nn.Module]]] = []
    for name, mod in _flatten_sequential(model):
        if isinstance(mod, nn.Dropout) and not (mod.training and mod.p > 0):
            continue
        if isinstance(mod, nn.Linear):
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
        return _autograd_derivatives([m], a)
    cdf = 0.5 * (1 + torch.erf(a * math.sqrt(0.5)))
    pdf = torch.exp(-0.5 * a * a) / math.sqrt(2 * math.pi)
    return m(a), cdf + a * pdf, pdf * (2 - a * a)


def _silu(m: nn.Module, a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    s = torch.sigmoid(a)
    d1 = s * (1 + a * (1 - s))
    return m(a), d1, s * (1 - s) * (2 + a * (1 - 2 * s))


_CLOSED_FORMS: dict[type, Callable[[nn.Module, Tensor], tuple[Tensor, Tensor, Tensor]]] = {
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
    return _autograd_derivatives(mods, a)


def _autograd_derivatives(
    mods: Sequence[Callable[[Tensor], Tensor]], a: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
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


def _output_hessian(
    problem: Problem, z: Tensor, targets: Tensor | None, w: float
) -> tuple[Tensor, Tensor]:
    """Per-sample ``dE/dz`` ``(n, C)`` and ``d^2E/dz^2`` ``(n, C, C)`` of the weighted
    batch loss; one Hessian-vector product per output unit (the loss is a sum over
    samples, so each sample's block is read off the same product)."""
    z = z.detach().requires_grad_(True)
    loss = problem.batch_loss(z, targets, w)
    (g,) = torch.autograd.grad(loss, z, create_graph=True)
    C = z.shape[1]
    cols = []
    for c in range(C):
        e = torch.zeros_like(z)
        e[:, c] = 1.0
        if g.requires_grad:
            (hc,) = torch.autograd.grad(
                g, z, e, retain_graph=True, allow_unused=True, materialize_grads=True
            )
        else:
            hc = torch.zeros_like(z)
        cols.append(hc)
    return g.detach(), torch.stack(cols, dim=2)


def bishop_hessian(problem: Problem) -> Tensor:
    """Dense Hessian ``(P, P)`` of an MLP by Bishop's forward/backward propagation.

    The model must be an ``nn.Sequential`` of ``nn.Linear`` layers and element-wise
    activations with one 2-D output ``(n, C)``, and the loss a sum of per-sample
    terms. Memory: ``O(n u^2)`` per layer pair for ``u`` units per layer, plus the
    ``(P, P)`` result.
    """
    pre_fn, layers = mlp_layers(problem.model)
    # augmented layout: layer k contributes W_k (u_k x u_{k-1}) then b_k (u_k), i.e. the
    # rows of [W_k | b_k] when a bias exists; we map it to the problem's order at the end.
    aug_sizes, index_of = [], {}
    offset = 0
    for name, lin, _ in layers:
        u_out, u_in = lin.out_features, lin.in_features
        cols = u_in + (lin.bias is not None)
        pos = torch.arange(u_out * cols).reshape(u_out, cols) + offset
        index_of[f"{name}.weight"] = pos[:, :u_in].reshape(-1)
        if lin.bias is not None:
            index_of[f"{name}.bias"] = pos[:, u_in]
        aug_sizes.append(u_out * cols)
        offset += u_out * cols
    missing = [n for n in problem.names if n not in index_of]
    if missing:
        raise ValueError(
            f"Bishop's method differentiates Linear weights and biases only; cannot place {missing}"
        )
    H = torch.zeros(offset, offset, dtype=problem.dtype, device=problem.device)
    starts = [sum(aug_sizes[:k]) for k in range(len(aug_sizes))]
    K = len(layers)

    for inputs, targets, w in problem.batches():
        with torch.no_grad():
            x = pre_fn(inputs)
        if x.ndim != 2:
            raise ValueError(
                f"Bishop's method needs inputs of shape (n, features); got "
                f"{tuple(x.shape)} after the leading modules"
            )
        Ws = [lin.weight.detach() for _, lin, _ in layers]
        zhat, d1s, d2s = [], [], []  # zhat[k] = [z_k, 1] (input of layer k+1)
        z = x
        for (_, lin, acts), W in zip(layers, Ws, strict=True):
            one = torch.ones(z.shape[0], 1, dtype=z.dtype, device=z.device)
            zhat.append(torch.cat([z, one], 1) if lin.bias is not None else z)
            a = z @ W.T + (lin.bias.detach() if lin.bias is not None else 0.0)
            z, d1, d2 = activation_derivatives(acts, a)
            d1s.append(d1)
            d2s.append(d2)
        dEdz, Hz = _output_hessian(problem, z, targets, w)
        # sigma^(K) and d^2E/da_K^2 = diag(h') Hz diag(h') + diag(h'' dE/dz)
        sig = [None] * K
        sig[K - 1] = d1s[-1] * dEdz
        Ha = d1s[-1][:, :, None] * Hz * d1s[-1][:, None, :]
        Ha = Ha + torch.diag_embed(d2s[-1] * dEdz)
        back = [None] * K  # back[m] = W_{m+1}^T sigma^{(m+1)} (dE/dz_m)
        for m in range(K - 2, -1, -1):
            back[m] = sig[m + 1] @ Ws[m + 1]
            sig[m] = d1s[m] * back[m]
        n = x.shape[0]
        for k in range(K):
            # g[l] = da_l/da_k for l >= k: (n, u_l, u_k)
            g = {k: torch.eye(Ws[k].shape[0], dtype=x.dtype, device=x.device).expand(n, -1, -1)}
            for l_ in range(k + 1, K):
                g[l_] = torch.einsum("oi,ni,nik->nok", Ws[l_], d1s[l_ - 1], g[l_ - 1])
            # b[m] = d sigma^(m) / da_k for m >= k
            b = {K - 1: Ha @ g[K - 1]}
            for m in range(K - 2, k - 1, -1):
                b[m] = (d2s[m] * back[m])[:, :, None] * g[m] + d1s[m][:, :, None] * torch.einsum(
                    "ro,nrk->nok", Ws[m + 1], b[m + 1]
                )
            for m in range(k, K):
                # term 2: zhat_j^(k-1) zhat_l^(m-1) b_ni ;  term 1: zhat_j sigma_n dzhat_l/da_i
                blk = torch.einsum("sj,sl,sni->ijnl", zhat[k], zhat[m], b[m])
                if m > k:
                    D = d1s[m - 1][:, :, None] * g[m - 1]  # dz_{m-1}/da_k: (n, u_{m-1}, u_k)
                    if zhat[m].shape[1] > D.shape[1]:  # bias input has zero derivative
                        D = torch.cat([D, torch.zeros_like(D[:, :1])], 1)
                    blk = blk + torch.einsum("sj,sn,sli->ijnl", zhat[k], sig[m], D)
                r0, c0 = starts[k], starts[m]
                blk = blk.reshape(aug_sizes[k], aug_sizes[m])
                H[r0 : r0 + aug_sizes[k], c0 : c0 + aug_sizes[m]] += blk
                if m > k:
                    H[c0 : c0 + aug_sizes[m], r0 : r0 + aug_sizes[k]] += blk.T
    idx = torch.cat([index_of[n] for n in problem.names]).to(problem.device)
    return H[idx][:, idx]
