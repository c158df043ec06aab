"""The primitives everything else is built from.

All functions take a `Problem` and a flat matrix ``V`` of shape ``(P, k)`` (``k``
right-hand sides) and return ``(P, k)``. Per batch, the expensive part (the forward
pass, the gradient graph) is built once and reused for all ``k`` columns; the columns
go through one batched backward (``is_grads_batched``) where the model allows it, and
through a loop otherwise.

Curvature matrices in the Gauss-Newton family are ``J^T Lambda J`` with ``J`` the
Jacobian of the model's outputs w.r.t. the parameters and ``Lambda`` a symmetric
output-space matrix (block diagonal over samples):

- GGN: ``Lambda`` = Hessian of the (weighted) loss w.r.t. the outputs;
- true Fisher: ``Lambda = c E_{y ~ p(y|f)}[grad_f l grad_f l^T]`` (closed form);
- empirical Fisher: ``Lambda = c grad_f l_n grad_f l_n^T`` per sample.

Here ``L = c sum_n l_n`` with ``l_n`` the per-sample loss summed over its output
elements and ``c`` the reduction factor (``1/N`` for cross-entropy with
``reduction="mean"``, ``1/(N C)`` for MSE / BCE with ``"mean"``, ``1`` for ``"sum"``),
the convention of curvlinops.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from hesse._autodiff import losses, rop
from hesse._autodiff.kernels import check_twice_differentiable, with_fallback
from hesse._autodiff.problem import Problem
from hesse._util.calls import swapped_call

__all__ = [
    "apply_batched",
    "empirical_fisher_diagonal_vmap",
    "ggn_matmat",
    "gradient",
    "hessian_matmat",
    "jacobian",
    "loss_and_gradient",
    "residual_matmat",
]


def _flat(
    tensors: Sequence[Tensor | None], like: Sequence[Tensor], batch: tuple[int, ...] = ()
) -> Tensor:
    """Concatenate per-parameter results (``None`` = zero) into ``(*batch, P)``."""
    parts = []
    for t, p in zip(tensors, like, strict=True):
        if t is None:
            t = torch.zeros((*batch, p.numel()), dtype=p.dtype, device=p.device)
        parts.append(t.reshape((*batch, -1)))
    return torch.cat(parts, dim=-1)


def apply_batched(
    outputs: Tensor | Sequence[Tensor | None],
    inputs: Sequence[Tensor],
    cotangents: Tensor | Sequence[Tensor],
) -> Tensor:
    """Vector-Jacobian products of ``outputs`` w.r.t. ``inputs`` for ``k`` cotangents.

    ``outputs`` is a tensor or a list of tensors; ``cotangents`` matches it with a
    leading dimension ``k`` (``(k, *output.shape)`` each). Returns ``(k, sum(numel(inputs)))``.
    One plain backward for ``k = 1``; one batched backward (``is_grads_batched``)
    otherwise, with a loop over the cotangents for operations that do not support it.
    Outputs that are ``None`` (an unused gradient) or do not require grad, and inputs on
    which ``outputs`` do not depend, contribute zeros. The graph is kept.
    """
    outs = [outputs] if isinstance(outputs, Tensor) else list(outputs)
    cots = [cotangents] if isinstance(cotangents, Tensor) else list(cotangents)
    k = cots[0].shape[0]
    inputs = list(inputs)
    pairs = [(o, c) for o, c in zip(outs, cots, strict=True) if o is not None and o.requires_grad]
    if not pairs:
        n = sum(p.numel() for p in inputs)
        return torch.zeros(k, n, dtype=cots[0].dtype, device=cots[0].device)
    outs, cots = [o for o, _ in pairs], [c for _, c in pairs]

    def one(j: int) -> Tensor:
        gs = torch.autograd.grad(
            outs, inputs, [c[j] for c in cots], retain_graph=True, allow_unused=True
        )
        return _flat(gs, inputs)

    if k == 1:
        return one(0).unsqueeze(0)
    try:  # (materialize_grads would give unused inputs zeros without the batch dimension)
        gs = torch.autograd.grad(
            outs, inputs, cots, retain_graph=True, allow_unused=True, is_grads_batched=True
        )
        return _flat(gs, inputs, batch=(k,))
    except RuntimeError:
        return torch.stack([one(j) for j in range(k)])


def _param_cotangents(problem: Problem, V: Tensor) -> list[Tensor]:
    """``(P, k)`` -> per-parameter cotangents of shape ``(k, *param.shape)`` (views; ``V``
    was validated by the caller)."""
    return [t.movedim(-1, 0) for t in problem.parameters.split(V)]


# --------------------------------------------------------------------------- first order
def loss_and_gradient(
    problem: Problem, at: Sequence[Tensor] | None = None
) -> tuple[Tensor, Tensor]:
    """Objective ``L`` and its gradient ``(P,)`` at the current parameters, or at the
    per-parameter values ``at``."""
    total: Tensor | None = None
    grad: Tensor | None = None
    for inputs, targets, w in problem.batches():
        ps = problem.leaves(at)
        loss = problem.batch_loss(problem.outputs(ps, inputs), targets, w)
        gs = torch.autograd.grad(loss, ps, allow_unused=True, materialize_grads=True)
        flat = _flat(gs, ps)
        grad = flat if grad is None else grad.add_(flat)
        total = loss.detach() if total is None else total + loss.detach()
    if grad is None:  # a rank may hold no samples: it contributes nothing
        grad = torch.zeros(problem.num_params, dtype=problem.dtype, device=problem.device)
        total = torch.zeros((), dtype=problem.dtype, device=problem.device)
    both = problem.reduce(torch.cat([grad, total.reshape(1)]), "gradient")  # one all-reduce
    return both[-1], both[:-1]


def gradient(problem: Problem) -> Tensor:
    """Gradient ``dL/dtheta`` as a flat ``(P,)`` tensor."""
    return loss_and_gradient(problem)[1]


# --------------------------------------------------------------------------- Hessian
HESSIAN_METHODS = ("auto", "mlp", "reverse", "forward")
"""The routes of ``H V``: ``"auto"`` takes ``"mlp"`` where it applies, else ``"reverse"``."""


def hessian_matmat(problem: Problem, V: Tensor, method: str = "auto") -> Tensor:
    """``H V`` for ``V`` of shape ``(P, k)``.

    ``method="auto"`` (default): ``"mlp"`` where the model is an MLP the route takes
    (`hesse._autodiff.rop.mlp_route`), else ``"reverse"``. ``"mlp"``: Pearlmutter's
    R-operator by hand over the MLP's layers (design note (P1)-(P2); about 2 gradients
    a column). ``"reverse"``: reverse-over-reverse, the gradient graph built once per
    batch and differentiated again for all columns. ``"forward"``: Pearlmutter's
    R-operator as forward-over-reverse autodiff (a dual forward pass and one backward
    per column, ``torch.autograd.forward_ad``).
    """
    HV = with_fallback(
        problem, "the Hessian-vector product", lambda: _hessian_matmat(problem, V, method)
    )
    return problem.reduce(HV, "Hessian-vector product")


def check_hessian_method(problem: Problem, method: str) -> None:
    """Refuse an unknown ``method``, or ``"mlp"`` for a problem the route does not take."""
    if method not in HESSIAN_METHODS:
        raise ValueError(f"method must be one of {HESSIAN_METHODS}; got {method!r}")
    if method == "mlp" and rop.mlp_route(problem) is None:
        raise ValueError(
            "method='mlp' needs an nn.Sequential of nn.Linear layers and element-wise "
            "activations that the problem runs as it is (its own parameters, every selected "
            "parameter a Linear weight or bias, no hooks, no output= selection); use "
            "method='auto' or 'reverse'"
        )


def _hessian_matmat(problem: Problem, V: Tensor, method: str = "auto") -> Tensor:
    """``H V`` for ``V`` of shape ``(P, k)`` (`hessian_matmat`, without the reduction
    over ranks)."""
    if method in ("auto", "mlp"):
        route = rop.mlp_route(problem)
        if route is not None:
            try:
                return rop.mlp_matmat(problem, route, V)
            except rop.NoRoute as why:
                if method == "mlp":
                    raise ValueError(f"method='mlp' cannot take {why}") from None
        elif method == "mlp":
            check_hessian_method(problem, method)
        method = "reverse"
    if method == "reverse":
        out: Tensor | None = None
        cot = _param_cotangents(problem, V)
        for inputs, targets, w in problem.batches():
            ps = problem.leaves()
            loss = problem.batch_loss(problem.outputs(ps, inputs), targets, w)
            check_twice_differentiable(problem, loss)
            gs = torch.autograd.grad(loss, ps, create_graph=True, allow_unused=True)
            HV = apply_batched(gs, ps, cot).T
            out = HV.contiguous() if out is None else out.add_(HV)
        return torch.zeros_like(V) if out is None else out  # a rank may hold no samples
    if method == "forward":
        return _hessian_matmat_forward(problem, V)
    raise ValueError(f"method must be one of {HESSIAN_METHODS}; got {method!r}")


def _hessian_matmat_forward(problem: Problem, V: Tensor) -> Tensor:
    out = torch.zeros_like(V)
    for inputs, targets, w in problem.batches():
        for j in range(V.shape[1]):
            tangents = problem.parameters.split(V[:, j])
            ps = problem.leaves()
            with fwAD.dual_level():
                duals = [fwAD.make_dual(p, t) for p, t in zip(ps, tangents, strict=True)]
                # torch 2.13: mse_loss's backward under forward AD fails on a target
                # without tangent ("ZeroTensors are immutable"); give it an explicit zero.
                tgt = (
                    fwAD.make_dual(targets, torch.zeros_like(targets))
                    if isinstance(targets, Tensor) and targets.is_floating_point()
                    else targets
                )
                loss = problem.batch_loss(problem.outputs(duals, inputs), tgt, w)
                gs = torch.autograd.grad(loss, ps, allow_unused=True, materialize_grads=True)
                tan = [fwAD.unpack_dual(g).tangent for g in gs]
            out[:, j] += _flat(tan, ps)
    return out


# --------------------------------------------------------------------------- J^T Lambda J
OutputMap = rop.OutputMap  # one definition: the MLP route takes the same maps


def _require_tensor_output(out: Any) -> Tensor:
    if not isinstance(out, Tensor):
        raise TypeError(
            "Gauss-Newton, Fisher and Jacobian products need a model whose forward "
            f"returns one tensor; got {type(out).__name__}, which has no 'logits': pass "
            "output='<field>' or a callable to hesse.Problem to select the tensor the loss "
            "takes"
        )
    return out


def _jvp_batched(out: Tensor, ps: Sequence[Tensor], V: Tensor) -> Tensor:
    """``J V`` as ``(k, *out.shape)`` by the double-vjp trick: ``J^T u`` is linear in
    ``u``, so ``J v = d/du <v, J^T u>``; one extra backward for all columns."""
    u = torch.zeros_like(out, requires_grad=True)
    gu = torch.autograd.grad(
        out, ps, u, create_graph=True, allow_unused=True, materialize_grads=True
    )
    return apply_batched(_flat(gu, ps), [u], V.T).reshape((V.shape[1], *out.shape))


def jtlj_matmat(problem: Problem, V: Tensor, output_map: OutputMap) -> Tensor:
    """``sum_b J_b^T Lambda_b J_b V`` for ``V`` of shape ``(P, k)``."""
    CV = with_fallback(
        problem, "the Gauss-Newton / Fisher product", lambda: _jtlj_matmat(problem, V, output_map)
    )
    return problem.reduce(CV, "Gauss-Newton / Fisher product")


def _jtlj_matmat(problem: Problem, V: Tensor, output_map: OutputMap, route: bool = True) -> Tensor:
    """``sum_b J_b^T Lambda_b J_b V`` for ``V`` of shape ``(P, k)``: by hand over an MLP's
    layers (`hesse._autodiff.rop`, design note (P3)) where the route applies and
    ``route``, else forward-mode ``J V`` and a backward."""
    mlp = rop.mlp_route(problem) if route else None
    if mlp is not None:
        with contextlib.suppress(rop.NoRoute):
            return rop.mlp_matmat(problem, mlp, V, output_map)
    out: Tensor | None = None
    k = V.shape[1]
    for inputs, targets, w in problem.batches():
        ps = problem.leaves()
        if k == 1:  # one forward-mode pass: cheaper than the double-vjp trick
            with fwAD.dual_level():
                duals = [
                    fwAD.make_dual(p, t)
                    for p, t in zip(ps, problem.parameters.split(V[:, 0]), strict=True)
                ]
                o_dual = _require_tensor_output(problem.outputs(duals, inputs))
                o, jv = fwAD.unpack_dual(o_dual)
            if jv is None:  # outputs do not depend on the selected parameters
                continue
            JV = jv.unsqueeze(0)
        else:
            o = _require_tensor_output(problem.outputs(ps, inputs))
            if not o.requires_grad:
                continue
            check_twice_differentiable(problem, o)  # the double-vjp trick differentiates J^T u
            JV = _jvp_batched(o, ps, V)
        LJV = output_map(o.detach(), targets, w, JV.detach())
        CV = apply_batched(o, ps, LJV).T
        out = CV.contiguous() if out is None else out.add_(CV)
    return torch.zeros_like(V) if out is None else out  # no batch depends on the parameters


def _bind(problem: Problem, product: Callable[..., Tensor]) -> OutputMap:
    """An `OutputMap` from one of `hesse._autodiff.losses`' ``Lambda`` products."""
    lf = problem.loss_fn

    def apply(o: Tensor, targets: Any, w: float, U: Tensor) -> Tensor:
        return product(lf, o, targets, w, U)

    return apply


def ggn_matmat(problem: Problem, V: Tensor) -> Tensor:
    """Generalised Gauss-Newton ``G V = sum_b J_b^T (d^2 loss_b / d f^2) J_b V``."""
    return jtlj_matmat(problem, V, _bind(problem, losses.output_hessian_product))


def residual_matmat(problem: Problem, V: Tensor) -> Tensor:
    """Residual of the chain rule, ``R V`` with ``R = sum_k (dL/df_k) d^2 f_k/dtheta^2``.

    Computed as the Hessian of ``theta -> <lam, f(theta)>`` with the output adjoint
    ``lam = dL/df`` held fixed, so that ``H = G + R`` (seed 001) holds by
    construction of neither side.
    """
    RV = with_fallback(problem, "the residual product", lambda: _residual_matmat(problem, V))
    return problem.reduce(RV, "residual product")


def _residual_matmat(problem: Problem, V: Tensor) -> Tensor:
    """Residual of the chain rule, ``R V`` with ``R = sum_k (dL/df_k) d^2 f_k/dtheta^2``.

    Computed as the Hessian of ``theta -> <lam, f(theta)>`` with the output adjoint
    ``lam = dL/df`` held fixed, so that ``H = G + R`` (seed 001) holds by
    construction of neither side.
    """
    out = torch.zeros_like(V)
    cot = _param_cotangents(problem, V)
    for inputs, targets, w in problem.batches():
        ps = problem.leaves()
        o = _require_tensor_output(problem.outputs(ps, inputs))
        if not o.requires_grad:
            continue
        check_twice_differentiable(problem, o)
        lam = losses.output_gradient(problem.loss_fn, o, targets, w)
        gs = torch.autograd.grad((lam * o).sum(), ps, create_graph=True, allow_unused=True)
        out += apply_batched(gs, ps, cot).T
    return out


# --------------------------------------------------------------------------- Fisher
def fisher_matmat(problem: Problem, V: Tensor, kind: str = "true") -> Tensor:
    """Fisher products: ``kind="true"`` (expected over the model's predictive
    distribution, exact) or ``kind="empirical"`` (observed labels)."""
    losses.fisher_loss(problem.loss_fn)
    if kind == "true":
        return jtlj_matmat(problem, V, _bind(problem, losses.true_fisher_product))
    if kind == "empirical":
        return jtlj_matmat(problem, V, _bind(problem, losses.empirical_fisher_product))
    raise ValueError(f"kind must be 'true' or 'empirical'; got {kind!r}")


# --------------------------------------------------------------------------- Jacobian
def jacobian(problem: Problem, chunk_size: int = 256) -> Tensor:
    """Jacobian of the model's outputs w.r.t. the selected parameters.

    Returns ``(N, *out_shape, P)``: the outputs of all batches concatenated along the
    first (sample) dimension, as the model returns them (no loss weighting).
    """
    J = with_fallback(problem, "the Jacobian", lambda: _jacobian(problem, chunk_size))
    if problem.group is None:
        assert J is not None
        return J
    # rows are samples: every rank's, in rank order (a rank without samples has none)
    parts = problem.group.gather_objects(None if J is None else J.cpu(), "gathering of J")
    return torch.cat([p for p in parts if p is not None]).to(problem.device)


def _jacobian(problem: Problem, chunk_size: int = 256) -> Tensor | None:
    """Jacobian of the model's outputs w.r.t. the selected parameters.

    Returns ``(N, *out_shape, P)``: the outputs of all batches concatenated along the
    first (sample) dimension, as the model returns them (no loss weighting).
    """
    rows = []
    for inputs, _targets, _w in problem.batches():
        ps = problem.leaves()
        o = _require_tensor_output(problem.outputs(ps, inputs))
        m = o.numel()
        flat_o = o.reshape(-1)
        eye = torch.eye(m, dtype=o.dtype, device=o.device)
        blocks = [
            apply_batched(flat_o, ps, eye[i : i + chunk_size]) for i in range(0, m, chunk_size)
        ]
        rows.append(torch.cat(blocks).reshape((*o.shape, problem.num_params)))
    return torch.cat(rows, dim=0) if rows else None


def empirical_fisher_diagonal_vmap(problem: Problem) -> Tensor | None:
    """The diagonal ``(P,)`` of the empirical Fisher, ``c sum_n grad l_n^2``, from
    per-sample gradients (``vmap`` of ``grad`` over each batch's samples: ``n P``
    memory, about one gradient of work); the loss must be one `FisherOperator` accepts
    and the inputs and targets tensors. ``None`` when the model cannot be vmapped over
    samples (`hesse._spectral.stochastic.empirical_fisher_diagonal` then falls back to
    products)."""
    from torch.func import grad, vmap

    lf = losses.fisher_loss(problem.loss_fn)
    per_sample = losses.per_sample_loss(lf)
    names = problem.names
    out = torch.zeros(problem.num_params, dtype=problem.dtype, device=problem.device)
    try:
        for inputs, targets, w in problem.batches():
            if not isinstance(inputs, Tensor) or not isinstance(targets, Tensor):
                raise TypeError("tensor inputs and targets needed")
            ps = [p.detach() for p in problem.params]

            def loss_i(params: list[Tensor], x: Tensor, t: Tensor) -> Tensor:
                o = swapped_call(problem.model, dict(zip(names, params, strict=True)), (x[None],))
                return per_sample(o, t[None])

            gs = vmap(grad(loss_i), in_dims=(None, 0, 0))(ps, inputs, targets)
            o = problem.outputs(ps, inputs[:1])
            c = losses.reduction_factor(lf, o.expand(inputs.shape[0], *o.shape[1:]), targets, w)
            out += c * torch.cat([(g**2).sum(0).reshape(-1) for g in gs])
    except (RuntimeError, TypeError, ValueError, NotImplementedError):
        failed = 1.0
    else:
        failed = 0.0
    if problem.group is not None:  # every rank takes the same path
        failed = problem.group.total(failed, "empirical Fisher diagonal's path")
    return None if failed else problem.reduce(out, "empirical Fisher diagonal")
