"""The models people have: attention (nn.TransformerEncoder, a hand-built
scaled-dot-product block, a tiny GPT-2 from a transformers config), LSTM and GRU in
float32 and float64, a CNN with BatchNorm. Every product equals a dense float64
``torch.func`` reference (computed on the math attention kernel and the native RNN) to
1e-10; kernels without double backward or forward mode fall back by themselves, once,
with a warning; buffers are the same after every public call; a gap no fallback closes is
refused with the operation and the module."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err
from torch import nn
from torch.func import functional_call, hessian, jacrev
from torch.nn.attention import SDPBackend, sdpa_kernel

import hesse
from hesse._autodiff.kernels import differentiable_kernels


# ----------------------------------------------------------------------------- models
class Encoder(nn.Module):
    """Two nn.TransformerEncoder layers, mean-pooled, a linear head."""

    def __init__(self, d: int = 4, classes: int = 3) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(d, 2, 6, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(x).mean(1))


class SDPABlock(nn.Module):
    """Self-attention by F.scaled_dot_product_attention, causal, with a residual."""

    def __init__(self, d: int = 6, classes: int = 3) -> None:
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, 2, d // 2).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = x + self.proj(a.transpose(1, 2).reshape(n, t, d))
        return self.head(torch.tanh(h[:, -1]))


class Recurrent(nn.Module):
    def __init__(self, cell: type[nn.Module], classes: int = 3) -> None:
        super().__init__()
        self.rnn = cell(3, 4, batch_first=True)
        self.head = nn.Linear(4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


def _data(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
    return X, torch.randint(0, 3, (shape[0],), generator=g)


# ----------------------------------------------------------------------------- references
class Ref:
    """Dense float64 references by torch.func on the reference kernels (math attention,
    native RNN), on its own flattening of the model's parameters.

    ``autograd=True``: the Hessian by ``torch.autograd.functional.hessian`` (double
    backward, one column at a time) instead. In torch 2.13, torch.func's second derivatives
    of ``nn.TransformerEncoder`` (``jacfwd(jacrev)`` and ``jacrev(jacrev)`` alike) are off
    by about 5%, while autograd's double backward, central differences and hesse agree
    to 1e-8 (`test_the_encoder_reference_agrees_with_finite_differences`)."""

    def __init__(self, model: nn.Module, loss_fn, X, y, autograd: bool = False) -> None:
        self.autograd = autograd
        self.model = model
        self.names = [n for n, _ in model.named_parameters()]
        self.shapes = [p.shape for p in model.parameters()]
        self.theta = torch.cat([p.detach().double().reshape(-1) for p in model.parameters()])
        self.loss_fn, self.X, self.y = loss_fn, X.double() if X.is_floating_point() else X, y

    def _params(self, flat):
        out, i = {}, 0
        for n, s in zip(self.names, self.shapes, strict=True):
            out[n] = flat[i : i + s.numel()].reshape(s)
            i += s.numel()
        return out

    def out(self, flat):
        with differentiable_kernels():
            return functional_call(self.model, self._params(flat), (self.X,))

    def loss(self, flat):
        return self.loss_fn(self.out(flat), self.y)

    def hessian(self):
        with differentiable_kernels():
            if self.autograd:
                return torch.autograd.functional.hessian(self.loss, self.theta)
            return hessian(self.loss)(self.theta)

    def ggn(self):
        with differentiable_kernels():
            J = jacrev(self.out)(self.theta).reshape(-1, len(self.theta))
            o = self.out(self.theta)
            Ho = hessian(lambda o_: self.loss_fn(o_, self.y))(o).reshape(o.numel(), o.numel())
        return J.T @ Ho @ J, J


def _check_products(prob: hesse.Problem, ref: Ref, tol: float) -> None:
    g = torch.Generator().manual_seed(1)
    V = torch.randn(prob.num_params, 3, generator=g, dtype=torch.float64)
    H = ref.hessian()
    G, J = ref.ggn()
    Vm = V.to(prob.dtype)
    assert rel_err(hesse.hvp(prob, Vm), H @ V) < tol
    assert rel_err(hesse.hvp(prob, Vm[:, 0], method="forward"), H @ V[:, 0]) < tol
    assert rel_err(hesse.ggn_vp(prob, Vm[:, 0]), G @ V[:, 0]) < tol  # one column: forward mode
    assert rel_err(hesse.ggn_vp(prob, Vm), G @ V) < tol  # several: double vjp
    assert rel_err(hesse.fisher_vp(prob, Vm[:, 0]), G @ V[:, 0]) < tol  # CE: true Fisher = GGN
    assert rel_err(hesse.jacobian(prob).reshape(J.shape), J) < tol
    if prob.num_params <= 400:
        assert rel_err(hesse.hessian(prob), H) < tol
    top = hesse.eigs(hesse.GGNOperator(prob), 1, generator=torch.Generator().manual_seed(0))
    assert abs(float(top.eigenvalues[0]) - float(torch.linalg.eigvalsh(G)[-1])) < 1e3 * tol * float(
        torch.linalg.eigvalsh(G)[-1]
    )


def _problem(model, X, y, **kw):
    return hesse.Problem(model, nn.CrossEntropyLoss(), (X, y), **kw)


# ----------------------------------------------------------------------------- attention
@pytest.mark.parametrize("build", [Encoder, SDPABlock], ids=["TransformerEncoder", "sdpa-block"])
def test_attention_models_are_exact_with_the_math_kernel_fallback(build):
    torch.manual_seed(0)
    model = build().double().eval()
    X, y = _data((4, 5, 4 if build is Encoder else 6), torch.float64)
    prob = _problem(model, X, y)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ref = Ref(model, nn.CrossEntropyLoss(), X, y, autograd=build is Encoder)
        _check_products(prob, ref, 1e-10)
    said = [str(w.message) for w in caught if "math kernel" in str(w.message)]
    assert said and all("scaled_dot_product" in s for s in said)  # naming the kernel
    assert len(said) == len(set(said)) == len(prob.fallbacks)  # once a kind of product
    assert "the Hessian-vector product" in prob.fallbacks


def test_the_encoder_reference_agrees_with_finite_differences():
    """Which reference is right for nn.TransformerEncoder: central differences of the
    gradient along a direction agree with autograd's double backward (and hesse) to
    1e-8; torch.func's Hessian does not (see `Ref`)."""
    torch.manual_seed(0)
    model = Encoder().double().eval()
    X, y = _data((4, 5, 4), torch.float64)
    prob = _problem(model, X, y)
    v = torch.randn(prob.num_params, generator=torch.Generator().manual_seed(4))
    theta, h = prob.param_vector(), 1e-5
    gp = hesse.loss_and_gradient(prob)[1]  # warm: the kernels are settled
    with pytest.warns(UserWarning, match="math kernel"):
        Hv = hesse.hvp(prob, v)
    model_p = hesse.Problem(model, nn.CrossEntropyLoss(), (X, y))
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(theta + h * v, model.parameters())
    gp = hesse.gradient(model_p)
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(theta - h * v, model.parameters())
    gm = hesse.gradient(model_p)
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(theta, model.parameters())
    fd = (gp - gm) / (2 * h)
    assert rel_err(Hv, fd) < 1e-7
    ref = Ref(model, nn.CrossEntropyLoss(), X, y, autograd=True)
    assert rel_err(ref.hessian() @ v, fd) < 1e-7
    with differentiable_kernels():
        func = hessian(ref.loss)(ref.theta) @ v
    assert rel_err(func, fd) > 1e-3  # torch.func's is not (if this fails: fixed upstream)


def test_a_tiny_gpt2_from_a_transformers_config():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=8, vocab_size=11, n_positions=8,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(cfg).double().eval()
    ids = torch.randint(0, 11, (3, 4), generator=torch.Generator().manual_seed(2))

    def lm_loss(logits, y):  # next-token cross-entropy on the logits
        return F.cross_entropy(logits[:, :-1].reshape(-1, 11), y[:, 1:].reshape(-1))

    prob = hesse.Problem(model, lm_loss, ({"input_ids": ids}, ids), reduction="mean")
    names = [n for n, _ in model.named_parameters()]
    assert prob.names == names  # a ModelOutput: the loss gets its logits (output=None)

    def loss(flat):
        ps, i = {}, 0
        for n, p in model.named_parameters():
            ps[n] = flat[i : i + p.numel()].reshape(p.shape)
            i += p.numel()
        with sdpa_kernel(SDPBackend.MATH):
            return lm_loss(functional_call(model, ps, (), {"input_ids": ids}).logits, ids)

    theta = prob.param_vector()
    v = torch.randn(
        prob.num_params, generator=torch.Generator().manual_seed(3), dtype=torch.float64
    )
    with sdpa_kernel(SDPBackend.MATH):
        _, Hv = torch.func.jvp(torch.func.grad(loss), (theta,), (v,))
    with pytest.warns(UserWarning, match="math kernel"):
        assert rel_err(hesse.hvp(prob, v), Hv) < 1e-10
    assert rel_err(hesse.hvp(prob, v), Hv) < 1e-10  # no second warning: the kernels stay
    sel = hesse.Problem(model, lm_loss, ({"input_ids": ids}, ids), output="logits")
    assert rel_err(hesse.gradient(sel), hesse.gradient(prob)) < 1e-12


# ----------------------------------------------------------------------------- RNNs
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU])
def test_recurrent_models_in_float32_and_float64(cell, dtype):
    torch.manual_seed(0)
    model64 = Recurrent(cell).double()
    model = Recurrent(cell).to(dtype)
    model.load_state_dict(model64.state_dict())
    X, y = _data((4, 5, 3), dtype)
    prob = _problem(model, X, y)
    ref = Ref(model64, nn.CrossEntropyLoss(), X.double(), y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # float32 may fall back off the mkldnn RNN
        _check_products(prob, ref, 1e-10 if dtype == torch.float64 else 2e-4)


def test_a_kernel_gap_falls_back_once_by_itself(monkeypatch):
    """Force the failing kernel: a layer that, like the mkldnn RNN, runs a kernel without
    forward mode or double backward while mkldnn is on, and the reference kernel else."""

    class NoSecondOrder(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return torch.tanh(x)

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            raise (
                RuntimeError("derivative for aten::fused_tanh_backward is not implemented")
                if torch.is_grad_enabled()
                else None
            )
            return g * (1 - torch.tanh(x) ** 2).detach()

    class Fused(nn.Module):
        def forward(self, x):
            if torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled:
                return NoSecondOrder.apply(x)
            return torch.tanh(x)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), Fused(), nn.Linear(4, 3)).double()
    X, y = _data((5, 3), torch.float64)
    prob = _problem(model, X, y)
    plain = _problem(nn.Sequential(model[0], nn.Tanh(), model[2]), X, y)
    H, G = hesse.hessian(plain), hesse.ggn(plain)
    v = torch.ones(prob.num_params, dtype=torch.float64)
    if not torch.backends.mkldnn.is_available():
        pytest.skip("no mkldnn in this build: nothing to fall back from")
    with pytest.warns(UserWarning, match="fused_tanh_backward"):
        assert rel_err(hesse.hvp(prob, v), H @ v) < 1e-12
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: this product keeps the reference kernels
        assert rel_err(hesse.hvp(prob, 2 * v), 2 * H @ v) < 1e-12
    with pytest.warns(UserWarning, match="Gauss-Newton"):  # another product: its own once
        assert rel_err(hesse.ggn_vp(prob, v), G @ v) < 1e-12


# ----------------------------------------------------------------------------- BatchNorm
def test_batchnorm_cnn_products_and_no_side_effects():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3)
    ).double()
    X, y = _data((6, 1, 4, 4), torch.float64)
    model.train()
    with torch.no_grad():  # non-trivial running statistics
        model(X)
    model.eval()
    prob = _problem(model, X, y)
    _check_products(prob, Ref(model, nn.CrossEntropyLoss(), X, y), 1e-10)
    model.train()  # batch statistics: the buffers must not move
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="BatchNorm"):
        prob = _problem(model, X, y)
    v = torch.ones(prob.num_params, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    calls = [
        lambda: hesse.gradient(prob),
        lambda: hesse.hvp(prob, v),
        lambda: hesse.hvp(prob, v, method="forward"),
        lambda: hesse.ggn_vp(prob, v),
        lambda: hesse.fisher_vp(prob, v),
        lambda: hesse.jacobian(prob),
        lambda: hesse.hessian(prob),
        lambda: hesse.eigs(hesse.HessianOperator(prob), 1, generator=g),
        lambda: hesse.trace(hesse.GGNOperator(prob), num_products=6, generator=g),
        lambda: hesse.check(prob, hessian=False),
        lambda: hesse.factorize(prob, 0.1, "ggn", method="dense").solve(v),
    ]
    for call in calls:
        call()
        for k, b in model.state_dict().items():
            assert torch.equal(b, before[k]), k


# ----------------------------------------------------------------------------- bad input
def test_output_selector_errors_are_clear():
    class DictNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l = nn.Linear(3, 3)

        def forward(self, x):
            return {"scores": self.l(x), "aux": x.sum()}

    X, y = _data((4, 3), torch.float64)
    model = DictNet().double()
    with pytest.raises(ValueError, match=r"output='logits'.*no such field.*\['scores', 'aux'\]"):
        hesse.gradient(hesse.Problem(model, nn.CrossEntropyLoss(), (X, y), output="logits"))
    sel = hesse.Problem(model, nn.CrossEntropyLoss(), (X, y), output="scores")
    assert hesse.ggn_vp(sel, torch.ones(sel.num_params)).shape == (sel.num_params,)

    def dict_loss(out, t):
        return F.cross_entropy(out["scores"], t)

    raw = hesse.Problem(model, dict_loss, (X, y))
    hesse.gradient(raw)  # a loss that takes the whole output works for gradients
    with pytest.raises(TypeError, match=r"has no 'logits': pass output="):
        hesse.ggn_vp(raw, torch.ones(raw.num_params))
    with pytest.raises(TypeError, match="output must be"):
        hesse.Problem(model, dict_loss, (X, y), output=3)


class _Once(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


class _Square(nn.Module):
    def forward(self, x):
        return _Once.apply(x)


def test_a_gap_no_fallback_closes_names_the_operation_and_module():
    """A custom Function whose backward is @once_differentiable: PyTorch would take its
    gradient as a constant (a silently wrong HVP); hesse refuses, naming it and its
    module, before the product."""
    model = nn.Sequential(nn.Linear(3, 4), _Square(), nn.Linear(4, 3)).double()
    X, y = _data((4, 3), torch.float64)
    prob = _problem(model, X, y)
    hesse.gradient(prob)  # the first derivative exists
    v = torch.ones(prob.num_params)
    for product in (hesse.hvp, lambda p, v: hesse.ggn_vp(p, torch.stack([v, v], 1))):
        with pytest.raises(NotImplementedError, match=r"'_Once' \(in module '1'\).*once_diff"):
            product(prob, v)
