"""The MLP route of the curvature products (`hesse._autodiff.rop`, design note (P1)-(P4))
against dense ``torch.func`` references over several batches, and its reuse of the
forward pass at one point against every way that point can change."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err
from torch import nn
from torch.func import functional_call

import hesse
from hesse._autodiff import losses, products, rop

TOL64 = 1e-11


def _model(widths: list[int], acts: list[type[nn.Module]], bias: bool, last: nn.Module | None):
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1], bias=bias or i == 0))
        if i < len(widths) - 2:
            layers.append(acts[i % len(acts)]())
    if last is not None:
        layers.append(last)
    return nn.Sequential(*layers).double()


def _reference(prob: hesse.Problem) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense Hessian and Gauss-Newton matrix of the problem's objective (its batches
    weighted as ``Problem.batches`` says) by ``torch.func`` on a flat parameter vector."""
    names, theta = prob.names, prob.param_vector().detach().clone()
    batches = list(prob.batches())

    def outs(flat, X):
        ps = dict(zip(names, prob.unflatten(flat), strict=True))
        return functional_call(prob.model, ps, (X,))

    def total(flat):
        return sum(w * prob.loss_fn(outs(flat, X), y) for X, y, w in batches)

    H = torch.func.hessian(total)(theta)
    G = torch.zeros_like(H)
    for X, y, w in batches:
        J = torch.func.jacrev(lambda f, X=X: outs(f, X))(theta).reshape(-1, theta.numel())
        o = outs(theta, X).detach()
        Lam = torch.func.hessian(lambda o_, y=y, w=w: w * prob.loss_fn(o_, y))(o)
        G += J.T @ Lam.reshape(o.numel(), o.numel()) @ J
    return H, G


CASES = {
    # name: (widths, activations, bias, module after the last Linear, loss, target kind)
    "tanh-ce": ([5, 7, 6, 3], [nn.Tanh], True, None, nn.CrossEntropyLoss(), "labels"),
    "deep-mixed-ce": (
        [4, 5, 3, 6, 5, 4, 5, 3, 6, 3],  # 9 layers, odd widths
        [nn.Tanh, nn.SiLU, nn.ELU, nn.Softplus, nn.GELU, nn.Sigmoid],
        True,
        None,
        nn.CrossEntropyLoss(),
        "labels",
    ),
    "relu-no-bias-mse-sum": (
        [6, 5, 5, 2],
        [nn.ReLU, nn.LeakyReLU],
        False,
        None,
        nn.MSELoss(reduction="sum"),
        "real",
    ),
    "sigmoid-out-bce": ([3, 4, 2], [nn.Tanh], True, nn.Softplus(), nn.BCEWithLogitsLoss(), "unit"),
    "ce-ignore-index": ([4, 5, 3], [nn.Tanh], True, None, nn.CrossEntropyLoss(), "ignore"),
}


def _problem(name: str, params=None, batches=(4, 1, 6)) -> hesse.Problem:
    widths, acts, bias, last, lf, kind = CASES[name]
    torch.manual_seed(3)
    model = _model(widths, acts, bias, last)
    g = torch.Generator().manual_seed(5)
    n, C = sum(batches), widths[-1]
    X = torch.randn(n, widths[0], generator=g, dtype=torch.float64)
    if kind in ("labels", "ignore"):
        y = torch.randint(0, C, (n,), generator=g)
        if kind == "ignore":
            y[::3] = -100
    elif kind == "real":
        y = torch.randn(n, C, generator=g, dtype=torch.float64)
    else:
        y = torch.rand(n, C, generator=g, dtype=torch.float64)
    parts, s = [], 0
    for b in batches:
        parts.append((X[s : s + b], y[s : s + b]))
        s += b
    return hesse.Problem(model, lf, parts, params=params)


@pytest.mark.parametrize("name", list(CASES))
def test_the_mlp_route_equals_torch_func(name):
    """``H V``, ``G V`` and the true Fisher's ``F V`` by the MLP route, one column and
    several, against the dense references; the route is the one taken."""
    prob = _problem(name)
    assert rop.mlp_route(prob) is not None
    H, G = _reference(prob)
    V = torch.randn(prob.num_params, 3, generator=torch.Generator().manual_seed(1)).double()
    for method in ("mlp", "auto"):
        assert rel_err(hesse.hvp(prob, V, method=method), H @ V) < TOL64
        assert rel_err(hesse.hvp(prob, V[:, 1], method=method), H @ V[:, 1]) < TOL64
    assert rel_err(hesse.ggn_vp(prob, V), G @ V) < TOL64
    assert rel_err(hesse.ggn_vp(prob, V[:, 2]), G @ V[:, 2]) < TOL64
    if not isinstance(prob.loss_fn, nn.MSELoss) or prob.loss_fn.reduction == "mean":
        F = hesse.FisherOperator(prob)
        assert rel_err(F @ V, G @ V) < TOL64  # these likelihoods' Fisher is their GGN


@pytest.mark.parametrize(
    "params", [["2.weight", "4.bias"], ["0.bias"], ["0.weight", "4.weight", "4.bias"]]
)
def test_the_mlp_route_on_a_selection_of_parameters(params):
    """Products over a subset of the parameters are the references' sub-blocks (the
    other layers still shape the forward pass)."""
    full = _problem("tanh-ce")
    sub = _problem("tanh-ce", params=params)
    assert rop.mlp_route(sub) is not None
    H, G = _reference(full)
    idx = torch.cat([torch.arange(full.num_params)[full.parameters.slices[n]] for n in params])
    V = torch.randn(sub.num_params, 2, generator=torch.Generator().manual_seed(2)).double()
    assert rel_err(hesse.hvp(sub, V, method="mlp"), H[idx][:, idx] @ V) < TOL64
    assert rel_err(hesse.ggn_vp(sub, V), G[idx][:, idx] @ V) < TOL64


def test_float32_on_the_mlp_route_to_its_rounding():
    """float32 products agree with the float64 reference to float32's rounding."""
    prob = _problem("deep-mixed-ce")
    H, G = _reference(prob)
    model32 = prob.model.float()
    parts = [(X.float(), y) for X, y, _w in prob.batches()]
    p32 = hesse.Problem(model32, prob.loss_fn, parts)
    V = torch.randn(p32.num_params, 2, generator=torch.Generator().manual_seed(4))
    assert rop.mlp_route(p32) is not None
    assert rel_err(hesse.hvp(p32, V), H @ V.double()) < 1e-5
    assert rel_err(hesse.ggn_vp(p32, V), G @ V.double()) < 1e-5


def test_the_route_is_refused_where_it_would_not_see_the_forward():
    """Hooks, an ``output=`` selection, a ``Linear`` subclass with its own forward,
    a training-mode Dropout, non-tensor inputs: autograd's route, with the same answers;
    ``method="mlp"`` says why it cannot."""
    prob = _problem("tanh-ce")
    H, _G = _reference(prob)
    V = torch.randn(prob.num_params, 2, generator=torch.Generator().manual_seed(6)).double()
    handle = prob.model[0].register_forward_hook(lambda m, i, o: o)
    assert rop.mlp_route(prob) is None
    assert rel_err(hesse.hvp(prob, V), H @ V) < TOL64
    with pytest.raises(ValueError, match="method='mlp' needs"):
        hesse.hvp(prob, V, method="mlp")
    handle.remove()
    assert rop.mlp_route(prob) is not None

    class Scaled(nn.Linear):
        def forward(self, x):
            return 2.0 * super().forward(x)

    torch.manual_seed(0)
    model = nn.Sequential(Scaled(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    X = torch.randn(6, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (6,))
    p2 = hesse.Problem(model, nn.CrossEntropyLoss(), (X, y))
    assert rop.mlp_route(p2) is None
    p3 = hesse.Problem(model, nn.CrossEntropyLoss(), (X, y), output=lambda o: o)
    assert rop.mlp_route(p3) is None
    drop = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2)).double()
    assert rop.mlp_route(hesse.Problem(drop.eval(), nn.CrossEntropyLoss(), (X, y))) is not None
    assert rop.mlp_route(hesse.Problem(drop.train(), nn.CrossEntropyLoss(), (X, y))) is None
    with pytest.raises(ValueError, match="method must be one of"):
        hesse.HessianOperator(prob, method="bishop")


def test_the_kept_forward_pass_follows_every_change_of_the_point(monkeypatch):
    """Repeated products reuse the forward pass (P4) only while every layer's weights and
    biases and every batch hold the same values: a write through ``.data`` (no version
    counter), an unselected layer changed, the inputs or the targets edited in place,
    and a kept pass over its memory bound all give the products of the new point."""
    prob = _problem("tanh-ce", params=["4.weight", "4.bias"])
    V = torch.randn(prob.num_params, 2, generator=torch.Generator().manual_seed(8)).double()

    def check():
        H, G = _reference(prob)
        assert rel_err(hesse.hvp(prob, V), H @ V) < TOL64
        assert rel_err(hesse.ggn_vp(prob, V), G @ V) < TOL64

    check()
    assert prob._mlp_forward is not None and len(prob._mlp_forward.passes) == 3
    kept = prob._mlp_forward.passes[0]
    check()  # the same point: the same passes
    assert prob._mlp_forward.passes[0] is kept
    prob.model[4].weight.data.mul_(1.5)  # selected, through .data
    check()
    prob.model[0].weight.data.add_(0.2)  # not selected: still the objective's
    check()
    X, y = prob._data[1]
    X.data.mul_(-1.0)  # the inputs, in place without a version bump
    check()
    y.data.copy_((y + 1) % 3)
    check()
    monkeypatch.setattr(rop, "CACHE_BYTES", 0)  # nothing kept: computed every time
    prob.model[2].bias.data.add_(0.1)
    check()
    assert prob._mlp_forward.passes == {}


def test_the_closed_form_output_gradient_equals_autodiff():
    """Cross-entropy's and MSE's output gradients in closed form (the MLP route's and the
    chain's loss adjoint) against autograd, with ``ignore_index``, both reductions and a
    batch weight; other losses take autograd."""
    g = torch.Generator().manual_seed(9)
    o = torch.randn(8, 4, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 4, (8,), generator=g)
    labels[[1, 5]] = -100
    real = torch.randn(8, 4, generator=g, dtype=torch.float64)
    for lf, t, closed in [
        (nn.CrossEntropyLoss(), labels, True),
        (nn.CrossEntropyLoss(reduction="sum"), labels, True),
        (nn.CrossEntropyLoss(ignore_index=2), labels.clamp(min=0), True),
        (nn.CrossEntropyLoss(label_smoothing=0.1), labels.clamp(min=0), False),
        (nn.MSELoss(), real, True),
        (nn.MSELoss(reduction="sum"), real, True),
        (nn.BCEWithLogitsLoss(), real.sigmoid(), False),
    ]:
        assert (losses._likelihood_gradient(lf, o, t, 0.3) is not None) == closed
        oo = o.clone().requires_grad_(True)
        (ref,) = torch.autograd.grad(0.3 * lf(oo, t), [oo])
        assert rel_err(losses.output_gradient(lf, o, t, 0.3), ref) < 1e-14


def test_factorize_sees_a_change_of_a_parameter_it_does_not_select():
    """The prepared engine is kept while the problem's state is unchanged; a frozen
    layer's weights are part of that state (they shape the objective), so changing one
    gives a new factorisation, not the old one's answers."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    X = torch.randn(7, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (7,))
    sel = ["2.weight", "2.bias"]
    prob = hesse.Problem(model, nn.CrossEntropyLoss(), (X, y), params=sel)
    before = hesse.factorize(prob, 0.1).logdet()
    with torch.no_grad():
        model[0].weight.mul_(3.0)
    after = hesse.factorize(prob, 0.1).logdet()
    fresh = hesse.factorize(hesse.Problem(model, nn.CrossEntropyLoss(), (X, y), params=sel), 0.1)
    assert after == fresh.logdet() and after != before


def test_products_hessian_methods_agree_on_the_route():
    """The four routes of ``H V`` give the same product on an MLP."""
    prob = _problem("relu-no-bias-mse-sum")
    V = torch.randn(prob.num_params, 2, generator=torch.Generator().manual_seed(3)).double()
    ref = products.hessian_matmat(prob, V, "reverse")
    for m in ("auto", "mlp", "forward"):
        assert rel_err(products.hessian_matmat(prob, V, m), ref) < TOL64
