"""The observation-space engine: the Gauss-Newton matrix ``C = J^T Lambda J`` has rank at
most ``M = N r`` (samples times the rank of a sample's ``Lambda_n``: ``r = m`` outputs, or
``m - 1`` for cross-entropy), so with ``B = Lambda^{1/2} J`` (``M x P``) and
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
``sqrt(c) U_n^T diag(q)`` with ``q = sqrt(softmax(f))`` and ``U_n`` ``m - 1`` orthonormal
columns spanning ``q``'s complement (``Lambda_n`` has the null vector ``1``, so ``M = N (m -
1)`` rows: a 0.73x smaller Cholesky at 10 classes, 8x at 2); MSE ``sqrt(2 c) I``; BCE with
logits ``diag(sqrt(c s (1 - s)))``; ``c`` the loss's reduction factor
(`hesse._autodiff.losses.reduction_factor`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module

from hesse._autodiff import losses, products
from hesse._autodiff.kernels import with_fallback
from hesse._autodiff.layers import runs_forward_of
from hesse._autodiff.problem import Problem
from hesse._factor.base import Engine, Factorization, PivotSummary, shift
from hesse._factor.cost import LAYER_SECONDS, EngineCost, EngineSpec, Timing, problem_of
from hesse._operators.curvature import curvature_operator
from hesse._util.memory import available_memory, check_memory

__all__ = ["GramEngine", "GramFactorization", "GramNotApplicableError"]


class GramNotApplicableError(ValueError):
    """The observation-space engine cannot take this problem (the message says why)."""


# ----------------------------------------------------------------------------- Lambda^{1/2}
def factor_rows(loss_fn: nn.Module, m: int) -> int:
    """``r``, the rows of a sample's `output_factor` for ``m`` outputs: ``m - 1`` for
    cross-entropy over ``m > 1`` classes (``Lambda_n`` has the null vector ``1``), else
    ``m``; the kernel is ``N r x N r`` (O4)."""
    return m - 1 if isinstance(loss_fn, nn.CrossEntropyLoss) and m > 1 else m


def output_factor(loss_fn: nn.Module, o: Tensor, targets: Any, weight: float) -> Tensor:
    """Per-sample ``F_n`` with ``F_n^T F_n = Lambda_n`` (the loss Hessian over sample
    ``n``'s outputs, flattened to ``m``): ``(n, r, m)``, ``r = factor_rows(loss_fn, m)``."""
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
        mass = losses.ce_target_mass(loss_fn, o, targets).sqrt()[:, None, None]
        if m == 1:  # one class: Lambda = 0
            return torch.zeros(n, 1, 1, dtype=o.dtype, device=o.device)
        # (O4): U_n^T diag(q) with U_n's m - 1 orthonormal columns spanning q's complement
        # (U U^T = I - q q^T): the first m - 1 columns of the Householder reflector
        # H = I - w w^T / (1 + q_m), w = q + e_m, which maps q to -e_m (q_m > 0: stable)
        w = q.clone()
        w[:, -1] += 1.0
        eye = torch.eye(m, dtype=o.dtype, device=o.device)
        H = eye - w[:, :, None] * w[:, None, :] / (1.0 + q[:, -1])[:, None, None]
        F = math.sqrt(c) * H[:, :, : m - 1].transpose(1, 2) * q[:, None, :]
        return F * mass
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

    def add_kernel(self, K: Tensor, dinv: Tensor | None = None, work: Tensor | None = None) -> None:
        """``K += J_l D_l^-1 J_l^T`` (``D = I`` for ``dinv=None``): ``(D D^T) * (Z Z^T /
        d_w + 1 / d_b)`` while ``D`` is constant on the weight and on the bias (one ``M x
        M`` temporary: ``work`` when given, reused over the layers, as a fresh one a
        layer costs its page faults, 20 ms at ``M = 2560``), else through the layer's
        explicit Jacobian rows."""
        N, m, o = self.D.shape
        cw = cb = 1.0
        if dinv is not None:
            parts = [dinv[s] for s in (self.w, self.b) if s is not None]
            if any(bool((t != t[0]).any()) for t in parts):
                J = self.rows()
                K.addmm_(J * dinv[self.index()].to(J), J.T)
                return
            cw = float(dinv[self.w][0]) if self.w is not None else 0.0
            cb = float(dinv[self.b][0]) if self.b is not None else 0.0
        G = cw * (self.Z @ self.Z.T) if self.w is not None else torch.zeros(N, N).to(self.D)
        if self.b is not None:
            G = G + cb
        Df = self.D.reshape(N * m, o)
        DD = torch.mm(Df, Df.T, out=work) if work is not None else Df @ Df.T
        K.view(N, m, N, m).addcmul_(DD.view(N, m, N, m), G[:, None, :, None])

    def index_tensor(self) -> Tensor:
        return self.index()

    def index(self) -> Tensor:
        """The flat positions of this block's parameters (weight, then bias)."""
        idx = [torch.arange(s.start, s.stop) for s in (self.w, self.b) if s is not None]
        return torch.cat(idx).to(self.D.device)

    def rows(self) -> Tensor:
        """The explicit Jacobian rows ``(M, p_l)``: ``D[n, c, o] Z[n, i]`` and ``D[n, c, o]``."""
        N, m, o = self.D.shape
        out = []
        if self.w is not None:
            out.append(torch.einsum("nco,ni->ncoi", self.D, self.Z).reshape(N * m, -1))
        if self.b is not None:
            out.append(self.D.reshape(N * m, o))
        return torch.cat(out, 1)

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

    def index_tensor(self) -> Tensor:
        return self.index

    def add_kernel(self, K: Tensor, dinv: Tensor | None = None, work: Tensor | None = None) -> None:
        """``K += J D^-1 J^T`` (``D = I`` for ``dinv=None``; no temporary: ``work``
        unused)."""
        K.addmm_(self.J if dinv is None else self.J * dinv[self.index].to(self.J), self.J.T)

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


def linear_modules(problem: Problem) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules whose weight or bias is selected, under its own name and
    used there alone (a tied parameter's Jacobian sums its uses: batched products), that
    compute ``a = x W^T + b`` as `_Capture` sees them: ``nn.Linear``'s own ``forward``
    and no forward hook that could change ``a`` (the module's, or a global one); the
    others' Jacobians come from batched products."""
    selected = set(problem.names)
    tied = set(problem.parameters.aliases)
    tied |= {a for names in problem.parameters.aliases.values() for a in names}
    if _module._global_forward_hooks:
        return {}
    out = {}
    for name, mod in problem.model.named_modules(remove_duplicate=False):
        if runs_forward_of(mod, nn.Linear) and not mod._forward_hooks:
            own = {f"{name}.weight", f"{name}.bias"} if name else {"weight", "bias"}
            if own & tied:
                continue
            if own & selected:
                out[name] = mod
    return out


def check_samples_independent(problem: Problem) -> None:
    """The kernel is over samples: refuse a model whose outputs couple them
    (`Problem.coupling`: BatchNorm in training mode, a sum over the batch, causal
    coupling)."""
    why = problem.coupling()
    if why is not None:
        raise GramNotApplicableError(
            "the observation-space engine needs samples that do not interact (sample n's "
            f"outputs from its inputs alone), but {why}: call model.eval() if the model has "
            "BatchNorm or Dropout, or use method='dense' or 'chain'"
        )


# ----------------------------------------------------------------------------- the engine
class GramEngine(Engine):
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
        check_samples_independent(problem)
        self.problem, self.curvature = problem, curvature
        self.blocks, self.factors = with_fallback(
            problem, "the observation-space kernel", self._build
        )
        self.num_outputs = int(self.factors.shape[0] * self.factors.shape[1])
        self.kernel = self._kernel()
        self._eigh: tuple[Tensor, Tensor] | None = None
        self._eigvals: Tensor | None = None
        self._tensor_kernels: dict[str, Tensor] | None = None

    # ------------------------------------------------------------------ building
    def _build(self) -> tuple[list[Any], Tensor]:
        prob = self.problem
        linear = linear_modules(prob)
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

    def tensor_kernels(self) -> dict[str, Tensor] | None:
        """``K_t = B E_t E_t^T B^T`` ``(M, M)`` for each parameter tensor ``t`` (``E_t`` its
        columns of the identity), built once where they fit (a quarter of the available
        memory), else ``None``: a diagonal ``D`` constant on each tensor then gives ``K_D =
        sum_t K_t / d_t`` and the traces (O7) without a pass over the layers (the
        layerwise prior's many factorisations)."""
        if self._tensor_kernels is None:
            prob = self.problem
            M = self.num_outputs
            need = len(prob.names) * M * M * self.factors.element_size()
            if need > 0.25 * available_memory(self.factors.device):
                return None
            out = {}
            for name, sl in prob.slices.items():
                ind = torch.zeros(prob.num_params, dtype=self.factors.dtype, device=prob.device)
                ind[sl] = 1.0
                out[name] = self._kernel(ind, skip_zero=True)
            self._tensor_kernels = out
        return self._tensor_kernels

    def tensor_terms(self, w: Tensor) -> list[tuple[float, Tensor]] | None:
        """``[(w_t, K_t)]`` with ``B diag(w) B^T = sum_t w_t K_t`` when ``w`` ``(P,)`` is
        constant on each of several tensors and their kernels fit, else ``None``."""
        const = self.per_tensor(w)
        kernels = self.tensor_kernels() if const is not None and len(const) > 1 else None
        if kernels is None:
            return None
        return [(c, kernels[n]) for n, c in const.items() if c != 0.0]  # type: ignore[union-attr]

    def weighted_kernel(self, w: Tensor) -> Tensor:
        """``B diag(w) B^T`` ``(M, M)`` for ``w`` ``(P,)`` (O5/O6): a sum of the tensor
        kernels where `tensor_terms` gives them, else built over the layers ``w``
        touches."""
        terms = self.tensor_terms(w)
        if terms is None:
            return self._kernel(w, skip_zero=True)
        out = torch.zeros_like(self.kernel)
        for c, K_t in terms:
            out.add_(K_t, alpha=c)
        return out

    def per_tensor(self, d: Tensor) -> dict[str, float] | None:
        """``{name: d_t}`` when ``d`` ``(P,)`` is constant on every parameter tensor, else
        ``None``."""
        out = {}
        for name, sl in self.problem.slices.items():
            part = d[sl]
            if part.numel() and bool((part != part[0]).any()):
                return None
            out[name] = float(part[0]) if part.numel() else 0.0
        return out

    def _kernel(self, dinv: Tensor | None = None, skip_zero: bool = False) -> Tensor:
        """``K = F (J D^-1 J^T) F^T = B D^-1 B^T`` (``D = I`` for ``dinv=None``; O5 per
        Linear layer), ``F`` block diagonal over samples (symmetric up to rounding; the
        factorisations read its lower triangle): three ``M x M`` arrays at the peak."""
        M = self.num_outputs
        F = self.factors
        N, _r, m = F.shape
        KJ = torch.zeros(N * m, N * m, dtype=F.dtype, device=F.device)
        work = torch.empty_like(KJ) if len(self.blocks) > 1 else None  # the layers' D D^T
        for b in self.blocks:
            if skip_zero and dinv is not None and not bool(dinv[b.index_tensor()].any()):
                continue  # a weighted kernel that this layer's parameters do not enter
            b.add_kernel(KJ, dinv, work)
        del work
        left = torch.bmm(F, KJ.view(N, m, N * m))  # F_n (J J^T)[n, :]: (N, r, N m)
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
        N, r, m = self.factors.shape
        return torch.einsum("nac,nck->nak", self.factors, JV.reshape(N, m, -1)).reshape(N * r, -1)

    def Bt(self, U: Tensor) -> Tensor:
        """``B^T U = J^T F^T U``: ``(M, k) -> (P, k)``."""
        N, r, m = self.factors.shape
        FU = torch.einsum("nac,nak->nck", self.factors, U.reshape(N, r, -1)).reshape(N * m, -1)
        out = torch.zeros(self.problem.num_params, U.shape[1], dtype=U.dtype, device=U.device)
        for b in self.blocks:
            b.jtu(FU, out)
        return out

    def eigh(self) -> tuple[Tensor, Tensor]:
        """``K``'s eigenvalues (ascending) and eigenvectors, computed once (the
        solves of the eigen route, O3)."""
        if self._eigh is None:
            self._eigh = torch.linalg.eigh(self.kernel)
        return self._eigh

    def eigvalsh(self) -> Tensor:
        """``K``'s eigenvalues (ascending) ``(M,)``, computed once: the whole spectrum
        of ``C`` for counts, log-determinants and evidences at any shift (values only:
        about a quarter of `eigh`'s time)."""
        if self._eigh is not None:
            return self._eigh[0]
        if self._eigvals is None:
            self._eigvals = torch.linalg.eigvalsh(self.kernel)
        return self._eigvals

    def _factor(self, damping: float | Tensor, rank_rtol: float | None) -> GramFactorization:
        """``C + D`` factored in observation space ((O1)-(O3); a diagonal ``D``: (O6))."""
        return GramFactorization(self, damping, rank_rtol)


class GramFactorization(Factorization):
    """``C + D`` of a `GramEngine`.

    - ``D = eps I``, ``eps > 0``: Cholesky of ``eps I + K`` (O1, O2; every eigenvalue
      of ``C + eps I`` is positive).
    - ``D = eps I``, ``eps <= 0`` (or ``eps I + K`` numerically singular): the
      eigendecomposition of ``K``, which gives the whole spectrum of ``C`` (its
      eigenvalues and ``P - M`` zeros, O3): exact counts at any shift.
    - ``D`` a positive diagonal: Cholesky of ``I + K_D``, ``K_D = B D^-1 B^T`` (O6).
    """

    def __init__(
        self, engine: GramEngine, damping: float | Tensor, rank_rtol: float | None
    ) -> None:
        self.engine, self.problem, self.curvature = engine, engine.problem, "ggn"
        self.damping = damping
        self.num_params = P = engine.problem.num_params
        K = engine.kernel
        dtype = K.dtype
        self._out_dtype = dtype
        M = K.shape[0]
        self.rank_rtol = (
            10.0 * max(P, 1) * torch.finfo(dtype).eps if rank_rtol is None else float(rank_rtol)
        )
        self._chol: Tensor | None = None
        self._keep = 0  # the eigen route's number of K's eigenpairs that C has
        self._dinv: Tensor | None = None
        if isinstance(damping, Tensor):  # (O6): det(C + D) = det D det(I + K_D)
            self._dinv = (1.0 / damping).to(dtype=dtype, device=K.device)
            KD = engine.weighted_kernel(self._dinv)
            KD.diagonal().add_(1.0)
            self._chol = torch.linalg.cholesky(KD)
            del KD
            scale = (float(K.diagonal().max()) if M else 0.0) + float(damping.max())
            # congruent to D (I + D^-1/2 C D^-1/2): D's pivots give the inertia
            self._finish(damping.to(dtype), [], scale, "cholesky", dtype)
            sign, logabs = self._logdet
            self._logdet = (sign, logabs + 2.0 * float(self._chol.diagonal().log().sum()))
            return
        eps = float(damping)
        kmax = float(K.diagonal().max()) if M else 0.0
        scale = kmax + abs(eps)
        zero_tol = self.rank_rtol * scale
        if eps > 0:
            A = K.clone()  # no identity beside it: three M x M arrays at the peak
            A.diagonal().add_(eps)
            L, info = torch.linalg.cholesky_ex(A)
            del A
            if int(info) == 0 and float(L.diagonal().min()) ** 2 > zero_tol:
                self._chol = L
        if self._chol is not None:
            # eps I + K has M eigenvalues; for M > P, M - P of them are eps (K's null
            # space, which C does not have): (O2) removes them, a count P - M < 0
            self._finish(self._chol.diagonal() ** 2, [(eps, P - M)], scale, "cholesky", dtype)
            return
        keep = self._keep = min(M, P)  # M > P: K has M - P further zeros that C does not
        mu = engine.eigvalsh()[M - keep :]  # the eigenvectors only once a solve needs them
        self._finish(mu + eps, [(eps, P - keep)], scale, "eigen", dtype)

    def _finish(
        self,
        piv: Tensor,
        extras: list[tuple[float, int]],
        scale: float,
        kind: str,
        dtype: torch.dtype,
    ) -> None:
        zero_tol = self.rank_rtol * scale
        self.status = self._status(
            PivotSummary(piv, zero_tol, extras),
            kinds=(kind,),
            scale=scale,
            zero_tol=zero_tol,
            dtype=dtype,
            method="gram",
        )

    def operator(self, X: Tensor) -> Tensor:
        """``(C + D) X = B^T (B X) + D X`` from the engine's factored ``C`` (its blocks:
        refinement (S7) without a pass over the data)."""
        e = self.engine
        return e.Bt(e.B(X)) + shift(self.damping, X)

    def inverse_traces(self, weights: list[Tensor]) -> list[float] | None:
        """``sum_i u_i [(C + D)^-1]_ii`` for each ``(P,)`` weight vector ``u`` (say, a
        parameter tensor's indicator times its prior): ``sum u / d - tr(W B diag(u / d^2)
        B^T)`` ((O7); ``W = (I + K_D)^-1``, for ``eps I``: ``(sum u - tr(W B diag(u) B^T))
        / eps``, ``W = (eps I + K)^-1``), one weighted kernel a vector (O5: only the
        layers ``u`` touches) and one ``M x M`` inverse, without ``P`` solves. ``None``
        for the eigen route (``eps <= 0``)."""
        if self._chol is None:
            return None
        e = self.engine
        W = torch.cholesky_inverse(self._chol)
        out = []
        for u in weights:
            u = u.to(W)
            if self._dinv is not None:
                d = self._dinv.to(W)
                w, base, div = u * d * d, float((u * d).sum()), 1.0
            else:
                w, base, div = u, float(u.sum()), float(self.damping)
            terms = e.tensor_terms(w)
            if terms is not None:  # tr(W sum_t c_t K_t) without forming the sum
                tr = sum(c * float(torch.vdot(W.reshape(-1), K_t.reshape(-1))) for c, K_t in terms)
            else:
                tr = float(torch.vdot(W.reshape(-1), e.weighted_kernel(w).reshape(-1)))
            out.append((base - tr) / div)
        return out

    def inverse_diagonal(self, chunk: int = 256) -> Tensor | None:
        """The diagonal of ``(C + D)^-1`` ``(P,)`` from the Woodbury form, without ``P``
        solves: ``d^-1 - d^-2 colsum(B_c * (W B_c))`` (``W = (I + K_D)^-1``; for ``eps
        I``: ``(1 - colsum(B_c * (W B_c))) / eps``, ``W = (eps I + K)^-1``), ``B``'s
        columns in chunks. ``None`` for the eigen route (``eps <= 0``)."""
        if self._chol is None:
            return None
        e, P = self.engine, self.num_params
        dt, dev = self._chol.dtype, self._chol.device
        out = torch.empty(P, dtype=dt, device=dev)
        for a in range(0, P, chunk):
            b = min(P, a + chunk)
            E = torch.zeros(P, b - a, dtype=dt, device=dev)
            E[torch.arange(a, b), torch.arange(b - a)] = 1.0
            Bc = e.B(E)
            out[a:b] = (Bc * torch.cholesky_solve(Bc, self._chol)).sum(0)
        if self._dinv is not None:
            return self._dinv - self._dinv**2 * out
        eps = float(self.damping)
        return (1.0 - out) / eps

    def _apply_inverse(self, V: Tensor) -> Tensor:
        e = self.engine
        if self._dinv is not None:  # (O6): D^-1 v - D^-1 B^T (I + K_D)^-1 B D^-1 v
            DV = self._dinv[:, None] * V
            Z = torch.cholesky_solve(e.B(DV), self._chol)  # type: ignore[arg-type]
            return DV - self._dinv[:, None] * e.Bt(Z)
        eps = float(self.damping)
        BV = e.B(V)
        if self._chol is not None:  # (O1)
            Z = torch.cholesky_solve(BV, self._chol)
            return (V - e.Bt(Z)) / eps
        mu, U = e.eigh()
        M = mu.shape[0]
        mu, U = mu[M - self._keep :], U[:, M - self._keep :]
        W = U.T @ BV
        if eps != 0.0:
            return (V - e.Bt(U @ (W / (mu + eps)[:, None]))) / eps
        # eps = 0 with C non-singular (M >= P, full rank): C^-1 = B^T U mu^-2 U^T B (O3)
        return e.Bt(U @ (W / (mu * mu)[:, None]))


# ----------------------------------------------------------------------------- its cost
def gram_sizes(problem: Problem) -> tuple[int, int, int, int]:
    """``(N, m, linear work, other parameters)``: samples, outputs a sample, the flops of
    the layer-wise kernels and the number of parameters outside ``nn.Linear`` layers
    (one forward pass, computed once within `Problem._sharing`)."""
    return problem._memo("gram_sizes", lambda: _gram_sizes(problem))


def _gram_sizes(problem: Problem) -> tuple[int, int, int, int]:
    inputs, _t, _w = next(iter(problem.batches()))
    with torch.no_grad():
        o = problem.outputs(problem.params, inputs)
    if not isinstance(o, Tensor):
        raise GramNotApplicableError("the model's output is not one tensor")
    if o.ndim == 0:
        raise GramNotApplicableError(
            "the model's output is 0-dimensional (no sample dimension to take the kernel over)"
        )
    N, m = problem.num_samples, int(o[0].numel())
    M = N * m
    covered, work = 0, 0
    for name, mod in linear_modules(problem).items():
        head = f"{name}." if name else ""
        for suffix in ("weight", "bias"):
            sl = problem.slices.get(f"{head}{suffix}")
            if sl is not None:
                covered += sl.stop - sl.start
        work += 2 * (N * N * mod.in_features + M * M * mod.out_features)
    return N, m, work, problem.num_params - covered


def gram_outputs(problem: Problem) -> int:
    """``M``: samples times outputs a sample (0 when the output is not one tensor)."""
    try:
        N, m, _w, _r = gram_sizes(problem)
    except GramNotApplicableError:
        return 0
    return N * m


def _applicable_sizes(
    problem: Problem, curvature: str, check_samples: bool
) -> tuple[int, int, int, int]:
    """`gram_sizes`, or `GramNotApplicableError` / `NotImplementedError` saying why the
    engine does not apply (sample independence decided exactly, as the engine does)."""
    if curvature != "ggn":
        raise GramNotApplicableError("the observation-space engine factors the GGN only")
    losses.fisher_loss(problem.loss_fn)
    if check_samples:
        check_samples_independent(problem)
    return gram_sizes(problem)


def gram_memory(problem: Problem, N: int, m: int, rest: int) -> float:
    """The kernel (three ``M x M`` arrays and the factorisation's workspace: 3.4
    measured, tests/test_memory.py) or, before it, the forward graph of all the data with
    ``m`` cotangents through it; the Jacobian rows outside Linear layers."""
    M = N * m
    item = torch.empty((), dtype=problem.dtype).element_size()
    acts = curvature_operator(problem, "hessian").activation_numel() * len(problem.batch_sizes)
    return item * (max(3.4 * M * M, (m + 3) * acts) + M * rest)


def gram_cost(problem: Problem, curvature: str, timing: Timing) -> tuple[EngineCost, None]:
    """The forward graph and ``m`` batched cotangents through it (vectorised: a fraction
    of ``m`` backward passes), Jacobian rows outside Linear layers one backward each, the
    kernel, its Cholesky factor, and the refinement's product."""
    problem = problem_of(problem)
    try:
        N, m, work, rest = _applicable_sizes(problem, curvature, True)
    except (GramNotApplicableError, NotImplementedError) as err:
        return EngineCost("gram", False, reason=str(err).split(";")[0]), None
    M, P = N * m, problem.num_params
    R = N * factor_rows(problem.loss_fn, m)  # the kernel's rows (O4)
    kernel_flops = work + 2 * M * M * rest + 2 * M * m * m * N
    flops = kernel_flops + R**3 / 3
    grad = timing.gradient
    seconds = (3 + 0.3 * m) * grad + M * grad * (rest > 0)
    seconds += kernel_flops / timing.gemm + (R**3 / 3) / timing.factor_rate("chol", R)
    # each Linear layer's fixed cost and its element-wise passes over M x M (its D D^T
    # scaled and added: about four, memory-bound where the layer is narrow)
    item = torch.empty((), dtype=problem.dtype).element_size()
    layers = len(linear_modules(problem))
    seconds += layers * (LAYER_SECONDS + 4 * M * M * item / timing.stream)
    if R >= P:  # no smaller than the dense problem: never preferred
        seconds += P**3 / timing.factor_rate("chol", P)
    memory = gram_memory(problem, N, m, rest)
    return EngineCost("gram", True, flops, memory, seconds), None


def build_gram(
    problem: Problem, curvature: str, budget: float, built: None, progress: bool | None
) -> GramEngine:
    problem = problem_of(problem)
    try:  # the memory estimate only: the engine tests sample independence itself
        N, m, _work, rest = _applicable_sizes(problem, curvature, False)
    except (GramNotApplicableError, NotImplementedError):
        pass  # GramEngine says why
    else:
        check_memory(
            gram_memory(problem, N, m, rest),
            f"the observation-space kernel (M = {N * m} samples x outputs)",
            "use fewer samples (a curvature batch), method='dense' or 'chain'",
            budget=budget,
        )
    return GramEngine(problem, curvature)


GRAM = EngineSpec(
    "gram",
    gram_cost,
    build_gram,
    "the GGN by Woodbury in observation space: O(M^3 + M P) for M samples x outputs",
)
