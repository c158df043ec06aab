"""Per-sample gradients: each sample's term of the objective, differentiated.

With the objective ``L = sum_b w_b loss_b`` (`hesse.Problem`), sample ``i``'s term is
``w_i loss_fn(f(x_i), y_i)`` evaluated on a batch of one (``w_i = 1 / N`` for
``reduction="mean"``, ``1`` for ``"sum"``), so the rows sum to the gradient of ``L``
(for losses that are a sum over samples: every ``nn`` loss hesse takes, cross-entropy's
``ignore_index`` aside).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, vmap

from hesse._autodiff.losses import weighted_loss
from hesse._autodiff.problem import Problem, map_tensors, tensor_leaves
from hesse._util.calls import swapped_call
from hesse._util.memory import check_memory

__all__ = ["per_sample_gradient_chunks", "per_sample_gradients"]


def _one(t: Tensor) -> Tensor:
    return t[None]


def _chunk_gradients(problem: Problem, inputs: Any, targets: Any, w: float) -> Tensor:
    """``(n, P)`` for one batch: ``vmap`` of ``grad`` over its samples, else a loop."""
    names = problem.names
    n = problem._batch_size(inputs, targets, 0)
    ps = [p.detach() for p in problem.params]
    weight = 1.0 / problem.num_samples if problem.reduction == "mean" else 1.0
    del w  # the batch's weight is for whole batches; a sample's is `weight`

    def term(params: list[Tensor], x: Any, t: Any) -> Tensor:
        mapping = dict(zip(names, params, strict=True))
        args, kwargs = ((), x) if isinstance(x, dict) else (x, None)
        if not isinstance(args, tuple):
            args = (args,)
        out = problem.select(swapped_call(problem.model, mapping, args, kwargs))
        return weighted_loss(problem.loss_fn, out, t, weight)

    leaves = list(tensor_leaves(inputs)) + list(tensor_leaves(targets))
    if all(t.ndim and t.shape[0] == n for t in leaves) and not problem.random:
        try:
            gs = vmap(lambda x, t: grad(term)(ps, map_tensors(x, _one), map_tensors(t, _one)))(
                inputs, targets
            )
            return torch.cat([g.reshape(n, -1) for g in gs], 1)
        except Exception:  # no batching rule: the loop below is exact too
            pass
    rows = []
    for i in range(n):

        def pick(t: Tensor, i: int = i) -> Tensor:
            return t[i : i + 1] if t.ndim and t.shape[0] == n else t

        gs = grad(term)(ps, map_tensors(inputs, pick), map_tensors(targets, pick))
        rows.append(torch.cat([g.reshape(-1) for g in gs]))
    return torch.stack(rows)


def per_sample_gradient_chunks(problem: Problem) -> Iterator[Tensor]:
    """The per-sample gradients batch by batch: ``(n_b, P)`` for each batch, in order
    (the memory of one batch's rows at a time)."""
    for inputs, targets, w in problem.batches():
        yield _chunk_gradients(problem, inputs, targets, w)


def per_sample_gradients(problem: Problem) -> Tensor:
    """Each sample's term of the objective differentiated: ``(N, P)`` whose rows sum to
    `hesse.gradient` (module docstring: ``w_i = 1 / N`` for ``reduction="mean"``).
    Batched with ``torch.func.vmap`` where the model allows, else one sample at a time.
    The ``N x P`` result is checked against the memory available before any work; use
    `per_sample_gradient_chunks` to stream it batch by batch."""
    if problem.distributed:
        raise ValueError(
            "per_sample_gradients returns this process's samples only: build the Problem "
            "with process_group='local' (each rank then gets its own shard's rows)"
        )
    item = torch.empty((), dtype=problem.dtype).element_size()
    check_memory(
        2.0 * problem.num_samples * problem.num_params * item,
        f"the per-sample gradients ({problem.num_samples} x {problem.num_params})",
        "stream them with hesse.per_sample_gradient_chunks, or use fewer samples or "
        "parameters (params=)",
        problem.device,
    )
    return torch.cat(list(per_sample_gradient_chunks(problem)))
