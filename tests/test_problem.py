"""Problem: batching and reduction conventions, input structures, bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import Reference, TwoInputNet, make_case, rel_err
from torch import nn
from torch.func import functional_call, hessian

import hesse


def test_flatten_roundtrip_and_order():
    case = make_case("cnn", "ce", seed=1)
    prob = hesse.Problem(case.model, case.loss_fn, (case.X, case.y))
    assert prob.names == [n for n, _ in case.model.named_parameters()]
    v = torch.randn(prob.num_params)
    parts = prob.unflatten(v)
    assert [tuple(p.shape) for p in parts] == prob.shapes
    assert torch.equal(prob.flatten(parts), v)
    M = torch.randn(prob.num_params, 4)
    assert torch.equal(prob.flatten(prob.unflatten(M)), M)
    assert torch.equal(
        prob.param_vector(), torch.cat([p.detach().reshape(-1) for p in case.model.parameters()])
    )


@pytest.mark.parametrize("sizes", [[7], [1, 6], [3, 1, 3], [2, 2, 2, 1]])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_batches_equal_one_concatenated_batch(sizes, reduction):
    """The objective is the mean (or sum) over all samples, whatever the batching."""
    case = make_case("mlp-tanh", "ce", seed=2)
    case.loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    one = hesse.Problem(case.model, case.loss_fn, (case.X, case.y))
    many = hesse.Problem(case.model, case.loss_fn, case.batches(sizes))
    assert many.num_samples == 7 and many.batch_sizes == sizes
    assert rel_err(many.loss(), one.loss()) < 1e-14
    assert rel_err(hesse.gradient(many), hesse.gradient(one)) < 1e-13
    assert rel_err(hesse.hessian(many), hesse.hessian(one)) < 1e-12
    assert rel_err(hesse.ggn(many), hesse.ggn(one)) < 1e-12


def test_dataloader_and_generator_data():
    case = make_case("mlp-gelu", "mse", seed=3)
    ds = torch.utils.data.TensorDataset(case.X, case.y)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, shuffle=False)
    prob = hesse.Problem(case.model, case.loss_fn, loader)
    H = Reference(case).hessian()
    assert prob.batch_sizes == [3, 3, 1]
    assert rel_err(hesse.hessian(prob), H) < 1e-10
    gen = (b for b in case.batches([4, 3]))  # one-shot iterator: kept for every pass
    prob2 = hesse.Problem(case.model, case.loss_fn, gen)
    assert rel_err(hesse.hessian(prob2), H) < 1e-10
    assert rel_err(hesse.hessian(prob2), H) < 1e-10


def test_shuffled_loader_and_changing_data():
    case = make_case("mlp-tanh", "ce", seed=7)
    ds = torch.utils.data.TensorDataset(case.X, case.y)
    shuffled = torch.utils.data.DataLoader(
        ds, batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    prob = hesse.Problem(case.model, case.loss_fn, shuffled)
    H = Reference(case).hessian()
    assert rel_err(hesse.hessian(prob), H) < 1e-10  # any batching gives the same objective

    class Growing:
        def __init__(self) -> None:
            self.passes = 0

        def __iter__(self):
            self.passes += 1
            n = 7 if self.passes == 1 else 5
            return iter([(case.X[:n], case.y[:n])])

    prob = hesse.Problem(case.model, case.loss_fn, Growing())
    with pytest.raises(RuntimeError, match="held 7 samples when the Problem was built but 5"):
        hesse.gradient(prob)


@pytest.mark.parametrize("as_dict", [False, True])
def test_structured_inputs(as_dict):
    torch.manual_seed(0)
    model = TwoInputNet().double()
    x, z, y = torch.randn(5, 3), torch.randn(5, 2), torch.randint(0, 3, (5,))
    lf = nn.CrossEntropyLoss()
    inputs = {"x": x, "z": z} if as_dict else (x, z)
    prob = hesse.Problem(model, lf, [(inputs, y)])
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]

    def L(flat):
        ps, i = {}, 0
        for n, s in zip(names, shapes, strict=True):
            k = s.numel()
            ps[n] = flat[i : i + k].reshape(s)
            i += k
        return lf(functional_call(model, ps, (x, z)), y)

    H = hessian(L)(prob.param_vector())
    assert rel_err(hesse.hessian(prob), H) < 1e-10
    v = torch.randn(prob.num_params)
    assert rel_err(hesse.hvp(prob, v), H @ v) < 1e-10


def test_loss_without_targets():
    """Seed 002's objective y = sum(z2): a plain function, targets None."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Sigmoid(), nn.Linear(3, 3), nn.Sigmoid()).double()
    x = torch.randn(4, 3)
    prob = hesse.Problem(model, lambda out, _t: out.sum(), (x, None))
    assert prob.num_samples == 4
    assert rel_err(prob.loss(), model(x).sum()) < 1e-14


# ----------------------------------------------------------------------------- bad input
@pytest.fixture
def small():
    case = make_case("mlp-tanh", "ce", seed=0)
    return case, hesse.Problem(case.model, case.loss_fn, (case.X, case.y))


def test_wrong_vector_shape(small):
    _, prob = small
    P = prob.num_params
    with pytest.raises(ValueError, match=rf"expected \({P},\) or \({P}, k\)"):
        hesse.hvp(prob, torch.randn(P + 1))
    with pytest.raises(ValueError, match="expected"):
        hesse.hvp(prob, torch.randn(P, 2, 2))
    with pytest.raises(ValueError, match="expected 6 tensors"):
        hesse.hvp(prob, [torch.randn(3)])
    with pytest.raises(ValueError, match=r"entry for '0.weight' has shape \(2, 2\)"):
        hesse.hvp(prob, [torch.randn(2, 2), *prob.unflatten(torch.randn(P))[1:]])
    with pytest.raises(TypeError, match="floating-point"):
        hesse.hvp(prob, torch.ones(P, dtype=torch.long))


def test_non_scalar_loss(small):
    case, _ = small
    with pytest.raises(ValueError, match="reduction 'mean' or 'sum'"):
        hesse.Problem(case.model, nn.CrossEntropyLoss(reduction="none"), (case.X, case.y))
    prob = hesse.Problem(case.model, lambda o, t: (o - 1).pow(2).sum(1), (case.X, case.y))
    with pytest.raises(ValueError, match=r"scalar \(0-dim\) tensor; got \(7,\)"):
        hesse.gradient(prob)


def test_integer_and_unknown_parameters(small):
    case, _ = small

    class WithCounter(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(5, 3)
            self.count = nn.Parameter(torch.zeros(1, dtype=torch.long), requires_grad=False)

        def forward(self, x):
            return self.lin(x)

    m = WithCounter().double()
    with pytest.raises(TypeError, match="parameter 'count' has dtype torch.int64"):
        hesse.Problem(m, case.loss_fn, (case.X, case.y), params=["count"])
    assert hesse.Problem(m, case.loss_fn, (case.X, case.y)).names == ["lin.weight", "lin.bias"]
    with pytest.raises(ValueError, match="unknown parameter name 'nope'"):
        hesse.Problem(case.model, case.loss_fn, (case.X, case.y), params=["nope"])
    with pytest.raises(ValueError, match="not a parameter of the model"):
        hesse.Problem(case.model, case.loss_fn, (case.X, case.y), params=[torch.zeros(3)])
    frozen = make_case("mlp-tanh", "ce").model.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameters selected"):
        hesse.Problem(frozen, case.loss_fn, (case.X, case.y))


def test_input_dtype_must_match_the_parameters(small):
    case, _ = small
    with pytest.raises(
        TypeError,
        match=r"inputs of dtype torch.float32, but the parameters "
        r"are torch.float64",
    ):
        hesse.Problem(case.model, case.loss_fn, (case.X.float(), case.y))


def test_empty_data(small):
    case, _ = small
    with pytest.raises(ValueError, match="data is empty"):
        hesse.Problem(case.model, case.loss_fn, [])
    with pytest.raises(ValueError, match="data is empty"):
        hesse.Problem(case.model, case.loss_fn, (case.X[:0], case.y[:0]))
    with pytest.raises(TypeError, match=r"batch 0: expected an \(inputs, targets\) pair"):
        hesse.Problem(case.model, case.loss_fn, [case.X])


def test_nan_inf(small):
    case, _ = small
    X = case.X.clone()
    X[2, 1] = float("nan")
    with pytest.raises(ValueError, match="batch 1 contains NaN or inf"):
        hesse.Problem(case.model, case.loss_fn, [(case.X, case.y), (X, case.y)])
    bad = make_case("mlp-tanh", "ce").model
    with torch.no_grad():
        bad[0].bias[1] = float("inf")
    with pytest.raises(ValueError, match="parameter '0.bias' contains NaN or inf"):
        hesse.Problem(bad, case.loss_fn, (case.X, case.y))


def test_dropout_and_batchnorm_in_training_mode_warn(small):
    case, _ = small
    drop = nn.Sequential(nn.Linear(5, 3), nn.Dropout(0.5)).double().train()
    with pytest.warns(UserWarning, match="Dropout.*random"):
        hesse.Problem(drop, case.loss_fn, (case.X, case.y))
    bn = nn.Sequential(nn.Linear(5, 3), nn.BatchNorm1d(3)).double().train()
    with pytest.warns(UserWarning, match="BatchNorm.*samples in a batch are coupled"):
        hesse.Problem(bn, case.loss_fn, (case.X, case.y))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hesse.Problem(bn.eval(), case.loss_fn, (case.X, case.y))
        hesse.Problem(drop.eval(), case.loss_fn, (case.X, case.y))


def test_other_bad_arguments(small):
    case, prob = small
    with pytest.raises(TypeError, match="torch.nn.Module"):
        hesse.Problem(lambda x: x, case.loss_fn, (case.X, case.y))
    with pytest.raises(TypeError, match="hesse.Problem"):
        hesse.HessianOperator(case.model)
    with pytest.raises(ValueError, match="method must be"):
        hesse.hessian(prob, method="magic")
    with pytest.raises(ValueError, match="kind must be"):
        hesse.FisherOperator(prob, kind="magic")
    with pytest.raises(ValueError, match="contradicts"):
        hesse.Problem(case.model, case.loss_fn, (case.X, case.y), reduction="sum")
    with pytest.raises(NotImplementedError, match="Fisher products need a likelihood"):
        hesse.FisherOperator(hesse.Problem(case.model, nn.L1Loss(), (case.X, case.y)))
    with pytest.raises(ValueError, match="unknown parameter"):
        hesse.hessian_blocks(prob, [("0.weight", "zzz")])
    tuple_out = nn.Sequential(nn.Linear(5, 3)).double()
    tuple_out.register_forward_hook(lambda m, i, o: (o, o))
    p2 = hesse.Problem(tuple_out, lambda o, t: o[0].sum(), (case.X, case.y))
    with pytest.raises(TypeError, match="returns one tensor"):
        hesse.ggn_vp(p2, torch.randn(p2.num_params))
