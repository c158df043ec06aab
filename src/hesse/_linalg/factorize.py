"""One exact factorisation of ``C + D``, by the engines of one registry, chosen by cost.

`ENGINES` maps each ``method=`` name to its `EngineSpec` (its cost and its build), each
defined in the engine's own module:

- ``"dense"`` (`hesse._linalg.dense.DENSE`): ``C`` formed (Bishop's one pass for an MLP,
  else column chunks), factored by Cholesky / Bunch-Kaufman / eigen tiers: ``O(P^3)``,
  ``O(P^2)`` memory.
- ``"gram"`` (`hesse._linalg.gram.GRAM`, GGN only): Woodbury in observation space,
  ``O(M^3 + M P)`` for ``M`` samples times outputs.
- ``"chain"`` (`hesse._chain.engine.CHAIN`): the stable Riccati sweep, linear in depth,
  for ``nn.Sequential`` models.

`plan` asks each registered engine for its prediction before any heavy work (flops, peak
memory and time on this machine, from one shared `Timing`: a one-off calibration of
matrix-product and factorisation speed, one gradient and one product column of the
problem), and ``"auto"`` picks the fastest that fits the memory budget. `engine` builds
the chosen engine once (the dense matrix, the kernel or the chain's linearisation; what
the plan built on the way is handed over), and `Engine.factor` factors ``C + D`` for any
number of dampings; `factorize` does both for one damping.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from hesse._autodiff.distributed import digest as _digest
from hesse._autodiff.problem import Problem
from hesse._chain.chain import Chain
from hesse._chain.engine import CHAIN, ChainEngine
from hesse._chain.factorization import promoted
from hesse._factor.base import Engine, Factorization
from hesse._factor.cost import EngineCost, EngineSpec, Timing, problem_of
from hesse._linalg.dense import DENSE
from hesse._linalg.gram import GRAM, gram_outputs
from hesse._util import memory
from hesse._util.checks import check_budget, check_curvature, check_rank_rtol
from hesse._util.memory import MemoryBudgetError, format_bytes

__all__ = [
    "ENGINES",
    "ChainEngine",
    "Engine",
    "EngineCost",
    "Plan",
    "check_method",
    "engine",
    "factorize",
    "plan",
]

ENGINES: dict[str, EngineSpec] = {spec.name: spec for spec in (DENSE, GRAM, CHAIN)}
"""The exact engines by ``method=`` name, in the plan's order. A new engine is one module
with its `Engine`, `Factorization` and `EngineSpec`, and one entry here (design note,
"Adding an engine")."""


def check_method(method: object, *extra: str) -> str:
    """``method`` if it is ``"auto"``, a registered engine or one of ``extra`` (say,
    ``"cg"``), else a `ValueError` naming every choice."""
    names = ("auto", *ENGINES, *extra)
    if not isinstance(method, str) or method not in names:
        choices = ", ".join(repr(n) for n in names[:-1]) + f" or {names[-1]!r}"
        raise ValueError(f"method must be {choices}; got {method!r}")
    return method


# ----------------------------------------------------------------------------- the plan
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
    # method="auto"'s plan only: engines not predicted in full, by their floor (seconds),
    # which was over the prediction of an engine that fits
    skipped: dict[str, float] = field(default_factory=dict)
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
            upto = ""
            if c.upper > 1.5 * c.seconds:  # value-dependent: say how far it may go
                upto = (
                    f"  (up to {c.upper:.3g} s if its pivots are near-singular, more if "
                    "it delays directions across stages: at small damping)"
                )
            lines.append(
                f"  {m:<7}{c.flops / 1e9:>10.3g}{format_bytes(c.memory):>12}"
                f"{c.seconds:>10.3g} s{mark}{over}{upto}"
            )
        for m, floor in self.skipped.items():
            lines.append(f"  {m:<7}{'-':>10}{'-':>12}  > {floor:.3g} s (not predicted further)")
        return "\n".join(lines)


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
    return _plan(problem, curvature, max_memory, promote, quick=False)


def _plan(
    problem: Problem | Chain,
    curvature: str,
    max_memory: float | None,
    promote: bool,
    quick: bool,
) -> Plan:
    """`plan`; ``quick`` (``method="auto"``'s) predicts the engines in the order of their
    floors (`EngineSpec.floor`) and skips one whose floor is over the prediction of an
    engine that applies and fits: its prediction would be over it too, so the choice is
    the plan's (design note (H2)), without the skipped engines' forward passes and
    stage builds (a few ms on a deep model: the tax of ``auto`` where the factorisation
    itself takes ms)."""
    check_curvature(curvature)
    if isinstance(problem, Problem) and problem.distributed:
        problem = problem.gathered()  # what engine() factors
    prob = problem_of(problem)
    if promote and prob.dtype != torch.float64:
        prob = prob.promoted()
        problem = prob if not isinstance(problem, Chain) else promoted(problem)
    budget = _budget(prob, max_memory)
    timing = Timing(prob, curvature)
    out = Plan(curvature, prob.num_params, 0, budget)
    specs = list(ENGINES.values())
    floors: dict[str, float] = {}
    if quick:  # the floors serve the quick plan only
        floors = {s.name: s.floor(problem, curvature, timing) if s.floor else 0.0 for s in specs}
        specs.sort(key=lambda s: floors[s.name])  # stable: the registry's order at ties
    with prob._sharing():  # the engines' costs share one forward pass for the sizes
        for spec in specs:
            best = min((out.costs[m].seconds for m in out.feasible), default=math.inf)
            if quick and floors[spec.name] > best:
                out.skipped[spec.name] = floors[spec.name]
                continue
            out.costs[spec.name], built = spec.cost(problem, curvature, timing)
            if built is not None:  # handed to the engine `auto` builds (the chain)
                out.built[spec.name] = built
        out.costs = {m: out.costs[m] for m in ENGINES if m in out.costs}  # the table's order
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
    # a malformed budget refused before any work; the default read once (it is the
    # memory available now: the plan and the build use the same figure)
    max_memory = _budget(problem_of(problem), max_memory)
    check_method(method)
    group = problem.group if isinstance(problem, Problem) else None
    if group is not None:
        problem.agree("engine", curvature=curvature, method=method, promote=promote)
        # the exact engines' state is the whole curvature batch: gather it (it is small)
        # and factor identically on every rank
        problem = problem.gathered()
    out_dtype = (problem_of(problem)).dtype
    if out_dtype != torch.float64 and not promote:
        warnings.warn(
            f"the factorisation runs in {out_dtype}; float64 is recommended for "
            "solves and log-determinants (promote=True, the default, computes in "
            "float64)",
            stacklevel=3,
        )
    if promote and out_dtype != torch.float64:
        problem = promoted(problem) if isinstance(problem, Chain) else problem.promoted()
    built: dict[str, Any] = {}
    p: Plan | None = None  # auto's plan
    with problem_of(problem)._sharing():  # the plan's sizes and checks serve the build
        if method == "auto":
            if isinstance(problem, Chain):
                method = "chain"
            else:
                p = _auto(problem, curvature, max_memory)
                method, built = p.choice, p.built  # type: ignore[assignment]
            if group is not None:  # rank 0's choice (the plan's timings: each rank's own)
                method = group.gather_objects(method, "choice of the engine")[0]
        eng = _build(problem, curvature, method, max_memory, progress, built.get(method))
    if p is not None and method == "chain" and group is None:
        _offer_handover(eng, p, problem, curvature, max_memory, progress)  # type: ignore[arg-type]
    eng.out_dtype = out_dtype
    eng.group = group  # the ranks' dampings are compared in Engine.factor
    return eng


def _offer_handover(
    eng: Any,
    p: Plan,
    problem: Problem,
    curvature: str,
    max_memory: float | None,
    progress: bool | None,
) -> None:
    """`auto`'s chain may hand a damping over to the dense engine when the sweep's
    delayed front outgrows the break-even (design note, "The hand-over"), where the
    dense engine applies and fits the budget (on one process: the ranks' timings
    differ, their engines must not)."""
    dense = p.costs.get("dense")
    if dense is None and "dense" in p.skipped:  # the quick plan's: predict it now
        dense, _ = ENGINES["dense"].cost(problem, curvature, Timing(problem, curvature))
    if dense is None or not dense.applies or not dense.memory <= p.budget:
        return
    eng.handover = (
        dense.seconds,
        lambda: _build(problem, curvature, "dense", max_memory, progress),
    )


def _auto(problem: Problem, curvature: str, max_memory: float | None) -> Plan:
    p = _plan(problem, curvature, max_memory, promote=False, quick=True)
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
    built: Any = None,
) -> Engine:
    budget = _budget(problem_of(problem), max_memory)
    return ENGINES[method].build(problem, curvature, budget, built, progress)


def _budget(prob: Problem, max_memory: object) -> float:
    """``max_memory`` (validated), or the default share of the memory available now."""
    budget = check_budget("max_memory", max_memory)
    if budget is not None:
        return budget
    return memory.BUDGET_FRACTION * memory.available_memory(prob.device)


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
    curvature, method and budget while the problem's parameters and buffers (their
    bytes) and in-memory data (its version counters) are unchanged (`Problem.state`),
    and so is the factorisation of the last few dampings: `hesse.logdet`, `hesse.inertia`,
    `hesse.solve` and `hesse.count_eigenvalues` on one problem prepare ``C`` once. For
    several dampings, `engine` builds ``C``'s representation once. Reference: design
    note ``docs/design/chain-curvature.md``.
    """
    # validated before any work (and again by Engine.factor, the one rule for every route)
    prob = problem_of(problem)
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
    # the state once (a copy of the parameters' bytes): the lookup's and the entry's
    state = problem.state() if isinstance(problem, Problem) else None
    entry = problem.__dict__.get("_engines", {}).get(key) if state is not None else None
    if entry is not None and entry[0] == state:
        return entry[1]
    eng = engine(
        problem,
        curvature,
        method=method,
        promote=promote,
        max_memory=max_memory,
        progress=progress,
    )
    if state is not None:  # one engine per key: a new state replaces the old one
        problem.__dict__.setdefault("_engines", {})[key] = (state, eng)
    return eng
