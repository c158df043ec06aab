"""The curvature operator: one abstraction for "a symmetric P x P matrix we can multiply
by".

`CurvatureOperator` owns everything that is the same for every curvature matrix:
the ``@`` operator on flat vectors, matrices and per-parameter lists, dense
materialisation in memory-bounded column chunks with a progress bar, per-block
views, and the export to ``scipy.sparse.linalg.LinearOperator``. A subclass only
chooses its product (``_matmat``).

Operators combine like scipy's ``LinearOperator``s (design note, "The operator
algebra"): ``a + b`` and ``a - b`` of two operators over the same parameters, ``alpha *
op``, ``op / alpha``, ``-op``, and ``op + damping`` for a damping in any form the engines
take (a number: ``C + eps I``; a ``(P,)`` tensor, a dict ``{name: value}`` or a sequence
per parameter tensor: ``C + D``). The results are operators again (`SumOperator`,
`ScaledOperator`, `ShiftedOperator`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from hesse._autodiff.problem import Parameters, Problem
from hesse._util.memory import check_memory, renamed_chunk_memory
from hesse._util.progress import progress_bar

if TYPE_CHECKING:  # scipy.sparse.linalg costs half a second to import: only when used
    from scipy.sparse.linalg import LinearOperator

__all__ = ["CurvatureOperator", "ScaledOperator", "ShiftedOperator", "SumOperator"]

_DEFAULT_MAX_MEMORY = 2**30  # bytes of working memory for a chunk of columns


def _symmetrize_(M: Tensor, block: int = 2048) -> Tensor:
    """``M <- (M + M^T) / 2`` in place, block by block: no second ``P x P`` matrix."""
    P = M.shape[0]
    for i in range(0, P, block):
        ii = slice(i, min(i + block, P))
        d = M[ii, ii]
        d.copy_(0.5 * (d + d.T))
        for j in range(i + block, P, block):
            jj = slice(j, min(j + block, P))
            avg = 0.5 * (M[ii, jj] + M[jj, ii].T)
            M[ii, jj] = avg
            M[jj, ii] = avg.T
    return M


class _Space:
    """The vector space of an operator without a `Problem`: the flattening of its
    vectors (`Parameters.of_shapes`), one process, nothing random. It answers the part of
    `Problem`'s interface that operators and the spectral methods use."""

    group = None
    random = False

    def __init__(self, parameters: Parameters) -> None:
        self.parameters = parameters
        self.names, self.shapes = parameters.names, parameters.shapes
        self.slices = parameters.slices
        self.num_params, self.dtype, self.device = (
            parameters.num_params,
            parameters.dtype,
            parameters.device,
        )
        self.as_flat, self.unflatten = parameters.as_flat, parameters.unflatten

    def agree(self, call: str, **args: Any) -> None:
        """One process: nothing to agree on."""

    def shared_random(self, t: Tensor) -> Tensor:
        return t


class CurvatureOperator:
    """A symmetric ``(P, P)`` curvature matrix, applied matrix-free: of a `Problem` (its
    parameters' flattening, device and dtype), or of a vector space of its own.

    Supports ``op @ v`` for a flat vector ``(P,)``, a matrix ``(P, k)`` of column
    vectors, or a list of per-parameter tensors (the result has the same form),
    ``.shape``, ``.dtype``, ``.device``, ``.to_dense()``, ``.block(name_i, name_j)``
    and ``.to_scipy()``.

    Args:
        problem: the `Problem` whose curvature this is; or ``None`` with ``shapes``.
        shapes: for an operator without a problem (a factorisation's inverse from
            elsewhere, a matrix of the user's): ``P``, or ``{name: shape}`` to split its
            vectors into named tensors (`Parameters.of_shapes`); ``dtype`` (default torch's
            default dtype) and ``device`` (default the CPU) are its vectors'.
            `from_matmat` builds one from a function or a matrix.

    Attributes:
        problem: the `Problem`, or ``None`` for an operator without one.
        symmetric: always ``True`` for curvature matrices.
        psd: ``True`` when the matrix is positive semi-definite by construction
            (Gauss-Newton, Fisher), ``False`` when it may be indefinite (Hessian).
    """

    symmetric: bool = True
    psd: bool = False
    column_memory: float = 2.0  # vectors of (P + activations) a column costs in flight
    name: str = "curvature"

    def __init__(
        self,
        problem: Problem | None = None,
        *,
        shapes: int | Mapping[str, Sequence[int]] | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if problem is None:
            if shapes is None:
                raise TypeError("an operator needs a hesse.Problem or shapes=P / {name: shape}")
            self.problem = None
            self.space: Problem | _Space = _Space(Parameters.of_shapes(shapes, dtype, device))
            return
        if not isinstance(problem, Problem):
            raise TypeError(f"expected a hesse.Problem; got {type(problem).__name__}")
        if shapes is not None or dtype is not None or device is not None:
            raise TypeError("shapes, dtype and device are the problem's: pass one or the other")
        self.problem = self.space = problem

    @classmethod
    def from_matmat(
        cls,
        matmat: Callable[[Tensor], Tensor] | Tensor,
        shapes: int | Mapping[str, Sequence[int]] | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        psd: bool = False,
        name: str = "operator",
    ) -> CurvatureOperator:
        """An operator without a `Problem` from ``matmat``, a function taking a flat
        ``(P, k)`` matrix to ``C V`` ``(P, k)`` (``C`` symmetric: the caller's promise),
        or from a symmetric ``(P, P)`` tensor (its shape, dtype and device are the
        operator's). ``shapes`` as the constructor's; ``psd`` whether ``C`` is positive
        semi-definite. Everything that takes an operator takes it: ``@``, the algebra,
        ``to_dense``, ``to_scipy``, `eigs`, `trace`, `diagonal`, `spectral_density`."""
        if isinstance(matmat, Tensor):
            M = matmat
            if M.ndim != 2 or M.shape[0] != M.shape[1] or not M.is_floating_point():
                raise ValueError(
                    f"from_matmat needs a square floating-point matrix; got shape "
                    f"{tuple(M.shape)}, {M.dtype}"
                )
            if dtype is not None or device is not None:
                raise TypeError("a matrix's dtype and device are the operator's")
            shapes = M.shape[0] if shapes is None else shapes
            op = _FunctionOperator(M.__matmul__, shapes, M.dtype, M.device, psd, name)
            if op.shape != tuple(M.shape):
                raise ValueError(
                    f"shapes hold {op.shape[0]} entries; the matrix is {tuple(M.shape)}"
                )
            return op
        if not callable(matmat):
            raise TypeError(f"matmat must be a function or a tensor; got {type(matmat).__name__}")
        if shapes is None:
            raise TypeError("from_matmat(function) needs shapes=P or {name: shape}")
        return _FunctionOperator(matmat, shapes, dtype, device, psd, name)

    def _share_space(self, other: CurvatureOperator) -> None:
        """Take ``other``'s problem (or space without one): for operators built on it."""
        self.problem, self.space = other.problem, other.space

    # ---------------------------------------------------------------- interface
    def _matmat(self, V: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def random(self) -> bool:
        """Whether products are random: a module of the model is Dropout in training mode
        (each product draws new masks)."""
        return self.space.random

    @property
    def shape(self) -> tuple[int, int]:
        P = self.space.num_params
        return (P, P)

    @property
    def dtype(self) -> torch.dtype:
        return self.space.dtype

    @property
    def device(self) -> torch.device:
        return self.space.device

    def __matmul__(self, v: Tensor | Sequence[Tensor]) -> Tensor | list[Tensor]:
        as_list = isinstance(v, (list, tuple))
        flat = self.space.as_flat(v)
        self.space.agree(f"{type(self).__name__} @ v", v=flat)
        out = self._matmat(flat.unsqueeze(1) if flat.ndim == 1 else flat)
        out = out.squeeze(1) if flat.ndim == 1 else out
        return self.space.unflatten(out) if as_list else out

    def matvec(self, v: Tensor | Sequence[Tensor]) -> Tensor | list[Tensor]:
        """Same as ``self @ v``."""
        return self @ v

    def matmat(self, V: Tensor) -> Tensor:
        """``C V`` for a flat ``(P, k)`` matrix on the operator's device and dtype, without
        the validation and conversions of ``@`` (for inner loops: Lanczos, CG)."""
        return self._matmat(V)

    # ---------------------------------------------------------------- dense
    def chunk_size(self, chunk_memory: int | None = None) -> int:
        """Columns per chunk so that the batched products stay within ``chunk_memory``
        bytes: a column costs about one parameter vector plus one set of
        activations of the largest batch, for each pass that is batched."""
        if chunk_memory is not None and not (
            isinstance(chunk_memory, (int, float)) and chunk_memory > 0
        ):
            raise ValueError(
                f"chunk_memory must be a positive number of bytes; got {chunk_memory!r}"
            )
        budget = _DEFAULT_MAX_MEMORY if chunk_memory is None else int(chunk_memory)
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        P = self.space.num_params
        per_col = 4 * itemsize * (P + self.activation_numel())
        return max(1, min(P, budget // max(per_col, 1)))

    def activation_numel(self) -> int:
        """Numbers in one forward pass over the first batch (every module's output),
        measured once: the unit of the working-memory estimates (0 without a problem)."""
        if self.problem is None:
            return 0
        if not hasattr(self, "_act_numel"):
            self._act_numel = self.problem._memo("activation_numel", self._count_activations)
        return self._act_numel

    def _count_activations(self) -> int:
        """`activation_numel` measured: one forward pass, every module's output counted."""
        problem = self.problem
        assert problem is not None
        numel = 0

        def hook(_m: torch.nn.Module, _i: Any, out: Any) -> None:  # count each output once
            nonlocal numel
            if isinstance(out, Tensor):
                numel += out.numel()

        first = next(iter(problem.batches()), None)  # a rank may hold none
        # one global hook, not one a module (a handle each costs ~0.5 ms on a deep model);
        # only the model's modules run inside
        handle = torch.nn.modules.module.register_module_forward_hook(hook)
        try:
            if first is not None:
                with torch.no_grad():
                    problem.outputs(problem.params, first[0])
        finally:
            handle.remove()
        if problem.group is not None:  # the same chunks on every rank
            numel = int(problem.group.max(numel))
        return numel

    def columns(
        self,
        cols: Sequence[int],
        chunk_memory: int | None = None,
        progress: bool | None = False,
        *,
        max_memory: int | None = None,
    ) -> Tensor:
        """``self @ I[:, cols]`` as ``(P, len(cols))``, in chunks of columns whose batched
        products stay within ``chunk_memory`` bytes (default 1 GiB; ``max_memory`` is its
        deprecated name)."""
        chunk_memory = renamed_chunk_memory(chunk_memory, max_memory, "columns")
        P = self.space.num_params
        chunk = self.chunk_size(chunk_memory)
        out = torch.empty(P, len(cols), dtype=self.dtype, device=self.device)
        bar = progress_bar(len(cols), f"{self.name} columns", progress, unit="col")
        try:
            for start in range(0, len(cols), chunk):
                idx = torch.as_tensor(cols[start : start + chunk], device=self.device)
                E = torch.zeros(P, len(idx), dtype=self.dtype, device=self.device)
                E[idx, torch.arange(len(idx), device=self.device)] = 1.0
                out[:, start : start + len(idx)] = self._matmat(E)
                bar.update(len(idx))
        finally:
            bar.close()
        return out

    def to_dense(
        self,
        chunk_memory: int | None = None,
        progress: bool | None = None,
        *,
        max_memory: int | None = None,
    ) -> Tensor:
        """The dense ``(P, P)`` matrix, cross-parameter blocks included.

        Built from ``P`` products in chunks of columns, each chunk in one batched
        pass per data batch. ``chunk_memory`` (bytes, default 1 GiB) bounds the working
        memory of a chunk; the result itself needs ``P^2`` numbers. ``progress``
        shows a tqdm bar (default: when stderr is a terminal and the job is long).
        The result is symmetrised, ``(M + M^T)/2``, to remove round-off asymmetry.
        ``max_memory`` is the deprecated name of ``chunk_memory``.
        """
        chunk_memory = renamed_chunk_memory(chunk_memory, max_memory, "to_dense")
        P = self.space.num_params
        check_memory(
            self.dense_memory(chunk_memory),
            f"the dense {P} x {P} {self.name} matrix",
            "use hessian_blocks / block() for the blocks you need, eigs / trace / "
            "spectral_density for spectra, or the chain solver (hesse.factorize) for "
            "solves, log-determinants and counts; a smaller chunk_memory shrinks only the "
            "working memory of the column chunks",
            self.device,
        )
        M = self.columns(range(P), chunk_memory, progress)
        return _symmetrize_(M)

    def dense_memory(self, chunk_memory: int | None = None) -> int:
        """Bytes `to_dense` needs at its peak: the ``P x P`` result and one chunk of
        columns (the unit vectors, their products and the batched pass's working memory,
        see ``chunk_memory``)."""
        P = self.space.num_params
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        chunk = self.chunk_size(chunk_memory)
        # measured (tests/test_memory.py): a column costs about two parameter vectors and
        # two sets of activations while its chunk is in flight (the Hessian's double
        # backward; the Gauss-Newton family's forward-mode product somewhat less)
        per_col = self.column_memory * itemsize * (P + self.activation_numel())
        return P * P * itemsize + chunk * per_col

    def block(
        self, row: str, col: str, chunk_memory: int | None = None, *, max_memory: int | None = None
    ) -> Tensor:
        """The block of rows for parameter ``row`` and columns for ``col``, shaped
        ``row_param.shape + col_param.shape``; costs one product per column of ``col``."""
        chunk_memory = renamed_chunk_memory(chunk_memory, max_memory, "block")
        sl = self.space.slices
        for n in (row, col):
            if n not in sl:
                raise ValueError(f"unknown parameter {n!r}; selected: {self.space.names}")
        cols = range(sl[col].start, sl[col].stop)
        M = self.columns(cols, chunk_memory, progress=False)[sl[row]]
        shapes = dict(zip(self.space.names, self.space.shapes, strict=True))
        return M.reshape((*shapes[row], *shapes[col]))

    def diagonal(self, chunk_memory: int | None = None, *, max_memory: int | None = None) -> Tensor:
        """The exact diagonal ``(P,)``: ``P`` products, one chunk of columns at a time
        (``P x chunk`` memory)."""
        chunk_memory = renamed_chunk_memory(chunk_memory, max_memory, "diagonal")
        P = self.space.num_params
        chunk = self.chunk_size(chunk_memory)
        out = torch.empty(P, dtype=self.dtype, device=self.device)
        for start in range(0, P, chunk):
            stop = min(P, start + chunk)
            out[start:stop] = self.columns(range(start, stop), chunk_memory)[start:stop].diagonal()
        return out

    # ---------------------------------------------------------------- scipy
    def to_scipy(self) -> LinearOperator:
        """A ``scipy.sparse.linalg.LinearOperator`` (float64 NumPy in and out) whose
        products run in PyTorch on the problem's device; works with ``eigsh``,
        ``cg``, ``minres``, ``lobpcg``."""
        from scipy.sparse.linalg import LinearOperator

        np_dtype = np.float64 if self.dtype == torch.float64 else np.float32

        def matmat(X: np.ndarray) -> np.ndarray:
            X2 = np.asarray(X).reshape(self.shape[1], -1)
            V = torch.as_tensor(X2, device=self.device).to(self.dtype)
            return self._matmat(V).detach().cpu().numpy().astype(np_dtype, copy=False)

        def matvec(x: np.ndarray) -> np.ndarray:
            return matmat(np.asarray(x).reshape(-1, 1)).reshape(-1)

        return LinearOperator(
            self.shape, matvec=matvec, rmatvec=matvec, matmat=matmat, rmatmat=matmat, dtype=np_dtype
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype}, psd={self.psd})"

    # ---------------------------------------------------------------- algebra
    def __add__(self, other: object) -> CurvatureOperator:
        if isinstance(other, CurvatureOperator):
            return SumOperator(self, other)
        if _is_damping(other):
            return ShiftedOperator(self, other)
        return NotImplemented

    def __radd__(self, other: object) -> CurvatureOperator:
        return self.__add__(other)

    def __sub__(self, other: object) -> CurvatureOperator:
        if isinstance(other, CurvatureOperator):
            return SumOperator(self, ScaledOperator(other, -1.0))
        if _is_number(other):
            return ShiftedOperator(self, -float(other))  # type: ignore[arg-type]
        return NotImplemented

    def __rsub__(self, other: object) -> CurvatureOperator:
        if _is_number(other):
            return ShiftedOperator(ScaledOperator(self, -1.0), float(other))  # type: ignore[arg-type]
        return NotImplemented

    def __mul__(self, alpha: object) -> CurvatureOperator:
        if _is_number(alpha):
            return ScaledOperator(self, float(alpha))  # type: ignore[arg-type]
        return NotImplemented

    def __rmul__(self, alpha: object) -> CurvatureOperator:
        return self.__mul__(alpha)

    def __truediv__(self, alpha: object) -> CurvatureOperator:
        if _is_number(alpha):
            if float(alpha) == 0.0:  # type: ignore[arg-type]
                raise ZeroDivisionError("an operator divided by 0")
            return ScaledOperator(self, 1.0 / float(alpha))  # type: ignore[arg-type]
        return NotImplemented

    def __neg__(self) -> CurvatureOperator:
        return ScaledOperator(self, -1.0)


def _is_number(x: object) -> bool:
    if isinstance(x, Tensor):
        return x.ndim == 0 and x.dtype != torch.bool and not x.is_complex()
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _is_damping(x: object) -> bool:
    return _is_number(x) or isinstance(x, (Tensor, dict, list, tuple))


class SumOperator(CurvatureOperator):
    """``A + B`` of two operators over the same parameters (``a + b``; ``a - b`` is ``a +
    (-1) b``). Products are ``A V + B V``; the dtype is the wider of the two."""

    def __init__(self, a: CurvatureOperator, b: CurvatureOperator) -> None:
        pa, pb = a.space, b.space
        if pa is not pb and (pa.names != pb.names or pa.shapes != pb.shapes):
            raise ValueError(
                f"{a.name} + {b.name}: the operators are over different parameters "
                f"({pa.num_params} parameters {pa.names} and {pb.num_params} {pb.names})"
            )
        if a.device != b.device:
            raise ValueError(f"{a.name} + {b.name}: on {a.device} and {b.device}")
        self._share_space(a)
        self.terms = (a, b)
        self.psd = a.psd and b.psd
        self.column_memory = max(a.column_memory, b.column_memory)
        self.name = f"{a.name} + {b.name}"

    @property
    def dtype(self) -> torch.dtype:
        return torch.promote_types(self.terms[0].dtype, self.terms[1].dtype)

    @property
    def random(self) -> bool:
        return any(t.random for t in self.terms)

    def _matmat(self, V: Tensor) -> Tensor:
        a, b = self.terms
        return a._matmat(V.to(a.dtype)).to(self.dtype) + b._matmat(V.to(b.dtype)).to(self.dtype)


class _OnOperator(CurvatureOperator):
    """An operator made from one other, ``op``: its dtype and randomness."""

    op: CurvatureOperator

    @property
    def dtype(self) -> torch.dtype:
        return self.op.dtype

    @property
    def random(self) -> bool:
        return self.op.random


class ScaledOperator(_OnOperator):
    """``alpha A`` for a real number ``alpha`` (``alpha * op``, ``op / alpha``, ``-op``)."""

    def __init__(self, op: CurvatureOperator, alpha: float) -> None:
        if not math.isfinite(alpha):
            raise ValueError(f"an operator scaled by {alpha!r}; expected a finite number")
        if isinstance(op, ScaledOperator):  # one scaling, not a tower of them
            op, alpha = op.op, op.alpha * alpha
        self._share_space(op)
        self.op, self.alpha = op, float(alpha)
        self.psd = op.psd and self.alpha >= 0
        self.column_memory = op.column_memory
        self.name = f"{self.alpha:g} {op.name}"

    def _matmat(self, V: Tensor) -> Tensor:
        return self.alpha * self.op._matmat(V)


class ShiftedOperator(_OnOperator):
    """``A + D``: ``D = eps I`` for a number ``eps``, or a diagonal from a ``(P,)`` tensor,
    a dict ``{name: value}`` or a sequence of per-tensor values (`Parameters.as_diagonal`,
    as every engine's damping; any finite sign here, positive for a factorisation).
    ``op + damping``."""

    def __init__(self, op: CurvatureOperator, damping: object) -> None:
        d = op.space.parameters.as_diagonal(damping, "the diagonal of op + D", positive=False)
        if isinstance(op, ShiftedOperator):  # one diagonal
            d = _add_diagonals(op.damping, d)
            op = op.op
        self._share_space(op)
        self.op, self.damping = op, d
        low = float(d.min()) if isinstance(d, Tensor) else d
        self.psd = op.psd and low >= 0
        self.column_memory = op.column_memory
        self.name = f"{op.name} + D" if isinstance(d, Tensor) else f"{op.name} + {d:g} I"

    def _matmat(self, V: Tensor) -> Tensor:
        d = self.damping
        shift = d.to(V)[:, None] * V if isinstance(d, Tensor) else d * V
        return self.op._matmat(V) + shift

    def diagonal(self, chunk_memory: int | None = None, *, max_memory: int | None = None) -> Tensor:
        """The exact diagonal: the operator's plus ``D``'s."""
        chunk_memory = renamed_chunk_memory(chunk_memory, max_memory, "diagonal")
        d = self.damping
        base = self.op.diagonal(chunk_memory)
        return base + (d.to(base) if isinstance(d, Tensor) else d)


class _FunctionOperator(CurvatureOperator):
    """`CurvatureOperator.from_matmat`'s operator: a function's products."""

    def __init__(
        self,
        matmat: Callable[[Tensor], Tensor],
        shapes: int | Mapping[str, Sequence[int]],
        dtype: torch.dtype | None,
        device: torch.device | str | None,
        psd: bool,
        name: str,
    ) -> None:
        super().__init__(shapes=shapes, dtype=dtype, device=device)
        self._fn, self.psd, self.name = matmat, bool(psd), name

    def _matmat(self, V: Tensor) -> Tensor:
        out = self._fn(V)
        if not isinstance(out, Tensor) or tuple(out.shape) != tuple(V.shape):
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"{self.name}'s matmat took a {tuple(V.shape)} matrix to {got}; expected "
                f"{tuple(V.shape)}"
            )
        return out.to(self.dtype)


def _add_diagonals(a: float | Tensor, b: float | Tensor) -> float | Tensor:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return torch.as_tensor(a, dtype=torch.float64) + torch.as_tensor(b, dtype=torch.float64)
    return a + b
