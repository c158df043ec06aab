"""One exact factorisation of ``C + eps I``, three engines, chosen by cost.

- ``"dense"`` (`hesse._linalg.dense`): ``C`` formed in column chunks, factored by
  Cholesky / Bunch-Kaufman / eigen tiers: ``O(P^3)``, ``O(P^2)`` memory.
- ``"gram"`` (`hesse._linalg.gram`, GGN only): Woodbury in observation space,
  ``O(M^3 + M P)`` for ``M`` samples times outputs.
- ``"chain"`` (`hesse._chain.factorization`): the stable Riccati sweep, linear in depth,
  for ``nn.Sequential`` models.

`plan` predicts, before any heavy work, each applicable engine's flops, peak memory and
time on this machine (from a one-off calibration of matrix-product and factorisation
speed and one timed product of the problem), and which one ``"auto"`` picks: the fastest
that fits the memory budget. `engine` builds the chosen engine once (the dense matrix,
the kernel or the chain's linearisation), and `Engine.factor` factors ``C + eps I`` for
any number of dampings; `factorize` does both for one damping.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from hesse._autodiff import products
from hesse._autodiff.bishop import bishop_route
from hesse._autodiff.distributed import digest as _digest
from hesse._autodiff.problem import Problem
from hesse._chain.chain import Chain
from hesse._chain.factorization import ChainFactorization, as_chain, promoted
from hesse._factor.base import Engine, Factorization
from hesse._linalg.dense import DenseEngine
from hesse._linalg.gram import (
    GramEngine,
    GramNotApplicableError,
    check_samples_independent,
    linear_modules,
)
from hesse._operators.curvature import curvature_operator
from hesse._util import memory
from hesse._util.checks import check_budget, check_curvature, check_rank_rtol
from hesse._util.memory import MemoryBudgetError, check_memory, format_bytes

__all__ = [
    "METHODS",
    "ChainEngine",
    "Engine",
    "EngineCost",
    "Plan",
    "engine",
    "factorize",
    "plan",
]

METHODS = ("dense", "gram", "chain")


class ChainEngine(Engine):
    """The chain sweep as an engine: the chain and its linearisation (one forward and one
    backward pass: every stage's input and output adjoint) are kept, so each damping costs
    one sweep."""

    method = "chain"

    def __init__(self, chain: Chain, curvature: str, progress: bool | None = None) -> None:
        self.chain, self.problem, self.curvature, self.progress = (
            chain,
            chain.problem,
            curvature,
            progress,
        )
        self._linearisation: tuple[list[Tensor], list[Tensor]] | None = None

    def _factor(self, damping: float | Tensor, rank_rtol: float | None) -> ChainFactorization:
        if self._linearisation is None:
            self._linearisation = self.chain.forward_backward()
        return ChainFactorization(
            self.chain,
            damping,
            self.curvature,
            self.progress,
            rank_rtol,
            linearisation=self._linearisation,
        )


# ----------------------------------------------------------------------------- calibration
@functools.cache
def _rates(device: str, dtype: torch.dtype) -> tuple[float, float]:
    """Flops per second of a matrix product and of a Cholesky factorisation on this
    device and dtype, measured once a process (best of three, ``n = 384``)."""
    n = 384
    g = torch.Generator().manual_seed(0)
    A = torch.randn(n, n, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    S = A @ A.T + n * torch.eye(n, dtype=dtype, device=device)

    def best(fn: Any) -> float:
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            ts.append(time.perf_counter() - t0)
        return max(min(ts), 1e-9)

    gemm = 2 * n**3 / best(lambda: A @ A)
    chol = (n**3 / 3) / best(lambda: torch.linalg.cholesky(S))
    return gemm, chol


def _product_seconds(problem: Problem, curvature: str) -> float:
    """Seconds per column of the curvature's product, measured on 8 columns at once
    (one warm-up): the unit of the dense engine's ``P`` products."""
    op = curvature_operator(problem, curvature)
    V = torch.zeros(problem.num_params, 8, dtype=problem.dtype, device=problem.device)
    V[0] = 1.0
    op.matmat(V[:, :1])
    t0 = time.perf_counter()
    op.matmat(V)
    return (time.perf_counter() - t0) / 8


def _gradient_seconds(problem: Problem) -> float:
    """Seconds of one gradient of the problem (the second of two: the first pays the
    kernels' start-up)."""
    products.gradient(problem)
    t0 = time.perf_counter()
    products.gradient(problem)
    return time.perf_counter() - t0


_STAGE_SECONDS = 2.5e-3
"""The chain sweep's fixed cost a stage (measured on a 2-core CPU: many small kernels)."""


# ----------------------------------------------------------------------------- the plan
@dataclass
class EngineCost:
    """One engine's predicted cost: ``flops``, peak ``memory`` (bytes) and ``seconds``;
    ``reason`` says why it does not apply (``applies`` is then ``False``)."""

    method: str
    applies: bool
    flops: float = math.nan
    memory: float = math.nan
    seconds: float = math.nan
    reason: str = ""


@dataclass
class Plan:
    """`plan`'s answer: each engine's `EngineCost`, the memory budget and ``choice`` (the
    fastest engine that applies and fits, ``None`` when none does). ``print(plan)``
    shows the table."""

    curvature: str
    num_params: int
    num_outputs: int
    budget: float
    costs: dict[str, EngineCost] = field(default_factory=dict)
    # what the plan built on the way (the chain's linearisation): `engine` hands it to
    # the engine it picks, so ``method="auto"`` builds it once
    built: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def feasible(self) -> list[str]:
        return [m for m, c in self.costs.items() if c.applies and c.memory <= self.budget]

    @property
    def choice(self) -> str | None:
        ok = self.feasible
        return min(ok, key=lambda m: self.costs[m].seconds) if ok else None

    def __str__(self) -> str:
        lines = [
            f"exact factorisation of {self.curvature} + eps I: P = {self.num_params}, "
            f"samples x outputs M = {self.num_outputs}, memory budget "
            f"{format_bytes(self.budget)}",
            f"  {'engine':<7}{'GFLOP':>10}{'memory':>12}{'predicted':>12}",
        ]
        for m, c in self.costs.items():
            if not c.applies:
                lines.append(f"  {m:<7}  does not apply: {c.reason}")
                continue
            mark = " <- auto" if m == self.choice else ""
            over = "  (over budget)" if c.memory > self.budget else ""
            lines.append(
                f"  {m:<7}{c.flops / 1e9:>10.3g}{format_bytes(c.memory):>12}"
                f"{c.seconds:>10.3g} s{mark}{over}"
            )
        return "\n".join(lines)


def _problem(obj: Problem | Chain) -> Problem:
    return obj.problem if isinstance(obj, Chain) else obj


def gram_outputs(problem: Problem) -> int:
    """``M``: samples times outputs a sample (0 when the output is not one tensor)."""
    try:
        N, m, _w, _r = _gram_sizes(problem)
    except GramNotApplicableError:
        return 0
    return N * m


def _activations(problem: Problem) -> int:
    """Numbers in the forward pass over all the data (the outputs of every module)."""
    return curvature_operator(problem, "hessian").activation_numel() * len(problem.batch_sizes)


def _dense_cost(
    problem: Problem, curvature: str, rates: tuple[float, float], col: float
) -> EngineCost:
    """``P`` products for ``C`` (Bishop's one pass for an MLP), then Cholesky
    (``P^3 / 3``; the GGN) or LU and Bunch-Kaufman (``P^3``; the Hessian). Peak memory:
    forming ``C`` (the matrix and the working memory) or factoring it."""
    P = problem.num_params
    item = torch.empty((), dtype=problem.dtype).element_size()
    factor_flops = (P**3 / 3) if curvature == "ggn" else P**3
    work = bishop_route(problem)  # DenseEngine's own rule (it is built without max_memory)
    if work is not None:
        # an MLP: C by Bishop's propagation (B1), as DenseEngine forms it: about
        # 2 n p_k p_m flops a sample and layer pair, N P^2 in all (measured on the
        # digits MLP: 0.9 s predicted 0.8 s)
        build = P * P * item + work
        form = problem.local_samples * P * P / rates[1]
    else:
        build = curvature_operator(problem, curvature).dense_memory()
        form = P * col
    # measured (tests/test_memory.py): Cholesky about 3.5, LU and LDL^T about 4.5 P x P
    # arrays (C, the shifted copy, the factors and LAPACK's copies)
    memory = max(build, (3.5 if curvature == "ggn" else 4.5) * P * P * item)
    seconds = form + factor_flops / rates[1]
    return EngineCost("dense", True, factor_flops, memory, seconds)


def _gram_sizes(problem: Problem) -> tuple[int, int, int, int]:
    """``(N, m, linear work, other parameters)``: samples, outputs a sample, the flops of
    the layer-wise kernels and the number of parameters outside ``nn.Linear`` layers."""
    inputs, _t, _w = next(iter(problem.batches()))
    with torch.no_grad():
        o = problem.outputs([p.detach() for p in problem.params], inputs)
    if not isinstance(o, Tensor):
        raise GramNotApplicableError("the model's output is not one tensor")
    N, m = problem.num_samples, int(o[0].numel())
    M = N * m
    linear = linear_modules(problem)
    covered, work = 0, 0
    for name, mod in linear.items():
        head = f"{name}." if name else ""
        for suffix in ("weight", "bias"):
            if f"{head}{suffix}" in problem.slices:
                covered += (
                    problem.slices[f"{head}{suffix}"].stop - problem.slices[f"{head}{suffix}"].start
                )
        work += 2 * (N * N * mod.in_features + M * M * mod.out_features)
    return N, m, work, problem.num_params - covered


def _gram_cost(
    problem: Problem,
    curvature: str,
    rates: tuple[float, float],
    grad: float,
    check_samples: bool = True,
) -> EngineCost:
    try:
        if curvature != "ggn":
            raise GramNotApplicableError("the observation-space engine factors the GGN only")
        from hesse._autodiff import losses

        losses.fisher_loss(problem.loss_fn)
        if check_samples:  # decided exactly here, as the engine does
            check_samples_independent(problem)
        N, m, work, rest = _gram_sizes(problem)
    except (GramNotApplicableError, NotImplementedError) as err:
        return EngineCost("gram", False, reason=str(err).split(";")[0])
    M, P = N * m, problem.num_params
    item = torch.empty((), dtype=problem.dtype).element_size()
    kernel_flops = work + 2 * M * M * rest + 2 * M * m * m * N
    flops = kernel_flops + M**3 / 3
    # the kernel (three M x M arrays and the factorisation's workspace: 3.4 measured,
    # tests/test_memory.py) or, before it, the forward graph of all the data with m
    # cotangents through it; the Jacobian rows outside Linear layers
    memory = item * (max(3.4 * M * M, (m + 3) * _activations(problem)) + M * rest)
    # the forward graph and m batched cotangents through it (vectorised: a fraction of m
    # backward passes), Jacobian rows outside Linear layers one backward each, the kernel,
    # its Cholesky factor, and the refinement's product
    seconds = (3 + 0.3 * m) * grad + M * grad * (rest > 0)
    seconds += kernel_flops / rates[0] + (M**3 / 3) / rates[1]
    if M >= P:
        seconds += P**3 / rates[1]  # no smaller than the dense problem: never preferred
    return EngineCost("gram", True, flops, memory, seconds)


def _chain_cost(
    problem: Problem | Chain, curvature: str, rates: tuple[float, float], grad: float
) -> tuple[EngineCost, Chain | None]:
    try:
        chain = as_chain(problem)
    except (ValueError, TypeError) as err:
        return EngineCost("chain", False, reason=str(err).split(";")[0].split(". ")[0]), None
    flops = chain.flops_estimate()
    # a forward and a backward pass, the sweep's flops, the refinement's product, and
    # each stage's fixed cost (small matrices: the work of calling the kernels)
    seconds = 3 * grad + flops / rates[0] + 0.3 * flops / rates[1] + _STAGE_SECONDS * len(chain)
    return EngineCost("chain", True, flops, chain.memory_estimate(), seconds), chain


def plan(
    problem: Problem | Chain,
    curvature: str = "hessian",
    *,
    max_memory: float | None = None,
    promote: bool = True,
) -> Plan:
    """Predict each exact engine's cost for ``C + eps I`` (``C`` the Hessian or the GGN)
    before any heavy work, and which one ``method="auto"`` picks.

    Args:
        problem: a `Problem` or a `Chain`.
        curvature: ``"hessian"`` or ``"ggn"``.
        max_memory: the memory budget in bytes (default: 80% of the memory available now
            on the problem's device).
        promote: predict for the float64 copy a float32 model is factored on.

    Returns:
        a `Plan`: ``plan.costs[m]`` (flops, peak memory, predicted seconds) for ``m`` in
        ``"dense"``, ``"gram"``, ``"chain"``, and ``plan.choice``.

    Cost: one timed product and one gradient of the problem, a forward pass for the
    sizes, and (once a process) a few small matrix products and factorisations.
    """
    check_curvature(curvature)
    if isinstance(problem, Problem) and problem.distributed:
        problem = problem.gathered()  # what engine() factors
    prob = problem.problem if isinstance(problem, Chain) else problem
    if promote and prob.dtype != torch.float64:
        prob = prob.promoted()
        problem = prob if not isinstance(problem, Chain) else promoted(problem)
    budget = _budget(prob, max_memory)
    rates = _rates(str(prob.device), prob.dtype)
    grad = _gradient_seconds(prob)
    out = Plan(curvature, prob.num_params, 0, budget)
    out.costs["dense"] = _dense_cost(prob, curvature, rates, _product_seconds(prob, curvature))
    out.costs["gram"] = _gram_cost(prob, curvature, rates, grad)
    out.costs["chain"], chain = _chain_cost(problem, curvature, rates, grad)
    if chain is not None:
        out.built["chain"] = chain
    out.num_outputs = gram_outputs(prob)
    return out


# ----------------------------------------------------------------------------- the engines
def engine(
    problem: Problem | Chain,
    curvature: str = "hessian",
    *,
    method: str = "auto",
    promote: bool = True,
    max_memory: float | None = None,
    progress: bool | None = None,
) -> Engine:
    """Prepare ``C`` once for exact factorisations of ``C + eps I`` at any number of
    dampings (``engine.factor(eps)``): the dense matrix, the observation-space kernel or
    the chain's linearisation. Arguments as `factorize`. The engine holds ``C`` at the
    parameters it was built at."""
    check_curvature(curvature)
    _budget(_problem(problem), max_memory)  # a malformed budget, before any work
    if method not in ("auto", *METHODS):
        raise ValueError(f"method must be 'auto', 'dense', 'gram' or 'chain'; got {method!r}")
    group = problem.group if isinstance(problem, Problem) else None
    if group is not None:
        problem.agree("engine", curvature=curvature, method=method, promote=promote)
        # the exact engines' state is the whole curvature batch: gather it (it is small)
        # and factor identically on every rank
        problem = problem.gathered()
    out_dtype = (problem.problem if isinstance(problem, Chain) else problem).dtype
    if out_dtype != torch.float64 and not promote:
        import warnings

        warnings.warn(
            f"the factorisation runs in {out_dtype}; float64 is recommended for "
            "solves and log-determinants (promote=True, the default, computes in "
            "float64)",
            stacklevel=3,
        )
    if promote and out_dtype != torch.float64:
        problem = promoted(problem) if isinstance(problem, Chain) else problem.promoted()
    built: dict[str, Any] = {}
    if method == "auto":
        if isinstance(problem, Chain):
            method = "chain"
        else:
            p = _auto(problem, curvature, max_memory)
            method, built = p.choice, p.built  # type: ignore[assignment]
        if group is not None:  # rank 0's choice (the plan's timings are each rank's own)
            method = group.gather_objects(method, "choice of the engine")[0]
    target = built["chain"] if method == "chain" and "chain" in built else problem
    eng = _build(target, curvature, method, max_memory, progress)
    eng.out_dtype = out_dtype
    eng.group = group  # the ranks' dampings are compared in Engine.factor
    return eng


def _auto(problem: Problem, curvature: str, max_memory: float | None) -> Plan:
    p = plan(problem, curvature, max_memory=max_memory, promote=False)
    if p.choice is None:
        raise MemoryBudgetError(
            "no exact engine fits the memory budget; the plan:\n"
            f"{p}\nuse fewer samples (a curvature batch), hesse.solve(..., method='cg') for "
            "solves without a factorisation, or a larger max_memory"
        )
    return p


def _build(
    problem: Problem | Chain,
    curvature: str,
    method: str,
    max_memory: float | None,
    progress: bool | None,
) -> Any:
    prob = problem.problem if isinstance(problem, Chain) else problem
    budget = _budget(prob, max_memory)
    if method == "chain":
        chain = as_chain(problem)
        _refuse_over(
            chain.memory_estimate(),
            budget,
            f"the chain sweep ({chain.inputs.shape[0]} samples, P = {chain.num_params})",
            "its state is (samples x width)^2 a stage: use fewer samples (a curvature "
            "batch), or hesse.solve(..., method='cg') for solves without the exact "
            "factorisation",
        )
        return ChainEngine(chain, curvature, progress)
    if method == "dense":
        rates = _rates(str(prob.device), prob.dtype)
        cost = _dense_cost(prob, curvature, rates, 0.0)
        _refuse_over(
            cost.memory,
            budget,
            f"the dense {prob.num_params} x {prob.num_params} {curvature} factorisation",
            "use method='gram' (GGN) or 'chain' (nn.Sequential), or fewer parameters",
        )
        return DenseEngine(prob, curvature, progress=progress)
    # the memory estimate only: the engine tests sample independence itself
    gram = _gram_cost(prob, curvature, _rates(str(prob.device), prob.dtype), 0.0, False)
    if gram.applies:
        _refuse_over(
            gram.memory,
            budget,
            f"the observation-space kernel (M = {gram_outputs(prob)} samples x outputs)",
            "use fewer samples (a curvature batch), method='dense' or 'chain'",
        )
    return GramEngine(prob, curvature)


def _budget(prob: Problem, max_memory: object) -> float:
    """``max_memory`` (validated), or the default share of the memory available now."""
    budget = check_budget("max_memory", max_memory)
    if budget is not None:
        return budget
    return memory.BUDGET_FRACTION * memory.available_memory(prob.device)


def _refuse_over(estimate: float, budget: float, what: str, way_out: str) -> None:
    check_memory(estimate, what, way_out, budget=budget)


def factorize(
    problem: Problem | Chain,
    damping: float = 0.0,
    curvature: str = "hessian",
    *,
    method: str = "auto",
    promote: bool = True,
    rank_rtol: float | None = None,
    progress: bool | None = None,
    max_memory: float | None = None,
) -> Factorization:
    """Factor ``C + eps I`` once (``C`` the Hessian or the GGN) by the cheapest exact
    engine; cheap ``solve``, ``logdet`` and ``inertia`` afterwards.

    Args:
        problem: a `Problem`, or a `Chain` (then the chain engine is used).
        damping: ``eps`` (may be negative: ``eps = -sigma`` counts eigenvalues below
            ``sigma``).
        curvature: ``"hessian"`` or ``"ggn"``.
        method: ``"auto"`` (the fastest engine that fits the memory budget, by `plan`),
            ``"dense"``, ``"gram"`` (GGN only) or ``"chain"`` (``nn.Sequential``).
        promote: a model in another dtype than float64 is factored on a float64 copy
            (default; answers come back in the model's dtype); ``False`` runs in the
            model's dtype, with a warning.
        rank_rtol: pivots at most ``rank_rtol * scale`` count as zero eigenvalues
            (default ``10 P u``, ``u`` the unit roundoff).
        progress: a progress bar (default: when stderr is a terminal and the work long).
        max_memory: the memory budget (bytes; default 80% of what is available): an
            engine over it is refused up front with `MemoryBudgetError` and the plan.

    Returns:
        a `Factorization` (`hesse.ChainFactorization` for the chain) with
        ``.solve(v)``, ``.solve_ex(v)``, ``.logdet()``, ``.inertia()`` and ``.status``
        (``status.method`` names the engine).

    The engine is kept on the problem and reused by the next call with the same
    curvature, method and budget while the problem's parameters, buffers and in-memory
    data are unchanged (their version counters; `Problem.state`), and so is the
    factorisation of the last few dampings: `hesse.logdet`, `hesse.inertia`,
    `hesse.solve` and `hesse.count_eigenvalues` on one problem prepare ``C`` once. For
    several dampings, `engine` builds ``C``'s representation once. Reference: design
    note ``docs/design/chain-curvature.md``.
    """
    # validated before any work (and again by Engine.factor, the one rule for every route)
    prob = _problem(problem)
    prob.parameters.as_diagonal(damping)
    check_rank_rtol(rank_rtol)
    prob.agree("factorize", damping=damping, curvature=curvature, method=method)
    eng = prepared(
        problem, curvature, method=method, promote=promote, max_memory=max_memory, progress=progress
    )
    key = (_digest(damping), rank_rtol)
    factors = eng.__dict__.setdefault("_recent", {})
    if key not in factors:
        if len(factors) >= 4:  # the last few dampings (a bisection moves on)
            factors.pop(next(iter(factors)))
        factors[key] = eng.factor(damping, rank_rtol)
    return factors[key]


def prepared(
    problem: Problem | Chain,
    curvature: str = "hessian",
    *,
    method: str = "auto",
    promote: bool = True,
    max_memory: float | None = None,
    progress: bool | None = None,
) -> Engine:
    """`engine`, kept on a `Problem` and reused while its state is unchanged (the one
    preparation that `factorize`, the counts, `eigenvalue` and the optimisers share)."""
    key = (curvature, method, promote, repr(max_memory))
    cache = isinstance(problem, Problem)
    eng = _cached(problem, key) if cache else None  # type: ignore[arg-type]
    if eng is None:
        eng = engine(
            problem,
            curvature,
            method=method,
            promote=promote,
            max_memory=max_memory,
            progress=progress,
        )
        if cache:
            _store(problem, key, eng)  # type: ignore[arg-type]
    return eng


def _cached(problem: Problem, key: tuple[Any, ...]) -> Engine | None:
    """The engine `factorize` built for this problem and key, while the problem's state
    (`Problem.state`: parameters, buffers, data) is what it was built at."""
    state = problem.state()
    entry = problem.__dict__.get("_engines", {}).get(key)
    if state is None or entry is None or entry[0] != state:
        return None
    return entry[1]


def _store(problem: Problem, key: tuple[Any, ...], eng: Engine) -> None:
    state = problem.state()
    if state is not None:  # one engine per key: a new state replaces the old one
        problem.__dict__.setdefault("_engines", {})[key] = (state, eng)
