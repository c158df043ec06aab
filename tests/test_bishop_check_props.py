"""Bishop's MLP Hessian, the derivative checker, and algebraic properties."""

from __future__ import annotations

import pytest
import torch
from conftest import Reference, make_case, mlp, rel_err
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import hesse

# ----------------------------------------------------------------------------- Bishop
ACTS = [nn.Tanh, nn.Sigmoid, nn.Softplus, nn.GELU, nn.ELU]


@pytest.mark.parametrize("act", ACTS, ids=lambda a: a.__name__)
@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize(
    ("widths", "bias"), [([5, 6, 3], True), ([4, 7, 5, 3], True), ([3, 2, 4, 1, 3], False)]
)
def test_bishop_equals_autodiff(act, loss, widths, bias):
    g = torch.Generator().manual_seed(len(widths) * 10 + bias)
    torch.manual_seed(len(widths))
    model = mlp(widths, act, bias=bias).double()
    model.append(act())  # an output activation too: Bishop's d^2E/da_K^2 has both terms
    n = 6
    X = torch.randn(n, widths[0], generator=g)
    if loss == "ce":
        y, lf = torch.randint(0, widths[-1], (n,), generator=g), nn.CrossEntropyLoss()
    else:
        y, lf = torch.randn(n, widths[-1], generator=g), nn.MSELoss()
    prob = hesse.Problem(model, lf, [(X[:4], y[:4]), (X[4:], y[4:])])
    Hb = hesse.hessian(prob, method="bishop")
    Ha = hesse.hessian(prob)
    assert rel_err(Hb, Ha) < 1e-10
    # a parameter subset, in named_parameters order
    sub = [prob.names[-1], prob.names[0]]
    prob_sub = hesse.Problem(model, lf, (X, y), params=sub)
    idx = torch.cat(
        [torch.arange(prob.slices[n].start, prob.slices[n].stop) for n in prob_sub.names]
    )
    assert rel_err(hesse.hessian(prob_sub, method="bishop"), Ha[idx][:, idx]) < 1e-10
    # (B1): the same propagation with dE/dz = 0 is the GGN, against torch.func's
    # J^T H_z J (an independent reference), whole and on the subset
    from conftest import Case

    G = Reference(Case("mlp", model, X, y, lf)).ggn()
    assert rel_err(hesse.ggn(prob, method="bishop"), G) < 1e-10
    assert rel_err(hesse.ggn(prob_sub, method="bishop"), G[idx][:, idx]) < 1e-10


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk", [1, 3, 4, 11])
def test_bishop_in_slices_of_samples_equals_torch_func(chunk, reduction):
    """A batch over the working memory is propagated in slices of ``bishop_chunk``
    samples: the loss's reduction counts the whole batch (mean over 11 valid of 13, with
    ignore_index), and every slice size, uneven ones included, gives torch.func's
    Hessian and GGN; the dense engine and the plan take the same rule."""
    from conftest import Case

    from hesse._autodiff.bishop import bishop_chunk, bishop_hessian, bishop_memory

    g = torch.Generator().manual_seed(chunk)
    torch.manual_seed(7)
    model = mlp([4, 6, 5, 3], nn.Tanh).double()
    X = torch.randn(13, 4, generator=g)
    y = torch.randint(0, 3, (13,), generator=g)
    lf = nn.CrossEntropyLoss(reduction=reduction)
    # two batches (13 = 11 + 2: the problem weighs each by its size), then one batch with
    # ignored targets (the mean over its 11 valid samples)
    y_ignored = y.clone()
    y_ignored[[2, 9]] = -100
    for data, targets in (([(X[:11], y[:11]), (X[11:], y[11:])], y), ((X, y_ignored), y_ignored)):
        prob = hesse.Problem(model, lf, data)
        work = bishop_memory(prob, chunk)
        assert bishop_chunk(prob, work) == chunk
        ref = Reference(Case("mlp", model, X, targets, lf))
        H, G = ref.hessian(), ref.ggn()
        assert rel_err(bishop_hessian(prob, work=work), H) < 1e-10
        assert rel_err(bishop_hessian(prob, True, work=work), G) < 1e-10
        assert rel_err(hesse.hessian(prob, method="bishop", chunk_memory=work), H) < 1e-10
    assert hesse.engine(prob, "ggn", method="dense").formed_by == "bishop"
    assert bishop_chunk(prob, 0) == 0  # not one sample fits: the products' route


def test_decompose_takes_bishop_where_it_applies_and_products_elsewhere():
    """``decompose``'s default: Bishop's propagation for an MLP (equal to the independent
    product route), the products for a CNN and for tied weights, which Bishop refuses;
    ``method="bishop"`` on those says why."""
    from conftest import Case

    torch.manual_seed(3)
    model = mlp([5, 7, 4, 3], nn.Tanh).double()
    X, y = torch.randn(9, 5), torch.randint(0, 3, (9,))
    prob = hesse.Problem(model, nn.CrossEntropyLoss(), (X, y))
    fast, slow = hesse.decompose(prob), hesse.decompose(prob, method="autodiff")
    ref = Reference(Case("mlp", model, X, y, nn.CrossEntropyLoss()))
    for got, want, exact in zip(fast, slow, (ref.hessian(), ref.ggn(), None), strict=True):
        assert rel_err(got, want) < 1e-12
        if exact is not None:
            assert rel_err(got, exact) < 1e-10
    out = prob.slices["4.weight"]  # the output layer: the residual is exactly zero there
    assert float(fast.residual[out, out].abs().max()) == 0.0
    case = make_case("cnn", "ce", seed=1)
    cnn = hesse.Problem(case.model, case.loss_fn, (case.X, case.y))
    assert rel_err(hesse.decompose(cnn).hessian, Reference(case).hessian()) < 1e-10
    with pytest.raises(ValueError, match=r"decompose\(method='bishop'\).*nn.Sequential MLP"):
        hesse.decompose(cnn, method="bishop")
    tied = mlp([4, 4, 4, 3], nn.Tanh).double()
    tied[2].weight = tied[0].weight  # one weight used twice: Bishop would see it once
    tp = hesse.Problem(tied, nn.CrossEntropyLoss(), (torch.randn(6, 4), torch.randint(0, 3, (6,))))
    assert rel_err(hesse.decompose(tp).hessian, hesse.hessian(tp)) < 1e-12
    with pytest.raises(ValueError, match="shares parameters"):
        hesse.decompose(tp, method="bishop")
    with pytest.raises(ValueError, match="method must be"):
        hesse.decompose(prob, method="fast")


@pytest.mark.parametrize(
    "mod",
    [
        nn.Tanh(),
        nn.Sigmoid(),
        nn.Softplus(),
        nn.Softplus(beta=2.5, threshold=3.0),
        nn.GELU(),
        nn.GELU(approximate="tanh"),
        nn.SiLU(),
    ],
    ids=repr,
)
def test_closed_form_activation_derivatives_match_autograd(mod):
    from hesse._autodiff.layers import activation_derivatives
    from hesse._autodiff.layers import autograd_derivatives as _autograd_derivatives

    g = torch.Generator().manual_seed(7)
    a = 3 * torch.randn(301, generator=g)  # wide enough to cross softplus' threshold
    z, d1, d2 = activation_derivatives([mod], a)
    rz, r1, r2 = _autograd_derivatives([mod], a)
    for got, ref in [(z, rz), (d1, r1), (d2, r2)]:
        assert torch.allclose(got, ref, rtol=1e-12, atol=1e-14)
    # and against central differences of the module itself
    h = 1e-5
    fd1 = (mod(a + h) - mod(a - h)) / (2 * h)
    keep = (a * getattr(mod, "beta", 1.0) - getattr(mod, "threshold", 1e9)).abs() > 1e-3
    assert torch.allclose(d1[keep], fd1[keep], atol=1e-8)


def test_bishop_nested_sequential_and_flatten():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Flatten(), nn.Sequential(nn.Linear(6, 4), nn.Tanh()), nn.Linear(4, 3)
    ).double()
    X, y = torch.randn(5, 2, 3), torch.randint(0, 3, (5,))
    prob = hesse.Problem(model, nn.CrossEntropyLoss(), (X, y))
    assert rel_err(hesse.hessian(prob, method="bishop"), hesse.hessian(prob)) < 1e-10


def test_bishop_rejects_non_mlps():
    case = make_case("cnn", "ce")
    prob = hesse.Problem(case.model, case.loss_fn, (case.X, case.y))
    with pytest.raises(ValueError, match="needs an nn.Sequential MLP; got TinyCNN"):
        hesse.hessian(prob, method="bishop")
    seq = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Linear(4, 3)).double()
    prob = hesse.Problem(seq, nn.CrossEntropyLoss(), (torch.randn(3, 5), torch.tensor([0, 1, 2])))
    with pytest.raises(ValueError, match="module '1' is LayerNorm"):
        hesse.hessian(prob, method="bishop")


# ----------------------------------------------------------------------------- check
@pytest.mark.parametrize("name", ["mlp-tanh", "cnn", "rnn"])
def test_check_passes_on_exact_derivatives(name):
    case = make_case(name, "ce", seed=8)
    prob = hesse.Problem(case.model, case.loss_fn, case.batches([4, 3]))
    rep = hesse.check(prob, hessian=(name == "mlp-tanh"))
    assert rep.passed, str(rep)
    kinds = {r.quantity for r in rep.rows}
    assert kinds == ({"gradient", "hvp", "hessian"} if name == "mlp-tanh" else {"gradient", "hvp"})
    assert {r.block for r in rep.rows} == set(prob.names)
    assert "all passed" in str(rep) and rep.to_dict()["passed"] is True


class _WrongTanh(torch.autograd.Function):
    """tanh with a backward that is off by 2 percent: a bug the checker must catch."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y) * 1.02


class _WrongNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 5)
        self.b = nn.Linear(5, 3)

    def forward(self, x):
        return self.b(_WrongTanh.apply(self.a(x)))


def test_check_catches_a_wrong_derivative():
    torch.manual_seed(0)
    model = _WrongNet().double()
    X, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    rep = hesse.check(hesse.Problem(model, nn.CrossEntropyLoss(), (X, y)), hessian=False)
    assert not rep.passed
    bad = {r.block for r in rep.rows if r.quantity == "gradient" and not r.passed}
    assert {"a.weight", "a.bias"} <= bad  # the layer below the wrong backward
    assert all(r.passed for r in rep.rows if r.quantity == "gradient" and r.block.startswith("b."))
    assert "FAILED" in str(rep)


def test_check_float32_uses_looser_tolerance():
    case = make_case("mlp-tanh", "ce", seed=2, dtype=torch.float32)
    rep = hesse.check(hesse.Problem(case.model, case.loss_fn, (case.X, case.y)))
    assert rep.dtype == "float32" and rep.rows[0].tol == 3e-2
    assert rep.passed, str(rep)


# ----------------------------------------------------------------------------- properties
@settings(max_examples=12, deadline=None)
@given(
    widths=st.lists(st.integers(1, 5), min_size=2, max_size=4),
    n=st.integers(1, 5),
    act=st.sampled_from([nn.Tanh, nn.Softplus, nn.Sigmoid, nn.GELU]),
    loss=st.sampled_from(["ce", "mse"]),
    seed=st.integers(0, 2**16),
)
def test_identities_on_random_mlps(widths, n, act, loss, seed):
    """Symmetry, H = GGN + residual, GGN PSD for convex losses, and agreement with the
    dense reference, on random shapes (odd sizes and batch 1 included)."""
    widths = [*widths, 3]
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = mlp(widths, act).double()
    X = torch.randn(n, widths[0], generator=g)
    if loss == "ce":
        y, lf = torch.randint(0, 3, (n,), generator=g), nn.CrossEntropyLoss()
    else:
        y, lf = torch.randn(n, 3, generator=g), nn.MSELoss()
    prob = hesse.Problem(model, lf, (X, y))
    d = hesse.decompose(prob)
    scale = float(d.hessian.abs().max()) + 1e-300
    assert float((d.hessian - d.hessian.T).abs().max()) <= 1e-12 * scale
    assert float((d.ggn + d.residual - d.hessian).abs().max()) <= 1e-11 * scale
    assert float(torch.linalg.eigvalsh(d.ggn)[0]) >= -1e-12 * (float(d.ggn.abs().max()) + 1e-300)
    from conftest import Case

    ref = Reference(Case("rand", model, X, y, lf))
    assert rel_err(d.hessian, ref.hessian()) < 1e-10


def test_check_says_when_finite_differences_cross_a_kink():
    """A ReLU whose pre-activation sits within the step of its kink: the differences at
    h and 2h disagree, so the row is unreliable (not FAILED) and the report says why; the
    same model away from the kink passes."""
    model = nn.Sequential(nn.Linear(1, 1), nn.ReLU(), nn.Linear(1, 1)).double()
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].bias.fill_(-1.0 + 1e-7)  # pre-activation 1e-7 at x = 1: h is about 6e-6
        model[2].weight.fill_(2.0)
        model[2].bias.fill_(0.0)
    X = torch.ones(1, 1, dtype=torch.float64)
    y = torch.full((1, 1), 3.0, dtype=torch.float64)
    rep = hesse.check(hesse.Problem(model, nn.MSELoss(), (X, y)), hessian=False)
    verdicts = {(r.quantity, r.block): r.verdict for r in rep.rows}
    assert verdicts[("gradient", "0.bias")] == "unreliable"
    assert rep.passed and not rep.conclusive
    assert "inconclusive" in str(rep) and "kink" in str(rep) and "FAILED" not in str(rep)
    with torch.no_grad():
        model[0].bias.fill_(-0.5)  # far from the kink
    rep = hesse.check(hesse.Problem(model, nn.MSELoss(), (X, y)), hessian=False)
    assert rep.passed and rep.conclusive, str(rep)


def test_check_float32_relu_maxpool_is_not_a_false_failure():
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(12, 4)
    )
    X, y = torch.randn(6, 1, 6, 6), torch.randint(0, 4, (6,))
    rep = hesse.check(hesse.Problem(model, nn.CrossEntropyLoss(), (X, y)), hessian=False)
    assert rep.passed, str(rep)
    assert "FAILED" not in str(rep)
    if not rep.conclusive:
        assert "float64" in str(rep)
