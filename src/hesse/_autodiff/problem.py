"""The problem object: model + loss + data + selected parameters.

`Problem` is the only place that knows how parameters are flattened, how batches
are iterated and how the loss's reduction weights batches. Every product, operator
and check in hesse goes through it.

The objective is

    L(theta) = sum_b w_b * loss_fn(model(inputs_b; theta), targets_b)

with ``w_b = n_b / N`` for ``reduction="mean"`` (so that ``L`` is the mean over all
``N`` samples whatever the batching, batches of unequal size included) and
``w_b = 1`` for ``reduction="sum"``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import math
import numbers
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from hesse._autodiff.distributed import LOCAL as _LOCAL
from hesse._autodiff.distributed import Group, resolve_group
from hesse._autodiff.kernels import find_module
from hesse._autodiff.layers import module_hook
from hesse._autodiff.losses import weighted_loss
from hesse._util.calls import swapped_call
from hesse._util.checks import check_shift

__all__ = ["Batch", "Parameters", "Problem", "float64_problem", "map_tensors", "tensor_leaves"]

Batch = tuple[Any, Tensor | None]

_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_BATCHNORM = (nn.modules.batchnorm._BatchNorm,)


def tensor_leaves(obj: Any) -> Iterator[Tensor]:
    """Yield the tensors inside a nested tuple/list/dict structure."""
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensor_leaves(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensor_leaves(v)


def map_tensors(obj: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """Apply ``fn`` to every tensor of a nested tuple/list/dict structure."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(map_tensors(v, fn) for v in obj)
    if isinstance(obj, list):
        return [map_tensors(v, fn) for v in obj]
    return obj


def _to_cpu(obj: Any) -> Any:
    return map_tensors(obj, lambda t: t.detach().cpu())


def _refuse_padded_sampler(data: Any, group: Any) -> None:
    """A ``DistributedSampler`` that pads (``drop_last=False`` and a dataset that does not
    divide by the ranks) repeats samples: their curvature would count twice."""
    sampler = getattr(data, "sampler", None)
    if group is None or sampler is None or type(sampler).__name__ != "DistributedSampler":
        return
    total, n = getattr(sampler, "total_size", 0), len(getattr(sampler, "dataset", ()))
    if total > n:
        raise ValueError(
            f"the data's DistributedSampler pads {n} samples to {total} by repeating "
            f"{total - n}: they would be counted twice in every sum. Pass "
            "drop_last=True to the sampler (or shard the data yourself, unevenly: hesse "
            "weights each rank by its own samples)"
        )


def _refuse_changing_sampler(data: Any) -> None:
    """A ``DataLoader`` that yields other samples on each pass (a shuffling one that drops
    its last, incomplete batch; a sampler that draws with replacement or a subset)
    changes the objective between two products: every "exact" number would be of
    another function."""
    if not isinstance(data, torch.utils.data.DataLoader):
        return
    sampler = data.sampler
    if isinstance(sampler, torch.utils.data.RandomSampler) and (
        sampler.replacement or sampler.num_samples != len(sampler.data_source)
    ):
        raise ValueError(
            "the DataLoader's RandomSampler draws with replacement or a subset: each pass "
            "over the data sees other samples, so the objective changes between products. "
            "Use a fixed set of samples (shuffle=True without replacement, or a Subset)"
        )
    bs = data.batch_size
    try:
        n = len(data.dataset)  # type: ignore[arg-type]
    except TypeError:
        return
    shuffles = isinstance(sampler, torch.utils.data.RandomSampler)
    if shuffles and data.drop_last and bs and n % bs:
        raise ValueError(
            f"the DataLoader shuffles and drops its last incomplete batch ({n} samples, "
            f"batch_size={bs}): each pass drops {n % bs} other samples, so the objective "
            "changes between products. Pass drop_last=False (hesse weights each batch by "
            "its own size) or shuffle=False"
        )


def _all_finite(tensors: Sequence[Tensor]) -> bool:
    """Whether every entry is finite, by one fused norm over all tensors (a finite
    norm: all finite; a non-finite one may also be an overflow of huge entries, which
    the caller's exact check then clears)."""
    with torch.no_grad():
        present = [t.detach() for t in tensors if t.numel()]  # an empty tensor is finite
        if not present:
            return True
        norms = torch._foreach_norm(present, float("inf"))
        return bool(torch.isfinite(torch.stack(norms)).all())


def _is_single_batch(data: Any) -> bool:
    return (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and (isinstance(data[1], Tensor) or data[1] is None)
    )


class Parameters:
    """The parameters of a model selected for differentiation, and their flattening: the
    one owner of the map between a flat vector ``(P,)`` (or matrix ``(P, k)``) and
    per-parameter tensors, used by `Problem`, the chain's stages and the optimisers.

    Args:
        model: the module holding the parameters.
        params: names from ``model.named_parameters()`` or the parameter tensors
            themselves (default: every parameter that requires grad). The order is always
            that of ``named_parameters()``.

    Attributes:
        names, shapes, sizes: per parameter, in flattening order.
        num_params: ``P``.
        slices: ``{name: slice}`` of each parameter in a flat vector.
        dtype, device: shared by all selected parameters (checked).
        aliases: ``{name: [other names]}`` for each selected parameter that the model
            uses under more than one name (tied weights, a module used twice):
            ``named_parameters()`` lists it once, under ``name``.
    """

    def __init__(self, model: nn.Module, params: Sequence[str | Tensor] | None = None) -> None:
        self.names, self.tensors = _select(model, params)
        self._lay_out([tuple(p.shape) for p in self.tensors])
        self.dtype = self.tensors[0].dtype
        self.device = self.tensors[0].device
        every: dict[int, list[str]] = {}
        for n, p in model.named_parameters(remove_duplicate=False):
            every.setdefault(id(p), []).append(n)
        self.aliases = {
            n: [a for a in every[id(p)] if a != n]
            for n, p in zip(self.names, self.tensors, strict=True)
            if len(every[id(p)]) > 1
        }

    @classmethod
    def of_shapes(
        cls,
        shapes: int | Mapping[str, Sequence[int]],
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> Parameters:
        """The flattening of vectors split into tensors of the given shapes, with no model
        behind them (an operator without a `Problem`): ``shapes`` is ``P`` (one tensor
        ``"x"`` of shape ``(P,)``) or ``{name: shape}`` in flattening order. ``dtype``
        (default torch's default dtype) and ``device`` (default the CPU) are the vectors'.
        Only the flattening is available (`vector`, `assign` and `grad_vector` need a
        model)."""
        if isinstance(shapes, numbers.Integral) and not isinstance(shapes, bool):
            if shapes < 1:
                raise ValueError(f"an operator's size must be at least 1; got {shapes}")
            shapes = {"x": (int(shapes),)}
        if not isinstance(shapes, Mapping) or not shapes:
            raise TypeError(
                "shapes must be a positive int P or a non-empty dict {name: shape}; got "
                f"{shapes!r}"
            )
        out = cls.__new__(cls)
        out.names = [str(n) for n in shapes]
        out.tensors = []
        dims_of = []
        for n, shape in shapes.items():
            dims = (shape,) if isinstance(shape, numbers.Integral) else tuple(shape)
            if not all(isinstance(d, numbers.Integral) and d >= 0 for d in dims):
                raise ValueError(f"the shape of {n!r} must be non-negative ints; got {shape!r}")
            dims_of.append(tuple(int(d) for d in dims))
        out._lay_out(dims_of)
        if out.num_params < 1:
            raise ValueError(f"the shapes {dict(shapes)} hold no entries")
        out.dtype = torch.get_default_dtype() if dtype is None else dtype
        out.device = torch.device("cpu" if device is None else device)
        out.aliases = {}
        return out

    def _lay_out(self, shapes: list[tuple[int, ...]]) -> None:
        """``shapes``, ``sizes``, ``num_params`` and ``slices`` of ``self.names``'s tensors
        of these shapes, in flattening order."""
        self.shapes = shapes
        self.sizes = [math.prod(s) for s in shapes]
        self.num_params = sum(self.sizes)
        offsets = [0, *itertools.accumulate(self.sizes)]
        self.slices = {
            n: slice(a, b) for n, a, b in zip(self.names, offsets, offsets[1:], strict=False)
        }

    def vector(self) -> Tensor:
        """Current values as one flat ``(P,)`` tensor (detached)."""
        return self.flatten([p.detach() for p in self.tensors])

    def assign(self, vec: Tensor) -> None:
        """Copy a flat ``(P,)`` vector into the parameters, in place, without autograd."""
        with torch.no_grad():
            for p, v in zip(self.tensors, self.unflatten(vec), strict=True):
                p.copy_(v)

    def grad_vector(self) -> Tensor:
        """The parameters' ``.grad`` as one flat ``(P,)`` tensor (``None`` counts as 0)."""
        return self.flatten(
            [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.tensors]
        )

    def flatten(self, tensors: Sequence[Tensor]) -> Tensor:
        """Per-parameter tensors -> flat vector ``(P,)``; tensors with one extra
        trailing dimension ``k`` (shape ``param.shape + (k,)``) -> matrix ``(P, k)``."""
        tensors = list(tensors)
        if len(tensors) != len(self.shapes):
            raise ValueError(
                f"expected {len(self.shapes)} tensors (one per parameter {self.names}); "
                f"got {len(tensors)}"
            )
        extra = None
        flat = []
        for name, shape, t in zip(self.names, self.shapes, tensors, strict=True):
            if not isinstance(t, Tensor):
                raise TypeError(f"entry for {name!r} must be a tensor; got {type(t).__name__}")
            tail = tuple(t.shape[len(shape) :])
            if (
                tuple(t.shape[: len(shape)]) != shape
                or len(tail) > 1
                or (extra is not None and tail != extra)
            ):
                raise ValueError(
                    f"entry for {name!r} has shape {tuple(t.shape)}; expected {shape} "
                    f"(a vector) or {shape} + (k,) (a matrix of k columns)"
                )
            extra = tail
            flat.append(t.reshape(-1, *tail))
        return torch.cat(flat, dim=0)

    def unflatten(self, vec: Tensor) -> list[Tensor]:
        """Flat ``(P,)`` vector -> per-parameter tensors (views); ``(P, k)`` ->
        tensors of shape ``param.shape + (k,)``."""
        return self.split(self.as_flat(vec))

    def split(self, vec: Tensor) -> list[Tensor]:
        """`unflatten` without validation (for use inside ``torch.func`` transforms,
        where data-dependent checks cannot run)."""
        tail = tuple(vec.shape[1:])
        return [
            vec[sl].reshape((*shape, *tail))
            for sl, shape in zip(self.slices.values(), self.shapes, strict=True)
        ]

    def as_flat(self, v: Tensor | Sequence[Tensor], name: str = "v") -> Tensor:
        """Validate and convert a vector or matrix to the flat form ``(P,)`` or
        ``(P, k)``, on the parameters' device and dtype."""
        if isinstance(v, (list, tuple)):
            v = self.flatten(v)
        if not isinstance(v, Tensor):
            raise TypeError(
                f"{name} must be a tensor or a list of per-parameter tensors; "
                f"got {type(v).__name__}"
            )
        if v.ndim not in (1, 2) or v.shape[0] != self.num_params:
            raise ValueError(
                f"{name} has shape {tuple(v.shape)}; expected ({self.num_params},) or "
                f"({self.num_params}, k) for the {self.num_params} selected parameters"
            )
        if not (v.is_floating_point()):
            raise TypeError(f"{name} has dtype {v.dtype}; expected a floating-point dtype")
        # a finite sum: every entry finite (a nan or inf makes the sum non-finite); a
        # non-finite sum may be an overflow of finite entries, which the full test clears
        if not bool(torch.isfinite(v.sum())) and not bool(torch.isfinite(v).all()):
            raise ValueError(f"{name} has non-finite entries (nan or inf)")
        return v.to(device=self.device, dtype=self.dtype)

    def as_diagonal(
        self, value: Any, what: str = "damping", positive: bool = True
    ) -> float | Tensor:
        """A diagonal ``D`` over the parameters from what users write: a number (``D =
        eps I``, any sign: returned as a float), a ``(P,)`` tensor, a dict ``{name:
        value}`` over the selected parameters, or a sequence of values in their order
        (laplace-torch's "layerwise" prior precision), each value a number or a tensor of
        its parameter's shape. A non-scalar ``D`` must be finite and positive (finite
        only, when not ``positive``: the operator algebra's ``op + D``); the offending
        parameter is named. A ``D`` equal on every parameter comes back as a
        float."""
        if isinstance(value, Tensor) and value.ndim == 0:
            value = float(value)
        if isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
            return check_shift(what, value)
        if isinstance(value, dict):
            unknown = [k for k in value if k not in self.slices]
            if unknown:
                raise ValueError(
                    f"{what}: {unknown} are not selected parameters; the selected ones are "
                    f"{self.names}"
                )
            missing = [n for n in self.names if n not in value]
            if missing:
                raise ValueError(f"{what}: no value for the parameters {missing}")
            parts = [value[n] for n in self.names]
        elif isinstance(value, (list, tuple)):
            if len(value) != len(self.names):
                raise ValueError(
                    f"{what}: a sequence needs one value per parameter tensor "
                    f"({len(self.names)}: {self.names}); got {len(value)}"
                )
            parts = list(value)
        elif isinstance(value, Tensor):
            if value.shape != (self.num_params,):
                raise ValueError(
                    f"{what}: a tensor must have shape ({self.num_params},) (one entry per "
                    f"parameter); got {tuple(value.shape)}"
                )
            parts = self.unflatten(value.detach().to(self.device))
        else:
            raise TypeError(
                f"{what} must be a number, a ({self.num_params},) tensor, a dict "
                f"{{parameter name: value}} or a sequence of per-tensor values; got "
                f"{type(value).__name__}"
            )
        flat = []
        for name, shape, size, v in zip(self.names, self.shapes, self.sizes, parts, strict=True):
            t = torch.as_tensor(v, dtype=torch.float64).to(self.device)
            if t.ndim == 0:
                t = t.expand(size)
            elif tuple(t.shape) != shape:
                raise ValueError(
                    f"{what} for {name!r}: expected a number or a tensor of shape {shape}; "
                    f"got shape {tuple(t.shape)}"
                )
            bad = ~torch.isfinite(t) | (t <= 0) if positive else ~torch.isfinite(t)
            if bool(bad.any()):
                rule = "finite and positive" if positive else "finite"
                raise ValueError(
                    f"{what} for {name!r} must be {rule} (a diagonal D of C + D); "
                    f"got {float(t.reshape(-1)[bad.reshape(-1)][0])}"
                )
            flat.append(t.reshape(-1))
        d = torch.cat(flat)
        return float(d[0]) if bool((d == d[0]).all()) else d

    def refuse_shared(self, what: str, way_out: str) -> None:
        """Raise a `ValueError` naming the tied parameters, for a method (``what``) that
        needs each parameter used once."""
        if self.aliases:
            ties = "; ".join(
                f"{n!r} is also used as {', '.join(map(repr, a))}" for n, a in self.aliases.items()
            )
            raise ValueError(
                f"{what} needs every parameter used once, but the model shares parameters "
                f"(tied weights or a module used twice): {ties}. {way_out}"
            )

    def within(self, prefix: str) -> list[str]:
        """The selected parameters of the submodule named ``prefix``, by their names in
        that submodule (``"0"`` -> ``["weight", "bias"]`` for ``0.weight``, ``0.bias``)."""
        if not prefix:
            return list(self.names)
        return list(self._by_prefix.get(prefix, ()))

    @functools.cached_property
    def _by_prefix(self) -> dict[str, list[str]]:
        """Every module prefix of a selected name -> the names under it, relative (one
        pass over the names, so that a chain's ``L`` stages cost ``O(P_names)``, not
        ``O(L P_names)``)."""
        out: dict[str, list[str]] = {}
        for n in self.names:
            parts = n.split(".")
            for i in range(1, len(parts)):
                out.setdefault(".".join(parts[:i]), []).append(".".join(parts[i:]))
        return out


def _select(
    model: nn.Module, params: Sequence[str | Tensor] | None
) -> tuple[list[str], list[Tensor]]:
    """The names and tensors `Parameters` selects, validated."""
    named = list(model.named_parameters())
    if params is None:
        chosen = [(n, p) for n, p in named if p.requires_grad]
    else:
        if isinstance(params, (str, Tensor)):
            params = [params]
        by_name = dict(named)
        wanted_names: set[str] = set()
        for item in params:
            if isinstance(item, str):
                if item not in by_name:
                    raise ValueError(
                        f"unknown parameter name {item!r}; the model has {[n for n, _ in named]}"
                    )
                wanted_names.add(item)
            elif isinstance(item, Tensor):
                match = [n for n, p in named if p is item]
                if not match:
                    raise ValueError(
                        f"a tensor of shape {tuple(item.shape)} in params is not a "
                        "parameter of the model (pass the model's own parameters "
                        "or their names)"
                    )
                wanted_names.add(match[0])
            else:
                raise TypeError(
                    f"params must hold names (str) or parameter tensors; got {type(item).__name__}"
                )
        chosen = [(n, p) for n, p in named if n in wanted_names]
    if not chosen:
        raise ValueError(
            "no parameters selected: the model has no parameter that "
            "requires grad, or params is empty"
        )
    for n, p in chosen:
        if not (p.is_floating_point()):
            raise TypeError(
                f"parameter {n!r} has dtype {p.dtype}; only real floating-point "
                "parameters can be differentiated"
            )
    dtypes = {p.dtype for _, p in chosen}
    devices = {p.device for _, p in chosen}
    if len(dtypes) > 1 or len(devices) > 1:
        raise ValueError(
            f"selected parameters must share one dtype and device; got dtypes "
            f"{sorted(map(str, dtypes))} and devices {sorted(map(str, devices))}"
        )
    for n, p in chosen:
        if not torch.isfinite(p).all():
            raise ValueError(f"parameter {n!r} contains NaN or inf")
    return [n for n, _ in chosen], [p for _, p in chosen]


class Problem:
    """A model, a loss, data and the parameters to differentiate with respect to.

    Args:
        model: any ``torch.nn.Module``.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``; typically an ``nn`` loss
            module (``CrossEntropyLoss``, ``MSELoss``, ...) whose ``reduction`` is
            read and honoured.
        data: one ``(inputs, targets)`` batch, or an iterable of such batches (a
            list, a ``DataLoader``). ``inputs`` may be a tensor, a tuple (passed as
            positional arguments), a dict (keyword arguments) or any object the
            model's ``forward`` accepts; ``targets`` is a tensor whose first
            dimension is the batch size, or ``None`` for a loss that needs none.
        params: the parameters to differentiate with respect to, as names from
            ``model.named_parameters()`` or as the parameter tensors themselves.
            Default: all parameters that require grad. Their order is always that of
            ``named_parameters()``, which fixes the flattening.
        reduction: ``"mean"`` or ``"sum"``; only needed for a plain loss function
            without a ``reduction`` attribute and several batches (default
            ``"mean"``).
        output: which part of the model's output the loss takes (and the Gauss-Newton,
            Fisher and Jacobian products differentiate): a field or key name
            (``"logits"``), a callable (``lambda out: out[0]``), or ``None`` (default:
            the output itself, or its ``logits`` when it is a Hugging Face
            ``ModelOutput`` or a dict that has them).
        process_group: data parallelism (`hesse._autodiff.distributed`): when
            ``torch.distributed`` is initialised with several ranks (or a group is given),
            each rank passes its own shard of the data and every quantity is the
            full-data one, identical on every rank (one all-reduce per product; the mean
            is over the samples of all ranks, shards of unequal size included; a rank may
            hold none). ``"local"``: this process's data only. The ranks' parameters are
            compared when the problem is built (a checksum) and must agree.

    The objective is ``L = sum_b w_b loss_b`` with ``w_b = n_b / N`` for ``"mean"``
    and ``w_b = 1`` for ``"sum"``: several batches give the same value, gradient and
    curvature as one concatenated batch.

    Attributes:
        names: parameter names, in flattening order.
        shapes: their shapes.
        num_params: ``P``, the length of flat vectors.
        num_samples: ``N``, the total number of samples over all batches.

    Example:
        >>> model = torch.nn.Linear(3, 2)
        >>> prob = Problem(model, torch.nn.MSELoss(), (torch.randn(5, 3), torch.randn(5, 2)))
        >>> prob.num_params
        8
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Any, Any], Tensor],
        data: Batch | Iterable[Batch],
        params: Sequence[str | Tensor] | None = None,
        *,
        reduction: str | None = None,
        output: str | Callable[[Any], Tensor] | None = None,
        process_group: Any = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module  # DDP's hooks do not support double backward (pytorch#47562)
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable; got {type(loss_fn).__name__}")
        if output is not None and not (isinstance(output, str) or callable(output)):
            raise TypeError(
                f"output must be a field name, a callable or None; got {type(output).__name__}"
            )
        self.model = model
        self.loss_fn = loss_fn
        self.output = output
        self.fallbacks: set[str] = set()  # products that need the reference kernels
        self.graph_checked = False  # no once-differentiable Function in the graph
        self._mlp_forward: Any = None  # hesse._autodiff.rop's forward passes at a point
        self._checked_versions: tuple[int, ...] = ()
        self.reduction = self._resolve_reduction(loss_fn, reduction)

        self.parameters = Parameters(model, params)
        sel = self.parameters
        # every place the model holds a selected parameter (a tied one: several), for
        # `_runs_as_is`'s test that the model still holds the problem's tensors
        selected = {id(t) for t in sel.tensors}
        self._held = [
            (m._parameters, attr, t, f"{mn}.{attr}" if mn else attr)
            for mn, m in model.named_modules()
            for attr, t in m._parameters.items()
            if t is not None and id(t) in selected
        ]
        self.names, self.shapes, self.sizes = sel.names, sel.shapes, sel.sizes
        self.num_params, self.slices = sel.num_params, sel.slices
        self.dtype, self.device = sel.dtype, sel.device

        if (
            isinstance(data, tuple)
            and len(data) == 2
            and isinstance(data[0], Tensor)
            and not (isinstance(data[1], Tensor) or data[1] is None)
        ):
            raise TypeError(
                f"data (inputs, targets): targets must be a tensor or None; got "
                f"{type(data[1]).__name__} (convert it with torch.as_tensor)"
            )
        group = resolve_group(process_group)
        self.group = Group(group) if group is not None else None
        _refuse_padded_sampler(data, self.group)
        _refuse_changing_sampler(data)
        self._data = [data] if _is_single_batch(data) else data
        if isinstance(self._data, Iterator):  # one-shot iterables: keep the batches
            self._data = list(self._data)
        self._batch_sizes = self._scan_data()
        self._checked_data = self._data_versions()
        self.local_samples = sum(self._batch_sizes)
        self.num_samples = self.local_samples
        if self.group is not None:  # every rank: the samples of all ranks
            self.group.check_same_model(self.names, self.params)
            self.agree(
                "Problem",
                reduction=self.reduction,
                loss_fn=getattr(loss_fn, "__name__", type(loss_fn).__name__),
                params=self.names,
            )
            self.num_samples = int(self.group.total(self.local_samples, "sample count"))
            if self.num_samples == 0:
                raise ValueError("data is empty on every rank: expected at least one sample")
        self._warn_about_modes(model)

    # ------------------------------------------------------------------ set-up
    @staticmethod
    def _resolve_reduction(loss_fn: Any, reduction: str | None) -> str:
        own = getattr(loss_fn, "reduction", None)
        if own is not None and reduction is not None and own != reduction:
            raise ValueError(f"reduction={reduction!r} contradicts loss_fn.reduction={own!r}")
        red = own if own is not None else (reduction or "mean")
        if red not in ("mean", "sum"):
            raise ValueError(
                f"the loss must reduce to a scalar with reduction 'mean' or 'sum'; "
                f"got reduction={red!r}"
            )
        return red

    def _data_versions(self) -> tuple[int, ...] | None:
        """The version counters of data held in memory (a list of batches; ``None`` for
        an iterable that makes new tensors each pass): an in-place change shows."""
        if not isinstance(self._data, (list, tuple)):
            return None
        return tuple(
            t._version
            for batch in self._data
            if isinstance(batch, (list, tuple))
            for t in tensor_leaves(tuple(batch))
        )

    @staticmethod
    def _check_finite(inputs: Any, targets: Any, index: int, after: bool = False) -> None:
        for t in list(tensor_leaves(inputs)) + list(tensor_leaves(targets)):
            if t.is_floating_point() and not torch.isfinite(t).all():
                when = " (written after the Problem was built)" if after else ""
                raise ValueError(f"batch {index} contains NaN or inf{when}")

    def _scan_data(self) -> list[int]:
        sizes = []
        for i, batch in enumerate(self._iter_raw()):
            inputs, targets = self._split_batch(batch, i)
            self._check_finite(inputs, targets, i)
            for t in tensor_leaves(inputs):
                if t.is_floating_point() and t.dtype != self.dtype:
                    raise TypeError(
                        f"batch {i} has floating-point inputs of dtype {t.dtype}, but the "
                        f"parameters are {self.dtype}; convert one of them (e.g. "
                        f"X.to({self.dtype}) or model.to({t.dtype}))"
                    )
            sizes.append(self._batch_size(inputs, targets, i))
        if (not sizes or sum(sizes) == 0) and self.group is None:  # a rank may hold none
            raise ValueError(
                "data is empty: expected at least one (inputs, targets) batch "
                "with at least one sample"
            )
        return sizes

    @staticmethod
    def _split_batch(batch: Any, index: int) -> Batch:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise TypeError(
                f"batch {index}: expected an (inputs, targets) pair; got {type(batch).__name__}"
            )
        return batch[0], batch[1]

    @staticmethod
    def _batch_size(inputs: Any, targets: Tensor | None, index: int) -> int:
        if isinstance(targets, Tensor) and targets.ndim >= 1:
            return int(targets.shape[0])
        leaves = [t for t in tensor_leaves(inputs) if t.ndim >= 1]
        if leaves:
            return int(leaves[0].shape[0])
        raise ValueError(
            f"batch {index}: cannot tell its batch size (no tensor with a "
            "leading batch dimension in inputs or targets)"
        )

    @property
    def random(self) -> bool:
        """Whether the objective is random: a module is Dropout in training mode (each
        evaluation draws new masks)."""
        return any(isinstance(m, _DROPOUT) and m.p > 0 and m.training for m in self.model.modules())

    def _warn_about_modes(self, model: nn.Module) -> None:
        # each module's own mode: a training-mode wrapper around eval-mode layers is fine
        if self.random:
            warnings.warn(
                "the model is in training mode and has active Dropout: every loss "
                "evaluation draws a new mask, so gradients and curvature are random. "
                "Call model.eval() for the deterministic curvature.",
                stacklevel=3,
            )
        if any(isinstance(m, _BATCHNORM) and m.training for m in model.modules()):
            warnings.warn(
                "the model is in training mode and has BatchNorm: it normalises with "
                "the statistics of the current batch, so samples in a batch are coupled, "
                "the loss is not a sum over samples (per-sample quantities such as the "
                "empirical Fisher are undefined) and several batches differ from one "
                "concatenated batch; running statistics are also updated by every "
                "evaluation. Call model.eval() to use the running statistics.",
                stacklevel=3,
            )

    # ------------------------------------------------------------------ data
    def _iter_raw(self) -> Iterator[Any]:
        return iter(self._data)

    def batches(self) -> Iterator[tuple[Any, Tensor | None, float]]:
        """Yield ``(inputs, targets, weight)`` for each batch, on the parameters'
        device, with the batch's weight ``w_b`` in the objective (``n_b / N`` for
        ``"mean"``, from the batch's own size, so a shuffling ``DataLoader`` is fine).

        Raises:
            RuntimeError: if the data no longer holds ``N`` samples (an iterable that
                changes between passes).
        """
        dev = self.device
        versions = tuple(p._version for p in self.parameters.tensors)
        if versions != self._checked_versions and not _all_finite(self.params):
            for name, p in zip(self.names, self.params, strict=True):
                if not bool(torch.isfinite(p).all()):
                    raise ValueError(
                        f"parameter {name!r} has NaN or inf entries (set after the Problem was "
                        "built, e.g. by a diverged optimiser step); every result would be NaN"
                    )
        self._checked_versions = versions  # checked: again only after an in-place change
        data_versions = self._data_versions()
        recheck = data_versions != self._checked_data
        seen = 0
        for i, batch in enumerate(self._iter_raw()):
            inputs, targets = self._split_batch(batch, i)
            if recheck:
                self._check_finite(inputs, targets, i, after=True)
            n = self._batch_size(inputs, targets, i)
            seen += n
            if n == 0:  # an empty batch (a rank's empty shard) adds nothing
                continue
            yield (
                map_tensors(inputs, lambda t: t.to(dev)),
                targets.to(dev) if isinstance(targets, Tensor) else targets,
                n / self.num_samples if self.reduction == "mean" else 1.0,
            )
        self._checked_data = data_versions
        if seen != self.local_samples:
            raise RuntimeError(
                f"the data held {self.local_samples} samples when the Problem was built but "
                f"{seen} now: pass data that yields the same samples on every pass"
            )

    def as_one_batch(self) -> tuple[Tensor, Tensor | None]:
        """All batches concatenated into one ``(inputs, targets)`` pair (tensor inputs
        only): for the solvers whose state is the whole batch (the chain sweep). Its
        loss, with the loss's reduction, is the objective ``L``."""
        xs, ys = [], []
        for inputs, targets, _w in self.batches():
            if not isinstance(inputs, Tensor):
                raise TypeError(
                    f"the chain solver needs tensor inputs (n, ...); got {type(inputs).__name__}"
                )
            xs.append(inputs)
            ys.append(targets)
        x = torch.cat(xs) if len(xs) > 1 else xs[0]
        if all(isinstance(y, Tensor) for y in ys):
            return x, torch.cat(ys) if len(ys) > 1 else ys[0]
        if all(y is None for y in ys):
            return x, None
        raise TypeError("targets must all be tensors or all None")

    @property
    def batch_sizes(self) -> list[int]:
        """Number of samples in each batch."""
        return list(self._batch_sizes)

    # ------------------------------------------------------------------ flattening
    @property
    def params(self) -> list[Tensor]:
        """The selected parameter tensors (the model's own, not copies)."""
        return list(self.parameters.tensors)

    def param_vector(self) -> Tensor:
        """Current values of the selected parameters as one flat ``(P,)`` tensor."""
        return self.parameters.vector()

    def flatten(self, tensors: Sequence[Tensor]) -> Tensor:
        """Per-parameter tensors -> ``(P,)`` or ``(P, k)`` (`Parameters.flatten`)."""
        return self.parameters.flatten(tensors)

    def unflatten(self, vec: Tensor) -> list[Tensor]:
        """``(P,)`` or ``(P, k)`` -> per-parameter tensors (`Parameters.unflatten`)."""
        return self.parameters.unflatten(vec)

    def as_flat(self, v: Tensor | Sequence[Tensor], name: str = "v") -> Tensor:
        """Validate and convert a vector or matrix to ``(P,)`` or ``(P, k)`` on the
        problem's device and dtype (`Parameters.as_flat`)."""
        return self.parameters.as_flat(v, name)

    # ------------------------------------------------------------------ evaluation
    def leaves(self, at: Sequence[Tensor] | None = None) -> list[Tensor]:
        """The tensors a product differentiates with respect to, one per selected
        parameter: the model's own parameters when `outputs` can run the model on them
        as it is (`_runs_as_is`: one plain forward, no parameter swap), else fresh
        leaves holding their values, or the values ``at``."""
        if at is None and self._runs_as_is():
            return list(self.parameters.tensors)
        src = self.parameters.tensors if at is None else at
        return [p.detach().requires_grad_(True) for p in src]

    def _runs_as_is(self) -> bool:
        """Whether differentiating the model's own forward gives what `outputs` on
        detached copies would: the model still holds the problem's parameter tensors
        (not ones assigned since), each requires grad and has no gradient hook (a hook
        would edit the derivative), and no module in training mode holds buffers (those
        run on copies, `outputs`)."""
        if any(store.get(attr) is not t for store, attr, t, _ in self._held):
            return False
        if any(not p.requires_grad or p._backward_hooks for p in self.parameters.tensors):
            return False
        return not self._updates_buffers()

    def _direct_refusal(self) -> str | None:
        """Why a route that computes from the model's modules and their weights instead
        of running its forward (Bishop's propagation, the chain's stages, the products'
        MLP route) would not compute what `outputs` does, or ``None``: a module hook
        (`module_hook`: it could change the forward or its derivative), or a selected
        parameter the model no longer holds (assigned since the problem was built: the
        problem differentiates at the tensor it selected)."""
        for store, attr, t, name in self._held:
            if store.get(attr) is not t:
                return (
                    f"the model's {name!r} is no longer the parameter the problem selected "
                    "(assigned since the problem was built; build a new hesse.Problem to "
                    "use it)"
                )
        return module_hook(self.model)

    def _updates_buffers(self) -> bool:
        """Whether a module in training mode holds buffers (a BatchNorm's running
        statistics: a forward pass would update them)."""
        return any(m.training and m._buffers for m in self.model.modules())

    def outputs(self, params: Sequence[Tensor], inputs: Any) -> Any:
        """The model's outputs on ``inputs`` with the selected parameters replaced by
        ``params`` (all other parameters and buffers are the model's own). ``params``
        that are the model's own parameters (`leaves`) run the model as it is."""
        own = self.parameters.tensors
        if len(params) == len(own) and all(a is b for a, b in zip(params, own, strict=True)):
            mapping = None if self._runs_as_is() else dict(zip(self.names, own, strict=True))
        else:
            mapping = dict(zip(self.names, params, strict=True))
        if mapping is not None and self._updates_buffers():
            # no side effects: a module in training mode (BatchNorm) updates its buffers
            # on a copy, so the model's running statistics are the same after every call
            for mod_name, mod in self.model.named_modules():
                if mod.training:
                    for b_name, buf in mod.named_buffers(recurse=False):
                        mapping[f"{mod_name}.{b_name}" if mod_name else b_name] = buf.clone()
        args, kwargs = ((), inputs) if isinstance(inputs, dict) else (inputs, None)
        if not isinstance(args, tuple):
            args = (args,)
        try:
            if mapping is None:
                out = self.model(*args, **(kwargs or {}))
            else:
                out = swapped_call(self.model, mapping, args, kwargs)
        except (RuntimeError, TypeError) as err:  # the user's forward: say on what inputs
            if str(err).startswith("the model's forward"):
                raise
            seen = sorted({f"{t.dtype} {tuple(t.shape)}" for t in tensor_leaves(inputs)})
            msg = f"the model's forward failed on inputs of {', '.join(seen) or 'no tensors'}"
            try:
                wrapped = type(err)(f"{msg}: {err}")
            except Exception:  # an exception type that takes other arguments
                raise err from None
            raise wrapped from err
        return self.select(out)

    def select(self, out: Any) -> Any:
        """The model output the loss takes (``output=``): a field or key by name, a
        callable's result, or by default the output itself, or its ``logits`` (a Hugging
        Face ``ModelOutput``, a dict) when it is not a tensor."""
        sel = self.output
        if callable(sel):
            return sel(out)
        if isinstance(sel, str):
            if isinstance(out, dict):
                if sel in out:
                    return out[sel]
                fields = list(out.keys())
            elif hasattr(out, sel):
                return getattr(out, sel)
            else:
                fields = [f for f in dir(out) if not f.startswith("_")][:20]
            raise ValueError(
                f"output={sel!r}: the model's output ({type(out).__name__}) has no such field; "
                f"it has {fields}"
            )
        if isinstance(out, Tensor):
            return out
        if isinstance(out, dict):  # a dict, or a Hugging Face ModelOutput (a dict too)
            return out.get("logits", out)
        return getattr(out, "logits", out)

    def coupling(self) -> str | None:
        """Why sample ``n``'s outputs are not a function of its own inputs alone (``None``
        when they are); see `_coupling` (computed once within `_sharing`)."""
        return self._memo("coupling", self._coupling)

    def _coupling(self) -> str | None:
        """Why sample ``n``'s outputs are not a function of its own inputs alone (``None``
        when they are): the one test of sample independence (the observation-space
        engine's kernel and per-sample quantities need it). On the first batch: the
        outputs must be deterministic, and each sample's output must equal the batch's
        row when the sample is evaluated alone (``vmap`` over the samples; if the model
        cannot be vmapped, the batch reversed, each half alone and the first 8 samples
        alone). Agreement to ``sqrt(u)`` of the outputs' scale."""
        inputs, _t, _w = next(iter(self.batches()))
        n = self._batch_size(inputs, _t, 0)
        ps = self.params  # under no_grad: the model runs as it is where it can

        def out(x: Any) -> Tensor:
            o = self.outputs(ps, x)
            if not isinstance(o, Tensor):
                raise TypeError(f"the model's output is {type(o).__name__}, not one tensor")
            return o

        def rows(idx: Any) -> Any:
            return map_tensors(inputs, lambda t: t[idx] if t.ndim and t.shape[0] == n else t)

        try:
            with torch.no_grad():
                full = out(inputs)
                if full.ndim == 0 or full.shape[0] != n:
                    return f"the outputs {tuple(full.shape)} have no leading batch dimension {n}"
                tol = math.sqrt(torch.finfo(full.dtype).eps) * (float(full.abs().max()) + 1e-30)

                def same(a: Tensor, b: Tensor) -> bool:
                    return a.shape == b.shape and float((a - b).abs().max()) <= tol

                if not same(out(inputs), full):
                    return "two evaluations differ (Dropout in training mode?)"
                leaves = list(tensor_leaves(inputs))
                try:
                    if not all(t.ndim and t.shape[0] == n for t in leaves):
                        raise ValueError("inputs without a batch dimension")
                    single = torch.vmap(lambda x: out(map_tensors(x, lambda t: t[None]))[0])(
                        rows(slice(None))
                    )
                except Exception:  # no batching rule: the structural probes
                    single = None
                if single is not None:
                    if not same(single, full):
                        return "a sample evaluated alone gives other outputs than in the batch"
                    return None
                rev = torch.arange(n - 1, -1, -1)
                if not same(out(rows(rev)), full[rev]):
                    return "reversing the batch changes the outputs of its samples"
                h = n // 2
                for part in (slice(0, h), slice(h, n)) if h else ():
                    if not same(out(rows(part)), full[part]):
                        return "half of the batch alone gives other outputs than in the batch"
                for i in range(min(n, 8)):
                    if not same(out(rows(slice(i, i + 1))), full[i : i + 1]):
                        return f"sample {i} alone gives other outputs than in the batch"
        except (RuntimeError, ValueError, TypeError, IndexError) as err:
            return f"evaluating samples apart fails ({type(err).__name__}: {str(err)[:80]})"
        return None

    def locate(self, op: str) -> str | None:
        """The module of the model that runs the operation ``op`` (for messages), from
        one forward pass over the first batch."""
        inputs, _t, _w = next(iter(self.batches()))
        ps = [p.detach().requires_grad_(True) for p in self.params]  # a graph to read
        return find_module(self.model, lambda: self.outputs(ps, inputs), op)

    def batch_loss(self, outputs: Any, targets: Tensor | None, weight: float) -> Tensor:
        """Weighted loss of one batch, ``w_b * loss_fn(outputs, targets)``."""
        return weighted_loss(self.loss_fn, outputs, targets, weight)

    def loss(self, params: Sequence[Tensor] | None = None) -> Tensor:
        """The objective ``L`` at ``params`` (default: the current parameters)."""
        ps = self.params if params is None else list(params)  # (no_grad below)
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        with torch.no_grad():
            for inputs, targets, w in self.batches():
                total = total + self.batch_loss(self.outputs(ps, inputs), targets, w)
        return self.reduce(total.reshape(1), "loss").reshape(())

    # ------------------------------------------------------------------ distributed
    @property
    def distributed(self) -> bool:
        """Whether the data is sharded over the ranks of a process group."""
        return self.group is not None

    def reduce(self, t: Tensor, what: str = "product") -> Tensor:
        """The sum of ``t`` over the ranks (one all-reduce; identical on every rank), or
        ``t`` itself for a problem on one process."""
        return t if self.group is None else self.group.all_reduce(t, what)

    def agree(self, call: str, **args: Any) -> None:
        """Under ``torch.distributed``: refuse a call whose arguments differ between the
        ranks, naming the argument (`Group.check_same`); nothing on one process."""
        if self.group is not None:
            self.group.check_same(call, args)

    def shared_random(self, t: Tensor) -> Tensor:
        """Rank 0's ``t`` on every rank (random probes and start vectors must agree)."""
        return t if self.group is None else self.group.broadcast(t)

    def gathered(self) -> Problem:
        """The problem on one process: every rank's batches gathered to every rank (for
        the exact factorisations, whose state is the whole curvature batch: it is small).
        Identical on every rank; the caller's model is used as it is."""
        if self.group is None:
            return self
        mine = [(i, t) for i, t, _w in self.batches()]
        everyone = self.group.gather_objects(
            [(_to_cpu(i), _to_cpu(t)) for i, t in mine], "gathering of the data"
        )
        return self._like(self.model, [b for rank in everyone for b in rank], _LOCAL)

    def promoted(self, dtype: torch.dtype = torch.float64) -> Problem:
        """The same problem on a copy of the model in ``dtype`` (float64 by default: for
        solves, counts and log-determinants that need the digits when the model is
        float32), with the data converted as it is read. The caller's model is not
        modified."""
        if dtype == self.dtype:
            return self
        model = copy.deepcopy(self.model).to(dtype)
        group = self.group.group if self.group is not None else _LOCAL
        return self._like(model, _Converted(self._data, dtype), group)

    def state(self) -> State | None:
        """A token that changes whenever the objective may have changed (``==`` tells):
        the bytes of every parameter (selected or not) and buffer, the version counters of the
        data held in memory and every module's mode; ``None`` when that cannot be told
        (an iterable that makes new tensors on each pass, a distributed problem):
        nothing is cached then."""
        data = self._data_versions()
        if data is None or self.group is not None:
            return None
        # the values themselves for parameters and buffers (a write through .data leaves
        # the version counter alone): one copy of their bytes, O(P), compared exactly;
        # every parameter of the model, the ones not selected too (a frozen layer's
        # weights are part of the objective)
        tensors = [*self.model.parameters(), *self.model.buffers()]
        raw = [t.detach().reshape(-1).view(torch.uint8) for t in tensors if t.numel()]
        values = torch.cat(raw) if raw else torch.zeros(0, dtype=torch.uint8)
        # and every module's mode: model.train() turns a Dropout random, a BatchNorm coupling
        modes = tuple(m.training for m in self.model.modules())
        return State(values, (data, modes, tuple(t.dtype for t in tensors)))

    def _memo(self, key: str, compute: Callable[[], Any]) -> Any:
        """``compute()``, once within `_sharing` (a plan and the engine it builds ask for
        the same sizes and checks: one forward pass, not several); outside it, every
        time."""
        scratch = self.__dict__.get("_scratch")
        if scratch is None:
            return compute()
        if key not in scratch:
            scratch[key] = compute()
        return scratch[key]

    @contextlib.contextmanager
    def _sharing(self) -> Iterator[None]:
        """Within the block, `_memo`'s values are computed once (nothing may change the
        problem there: `hesse.engine` plans and builds inside one)."""
        if self.__dict__.get("_scratch") is not None:  # nested: the outer block's
            yield
            return
        self.__dict__["_scratch"] = {}
        try:
            yield
        finally:
            self.__dict__["_scratch"] = None

    def with_data(self, data: Any, process_group: Any = "local") -> Problem:
        """This problem's model, loss, parameters, reduction and output on other data
        (test points, a curvature batch); on this process only by default."""
        return self._like(self.model, data, process_group)

    def _like(self, model: nn.Module, data: Any, process_group: Any) -> Problem:
        """This problem's loss, parameters, reduction and output on other data (or a
        copy of the model)."""
        return Problem(
            model,
            self.loss_fn,
            data,
            params=self.names,
            reduction=self.reduction,
            output=self.output,
            process_group=process_group,
        )

    def __repr__(self) -> str:
        return (
            f"Problem(model={type(self.model).__name__}, P={self.num_params}, "
            f"N={self.num_samples}, batches={len(self._batch_sizes)}, "
            f"reduction={self.reduction!r}, dtype={self.dtype})"
        )


class State:
    """`Problem.state`'s token: ``values`` (the parameters' and buffers' bytes, one
    ``uint8`` tensor) and ``key`` (what else the objective depends on: the data's version
    counters, the modules' modes, the dtypes); equal when both are (bytewise: exact)."""

    __slots__ = ("key", "values")

    def __init__(self, values: Tensor, key: tuple[Any, ...]) -> None:
        self.values, self.key = values, key

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, State)
            and self.key == other.key
            and self.values.shape == other.values.shape
            and self.values.device == other.values.device
            and torch.equal(self.values, other.values)
        )

    __hash__ = None  # type: ignore[assignment]


class _Converted:
    """An iterable of batches whose floating-point tensors are converted to ``dtype`` as
    they are read (integer targets such as class labels are kept)."""

    def __init__(self, data: Iterable[Any], dtype: torch.dtype) -> None:
        self.data, self.dtype = data, dtype

    def __iter__(self) -> Iterator[Any]:
        def conv(t: Tensor) -> Tensor:
            return t.to(self.dtype) if t.is_floating_point() else t

        for batch in self.data:
            yield map_tensors(tuple(batch), conv)


def float64_problem(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    inputs: Tensor,
    targets: Tensor | None,
    params: Sequence[str] | None = None,
) -> Problem:
    """A `Problem` on a float64 copy of ``model`` and of one batch (integer targets such as
    class labels are kept): for solves, counts and log-determinants that need the digits
    when the model is float32. The caller's model is not modified."""
    y = targets.double() if isinstance(targets, Tensor) and targets.is_floating_point() else targets
    return Problem(copy.deepcopy(model).double(), loss_fn, (inputs.double(), y), params=params)
