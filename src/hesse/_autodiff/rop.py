"""Curvature products of a multilayer perceptron by hand: Pearlmutter's R-operator
(design note (P1)-(P3)) without autograd's graph.

An MLP is ``a_l = z_{l-1} W_l^T + b_l``, ``z_l = h_l(a_l)`` for ``l = 1..K`` (``h_l`` an
element-wise activation, or none) and a loss ``E(z_K)``. Along a direction
``v = (dW_l, db_l)`` the tangents are propagated forward,

    Ra_l = Rz_{l-1} W_l^T + z_{l-1} dW_l^T + db_l,   Rz_l = h_l'(a_l) Ra_l,   Rz_0 = 0  (P1)

and the gradient's back-propagation ``delta_l = h_l'(a_l) dE/dz_l``, ``dE/dz_{l-1} =
delta_l W_l`` is differentiated along them:

    R(dE/dz_K) = Lambda Rz_K
    R delta_l = h_l'(a_l) R(dE/dz_l) + h_l''(a_l) Ra_l dE/dz_l
    R(dE/dz_{l-1}) = R delta_l W_l + delta_l dW_l                                     (P2)
    (H v)_{W_l} = R delta_l^T z_{l-1} + delta_l^T Rz_{l-1},   (H v)_{b_l} = sum_n R delta_l

with ``Lambda`` the loss's Hessian in its outputs. Every term that carries ``dE/dz`` is the
residual of the chain rule; without them (``dE/dz = 0``) the same passes are
``J^T Lambda J v`` (P3), and with any other output map ``Lambda`` (the Fisher's) its
``J^T Lambda J v``. Per column this is one forward pass and a tangent pass and a
backward pass of matrix products: about 2 gradients for ``H v`` and 1.3 for ``G v``
(two graphs less than reverse-over-reverse and forward-mode autodiff build).

The route applies to an ``nn.Sequential`` of ``nn.Linear`` layers and parameter-free
element-wise activations (`hesse._autodiff.layers.mlp_layers`) that the problem runs as
it is (its own parameters, no hooks, no ``output=`` selection, tensor inputs); the
products take autograd's route otherwise. The tests check it against ``torch.func``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hesse._autodiff import losses
from hesse._autodiff.layers import activation_derivatives, mlp_layers, module_hook

__all__ = ["NoRoute", "mlp_matmat", "mlp_route"]

OutputMap = Callable[[Tensor, Any, float, Tensor], Tensor]
"""``(outputs, targets, weight, U) -> Lambda U`` for ``U`` of shape ``(k, *outputs.shape)``."""


class NoRoute(Exception):  # noqa: N818 (a signal, not an error)
    """The problem's data does not take the MLP route (found on a batch: autograd's
    route then computes the whole product)."""


@dataclass
class _Layer:
    W: Tensor  # the layer's weight (detached view of the model's own)
    b: Tensor | None
    acts: list[nn.Module]
    w: slice | None  # the weight's rows in a flat (P, k) vector, None: not selected
    bb: slice | None


@dataclass
class MLPRoute:
    pre: Callable[[Tensor], Tensor]
    layers: list[_Layer]


def mlp_route(problem: Any) -> MLPRoute | None:
    """The MLP route of ``problem`` (its layers and where their parameters sit in a flat
    vector), or ``None`` where the products must take autograd's route: a model that is
    not an MLP of ``nn.Linear`` layers (their own ``forward``) and element-wise
    activations, a selected parameter outside them or shared, a forward the problem does
    not run as it is (parameters assigned since, gradient hooks, training-mode buffers,
    module hooks), or an ``output=`` selection."""
    if problem.output is not None or problem.parameters.aliases:
        return None
    if not problem._runs_as_is() or module_hook(problem.model) is not None:
        return None
    try:
        pre, layers = mlp_layers(problem.model)
    except ValueError:
        return None
    where = {
        id(t): problem.parameters.slices[n]
        for n, t in zip(problem.names, problem.params, strict=True)
    }
    out, placed = [], 0
    for _name, lin, acts in layers:
        w = where.get(id(lin.weight))
        bb = where.get(id(lin.bias)) if lin.bias is not None else None
        placed += (w is not None) + (bb is not None)
        b = None if lin.bias is None else lin.bias.detach()
        out.append(_Layer(lin.weight.detach(), b, acts, w, bb))
    if placed != len(problem.names):  # a selected parameter outside the Linear layers
        return None
    return MLPRoute(pre, out)


CACHE_BYTES = 2**27
"""The most memory (bytes) the forward passes kept at one point may take (`_Cache`)."""


@dataclass
class _Forward:
    """One batch's forward pass: each layer's input ``z_{l-1}``, ``h'(a_l)``, ``h''(a_l)``,
    the output, the loss's gradient in it (once a Hessian product asked), and the batch
    it was computed on (its inputs, targets and weight, kept to compare)."""

    zs: list[Tensor]
    d1s: list[Tensor | None]
    d2s: list[Tensor | None]
    z: Tensor
    g: Tensor | None
    batch: tuple[Tensor, Any, float]

    @classmethod
    def of(cls, route: MLPRoute, inputs: Any, targets: Any, weight: float) -> _Forward:
        if not isinstance(inputs, Tensor):
            raise NoRoute(f"inputs of type {type(inputs).__name__}")
        with torch.no_grad():
            x = route.pre(inputs).detach()
        if x.ndim != 2 or not x.is_floating_point():
            raise NoRoute(f"inputs of shape {tuple(x.shape)}")
        zs, d1s, d2s = [], [], []
        z = x
        for L in route.layers:
            zs.append(z)
            a = F.linear(z, L.W, L.b)
            if L.acts:
                z, d1, d2 = activation_derivatives(L.acts, a)
            else:
                z, d1, d2 = a, None, None
            d1s.append(d1)
            d2s.append(d2)
        t = targets.detach().clone() if isinstance(targets, Tensor) else targets
        return cls(zs, d1s, d2s, z, None, (inputs.detach().clone(), t, weight))

    def holds(self, inputs: Any, targets: Any, weight: float) -> bool:
        """Whether this pass was computed on exactly this batch (values compared: an
        in-place edit of the data is seen)."""
        x, t, w = self.batch
        if w != weight or not isinstance(inputs, Tensor) or not _same(x, inputs):
            return False
        if isinstance(t, Tensor) or isinstance(targets, Tensor):
            return isinstance(t, Tensor) and isinstance(targets, Tensor) and _same(t, targets)
        return t is None and targets is None

    def nbytes(self) -> int:
        ts = [*self.zs, *self.d1s, *self.d2s, self.z, *self.batch[:2]]
        return sum(t.numel() * t.element_size() for t in ts if isinstance(t, Tensor))


def _same(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)


class _Cache:
    """The forward passes of the last point a product was taken at, kept on the problem
    (within `CACHE_BYTES`): repeated products at one point (a Krylov method, Hutchinson's
    probes, the columns of a dense matrix) then cost the tangent and backward passes
    alone (design note (P4)). The point is the values of every layer's weight and bias
    and of each batch, compared exactly on every call: a change, in place or not, makes
    the pass be computed again."""

    def __init__(self, params: list[Tensor]) -> None:
        self.params = [p.clone() for p in params]
        self.passes: dict[int, _Forward] = {}
        self.bytes = 0

    @staticmethod
    def at(problem: Any, route: MLPRoute) -> _Cache:
        params = [t for L in route.layers for t in (L.W, L.b) if t is not None]
        cache = getattr(problem, "_mlp_forward", None)
        if (
            cache is None
            or len(cache.params) != len(params)
            or not all(_same(a, b) for a, b in zip(cache.params, params, strict=True))
        ):
            cache = problem._mlp_forward = _Cache(params)
        return cache

    def forward(
        self, i: int, route: MLPRoute, inputs: Any, targets: Any, weight: float
    ) -> _Forward:
        """Batch ``i``'s pass at this point: the kept one if it holds this batch, else a
        new one (kept when it fits)."""
        kept = self.passes.get(i)
        if kept is not None and kept.holds(inputs, targets, weight):
            return kept
        fwd = _Forward.of(route, inputs, targets, weight)
        if kept is not None:
            self.bytes -= kept.nbytes()
            del self.passes[i]
        size = fwd.nbytes()
        if self.bytes + size <= CACHE_BYTES:
            self.passes[i] = fwd
            self.bytes += size
        return fwd


def mlp_matmat(
    problem: Any, route: MLPRoute, V: Tensor, output_map: OutputMap | None = None
) -> Tensor:
    """``H V`` (``output_map=None``: the Hessian, (P1)-(P2)) or ``J^T Lambda J V`` with
    ``Lambda U = output_map(outputs, targets, weight, U)`` (P3), for ``V`` ``(P, k)`` in
    the problem's flat order, summed over the problem's batches (this process's; the
    caller reduces over ranks).

    Raises:
        NoRoute: on a batch whose inputs are not one tensor of shape ``(n, features)``
            after the modules before the first ``Linear``.
    """
    hessian = output_map is None
    k = V.shape[1]
    layers = route.layers
    # the direction per layer as matrices whose products take all k columns at once:
    # dW^T (i, k o) for the tangents, dW (o, k i) for the backward's delta dW, db (k, o);
    # the tangents and adjoints are (n, k, width), contiguous, so each product over a
    # layer is one matrix product of (n k) or n rows
    dWT, dWo, dbs = [], [], []
    for L in layers:
        o, i_ = L.W.shape
        dW = None if L.w is None else V[L.w].T.reshape(k, o, i_)
        dWT.append(None if dW is None else dW.permute(2, 0, 1).reshape(i_, k * o))
        dWo.append(None if dW is None or not hessian else dW.permute(1, 0, 2).reshape(o, k * i_))
        dbs.append(None if L.bb is None else V[L.bb].T)
    # the first layer with a selected parameter: the backward pass stops there
    first = next(i for i, L in enumerate(layers) if L.w is not None or L.bb is not None)
    out = torch.zeros_like(V)
    cache = _Cache.at(problem, route)
    for i, (inputs, targets, weight) in enumerate(problem.batches()):
        fwd = cache.forward(i, route, inputs, targets, weight)
        zs, d1s, d2s, z = fwd.zs, fwd.d1s, fwd.d2s, fwd.z
        n = z.shape[0]
        # the tangents (P1): Ra_l and Rz_l, (n, k, width)
        Ras: list[Tensor | None] = []
        Rzs: list[Tensor | None] = []
        Rz: Tensor | None = None
        for l_, L in enumerate(layers):
            o = L.W.shape[0]
            Ra = None if dWT[l_] is None else (zs[l_] @ dWT[l_]).view(n, k, o)
            if Rz is not None:
                RzW = (Rz.reshape(n * k, -1) @ L.W.T).view(n, k, o)
                Ra = RzW if Ra is None else Ra.add_(RzW)
            if dbs[l_] is not None:
                db = dbs[l_]
                Ra = db.expand(n, k, o).contiguous() if Ra is None else Ra.add_(db)
            Ras.append(Ra)
            if Ra is not None:
                Rz = Ra if d1s[l_] is None else d1s[l_][:, None] * Ra
            Rzs.append(None if Ra is None else Rz)
        if Rz is None:  # the direction moves no selected parameter
            continue
        lf = problem.loss_fn
        U = Rz.view(n, k, *z.shape[1:]).movedim(1, 0)  # the output maps take (k, *z.shape)
        with torch.enable_grad():
            if hessian:
                c = losses.output_hessian_product(lf, z, targets, weight, U)
                if fwd.g is None:
                    fwd.g = losses.output_gradient(lf, z, targets, weight)
                g = fwd.g
            else:
                c = output_map(z, targets, weight, U)  # type: ignore[misc]
                g = None
        c = c.movedim(0, 1).reshape(n, k, -1)  # back to (n, k, width), contiguous
        # the backward pass (P2): c = R(dE/dz_l) (n, k, width), g = dE/dz_l (n, width)
        for l_ in range(len(layers) - 1, -1, -1):
            L = layers[l_]
            o, i_ = L.W.shape
            d1 = d1s[l_]
            ca = c if d1 is None else c * d1[:, None]  # R delta_l
            da = None
            if g is not None:
                da = g if d1 is None else g * d1  # delta_l
                Ra = Ras[l_]
                if d1 is not None and Ra is not None:
                    ca = ca.addcmul_((d2s[l_] * g)[:, None], Ra)  # + h'' Ra dE/dz
            if L.w is not None:  # R delta^T z_{l-1} (+ delta^T Rz_{l-1}): (k, o, i)
                gW = (ca.reshape(n, k * o).T @ zs[l_]).view(k, o, i_)
                Rz_in = Rzs[l_ - 1] if l_ > 0 else None
                if da is not None and Rz_in is not None:
                    gW.add_((da.T @ Rz_in.reshape(n, k * i_)).view(o, k, i_).transpose(0, 1))
                out[L.w] += gW.view(k, -1).T
            if L.bb is not None:
                out[L.bb] += ca.sum(0).T
            if l_ <= first:
                break  # no selected parameter below: the rest of the pass is not needed
            c = (ca.reshape(n * k, o) @ L.W).view(n, k, i_)
            if da is not None:
                if dWo[l_] is not None:
                    c.add_((da @ dWo[l_]).view(n, k, i_))
                g = da @ L.W
    return out
