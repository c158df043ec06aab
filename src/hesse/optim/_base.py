"""What the second-order optimisers share: ``torch.optim`` conventions (parameters or
parameter groups, the closure, ``state_dict``), the selected parameters as one flat
vector (`hesse.Parameters`), weight decay (L2, with its term in the curvature, or
decoupled), the handling of non-finite losses, and data parallelism: under
``torch.distributed`` the closure's loss and gradient are reduced over the ranks with each
rank's share of the samples, so every rank takes the same step."""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from hesse._autodiff.distributed import Group, resolve_group
from hesse._autodiff.problem import Parameters, Problem
from hesse._util.checks import check_curvature, check_number

__all__ = ["Closure", "SecondOrderOptimizer"]

_DDP = nn.parallel.DistributedDataParallel

Closure = Callable[[], Tensor]

_GROUP_KEYS = {"params", "weight_decay"}


def _group_names(model: nn.Module, params: Any) -> tuple[list[str], dict[str, float] | None]:
    """The parameter names a ``params`` argument selects, and the per-name weight decay
    its groups set (``None``: no group set one). ``params`` may be names, parameter
    tensors, or ``torch.optim``-style groups (dicts with ``"params"`` and optionally
    ``"weight_decay"``)."""
    named = dict(model.named_parameters())
    by_id = {id(p): n for n, p in named.items()}

    def name_of(item: Any) -> str:
        if isinstance(item, str):
            if item not in named:
                raise ValueError(f"unknown parameter {item!r}; the model has {list(named)}")
            return item
        if isinstance(item, Tensor) and id(item) in by_id:
            return by_id[id(item)]
        raise ValueError(
            f"params must hold the model's own parameters (tensors or names); got a "
            f"{type(item).__name__} that is not one of them"
        )

    items = list(params)
    if not items or not isinstance(items[0], dict):
        return [name_of(i) for i in items], None
    names: list[str] = []
    decay: dict[str, float] = {}
    for k, group in enumerate(items):
        if not isinstance(group, dict) or "params" not in group:
            raise TypeError(f"parameter group {k} must be a dict with 'params'; got {group!r}")
        extra = set(group) - _GROUP_KEYS
        if extra:
            raise ValueError(
                f"parameter group {k} sets {sorted(extra)}: a second-order step moves all "
                "parameters together, so a group may set only 'weight_decay'"
            )
        ps = group["params"]
        members = [name_of(i) for i in ([ps] if isinstance(ps, (str, Tensor)) else ps)]
        names += members
        if "weight_decay" in group:
            decay |= dict.fromkeys(members, float(group["weight_decay"]))
    if len(set(names)) != len(names):
        raise ValueError("a parameter appears in more than one group")
    return names, decay


class SecondOrderOptimizer(torch.optim.Optimizer):
    """Shared plumbing of `HessianFree` and `ChainNewton`.

    Args:
        params_or_model: the model (``HessianFree(model, loss_fn, ...)``), or, in
            ``torch.optim`` style, the parameters or parameter groups to optimise, with
            the model as ``model=`` (``HessianFree(model.parameters(), model=model,
            loss_fn=loss_fn)``): the curvature needs the model.
        loss_fn: ``loss_fn(outputs, targets)``, for the curvature batch.
        options: the subclass's own hyperparameters (kept in ``param_groups[0]``).
        lr, damping, curvature: the step length, the initial damping and ``"ggn"`` or
            ``"hessian"``.
        params: with a model first: names, tensors or groups (default: every parameter
            that requires grad). A group may set ``weight_decay`` and nothing else.
        weight_decay: ``wd`` for the parameters whose group sets none.
        decoupled_weight_decay: ``False`` (default): L2, the objective is
            ``L + wd/2 |theta|^2``, its gradient and its curvature ``C + wd I`` include
            the term (Martens 2010 used L2 in the curvature). ``True``: after each step
            ``theta <- theta (1 - lr wd)`` (AdamW's rule), outside the model.
        process_group: data parallelism, as `hesse.Problem`'s (default: the default
            group when ``torch.distributed`` is initialised with several ranks;
            ``"local"``: this process alone). Each rank's closure evaluates its own shard
            and each rank passes its own shard of the curvature batch; the step's
            objective is the full-data one, ``sum_r (n_r / N) L_r`` for a ``"mean"`` loss
            (``n_r`` the ``samples=`` each rank passes to ``step``, ``N`` their sum) or
            ``sum_r L_r`` for ``"sum"``: one all-reduce of the loss and gradient per
            closure call, and every rank takes the same step. The closure is called on
            every rank the same number of times. A ``DistributedDataParallel`` model is
            accepted: its ``.module`` gives the curvature, and the closure runs under its
            ``no_sync()`` (hesse reduces the gradient with the ranks' shares; DDP's
            average weighs ranks equally, which is wrong for unequal shards).

    The adaptive state (damping, trust radius, counters) lives in ``param_groups[0]``
    and ``state``, so ``state_dict()`` / ``load_state_dict()`` checkpoint it.
    """

    def __init__(
        self,
        params_or_model: nn.Module | Iterable[Any],
        loss_fn: Any,
        options: dict[str, Any],
        *,
        lr: float,
        damping: float,
        curvature: str,
        model: nn.Module | None = None,
        params: Any = None,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = False,
        process_group: Any = None,
    ) -> None:
        check_curvature(curvature)
        defaults = {"lr": lr, "damping": damping, "curvature": curvature, **options}
        ddp = params_or_model if isinstance(params_or_model, _DDP) else model
        self._ddp = ddp if isinstance(ddp, _DDP) else None
        model, names, decay = self._resolve(params_or_model, model, params)
        for n in names:
            if not dict(model.named_parameters())[n].requires_grad:
                raise ValueError(f"parameter {n!r} does not require grad; it cannot be optimised")
        if not names:
            raise ValueError("no parameter requires grad: nothing to optimise")
        checked = {"lr": defaults.get("lr"), "damping": defaults.get("damping")}
        for key, value in (checked | {"weight_decay": weight_decay}).items():
            check_number(key, value, at_least=0.0, optional=True)
        self.space = Parameters(model, names)
        self._model, self._loss_fn, self._names = model, loss_fn, self.space.names
        group = resolve_group(process_group)
        self._process_group = process_group  # what the curvature problems reduce over
        self._group = Group(group) if group is not None else None
        self._reduction = getattr(loss_fn, "reduction", "mean")
        self._weight = 1.0  # this rank's share of the step's objective (distributed)
        if self._group is not None:  # refuse differing ranks before any step
            self._group.check_same_model(self.space.names, list(self.space.tensors))
        wd = [decay.get(n, weight_decay) if decay else weight_decay for n in self.space.names]
        if any(not (math.isfinite(w) and w >= 0) for w in wd):
            raise ValueError(f"weight_decay must be finite and >= 0; got {wd}")
        self._wd = self.space.flatten(
            [torch.full_like(p, w) for p, w in zip(self.space.tensors, wd, strict=True)]
        ).detach()
        self._decoupled = bool(decoupled_weight_decay)
        defaults = {**defaults, "step": 0, "skipped": 0}
        super().__init__(list(self.space.tensors), defaults)
        self.last: dict[str, Any] = {}  # statistics of the last step, for logging

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """`torch.optim.Optimizer.load_state_dict`, refusing (before anything is loaded)
        a state whose parameter groups lack this optimiser's options or hold others: the
        state of another optimiser class (a ``torch.optim.SGD``'s, a ``HessianFree``'s
        into a ``Newton``), which torch would load and the next step would fail on."""
        groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        if not isinstance(groups, list) or len(groups) != len(self.param_groups):
            got = "no param_groups" if not isinstance(groups, list) else f"{len(groups)} groups"
            raise ValueError(
                f"not a {type(self).__name__} state_dict: expected "
                f"{len(self.param_groups)} parameter group(s); got {got}"
            )
        for mine, theirs in zip(self.param_groups, groups, strict=True):
            want, have = set(mine) - {"params"}, set(theirs) - {"params"}
            if want != have:
                raise ValueError(
                    f"not a {type(self).__name__} state_dict (another optimiser's?): its "
                    f"parameter group lacks {sorted(want - have)} and has "
                    f"{sorted(have - want)} that {type(self).__name__} does not take"
                )
        super().load_state_dict(state_dict)

    @staticmethod
    def _resolve(
        first: nn.Module | Iterable[Any], model: nn.Module | None, params: Any
    ) -> tuple[nn.Module, list[str], dict[str, float] | None]:
        if isinstance(first, nn.Module):
            if model is not None:
                raise TypeError("pass the model once: first, or as model= after the params")
            model = first
        else:
            if model is None or params is not None:
                raise TypeError(
                    "with parameters first (torch.optim style), pass the model as model= "
                    "(the curvature needs it) and no params="
                )
            params = first
        if isinstance(model, _DDP):
            model = model.module  # the curvature needs double backward, which DDP lacks
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
        if params is None:
            return model, [n for n, p in model.named_parameters() if p.requires_grad], None
        names, decay = _group_names(model, [params] if isinstance(params, str) else params)
        return model, names, decay

    # ------------------------------------------------------------------ weight decay
    @property
    def l2(self) -> bool:
        """Whether an L2 term is part of the objective and its curvature."""
        return not self._decoupled and bool((self._wd > 0).any())

    def penalty(self, theta: Tensor) -> float:
        """``wd/2 |theta|^2`` of the L2 term (0 when decoupled or without decay)."""
        return 0.5 * float((self._wd * theta * theta).sum()) if self.l2 else 0.0

    @property
    def curvature_shift(self) -> float | Tensor:
        """The L2 term's curvature, a diagonal: the ``(P,)`` weight decays (0 when
        decoupled). ``op + curvature_shift`` is the objective's curvature operator."""
        return self._wd if self.l2 else 0.0

    # ------------------------------------------------------------------ flat parameters
    def _theta(self) -> Tensor:
        return self.space.vector()

    def _set(self, flat: Tensor) -> None:
        self.space.assign(flat)

    def _finish(self, theta: Tensor, step: Tensor) -> None:
        """Move to ``theta + step``; decoupled weight decay shrinks ``theta`` first."""
        if self._decoupled:
            theta = theta * (1.0 - self.param_groups[0]["lr"] * self._wd)
        self._set(theta + step)
        self.param_groups[0]["step"] += 1

    def _loss_at(self, closure: Closure, flat: Tensor) -> float:
        self._set(flat)
        loss = self._call(closure).detach().reshape(1)
        return float(self._reduce(loss, "closure's loss")) + self.penalty(flat)

    def _check_model_unchanged(self) -> None:
        """Refuse a step after the model's parameters were replaced (a new layer, or a
        parameter re-created): the step would move the tensors this optimiser holds
        while the curvature came from the new ones, and the new layer would never move."""
        named = dict(self._model.named_parameters())
        gone = [
            n for n, p in zip(self._names, self.space.tensors, strict=True) if named.get(n) is not p
        ]
        if gone:
            raise ValueError(
                f"{type(self).__name__}: the model's parameter(s) {gone[:3]} are not the "
                "tensors this optimiser was built on (a layer was replaced or a parameter "
                "re-created since); build a new optimiser for the changed model"
            )

    def _problem(self, batch: Any, name: str = "curvature_batch") -> Problem:
        if batch is None:
            raise ValueError(
                f"{type(self).__name__}.step needs {name}=(inputs, targets) for the curvature"
            )
        self._check_model_unchanged()
        return Problem(
            self._model,
            self._loss_fn,
            batch,
            params=self._names,
            process_group=self._process_group,
        )

    # ------------------------------------------------------------------ distributed
    @contextlib.contextmanager
    def _no_sync(self) -> Iterator[None]:
        """A DDP model's ``no_sync()`` (hesse reduces the gradient itself), else nothing."""
        with self._ddp.no_sync() if self._ddp is not None else contextlib.nullcontext():
            yield

    def _call(self, closure: Closure) -> Tensor:
        with torch.enable_grad(), self._no_sync():
            loss = closure()
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise TypeError(
                "the closure must return the loss as a scalar tensor (and call "
                f"backward on it); got {type(loss).__name__}"
            )
        return loss

    def _share(self, samples: int | None) -> None:
        """This rank's weight in the step's objective: ``n_r / N`` for a ``"mean"`` loss
        (``N`` from one all-reduce of the ranks' ``samples``), 1 for ``"sum"``."""
        if samples is not None and (
            isinstance(samples, bool) or not isinstance(samples, int) or samples < 0
        ):
            raise ValueError(f"samples must be an integer >= 0; got {samples!r}")
        if self._group is None or self._reduction == "sum":
            self._weight = 1.0
            return
        if samples is None:
            raise ValueError(
                f"{type(self).__name__}.step under torch.distributed with a 'mean' loss "
                "needs samples=: how many samples this rank's closure averages over (its "
                "shard of the step's batch; 0 for none), so that the step's objective is "
                "the mean over the samples of all ranks"
            )
        total = self._group.total(samples, "sample count")
        if total == 0:
            raise ValueError("samples=0 on every rank: the step's batch is empty")
        self._weight = samples / total

    def _reduce(self, t: Tensor, what: str) -> Tensor:
        """``sum_r w_r t_r`` over the ranks (``t`` itself on one process); a rank of
        weight 0 adds exact zeros, whatever its closure returned on no samples."""
        if self._group is None:
            return t
        t = t * self._weight if self._weight > 0 else torch.zeros_like(t)
        return self._group.all_reduce(t, what)

    def _start(self, closure: Closure, samples: int | None = None) -> tuple[Tensor, Tensor, bool]:
        """Evaluate the closure: ``(objective, flat gradient, skipped)``, the L2 term
        included, reduced over the ranks (``samples``: see `_share`). A non-finite loss or
        gradient skips the step (the damping is raised and a warning says so); every
        rank sees the same reduced values, so every rank decides alike."""
        self._share(samples)
        loss = self._call(closure)
        if all(p.grad is None for p in self.space.tensors):
            raise RuntimeError(
                "the closure returned a loss but left every parameter's .grad None: call "
                "loss.backward() inside it (after optimizer.zero_grad())"
            )
        loss0, g = loss.detach(), self.space.grad_vector()
        if self._group is not None:  # one all-reduce of the loss and the gradient
            both = self._reduce(torch.cat([loss0.reshape(1).to(g.dtype), g]), "closure's gradient")
            loss0, g = both[0].to(loss0.dtype), both[1:]
        if not math.isfinite(float(loss0)):
            return self._skip(loss0, "loss"), g, True
        if not bool(torch.isfinite(g).all()):
            return self._skip(loss0, "gradient"), g, True
        if self.l2:
            theta = self._theta()
            loss0 = loss0 + self.penalty(theta)
            g = g + self._wd * theta
        return loss0, g, False

    def _skip(self, loss: Tensor, what: str) -> Tensor:
        group = self.param_groups[0]
        group["skipped"] += 1
        group["damping"] = min(group["damping"] * 10.0, 1e10)
        self.last = {"skipped": True}
        warnings.warn(
            f"{type(self).__name__}: non-finite {what} at step {group['step']}; step "
            f"skipped, damping raised to {group['damping']:.3g}",
            stacklevel=4,
        )
        return loss
