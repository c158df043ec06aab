"""Influence functions and per-sample gradients: against leave-one-out refits, dense
torch.linalg references and torch.func per-sample gradients."""

from __future__ import annotations

import pytest
import torch
from conftest import make_case, rel_err
from torch import Tensor, nn
from torch.func import functional_call, grad, hessian

import hesse


def _logistic(seed: int = 0, n: int = 50, d: int = 4) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g)
    w = torch.randn(d, generator=g)
    y = (torch.rand(n, generator=g) < torch.sigmoid(X @ w + 0.3)).double()
    Xt = torch.randn(8, d, generator=g)
    yt = (torch.rand(8, generator=g) < torch.sigmoid(Xt @ w + 0.3)).double()
    return X, y, Xt, yt


def _fit(X: Tensor, y: Tensor, lam: float, N: int, skip: int | None = None) -> Tensor:
    """Newton's method to convergence on (1/N) sum_{j != skip} l_j + lam/2 |theta|^2
    (theta = [w, b]); the leave-one-out objective keeps the 1/N of the full one."""
    keep = torch.ones(len(X), dtype=torch.bool)
    if skip is not None:
        keep[skip] = False
    Xa = torch.cat([X, torch.ones(len(X), 1)], 1)[keep]
    ya = y[keep]

    def obj(t: Tensor) -> Tensor:
        return (
            nn.functional.binary_cross_entropy_with_logits(Xa @ t, ya, reduction="sum") / N
            + 0.5 * lam * t @ t
        )

    t = torch.zeros(Xa.shape[1])
    for _ in range(50):
        gr = grad(obj)(t)
        if float(gr.norm()) < 1e-14:
            break
        t = t - torch.linalg.solve(hessian(obj)(t), gr)
    return t


def _spearman(a: Tensor, b: Tensor) -> float:
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def test_influence_predicts_leave_one_out_refits():
    X, y, Xt, yt = _logistic()
    N, lam = len(X), 1e-2
    theta = _fit(X, y, lam, N)
    model = nn.Linear(X.shape[1], 1).double()
    with torch.no_grad():
        model.weight.copy_(theta[:-1][None])
        model.bias.copy_(theta[-1:])
    prob = hesse.Problem(model, nn.BCEWithLogitsLoss(), (X, y[:, None]))
    res = hesse.influence(prob, (Xt, yt[:, None]), damping=lam)
    assert res.scores.shape == (len(Xt), N) and res.method in ("dense", "gram", "chain")

    def test_loss(t: Tensor, j: int) -> float:
        z = Xt[j] @ t[:-1] + t[-1]
        return float(nn.functional.binary_cross_entropy_with_logits(z, yt[j]))

    actual = torch.zeros(len(Xt), N)
    for i in range(N):
        t_i = _fit(X, y, lam, N, skip=i)
        for j in range(len(Xt)):
            actual[j, i] = test_loss(t_i, j) - test_loss(theta, j)
    for j in range(len(Xt)):
        pearson = float(torch.corrcoef(torch.stack([res.scores[j], actual[j]]))[0, 1])
        assert pearson > 0.95, (j, pearson)
        assert _spearman(res.scores[j], actual[j]) > 0.95
    # the sign convention: where the refit raises a test loss, the score is positive
    big = actual.abs() > 0.2 * actual.abs().max()
    assert bool((torch.sign(res.scores[big]) == torch.sign(actual[big])).all())
    # the most helpful / harmful by the scores are among the refits' (near ties aside)
    helpful, harmful = hesse.top_influences(res.scores, k=3)
    assert helpful.shape == harmful.shape == (len(Xt), 3)
    for j in range(len(Xt)):
        assert float(actual[j, helpful[j, 0]]) >= 0.8 * float(actual[j].max())
        assert float(actual[j, harmful[j, 0]]) <= 0.8 * float(actual[j].min())


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_scores_equal_dense_references(curvature, loss):
    case = make_case("mlp-tanh", loss, seed=4)
    prob = hesse.Problem(case.model, case.loss_fn, (case.X, case.y))
    eps = 0.05
    g = torch.Generator().manual_seed(9)
    Xt = torch.randn(3, case.X.shape[1], generator=g)
    yt = torch.randint(0, 3, (3,), generator=g) if loss == "ce" else torch.randn(3, 3, generator=g)
    res = hesse.influence(prob, (Xt, yt), damping=eps, curvature=curvature)
    names = [n for n, _ in case.model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in case.model.parameters()])
    shapes = [p.shape for p in case.model.parameters()]

    def params_of(flat: Tensor) -> dict[str, Tensor]:
        out, i = {}, 0
        for n, s in zip(names, shapes, strict=True):
            k = int(torch.tensor(s).prod())
            out[n] = flat[i : i + k].reshape(s)
            i += k
        return out

    def point_loss(flat: Tensor, x: Tensor, t: Tensor) -> Tensor:
        return case.loss_fn(functional_call(case.model, params_of(flat), (x[None],)), t[None])

    def objective(flat: Tensor) -> Tensor:
        return case.loss_fn(functional_call(case.model, params_of(flat), (case.X,)), case.y)

    C = hesse.hessian(prob) if curvature == "hessian" else hesse.ggn(prob)
    A = C + eps * torch.eye(len(theta))
    N = len(case.X)
    Gtr = torch.stack([grad(point_loss)(theta, x, t) for x, t in zip(case.X, case.y, strict=True)])
    Gte = torch.stack([grad(point_loss)(theta, x, t) for x, t in zip(Xt, yt, strict=True)])
    ref = Gte @ torch.linalg.solve(A, Gtr.T) / N  # t_i = l_i / N for a mean objective
    assert rel_err(res.scores, ref) <= 1e-10
    assert torch.allclose(Gtr.sum(0) / N, grad(objective)(theta), rtol=1e-10, atol=1e-13)
    selfs = hesse.self_influence(prob, damping=eps, curvature=curvature)
    assert rel_err(selfs, (Gtr * torch.linalg.solve(A, Gtr.T).T).sum(1) / N) <= 1e-10


def test_per_sample_gradients_sum_to_the_gradient_for_both_reductions_and_any_input():
    for reduction in ("mean", "sum"):
        case = make_case("cnn", "mse", seed=1)
        case.loss_fn.reduction = reduction
        prob = hesse.Problem(case.model, case.loss_fn, case.batches([3, 4]))
        G = hesse.per_sample_gradients(prob)
        assert G.shape == (len(case.X), prob.num_params)
        assert torch.allclose(G.sum(0), hesse.gradient(prob), rtol=1e-10, atol=1e-13)
        chunks = list(hesse.per_sample_gradient_chunks(prob))
        assert [c.shape[0] for c in chunks] == [3, 4]

    class Branchy(nn.Module):  # data-dependent control flow: vmap cannot, the loop does
        def __init__(self) -> None:
            super().__init__()
            self.l = nn.Linear(3, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.l(x) if float(x.sum()) > -100 else -self.l(x)

    m = Branchy().double()
    X, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
    prob = hesse.Problem(m, nn.CrossEntropyLoss(), (X, y))
    G = hesse.per_sample_gradients(prob)
    assert torch.allclose(G.sum(0), hesse.gradient(prob), rtol=1e-10, atol=1e-13)


def test_influence_refuses_bad_input():
    case = make_case("mlp-tanh", "ce")
    prob = hesse.Problem(case.model, case.loss_fn, (case.X, case.y))
    with pytest.raises(ValueError, match="damping must be a finite number"):
        hesse.influence(prob, (case.X, case.y), damping=float("nan"))
    with pytest.raises(ValueError, match="curvature must be"):
        hesse.influence(prob, (case.X, case.y), curvature="fisher")
    with pytest.raises(RuntimeError, match="mat1 and mat2|shapes"):
        hesse.influence(prob, (torch.randn(3, 9), case.y[:3]), damping=0.1)
    with pytest.raises(ValueError, match="k = 9 is more than"):
        hesse.top_influences(torch.zeros(2, 4), k=9)


def test_no_engine_fits_then_krylov_with_the_residual_said(monkeypatch):
    import hesse._apps.influence as inf

    case = make_case("mlp-tanh", "mse", seed=2)
    prob = hesse.Problem(case.model, case.loss_fn, (case.X, case.y))
    exact = hesse.influence(prob, (case.X[:2], case.y[:2]), damping=0.5, curvature="ggn")

    def refuse(*_a, **_k):
        raise hesse.MemoryBudgetError("no exact engine fits the memory budget (test)")

    monkeypatch.setattr(inf, "factorize", refuse)
    res = hesse.influence(prob, (case.X[:2], case.y[:2]), damping=0.5, curvature="ggn")
    assert res.method == "cg" and res.residual <= 1e-9
    assert rel_err(res.scores, exact.scores) <= 1e-7
    with pytest.raises(hesse.MemoryBudgetError):  # a named engine is not replaced
        hesse.influence(prob, (case.X[:2], case.y[:2]), damping=0.5, method="dense")


def test_more_pairs_than_fit_are_refused_up_front(monkeypatch):
    from hesse._util import memory

    case = make_case("mlp-tanh", "ce")
    prob = hesse.Problem(case.model, case.loss_fn, (case.X, case.y))
    monkeypatch.setattr(memory, "available_memory", lambda device="cpu": 1000)
    with pytest.raises(hesse.MemoryBudgetError, match="influence of 7 training points"):
        hesse.influence(prob, (case.X, case.y), damping=0.1)
    with pytest.raises(hesse.MemoryBudgetError, match="per-sample gradients"):
        hesse.per_sample_gradients(prob)
