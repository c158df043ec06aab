"""The checks of the seed notebooks (../shared/seeds/), on hesse's API."""

from __future__ import annotations

import autograd
import autograd.numpy as anp
import numpy as np
import pytest
import torch
from torch import nn

import hesse


# ============================================================================ seed 000
class ScalarStage(nn.Module):
    """``z_l = z_{l-1} * x_l`` (bilinear) or ``z_{l-1} * x_l^2`` (quadratic)."""

    def __init__(self, x: float, power: int) -> None:
        super().__init__()
        self.x = nn.Parameter(torch.tensor(float(x)))
        self.power = power

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.x**self.power


def _scalar_chain(xs: np.ndarray, power: int) -> nn.Sequential:
    return nn.Sequential(*[ScalarStage(x, power) for x in xs])


def _notebook_000(xs: np.ndarray, z0: float, power: int):
    """The notebook's generic expression: grad = e_L M^-1 D_x and
    H = D_D (D_xx + D_zx P M^-1 D_x) + D_x^T M^-T P^T D_M (D_xz + D_zz P M^-1 D_x)."""
    L = len(xs)
    P = np.diag(np.ones(L - 1), k=-1)
    xp = xs**power
    backwards = np.hstack([np.cumprod(xp[:0:-1])[::-1], 1])
    D_D = np.diag(backwards)
    M = np.eye(L) - np.diag(xp[1:], k=-1)
    Minv = np.linalg.inv(M)
    zs = z0 * np.cumprod(xp)
    zprev = np.hstack([z0, zs[:-1]])
    if power == 1:
        D_x, D_xx, D_xz = np.diag(zprev), np.zeros((L, L)), np.eye(L)
    else:
        D_x, D_xx, D_xz = np.diag(2 * zprev * xs), np.diag(2 * zprev), np.diag(2 * xs)
    D_zz = np.zeros((L, L))
    grad = (Minv @ D_x)[-1]
    H = D_D @ (D_xx + D_xz @ P @ Minv @ D_x) + D_x.T @ Minv.T @ P.T @ D_D @ (
        D_xz + D_zz @ P @ Minv @ D_x
    )
    return backwards, Minv, grad, H


@pytest.mark.parametrize("power", [1, 2])
@pytest.mark.parametrize("L", [2, 5, 8])
def test_seed000_scalar_chains(power, L):
    rng = np.random.default_rng(100 * power + L)
    xs, z0 = rng.standard_normal(L), float(rng.random())
    model = _scalar_chain(xs, power).double()
    prob = hesse.Problem(model, lambda out, _t: out.sum(), (torch.tensor([z0]), None))
    zL = z0 * np.prod(xs**power)
    # closed forms
    grad_actual = power * zL / xs
    H_actual = power**2 * zL / xs[:, None] / xs[None, :]
    H_actual[np.diag_indices(L)] = 0 if power == 1 else 2 * zL / xs**2
    assert np.allclose(H_actual, H_actual.T)
    backwards, Minv, grad_est, H_est = _notebook_000(xs, z0, power)
    assert np.allclose(backwards, Minv[-1])
    assert np.allclose(grad_est, grad_actual) and np.allclose(H_est, H_actual)
    # hesse, both routes to the dense Hessian
    np.testing.assert_allclose(hesse.gradient(prob).numpy(), grad_actual, rtol=1e-12)
    np.testing.assert_allclose(hesse.hessian(prob).numpy(), H_actual, rtol=1e-12, atol=1e-14)
    v = rng.standard_normal(L)
    np.testing.assert_allclose(
        hesse.hvp(prob, torch.tensor(v), method="forward").numpy(),
        H_actual @ v,
        rtol=1e-11,
        atol=1e-13,
    )


# ============================================================================ seed 001
def _digits(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    idx = np.random.default_rng(seed).choice(len(d.target), n, replace=False)
    X = torch.tensor(d.images[idx] / 16.0)  # (n, 8, 8) images, as the notebook's 28x28
    return X, torch.tensor(d.target[idx])


def _net001(act: type[nn.Module], seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 30), act(), nn.Linear(30, 30), act(), nn.Linear(30, 10)
    ).double()


@pytest.mark.parametrize("n", [1, 5])
def test_seed001_relu_ggn_equals_layer_hessian(n):
    """With ReLU, D2_w L = D2_z L . D_w z . D_w z for each layer's kernel: the
    residual term D_z L . D2_w z vanishes."""
    X, y = _digits(n, seed=n)
    model = _net001(nn.ReLU, seed=n)
    for layer in ["1.weight", "3.weight", "5.weight"]:
        prob = hesse.Problem(model, nn.CrossEntropyLoss(), (X, y), params=[layer])
        H, G = hesse.hessian(prob), hesse.ggn(prob)
        assert (H - G).abs().max() <= 1e-12 * H.abs().max()
        # the notebook's quadratic form g^T H g with g the kernel itself
        g = prob.param_vector()
        assert torch.isclose(g @ H @ g, g @ G @ g, rtol=1e-12)


@pytest.mark.parametrize("n", [1, 5])
def test_seed001_tanh_needs_the_residual(n):
    X, y = _digits(n, seed=10 + n)
    model = _net001(nn.Tanh, seed=n)
    for layer, hidden in [("1.weight", True), ("3.weight", True), ("5.weight", False)]:
        prob = hesse.Problem(model, nn.CrossEntropyLoss(), (X, y), params=[layer])
        d = hesse.decompose(prob)
        gap = float((d.hessian - d.ggn).abs().max() / d.hessian.abs().max())
        if hidden:  # the notebook's expected failure: GGN alone is not the Hessian
            assert gap > 1e-3
        else:  # the output layer is linear in its weights: no residual
            assert gap < 1e-12
        assert (d.ggn + d.residual - d.hessian).abs().max() <= 1e-12 * d.hessian.abs().max()


# ============================================================================ seed 002
class Quadratic(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.x = nn.Parameter(torch.ones(4, 1, dtype=torch.float64))
        self.register_buffer(
            "A",
            torch.tensor(
                [[1, 2, 3, 4], [2, 1, 5, 6], [3, 5, 1, 7], [4, 6, 7, 1]], dtype=torch.float64
            ),
        )
        self.register_buffer("b", torch.tensor([[1.0], [2.0], [3.0], [4.0]], dtype=torch.float64))

    def forward(self, _unused: torch.Tensor) -> torch.Tensor:
        x = self.x
        return 0.5 * x.T @ (self.A @ x) + self.b.T @ x + 1.0


def _param_problem(model: nn.Module, params=None) -> hesse.Problem:
    return hesse.Problem(model, lambda out, _t: out.sum(), (torch.zeros(1), None), params=params)


def test_seed002_quadratic():
    model = Quadratic()
    prob = _param_problem(model)
    assert float(prob.loss()) == pytest.approx(40.0, abs=1e-12)
    np.testing.assert_allclose(hesse.gradient(prob).numpy(), [11, 16, 19, 22], atol=1e-12)
    np.testing.assert_allclose(hesse.hessian(prob).numpy(), model.A.numpy(), atol=1e-12)


class SigmoidMLP(nn.Module):
    """Seed 002's 3-3-3 MLP with the input x as a parameter: y = sum(sigmoid(W2
    sigmoid(W1 x + 1) + 1))."""

    def __init__(self) -> None:
        super().__init__()
        W1 = torch.arange(1, 10, dtype=torch.float64).reshape(3, 3) / 10
        self.x = nn.Parameter(torch.ones(3, dtype=torch.float64))
        self.l1 = nn.Linear(3, 3).double()
        self.l2 = nn.Linear(3, 3).double()
        with torch.no_grad():
            self.l1.weight.copy_(W1)
            self.l2.weight.copy_(W1.T)
            self.l1.bias.fill_(1.0)
            self.l2.bias.fill_(1.0)

    def forward(self, _unused: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.l2(torch.sigmoid(self.l1(self.x)))).sum()


def test_seed002_mlp_values_and_input_gradient():
    model = SigmoidMLP()
    prob = _param_problem(model, params=["x"])
    # the notebook ran in float32 and printed its rounding: agree to float32 resolution
    assert float(prob.loss()) == pytest.approx(2.7463741, abs=4 * 2.4e-7)
    np.testing.assert_allclose(
        hesse.gradient(prob).numpy(), [0.00771682, 0.00966905, 0.01162129], rtol=5e-6
    )


def test_seed002_jacobians():
    """dh2/dz1 = W2 (the notebook's 'full Jacobian'), and the chain dz2/dx."""
    model = SigmoidMLP()

    class H2OfZ1(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.z1 = nn.Parameter(torch.sigmoid(model.l1(model.x)).detach())

        def forward(self, _u):
            return model.l2(self.z1)[None]

    prob = hesse.Problem(H2OfZ1(), lambda o, _t: o.sum(), (torch.zeros(1), None), params=["z1"])
    J = hesse.jacobian(prob)[0]
    np.testing.assert_allclose(J.numpy(), model.l2.weight.detach().numpy(), atol=1e-15)
    np.testing.assert_allclose(J.numpy(), [[0.1, 0.4, 0.7], [0.2, 0.5, 0.8], [0.3, 0.6, 0.9]])

    class Z2OfX(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.x = model.x

        def forward(self, _u):
            return torch.sigmoid(model.l2(torch.sigmoid(model.l1(self.x))))[None]

    J2 = hesse.jacobian(
        hesse.Problem(Z2OfX(), lambda o, _t: o.sum(), (torch.zeros(1), None), params=["x"])
    )[0]
    with torch.no_grad():
        z1 = torch.sigmoid(model.l1(model.x))
        z2 = torch.sigmoid(model.l2(z1))
        ref = (
            torch.diag(z2 * (1 - z2))
            @ model.l2.weight
            @ torch.diag(z1 * (1 - z1))
            @ model.l1.weight
        )
    np.testing.assert_allclose(J2.numpy(), ref.numpy(), rtol=1e-13)


def test_seed002_bishop_equals_autodiff():
    """Bishop's Hessian of y = sum(z2) w.r.t. W1 and W2 equals autodiff's, and matches
    the notebook's printed H_W1 (3 decimals)."""
    model = SigmoidMLP()
    seq = nn.Sequential(model.l1, nn.Sigmoid(), model.l2, nn.Sigmoid())
    x = torch.ones(1, 3, dtype=torch.float64)
    names = ["0.weight", "2.weight"]
    prob = hesse.Problem(seq, lambda out, _t: out.sum(), (x, None), params=names)
    Hb = hesse.hessian(prob, method="bishop")
    Ha = hesse.hessian(prob)
    np.testing.assert_allclose(Hb.numpy(), Ha.numpy(), atol=1e-15)
    printed = np.kron(np.diag([-0.004, -0.007, -0.005]), np.ones((3, 3)))
    np.testing.assert_allclose(np.round(Hb[:9, :9].numpy(), 3) + 0.0, printed)


class StaticRNN(nn.Module):
    """Seed 002's static tanh RNN: h_t = tanh(x_t W_in + h_{t-1} W_rec + b_rec),
    y_t = h_t W_out + b_out, J = sum_t sum(y_t)."""

    def __init__(self, x_size: int, h_size: int, y_size: int, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W_in = nn.Parameter(torch.randn(x_size, h_size, generator=g, dtype=torch.float64))
        self.W_rec = nn.Parameter(torch.randn(h_size, h_size, generator=g, dtype=torch.float64))
        self.b_rec = nn.Parameter(torch.ones(1, h_size, dtype=torch.float64))
        self.W_out = nn.Parameter(torch.randn(h_size, y_size, generator=g, dtype=torch.float64))
        self.b_out = nn.Parameter(torch.randn(1, y_size, generator=g, dtype=torch.float64))

    def forward(self, xs: torch.Tensor) -> torch.Tensor:  # xs: (T, 1, x_size)
        h = torch.zeros(1, self.W_rec.shape[0], dtype=xs.dtype)
        ys = []
        for x_t in xs:
            h = torch.tanh(x_t @ self.W_in + h @ self.W_rec + self.b_rec)
            ys.append(h @ self.W_out + self.b_out)
        return torch.stack(ys)


def _bptt_grad_w_in(rnn: StaticRNN, xs: np.ndarray) -> np.ndarray:
    """The notebook's manual gradient of J w.r.t. W_in (back-propagation through time)."""
    W_in, W_rec, W_out = (p.detach().numpy() for p in (rnn.W_in, rnn.W_rec, rnn.W_out))
    b = rnn.b_rec.detach().numpy()
    hs, h = [], np.zeros((1, W_rec.shape[0]))
    for x_t in xs:
        h = np.tanh(x_t @ W_in + h @ W_rec + b)
        hs.append(h)
    dW = np.zeros_like(W_in)
    carry = np.zeros((1, W_rec.shape[0]))  # dJ/dh_t from later steps
    for t in reversed(range(len(xs))):
        dh = np.ones((1, W_out.shape[1])) @ W_out.T + carry
        dz = dh * (1 - hs[t] ** 2)
        dW += xs[t].T @ dz
        carry = dz @ W_rec.T
    return dW


@pytest.mark.parametrize(("T", "x_size", "h_size", "y_size"), [(3, 3, 3, 2), (4, 2, 5, 3)])
def test_seed002_static_rnn(T, x_size, h_size, y_size):
    rnn = StaticRNN(x_size, h_size, y_size, seed=1234)
    xs = torch.tensor(np.random.RandomState(1234).randn(T, 1, x_size))
    prob = hesse.Problem(rnn, lambda out, _t: out.sum(), (xs, None), params=["W_in"])
    g = hesse.gradient(prob)
    np.testing.assert_allclose(g.numpy(), _bptt_grad_w_in(rnn, xs.numpy()).reshape(-1), rtol=1e-12)
    report = hesse.check(prob, hessian=True)  # central differences of J and of dJ/dW_in
    assert report.passed, str(report)
    # and an explicit finite-difference Hessian, as the notebook builds it
    theta = prob.param_vector()
    h = 1e-5
    cols = []
    for j in range(prob.num_params):
        e = torch.zeros_like(theta)
        e[j] = h
        gp = hesse._autodiff.products.loss_and_gradient(prob, prob.unflatten(theta + e))[1]
        gm = hesse._autodiff.products.loss_and_gradient(prob, prob.unflatten(theta - e))[1]
        cols.append((gp - gm) / (2 * h))
    np.testing.assert_allclose(hesse.hessian(prob).numpy(), torch.stack(cols, 1).numpy(), atol=1e-8)


# ============================================================================ seed 003
class OfX(nn.Module):
    def __init__(self, fn, x: torch.Tensor) -> None:
        super().__init__()
        self.fn = fn
        self.x = nn.Parameter(x.clone())

    def forward(self, _u):
        return self.fn(self.x)


@pytest.mark.parametrize("n", [1, 4, 7])
def test_seed003_closed_forms(n):
    g = torch.Generator().manual_seed(n)
    m = n + 2
    x = torch.randn(n, generator=g)
    A_sq = torch.randn(n, n, generator=g)  # not symmetric
    A = torch.randn(m, n, generator=g)
    b_n, b_m, a = (
        torch.randn(n, generator=g),
        torch.randn(m, generator=g),
        torch.randn(n, generator=g),
    )
    s = torch.sigmoid(a @ x)
    cases = [
        (
            lambda x: 0.5 * x @ A_sq @ x - b_n @ x,
            0.5 * (A_sq + A_sq.T) @ x - b_n,
            0.5 * (A_sq + A_sq.T),
        ),
        (
            lambda x: -torch.exp(-x @ x),
            2 * torch.exp(-x @ x) * x,
            2 * torch.exp(-x @ x) * (torch.eye(n) - 2 * torch.outer(x, x)),
        ),
        (lambda x: 0.5 * (A @ x - b_m).pow(2).sum(), A.T @ (A @ x - b_m), A.T @ A),
        (lambda x: torch.log1p(torch.exp(a @ x)), s * a, s * (1 - s) * torch.outer(a, a)),
    ]
    for fn, grad_ref, hess_ref in cases:
        prob = _param_problem(OfX(fn, x))
        np.testing.assert_allclose(
            hesse.gradient(prob).numpy(), grad_ref.numpy(), rtol=1e-12, atol=1e-14
        )
        np.testing.assert_allclose(
            hesse.hessian(prob).numpy(), hess_ref.numpy(), rtol=1e-12, atol=1e-14
        )


# ============================================================================ seed 004
X004 = np.array([[0.52, 1.12, 0.77], [0.88, -1.08, 0.15], [0.52, 0.06, -1.30], [0.74, -2.49, 1.39]])
Y004 = (X004[:, 0] ** 2 - 3 * X004[:, 1] * X004[:, 2]).reshape(-1, 1)
# the parameters the notebook printed (W1, B1, W2, B2 flattened)
PARAMS004 = np.array(
    [
        -0.38575379,
        -0.62680877,
        0.19602057,
        0.34699285,
        -0.51387488,
        1.07746459,
        -0.81365418,
        0.98266259,
        -0.99810959,
        0.96349786,
        0.98364881,
    ]
)


def _autograd_objective(flat, x, y):
    """The notebook's NumPy network (columns are samples), for HIPS autograd."""
    W1, B1 = flat[:6].reshape(2, 3), flat[6:8].reshape(2, 1)
    W2, B2 = flat[8:10].reshape(1, 2), flat[10:11].reshape(1, 1)
    h2 = anp.dot(W2, anp.dot(W1, x) + B1) + B2
    return anp.mean(anp.square(h2 - y)) / 2


def _hesse_problem_004(flat: np.ndarray, x: np.ndarray, y: np.ndarray) -> hesse.Problem:
    net = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1)).double()
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(torch.tensor(flat), net.parameters())
    return hesse.Problem(
        net, lambda o, t: 0.5 * nn.functional.mse_loss(o, t), (torch.tensor(x), torch.tensor(y))
    )


def test_seed004_printed_values():
    prob = _hesse_problem_004(PARAMS004, X004, Y004)
    g = hesse.gradient(prob).numpy()
    np.testing.assert_allclose(
        g,
        [
            -0.20980657,
            -5.42853043,
            1.58130118,
            0.20253104,
            5.24028375,
            -1.52646595,
            -0.75951313,
            0.73317528,
            -4.41988815,
            -3.68119392,
            0.76095164,
        ],
        atol=2e-8,
    )
    H = hesse.hessian(prob).numpy()
    np.testing.assert_allclose(
        H[10],
        [
            -0.66374288,
            0.59637048,
            -0.25202267,
            0.64072608,
            -0.57568997,
            0.24328321,
            -0.99810959,
            0.96349786,
            -0.64616702,
            1.79251289,
            1.0,
        ],
        atol=2e-8,
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("m", [1, 4, 9])
def test_seed004_two_engines_agree(seed, m):
    """The full 11x11 Hessian, cross-layer blocks included, equals HIPS autograd's."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, 3)) if m != 4 else X004
    y = (x[:, 0] ** 2 - 3 * x[:, 1] * x[:, 2]).reshape(-1, 1)
    flat = rng.standard_normal(11)
    H_ag = autograd.hessian(_autograd_objective)(flat, x.T, y.T)
    g_ag = autograd.grad(_autograd_objective)(flat, x.T, y.T)
    prob = _hesse_problem_004(flat, x, y)
    H = hesse.hessian(prob).numpy()
    assert H.shape == (11, 11)
    np.testing.assert_allclose(H, H_ag, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(hesse.gradient(prob).numpy(), g_ag, rtol=1e-12, atol=1e-13)
    assert np.abs(H[:8, 8:]).max() > 1e-3  # the cross-layer blocks are really there
