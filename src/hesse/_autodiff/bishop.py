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

import torch
from torch import Tensor, nn

from hesse._autodiff import losses
from hesse._autodiff.layers import activation_derivatives, mlp_layers
from hesse._autodiff.problem import Problem

__all__ = [
    "BISHOP_WORK",
    "bishop_applies",
    "bishop_chunk",
    "bishop_hessian",
    "bishop_memory",
    "bishop_route",
    "mlp_layers",
]


class _Layout:
    """Bishop's augmented layout, layer ``k`` contributing the rows of ``[W_k | b_k]``
    (``u_k (u_{k-1} + 1)`` entries), and the map to the problem's flat order."""

    def __init__(
        self, layers: list[tuple[str, nn.Linear, list[nn.Module]]], names: list[str]
    ) -> None:
        self.sizes, index_of, offset = [], {}, 0
        for name, lin, _ in layers:
            u_out, u_in = lin.out_features, lin.in_features
            cols = u_in + (lin.bias is not None)
            pos = torch.arange(u_out * cols).reshape(u_out, cols) + offset
            index_of[f"{name}.weight"] = pos[:, :u_in].reshape(-1)
            if lin.bias is not None:
                index_of[f"{name}.bias"] = pos[:, u_in]
            self.sizes.append(u_out * cols)
            offset += u_out * cols
        missing = [n for n in names if n not in index_of]
        if missing:
            raise ValueError(
                "Bishop's method differentiates Linear weights and biases only; cannot "
                f"place {missing}"
            )
        self.total = offset
        self.starts = [sum(self.sizes[:k]) for k in range(len(self.sizes))]
        self.order = torch.cat([index_of[n] for n in names])  # problem order -> augmented


def _forward(
    layers: list[tuple[str, nn.Linear, list[nn.Module]]], x: Tensor
) -> tuple[list[Tensor], list[Tensor], list[Tensor], Tensor]:
    """``zhat_k = [z_k, 1]`` (the input of layer ``k + 1``), ``h'(a_k)``, ``h''(a_k)`` per
    layer, and the network's output."""
    zhat, d1s, d2s = [], [], []
    z = x
    for _, lin, acts in layers:
        one = torch.ones(z.shape[0], 1, dtype=z.dtype, device=z.device)
        zhat.append(torch.cat([z, one], 1) if lin.bias is not None else z)
        a = z @ lin.weight.detach().T + (lin.bias.detach() if lin.bias is not None else 0.0)
        z, d1, d2 = activation_derivatives(acts, a)
        d1s.append(d1)
        d2s.append(d2)
    return zhat, d1s, d2s, z


def _add_batch(
    H: Tensor, lay: _Layout, Ws: list[Tensor], x: Tensor, fwd: tuple, dEdz: Tensor, Hz: Tensor
) -> None:
    """Add one batch's Hessian (Bishop eq. 13) to ``H`` in the augmented layout. A
    numerical kernel: the propagations of the module docstring, in one piece."""
    zhat, d1s, d2s, _z = fwd
    K = len(Ws)
    # sigma^(K) and d^2E/da_K^2 = diag(h') Hz diag(h') + diag(h'' dE/dz)
    sig: list[Tensor] = [None] * K  # type: ignore[list-item]
    sig[K - 1] = d1s[-1] * dEdz
    Ha = d1s[-1][:, :, None] * Hz * d1s[-1][:, None, :] + torch.diag_embed(d2s[-1] * dEdz)
    back: list[Tensor] = [None] * K  # type: ignore[list-item]  # W_{m+1}^T sigma^{(m+1)}
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
            r0, c0, rs, cs = lay.starts[k], lay.starts[m], lay.sizes[k], lay.sizes[m]
            blk = blk.reshape(rs, cs)
            H[r0 : r0 + rs, c0 : c0 + cs] += blk
            if m > k:
                H[c0 : c0 + cs, r0 : r0 + rs] += blk.T


def bishop_memory(problem: Problem, chunk: int | None = None) -> int:
    """Bytes of working memory `bishop_hessian` needs beyond its ``(P, P)`` result for
    ``chunk`` samples at a time (default: the largest batch): per layer ``k`` the
    derivatives ``g`` and ``b`` ``(n, u_l, u_k)`` over the later layers, and the largest
    block contraction's intermediate ``(n, inputs_k, u_m, u_k)`` (an upper bound; measured
    peaks are below it). Linear in ``n``."""
    _pre, layers = mlp_layers(problem.model)
    n = max(problem.batch_sizes, default=0) if chunk is None else chunk
    outs = [lin.out_features for _, lin, _ in layers]
    ins = [lin.in_features + (lin.bias is not None) for _, lin, _ in layers]
    itemsize = torch.empty((), dtype=problem.dtype).element_size()
    worst = 0
    for k in range(len(layers)):
        later = sum(outs[k:])
        blocks = max(ins[k] * outs[m] for m in range(k, len(layers)))
        worst = max(worst, n * outs[k] * (2 * later + blocks))
    return worst * itemsize


def bishop_chunk(problem: Problem, work: float | None = None) -> int:
    """The most samples Bishop's propagation takes at a time within ``work`` bytes
    (default `BISHOP_WORK`): the largest batch when it fits, else fewer (each batch is
    propagated in slices of this many samples; the sum over samples is the same), 0 when
    not even one sample fits. Across ranks, the largest batch of any rank (a collective:
    every rank decides alike)."""
    per_sample = bishop_memory(problem, 1)
    largest = max(problem.batch_sizes, default=0)
    if problem.group is not None:  # one answer on every rank: a rank's shard may be empty
        largest = int(problem.group.max(largest, "largest batch of Bishop's propagation"))
    budget = BISHOP_WORK if work is None else work
    return int(min(largest, budget // max(per_sample, 1)))


def bishop_applies(problem: Problem) -> str | None:
    """``None`` when `bishop_hessian` takes ``problem`` (an ``nn.Sequential`` MLP, every
    selected parameter a Linear weight or bias used once and still the model's, no
    module hooks, tensor inputs), else why not.
    The inputs' and outputs' shapes are checked by `bishop_hessian` itself, on its first
    batch."""
    try:
        _Layout(mlp_layers(problem.model)[1], problem.names)  # every parameter placed
    except ValueError as err:
        return str(err)
    why = problem._direct_refusal()  # it reads the Linear weights, never runs forward
    if why is not None:
        return why
    if problem.parameters.aliases:
        return "the model shares parameters (tied weights or a module used twice)"
    inputs = next(iter(problem.batches()), (None,))[0]
    if inputs is not None and not isinstance(inputs, Tensor):
        return f"the inputs are a {type(inputs).__name__}, not one tensor"
    return None


BISHOP_WORK = 2**30
"""The working memory (bytes) Bishop's propagation may take when a caller chooses it
over ``P`` products by itself: the bound the products' column chunks keep to."""


def bishop_route(problem: Problem, work: float | None = None) -> int | None:
    """Bishop's working memory (bytes, at `bishop_chunk`'s slice of samples) when
    `bishop_hessian` takes ``problem`` within ``work`` (default `BISHOP_WORK`), else
    ``None``: the one rule by which the dense engine, the plan's prediction of it and
    `decompose` choose Bishop's propagation over ``P`` products."""
    if bishop_applies(problem) is not None:
        return None
    chunk = bishop_chunk(problem, work)
    return bishop_memory(problem, chunk) if chunk >= 1 else None


def bishop_hessian(
    problem: Problem, gauss_newton: bool = False, work: float | None = None
) -> Tensor:
    """Dense Hessian ``(P, P)`` of an MLP by Bishop's forward/backward propagation, or
    with ``gauss_newton=True`` its generalised Gauss-Newton matrix ``J^T H_z J``.

    The model must be an ``nn.Sequential`` of ``nn.Linear`` layers and element-wise
    activations with one 2-D output ``(n, C)``, and the loss a sum of per-sample
    terms. Memory: ``O(n u^2)`` per layer pair for ``u`` units per layer and ``n``
    samples at a time, plus the ``(P, P)`` result; a batch whose working memory is over
    ``work`` bytes (default `BISHOP_WORK`) is propagated in slices of `bishop_chunk`
    samples (one at a time when not even one fits: then over ``work``).

    Every term of Bishop's propagation that is not ``J^T H_z J`` carries the output
    gradient ``dE/dz`` (through the back-propagated ``sigma`` and the ``h'' dE/dz``
    diagonals); the Gauss-Newton matrix is the same propagation with ``dE/dz = 0``
    (design note (B1)).
    """
    problem.parameters.refuse_shared(
        "Bishop's method", "Use hesse.hessian(problem): it differentiates through every use."
    )
    why = problem._direct_refusal()
    if why is not None:
        raise ValueError(
            f"Bishop's method computes from the Linear weights, not by running the model: "
            f"{why}. Use hesse.hessian(problem) (method='autodiff'), which runs it as it is"
        )
    pre_fn, layers = mlp_layers(problem.model)
    lay = _Layout(layers, problem.names)
    H = torch.zeros(lay.total, lay.total, dtype=problem.dtype, device=problem.device)
    Ws = [lin.weight.detach() for _, lin, _ in layers]
    chunk = max(bishop_chunk(problem, work), 1)
    for inputs, targets, w in problem.batches():
        with torch.no_grad():
            x = pre_fn(inputs)
        if x.ndim != 2:
            raise ValueError(
                f"Bishop's method needs inputs of shape (n, features); got "
                f"{tuple(x.shape)} after the leading modules"
            )
        fwd = _forward(layers, x)
        z = fwd[3]
        # the loss's derivatives over the whole batch (its reduction counts the batch),
        # then the propagation in slices of samples: H is a sum over samples
        dEdz = losses.output_gradient(problem.loss_fn, z, targets, w)
        if gauss_newton:
            dEdz = torch.zeros_like(dEdz)
        Hz = losses.output_hessian_blocks(problem.loss_fn, z, targets, w)
        for a in range(0, x.shape[0], chunk):
            sl = slice(a, a + chunk)
            part = ([t[sl] for t in fwd[0]], [t[sl] for t in fwd[1]], [t[sl] for t in fwd[2]])
            _add_batch(H, lay, Ws, x[sl], (*part, z[sl]), dEdz[sl], Hz[sl])
    idx = lay.order.to(problem.device)
    return problem.reduce(H[idx][:, idx], "Bishop's Hessian")  # the ranks' samples summed
