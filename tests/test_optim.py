"""The optimisers and their parts."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from conftest import closure_of
from torch import nn

import hesse
from hesse.optim import (
    armijo,
    cg_backtrack,
    lm_damping,
    truncated_cg,
    trust_region_subproblem,
)


# ----------------------------------------------------------------------------- parts
def _spd(n: int, seed: int, cond: float = 1e3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    ev = torch.logspace(0, math.log10(cond), n)
    return Q @ torch.diag(ev) @ Q.T


@pytest.mark.parametrize("n", [5, 17, 40])
def test_cg_matches_dense_solve(n):
    A = _spd(n, n)
    b = torch.randn(n, generator=torch.Generator().manual_seed(1))
    ref = torch.linalg.solve(A, b)
    # cond(A) = 1e3: a relative residual of 1e-12 bounds the relative error by 1e-9, and
    # the dense reference is accurate to about cond * u = 2e-13
    for kw in ({}, {"precond": torch.diagonal(A)}, {"x0": 0.3 * ref}):
        res = truncated_cg(lambda v: A @ v, b, max_iter=10 * n, progress_tol=0.0, rtol=1e-12, **kw)
        assert res.reason == "residual", res.reason  # the progress rule is off
        assert float((b - A @ res.x).norm()) <= 1e-11 * float(b.norm())  # true residual
        assert float((res.x - ref).norm()) <= 1e-8 * float(ref.norm())
        assert res.phi == pytest.approx(float(-0.5 * b @ ref), rel=1e-9)


def test_cg_progress_tol_zero_never_stops_on_progress():
    # phi rises by rounding once converged: with the rule off, only the residual or
    # max_iter may stop CG, whatever the machine's rounding
    A = _spd(30, 4)
    b = torch.randn(30, generator=torch.Generator().manual_seed(5))
    # 90 iterations (3 n): converged long before, the recursive residual still above 0
    res = truncated_cg(lambda v: A @ v, b, max_iter=90, progress_tol=0.0, rtol=0.0)
    assert res.reason == "max_iter" and res.iterations == 90


def test_cg_progress_rule_and_iterates():
    A = _spd(200, 3, cond=1e6)
    b = torch.randn(200, generator=torch.Generator().manual_seed(2))
    eps = 5e-4
    res = truncated_cg(lambda v: A @ v, b, max_iter=2000, progress_tol=eps)
    assert res.reason == "progress"
    i = res.iterations
    k = max(10, int(0.1 * i))
    earlier = truncated_cg(lambda v: A @ v, b, max_iter=i - k, progress_tol=0.0, rtol=0.0)
    assert res.phi < 0 and (res.phi - earlier.phi) / res.phi < k * eps  # the rule held
    longer = truncated_cg(lambda v: A @ v, b, max_iter=2000, progress_tol=0.0, rtol=1e-12)
    assert longer.iterations > i  # and without it CG would have gone on
    kept = [i for i, _ in res.iterates]
    assert kept[-1] == res.iterations and kept == sorted(kept)
    assert set(kept[:-1]) <= {math.ceil(1.3**j) for j in range(60)}
    # negative curvature: stop and keep the iterate so far
    M = torch.diag(torch.tensor([1.0, 2.0, -1.0]))
    neg = truncated_cg(lambda v: M @ v, torch.ones(3))
    assert neg.reason == "negative curvature"


def test_backtracking_line_search_and_damping():
    its = [
        (1, torch.tensor([1.0])),
        (2, torch.tensor([2.0])),
        (3, torch.tensor([3.0])),
        (4, torch.tensor([4.0])),
    ]
    f = lambda x: float((x - 2.2) ** 2)  # noqa: E731
    x, fx, i = cg_backtrack(its, f)
    assert i == 2 and float(x) == 2.0 and fx == pytest.approx(0.04)
    alpha, fa = armijo(lambda a: (a - 0.3) ** 2, f0=0.09, slope=-0.6)
    assert 0 < alpha <= 1 and fa <= 0.09 + 1e-2 * alpha * -0.6
    assert armijo(lambda a: 1.0 + a, f0=1.0, slope=-1.0) == (0.0, 1.0)  # no descent: no step
    assert lm_damping(1.0, 0.1) == 1.5 and lm_damping(1.0, 0.9) == pytest.approx(2 / 3)
    assert lm_damping(1.0, 0.5) == 1.0 and lm_damping(1.0, float("nan")) == 1.5


class _Dense:
    """A dense backend for the trust-region solver: the reference."""

    def __init__(self, C: torch.Tensor, lam: float) -> None:
        self.M = C + lam * torch.eye(len(C))

    def solve(self, v):
        return torch.linalg.solve(self.M, v)

    def inertia(self):
        ev = torch.linalg.eigvalsh(self.M)
        tol = 1e-12 * float(ev.abs().max())
        return int((ev < -tol).sum()), int((ev.abs() <= tol).sum()), int((ev > tol).sum())


def _smallest_dense(C):
    ev, U = torch.linalg.eigh(C)
    return float(ev[0]), U[:, 0]


def _assert_more_sorensen(C, g, radius, res, tol=1e-7):
    d, lam = res.step, res.lam
    ev = torch.linalg.eigvalsh(C)
    assert lam >= -1e-12
    assert float(d.norm()) <= radius * (1 + tol)
    assert float(((C + lam * torch.eye(len(C))) @ d + g).norm()) <= tol * float(g.norm())
    assert abs(lam * (radius - float(d.norm()))) <= tol * max(1.0, lam) * radius
    assert lam + float(ev[0]) >= -1e-8 * float(ev.abs().max())  # C + lam I is PSD
    # global optimality: no better point on a dense sample of the ball's boundary/interior
    m = float(g @ d + 0.5 * d @ C @ d)
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        z = torch.randn(len(g), generator=gen)
        z = z / z.norm() * radius * float(torch.rand(1, generator=gen)) ** 0.1
        assert m <= float(g @ z + 0.5 * z @ C @ z) + 1e-10


def _reference_tr(C, g, radius):
    """Exact solution through the eigendecomposition (secular equation by bisection)."""
    ev, U = torch.linalg.eigh(C)
    gt = U.T @ g
    if ev[0] > 0 and float((gt / ev).norm()) <= radius:
        return -U @ (gt / ev)
    lo, hi = max(0.0, -float(ev[0])) + 1e-14, max(0.0, -float(ev[0])) + float(g.norm()) / radius + 1
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if float((gt / (ev + mid)).norm()) > radius:
            lo = mid
        else:
            hi = mid
    return -U @ (gt / (ev + hi))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("radius", [0.05, 0.5, 5.0])
def test_trust_region_easy_and_interior(seed, radius):
    n = 12
    g_ = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g_)
    C = A + A.T  # indefinite
    g = torch.randn(n, generator=g_)
    res = trust_region_subproblem(g, radius, lambda s: _Dense(C, s), lambda: _smallest_dense(C))
    assert not res.hard_case
    _assert_more_sorensen(C, g, radius, res)
    assert torch.allclose(res.step, _reference_tr(C, g, radius), atol=1e-7)
    # positive definite C and a large radius: the interior Newton step
    P = _spd(n, seed)
    res = trust_region_subproblem(g, 1e6, lambda s: _Dense(P, s), lambda: _smallest_dense(P))
    assert res.lam == 0.0 and torch.allclose(res.step, -torch.linalg.solve(P, g), atol=1e-10)


def test_trust_region_hard_case():
    n = 8
    ev = torch.tensor([-2.0, -0.5, 0.3, 1.0, 1.5, 2.0, 3.0, 4.0])
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(3)))
    C = Q @ torch.diag(ev) @ Q.T
    g = Q[:, 1:] @ torch.randn(n - 1, generator=torch.Generator().manual_seed(4))  # g ⊥ u_1
    radius = 10.0  # larger than |(C + 2 I)^+ g|: the hard case
    res = trust_region_subproblem(g, radius, lambda s: _Dense(C, s), lambda: _smallest_dense(C))
    assert res.hard_case and res.lam == pytest.approx(2.0)
    assert float(res.step.norm()) == pytest.approx(radius, rel=1e-8)
    _assert_more_sorensen(C, g, radius, res, tol=1e-6)


def _mlp_problem(seed=0, n=6):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    X, y = torch.randn(n, 3, generator=g), torch.randint(0, 3, (n,), generator=g)
    return model, nn.CrossEntropyLoss(), X, y


@pytest.mark.parametrize("radius", [0.01, 0.3, 100.0])
def test_trust_region_with_the_chain_backend(radius):
    model, lf, X, y = _mlp_problem(1)
    prob = hesse.Problem(model, lf, (X, y))
    H = hesse.hessian(prob)
    g = hesse.gradient(prob)
    res = chain_trust_region(prob, model, lf, g, radius)
    _assert_more_sorensen(H, g, radius, res, tol=1e-6)
    assert torch.allclose(res.step, _reference_tr(H, g, radius), atol=1e-6)


def chain_trust_region(prob, model, lf, g, radius):
    """The exact trust-region step of the Hessian model, as ChainNewton takes it: chain
    factorisations of ``H + lam I`` and ChainNewton's smallest eigenpair."""
    opt = hesse.optim.ChainNewton(model, lf, curvature="hessian", trust_region=radius)
    return trust_region_subproblem(
        g,
        radius,
        lambda s: hesse.factorize(prob, s, "hessian"),
        lambda: opt._smallest(prob, "hessian"),
    )


# ----------------------------------------------------------------------------- optimisers
_closure = closure_of


def _least_squares():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(30, 5, generator=g)
    y = X @ torch.randn(5, 2, generator=g) + 0.1 * torch.randn(30, 2, generator=g)
    Xa = torch.cat([X, torch.ones(30, 1)], 1)
    sol = torch.linalg.lstsq(Xa, y).solution  # (6, 2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 2)).double()
    return model, nn.MSELoss(), X, y, torch.cat([sol[:5].T.reshape(-1), sol[5]])


@pytest.mark.parametrize("which", ["hf", "chain"])
def test_convex_quadratic_converges(which):
    model, lf, X, y, ref = _least_squares()
    if which == "hf":
        opt = hesse.optim.HessianFree(model, lf, damping=1e-6)
        step = lambda c: opt.step(c, curvature_batch=(X, y))  # noqa: E731
    else:
        opt = hesse.optim.ChainNewton(model, lf, damping=1e-10)
        step = lambda c: opt.step(c, curvature_batch=(X, y))  # noqa: E731
    for _ in range(3):
        step(_closure(opt, model, lf, X, y))
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert float((theta - ref).norm()) <= 1e-8 * float(ref.norm())


def _logistic():
    """Binary logistic regression on non-separable data: a unique minimiser (the
    two-class softmax version has a singular Hessian: shifting both logits is free)."""
    g = torch.Generator().manual_seed(5)
    X = torch.randn(60, 3, generator=g)
    p = torch.sigmoid(X @ torch.tensor([1.5, -0.7, 0.4]) + 0.2)
    y = (torch.rand(60, generator=g) < p).double().unsqueeze(1)
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(3, 1)).double(), nn.BCEWithLogitsLoss(), X, y


def _logistic_minimiser(model, lf, X, y):
    m = copy.deepcopy(model)
    prob = hesse.Problem(m, lf, (X, y))
    for _ in range(40):  # damped-free Newton with the dense reference solve
        g = hesse.gradient(prob)
        d = hesse.solve(prob, -g, 1e-12, "hessian", method="dense")
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(
                torch.nn.utils.parameters_to_vector(m.parameters()) + d, m.parameters()
            )
    assert float(hesse.gradient(prob).norm()) < 1e-12
    return torch.nn.utils.parameters_to_vector(m.parameters()).detach()


def test_logistic_regression_newton_is_quadratic():
    model, lf, X, y = _logistic()
    ref = _logistic_minimiser(model, lf, X, y)
    opt = hesse.optim.ChainNewton(model, lf, curvature="hessian", damping=0.0, adapt_damping=False)
    errs = []
    for _ in range(8):
        opt.step(_closure(opt, model, lf, X, y), curvature_batch=(X, y))
        theta = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
        errs.append(float((theta - ref).norm()))
    assert errs[-1] < 1e-12
    # quadratic convergence: e_{k+1} <= C e_k^2 once close
    close = [(a, b) for a, b in itertools.pairwise(errs) if 1e-6 < a < 1e-1]  # above rounding
    assert close and all(b <= 10 * a * a for a, b in close)


def test_logistic_regression_hf_converges():
    model, lf, X, y = _logistic()
    ref = _logistic_minimiser(model, lf, X, y)
    opt = hesse.optim.HessianFree(model, lf, damping=1e-3, preconditioner="martens")
    for _ in range(25):
        opt.step(_closure(opt, model, lf, X, y), curvature_batch=(X, y))
    theta = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    assert float((theta - ref).norm()) < 1e-6
    assert opt.param_groups[0]["step"] == 25 and opt.last["cg_iterations"] >= 1


def test_saddle_free_uses_abs_of_the_top_eigenpairs():
    """The step is -V (|Lambda| + lam)^-1 V^T g on the k eigenpairs of largest
    magnitude (Lanczos), checked against the dense eigendecomposition."""
    model, lf, X, y = _mlp_problem(2)
    prob = hesse.Problem(model, lf, (X, y))
    H, g = hesse.hessian(prob), hesse.gradient(prob)
    ev, U = torch.linalg.eigh(H)
    k, lam = 5, 0.1
    top = torch.argsort(ev.abs(), descending=True)[:k]
    V, L = U[:, top], ev[top]
    assert (L < 0).any()  # negative curvature among them: |H| differs from H
    ref = -V @ ((V.T @ g) / (L.abs() + lam))
    theta0 = prob.param_vector()
    opt = hesse.optim.ChainNewton(
        model, lf, damping=lam, saddle_free=k, adapt_damping=False, line_search=False
    )
    opt.step(_closure(opt, model, lf, X, y), curvature_batch=(X, y))
    step = torch.nn.utils.parameters_to_vector(model.parameters()).detach() - theta0
    assert opt.last["alpha"] == 1.0
    assert torch.allclose(step, ref, atol=1e-7)


def test_trust_region_optimiser_decreases_the_loss():
    model, lf, X, y = _mlp_problem(3, n=8)
    opt = hesse.optim.ChainNewton(model, lf, curvature="hessian", trust_region=0.5)
    losses = []
    for _ in range(6):
        losses.append(float(opt.step(_closure(opt, model, lf, X, y), curvature_batch=(X, y))))
    assert losses[-1] < losses[0]
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(losses))


def test_state_dict_round_trip():
    model, lf, X, y = _mlp_problem(4, n=10)
    twin = copy.deepcopy(model)
    opt = hesse.optim.HessianFree(model, lf, damping=0.5)
    for _ in range(2):
        opt.step(_closure(opt, model, lf, X, y), curvature_batch=(X, y))
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    opt.step(_closure(opt, model, lf, X, y), curvature_batch=(X, y))
    expected = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    twin.load_state_dict(saved_model)
    opt2 = hesse.optim.HessianFree(twin, lf)
    opt2.load_state_dict(saved_opt)
    assert opt2.param_groups[0]["damping"] == saved_opt["param_groups"][0]["damping"]
    opt2.step(_closure(opt2, twin, lf, X, y), curvature_batch=(X, y))
    assert torch.equal(torch.nn.utils.parameters_to_vector(twin.parameters()).detach(), expected)


def test_bad_input_and_non_finite():
    model, lf, X, y = _mlp_problem(5)
    opt = hesse.optim.HessianFree(model, lf)
    with pytest.raises(TypeError, match="closure must return the loss"):
        opt.step(lambda: 3.0, curvature_batch=(X, y))
    with pytest.raises(ValueError, match=r"needs curvature_batch=\(inputs, targets\)"):
        opt.step(_closure(opt, model, lf, X, y))
    theta = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    d0 = opt.param_groups[0]["damping"]

    def nan_closure():
        opt.zero_grad()
        loss = lf(model(X), y) * float("nan")
        loss.backward()
        return loss

    with pytest.warns(UserWarning, match="non-finite loss at step 0; step skipped"):
        opt.step(nan_closure, curvature_batch=(X, y))
    assert opt.param_groups[0]["skipped"] == 1 and opt.param_groups[0]["damping"] == 10 * d0
    assert torch.equal(torch.nn.utils.parameters_to_vector(model.parameters()).detach(), theta)
    frozen = copy.deepcopy(model)
    frozen[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match="parameter '0.weight' does not require grad"):
        hesse.optim.HessianFree(frozen, lf, params=["0.weight"])
    with pytest.raises(ValueError, match="needs an nn.Sequential"):
        hesse.optim.ChainNewton(nn.Linear(3, 3), lf)
    with pytest.raises(ValueError, match="curvature must be"):
        hesse.optim.HessianFree(model, lf, curvature="fisher")
    other = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    with pytest.raises(ValueError):  # a state from another model's optimiser
        hesse.optim.HessianFree(other, lf).load_state_dict(
            hesse.optim.HessianFree(nn.Sequential(nn.Linear(3, 3)).double(), lf).state_dict()
        )


class _NanGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


@pytest.mark.parametrize("which", ["hf", "chain"])
def test_non_finite_gradient_is_skipped(which):
    model, lf, X, y = _mlp_problem(6)
    theta = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    if which == "hf":
        opt = hesse.optim.HessianFree(model, lf)
        kw = {"curvature_batch": (X, y)}
    else:
        opt = hesse.optim.ChainNewton(model, lf)
        kw = {"curvature_batch": (X, y)}

    def closure():
        opt.zero_grad()
        loss = lf(_NanGrad.apply(model(X)), y)  # a finite loss with an infinite gradient
        loss.backward()
        return loss

    with pytest.warns(UserWarning, match="non-finite gradient at step 0; step skipped"):
        opt.step(closure, **kw)
    assert opt.param_groups[0]["skipped"] == 1 and opt.last == {"skipped": True}
    assert torch.equal(torch.nn.utils.parameters_to_vector(model.parameters()).detach(), theta)


# ------------------------------------------------------------------ torch.optim conventions
@pytest.mark.parametrize(
    ("radius", "rho", "norm", "expected"),
    [
        (1.0, 0.1, 0.5, (0.25, True)),  # over-promised: shrink, but rho > 1e-4 accepts
        (1.0, 1e-5, 0.5, (0.25, False)),  # barely any decrease: shrink and reject
        (1.0, float("nan"), 1.0, (0.25, False)),  # no prediction: shrink and reject
        (1.0, 0.9, 1.0, (2.0, True)),  # a good step on the boundary: grow
        (1.0, 0.9, 0.5, (1.0, True)),  # a good step inside: keep
        (1.0, 0.5, 1.0, (1.0, True)),  # between the thresholds: keep
        (600.0, 0.9, 600.0, (1000.0, True)),  # growth capped at max_radius
        (1.0, -2.0, 1.0, (0.25, False)),  # the loss went up
    ],
)
def test_trust_radius_update(radius, rho, norm, expected):
    assert hesse.optim.trust_radius_update(radius, rho, norm, max_radius=1e3) == expected


def _objective_gradient(model, lf, X, y, wd):
    prob = hesse.Problem(model, lf, (X, y))
    theta = prob.param_vector()
    return hesse.gradient(prob) + wd * theta


@pytest.mark.parametrize("which", ["hf", "chain"])
def test_l2_weight_decay_reaches_the_regularised_minimiser(which):
    """L2 weight decay is part of the objective, its gradient and its curvature: on least
    squares the optimisers reach the point where ``grad L + wd theta = 0`` (ridge)."""
    model, lf, X, y, _ref = _least_squares()
    wd = 0.05
    if which == "hf":
        opt = hesse.optim.HessianFree(model, lf, damping=1e-6, weight_decay=wd)
    else:
        opt = hesse.optim.ChainNewton(model, lf, damping=1e-10, weight_decay=wd)
    for _ in range(4):
        opt.step(_closure(opt, model, lf, X, y), curvature_batch=(X, y))
    g = _objective_gradient(model, lf, X, y, wd)
    assert float(g.norm()) < 1e-9


def test_parameter_groups_set_their_own_weight_decay():
    model, lf, X, y, _ref = _least_squares()
    lin = model[0]
    groups = [
        {"params": [lin.weight], "weight_decay": 0.1},
        {"params": [lin.bias], "weight_decay": 0.0},
    ]
    opt = hesse.optim.HessianFree(groups, model=model, loss_fn=lf, damping=1e-6)
    for _ in range(4):
        opt.step(_closure(opt, model, lf, X, y), curvature_batch=(X, y))
    prob = hesse.Problem(model, lf, (X, y))
    wd = torch.cat([torch.full((lin.weight.numel(),), 0.1), torch.zeros(lin.bias.numel())])
    g = hesse.gradient(prob) + wd.double() * prob.param_vector()
    assert float(g.norm()) < 1e-9
    with pytest.raises(ValueError, match="one weight_decay for every parameter"):
        hesse.optim.ChainNewton(groups, model=model, loss_fn=lf)


def test_decoupled_weight_decay_shrinks_after_the_step():
    model, lf, X, y = _mlp_problem(7, n=10)
    twin = copy.deepcopy(model)
    theta0 = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    wd = 0.01
    opt = hesse.optim.ChainNewton(model, lf, weight_decay=wd, decoupled_weight_decay=True)
    opt.step(_closure(opt, model, lf, X, y), curvature_batch=(X, y))
    plain = hesse.optim.ChainNewton(twin, lf)
    plain.step(_closure(plain, twin, lf, X, y), curvature_batch=(X, y))
    got = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    without = torch.nn.utils.parameters_to_vector(twin.parameters()).detach()
    assert torch.allclose(got, without - wd * theta0, atol=1e-12, rtol=0)


def test_torch_style_construction_takes_the_same_steps():
    model, lf, X, y = _mlp_problem(8, n=10)
    twin = copy.deepcopy(model)
    a = hesse.optim.HessianFree(model, lf)
    b = hesse.optim.HessianFree(twin.parameters(), model=twin, loss_fn=lf)
    for _ in range(2):
        a.step(_closure(a, model, lf, X, y), curvature_batch=(X, y))
        b.step(_closure(b, twin, lf, X, y), curvature_batch=(X, y))
    assert torch.equal(
        torch.nn.utils.parameters_to_vector(model.parameters()),
        torch.nn.utils.parameters_to_vector(twin.parameters()),
    )


def test_optimiser_conventions_refused_clearly():
    model, lf, X, y = _mlp_problem(9)
    with pytest.raises(TypeError, match="pass the model as model="):
        hesse.optim.HessianFree(model.parameters(), lf)
    with pytest.raises(ValueError, match="a group may set only 'weight_decay'"):
        hesse.optim.HessianFree(
            [{"params": model.parameters(), "lr": 0.1}], model=model, loss_fn=lf
        )
    stranger = torch.nn.Linear(2, 2).double()
    with pytest.raises(ValueError, match="the model's own parameters"):
        hesse.optim.HessianFree(model, lf, params=[stranger.weight])
    with pytest.raises(ValueError, match="weight_decay must be"):
        hesse.optim.HessianFree(model, lf, weight_decay=-1.0)
    opt = hesse.optim.ChainNewton(model, lf)
    with pytest.warns(DeprecationWarning, match="curvature_batch"):
        opt.step(_closure(opt, model, lf, X, y), batch=(X, y))


@pytest.mark.parametrize("method", ["auto", "dense", "chain"])
def test_one_trust_region_step_prepares_the_curvature_once(method, monkeypatch):
    # the trust-region solve factors H + lam I for many lam and finds the smallest
    # eigenpair by counts: all on one engine (and "auto" builds the chain once)
    from hesse._chain.chain import Chain
    from hesse._linalg import factorize as fz

    model, lf, X, y = _mlp_problem(3, n=8)
    builds, chains = [], []
    real_build, real_from = fz._build, Chain.from_problem
    monkeypatch.setattr(fz, "_build", lambda *a, **k: builds.append(a[2]) or real_build(*a, **k))
    monkeypatch.setattr(
        Chain, "from_problem", lambda *a, **k: chains.append(1) or real_from(*a, **k)
    )
    opt = hesse.optim.ChainNewton(model, lf, curvature="hessian", trust_region=0.05, method=method)
    opt.step(_closure(opt, model, lf, X, y), curvature_batch=(X, y))
    assert opt.last["rho"] == opt.last["rho"]  # a step was taken
    assert len(builds) == 1, builds
    assert len(chains) <= 1


@pytest.mark.parametrize("kind", ["hf", "newton"])
def test_a_layer_replaced_between_steps_is_refused(kind):
    """After ``model[0] = nn.Linear(...)`` the optimiser holds the old tensors: a step
    would move them while the curvature came from the new layer (which would never
    move). The step refuses, naming the parameters, and leaves the model as it was."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    X, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    loss_fn = nn.MSELoss()
    opt = (
        hesse.optim.HessianFree(model, loss_fn)
        if kind == "hf"
        else hesse.optim.Newton(model, loss_fn, damping=1.0)
    )

    def closure():
        opt.zero_grad()
        loss = loss_fn(model(X), y)
        loss.backward()
        return loss

    opt.step(closure, curvature_batch=(X, y))  # a step on the original model works
    model[0] = nn.Linear(3, 4).double()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"\['0.weight', '0.bias'\] are not the tensors"):
        opt.step(closure, curvature_batch=(X, y))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
