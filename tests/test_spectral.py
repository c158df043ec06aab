"""Spectral tools against dense eigendecompositions (float64)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_case
from torch import nn

import hesse
from hesse._spectral.stochastic import rademacher as _rademacher


@pytest.fixture(scope="module", params=["mlp-tanh", "cnn"])
def hess(request):
    case = make_case(request.param, "ce", seed=21)
    prob = hesse.Problem(case.model, case.loss_fn, case.batches([3, 4]))
    op = hesse.HessianOperator(prob)
    return prob, op, torch.linalg.eigvalsh(op.to_dense())


@pytest.mark.parametrize("kind", ["hessian", "ggn", "fisher"])
def test_eigs_extremes(hess, kind):
    prob, op, ev = hess
    if kind != "hessian":
        op = hesse.GGNOperator(prob) if kind == "ggn" else hesse.FisherOperator(prob)
        ev = torch.linalg.eigvalsh(op.to_dense())
    scale = float(ev.abs().max())
    g = torch.Generator().manual_seed(1)
    top = hesse.eigs(op, 5, "largest", generator=g)
    assert top.converged and top.num_products <= prob.num_params
    assert float((top.eigenvalues - ev.flip(0)[:5]).abs().max()) <= 1e-8 * scale
    bottom = hesse.eigs(op, 1, "smallest", generator=g)
    assert abs(float(bottom.eigenvalues[0] - ev[0])) <= 1e-8 * scale
    mag = hesse.eigs(op, 2, "magnitude", generator=g)
    ref = ev[torch.argsort(ev.abs(), descending=True)[:2]]
    assert float((mag.eigenvalues - ref).abs().max()) <= 1e-8 * scale
    # eigenvectors: unit norm, small residual
    X = top.eigenvectors
    assert torch.allclose(X.T @ X, torch.eye(5), atol=1e-10)
    R = op @ X - X * top.eigenvalues
    assert float(R.norm(dim=0).max()) <= 1e-8 * scale


def test_eigs_dense_tensor_and_reproducible():
    g = torch.Generator().manual_seed(0)
    M = torch.randn(37, 37, generator=g)
    M = M + M.T
    r1 = hesse.eigs(M, 3, generator=torch.Generator().manual_seed(5))
    r2 = hesse.eigs(M, 3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(r1.eigenvalues, r2.eigenvalues) and r1.num_products == r2.num_products
    assert torch.allclose(r1.eigenvalues, torch.linalg.eigvalsh(M).flip(0)[:3], atol=1e-10)


def _z_scores(op, exact, method, products, seeds):
    zs = []
    for s in seeds:
        t = hesse.trace(
            op, method=method, num_products=products, generator=torch.Generator().manual_seed(s)
        )
        assert t.num_products == products and t.method == method
        zs.append((t.estimate - exact) / t.std_error)
    return torch.tensor(zs)


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_trace_within_three_standard_errors(hess, method):
    """A statistical test on a fixed list of seeds: every estimate within 3 standard
    errors of the exact trace, and the standard errors honest (mean z^2 near 1)."""
    _, op, ev = hess
    z = _z_scores(op, float(ev.sum()), method, 30, range(12))
    assert float(z.abs().max()) <= 3.0
    assert 0.2 <= float((z**2).mean()) <= 3.0


def test_trace_exact_and_diagonal(hess):
    prob, op, ev = hess
    H = op.to_dense()
    t = hesse.trace(op, method="exact")
    assert t.std_error == 0 and t.num_products == prob.num_params
    assert t.estimate == pytest.approx(float(ev.sum()), rel=1e-10, abs=1e-12)
    d = hesse.diagonal(op)
    assert torch.allclose(d, torch.diagonal(H), atol=1e-12)
    assert torch.allclose(hesse.diagonal(op, chunk_memory=1), d, atol=1e-13)
    est = hesse.diagonal(
        op, method="hutchinson", num_products=400, generator=torch.Generator().manual_seed(0)
    )
    # unbiased with variance sum_{j != i} H_ij^2 / m per entry: check against that scale
    sd = torch.sqrt(((H**2).sum(1) - torch.diagonal(H) ** 2) / 400)
    assert float(((est - d).abs() / sd.clamp_min(1e-12)).max()) <= 5.0


def test_spectral_density_quadrature(hess):
    prob, op, ev = hess
    P = prob.num_params
    seed, probes, m = 3, 12, 25
    sd = hesse.spectral_density(
        op, num_probes=probes, lanczos_steps=m, generator=torch.Generator().manual_seed(seed)
    )
    assert sd.num_products <= probes * m
    assert float(torch.trapezoid(sd.density, sd.grid)) == pytest.approx(1.0, abs=1e-6)
    assert float(sd.weights.sum(1).min()) == pytest.approx(1.0, abs=1e-12)
    # Gauss quadrature is exact for low moments: per probe, sum tau theta^k = v^T H^k v / v^T v
    H = op.to_dense()
    gen = torch.Generator().manual_seed(seed)
    per_probe = {1: [], 2: []}
    for i in range(probes):
        v = _rademacher(P, 1, gen, torch.float64, torch.device("cpu"))[:, 0]
        for k in (1, 2):
            exact = float(v @ torch.linalg.matrix_power(H, k) @ v / (v @ v))
            quad = float((sd.weights[i] * sd.nodes[i] ** k).sum())
            assert quad == pytest.approx(exact, rel=1e-9, abs=1e-13)
            per_probe[k].append(exact)
    # and the averages estimate trace(H^k) / P (Hutchinson statistics)
    for k in (1, 2):
        vals = torch.tensor(per_probe[k])
        target = float((ev**k).mean())
        assert abs(sd.moment(k) - target) <= 4 * float(vals.std()) / math.sqrt(probes)


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_chain_histogram_equals_dense(curvature):
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 4), nn.Softplus(), nn.Linear(4, 3)
    ).double()
    g = torch.Generator().manual_seed(4)
    X, y = torch.randn(6, 4, generator=g), torch.randint(0, 3, (6,), generator=g)
    prob = hesse.Problem(model, nn.CrossEntropyLoss(), (X, y))
    C = hesse.hessian(prob) if curvature == "hessian" else hesse.ggn(prob)
    ev = torch.linalg.eigvalsh(C)
    # edges that avoid the eigenvalues (exact zeros of a rank-deficient matrix included)
    edges = torch.tensor([-1.0, -0.1, -0.01, -1e-3, 1e-3, 0.01, 0.05, 0.2, 2.0])
    assert float((ev[:, None] - edges[None]).abs().min()) > 1e-7
    hist = hesse.eigenvalue_histogram(prob, edges, curvature)
    ref = torch.histogram(ev, edges).hist.long()
    assert hist.tolist() == ref.tolist() and int(hist.sum()) == len(ev)


class _Skew(hesse.CurvatureOperator):
    symmetric = False

    def _matmat(self, V):
        return V


def test_bad_input(hess):
    prob, op, _ = hess
    with pytest.raises(ValueError, match=rf"k must be in \[1, {prob.num_params}\]"):
        hesse.eigs(op, prob.num_params + 1)
    with pytest.raises(ValueError, match="which must be"):
        hesse.eigs(op, 1, "biggest")
    with pytest.raises(ValueError, match="not symmetric"):
        hesse.eigs(torch.triu(torch.ones(4, 4)), 1)
    with pytest.raises(ValueError, match="not symmetric"):
        hesse.trace(_Skew(prob))
    with pytest.warns(UserWarning, match=r"Lanczos did not converge in 3 steps: largest Ritz"):
        r = hesse.eigs(op, 2, max_steps=3, generator=torch.Generator().manual_seed(0))
    assert not r.converged
    with pytest.raises(ValueError, match="method must be"):
        hesse.trace(op, method="guess")
    with pytest.raises(ValueError, match="strictly increasing"):
        hesse.eigenvalue_histogram(prob, [0.0, 0.0])


def test_a_random_operator_is_reported_as_such():
    """Train-mode Dropout makes every product random: eigs says it did not converge and
    every spectral routine warns, naming the cause."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 6), torch.nn.Tanh(), torch.nn.Dropout(0.5), torch.nn.Linear(6, 2)
    ).double()
    X, y = torch.randn(10, 3, dtype=torch.float64), torch.randint(0, 2, (10,))
    with pytest.warns(UserWarning, match="Dropout"):
        prob = hesse.Problem(model, torch.nn.CrossEntropyLoss(), (X, y))
    op = hesse.HessianOperator(prob)
    assert op.random
    with pytest.warns(UserWarning, match="is random"):
        r = hesse.eigs(op, 1, max_steps=20, generator=torch.Generator().manual_seed(0))
    assert not r.converged
    with pytest.warns(UserWarning, match="is random"):
        hesse.trace(op, num_products=9, generator=torch.Generator().manual_seed(0))
    model.eval()
    assert not hesse.HessianOperator(
        hesse.Problem(model, torch.nn.CrossEntropyLoss(), (X, y))
    ).random
