"""The curvature operator: one abstraction for "a symmetric P x P matrix we can multiply
by".

`CurvatureOperator` owns everything that is the same for every curvature matrix:
the ``@`` operator on flat vectors, matrices and per-parameter lists, dense
materialisation in memory-bounded column chunks with a progress bar, per-block
views, and the export to ``scipy.sparse.linalg.LinearOperator``. A subclass only
chooses its product (``_matmat``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from hesse._autodiff.problem import Problem
from hesse._util.memory import check_memory
from hesse._util.progress import progress_bar

if TYPE_CHECKING:  # scipy.sparse.linalg costs half a second to import: only when used
    from scipy.sparse.linalg import LinearOperator

__all__ = ["CurvatureOperator"]

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


class CurvatureOperator:
    """A symmetric ``(P, P)`` curvature matrix of a `Problem`, applied matrix-free.

    Supports ``op @ v`` for a flat vector ``(P,)``, a matrix ``(P, k)`` of column
    vectors, or a list of per-parameter tensors (the result has the same form),
    ``.shape``, ``.dtype``, ``.device``, ``.to_dense()``, ``.block(name_i, name_j)``
    and ``.to_scipy()``.

    Attributes:
        symmetric: always ``True`` for curvature matrices.
        psd: ``True`` when the matrix is positive semi-definite by construction
            (Gauss-Newton, Fisher), ``False`` when it may be indefinite (Hessian).
    """

    symmetric: bool = True
    psd: bool = False
    column_memory: float = 2.0  # vectors of (P + activations) a column costs in flight
    name: str = "curvature"

    def __init__(self, problem: Problem) -> None:
        if not isinstance(problem, Problem):
            raise TypeError(f"expected a hesse.Problem; got {type(problem).__name__}")
        self.problem = problem

    # ---------------------------------------------------------------- interface
    def _matmat(self, V: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def random(self) -> bool:
        """Whether products are random: a module of the model is Dropout in training mode
        (each product draws new masks)."""
        return self.problem.random

    @property
    def shape(self) -> tuple[int, int]:
        P = self.problem.num_params
        return (P, P)

    @property
    def dtype(self) -> torch.dtype:
        return self.problem.dtype

    @property
    def device(self) -> torch.device:
        return self.problem.device

    def __matmul__(self, v: Tensor | Sequence[Tensor]) -> Tensor | list[Tensor]:
        as_list = isinstance(v, (list, tuple))
        flat = self.problem.as_flat(v)
        self.problem.agree(f"{type(self).__name__} @ v", v=flat)
        out = self._matmat(flat.unsqueeze(1) if flat.ndim == 1 else flat)
        out = out.squeeze(1) if flat.ndim == 1 else out
        return self.problem.unflatten(out) if as_list else out

    def matvec(self, v: Tensor | Sequence[Tensor]) -> Tensor | list[Tensor]:
        """Same as ``self @ v``."""
        return self @ v

    def matmat(self, V: Tensor) -> Tensor:
        """``C V`` for a flat ``(P, k)`` matrix on the operator's device and dtype, without
        the validation and conversions of ``@`` (for inner loops: Lanczos, CG)."""
        return self._matmat(V)

    # ---------------------------------------------------------------- dense
    def chunk_size(self, max_memory: int | None = None) -> int:
        """Columns per chunk so that the batched products stay within ``max_memory``
        bytes: a column costs about one parameter vector plus one set of
        activations of the largest batch, for each pass that is batched."""
        if max_memory is not None and not (isinstance(max_memory, (int, float)) and max_memory > 0):
            raise ValueError(f"max_memory must be a positive number of bytes; got {max_memory!r}")
        budget = _DEFAULT_MAX_MEMORY if max_memory is None else int(max_memory)
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        P = self.problem.num_params
        per_col = 4 * itemsize * (P + self.activation_numel())
        return max(1, min(P, budget // max(per_col, 1)))

    def activation_numel(self) -> int:
        """Numbers in one forward pass over the first batch (every module's output),
        measured once: the unit of the working-memory estimates."""
        if not hasattr(self, "_act_numel"):
            numel = 0

            def hook(_m: torch.nn.Module, _i: Any, out: Any) -> None:  # count each output once
                nonlocal numel
                if isinstance(out, Tensor):
                    numel += out.numel()

            handles = [m.register_forward_hook(hook) for m in self.problem.model.modules()]
            try:
                first = next(iter(self.problem.batches()), None)  # a rank may hold none
                if first is not None:
                    with torch.no_grad():
                        self.problem.outputs([p.detach() for p in self.problem.params], first[0])
            finally:
                for h in handles:
                    h.remove()
            if self.problem.group is not None:  # the same chunks on every rank
                numel = int(self.problem.group.max(numel))
            self._act_numel = numel
        return self._act_numel

    def columns(
        self, cols: Sequence[int], max_memory: int | None = None, progress: bool | None = False
    ) -> Tensor:
        """``self @ I[:, cols]`` as ``(P, len(cols))``, in chunks of columns whose batched
        products stay within ``max_memory`` bytes (default 1 GiB)."""
        P = self.problem.num_params
        chunk = self.chunk_size(max_memory)
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

    def to_dense(self, max_memory: int | None = None, progress: bool | None = None) -> Tensor:
        """The dense ``(P, P)`` matrix, cross-parameter blocks included.

        Built from ``P`` products in chunks of columns, each chunk in one batched
        pass per data batch. ``max_memory`` (bytes, default 1 GiB) bounds the working
        memory of a chunk; the result itself needs ``P^2`` numbers. ``progress``
        shows a tqdm bar (default: when stderr is a terminal and the job is long).
        The result is symmetrised, ``(M + M^T)/2``, to remove round-off asymmetry.
        """
        P = self.problem.num_params
        check_memory(
            self.dense_memory(max_memory),
            f"the dense {P} x {P} {self.name} matrix",
            "use hessian_blocks / block() for the blocks you need, eigs / trace / "
            "spectral_density for spectra, or the chain solver (hesse.factorize) for "
            "solves, log-determinants and counts; a smaller max_memory shrinks only the "
            "working memory of the column chunks",
            self.device,
        )
        M = self.columns(range(P), max_memory, progress)
        return _symmetrize_(M)

    def dense_memory(self, max_memory: int | None = None) -> int:
        """Bytes `to_dense` needs at its peak: the ``P x P`` result and one chunk of
        columns (the unit vectors, their products and the batched pass's working memory,
        see ``max_memory``)."""
        P = self.problem.num_params
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        chunk = self.chunk_size(max_memory)
        # measured (tests/test_memory.py): a column costs about two parameter vectors and
        # two sets of activations while its chunk is in flight (the Hessian's double
        # backward; the Gauss-Newton family's forward-mode product somewhat less)
        per_col = self.column_memory * itemsize * (P + self.activation_numel())
        return P * P * itemsize + chunk * per_col

    def block(self, row: str, col: str, max_memory: int | None = None) -> Tensor:
        """The block of rows for parameter ``row`` and columns for ``col``, shaped
        ``row_param.shape + col_param.shape``; costs one product per column of ``col``."""
        sl = self.problem.slices
        for n in (row, col):
            if n not in sl:
                raise ValueError(f"unknown parameter {n!r}; selected: {self.problem.names}")
        cols = range(sl[col].start, sl[col].stop)
        M = self.columns(cols, max_memory, progress=False)[sl[row]]
        shapes = dict(zip(self.problem.names, self.problem.shapes, strict=True))
        return M.reshape((*shapes[row], *shapes[col]))

    def diagonal(self, max_memory: int | None = None) -> Tensor:
        """The exact diagonal ``(P,)``: ``P`` products, one chunk of columns at a time
        (``P x chunk`` memory)."""
        P = self.problem.num_params
        chunk = self.chunk_size(max_memory)
        out = torch.empty(P, dtype=self.dtype, device=self.device)
        for start in range(0, P, chunk):
            stop = min(P, start + chunk)
            out[start:stop] = self.columns(range(start, stop), max_memory)[start:stop].diagonal()
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
