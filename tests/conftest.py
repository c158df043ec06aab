"""Shared model zoo and independent dense references.

The references never call hesse: they flatten parameters themselves, evaluate the
loss on all data as one concatenated batch, and use only ``torch.func`` and
``torch.linalg`` in float64.
"""

from __future__ import annotations

import copy
import itertools
import multiprocessing as mp
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, hessian, jacrev

# ----------------------------------------------------------------------------- processes
FORK_SERVER_PRELOAD = ["torch", "hesse", "scipy.sparse.linalg"]


def fork_server() -> mp.context.BaseContext:
    """The start method of the tests' own processes (distributed ranks, memory probes): a
    fork server, one a test process, which imports `FORK_SERVER_PRELOAD` once and forks
    a fresh single-threaded process for each (a spawned interpreter spends about 4 s of
    CPU importing them again; a plain fork would copy this process's memory and thread
    pools). One list for every caller: it is read once, when the server starts."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(FORK_SERVER_PRELOAD)
    return ctx


# ----------------------------------------------------------------------------- models
class TinyCNN(nn.Module):
    def __init__(self, c_in: int = 2, classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, 3, kernel_size=3)
        self.act = nn.Tanh()
        self.fc = nn.Linear(3 * 3 * 3, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.act(self.conv(x)).flatten(1))


class TinyRNN(nn.Module):
    def __init__(self, d_in: int = 3, hidden: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.rnn = nn.RNN(d_in, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)
        return self.fc(out[:, -1])


class TwoInputNet(nn.Module):
    """A model whose forward takes two tensors (called with a tuple or a dict)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(2, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        return self.out(torch.tanh(self.a(x) + self.b(z)))


def mlp(widths: list[int], act: type[nn.Module] = nn.Tanh, bias: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(widths) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


@dataclass
class Case:
    """A model with its full data set (X, y) as one batch."""

    name: str
    model: nn.Module
    X: Tensor
    y: Tensor
    loss_fn: nn.Module

    def batches(self, sizes: list[int]) -> list[tuple[Tensor, Tensor]]:
        out, start = [], 0
        for s in sizes:
            out.append((self.X[start : start + s], self.y[start : start + s]))
            start += s
        assert start == len(self.X)
        return out


def make_case(name: str, loss: str, seed: int = 0, dtype: torch.dtype = torch.float64) -> Case:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    n, C = 7, 3
    if name.startswith("mlp-"):
        act = {"tanh": nn.Tanh, "gelu": nn.GELU, "softplus": nn.Softplus, "sigmoid": nn.Sigmoid}[
            name[4:]
        ]
        model = mlp([5, 6, 4, C], act)
        X = torch.randn(n, 5, generator=g)
    elif name == "cnn":
        model = TinyCNN(2, C)
        X = torch.randn(n, 2, 5, 5, generator=g)
    elif name == "rnn":
        model = TinyRNN(3, 4, C)
        X = torch.randn(n, 4, 3, generator=g)
    else:
        raise ValueError(name)
    model = model.to(dtype)
    with torch.no_grad():  # move away from the default init so that curvature is generic
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
    X = X.to(dtype)
    if loss == "ce":
        y = torch.randint(0, C, (n,), generator=g)
        lf: nn.Module = nn.CrossEntropyLoss()
    else:
        y = torch.randn(n, C, generator=g).to(dtype)
        lf = nn.MSELoss()
    return Case(f"{name}-{loss}", model, X, y, lf)


MODELS = ["mlp-tanh", "mlp-gelu", "mlp-softplus", "mlp-sigmoid", "cnn", "rnn"]
LOSSES = ["ce", "mse"]


# ----------------------------------------------------------------------------- references
class Reference:
    """Dense float64 references for a `Case`, from ``torch.func`` on one batch, on a
    copy of its model: ``functional_call`` on a model that uses one module twice leaves
    plain tensors in place of that module's parameters (torch 2.13), which a problem
    on the model would then see as assigned since it was built."""

    def __init__(self, case: Case, names: list[str] | None = None) -> None:
        self.case = case
        self.model = copy.deepcopy(case.model)
        named = dict(self.model.named_parameters())
        self.names = names or list(named)
        self.theta0 = torch.cat([named[n].detach().reshape(-1) for n in self.names])
        self.shapes = [named[n].shape for n in self.names]

    def params_of(self, flat: Tensor) -> dict[str, Tensor]:
        out, i = {}, 0
        for n, s in zip(self.names, self.shapes, strict=True):
            k = int(torch.tensor(s).prod()) if len(s) else 1
            out[n] = flat[i : i + k].reshape(s)
            i += k
        return out

    def outputs(self, flat: Tensor, X: Tensor | None = None) -> Tensor:
        X = self.case.X if X is None else X
        return functional_call(self.model, self.params_of(flat), (X,))

    def loss(self, flat: Tensor) -> Tensor:
        return self.case.loss_fn(self.outputs(flat), self.case.y)

    def hessian(self) -> Tensor:
        return hessian(self.loss)(self.theta0)

    def gradient(self) -> Tensor:
        return grad(self.loss)(self.theta0)

    def jacobian(self) -> Tensor:
        return jacrev(self.outputs)(self.theta0)  # (N, C, P)

    def output_hessian(self) -> Tensor:
        o = self.outputs(self.theta0)
        return hessian(lambda o_: self.case.loss_fn(o_, self.case.y))(o)  # (N,C,N,C)

    def ggn(self) -> Tensor:
        J = self.jacobian()
        return torch.einsum("nap,namb,mbq->pq", J, self.output_hessian(), J)

    def residual(self) -> Tensor:
        """sum_{n,c} (dL/df_nc) d^2 f_nc / dtheta^2, from the Hessians of the outputs."""
        o = self.outputs(self.theta0)
        lam = grad(lambda o_: self.case.loss_fn(o_, self.case.y))(o)
        Ho = jacrev(jacrev(self.outputs))(self.theta0)  # (N, C, P, P)
        return torch.einsum("nc,ncpq->pq", lam, Ho)

    def _per_sample_sum_loss(self) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
        lf = self.case.loss_fn

        def fn(flat: Tensor, x: Tensor, y: Tensor) -> Tensor:
            o = self.outputs(flat, x[None])
            if isinstance(lf, nn.CrossEntropyLoss):
                return nn.functional.cross_entropy(o, y[None], reduction="sum")
            return nn.functional.mse_loss(o, y[None], reduction="sum")

        return fn

    def _c(self) -> float:
        N, C = self.case.X.shape[0], self.outputs(self.theta0).shape[1]
        return 1 / N if isinstance(self.case.loss_fn, nn.CrossEntropyLoss) else 1 / (N * C)

    def empirical_fisher(self) -> Tensor:
        g = self._per_sample_grads(self.case.y)
        return self._c() * g.T @ g

    def _per_sample_grads(self, y: Tensor) -> Tensor:
        fn = grad(self._per_sample_sum_loss())
        return torch.stack([fn(self.theta0, x, t) for x, t in zip(self.case.X, y, strict=True)])

    def true_fisher(self) -> Tensor:
        """CE: the expectation over labels, enumerated class by class; MSE: the GGN
        (the Gaussian's Fisher, a known identity checked elsewhere for CE)."""
        if not isinstance(self.case.loss_fn, nn.CrossEntropyLoss):
            return self.ggn()
        probs = torch.softmax(self.outputs(self.theta0), -1)
        F = torch.zeros(len(self.theta0), len(self.theta0), dtype=self.theta0.dtype)
        for c in range(probs.shape[1]):
            yc = torch.full((self.case.X.shape[0],), c)
            g = self._per_sample_grads(yc)
            F += (g * probs[:, c : c + 1]).T @ g
        return self._c() * F


def closure_of(
    opt: torch.optim.Optimizer, model: nn.Module, loss_fn: Callable, X: Tensor, y: Tensor
) -> Callable[[], Tensor]:
    """The usual ``torch.optim`` closure: zero the gradients, the loss on ``(X, y)``,
    backward, return the loss."""

    def closure() -> Tensor:
        opt.zero_grad()
        loss = loss_fn(model(X), y)
        loss.backward()
        return loss

    return closure


def rel_err(a: Tensor, b: Tensor) -> float:
    """max |a - b| relative to max |b| (or 1 when b is tiny)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / max(float(b.abs().max()), 1e-300))


@pytest.fixture(autouse=True)
def _float64_default():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
