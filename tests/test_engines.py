"""The three exact engines of ``hesse.factorize`` (dense, observation space, chain) against
dense float64 references from ``torch.func`` and ``torch.linalg`` (never from hesse), on
the conftest zoo, CE / MSE / BCE, reduction mean and sum, unequal batches, dampings down
to ``1e-8 ||C||``; the cost model's choice; engines reused across dampings; bad input.

The bounds are the algorithms' (as in test_chain_stress.py): a refined solve reaches a
relative residual of 1e-10 or float64's floor ``u ||C + eps I|| ||x|| / ||v||``; the
log-determinant matches to 1e-10 relative plus what a ``1e-13 ||C||`` backward error moves
it by; counts are exact but for eigenvalues within ``1e-10 ||C||`` of the shift.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import Case, Reference, make_case, mlp
from torch import nn

import hesse
from hesse._factor.cost import Timing
from hesse._linalg.factorize import ENGINES, _plan

U = torch.finfo(torch.float64).eps


def _bce_case(seed: int) -> Case:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = mlp([4, 5, 3]).double()
    X = torch.randn(7, 4, generator=g)
    y = (torch.rand(7, 3, generator=g) > 0.5).double()
    return Case("mlp-bce", model, X, y, nn.BCEWithLogitsLoss())


def _case(name: str, loss: str, reduction: str, seed: int) -> Case:
    case = _bce_case(seed) if loss == "bce" else make_case(name, loss, seed=seed)
    case.loss_fn = type(case.loss_fn)(reduction=reduction)
    return case


def _reference(case: Case, curvature: str) -> torch.Tensor:
    ref = Reference(case)
    C = ref.hessian() if curvature == "hessian" else ref.ggn()
    return 0.5 * (C + C.T)


def _check(f: hesse.Factorization, C: torch.Tensor, eps: float, v: torch.Tensor) -> None:
    """solve, log-determinant and inertia of ``f`` against ``C + eps I``."""
    P = len(C)
    A = C + eps * torch.eye(P)
    ev = torch.linalg.eigvalsh(A)
    norm = float(torch.linalg.matrix_norm(C, 2))
    delta = 1e-10 * norm
    neg, zero, pos = f.inertia()
    assert neg + zero + pos == P
    assert int((ev < -delta).sum()) <= neg <= int((ev < delta).sum())
    assert int((ev > delta).sum()) <= pos <= int((ev > -delta).sum())
    if zero == 0 and float(ev.abs().min()) > delta:
        x = f.solve(v)
        res = float((A @ x - v).norm() / v.norm())
        floor = U * float(torch.linalg.matrix_norm(A, 2)) * float(x.norm()) / float(v.norm())
        assert res <= max(1e-10, 10 * floor), (res, floor)
        sign, logabs = f.logdet()
        ref_sign, ref_log = torch.linalg.slogdet(A)
        assert sign == float(ref_sign)
        allow = 1e-10 * abs(float(ref_log)) + float((1e-13 * norm / ev.abs()).sum())
        assert abs(logabs - float(ref_log)) <= allow, (logabs, float(ref_log), allow)


ZOO = [
    ("mlp-tanh", "ce"),
    ("mlp-gelu", "mse"),
    ("mlp-softplus", "bce"),
    ("cnn", "ce"),
    ("rnn", "mse"),
]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize(("name", "loss"), ZOO, ids=[f"{a}-{b}" for a, b in ZOO])
def test_every_engine_against_dense_references(name, loss, reduction):
    case = _case(name, loss, reduction, seed=len(name) + len(loss))
    data = case.batches([4, 3])  # unequal batches: the objective of all the data
    prob = hesse.Problem(case.model, case.loss_fn, data)
    g = torch.Generator().manual_seed(3)
    v = torch.randn(prob.num_params, generator=g)
    chain = isinstance(case.model, nn.Sequential)
    for curvature in ("ggn", "hessian"):
        C = _reference(case, curvature)
        norm = float(torch.linalg.matrix_norm(C, 2))
        methods = (
            ["dense"] + (["gram"] if curvature == "ggn" else []) + (["chain"] if chain else [])
        )
        for rel in (1e-2, 1e-5, 1e-8, -0.3):
            eps = rel * norm
            for method in methods:
                f = hesse.factorize(prob, eps, curvature, method=method)
                assert f.status.method == method
                _check(f, C, eps, v)


def test_engines_agree_with_each_other_on_a_deep_chain():
    """A 10-layer tanh chain, batch 5: solve, log-determinant and inertia of the GGN by
    all three engines agree (and with the reference)."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = mlp([4] + [6] * 9 + [3]).double()
    X, y = torch.randn(5, 4, generator=g), torch.randint(0, 3, (5,), generator=g)
    case = Case("deep", model, X, y, nn.CrossEntropyLoss())
    prob = hesse.Problem(model, case.loss_fn, (X, y))
    C = _reference(case, "ggn")
    v = torch.randn(prob.num_params, generator=g)
    eps = 1e-6 * float(torch.linalg.matrix_norm(C, 2))
    fs = {m: hesse.factorize(prob, eps, "ggn", method=m) for m in ("dense", "gram", "chain")}
    for f in fs.values():
        _check(f, C, eps, v)
    xs = {m: f.solve(v) for m, f in fs.items()}
    assert float((xs["gram"] - xs["dense"]).norm() / xs["dense"].norm()) < 1e-8
    assert float((xs["chain"] - xs["dense"]).norm() / xs["dense"].norm()) < 1e-8
    assert len({tuple(f.inertia()) for f in fs.values()}) == 1


def test_an_engine_serves_many_dampings_from_one_preparation(monkeypatch):
    """C is prepared once: the dense matrix, the kernel and the chain's linearisation are
    built by the first factorisation only; counts at several shifts are exact."""
    case = make_case("mlp-tanh", "ce", seed=5)
    prob = hesse.Problem(case.model, case.loss_fn, (case.X, case.y))
    G = _reference(case, "ggn")
    ev = torch.linalg.eigvalsh(G)
    from hesse._chain.chain import Chain

    calls = []
    real = Chain.forward_backward
    monkeypatch.setattr(Chain, "forward_backward", lambda s: calls.append(1) or real(s))
    for method in ("dense", "gram", "chain"):
        eng = hesse.engine(prob, "ggn", method=method)
        for sigma in (-0.1, 1e-3 * float(ev[-1]), 0.3 * float(ev[-1])):
            neg = eng.factor(-sigma).inertia().negative
            assert neg == int((ev < sigma).sum()), (method, sigma)
    assert len(calls) == 1  # the chain engine linearised once for its three shifts


def test_float32_models_are_factored_in_float64_by_every_engine():
    case = make_case("mlp-tanh", "mse", seed=2, dtype=torch.float32)
    prob = hesse.Problem(case.model, case.loss_fn, (case.X, case.y))
    case64 = make_case("mlp-tanh", "mse", seed=2)
    C = _reference(case64, "ggn")
    v = torch.randn(prob.num_params, dtype=torch.float32)
    ref = torch.linalg.solve(C + 1e-3 * torch.eye(len(C)), v.double())
    for method in ("dense", "gram", "chain"):
        f = hesse.factorize(prob, 1e-3, "ggn", method=method)
        assert f.status.dtype == torch.float64
        x = f.solve(v)
        assert x.dtype == torch.float32
        assert float((x.double() - ref).norm() / ref.norm()) < 1e-6


# ----------------------------------------------------------------------------- the plan
def _wide_mlp() -> hesse.Problem:
    torch.manual_seed(1)
    model = mlp([30, 200, 3]).double()
    X, y = torch.randn(8, 30), torch.randint(0, 3, (8,))
    return hesse.Problem(model, nn.CrossEntropyLoss(), (X, y))


def _cnn_many_samples() -> hesse.Problem:
    case = make_case("cnn", "ce", seed=1)
    X = torch.randn(1000, *case.X.shape[1:])
    y = torch.randint(0, 3, (1000,))
    return hesse.Problem(case.model, case.loss_fn, (X, y))


def _deep_narrow() -> hesse.Problem:
    torch.manual_seed(2)
    model = mlp([4] + [8] * 63 + [3]).double()
    X, y = torch.randn(4, 4), torch.randint(0, 3, (4,))
    return hesse.Problem(model, nn.CrossEntropyLoss(), (X, y))


PLANS = [
    # the problem, its curvature, the engine auto must pick (clear by orders of magnitude)
    (_wide_mlp, "ggn", "gram"),  # P = 6803 against M = 24
    (_cnn_many_samples, "ggn", "dense"),  # not a chain, M = 3000 >> P = 141: ~12x apart
    (_deep_narrow, "hessian", "chain"),  # 64 layers, P = 4443: the Hessian, linear in depth
]


@pytest.mark.parametrize(("build", "curvature", "expected"), PLANS, ids=[p[2] for p in PLANS])
def test_auto_picks_the_fastest_predicted_engine(build, curvature, expected):
    prob = build()
    p = hesse.plan(prob, curvature)
    feasible = [m for m, c in p.costs.items() if c.applies and c.memory <= p.budget]
    assert p.choice == min(feasible, key=lambda m: p.costs[m].seconds)
    assert p.choice == expected, str(p)
    assert "<- auto" in str(p) and expected in str(p)


@pytest.mark.parametrize(("build", "curvature", "expected"), PLANS, ids=[p[2] for p in PLANS])
def test_auto_skips_only_engines_whose_floor_is_over_the_choice(build, curvature, expected):
    """``method="auto"``'s quick plan skips an engine whose floor (a lower bound of its
    prediction from the sizes alone) is over the prediction of one that fits: its choice
    is the full plan's, and every floor is at most its engine's full prediction."""
    prob = build()
    full = hesse.plan(prob, curvature)  # the timings are kept: both plans read the same
    quick = _plan(prob, curvature, None, True, quick=True)
    assert quick.choice == full.choice == expected
    for m, cost in full.costs.items():
        floor = ENGINES[m].floor
        if cost.applies and floor is not None:
            assert floor(prob, curvature, Timing(prob, curvature)) <= cost.seconds, m
    for m, floor in quick.skipped.items():
        assert m not in quick.costs and floor > quick.costs[quick.choice].seconds
    assert set(quick.costs) | set(quick.skipped) == set(full.costs)
    if expected == "gram":  # 64 x 3 samples x outputs against P = 6803: dense skipped
        assert "dense" in quick.skipped and "not predicted further" in str(quick)


def test_timings_are_keyed_by_the_models_structure_as_it_is_now():
    """A timing is remembered by the model's printed structure (`_signature`), kept while
    the same modules make it up: a replaced activation or an added layer is a new
    signature (its timings are measured again), the same model another problem's."""
    from hesse._factor.cost import _signature

    torch.manual_seed(0)
    model = mlp([5, 4, 3]).double()
    X, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    key = _signature(hesse.Problem(model, nn.CrossEntropyLoss(), (X, y)), "gradient")
    assert _signature(hesse.Problem(model, nn.CrossEntropyLoss(), (X, y)), "gradient") == key
    model[1] = nn.ReLU()
    relu = _signature(hesse.Problem(model, nn.CrossEntropyLoss(), (X, y)), "gradient")
    assert relu != key and "ReLU" in repr(relu)
    model.append(nn.Identity())
    assert _signature(hesse.Problem(model, nn.CrossEntropyLoss(), (X, y)), "gradient") != relu


def test_the_chain_on_the_hessian_is_predicted_as_a_range_and_wide_stages_in_range_terms():
    """The chain's Hessian prediction is a range: up to every pivot at the eigen tier
    (``upper``); the GGN's is one figure. A wide first stage (p = 4,104 against 6 x 24
    outputs) is priced as (W1) computes it, in range coordinates: its flops are below
    the ``2 n p^2`` of the p x p block it never forms (the estimate was above it)."""
    torch.manual_seed(0)
    model = mlp([170, 24, 24, 3]).double()
    X, y = torch.randn(6, 170, dtype=torch.float64), torch.randint(0, 3, (6,))
    prob = hesse.Problem(model, nn.CrossEntropyLoss(), (X, y))
    h, g = hesse.plan(prob, "hessian").costs["chain"], hesse.plan(prob, "ggn").costs["chain"]
    assert h.upper > h.seconds and math.isnan(g.upper)
    text = str(hesse.plan(prob, "hessian"))
    assert ("near-singular" in text) == (h.upper > 1.5 * h.seconds)
    p0 = 170 * 24 + 24
    assert h.flops < 2 * 6 * p0**2 / 4, h.flops
    # and the engine it prices factors exactly (against the dense GGN)
    f = hesse.engine(prob, "ggn", method="chain").factor(1e-3)
    ref = hesse.engine(prob, "ggn", method="dense").factor(1e-3)
    assert abs(f.logdet()[1] - ref.logdet()[1]) <= 1e-9 * abs(ref.logdet()[1])


def test_plan_says_which_engines_do_not_apply():
    case = make_case("cnn", "ce", seed=0)
    prob = hesse.Problem(case.model, case.loss_fn, (case.X, case.y))
    p = hesse.plan(prob, "hessian")
    assert not p.costs["gram"].applies and "GGN only" in p.costs["gram"].reason
    assert not p.costs["chain"].applies and "nn.Sequential" in p.costs["chain"].reason
    assert p.choice == "dense"


# ----------------------------------------------------------------------------- bad input
def test_zero_damping_on_a_rank_deficient_ggn_is_singular_for_every_engine():
    """Batch 2, 3 classes: the GGN has rank <= 4 < P. At damping 0 every engine says
    singular, with the null space's dimension and a damping to try."""
    torch.manual_seed(0)
    model = mlp([3, 4, 3]).double()
    X, y = torch.randn(2, 3), torch.randint(0, 3, (2,))
    prob = hesse.Problem(model, nn.CrossEntropyLoss(), (X, y))
    for method in ("dense", "gram", "chain"):
        f = hesse.factorize(prob, 0.0, "ggn", method=method)
        assert f.inertia().zero >= prob.num_params - 4, method
        with pytest.raises(hesse.SingularPivotError, match=r"dimension \d+.*increase the damping"):
            f.solve(torch.ones(prob.num_params))


@pytest.mark.parametrize("classes", [1, 2, 3, 10])
@pytest.mark.parametrize("targets", ["labels", "soft"])
def test_the_cross_entropy_kernel_has_n_times_classes_minus_one_rows(classes, targets):
    """(O4): softmax cross-entropy's Lambda_n has the null vector 1, so its factor has
    ``C - 1`` rows: ``B^T B`` is the GGN (torch.func's ``J^T Lambda J``) on a kernel of
    ``N (C - 1)`` rows, and the factorisation's log-determinant and inertia are dense's
    (the shift below and above ``P - M``'s zeros: 9 samples, P = 13 + 7 C)."""
    from hesse._linalg.gram import GramEngine

    g = torch.Generator().manual_seed(classes)
    torch.manual_seed(classes)
    model = mlp([3, 4, classes]).double()
    X = torch.randn(9, 3, generator=g, dtype=torch.float64)
    if targets == "labels":
        y = torch.randint(0, classes, (9,), generator=g)
    else:  # unnormalised soft targets: Lambda_n scales with the mass
        y = torch.rand(9, classes, generator=g, dtype=torch.float64) * 2
    case = Case("ce", model, X, y, nn.CrossEntropyLoss(reduction="sum"))
    prob = hesse.Problem(case.model, case.loss_fn, (case.X, case.y))
    eng = GramEngine(prob, "ggn")
    rows = 9 * max(classes - 1, 1)
    assert eng.kernel.shape == (rows, rows)
    ggn = Reference(case).ggn()
    P = ggn.shape[0]
    BtB = eng.Bt(eng.B(torch.eye(P, dtype=torch.float64)))
    scale = float(torch.linalg.matrix_norm(ggn, 2)) or 1.0  # one class: C = 0
    assert float((BtB - ggn).abs().max()) <= 1e-13 * scale
    for eps in (1e-6 * scale, 1e-1 * scale, -1e-3 * scale):
        f = eng.factor(eps)
        ev = torch.linalg.eigvalsh(ggn) + eps
        assert tuple(f.inertia()) == (int((ev < 0).sum()), 0, int((ev > 0).sum()))
        sign, logabs = f.logdet()
        assert sign == float(torch.sign(ev).prod())
        assert logabs == pytest.approx(float(ev.abs().log().sum()), rel=1e-10, abs=1e-9)


def test_gram_engine_refuses_what_it_cannot_take():
    case = make_case("mlp-tanh", "ce", seed=0)
    l1 = hesse.Problem(case.model, nn.L1Loss(), (case.X, torch.randn(7, 3)))
    with pytest.raises(ValueError, match=r"closed-form Lambda.*CrossEntropyLoss.*L1Loss"):
        hesse.factorize(l1, 0.1, "ggn", method="gram")
    prob = hesse.Problem(case.model, case.loss_fn, (case.X, case.y))
    with pytest.raises(ValueError, match="GGN .* only"):
        hesse.factorize(prob, 0.1, "hessian", method="gram")
    bn = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).double()
    with pytest.warns(UserWarning, match="BatchNorm"):
        coupled = hesse.Problem(bn, case.loss_fn, (case.X, case.y))
    with pytest.raises(ValueError, match="samples that do not interact"):
        hesse.factorize(coupled, 0.1, "ggn", method="gram")
    with pytest.raises(ValueError, match="method must be"):
        hesse.factorize(prob, 0.1, "ggn", method="lu")


def test_no_engine_within_max_memory_is_refused_with_the_plan():
    prob = _wide_mlp()
    with pytest.raises(
        hesse.MemoryBudgetError, match=r"no exact engine fits(.|\n)*dense(.|\n)*gram"
    ):
        hesse.factorize(prob, 0.1, "ggn", max_memory=1e3)
    with pytest.raises(hesse.MemoryBudgetError, match=r"dense .* factorisation would need"):
        hesse.factorize(prob, 0.1, "ggn", method="dense", max_memory=1e6)
    assert math.isfinite(hesse.plan(prob, "ggn").costs["gram"].seconds)


def test_a_new_engine_is_one_registry_entry(monkeypatch):
    """The registry is the one place that names the engines: an entry (here a twin of the
    dense engine) is planned, picked by auto when predicted fastest, handed what its cost
    built, built by name, and accepted by every ``method=`` check."""
    from hesse._factor.cost import EngineCost, EngineSpec, problem_of
    from hesse._linalg import factorize as fz
    from hesse._linalg.dense import DenseEngine

    class Twin(DenseEngine):
        method = "twin"

    handed: list[object] = []

    def cost(problem, curvature, timing):
        return EngineCost("twin", True, 1.0, 1.0, 1e-12), "built by the cost"

    def build(problem, curvature, budget, built, progress):
        handed.append(built)
        return Twin(problem_of(problem), curvature)

    monkeypatch.setitem(fz.ENGINES, "twin", EngineSpec("twin", cost, build, "a twin"))
    torch.manual_seed(3)
    model = mlp([3, 5, 2]).double()
    X, y = torch.randn(6, 3), torch.randint(0, 2, (6,))
    prob = hesse.Problem(model, nn.CrossEntropyLoss(), (X, y))
    p = hesse.plan(prob, "ggn")
    assert list(p.costs) == ["dense", "gram", "chain", "twin"] and p.choice == "twin"
    assert isinstance(hesse.engine(prob, "ggn"), Twin)
    assert isinstance(hesse.engine(prob, "ggn", method="twin"), Twin)
    assert handed == ["built by the cost", None]
    G = Reference(Case("twin", model, X, y, nn.CrossEntropyLoss())).ggn()
    A = G + 0.3 * torch.eye(prob.num_params, dtype=G.dtype)
    v = torch.randn(prob.num_params, dtype=G.dtype)
    x = hesse.solve(prob, v, 0.3, "ggn", method="twin")
    assert torch.linalg.norm(A @ x - v) <= 1e-10 * torch.linalg.norm(v)
    _s, ref = torch.linalg.slogdet(A)
    assert (
        abs(hesse.factorize(prob, 0.3, "ggn", method="twin").logdet()[1] - float(ref))
        <= 1e-10 * abs(float(ref)) + 1e-12
    )
    with pytest.raises(ValueError, match=r"'auto', 'dense', 'gram', 'chain', 'twin' or 'cg'"):
        hesse.solve(prob, v, 0.3, "ggn", method="nope")


def _deep_tanh(L: int = 8, w: int = 8, n: int = 8) -> hesse.Problem:
    """A deep tanh chain whose Hessian at tiny damping makes the sweep delay about 40% of
    ``P`` (near-null directions spanning the layers)."""
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(5, w), nn.Tanh()]
    for _ in range(L - 2):
        layers += [nn.Linear(w, w), nn.Tanh()]
    layers.append(nn.Linear(w, 3))
    X, y = torch.randn(n, 5, dtype=torch.float64), torch.randint(0, 3, (n,))
    return hesse.Problem(nn.Sequential(*layers).double(), nn.CrossEntropyLoss(), (X, y))


def test_the_chain_hands_a_growing_front_over_to_the_dense_engine(monkeypatch):
    """Design note, "The hand-over": a sweep whose delayed front outgrows the break-even
    stops, and that damping and every smaller one are factored densely (built once);
    exact either way, ``status`` says which engine and why. ``auto`` offers the hand-over
    where the dense engine applies and fits, not otherwise."""
    from hesse._linalg import dense as _dense

    prob = _deep_tanh()
    H = hesse.hessian(prob)
    P = prob.num_params
    eps = 1e-6 * float(torch.linalg.matrix_norm(H, 2))
    builds: list[int] = []

    def build_dense():
        builds.append(1)
        return hesse.engine(prob, method="dense")

    eng = hesse.engine(prob, method="chain")
    assert eng.handover is None and eng.factor(eps).status.max_delayed > 0.3 * P
    eng.handover = (0.0, build_dense)  # a dense engine predicted free: hand over at once
    v = torch.randn(P, dtype=torch.float64)
    for d in (eps, eps / 10, -eps):  # the smaller and the negative go straight to dense
        f = eng.factor(d)
        assert f.status.method == "dense" and "delayed front reached" in f.status.handed_over
        A = H + d * torch.eye(P, dtype=H.dtype)
        ref = torch.linalg.slogdet(A)
        assert f.logdet()[0] == float(ref.sign)
        assert abs(f.logdet()[1] - float(ref.logabsdet)) <= 1e-8 * abs(float(ref.logabsdet))
        ev = torch.linalg.eigvalsh(A)
        assert float(ev.abs().min()) > 1e-9 * float(ev.abs().max())  # counts well defined
        assert tuple(f.inertia()) == (int((ev < 0).sum()), 0, int((ev > 0).sum()))
        x = f.solve(v)
        assert torch.linalg.norm(A @ x - v) <= 1e-8 * torch.linalg.norm(v) * torch.linalg.cond(A)
    assert builds == [1]  # the dense matrix formed once
    f = eng.factor(1e3 * eps)  # a larger damping tries the chain again
    assert f.status.method == "chain" or f.status.handed_over
    eng.handover = (1e9, build_dense)  # the dense engine dear: the chain sweeps on
    assert eng.factor(1e4 * eps).status.method == "chain"

    # auto: offered when the plan takes the chain and the dense engine fits
    import dataclasses

    from hesse._factor.cost import EngineSpec
    from hesse._linalg import factorize as fz

    chain_spec = fz.ENGINES["chain"]

    def cheap_chain(problem, curvature, timing):  # the plan takes the chain
        cost, built = chain_spec.cost(problem, curvature, timing)
        return dataclasses.replace(cost, seconds=0.0), built

    spec = EngineSpec("chain", cheap_chain, chain_spec.build, chain_spec.summary)
    monkeypatch.setitem(fz.ENGINES, "chain", spec)
    auto = hesse.engine(prob)
    assert auto.method == "chain" and auto.handover is not None and auto.handover[0] > 0
    monkeypatch.setattr(_dense, "dense_memory", lambda problem, curvature: 1e30)
    assert hesse.engine(prob).handover is None  # the dense engine does not fit


def test_the_plan_and_its_build_check_once_and_a_mode_change_is_seen(monkeypatch):
    """`hesse.engine(method="auto")` plans and builds on one forward pass for the sizes and
    one test of sample independence (`Problem._sharing`); outside a call nothing is kept,
    and `model.train()` changes the problem's state, so `factorize` does not reuse the
    eval-mode engine for a train-mode Dropout model: it refuses."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 60), nn.Tanh(), nn.Dropout(0.5), nn.Linear(60, 3)).double()
    model.eval()
    X = torch.randn(9, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (9,))
    prob = hesse.Problem(model, nn.CrossEntropyLoss(), (X, y))
    calls = []
    coupling = hesse.Problem._coupling
    monkeypatch.setattr(hesse.Problem, "_coupling", lambda self: calls.append(1) or coupling(self))
    f = hesse.factorize(prob, 0.1, "ggn")
    # the plan's check served the build (gram is 5x cheaper here, but which engine the
    # timings pick under load does not matter: the check runs once either way)
    assert len(calls) == 1
    state = prob.state()
    model.train()
    assert prob.state() != state
    with pytest.raises(ValueError, match="samples that do not interact.*Dropout"):
        hesse.factorize(prob, 0.1, "ggn", method="gram")
    model.eval()
    again = hesse.factorize(prob, 0.1, "ggn")
    assert again.logdet() == f.logdet()
