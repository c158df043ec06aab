"""The chain solver on the deep nets users bring (8 to 32 stages, widths 2 to 12, batches
1 to 8, every activation kind, CE and MSE, with and without biases), against dense
float64 references from ``torch.func`` and ``torch.linalg`` (never from hesse).

What is asserted is what the algorithm guarantees (design note, "Stable elimination"):

- counts and inertia are those of a matrix within a backward error of ``C + eps I``:
  exact except for eigenvalues within ``DELTA = 1e-10 ||C||`` of the shift;
- a solve, refined with products of the true operator, reaches a relative residual of
  1e-10, or float64's own limit ``u ||C + eps I|| ||x|| / ||v||`` where that is larger;
- the log-determinant matches to 1e-10 relative, plus what a backward error of
  ``1e-13 ||C||`` moves it by (``sum_i 1e-13 ||C|| / |mu_i|``);
- eigenvalues by bisection to ``1e-8 ||C||``;
- a factorisation's answers do not depend on the order its methods are called in.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import Case, Reference
from torch import nn

import hesse

ACTS = [nn.Tanh, nn.ReLU, nn.GELU, nn.Softplus, nn.Sigmoid, nn.SiLU, nn.ELU, nn.LeakyReLU]

# depth (Linear layers; stages = 2 * depth - 1 + the loss), width, batch, loss, bias, seed
STRESS = [
    (4, 8, 6, "mse", True, 0),  # the issue's net: 8 stages, width 8, batch 6
    (5, 6, 1, "ce", True, 1),  # batch 1: a GGN of rank <= C - 1
    (6, 10, 3, "ce", False, 2),  # wide middle stages (fan-in 10 > batch 3)
    (8, 5, 8, "mse", True, 3),
    (12, 4, 2, "ce", True, 4),  # 24 stages
    (16, 3, 4, "mse", False, 5),  # 32 stages
    (9, 12, 5, "ce", True, 6),
    (10, 2, 7, "mse", True, 7),
]


def _case(depth: int, width: int, n: int, loss: str, bias: bool, seed: int, act) -> Case:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    d_in, C = width - 1 if width > 2 else width, 3
    widths = [d_in] + [width] * (depth - 1) + [C]
    for i in range(depth):
        layers.append(nn.Linear(widths[i], widths[i + 1], bias=bias))
        if i < depth - 1:
            layers.append(act())
    model = nn.Sequential(*layers).double()
    with torch.no_grad():  # unit-variance layers: a deep net whose curvature is not tiny
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(max(p.shape[-1], 1)) * 1.2)
    X = torch.randn(n, d_in, generator=g)
    if loss == "ce":
        y, lf = torch.randint(0, C, (n,), generator=g), nn.CrossEntropyLoss()
    else:
        y, lf = torch.randn(n, C, generator=g), nn.MSELoss()
    return Case(f"{act.__name__}-{depth}x{width}-n{n}-{loss}", model, X, y, lf)


def _dense(case: Case, curvature: str) -> torch.Tensor:
    ref = Reference(case)
    C = ref.hessian() if curvature == "hessian" else ref.ggn()
    return 0.5 * (C + C.T)


def _count_ok(neg: int, ev: torch.Tensor, sigma: float, delta: float) -> bool:
    """``neg`` counts the eigenvalues below ``sigma``, but for those within ``delta``."""
    return int((ev < sigma - delta).sum()) <= neg <= int((ev < sigma + delta).sum())


def _params(cfg_index: int):
    depth, width, n, loss, bias, seed = STRESS[cfg_index]
    return depth, width, n, loss, bias, seed, ACTS[cfg_index % len(ACTS)]


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@pytest.mark.parametrize("i", range(len(STRESS)), ids=lambda i: "-".join(map(str, STRESS[i])))
def test_stress_counts_solves_logdets(i, curvature):
    case = _case(*_params(i))
    prob = hesse.Problem(case.model, case.loss_fn, (case.X, case.y))
    C = _dense(case, curvature)
    P = len(C)
    ev = torch.linalg.eigvalsh(C)
    norm = float(ev.abs().max())
    delta = 1e-10 * norm
    # counts at sigma = 0 and at tiny shifts: never an exception
    for s in (0.0, 1e-12, -1e-12, 1e-9, -1e-9, 1e-6, -1e-6):
        sigma = s * norm
        neg = hesse.count_eigenvalues(prob, below=sigma, curvature=curvature, method="chain")
        assert _count_ok(neg, ev, sigma, delta), (sigma, neg)
    # solves, log-determinants and inertia for dampings down to 1e-8 ||C||
    g = torch.Generator().manual_seed(i)
    V = torch.randn(P, 2, generator=g, dtype=torch.float64)
    u = torch.finfo(torch.float64).eps
    for rel in (1e-2, 1e-4, 1e-6, 1e-8):
        eps = rel * norm
        mu = ev + eps
        if float(mu.abs().min()) <= delta:  # singular to working accuracy: skip
            continue
        Ce = C + eps * torch.eye(P, dtype=torch.float64)
        f = hesse.factorize(prob, eps, curvature, method="chain")
        res = f.solve_ex(V)
        X = res.x
        r = torch.linalg.vector_norm(Ce @ X - V, dim=0) / torch.linalg.vector_norm(V, dim=0)
        limit = 64 * math.sqrt(P) * u * float(ev.abs().max() + abs(eps))
        limit = limit * torch.linalg.vector_norm(X, dim=0) / torch.linalg.vector_norm(V, dim=0)
        assert bool((r <= torch.clamp(limit, min=1e-10)).all()), (rel, r, limit, f.status)
        assert res.residual <= max(1e-10, float(limit.max())) * 1.01
        # the sign and log |det| against slogdet, within what the backward error the
        # solve's limit allows (64 sqrt(P) u ||C + eps I||, to first order: sum_i of it
        # over |mu_i|) moves them
        sign, la = torch.linalg.slogdet(Ce)
        fs, fla = f.logdet()
        assert fs == float(sign)
        backward = 64 * math.sqrt(P) * u * (norm + abs(eps))
        allowed = 1e-10 * abs(float(la)) + float((backward / mu.abs()).sum())
        assert abs(fla - float(la)) <= allowed, (rel, fla, float(la), allowed)
        # inertia of C + eps I, with no eigenvalue within delta of zero
        inert = f.inertia()
        assert inert.zero == 0 and _count_ok(inert.negative, mu, 0.0, delta)
        assert inert.negative + inert.positive == P


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@pytest.mark.parametrize("i", [0, 4, 5])
def test_stress_eigenvalues_by_bisection(i, curvature):
    case = _case(*_params(i))
    prob = hesse.Problem(case.model, case.loss_fn, (case.X, case.y))
    ev = torch.linalg.eigvalsh(_dense(case, curvature))
    P, norm = len(ev), float(ev.abs().max())
    for k in (1, P // 2 + 1, P):
        lam = hesse.eigenvalue(prob, k, curvature, method="chain")
        assert abs(lam - float(ev[k - 1])) <= 1e-8 * norm, (k, lam, float(ev[k - 1]))


def test_results_do_not_depend_on_the_call_order():
    case = _case(*_params(0))
    prob = hesse.Problem(case.model, case.loss_fn, (case.X, case.y))
    v = torch.randn(prob.num_params, generator=torch.Generator().manual_seed(3))
    eps = -1e-3  # indefinite: the pivots of several kinds
    a = hesse.factorize(prob, eps, method="chain")
    b = hesse.factorize(prob, eps, method="chain")
    first = (a.logdet(), a.inertia(), a.near_singular, a.solve(v))
    second_inertia, second_near = b.inertia(), b.near_singular
    second_x, second_logdet = b.solve(v), b.logdet()
    assert first[0] == second_logdet and first[1] == second_inertia
    assert first[2] == second_near and torch.equal(first[3], second_x)
    assert a.logdet() == first[0] and a.inertia() == first[1]  # and again, later


def test_the_issue_net_needs_pivoting_and_reports_it():
    """8 layers of width 8, batch 6, MSE, damping 1e-6 ||H||: the fixed-order sweep had
    Schur entries of 6e4 and a residual of 7e4 here; the stable sweep delays pivots,
    says how many, and the solve checks itself."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i in range(8):
        layers += [nn.Linear(8, 8)] + ([nn.Tanh()] if i < 7 else [])
    model = nn.Sequential(*layers).double()
    X, y = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    case = Case("issue", model, X, y, nn.MSELoss())
    prob = hesse.Problem(model, nn.MSELoss(), (X, y))
    H = _dense(case, "hessian")
    ev = torch.linalg.eigvalsh(H)
    eps = 1e-6 * float(ev.abs().max())
    f = hesse.factorize(prob, eps, method="chain")
    st = f.status
    assert st.growth <= 10 + 1e-9  # the threshold test: at most 1 / TAU
    assert len(st.kinds) == len(st.delayed) == len(prob.model) and st.max_delayed == max(st.delayed)
    v = torch.randn(len(H), generator=g, dtype=torch.float64)
    res = f.solve_ex(v)
    Ce = H + eps * torch.eye(len(H))
    true = float((Ce @ res.x - v).norm() / v.norm())
    # hesse's residual (Hessian-vector products) and the dense one differ by the rounding
    # of the residual itself, about u ||H|| ||x|| / ||v||
    rounding = 64 * len(H) ** 0.5 * 2.3e-16 * float(ev.abs().max() * res.x.norm() / v.norm())
    assert res.converged and true <= 1e-9 and abs(true - res.residual) <= rounding
    neg = int((ev + eps < 0).sum())
    assert f.inertia() == (neg, 0, len(H) - neg)


def test_solve_refuses_an_unreachable_rtol_and_names_what_it_reached():
    case = _case(*_params(0))
    prob = hesse.Problem(case.model, case.loss_fn, (case.X, case.y))
    f = hesse.factorize(prob, 1e-7, method="chain")
    v = torch.randn(prob.num_params, generator=torch.Generator().manual_seed(1))
    with pytest.raises(hesse.InaccurateSolveError, match=r"reached a relative residual of .* rtol"):
        f.solve(v, rtol=1e-30)
    ok = f.solve_ex(v, rtol=1e-30)  # the _ex form returns what it reached instead
    assert not ok.converged and ok.residual > 0 and ok.refinement_steps >= 1
    with pytest.raises(ValueError, match="rtol must be"):
        f.solve(v, rtol=-1.0)
    with pytest.raises(ValueError, match="max_refine must be"):
        f.solve(v, max_refine=-1)
    with pytest.raises(ValueError, match="non-finite"):
        f.solve(v * float("nan"))


def _deep_problem(i: int = 0) -> tuple[hesse.Problem, Case]:
    case = _case(*_params(i))
    return hesse.Problem(case.model, case.loss_fn, (case.X, case.y)), case


def test_newton_steps_and_the_trust_region_on_a_deep_chain():
    """What is built on the sweep inherits its accuracy: the Hessian Newton step, the GGN
    step and the exact trust-region step of a 15-stage chain against dense solutions."""
    from test_optim import _assert_more_sorensen, _reference_tr, chain_trust_region

    prob, case = _deep_problem(0)
    H = _dense(case, "hessian")
    G = _dense(case, "ggn")
    g = Reference(case).gradient()
    P = len(H)
    norm = float(torch.linalg.eigvalsh(H).abs().max())
    for curvature, C in (("hessian", H), ("ggn", G)):
        eps = 1e-4 * norm
        st = hesse.newton_step(prob, eps, curvature, method="chain")
        ref = -torch.linalg.solve(C + eps * torch.eye(P), g)
        assert float((st.step - ref).norm() / ref.norm()) < 1e-6
    for radius in (0.05, 5.0):
        res = chain_trust_region(prob, case.model, case.loss_fn, g, radius)
        _assert_more_sorensen(H, g, radius, res, tol=1e-6)
        ref = _reference_tr(H, g, radius)
        assert float((res.step - ref).norm()) <= 1e-6 * max(1.0, float(ref.norm()))


def test_histogram_counts_match_dense_on_a_deep_chain():
    prob, case = _deep_problem(4)
    ev = torch.linalg.eigvalsh(_dense(case, "hessian"))
    norm = float(ev.abs().max())
    edges = [-1.01 * norm, -1e-3 * norm, -1e-8 * norm, 1e-8 * norm, 1e-3 * norm, 1.01 * norm]
    counts = hesse.eigenvalue_histogram(prob, edges, method="chain")
    ref = [int(((ev >= a) & (ev < b)).sum()) for a, b in itertools.pairwise(edges)]
    delta = 1e-10 * norm
    assert int(counts.sum()) == len(ev)
    for c, r, a, b in zip(counts.tolist(), ref, edges, edges[1:], strict=False):
        slack = int(((ev - a).abs() <= delta).sum() + ((ev - b).abs() <= delta).sum())
        assert abs(c - r) <= slack


def test_float32_models_are_factored_in_float64():
    """A float32 MLP: every chain entry point computes in float64 on a copy (the
    float32 weights exactly) and answers in float32."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(20, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 5)
    ).float()
    X, y = torch.randn(6, 20, generator=g).float(), torch.randint(0, 5, (6,), generator=g)
    prob = hesse.Problem(model, nn.CrossEntropyLoss(), (X, y))
    case = Case("f32", model.double(), X.double(), y, nn.CrossEntropyLoss())
    H = _dense(case, "hessian")
    model.float()
    ev = torch.linalg.eigvalsh(H)
    norm = float(ev.abs().max())
    eps = 1e-3 * norm
    v = torch.randn(len(H), generator=g).float()
    x = hesse.solve(prob, v, eps, method="chain")
    assert x.dtype == torch.float32
    ref = torch.linalg.solve(H + eps * torch.eye(len(H)), v.double())
    assert float((x.double() - ref).norm() / ref.norm()) < 1e-5  # float32 rounding of x
    assert _count_ok(
        hesse.count_eigenvalues(prob, below=0.0, method="chain"), ev, 0.0, 1e-10 * norm
    )
    sign, la = torch.linalg.slogdet(H + eps * torch.eye(len(H)))
    fs, fla = hesse.logdet(prob, eps, method="chain")
    assert fs == float(sign) and abs(fla - float(la)) < 1e-8 * abs(float(la))
    lam = hesse.eigenvalue(prob, 1, method="chain")
    assert abs(lam - float(ev[0])) <= 1e-8 * norm


def test_eigenvalue_refuses_bad_k_and_tol_and_never_loops():
    prob, case = _deep_problem(5)
    P = prob.num_params
    for k in (0, P + 1, 1.5, True, "1"):
        with pytest.raises(ValueError, match=r"k must be in \[1, "):
            hesse.eigenvalue(prob, k, method="chain")
    for tol in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="tol must be a positive finite number"):
            hesse.eigenvalue(prob, 1, tol=tol, method="chain")
    # a tol below the float spacing stops at the spacing (bounded sweeps), not forever
    ev = torch.linalg.eigvalsh(_dense(case, "hessian"))
    lam = hesse.eigenvalue(prob, P, tol=1e-30, method="chain")
    assert abs(lam - float(ev[-1])) <= 1e-8 * float(ev.abs().max())
    with pytest.raises(ValueError, match="below must be a real number"):
        hesse.count_eigenvalues(prob, below=float("nan"), method="chain")
    with pytest.raises(ValueError, match="bounds must be two finite numbers"):
        hesse.eigenvalue(prob, 1, bounds=(1.0, 0.0), method="chain")


@pytest.mark.parametrize("i", [2, 6])
def test_wide_stages_delay_only_the_complement_directions_that_fail(i):
    """Wide middle stages of the Hessian at small damping (fan-in 10 and 12 against
    batches 3 and 5): the complement's pivot ``eps`` fails the threshold test against
    its coupling, and the stage splits the complement in the basis that diagonalises
    that coupling (design note (W5)) instead of factoring its dense pivot. Only the
    directions that fail are delayed (at most ``min(J - n, i) min(n, o)`` a stage), and
    the unrefined solve, the log-determinant and the inertia are those of the dense
    factorisation: within what a backward error of ``64 sqrt(P) u ||C + eps I||``
    allows (the split's Schur terms and solve products come from the eliminated
    directions alone; through the delayed ones' couplings, ``~||lam|| / eps`` here,
    they lost 1e4 of that at ``1e-8``)."""
    depth, width, n, loss, bias, seed, act = _params(i)
    case = _case(depth, width, n, loss, bias, seed, act)
    prob = hesse.Problem(case.model, case.loss_fn, (case.X, case.y))
    H = _dense(case, "hessian")
    P, u = len(H), torch.finfo(torch.float64).eps
    ev = torch.linalg.eigvalsh(H)
    norm = float(ev.abs().max())
    J = width + int(bias)  # a middle stage's input rows, with the bias row
    per_stage = min(J - n, width) * min(n, width)
    V = torch.randn(P, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for rel in (1e-4, 1e-6, 1e-8):
        eps = rel * norm
        f = hesse.factorize(prob, eps, method="chain")
        st = f.status
        assert all(k in ("wide", "none") for k in st.kinds), st.kinds
        assert 0 < st.max_delayed <= per_stage * (depth - 1), st.delayed
        Ce = H + eps * torch.eye(P, dtype=torch.float64)
        X = f.solve(V, max_refine=0)
        r = torch.linalg.vector_norm(Ce @ X - V, dim=0)
        floor = 64 * math.sqrt(P) * u * float(torch.linalg.matrix_norm(Ce, 2))
        assert bool((r <= floor * torch.linalg.vector_norm(X, dim=0)).all()), (rel, r)
        sign, la = torch.linalg.slogdet(Ce)
        fs, fla = f.logdet()
        mu = ev + eps
        assert fs == float(sign)
        assert abs(fla - float(la)) <= float((floor / mu.abs()).sum()), (rel, fla, float(la))
        neg = int((mu < 0).sum())
        assert f.inertia() == (neg, 0, P - neg)


def test_the_growth_probe_changes_no_decision(monkeypatch):
    """The Cholesky and Bunch-Kaufman tiers probe their growth tests on the 32 largest
    columns of ``Q_uz`` before their full triangular solves (`Elimination._cholesky_probe`,
    `Elimination._probe`), and the update's columns where its diagonal is largest before
    the full product (`_column_probe`): a probe over the limit
    rejects what the full test (the maximum over every column) rejects, so the tiers,
    the delayed fronts, the log-determinant and the inertia are those of the sweep
    without the probe, on a ReLU chain with 192 state columns where it does reject."""
    from hesse._factor import elimination

    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    widths = [32] + [12] * 5 + [10]
    layers: list[nn.Module] = []
    for i in range(6):
        layers.append(nn.Linear(widths[i], widths[i + 1], bias=False))
        if i < 5:
            layers.append(nn.ReLU())
    X, y = torch.randn(16, 32, generator=g), torch.randint(0, 10, (16,), generator=g)
    prob = hesse.Problem(nn.Sequential(*layers).double(), nn.CrossEntropyLoss(), (X.double(), y))
    probe, verdicts = elimination.Elimination._probe, []
    cholesky_probe, cholesky_verdicts = elimination.Elimination._cholesky_probe, []
    column_probe, column_verdicts = elimination._column_probe, []

    def spy(*args):
        out = probe(*args)
        verdicts.append(out[0])
        return out

    def cholesky_spy(*args):
        cholesky_verdicts.append(cholesky_probe(*args))
        return cholesky_verdicts[-1]

    def column_spy(*args):
        column_verdicts.append(column_probe(*args))
        return column_verdicts[-1]

    for eps in (1e-3, 1e-4, -1e-3):
        verdicts.clear()
        with monkeypatch.context() as m:
            m.setattr(elimination.Elimination, "_probe", staticmethod(spy))
            m.setattr(elimination.Elimination, "_cholesky_probe", staticmethod(cholesky_spy))
            m.setattr(elimination, "_column_probe", column_spy)
            a = hesse.engine(prob, "hessian", method="chain").factor(eps)
        with monkeypatch.context() as m:
            m.setattr(elimination, "PROBE", 10**9)  # no probe: the full test alone
            b = hesse.engine(prob, "hessian", method="chain").factor(eps)
        assert False in verdicts  # the probe did reject a tier
        assert a.status.kinds == b.status.kinds and a.status.delayed == b.status.delayed
        assert a.inertia() == b.inertia()
        la, lb = a.logdet()[1], b.logdet()[1]
        assert abs(la - lb) <= 1e-12 * abs(lb)
    assert False in cholesky_verdicts  # the Cholesky probe rejected a tier too
    assert column_verdicts and all(column_verdicts)  # it ran, and its verdicts held above
    cholesky_verdicts.clear()
    with monkeypatch.context() as m:  # the GGN: positive semi-definite, every probe passes
        m.setattr(elimination.Elimination, "_cholesky_probe", staticmethod(cholesky_spy))
        a = hesse.engine(prob, "ggn", method="chain").factor(1e-3)
    with monkeypatch.context() as m:
        m.setattr(elimination, "PROBE", 10**9)
        b = hesse.engine(prob, "ggn", method="chain").factor(1e-3)
    assert cholesky_verdicts and all(cholesky_verdicts)
    assert a.status.kinds == b.status.kinds and abs(a.logdet()[1] - b.logdet()[1]) <= 1e-12 * abs(
        b.logdet()[1]
    )


def test_parameters_go_first_where_delayed_directions_join_a_stage():
    """Where a stage's pivot holds directions a later stage delayed and neither block
    tier takes the whole of it, the stage's own parameters are eliminated first, the
    delayed directions joining the state, and the delayed directions after them (design
    note (S8)). On the 32-stage SiLU chain that happens at several dampings, with
    Cholesky and Bunch-Kaufman first steps and Bunch-Kaufman and eigen second ones;
    there the sweep alone (no refinement) is backward stable and its log-determinant and
    inertia are those of ``torch.linalg`` on the dense Hessian."""
    case = _case(*_params(5))
    prob = hesse.Problem(case.model, case.loss_fn, (case.X, case.y))
    C = _dense(case, "hessian")
    P = len(C)
    ev = torch.linalg.eigvalsh(C)
    norm = float(ev.abs().max())
    u = torch.finfo(torch.float64).eps
    V = torch.randn(P, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    kinds = set()
    for rel in (1e-2, 3e-2, 1e-1, -1e-2):
        eps = rel * norm
        Ce = C + eps * torch.eye(P, dtype=torch.float64)
        f = hesse.engine(prob, "hessian", method="chain").factor(eps)
        split = {k for k in f.status.kinds if "+" in k}
        assert split, (rel, f.status.kinds)
        kinds |= split
        X = f.solve(V, max_refine=0)  # the sweep's own answer
        be = torch.linalg.vector_norm(Ce @ X - V, dim=0) / (
            (norm + abs(eps)) * torch.linalg.vector_norm(X, dim=0)
            + torch.linalg.vector_norm(V, dim=0)
        )
        assert float(be.max()) <= 64 * math.sqrt(P) * u, (rel, be)
        sign, la = torch.linalg.slogdet(Ce)
        mu = ev + eps
        backward = 64 * math.sqrt(P) * u * (norm + abs(eps))
        fs, fla = f.logdet()
        assert fs == float(sign)
        assert abs(fla - float(la)) <= 1e-10 * abs(float(la)) + float((backward / mu.abs()).sum())
        neg = int((mu < 0).sum())
        assert f.inertia() == (neg, 0, P - neg)
    firsts, seconds = {k.split("+")[0] for k in kinds}, {k.split("+")[1] for k in kinds}
    assert firsts == {"cholesky", "ldl"} and {"ldl", "eigen"} <= seconds, kinds


@pytest.mark.parametrize(("n", "a"), [(300, 1030), (256, 1024), (255, 1100), (400, 1000)])
def test_symmetric_product_is_the_product(n, a):
    """The Schur updates' ``C + alpha A^T B`` (`symmetric_product`) over the upper
    triangle's block rows, mirrored, where it is large, else the plain product: both
    within rounding of ``A^T B`` and of its transpose."""
    from hesse._factor.elimination import symmetric_product

    g = torch.Generator().manual_seed(n + a)
    A = torch.randn(n, a, generator=g, dtype=torch.float64)
    L = torch.randn(n, n, generator=g, dtype=torch.float64)
    B = (L @ L.T) @ A  # A^T B symmetric
    C = torch.randn(a, a, generator=g, dtype=torch.float64)
    C = C + C.T
    ref = C - 0.5 * (A.T @ B)
    tol = 1e-13 * float((A.abs().T @ B.abs()).max())
    for out in (symmetric_product(A, B, C.clone(), -0.5), C + symmetric_product(A, B, alpha=-0.5)):
        assert float((out - ref).abs().max()) <= tol
    U = symmetric_product(A, B)
    assert float((U - A.T @ B).abs().max()) <= tol
    assert float((U - U.T).abs().max()) <= tol


def _higham(n: int, g: torch.Generator, eps: float = 1e-6) -> torch.Tensor:
    """A symmetric indefinite ``(n, n)`` whose leading ``[[0, eps, 0], [eps, 0, 1],
    [0, 1, 1]]`` makes Bunch-Kaufman take a 2x2 pivot with a multiplier ``1 / eps``
    (its ``L`` is unbounded; Higham, *Accuracy and Stability*, section 11.1.1), the
    rest random with a zero block (more 2x2 pivots and interchanges)."""
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    A = A + A.T
    if n >= 8:
        A[3:5, 3:5] = 0.0
    if n >= 3:
        A[:3, :] = A[:, :3] = 0.0
        A[:3, :3] = torch.tensor([[0.0, eps, 0.0], [eps, 0.0, 1.0], [0.0, 1.0, 1.0]])
        A[2, 3:] = A[3:, 2] = 0.0
    return A


@pytest.mark.parametrize(
    ("n", "eps"), [(1, 0.5), (2, 0.5), (3, 1e-6), (9, 1e-6), (9, 0.5), (64, 1e-6), (257, 0.5)]
)
def test_bunch_kaufman_factor_reassembles_and_solves(n, eps):
    """`BunchKaufman.of` turns LAPACK's ``sytrf`` output into ``P^T A P = L D L^T``:
    entrywise within ``sytrf``'s own bound ``4 n u (|A| + |L| |D| |L^T|)`` (Higham, Thm.
    11.3), and its three half-steps solve ``A X = B`` with a normwise backward error of
    ``n u`` order, including where ``L`` holds a multiplier of ``1 / eps = 1e6``."""
    from hesse._factor.elimination import BunchKaufman

    g = torch.Generator().manual_seed(n)
    A = _higham(n, g, eps)
    LD, piv, info = torch.linalg.ldl_factor_ex(A)
    assert int(info) == 0
    bk = BunchKaufman.of(LD, piv)
    Dinv = torch.diag(bk.di) + torch.diag(bk.do, 1) + torch.diag(bk.do, -1)
    D = torch.linalg.inv(Dinv)
    u = torch.finfo(torch.float64).eps
    Ap = A[bk.perm][:, bk.perm]
    bound = 4 * n * u * (Ap.abs() + bk.L.abs() @ D.abs() @ bk.L.abs().T)
    assert bool(((Ap - bk.L @ D @ bk.L.T).abs() <= bound).all())
    assert sorted(bk.perm.tolist()) == list(range(n))
    if n >= 3:
        assert float(bk.L.abs().max()) >= 0.99 / eps  # the unbounded multiplier is there
    B = torch.randn(n, 4, generator=g, dtype=torch.float64)
    X = bk.back(bk.dinv(bk.half(B)))
    back = float((A @ X - B).norm() / (torch.linalg.matrix_norm(A) * X.norm() + B.norm()))
    assert back <= 8 * n * u, back
    M = bk.dinv(torch.eye(n, dtype=torch.float64), absolute=True)
    assert torch.equal(M, Dinv.abs())


def _stage(n: int, a: int, g: torch.Generator, pair: float | None):
    """A stage matrix ``M = [[Q_uu, Q_uz], [Q_zu, Q_zz]]`` with an indefinite ``Q_uu``.
    With ``pair`` its first two pivots are ``+pair`` and ``-pair`` coupled alike to the
    state: their updates cancel, so the update is small while Bunch-Kaufman's majorant
    ``|W|^T |D^-1| |W|`` is ``2 / pair``."""
    d = torch.rand(n, generator=g, dtype=torch.float64) + 1.0
    d[1::2] *= -1
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    Q_uz = 0.1 * torch.randn(n, a, generator=g, dtype=torch.float64)
    if pair is None:
        Q_uu = (Q * d) @ Q.T
    else:
        d[0], d[1] = pair, -pair
        Q_uu = torch.diag(d)
        Q_uz[0] = Q_uz[1] = 1.0
    Z = torch.randn(a, a, generator=g, dtype=torch.float64)
    return Q_uu, Q_uz, Z + Z.T + 4 * torch.eye(a, dtype=torch.float64)


@pytest.mark.parametrize(
    ("a", "pair", "own"), [(100, None, True), (5, None, True), (5, 1e-3, False), (100, 1e-3, False)]
)
def test_bunch_kaufman_tier_forms_its_update_or_leaves_it_to_lu(a, pair, own):
    """The Bunch-Kaufman tier forms its Schur update ``-W^T D^-1 W`` from its own factor
    where the majorant ``|W|^T |D^-1| |W|`` (the rounding's scale) stays within
    ``limit / TAU``, and from LU where cancellation makes it larger (a ``+-1e-3`` pivot
    pair coupled alike: majorant 2,000 for an update of order 1); with the probe
    (``a > 64``) and without. Either way the state ``S_zz`` and the solve of ``M y = -q``
    through `backward` and `forward` match dense float64 within their error bounds."""
    from hesse._factor.elimination import Elimination

    n = 13
    g = torch.Generator().manual_seed(a + n)
    Q_uu, Q_uz, Q_zz = _stage(n, a, g, pair)
    M = torch.cat([torch.cat([Q_uu, Q_uz], 1), torch.cat([Q_uz.T, Q_zz], 1)])
    S_ref = Q_zz - Q_uz.T @ torch.linalg.solve(Q_uu, Q_uz)
    e = Elimination(Q_uu, Q_uz, Q_zz.clone(), 1e-12, "test")
    assert e.kind == "ldl" and (e.bk is not None) == own and (e.LU is None) == own
    S = e.take_state().S_zz
    u = torch.finfo(torch.float64).eps
    # both sides' rounding: |Q_zz| and the update's majorant |Q_zu| |Q_uu^-1 Q_uz|
    K = torch.linalg.solve(Q_uu, Q_uz)
    scale = float(Q_zz.abs().max() + (Q_uz.abs().T @ K.abs()).max())
    assert float((S - S_ref).abs().max()) <= 4 * (n + a) * u * scale
    q = torch.randn(n + a, 3, generator=g, dtype=torch.float64)
    k, corr, s_d = e.backward(q[:n])
    assert s_d is None
    dz = torch.linalg.solve(S, -(q[n:] + corr))
    y = torch.cat([e.forward(k, dz, None), dz])
    norm = float(torch.linalg.matrix_norm(M, 2))
    backward = float((M @ y + q).norm() / (norm * y.norm() + q.norm()))
    assert backward <= 4 * (n + a) * u * max(1.0, scale / norm), backward


@pytest.mark.parametrize("own", [True, False])
def test_the_updates_column_probe_rejects_what_the_full_product_rejects(monkeypatch, own):
    """A Schur update whose diagonal stays within the limit while an off-diagonal entry
    does not: pivots ``+1`` and ``-1`` coupled to the state by ``c (e_j + e_l)`` and
    ``0.9 c (e_j - e_l)`` give ``U_jj = -0.19 c^2`` and ``U_jl = -1.81 c^2`` (``c = 10``:
    19 and 181 against the limit ``ref / TAU = 100``). The column probe
    (`_column_probe`, on the columns with the largest diagonal) rejects the tier before
    the full product, as the full test does without it, on Bunch-Kaufman's own route and
    (with a cancelling ``+-1e-3`` pair, ``own=False``) on LU's. The elimination then
    takes the eigen tier, which delays the two pivots; its state with them eliminated
    is the Schur complement of dense float64."""
    from hesse._factor import elimination

    n, a, j, l_, c = 15, 100, 7, 40, 10.0
    g = torch.Generator().manual_seed(3)
    Q_uu, Q_uz, Q_zz = _stage(n, a, g, 1e-3 if not own else None)
    Q_uu[-2:, :] = Q_uu[:, -2:] = 0.0
    Q_uu[-2, -2], Q_uu[-1, -1] = 1.0, -1.0
    Q_uz[-2:] = 0.0
    Q_uz[-2, [j, l_]] = c
    Q_uz[-1, j], Q_uz[-1, l_] = 0.9 * c, -0.9 * c
    S_ref = Q_zz - Q_uz.T @ torch.linalg.solve(Q_uu, Q_uz)
    U_ref = S_ref - Q_zz
    limit = float(max(Q_uu.abs().max(), Q_uz.abs().max(), Q_zz.abs().max())) / elimination.TAU
    diag = float(U_ref.diagonal().abs().max())
    assert diag <= 0.5 * limit < 1.5 * limit <= float(U_ref.abs().max())  # the case
    probe, verdicts, routes = elimination._column_probe, [], []
    lu_update = elimination.Elimination._lu_update

    def spy(*args):
        verdicts.append(probe(*args))
        return verdicts[-1]

    def lu_spy(self, *args):
        routes.append("lu")
        return lu_update(self, *args)

    with monkeypatch.context() as m:
        m.setattr(elimination, "_column_probe", spy)
        m.setattr(elimination.Elimination, "_lu_update", lu_spy)
        e = elimination.Elimination(Q_uu, Q_uz, Q_zz.clone(), 1e-12, "test")
    assert verdicts == [False] and routes == ([] if own else ["lu"])
    with monkeypatch.context() as m:
        m.setattr(elimination, "PROBE", 10**9)  # the full test alone
        f = elimination.Elimination(Q_uu, Q_uz, Q_zz.clone(), 1e-12, "test")
    assert e.kind == f.kind == "eigen" and e.num_delayed == f.num_delayed > 0
    # the state with its delayed directions eliminated is the whole Schur complement
    S = e.take_state()
    assert S.S_dz is not None and S.S_dd is not None
    S_full = S.S_zz - S.S_dz.T @ torch.linalg.solve(S.S_dd, S.S_dz)
    u = torch.finfo(torch.float64).eps
    K = torch.linalg.solve(Q_uu, Q_uz)
    scale = float(Q_zz.abs().max() + (Q_uz.abs().T @ K.abs()).max())
    assert float((S_full - S_ref).abs().max()) <= 8 * (n + a) * u * scale
