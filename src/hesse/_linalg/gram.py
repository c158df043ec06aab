"""The observation-space engine: the Gauss-Newton matrix ``C = J^T Lambda J`` has rank at
most ``M = N m`` (samples times outputs), so with ``B = Lambda^{1/2} J`` (``M x P``) and
the kernel ``K = B B^T`` (``M x M``, the empirical NTK weighted by ``Lambda``),

    (C + eps I)^-1 v = (v - B^T (eps I + K)^-1 B v) / eps          (O1, Woodbury)
    log det(C + eps I) = (P - M) log eps + log det(eps I + K)       (O2, Sylvester)
    eig(C) = eig(K) and P - M zeros (M <= P)                        (O3)

``O(M^3 + M P)`` instead of ``O(P^3)``: the engine when samples times outputs is small
against ``P`` (design note, "Wide stages", applied to the whole network; laplace-torch's
functional form). ``K`` is built once (several dampings cost one ``M x M`` factorisation
each) and never through ``J`` where the structure allows: for an ``nn.Linear`` layer,
``J_l J_l^T[(n, c), (n', c')] = (z_n . z_n' + [bias]) (D_n D_n'^T)[c, c']`` with ``z_n`` its
input and ``D_n = d f_n / d a_n`` the per-sample Jacobian of the outputs with respect to
its output (Novak et al. 2022, "Fast finite width neural tangent kernel"); other
parameters get their Jacobian rows by batched vector-Jacobian products.

``Lambda^{1/2}`` in closed form, per sample (``F_n^T F_n = Lambda_n``, (O4)): cross-entropy
``sqrt(c) (I - q q^T) diag(q)`` with ``q = sqrt(softmax(f))``; MSE ``sqrt(2 c) I``; BCE
with logits ``diag(sqrt(c s (1 - s)))``; ``c`` the loss's reduction factor
(`hesse._autodiff.losses.reduction_factor`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from hesse._autodiff import losses, products
from hesse._autodiff.kernels import with_fallback
from hesse._autodiff.problem import Problem, map_tensors
from hesse._linalg.base import Factorization
from hesse._linalg.results import FactorizationStatus, Inertia

__all__ = ["GramEngine", "GramFactorization", "GramNotApplicableError"]


class GramNotApplicableError(ValueError):
    """The observation-space engine cannot take this problem (the message says why)."""


# ----------------------------------------------------------------------------- Lambda^{1/2}
def output_factor(loss_fn: nn.Module, o: Tensor, targets: Any, weight: float) -> Tensor:
    """Per-sample ``F_n`` with ``F_n^T F_n = Lambda_n`` (the loss Hessian over sample
    ``n``'s outputs, flattened to ``m``): ``(n, m, m)``."""
    n = o.shape[0]
    c = losses.reduction_factor(loss_fn, o, targets, weight)
    flat = o.detach().reshape(n, -1)
    m = flat.shape[1]
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        if o.ndim != 2:
            raise GramNotApplicableError(
                f"the observation-space engine takes CrossEntropyLoss outputs (n, C); got "
                f"{tuple(o.shape)}"
            )
        q = torch.softmax(flat, dim=1).sqrt()
        eye = torch.eye(m, dtype=o.dtype, device=o.device)
        F = math.sqrt(c) * (eye - q[:, :, None] * q[:, None, :]) * q[:, None, :]
        valid = losses.valid_samples(loss_fn, o, targets)
        return F if valid is None else F * valid[:, None, None].to(F.dtype)
    if isinstance(loss_fn, nn.MSELoss):
        eye = torch.eye(m, dtype=o.dtype, device=o.device)
        return math.sqrt(2.0 * c) * eye.expand(n, m, m).clone()
    s = torch.sigmoid(flat)
    return torch.diag_embed((c * s * (1 - s)).sqrt())


# ----------------------------------------------------------------------------- J's blocks
@dataclass
class _LinearBlock:
    """An ``nn.Linear`` layer's part of ``J``: inputs ``Z`` ``(N, i)``, output Jacobians
    ``D`` ``(N, m, o)``; the weight at ``w`` and the bias at ``b`` of a flat vector."""

    Z: Tensor
    D: Tensor
    w: slice | None
    b: slice | None

    def add_kernel(self, K: Tensor) -> None:
        """``K += J_l J_l^T``: ``(D D^T) * (Z Z^T + [bias])``, one ``M x M`` temporary."""
        N, m, o = self.D.shape
        G = self.Z @ self.Z.T if self.w is not None else torch.zeros(N, N).to(self.D)
        if self.b is not None:
            G = G + 1.0
        Df = self.D.reshape(N * m, o)
        DD = (Df @ Df.T).view(N, m, N, m)
        DD.mul_(G[:, None, :, None])
        K.add_(DD.view(N * m, N * m))

    def jv(self, V: Tensor) -> Tensor:
        N, m, o = self.D.shape
        k = V.shape[1]
        A = torch.zeros(N, o, k).to(V)
        if self.w is not None:
            A += torch.einsum("ni,oik->nok", self.Z, V[self.w].reshape(o, -1, k))
        if self.b is not None:
            A += V[self.b][None]
        return torch.einsum("nco,nok->nck", self.D, A).reshape(N * m, k)

    def jtu(self, U: Tensor, out: Tensor) -> None:
        N, m, _o = self.D.shape
        k = U.shape[1]
        GA = torch.einsum("nco,nck->nok", self.D, U.reshape(N, m, k))
        if self.w is not None:
            out[self.w] = torch.einsum("nok,ni->oik", GA, self.Z).reshape(-1, k)
        if self.b is not None:
            out[self.b] = GA.sum(0)


@dataclass
class _DenseBlock:
    """Jacobian rows ``(M, p)`` of the parameters at ``index`` of a flat vector."""

    J: Tensor
    index: Tensor

    def add_kernel(self, K: Tensor) -> None:
        """``K += J J^T``."""
        K.addmm_(self.J, self.J.T)

    def jv(self, V: Tensor) -> Tensor:
        return self.J @ V[self.index]

    def jtu(self, U: Tensor, out: Tensor) -> None:
        out[self.index] = self.J.T @ U


class _Capture:
    """Forward hooks on the selected ``nn.Linear`` modules: each one's input and its
    output (kept in the graph), for one forward pass."""

    def __init__(self, modules: dict[str, nn.Linear]) -> None:
        self.inputs: dict[str, Tensor] = {}
        self.outputs: dict[str, Tensor] = {}
        self.calls: dict[str, int] = dict.fromkeys(modules, 0)
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in modules.items()]

    def _hook(self, name: str) -> Any:
        def hook(_m: nn.Module, args: tuple[Any, ...], out: Tensor) -> Tensor:
            self.calls[name] += 1
            self.inputs[name], self.outputs[name] = args[0].detach(), out
            # the next module may work in place (ReLU(inplace=True)): it gets a copy, and
            # the layer's own output stays in the graph for d f / d a
            return out.clone()

        return hook

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def _linear_modules(problem: Problem) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules whose weight or bias is selected."""
    selected = set(problem.names)
    out = {}
    for name, mod in problem.model.named_modules():
        if isinstance(mod, nn.Linear):
            own = {f"{name}.weight", f"{name}.bias"} if name else {"weight", "bias"}
            if own & selected:
                out[name] = mod
    return out


def _check_samples_independent(problem: Problem) -> None:
    """The kernel is over samples: refuse a model whose outputs couple them (BatchNorm in
    training mode), checked on the first batch's first sample."""
    inputs, _t, _w = next(iter(problem.batches()))
    ps = [p.detach() for p in problem.params]
    try:
        with torch.no_grad():
            full = problem.outputs(ps, inputs)
            one = problem.outputs(ps, map_tensors(inputs, lambda t: t[:1]))
        independent = isinstance(full, Tensor) and torch.allclose(
            full[:1], one, rtol=1e-8, atol=1e-12
        )
    except (RuntimeError, ValueError):  # e.g. train-mode BatchNorm refuses one sample
        independent = False
    if not independent:
        raise GramNotApplicableError(
            "the observation-space engine needs samples that do not interact (sample n's "
            "outputs from its inputs alone); this model couples them (BatchNorm in "
            "training mode?): call model.eval(), or use method='dense' or 'chain'"
        )


# ----------------------------------------------------------------------------- the engine
class GramEngine:
    """``B = Lambda^{1/2} J`` of a `Problem`'s Gauss-Newton matrix in factored form and
    its kernel ``K = B B^T``, built once (`factor` repeats only the ``M x M``
    factorisation).

    Raises:
        GramNotApplicableError: the curvature is not the GGN, the loss has no closed-form
            ``Lambda^{1/2}`` (supported: ``CrossEntropyLoss``, ``MSELoss``,
            ``BCEWithLogitsLoss``), or the model couples samples.
    """

    method = "gram"

    def __init__(self, problem: Problem, curvature: str) -> None:
        if curvature != "ggn":
            raise GramNotApplicableError(
                f"the observation-space engine factors the GGN (C = J^T Lambda J) only; "
                f"curvature={curvature!r} needs method='dense' or 'chain'"
            )
        try:
            losses.fisher_loss(problem.loss_fn)
        except NotImplementedError:
            raise GramNotApplicableError(
                "the observation-space engine needs a loss with a closed-form Lambda^{1/2}: "
                f"one of {[c.__name__ for c in losses.FISHER_LOSSES]} (no class weights); "
                f"got {type(problem.loss_fn).__name__}: use method='dense' or 'chain'"
            ) from None
        _check_samples_independent(problem)
        self.problem, self.curvature = problem, curvature
        self.blocks, self.factors = with_fallback(
            problem, "the observation-space kernel", self._build
        )
        self.num_outputs = int(self.factors.shape[0] * self.factors.shape[1])
        self.kernel = self._kernel()
        self._eigh: tuple[Tensor, Tensor] | None = None

    # ------------------------------------------------------------------ building
    def _build(self) -> tuple[list[Any], Tensor]:
        prob = self.problem
        linear = _linear_modules(prob)
        cap = _Capture(linear)
        per_batch: list[tuple[dict[str, Tensor], dict[str, Tensor], Tensor, Tensor]] = []
        factors = []
        try:
            for inputs, targets, w in prob.batches():
                ps = [p.detach().requires_grad_(True) for p in prob.params]
                o = prob.outputs(ps, inputs)
                if not isinstance(o, Tensor):
                    raise GramNotApplicableError(
                        "the observation-space engine needs one output tensor"
                    )
                factors.append(output_factor(prob.loss_fn, o, targets, w))
                per_batch.append((dict(cap.inputs), dict(cap.outputs), o, ps))  # type: ignore[arg-type]
                # a module called twice (weight sharing) or not at all: no layer form
                linear = {n: m for n, m in linear.items() if cap.calls[n] == len(per_batch)}
        finally:
            cap.close()
        blocks = self._linear_blocks(linear, per_batch) if linear else []
        covered = {n for b in blocks for n in b.names}
        rest = [n for n in prob.names if n not in covered]
        if rest:
            blocks.append(self._dense_block(rest, per_batch))
        for b in blocks:
            del b.names
        return blocks, torch.cat(factors)

    def _linear_blocks(self, linear: dict[str, nn.Linear], per_batch: list[Any]) -> list[Any]:
        prob = self.problem
        out = []
        grads: list[list[Tensor]] = []
        for ins, outs, o, _ps in per_batch:
            m = o[0].numel()
            n = o.shape[0]
            U = torch.zeros(m, n, m, dtype=o.dtype, device=o.device)
            U[torch.arange(m), :, torch.arange(m)] = 1.0
            U = U.reshape(m, *o.shape)
            acts = [outs[name] for name in linear]
            g = torch.autograd.grad(o, acts, U, is_grads_batched=True, retain_graph=True)
            grads.append([gi.transpose(0, 1) for gi in g])  # (n, m, o) each
            if any(ins[name].ndim != 2 for name in linear):
                return []  # inputs with more than a batch dimension: no layer form
        for j, (name, _mod) in enumerate(linear.items()):
            head = f"{name}." if name else ""
            w, b = f"{head}weight", f"{head}bias"
            block = _LinearBlock(
                torch.cat([pb[0][name] for pb in per_batch]),
                torch.cat([g[j] for g in grads]),
                prob.slices.get(w),
                prob.slices.get(b),
            )
            block.names = [x for x in (w, b) if x in prob.slices]  # type: ignore[attr-defined]
            out.append(block)
        return out

    def _dense_block(self, names: list[str], per_batch: list[Any]) -> Any:
        """Jacobian rows for ``names`` by batched vector-Jacobian products, ``m n`` unit
        cotangents a batch (in chunks)."""
        prob = self.problem
        idx = [i for i, n in enumerate(prob.names) if n in names]
        index = torch.cat([torch.arange(prob.slices[n].start, prob.slices[n].stop) for n in names])
        rows = []
        for _ins, _outs, o, ps in per_batch:
            flat = o.reshape(-1)
            eye = torch.eye(flat.numel(), dtype=o.dtype, device=o.device)
            sub = [ps[i] for i in idx]
            for s in range(0, flat.numel(), 256):
                rows.append(products.apply_batched(flat, sub, eye[s : s + 256]))
        block = _DenseBlock(torch.cat(rows), index.to(prob.device))
        block.names = names  # type: ignore[attr-defined]
        return block

    def _kernel(self) -> Tensor:
        """``K = F (J J^T) F^T`` (O5 per Linear layer), ``F`` block diagonal over
        samples (symmetric up to rounding; the factorisations read its lower triangle):
        three ``M x M`` arrays at the peak."""
        M = self.num_outputs
        F = self.factors
        N, m, _ = F.shape
        KJ = torch.zeros(M, M, dtype=F.dtype, device=F.device)
        for b in self.blocks:
            b.add_kernel(KJ)
        left = torch.bmm(F, KJ.view(N, m, M)).view(M, N, m)  # F_n (J J^T)[n, :]
        del KJ
        return (
            torch.bmm(left.view(M, N, m).transpose(0, 1), F.transpose(1, 2))
            .transpose(0, 1)
            .reshape(M, M)
        )

    # ------------------------------------------------------------------ B and B^T
    def B(self, V: Tensor) -> Tensor:
        """``B V = F J V``: ``(P, k) -> (M, k)``."""
        JV = sum(b.jv(V) for b in self.blocks)
        N, m, _ = self.factors.shape
        return torch.einsum("nac,nck->nak", self.factors, JV.reshape(N, m, -1)).reshape(N * m, -1)

    def Bt(self, U: Tensor) -> Tensor:
        """``B^T U = J^T F^T U``: ``(M, k) -> (P, k)``."""
        N, m, _ = self.factors.shape
        FU = torch.einsum("nac,nak->nck", self.factors, U.reshape(N, m, -1)).reshape(N * m, -1)
        out = torch.zeros(self.problem.num_params, U.shape[1], dtype=U.dtype, device=U.device)
        for b in self.blocks:
            b.jtu(FU, out)
        return out

    def eigh(self) -> tuple[Tensor, Tensor]:
        """``K``'s eigenvalues (ascending) and eigenvectors, computed once: the whole
        spectrum of ``C`` for counts at any shift."""
        if self._eigh is None:
            self._eigh = torch.linalg.eigh(self.kernel)
        return self._eigh

    def factor(self, damping: float, rank_rtol: float | None = None) -> GramFactorization:
        """``C + eps I`` factored in observation space (``eps = damping``)."""
        return GramFactorization(self, damping, rank_rtol)


class GramFactorization(Factorization):
    """``C + eps I`` of a `GramEngine`: Cholesky of ``eps I + K`` for ``eps > 0`` (every
    eigenvalue of ``C + eps I`` is positive), else the eigendecomposition of ``K``, which
    gives the whole spectrum of ``C`` (its eigenvalues and ``P - M`` zeros): exact counts
    at any shift."""

    def __init__(self, engine: GramEngine, damping: float, rank_rtol: float | None) -> None:
        self.engine, self.problem, self.curvature = engine, engine.problem, "ggn"
        self.damping = eps = float(damping)
        self.num_params = P = engine.problem.num_params
        K = engine.kernel
        dtype = K.dtype
        self._out_dtype = dtype
        M = K.shape[0]
        self.rank_rtol = (
            10.0 * max(P, 1) * torch.finfo(dtype).eps if rank_rtol is None else float(rank_rtol)
        )
        kmax = float(K.diagonal().max()) if M else 0.0
        scale = kmax + abs(eps)
        zero_tol = self.rank_rtol * scale
        self._chol: Tensor | None = None
        self._eig: tuple[Tensor, Tensor] | None = None
        if eps > 0:
            L, info = torch.linalg.cholesky_ex(K + eps * torch.eye(M, dtype=dtype, device=K.device))
            if int(info) == 0 and float(L.diagonal().min()) ** 2 > zero_tol:
                self._chol = L
        if self._chol is not None:
            piv = self._chol.diagonal() ** 2
            kind = "cholesky"
        else:
            mu, U = engine.eigh()
            keep = min(M, P)  # M > P: K has M - P further zeros that C does not
            mu, U = mu[M - keep :], U[:, M - keep :]
            self._eig = (mu, U)
            piv = mu + eps
            kind = "eigen"
        self._set_status(piv, P - min(M, P), zero_tol, scale, kind, dtype)

    def _set_status(
        self, piv: Tensor, n_eps: int, zero_tol: float, scale: float, kind: str, dtype: Any
    ) -> None:
        """Inertia and log-determinant: from ``eps I + K``'s pivots and ``P - M`` further
        eigenvalues ``eps`` (O2, O3)."""
        eps = self.damping
        p = piv.double().cpu()
        neg = int((p < -zero_tol).sum()) + (n_eps if eps < -zero_tol else 0)
        zero = int((p.abs() <= zero_tol).sum()) + (n_eps if abs(eps) <= zero_tol else 0)
        pos = self.num_params - neg - zero
        self.inertia_ = Inertia(neg, zero, pos)
        if zero:
            self._logdet = (0.0, -math.inf)
        else:
            logabs = float(p.abs().log().sum()) + (n_eps * math.log(abs(eps)) if n_eps else 0.0)
            self._logdet = ((-1.0) ** neg, logabs)
        mins = [float(p.abs().min())] if len(p) else []
        mins += [abs(eps)] if n_eps else []
        self.status = FactorizationStatus(
            kinds=(kind,),
            delayed=(),
            max_delayed=0,
            growth=1.0,
            scale=scale,
            zero_tol=zero_tol,
            inertia=self.inertia_,
            min_pivot=(min(mins) / scale) if mins and scale > 0 else math.inf,
            dtype=dtype,
            method="gram",
        )

    def _apply_inverse(self, V: Tensor) -> Tensor:
        e, eps = self.engine, self.damping
        BV = e.B(V)
        if self._chol is not None:  # (O1)
            Z = torch.cholesky_solve(BV, self._chol)
            return (V - e.Bt(Z)) / eps
        mu, U = self._eig  # type: ignore[misc]
        W = U.T @ BV
        if eps != 0.0:
            return (V - e.Bt(U @ (W / (mu + eps)[:, None]))) / eps
        # eps = 0 with C non-singular (M >= P, full rank): C^-1 = B^T U mu^-2 U^T B (O3)
        return e.Bt(U @ (W / (mu * mu)[:, None]))
