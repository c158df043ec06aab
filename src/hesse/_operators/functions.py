"""Exact quantities as functions of a `Problem`: thin wrappers over the operators."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from hesse._autodiff import products as _products
from hesse._autodiff.bishop import bishop_applies, bishop_hessian, bishop_route
from hesse._autodiff.problem import Problem
from hesse._operators.curvature import (
    FisherOperator,
    GGNOperator,
    HessianOperator,
    ResidualOperator,
)
from hesse._util.memory import check_memory, renamed_chunk_memory

__all__ = [
    "Decomposition",
    "decompose",
    "fisher_vp",
    "ggn",
    "ggn_vp",
    "gradient",
    "hessian",
    "hessian_blocks",
    "hvp",
    "jacobian",
    "loss_and_gradient",
]

Vector = Tensor | Sequence[Tensor]


def loss_and_gradient(problem: Problem) -> tuple[Tensor, Tensor]:
    """The objective ``L`` (a 0-dim tensor, the loss's reduction honoured over all
    batches) and its gradient ``(P,)``, in one pass over the data.

    Example:
        >>> loss, g = hesse.loss_and_gradient(problem)
    """
    return _products.loss_and_gradient(problem)


def gradient(problem: Problem) -> Tensor:
    """Gradient ``dL/dtheta``, shape ``(P,)``. Cost: one forward and backward per batch.

    Example:
        >>> g = hesse.gradient(problem); problem.unflatten(g)  # per-parameter tensors
    """
    return _products.gradient(problem)


def hvp(problem: Problem, v: Vector, method: str = "auto") -> Tensor | list[Tensor]:
    """Hessian-vector product ``H v`` (Pearlmutter 1994).

    Args:
        problem: the `Problem`.
        v: ``(P,)``, ``(P, k)`` or a list of per-parameter tensors; the result has the
            same form.
        method: ``"auto"`` (default), ``"mlp"``, ``"reverse"`` or ``"forward"``
            (`HessianOperator`'s routes).
    """
    return HessianOperator(problem, method=method) @ v


def ggn_vp(problem: Problem, v: Vector) -> Tensor | list[Tensor]:
    """Generalised Gauss-Newton-vector product ``G v = J^T H_loss J v``; ``v`` as in `hvp`."""
    return GGNOperator(problem) @ v


def fisher_vp(problem: Problem, v: Vector, kind: str = "true") -> Tensor | list[Tensor]:
    """Fisher-vector product; ``kind="true"`` or ``"empirical"`` (see `FisherOperator`)."""
    return FisherOperator(problem, kind=kind) @ v


def hessian(
    problem: Problem,
    *,
    method: str = "autodiff",
    chunk_memory: int | None = None,
    max_memory: int | None = None,
    progress: bool | None = None,
) -> Tensor:
    """Dense Hessian ``(P, P)`` of the objective, cross-parameter blocks included.

    Args:
        problem: the `Problem`.
        method: ``"autodiff"`` (default: ``P`` Hessian-vector products in
            memory-bounded chunks of columns) or ``"bishop"`` (Bishop's 1992
            propagation, for ``nn.Sequential`` MLPs of ``Linear`` layers and
            element-wise activations).
        chunk_memory: bytes of working memory per chunk of columns (default 1 GiB; the
            result's ``P^2`` numbers come on top). ``max_memory`` is its deprecated name
            (``max_memory`` is a whole budget in `factorize`, `plan`, `Laplace`).
        progress: show a progress bar (default: when stderr is a terminal).

    Cost: about ``P`` gradient evaluations (autodiff); memory ``P^2`` for the result.
    """
    chunk_memory = renamed_chunk_memory(chunk_memory, max_memory, "hesse.hessian")
    return _formed(problem, "hessian", method, chunk_memory, progress)


def _formed(
    problem: Problem, curvature: str, method: str, chunk_memory: int | None, progress: bool | None
) -> Tensor:
    """The dense Hessian or GGN by ``method`` (``"autodiff"`` or ``"bishop"``)."""
    if method == "autodiff":
        op = HessianOperator(problem) if curvature == "hessian" else GGNOperator(problem)
        return op.to_dense(chunk_memory=chunk_memory, progress=progress)
    if method == "bishop":
        return bishop_hessian(problem, curvature == "ggn", chunk_memory)
    raise ValueError(f"method must be 'autodiff' or 'bishop'; got {method!r}")


def ggn(
    problem: Problem,
    *,
    method: str = "autodiff",
    chunk_memory: int | None = None,
    max_memory: int | None = None,
    progress: bool | None = None,
) -> Tensor:
    """Dense generalised Gauss-Newton matrix ``J^T H_z J`` ``(P, P)``.

    Args:
        method: ``"autodiff"`` (default: ``P`` Gauss-Newton-vector products in chunks of
            columns) or ``"bishop"`` (Bishop's propagation with the output gradient set
            to zero, design note (B1), for the MLPs ``hessian(method="bishop")`` takes).
        chunk_memory, progress: as for `hessian`.
    """
    chunk_memory = renamed_chunk_memory(chunk_memory, max_memory, "hesse.ggn")
    return _formed(problem, "ggn", method, chunk_memory, progress)


def hessian_blocks(
    problem: Problem,
    pairs: str | Sequence[tuple[str, str]] = "diagonal",
    *,
    chunk_memory: int | None = None,
    max_memory: int | None = None,
) -> dict[tuple[str, str], Tensor]:
    """Blocks of the Hessian addressed by parameter names.

    Args:
        pairs: ``"diagonal"`` (each parameter with itself, default), ``"all"`` (every
            ordered pair, i.e. the whole Hessian cut into blocks) or a list of
            ``(row_name, col_name)`` pairs.

    Returns:
        ``{(row, col): tensor of shape row_param.shape + col_param.shape}``. Cost: one
        Hessian-vector product per column of each distinct ``col`` parameter.
    """
    chunk_memory = renamed_chunk_memory(chunk_memory, max_memory, "hesse.hessian_blocks")
    names = problem.names
    if pairs == "diagonal":
        pairs = [(n, n) for n in names]
    elif pairs == "all":
        pairs = [(a, b) for a in names for b in names]
    elif isinstance(pairs, str):
        raise ValueError(f"pairs must be 'diagonal', 'all' or a list of name pairs; got {pairs!r}")
    pairs = list(pairs)
    for a, b in pairs:
        for n in (a, b):
            if n not in problem.slices:
                raise ValueError(f"unknown parameter {n!r}; selected: {names}")
    op = HessianOperator(problem)
    shapes = dict(zip(names, problem.shapes, strict=True))
    out: dict[tuple[str, str], Tensor] = {}
    for col in dict.fromkeys(b for _, b in pairs):  # one pass of products per column block
        sl = problem.slices[col]
        cols = op.columns(range(sl.start, sl.stop), chunk_memory)
        for a, b in pairs:
            if b == col:
                out[(a, b)] = cols[problem.slices[a]].reshape((*shapes[a], *shapes[b]))
    return out


def jacobian(problem: Problem) -> Tensor:
    """Jacobian of the model's outputs w.r.t. the selected parameters,
    shape ``(N, *output_shape, P)`` over all batches (no loss weighting)."""
    return _products.jacobian(problem)


class Decomposition(NamedTuple):
    """The chain-rule split of the Hessian, ``hessian = ggn + residual`` (all ``(P, P)``).

    ``ggn = J^T (d^2 L/d f^2) J`` is the first term of seed 001's
    ``D2_z L . D_w z . D_w z + D_z L . D2_w z``, ``residual`` the second.
    """

    hessian: Tensor
    ggn: Tensor
    residual: Tensor

    def block_norms(self, problem: Problem) -> dict[str, dict[str, float]]:
        """Frobenius norms of each parameter's diagonal block of the three matrices."""
        out = {}
        for name, sl in problem.slices.items():
            out[name] = {k: float(getattr(self, k)[sl, sl].norm()) for k in self._fields}
        return out

    def layer_blocks(self, problem: Problem) -> tuple[list[str], list[int], dict[str, Tensor]]:
        """Frobenius norms of the layer-by-layer blocks of the three matrices, parameters
        grouped by module (the name before the last dot: ``"0.weight"`` and ``"0.bias"``
        form layer ``"0"``).

        Returns:
            ``(layers, parameter counts, {"hessian" | "ggn" | "residual": (L, L)})``.
        """
        groups: dict[str, list[int]] = {}
        for name, sl in problem.slices.items():
            layer = name.rsplit(".", 1)[0] if "." in name else name
            groups.setdefault(layer, []).extend(range(sl.start, sl.stop))
        idx = [torch.tensor(v, device=self.hessian.device) for v in groups.values()]
        norms = {
            k: torch.tensor([[float(getattr(self, k)[a][:, b].norm()) for b in idx] for a in idx])
            for k in self._fields
        }
        return list(groups), [len(i) for i in idx], norms


def decompose(
    problem: Problem,
    *,
    method: str = "auto",
    chunk_memory: int | None = None,
    max_memory: int | None = None,
    progress: bool | None = None,
) -> Decomposition:
    """Dense Hessian, Gauss-Newton matrix and residual, ``hessian = ggn + residual``.

    Args:
        method: ``"autodiff"``: each of the three from ``P`` products on its own (the
            residual as the Hessian of ``<dL/df, f(theta)>`` with the adjoint held
            fixed), so that ``hessian == ggn + residual`` is a check, not an identity of
            the code. ``"bishop"``: the Hessian and the Gauss-Newton matrix by Bishop's
            propagation (design note (B1)), the residual their difference: for
            ``nn.Sequential`` MLPs of ``Linear`` layers and element-wise activations,
            about 10x faster (one pass over the data a matrix instead of ``P``
            products). ``"auto"`` (default): ``"bishop"`` where it applies and its
            working memory fits in ``chunk_memory`` (default 1 GiB), else ``"autodiff"``.
        chunk_memory, progress: as for `hessian` (the ``"autodiff"`` route).

    Memory: the three ``(P, P)`` results, refused up front when they do not fit.
    """
    chunk_memory = renamed_chunk_memory(chunk_memory, max_memory, "hesse.decompose")
    if method not in ("auto", "autodiff", "bishop"):
        raise ValueError(f"method must be 'auto', 'autodiff' or 'bishop'; got {method!r}")
    P = problem.num_params
    itemsize = torch.empty((), dtype=problem.dtype).element_size()
    check_memory(
        3 * P * P * itemsize,
        f"the dense {P} x {P} Hessian, Gauss-Newton matrix and residual",
        "use the operators (HessianOperator, GGNOperator, ResidualOperator) and their "
        "products, eigs or hessian_blocks instead",
        problem.device,
    )
    reason = bishop_applies(problem) if method == "bishop" else None
    if reason is not None:
        raise ValueError(f"decompose(method='bishop'): {reason}")
    if method == "bishop" or (method == "auto" and bishop_route(problem, chunk_memory) is not None):
        H = bishop_hessian(problem, work=chunk_memory)
        G = bishop_hessian(problem, gauss_newton=True, work=chunk_memory)
        return Decomposition(hessian=H, ggn=G, residual=H - G)
    kw = {"chunk_memory": chunk_memory, "progress": progress}
    return Decomposition(
        hessian=HessianOperator(problem).to_dense(**kw),
        ggn=GGNOperator(problem).to_dense(**kw),
        residual=ResidualOperator(problem).to_dense(**kw),
    )
