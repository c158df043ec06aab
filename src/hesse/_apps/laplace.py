"""The Laplace approximation with exact curvature (laplace-torch's conventions and names).

Around a trained model ``theta`` (the MAP), the posterior is ``N(theta, Sigma)`` with the
posterior precision

    P = s C + P0,    s = factor / (sigma^2 T)                                      (A1)

``C`` the GGN (or the Hessian) of the *summed* loss over all ``N`` training points
(cross-entropy for ``"classification"``, ``factor = 1``; squared error for
``"regression"``, ``factor = 1/2``), ``P0`` the diagonal prior precision (a number, one
per parameter tensor, or one per parameter), ``sigma`` the observation noise and ``T``
the temperature. The log marginal likelihood (evidence) is laplace-torch's

    log Z = log p(D | theta) - 1/2 (log det P - log det P0 + (theta - mu0)^T P0 (theta - mu0))
    log p(D | theta) = -loss / (sigma^2 T) [- N m log(sigma sqrt(2 pi)), regression] (A2)

(``loss`` the summed loss times ``factor``). ``log det P = P log s + log det(C + P0 / s)``
comes from one exact factorisation of ``C + D``, ``D = P0 / s`` (any engine: damping per
parameter). For a scalar prior ``delta`` and an engine that holds the spectrum of ``C``
(the observation-space kernel's eigendecomposition, the dense matrix's), ``log det(s C
+ delta I) = sum_i log(s lambda_i + delta)`` for every ``delta`` at once, and

    d log Z / d log delta = -1/2 (delta tr P^-1 - P + delta |theta - mu0|^2)           (A3)
    d log Z / d log sigma = 2 loss / (sigma^2 T) - N m + P - tr(P^-1 P0)  (regression)

with ``tr P^-1 = sum_i 1 / (s lambda_i + delta)``; for a prior per tensor, ``d / d log
delta_t`` takes the trace of ``P^-1`` over tensor ``t``'s block (exact, from the
inverse's diagonal). The linearised (GLM) predictive of a test input ``x`` is
``N(f(x), J(x) P^-1 J(x)^T)`` (exact solves; the posterior covariance is never formed),
with the probit approximation ``softmax(f / sqrt(1 + pi/8 diag(var)))`` for
classification. Design note: docs/design/chain-curvature.md, "The Laplace approximation".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from hesse._autodiff import products
from hesse._autodiff.problem import Problem, map_tensors
from hesse._factor.base import Factorization, shift
from hesse._linalg.dense import DenseEngine
from hesse._linalg.factorize import engine as make_engine
from hesse._linalg.gram import GramEngine, output_factor
from hesse._operators.curvature import curvature_operator
from hesse._util.checks import check_curvature, check_positive

__all__ = ["Laplace", "NotPositiveDefiniteError"]

_LIKELIHOODS = ("classification", "regression")


class NotPositiveDefiniteError(ValueError):
    """The posterior precision ``s C + P0`` is not positive definite (an indefinite
    Hessian at a point that is not a minimum); the message gives the number of negative
    eigenvalues and the smallest scalar prior precision that would make it so."""


class _HalfSumMSE(nn.MSELoss):
    """laplace-torch's regression loss: ``1/2 sum (f - y)^2`` (as an ``MSELoss`` with
    ``reduction="sum"``, times ``factor = 1/2`` where it is used)."""


class Laplace:
    """The Laplace approximation of a trained model's posterior, with exact curvature.

    Args:
        model: the trained model (its parameters are the MAP ``theta``); in eval mode
            (train-mode Dropout or BatchNorm is refused: the curvature would be random
            or batch-coupled).
        likelihood: ``"classification"`` (cross-entropy over class labels, outputs
            ``(n, C)``) or ``"regression"`` (a Gaussian, outputs shaped like the targets).
        data: the training data in any of `Problem`'s forms (an ``(X, y)`` pair, a list of
            batches, a ``DataLoader``); the loss is the sum over all of it.
        params: the parameters to treat as random (names or tensors; default all).
        prior_precision: ``P0``: a number, a dict ``{name: value}`` or sequence of
            per-tensor values (laplace-torch's "layerwise"), or a ``(P,)`` tensor.
        prior_mean: ``mu0``, a number or a ``(P,)`` tensor.
        sigma_noise: the Gaussian's standard deviation (regression only; must be 1 for
            classification).
        temperature: ``T`` (``s = factor / (sigma^2 T)``).
        curvature: ``"ggn"`` (default, laplace-torch's) or ``"hessian"`` (its inertia
            must show a positive definite posterior precision, else
            `NotPositiveDefiniteError`).
        method: the exact engine (`hesse.factorize`): ``"auto"``, ``"dense"``,
            ``"gram"`` or ``"chain"``; refused up front with the plan when none fits.
        max_memory: the memory budget (bytes or ``"4GB"``; default 80% of what is
            available): the engine's estimate is checked against it before any work
            (`MemoryBudgetError` with the estimate and the ways out).

    Attributes:
        problem: the `Problem` of the summed loss.
        engine: the exact engine of ``C`` (`hesse.engine`), prepared once here.
        mean: ``theta`` ``(P,)``.
        n_data, n_outputs, n_params: ``N``, the outputs a sample, ``P``.
        loss: the summed loss times ``factor`` at ``theta`` (laplace-torch's ``loss``).

    Example:
        >>> la = hesse.Laplace(model, "classification", (X, y), prior_precision=1.0)
        >>> la.log_marginal_likelihood()
        >>> la.optimize_prior_precision()
        >>> probs = la.predictive(X_test)
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: str,
        data: Any,
        *,
        params: Sequence[str | Tensor] | None = None,
        prior_precision: Any = 1.0,
        prior_mean: float | Tensor = 0.0,
        sigma_noise: float = 1.0,
        temperature: float = 1.0,
        curvature: str = "ggn",
        method: str = "auto",
        max_memory: float | str | None = None,
    ) -> None:
        if likelihood not in _LIKELIHOODS:
            raise ValueError(
                f"likelihood must be 'classification' or 'regression'; got {likelihood!r}"
            )
        check_curvature(curvature)
        self.likelihood, self.curvature, self.method = likelihood, curvature, method
        self.temperature = check_positive("temperature", temperature)
        self._sigma = check_positive("sigma_noise", sigma_noise)
        if likelihood == "classification" and self._sigma != 1.0:
            raise ValueError("sigma_noise is for regression; classification takes 1.0")
        self._refuse_train_mode(model)
        if likelihood == "classification":
            loss_fn: nn.Module = nn.CrossEntropyLoss(reduction="sum")
            self.factor = 1.0
        else:
            loss_fn = _HalfSumMSE(reduction="sum")
            self.factor = 0.5
        self.problem = Problem(model, loss_fn, data, params=params)
        self._check_outputs()
        self.n_data = self.problem.num_samples
        self.n_params = self.problem.num_params
        self.mean = self.problem.param_vector()
        self.loss = self.factor * float(self.problem.loss())
        self.prior_precision = prior_precision
        self.prior_mean = prior_mean
        self._spectrum: Tensor | None = None
        self._scalar_priors: set[float] = set()  # distinct scalar priors evaluated so far
        self._factor_cache: tuple[Any, Factorization] | None = None
        # the fit: C prepared once (refused up front, with the plan, when no engine fits)
        self.engine: Any = make_engine(
            self.problem, self.curvature, method=self.method, max_memory=max_memory
        )

    # ------------------------------------------------------------------ set-up
    @staticmethod
    def _refuse_train_mode(model: nn.Module) -> None:
        for name, m in model.named_modules():
            if m.training and (
                (isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0)
                or isinstance(m, nn.modules.batchnorm._BatchNorm)
            ):
                raise ValueError(
                    f"module {name!r} ({type(m).__name__}) is in training mode: the Laplace "
                    "approximation needs the deterministic model; call model.eval()"
                )

    def _check_outputs(self) -> None:
        first = next(iter(self.problem.batches()), None)
        if first is None:  # a rank without samples (torch.distributed): the others check
            group = self.problem.group
            self.n_outputs = int(group.max(0.0, "outputs a sample")) if group else 0
            return
        inputs, targets, _w = first
        with torch.no_grad():
            o = self.problem.outputs(self.problem.params, inputs)
        if not isinstance(o, Tensor):
            raise ValueError(f"the model's output must be one tensor; got {type(o).__name__}")
        self.n_outputs = int(o[0].numel()) if o.ndim else 1
        if self.problem.group is not None:  # the same on every rank (an empty one too)
            self.n_outputs = int(self.problem.group.max(self.n_outputs, "outputs a sample"))
        if self.likelihood == "classification":
            if o.ndim != 2 or not isinstance(targets, Tensor) or targets.is_floating_point():
                raise ValueError(
                    "likelihood='classification' needs outputs (n, C) and integer class "
                    f"labels (n,); got outputs {tuple(o.shape)} and targets "
                    f"{getattr(targets, 'dtype', type(targets).__name__)}"
                )
        elif not isinstance(targets, Tensor) or not targets.is_floating_point():
            raise ValueError(
                "likelihood='regression' needs floating-point targets shaped like the "
                f"outputs {tuple(o.shape)}"
            )

    # ------------------------------------------------------------------ hyperparameters
    @property
    def prior_precision(self) -> Any:
        """``P0`` as given (a number, per-tensor values or a ``(P,)`` tensor)."""
        return self._prior

    @prior_precision.setter
    def prior_precision(self, value: Any) -> None:
        d = self.problem.parameters.as_diagonal(value, "prior_precision")
        if not isinstance(d, Tensor) and not d > 0:
            raise ValueError(f"prior_precision must be positive; got {value!r}")
        self._prior, self._prior_d = value, d

    @property
    def prior_precision_diag(self) -> Tensor:
        """``P0``'s diagonal ``(P,)``."""
        d = self._prior_d
        if isinstance(d, Tensor):
            return d.to(self.mean)
        return torch.full_like(self.mean, d)

    @property
    def prior_mean(self) -> Tensor:
        return self._mu0

    @prior_mean.setter
    def prior_mean(self, value: float | Tensor) -> None:
        t = torch.as_tensor(value, dtype=self.mean.dtype).to(self.mean.device)
        if t.ndim == 0:
            t = t.expand(self.n_params)
        if t.shape != (self.n_params,) or not bool(torch.isfinite(t).all()):
            raise ValueError(f"prior_mean must be a finite number or a ({self.n_params},) tensor")
        self._mu0 = t

    @property
    def sigma_noise(self) -> float:
        return self._sigma

    @sigma_noise.setter
    def sigma_noise(self, value: float) -> None:
        if self.likelihood != "regression":
            raise ValueError("sigma_noise can be changed for regression only")
        self._sigma = check_positive("sigma_noise", value)
        self._factor_cache = None

    @property
    def scale(self) -> float:
        """``s = factor / (sigma^2 T)`` of (A1)."""
        return self.factor / (self._sigma**2 * self.temperature)

    # ------------------------------------------------------------------ the engine
    def _spectrum_of_C(self) -> Tensor | None:
        """All ``P`` eigenvalues of ``C`` when the engine holds them cheaply (the
        observation-space kernel's, the dense matrix's), else ``None``."""
        if self._spectrum is None:
            eng = self.engine
            if isinstance(eng, GramEngine):
                mu = eng.eigvalsh().double()
                M, P = len(mu), self.n_params
                mu = mu[max(M - P, 0) :].clamp_min(0.0)  # PSD: rounding below 0 is 0
                self._spectrum = torch.cat([mu, mu.new_zeros(max(P - M, 0))])
            elif isinstance(eng, DenseEngine):
                self._spectrum = torch.linalg.eigvalsh(eng.matrix).double()
        return self._spectrum

    def _same_key(self, key: tuple[Any, float]) -> bool:
        if self._factor_cache is None:
            return False
        (d0, s0), (d1, s1) = self._factor_cache[0], key
        if s0 != s1 or isinstance(d0, Tensor) != isinstance(d1, Tensor):
            return False
        return bool(torch.equal(d0, d1)) if isinstance(d0, Tensor) else d0 == d1

    def _factorization(self) -> Factorization:
        """``C + P0 / s`` factored (kept while the prior and ``s`` do not change)."""
        d = self._prior_d
        key = (d.clone() if isinstance(d, Tensor) else float(d), self.scale)
        if not self._same_key(key):
            d = self._prior_d
            damping = d / self.scale if isinstance(d, Tensor) else float(d) / self.scale
            # the GGN's C + D is positive definite by construction: no pivot is a zero
            # (a tolerance relative to the largest prior would call tiny ones zero)
            f = self.engine.factor(damping, 0.0 if self.curvature == "ggn" else None)
            self._check_definite(f)
            self._factor_cache = (key, f)
        return self._factor_cache[1]

    def _check_definite(self, f: Factorization) -> None:
        neg, zero, _pos = f.inertia()
        if neg or zero:
            lam_min = self._smallest_eigenvalue()
            raise NotPositiveDefiniteError(
                f"the posterior precision s C + P0 (C the {self.curvature}) is not positive "
                f"definite: {neg} negative and {zero} zero eigenvalues (exact inertia). "
                f"A scalar prior precision above {max(-self.scale * lam_min, 0.0):.6g} "
                "makes it so (from C's smallest eigenvalue), or use curvature='ggn'"
            )

    def _smallest_eigenvalue(self) -> float:
        spec = self._spectrum_of_C()
        if spec is not None:
            return float(spec.min())
        from hesse._linalg.eigen import eigenvalue

        return eigenvalue(self.problem, 1, self.curvature, method=self.method)

    # ------------------------------------------------------------------ the evidence
    def log_likelihood(self) -> float:
        """``log p(D | theta)`` of (A2)."""
        ll = -self.loss / (self._sigma**2 * self.temperature)
        if self.likelihood == "regression":
            ll -= self.n_data * self.n_outputs * math.log(self._sigma * math.sqrt(2 * math.pi))
        return ll

    def scatter(self) -> float:
        """``(theta - mu0)^T P0 (theta - mu0)``."""
        delta = self.mean - self._mu0
        return float((delta * self.prior_precision_diag) @ delta)

    def log_det_posterior_precision(self) -> float:
        """``log det P`` (exact; `NotPositiveDefiniteError` if ``P`` is not positive
        definite)."""
        d = self._prior_d
        # the spectrum once it is known (a grid, an optimisation, or a third scalar prior
        # asked for one at a time: a user's own loop); one value alone costs less by a
        # Cholesky factorisation (P^3 / 3 against an eigendecomposition's ~4x that)
        if not isinstance(d, Tensor) and self.curvature == "ggn" and self._spectrum is None:
            self._scalar_priors.add(float(d))
            if len(self._scalar_priors) >= 3:
                self._spectrum_of_C()
        spec = self._spectrum if not isinstance(d, Tensor) else None
        if spec is not None and self.curvature == "ggn":
            return float(torch.log(self.scale * spec + float(d)).sum())
        _sign, logabs = self._factorization().logdet()
        return logabs + self.n_params * math.log(self.scale)

    def log_det_prior_precision(self) -> float:
        """``log det P0``."""
        return float(self.prior_precision_diag.double().log().sum())

    def log_det_ratio(self) -> float:
        """``log det P - log det P0``."""
        return self.log_det_posterior_precision() - self.log_det_prior_precision()

    def log_marginal_likelihood(
        self, prior_precision: Any = None, sigma_noise: float | None = None
    ) -> float:
        """The Laplace evidence (A2), exact; ``prior_precision`` / ``sigma_noise``, when
        given, replace the current values first (as laplace-torch does)."""
        if prior_precision is not None:
            self.prior_precision = prior_precision
        if sigma_noise is not None:
            self.sigma_noise = sigma_noise
        return self.log_likelihood() - 0.5 * (self.log_det_ratio() + self.scatter())

    def log_marginal_likelihood_gradient(self) -> dict[str, Any]:
        """The exact gradient of the evidence (A3): ``"log_prior_precision"`` (a float
        for a scalar prior, else a ``{name: float}`` per tensor or a ``(P,)`` tensor,
        matching the prior's form) and, for regression, ``"log_sigma_noise"``."""
        d = self._prior_d
        delta = self.mean - self._mu0
        P = self.n_params
        prior = self._prior
        scalar_form = not isinstance(prior, (dict, list, tuple, Tensor)) or (
            isinstance(prior, Tensor) and prior.ndim == 0
        )
        spec = self._spectrum_of_C() if scalar_form else None
        out: dict[str, Any] = {}
        if spec is not None and self.curvature == "ggn":
            eig_post = self.scale * spec + float(d)  # the posterior precision's eigenvalues
            tr_inv = float((1.0 / eig_post).sum())
            out["log_prior_precision"] = -0.5 * (
                float(d) * tr_inv - P + float(d) * float(delta @ delta)
            )
            tr_prior = float(d) * tr_inv
        else:
            p0 = self.prior_precision_diag
            slices = self.problem.slices
            per_tensor = isinstance(prior, (dict, list, tuple))
            traces = None  # tr(P0 P^-1) per tensor without P's whole diagonal (O7)
            fast = getattr(self._factorization(), "inverse_traces", None)
            if per_tensor and fast is not None:
                masks = []
                for sl in slices.values():
                    u = torch.zeros_like(p0)
                    u[sl] = p0[sl]
                    masks.append(u)
                traces = fast(masks)
            if traces is not None:
                tr = {n: t / self.scale for n, t in zip(slices, traces, strict=True)}
                sums = {
                    n: -0.5 * (tr[n] - (sl.stop - sl.start) + float((p0 * delta * delta)[sl].sum()))
                    for n, sl in slices.items()
                }
                tr_prior = sum(tr.values())
            else:
                diag_inv = self.posterior_variance()  # diag P^-1, exact
                per = -0.5 * (p0 * diag_inv - 1.0 + p0 * delta * delta)  # per parameter
                tr_prior = float((p0 * diag_inv).sum())
                sums = {n: float(per[sl].sum()) for n, sl in slices.items()}
            if scalar_form:
                out["log_prior_precision"] = sum(sums.values())
            elif per_tensor:
                out["log_prior_precision"] = (
                    sums if isinstance(prior, dict) else [sums[n] for n in self.problem.names]
                )
            else:
                out["log_prior_precision"] = per
        if self.likelihood == "regression":
            out["log_sigma_noise"] = (
                2.0 * self.loss / (self._sigma**2 * self.temperature)
                - self.n_data * self.n_outputs
                + P
                - tr_prior
            )
        return out

    def optimize_prior_precision(
        self,
        method: str = "marglik",
        prior_structure: str = "scalar",
        *,
        grid: Sequence[float] | Tensor | None = None,
        n_steps: int = 100,
    ) -> Any:
        """Set the prior precision that maximises the evidence and return it.

        Args:
            method: ``"marglik"`` (L-BFGS on ``log P0`` with the exact gradient (A3),
                bounded to ``[1e-8, 1e8]``; a layerwise prior on the dense engine takes
                Newton's method with the exact Hessian (A4) instead, about 5
                evaluations) or ``"gridsearch"`` (the best of ``grid``,
                default 21 values ``logspace(-4, 4)``: one eigendecomposition answers
                every scalar value when the engine holds the spectrum).
            prior_structure: ``"scalar"`` or ``"layerwise"`` (one value per parameter
                tensor, ``marglik`` only).
            n_steps: the optimiser's iterations at most (L-BFGS's or Newton's).
        """
        if prior_structure not in ("scalar", "layerwise"):
            raise ValueError(
                f"prior_structure must be 'scalar' or 'layerwise'; got {prior_structure!r}"
            )
        if prior_structure == "scalar":
            self._spectrum_of_C()  # every value of a grid or a line search at once
        if method == "gridsearch":
            if prior_structure != "scalar":
                raise ValueError("gridsearch takes a scalar prior; use method='marglik'")
            values = torch.logspace(-4, 4, 21) if grid is None else torch.as_tensor(grid)
            values = values.double().reshape(-1)
            if len(values) == 0 or not bool((values > 0).all() & torch.isfinite(values).all()):
                raise ValueError("grid must hold positive finite prior precisions")
            scores = [self.log_marginal_likelihood(float(v)) for v in values]
            best = float(values[int(torch.tensor(scores).argmax())])
            self.prior_precision = best
            return best
        if method != "marglik":
            raise ValueError(f"method must be 'marglik' or 'gridsearch'; got {method!r}")
        import numpy as np
        from scipy.optimize import minimize

        names = self.problem.names
        k = 1 if prior_structure == "scalar" else len(names)
        start = self.prior_precision_diag
        x0 = np.log(
            [float(start.mean())]
            if k == 1
            else [float(start[self.problem.slices[n]].mean()) for n in names]
        )

        if k > 1:
            newton = self._newton_layerwise(x0, n_steps)  # (A4) where the engine gives it
            if newton is not None:
                best_list = [float(v) for v in np.exp(newton)]
                self.prior_precision = best_list
                return best_list

        def objective(x: Any) -> tuple[float, Any]:
            value = float(np.exp(x[0])) if k == 1 else list(np.exp(x))
            try:
                ev = self.log_marginal_likelihood(value)
            except NotPositiveDefiniteError:
                return 1e300, np.zeros_like(x)
            g = self.log_marginal_likelihood_gradient()["log_prior_precision"]
            gv = np.array([g] if k == 1 else list(g), dtype=float)
            return -ev, -gv

        res = minimize(
            objective,
            x0,
            jac=True,
            method="L-BFGS-B",
            bounds=[(math.log(1e-8), math.log(1e8))] * k,
            options={"maxiter": n_steps},
        )
        best = float(np.exp(res.x[0])) if k == 1 else [float(v) for v in np.exp(res.x)]
        self.prior_precision = best
        return best

    def _layerwise_derivatives(self) -> tuple[Any, Any] | None:
        """The gradient (A3) and Hessian (A4) of the evidence in the per-tensor log prior
        precisions at the current prior, ``(k,)`` and ``(k, k)`` numpy arrays, from one
        inverse of the dense factorisation; ``None`` where the engine's factorisation does
        not give second-order traces (the observation-space and chain engines, an
        indefinite ``C + D``)."""
        import numpy as np

        traces = getattr(self._factorization(), "inverse_trace_products", None)
        if traces is None:
            return None
        p0 = self.prior_precision_diag
        slices = list(self.problem.slices.values())
        U = torch.zeros(self.n_params, len(slices), dtype=p0.dtype, device=p0.device)
        for j, sl in enumerate(slices):
            U[sl, j] = p0[sl]
        res = traces(U)
        if res is None:
            return None
        t, T = (r.double().cpu().numpy() for r in res)
        s = self.scale
        delta = (self.mean - self._mu0).to(p0)
        q = (U.T @ (delta * delta)).double().cpu().numpy()  # P0-weighted scatter per tensor
        n = [sl.stop - sl.start for sl in slices]
        g = -0.5 * (t / s - n + q)
        H = -0.5 * (np.diag(t / s + q) - T / s**2)
        return g, H

    def _newton_layerwise(self, x0: Any, n_steps: int) -> Any | None:
        """Newton's method on the per-tensor log prior precisions with the exact Hessian
        (A4), a backtracking line search on the exact evidence and the bounds ``[1e-8,
        1e8]`` of the L-BFGS route; ``None`` (the caller runs L-BFGS) where the Hessian is
        not available."""
        import numpy as np

        lo, hi = math.log(1e-8), math.log(1e8)

        def value(x: Any) -> float:
            try:
                return self.log_marginal_likelihood(list(np.exp(x)))
            except NotPositiveDefiniteError:
                return -math.inf

        x = np.clip(np.asarray(x0, dtype=float), lo, hi)
        E = value(x)
        if not math.isfinite(E):
            return None
        for step in range(n_steps):
            d = self._layerwise_derivatives()
            if d is None:
                return None if step == 0 else x
            g, H = d
            # a bound the ascent pushes against holds its variable
            held = ((x <= lo) & (g < 0)) | ((x >= hi) & (g > 0))
            free = ~held
            if not free.any():
                break
            w, V = np.linalg.eigh(-H[np.ix_(free, free)])
            w = np.maximum(np.abs(w), 1e-12 * max(float(np.abs(w).max()), 1e-300))
            p = np.zeros_like(x)
            p[free] = V @ ((V.T @ g[free]) / w)  # ascent: |H|'s inverse on the gradient
            gain = float(g @ p)  # twice the predicted gain of the Newton model
            if gain <= 1e-12 * max(1.0, abs(E)):
                break
            big = float(np.abs(p).max())
            if big > 4.0:  # a factor e^4 in a prior at most per step
                p *= 4.0 / big
            alpha = 1.0
            while True:
                xn = np.clip(x + alpha * p, lo, hi)
                En = value(xn)
                if En >= E + 1e-4 * float(g @ (xn - x)):
                    break
                alpha *= 0.5
                if alpha < 1e-10:
                    value(x)  # the current prior back in place
                    return x
            if float(np.abs(xn - x).max()) <= 1e-12:
                break
            x, E = xn, En
        return x

    # ------------------------------------------------------------------ the posterior
    def solve(self, V: Tensor) -> Tensor:
        """``P^-1 V`` for ``V`` ``(P,)`` or ``(P, k)`` (exact, refined)."""
        X = self._factorization().solve(V)
        assert isinstance(X, Tensor)
        return X / self.scale

    def posterior_variance(self) -> Tensor:
        """The diagonal of ``Sigma = P^-1`` ``(P,)``, exact (``P`` solves in chunks, or
        the dense inverse's diagonal)."""
        f = self._factorization()
        # the engines that have a closed form (dense: a Cholesky inverse; observation
        # space: Woodbury), else P refined solves
        fast = getattr(f, "inverse_diagonal", None)
        diag = fast() if fast is not None else None
        if diag is None:
            diag = f.inverse().diagonal()
        return (diag / self.scale).to(self.mean)

    def posterior_precision_product(self, V: Tensor) -> Tensor:
        """``P V = s C V + P0 V`` (products; ``V`` ``(P,)`` or ``(P, k)``)."""
        W = V.unsqueeze(1) if V.ndim == 1 else V
        W = W.to(self.mean)
        CW = curvature_operator(self.problem, self.curvature).matmat(W)
        out = self.scale * CW + shift(self.prior_precision_diag, W)
        return out.squeeze(1) if V.ndim == 1 else out

    def log_prob(self, value: Tensor, normalized: bool = True) -> float:
        """``log N(value; theta, P^-1)`` (``normalized=False``: the quadratic term only)."""
        if value.shape != (self.n_params,):
            raise ValueError(f"value must have shape ({self.n_params},); got {tuple(value.shape)}")
        delta = value.to(self.mean) - self.mean
        quad = float(delta @ self.posterior_precision_product(delta))
        if not normalized:
            return -0.5 * quad
        return (
            -0.5 * self.n_params * math.log(2 * math.pi)
            + 0.5 * self.log_det_posterior_precision()
            - 0.5 * quad
        )

    def sample(self, n_samples: int = 100, generator: torch.Generator | None = None) -> Tensor:
        """Exact posterior samples ``(n_samples, P)``, perturb-then-solve: with ``P = s
        B^T B + P0`` (the GGN, ``B = Lambda^{1/2} J``), ``v = sqrt(s) B^T z1 + P0^{1/2}
        z2`` has covariance ``P``, so ``theta + P^-1 v ~ N(theta, P^-1)``; one batched
        solve. The Hessian's posterior: through its dense factor."""
        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
            raise ValueError(f"n_samples must be an integer >= 1; got {n_samples!r}")
        gen = generator
        P = self.n_params
        dev, dt = self.mean.device, self.mean.dtype
        if self.curvature == "ggn":
            V = math.sqrt(self.scale) * self._bt_noise(n_samples, gen)
            z2 = torch.randn(P, n_samples, generator=gen, dtype=torch.float64).to(dev, dt)
            z2 = self.problem.shared_random(z2)  # every rank the same samples
            V = V + self.prior_precision_diag.sqrt()[:, None] * z2
            X = self.solve(V)
        else:
            f = self._factorization()
            A = f.inverse().to_dense() / self.scale
            L = torch.linalg.cholesky(0.5 * (A + A.T))
            z = torch.randn(P, n_samples, generator=gen, dtype=torch.float64).to(dev, dt)
            X = L @ z
        return (self.mean[:, None] + X).T

    def _bt_noise(self, k: int, gen: torch.Generator | None) -> Tensor:
        """``B^T Z`` for ``Z ~ N(0, I_M)``, ``k`` columns: ``J^T F^T z`` batch by batch."""
        prob = self.problem
        out = torch.zeros(prob.num_params, k, dtype=prob.dtype, device=prob.device)
        for inputs, targets, w in prob.batches():
            ps = [p.detach().requires_grad_(True) for p in prob.params]
            o = prob.outputs(ps, inputs)
            F = output_factor(prob.loss_fn, o, targets, w)  # (n, r, m)
            z = torch.randn(k, *F.shape[:2], generator=gen, dtype=torch.float64).to(F)
            U = torch.einsum("nac,kna->knc", F, z).reshape(k, *o.shape)  # F^T z
            out += products.apply_batched(o, ps, U).T
        return prob.reduce(out, "posterior sample")  # each rank its samples' noise

    # ------------------------------------------------------------------ the predictive
    def functional_variance(self, X: Any, joint: bool = False) -> tuple[Tensor, Tensor]:
        """``(f(x), J P^-1 J^T)`` on test inputs ``X`` (any form the model's ``forward``
        accepts): ``(n, m)`` and ``(n, m, m)``, or with ``joint=True`` ``(n m,)`` and
        the joint ``(n m, n m)``."""
        prob = self.problem
        ps = [p.detach().requires_grad_(True) for p in prob.params]
        X = map_tensors(X, lambda t: t.to(prob.device))
        train_x = next(iter(prob.batches()))[0]
        if (
            isinstance(X, Tensor)
            and isinstance(train_x, Tensor)
            and (X.ndim != train_x.ndim or X.shape[1:] != train_x.shape[1:])
        ):
            raise ValueError(
                f"test inputs have shape {tuple(X.shape)}; the training inputs are "
                f"(n, {', '.join(map(str, train_x.shape[1:]))})"
            )
        o = prob.outputs(ps, X)
        if not isinstance(o, Tensor) or o.ndim < 1:
            raise ValueError("the model's output on X must be one tensor (n, ...)")
        n = o.shape[0]
        m = o[0].numel()
        if m != self.n_outputs:
            raise ValueError(
                f"test outputs have {m} entries a sample; the training outputs {self.n_outputs}"
            )
        flat = o.reshape(-1)
        eye = torch.eye(flat.numel(), dtype=o.dtype, device=o.device)
        Js = products.apply_batched(flat, ps, eye)  # (n m, P)
        S = self.solve(Js.T)  # (P, n m)
        cov = Js @ S
        cov = 0.5 * (cov + cov.T)
        f = o.detach().reshape(n, m)
        if joint:
            return f.reshape(-1), cov
        blocks = cov.view(n, m, n, m).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
        return f, blocks.contiguous()

    def predictive(self, X: Any, joint: bool = False, link_approx: str = "probit") -> Any:
        """The linearised (GLM) predictive: for classification the class probabilities
        ``(n, C)`` by the probit approximation; for regression ``(f_mu, f_var)`` as
        `functional_variance` returns them (the observation noise ``sigma^2`` is not
        added, as in laplace-torch)."""
        f, var = self.functional_variance(X, joint=joint)
        if self.likelihood == "regression":
            return f, var
        if joint:
            raise ValueError("joint=True is for regression (the joint Gaussian of outputs)")
        if link_approx != "probit":
            raise ValueError(f"link_approx must be 'probit'; got {link_approx!r}")
        kappa = 1.0 / torch.sqrt(1.0 + math.pi / 8.0 * var.diagonal(dim1=1, dim2=2))
        return torch.softmax(kappa * f, dim=-1)

    __call__ = predictive

    def __repr__(self) -> str:
        return (
            f"Laplace({self.likelihood}, P={self.n_params}, N={self.n_data}, "
            f"curvature={self.curvature!r}, prior_precision={self._prior!r})"
        )
