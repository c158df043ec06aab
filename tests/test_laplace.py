"""hesse.Laplace against laplace-torch's FullLaplace, an independent observation-space
reference, finite differences and autograd through a dense slogdet."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from conftest import rel_err
from torch import Tensor, nn
from torch.func import functional_call, jacrev
from torch.utils.data import DataLoader, TensorDataset

import hesse

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from laplace import Laplace as PeerLaplace

METHODS = ("dense", "gram", "chain")


def _toy(likelihood: str, seed: int = 711) -> tuple[nn.Module, Tensor, Tensor]:
    """laplace-torch's own test model and data: Sequential(Linear(3, 20), Linear(20, 2)),
    10 points."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 20), nn.Linear(20, 2))
    X = torch.randn(10, 3)
    y = torch.randint(0, 2, (10,)) if likelihood == "classification" else torch.randn(10, 2)
    return model, X, y


def _peer(model, likelihood, X, y, sigma, prior) -> PeerLaplace:
    la = PeerLaplace(
        model,
        likelihood,
        subset_of_weights="all",
        hessian_structure="full",
        sigma_noise=sigma,
        prior_precision=prior,
    )
    la.fit(DataLoader(TensorDataset(X, y), batch_size=3))
    return la


def _close(a: float, b: float, rtol: float = 1e-9) -> bool:
    return abs(a - b) <= rtol * max(1.0, abs(b))


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_evidence_and_predictive_equal_full_laplace(likelihood):
    model, X, y = _toy(likelihood)
    sigma = 1.0 if likelihood == "classification" else 0.3
    peer = _peer(model, likelihood, X, y, sigma, 0.7)
    Xt = torch.randn(6, 3, generator=torch.Generator().manual_seed(1))
    layerwise = [0.5, 1.5, 2.0, 0.3]
    for method in METHODS:
        la = hesse.Laplace(
            model, likelihood, (X, y), sigma_noise=sigma, prior_precision=0.7, method=method
        )
        peer.prior_precision = 0.7
        assert _close(la.log_marginal_likelihood(), float(peer.log_marginal_likelihood()))
        assert _close(la.log_det_posterior_precision(), float(peer.log_det_posterior_precision))
        assert _close(la.scatter(), float(peer.scatter))
        # layer-wise prior precision: a sequence in named_parameters() order, or a dict
        ev = float(peer.log_marginal_likelihood(torch.tensor(layerwise)))
        assert _close(la.log_marginal_likelihood(layerwise), ev)
        named = dict(zip(la.problem.names, layerwise, strict=True))
        assert _close(la.log_marginal_likelihood(named), ev)
        # per parameter
        diag = 0.2 + torch.rand(la.n_params, generator=torch.Generator().manual_seed(3))
        assert _close(la.log_marginal_likelihood(diag), float(peer.log_marginal_likelihood(diag)))
        # the GLM predictive
        la.prior_precision = 0.7
        peer.prior_precision = 0.7
        if likelihood == "classification":
            assert rel_err(la.predictive(Xt), peer(Xt, link_approx="probit")) <= 1e-10
        else:
            f, var = la.predictive(Xt)
            pf, pvar = peer(Xt)
            assert rel_err(f, pf) <= 1e-12 and rel_err(var, pvar) <= 1e-10
            fj, cov = la.predictive(Xt, joint=True)
            pfj, pcov = peer(Xt, joint=True)
            assert rel_err(fj, pfj) <= 1e-12 and rel_err(cov, pcov) <= 1e-10


def _sine(seed: int = 0) -> tuple[nn.Module, Tensor, Tensor]:
    """laplace-torch's regression example: a 1-50-1 tanh MLP on 150 noisy sines,
    trained briefly (the evidence is a function of any point; a trained one is the case
    users have)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    X = (torch.rand(150, 1, generator=g) * 8).double()
    y = torch.sin(X) + 0.3 * torch.randn(150, 1, generator=g)
    model = nn.Sequential(nn.Linear(1, 50), nn.Tanh(), nn.Linear(50, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=5e-4)
    for _ in range(300):
        opt.zero_grad()
        nn.functional.mse_loss(model(X), y).backward()
        opt.step()
    return model, X, y


def test_the_sine_toy_evidence_over_a_grid_and_its_optimum_equal_full_laplace():
    model, X, y = _sine()
    peer = _peer(model, "regression", X, y, 0.3, 1.0)
    grid = torch.logspace(-2, 2, 9)
    la = hesse.Laplace(model, "regression", (X, y), sigma_noise=0.3)
    peer_values = [float(peer.log_marginal_likelihood(torch.tensor(float(g)))) for g in grid]
    ours = [la.log_marginal_likelihood(float(g)) for g in grid]
    for a, b in zip(ours, peer_values, strict=True):
        assert _close(a, b)
    best = la.optimize_prior_precision("gridsearch", grid=grid)
    assert best == float(grid[int(torch.tensor(peer_values).argmax())])
    assert _close(la.log_marginal_likelihood(), max(peer_values))
    # marglik: the optimum of the smooth evidence, at least the grid's best, zero slope
    opt = la.optimize_prior_precision("marglik")
    assert la.log_marginal_likelihood() >= max(peer_values) - 1e-9
    g = la.log_marginal_likelihood_gradient()["log_prior_precision"]
    assert abs(g) <= 1e-4 * max(1.0, abs(la.log_marginal_likelihood())), (opt, g)
    Xt = torch.linspace(-2, 10, 7)[:, None]
    peer.prior_precision = opt
    f, var = la.predictive(Xt)
    pf, pvar = peer(Xt)
    assert rel_err(f, pf) <= 1e-12 and rel_err(var, pvar) <= 1e-9


def test_layerwise_marglik_increases_the_evidence_to_a_stationary_point():
    model, X, y = _toy("classification")
    la = hesse.Laplace(model, "classification", (X, y), prior_precision=1.0)
    start = la.log_marginal_likelihood()
    best = la.optimize_prior_precision("marglik", "layerwise")
    assert isinstance(best, list) and len(best) == 4
    assert la.log_marginal_likelihood() > start
    g = la.log_marginal_likelihood_gradient()["log_prior_precision"]
    for v, gi in zip(best, g, strict=True):  # a bound, or zero slope
        assert abs(gi) <= 1e-4 or v in (1e-8, 1e8) or abs(math.log(v)) >= math.log(1e8) - 1e-6


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_layerwise_evidence_hessian_equals_autograd(likelihood):
    # (A4): the exact Hessian in the per-tensor log priors, from the dense inverse,
    # against autograd's through a dense slogdet (torch.func Jacobians, not hesse's)
    model, X, y = _toy(likelihood, seed=3)
    sigma = 1.0 if likelihood == "classification" else 0.6
    la = hesse.Laplace(model, likelihood, (X, y), sigma_noise=sigma, prior_mean=0.1, method="dense")
    prior = [0.4, 2.5, 0.9, 0.05]
    la.prior_precision = prior
    sizes = la.problem.sizes

    def evidence(lp: Tensor) -> Tensor:
        full = torch.cat([v.expand(n) for v, n in zip(lp, sizes, strict=True)])
        return _dense_evidence(la, full, torch.tensor(math.log(sigma)))

    lp = torch.tensor(prior, dtype=torch.float64).log()
    H_ref = torch.autograd.functional.hessian(evidence, lp)
    g_ref = torch.autograd.functional.jacobian(evidence, lp)
    d = la._layerwise_derivatives()
    assert d is not None
    g, H = (torch.as_tensor(a) for a in d)
    assert rel_err(g, g_ref) <= 1e-9
    assert rel_err(H, H_ref) <= 1e-9
    assert torch.allclose(H, H.T)


def test_layerwise_newton_reaches_the_optimum_of_lbfgs():
    # the dense engine's Newton route (A4) and the observation-space engine's L-BFGS route
    # maximise the same evidence: same optimum, and Newton's gradient there is ~0
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 9), nn.Tanh(), nn.Linear(9, 3))
    X = torch.randn(13, 4)
    y = torch.randint(0, 3, (13,))
    newton = hesse.Laplace(model, "classification", (X, y), method="dense")
    lbfgs = hesse.Laplace(model, "classification", (X, y), method="gram")
    a = newton.optimize_prior_precision("marglik", "layerwise")
    b = lbfgs.optimize_prior_precision("marglik", "layerwise")
    ea, eb = newton.log_marginal_likelihood(), lbfgs.log_marginal_likelihood()
    assert ea >= eb - 1e-9 * abs(eb)  # Newton's is at least as high
    assert _close(ea, eb, 1e-7)
    g = newton.log_marginal_likelihood_gradient()["log_prior_precision"]
    n = newton.problem.sizes
    for v, gi, ni in zip(a, g, n, strict=True):
        assert abs(gi) <= 1e-7 * ni or v in (1e-8, 1e8), (a, g)
    for va, vb in zip(a, b, strict=True):
        assert abs(math.log(va) - math.log(vb)) <= 0.05, (a, b)


def _outputs_of(la: hesse.Laplace, X: Tensor):
    """``flat parameters -> model(X)`` by torch.func (its own flattening)."""
    model, names, shapes = la.problem.model, la.problem.names, la.problem.shapes

    def f(flat: Tensor) -> Tensor:
        params, i = {}, 0
        for n, s in zip(names, shapes, strict=True):
            k = math.prod(s)
            params[n] = flat[i : i + k].reshape(s)
            i += k
        return functional_call(model, params, (X,))

    return f


def _dense_evidence(la: hesse.Laplace, log_prior: Tensor, log_sigma: Tensor) -> Tensor:
    """The evidence (A2) through autograd: a dense GGN and slogdet (independent of hesse's
    engines: torch.func Jacobians)."""
    theta = la.mean
    X, y = la.problem.as_one_batch()
    f = _outputs_of(la, X)
    J = jacrev(f)(theta).reshape(-1, la.n_params)
    out = f(theta)
    sigma2 = torch.exp(2 * log_sigma)
    if la.likelihood == "regression":
        GGN = J.T @ J
        loss = 0.5 * ((out - y) ** 2).sum()
        ll = -loss / sigma2 - out.numel() * (log_sigma + 0.5 * math.log(2 * math.pi))
    else:
        p = torch.softmax(out, -1)
        L = torch.block_diag(*[torch.diag(q) - torch.outer(q, q) for q in p])
        GGN = J.T @ L @ J
        ll = -nn.functional.cross_entropy(out, y, reduction="sum")
    p0 = torch.exp(log_prior)
    if p0.numel() == 1:
        p0 = p0.expand(la.n_params)
    Pm = GGN / sigma2 + torch.diag(p0)
    delta = theta - la.prior_mean
    return ll - 0.5 * (torch.linalg.slogdet(Pm)[1] - p0.log().sum() + (delta * p0) @ delta)


@pytest.mark.parametrize("method", ["dense", "gram"])
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("form", ["scalar", "layerwise", "diagonal"])
def test_evidence_gradients_equal_autograd_and_finite_differences(likelihood, form, method):
    # the layerwise gradient on the observation-space engine: per-tensor traces (O7)
    model, X, y = _toy(likelihood, seed=5)
    sigma = 1.0 if likelihood == "classification" else 0.4
    la = hesse.Laplace(model, likelihood, (X, y), sigma_noise=sigma, prior_mean=0.05, method=method)
    if form == "scalar":
        prior: object = 0.8
        lp = torch.tensor(math.log(0.8), requires_grad=True)
    elif form == "layerwise":
        prior = [0.5, 1.5, 2.0, 0.3]
        lp = torch.tensor(prior).log().requires_grad_(True)
    else:
        prior = 0.2 + torch.rand(la.n_params, generator=torch.Generator().manual_seed(2))
        lp = prior.log().clone().requires_grad_(True)
    ls = torch.tensor(math.log(sigma), requires_grad=True)
    if form == "layerwise":
        sizes = la.problem.sizes
        lp_full = torch.cat([v.expand(n) for v, n in zip(lp, sizes, strict=True)])
    else:
        lp_full = lp
    ref = _dense_evidence(la, lp_full, ls)
    ref.backward()
    ev = la.log_marginal_likelihood(prior)
    assert _close(ev, float(ref.detach()), 1e-10)
    g = la.log_marginal_likelihood_gradient()
    got = g["log_prior_precision"]
    got_t = torch.as_tensor(got, dtype=torch.float64).reshape(-1)
    assert rel_err(got_t, lp.grad.reshape(-1)) <= 1e-8
    if likelihood == "regression":
        assert _close(g["log_sigma_noise"], float(ls.grad), 1e-8)
    if form == "scalar":  # and a central difference in log delta
        h = 1e-5
        up = la.log_marginal_likelihood(0.8 * math.exp(h))
        down = la.log_marginal_likelihood(0.8 * math.exp(-h))
        assert abs((up - down) / (2 * h) - got) <= 1e-6 * max(1.0, abs(got))


def test_samples_have_the_posterior_mean_and_covariance_within_sampling_error():
    model, X, y = _toy("classification")
    la = hesse.Laplace(model, "classification", (X, y), prior_precision=0.7)
    peer = _peer(model, "classification", X, y, 1.0, 0.7)
    Sigma = peer.posterior_covariance
    n = 6000
    S = la.sample(n, torch.Generator().manual_seed(0))
    assert S.shape == (n, la.n_params)
    sd = Sigma.diagonal().sqrt()
    assert bool(((S.mean(0) - la.mean).abs() <= 5 * sd / math.sqrt(n)).all())
    emp = torch.cov(S.T)
    # the sampling error of a covariance entry: sqrt((S_ii S_jj + S_ij^2) / n)
    se = ((torch.outer(Sigma.diagonal(), Sigma.diagonal()) + Sigma**2) / n).sqrt()
    assert float(((emp - Sigma).abs() / se).max()) <= 6.0
    # log_prob: the Gaussian of the posterior precision
    v = la.mean + 0.1
    ref = torch.distributions.MultivariateNormal(la.mean, covariance_matrix=Sigma).log_prob(v)
    assert _close(la.log_prob(v), float(ref), 1e-8)


def test_a_model_too_large_for_a_dense_posterior_against_the_determinant_lemma():
    """P = 40,502 (a 13 GB dense posterior), M = 60 outputs: the evidence against an
    independent observation-space reference from torch.func's Jacobian."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(100, 200), nn.Tanh(), nn.Linear(200, 100), nn.Tanh(), nn.Linear(100, 2)
    )
    X, y = torch.randn(30, 100), torch.randint(0, 2, (30,))
    la = hesse.Laplace(model, "classification", (X, y), prior_precision=2.0)
    assert la.n_params == 40502
    f = _outputs_of(la, X)
    J = jacrev(f)(la.mean).reshape(-1, la.n_params)  # (60, P)
    p = torch.softmax(f(la.mean), -1).detach()
    L = torch.block_diag(*[torch.diag(q) - torch.outer(q, q) for q in p])
    delta = 2.0
    # log det(J^T L J + delta I) = (P - M) log delta + log det(delta I + L^1/2 J J^T L^1/2)
    w, V = torch.linalg.eigh(L)
    Lh = V @ torch.diag(w.clamp_min(0).sqrt()) @ V.T
    K = Lh @ J @ J.T @ Lh
    M, P = K.shape[0], la.n_params
    logdet = (P - M) * math.log(delta) + float(torch.linalg.slogdet(K + delta * torch.eye(M))[1])
    ll = -float(nn.functional.cross_entropy(f(la.mean), y, reduction="sum"))
    theta = la.mean
    ref = ll - 0.5 * (logdet - P * math.log(delta) + delta * float(theta @ theta))
    assert _close(la.log_marginal_likelihood(), ref, 1e-9)


def test_an_indefinite_hessian_posterior_says_how_much_prior_it_needs():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 3))  # untrained
    X, y = torch.randn(8, 3), torch.randint(0, 3, (8,))
    la = hesse.Laplace(
        model, "classification", (X, y), prior_precision=1e-4, curvature="hessian", method="dense"
    )
    H = hesse.hessian(la.problem)
    lam_min = float(torch.linalg.eigvalsh(H).min())
    assert lam_min < 0
    with pytest.raises(hesse.NotPositiveDefiniteError, match="negative") as err:
        la.log_marginal_likelihood()
    needed = float(str(err.value).split("above ")[1].split(" ")[0])
    assert math.isclose(needed, -lam_min, rel_tol=1e-5)
    la.log_marginal_likelihood(needed * 1.01)  # now positive definite: an evidence
    with pytest.raises(hesse.NotPositiveDefiniteError):
        la.log_marginal_likelihood(needed * 0.99)


def test_bad_input_is_refused_before_the_work():
    model, X, y = _toy("classification")
    with pytest.raises(ValueError, match="likelihood must be"):
        hesse.Laplace(model, "poisson", (X, y))
    with pytest.raises(ValueError, match="classification' needs outputs"):
        hesse.Laplace(model, "classification", (X, torch.randn(10, 2)))
    with pytest.raises(ValueError, match="regression' needs floating-point targets"):
        hesse.Laplace(model, "regression", (X, y))
    for bad in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match="prior_precision"):
            hesse.Laplace(model, "classification", (X, y), prior_precision=bad)
    with pytest.raises(ValueError, match=r"\['nope'\] are not selected parameters"):
        hesse.Laplace(
            model, "classification", (X, y), prior_precision={"nope": 1.0, "0.weight": 1.0}
        )
    with pytest.raises(ValueError, match="sigma_noise must be a positive"):
        hesse.Laplace(model, "regression", (X, torch.randn(10, 2)), sigma_noise=0.0)
    with pytest.raises(ValueError, match="sigma_noise is for regression"):
        hesse.Laplace(model, "classification", (X, y), sigma_noise=0.5)
    drop = nn.Sequential(nn.Linear(3, 5), nn.Dropout(0.2), nn.Linear(5, 2)).train()
    with pytest.raises(ValueError, match="training mode"):
        hesse.Laplace(drop, "classification", (X, y))
    la = hesse.Laplace(model, "classification", (X, y))
    with pytest.raises(
        ValueError, match=r"test inputs have shape \(4, 5\); the training inputs are \(n, 3\)"
    ):
        la.predictive(torch.randn(4, 5))
    with pytest.raises(ValueError, match="n_samples must be"):
        la.sample(0)
    with pytest.raises(ValueError, match="prior_structure must be"):
        la.optimize_prior_precision(prior_structure="blockwise")
    with pytest.raises(hesse.MemoryBudgetError, match="would need about"):
        hesse.Laplace(model, "classification", (X, y), method="dense", max_memory=1000)


@pytest.mark.parametrize("damping", ["scalar", "diagonal"])
def test_observation_space_inverse_diagonal_and_traces_equal_the_dense_inverse(damping):
    # (O7): the Woodbury diagonal and weighted traces of (C + D)^-1 without P solves,
    # on a model with more parameters than outputs (M < P) and a tanh hidden layer
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double().eval()
    X, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    prob = hesse.Problem(model, nn.CrossEntropyLoss(reduction="sum"), (X, y))
    P = prob.num_params
    gen = torch.Generator().manual_seed(4)
    d: object = 0.3 if damping == "scalar" else 0.1 + torch.rand(P, generator=gen).double()
    f = hesse.engine(prob, "ggn", method="gram").factor(d)
    D = torch.full((P,), 0.3).double() if damping == "scalar" else d
    ref = torch.linalg.inv(hesse.GGNOperator(prob).to_dense() + torch.diag(D))
    assert rel_err(f.inverse_diagonal(), ref.diagonal()) <= 1e-10
    # the dense engine's: from its own Cholesky factor (one triangular inverse)
    dense = hesse.engine(prob, "ggn", method="dense").factor(d)
    assert dense.status.kinds == ("cholesky",)
    assert rel_err(dense.inverse_diagonal(), ref.diagonal()) <= 1e-10
    weights = [torch.rand(P, generator=gen).double() for _ in range(2)]
    weights.append(torch.zeros(P, dtype=torch.float64))
    weights[-1][prob.slices["2.weight"]] = 1.0  # one layer's indicator: the others skipped
    got = torch.tensor(f.inverse_traces(weights))
    want = torch.stack([(w * ref.diagonal()).sum() for w in weights])
    assert rel_err(got, want) <= 1e-10
