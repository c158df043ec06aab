"""The models people bring: ResNet-18, a small GPT-2, an LSTM; hesse beside curvlinops
and PyHessian in the same process.

Usage:
    python bench/bench_models.py [--models resnet18 gpt2 lstm] [--repeats 5] [--json out.json]

float32, CPU. ResNet-18 (CIFAR-size, batch 32; hand-built, the torchvision layout with a
3x3 stem, 11.2M parameters), a GPT-2 from a ``transformers`` config (4 layers, width 128,
random weights, no download; batch 8 x 32 tokens), a 2-layer LSTM (width 128, batch 32 x
20 steps). Each product is a median of ``--repeats`` warm runs, as a ratio to one plain
``torch.autograd.grad`` of the same loss (forward + backward) measured in the same
process; the peak resident memory growth of the process over the whole run is printed at
the end. The top eigenvalue: ``hesse.eigs`` (Lanczos) to 1e-3 relative, PyHessian's power
iteration (its own stopping rule, tol 1e-3), and ``scipy.sparse.linalg.eigsh`` on
curvlinops' operator; seconds and products.

Peers: ``pip install pyhessian`` and curvlinops without its torchvision pin:
``pip install --no-deps curvlinops-for-pytorch backpack-for-pytorch einconv`` then
``pip install einops linear_operator opt-einsum`` (so that torch stays the build you
installed). A peer that is missing, or fails on a model, is reported as such.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
import warnings

import torch
import torch.nn.functional as F
from bench_core import timeit as median  # warm runs, the median
from torch import nn

import hesse

# ----------------------------------------------------------------------------- models


class _Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.short = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.short = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.short(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 images (the CIFAR variant of torchvision's layout)."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64))
        layers, c = [], 64
        for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [_Block(c, c_out, stride), _Block(c_out, c_out, 1)]
            c = c_out
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(F.relu(self.stem(x)))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


class LSTMNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(32, 128, num_layers=2, batch_first=True)
        self.fc = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.rnn(x)[0][:, -1])


def build(name: str) -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    if name == "resnet18":
        model = ResNet18().eval()
        return (
            model,
            nn.CrossEntropyLoss(),
            torch.randn(32, 3, 32, 32, generator=g),
            (torch.randint(0, 10, (32,), generator=g)),
        )
    if name == "lstm":
        return (
            LSTMNet(),
            nn.CrossEntropyLoss(),
            torch.randn(32, 20, 32, generator=g),
            (torch.randint(0, 10, (32,), generator=g)),
        )
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        n_layer=4, n_head=4, n_embd=128, vocab_size=512, n_positions=64,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    model = _Logits(GPT2LMHeadModel(cfg).eval())
    ids = torch.randint(0, 512, (8, 32), generator=g)
    return model, _TokenCE(), ids, ids


class _Logits(nn.Module):
    """A ``ModelOutput`` to its logits, for the peers (hesse selects them by itself)."""

    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        self.m = m

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.m(input_ids=ids).logits


class _TokenCE(nn.Module):
    reduction = "mean"

    def forward(self, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


# ----------------------------------------------------------------------------- timing
def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _peer_ops(model, lf, X, y):
    """Curvlinops' Hessian and GGN operators, or None."""
    try:
        from curvlinops import GGNLinearOperator, HessianLinearOperator
    except ImportError:
        return None, None
    params = [p for p in model.parameters() if p.requires_grad]
    data = [(X, y)]
    try:
        H = HessianLinearOperator(model, lf, params, data, check_deterministic=False)
        G = GGNLinearOperator(model, lf, params, data, check_deterministic=False)
    except Exception as err:
        print(f"  curvlinops: {type(err).__name__}: {str(err).splitlines()[0][:80]}")
        return None, None
    return H, G


def products(name: str, repeats: int) -> dict:
    model, lf, X, y = build(name)
    params = [p for p in model.parameters() if p.requires_grad]
    prob = hesse.Problem(model, lf, (X, y))
    P = prob.num_params
    v = torch.randn(P, generator=torch.Generator().manual_seed(1))

    def plain_grad():
        loss = lf(model(X), y)
        return torch.autograd.grad(loss, params)

    base = median(plain_grad, repeats)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the kernel fallback says so once
        hesse.hvp(prob, v)
        rows = {
            "gradient (plain autograd.grad)": base,
            "hesse gradient": median(lambda: hesse.gradient(prob), repeats),
            "hesse hvp": median(lambda: hesse.hvp(prob, v), repeats),
            "hesse ggn_vp": median(lambda: hesse.ggn_vp(prob, v), repeats),
        }
    H, G = _peer_ops(model, lf, X, y)
    if H is not None:
        for label, op in (("curvlinops hvp", H), ("curvlinops ggn_vp", G)):
            try:
                rows[label] = median(lambda op=op: op @ v, repeats)
            except Exception as err:
                rows[label] = f"failed: {type(err).__name__}"
    out = {"model": name, "P": P, "ratios": {}}
    print(f"\n{name}: P = {P}, one plain gradient {base * 1e3:.1f} ms")
    for label, t in rows.items():
        r = t / base if isinstance(t, float) else t
        out["ratios"][label] = r
        print(f"| {label} | {r:.2f} |" if isinstance(r, float) else f"| {label} | {r} |")
    out["eig"] = top_eigenvalue(prob, model, lf, X, y, H)
    return out


def top_eigenvalue(prob, model, lf, X, y, H) -> dict:
    res = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        r = hesse.eigs(
            hesse.HessianOperator(prob), 1, tol=1e-3, generator=torch.Generator().manual_seed(0)
        )
        res["hesse eigs"] = (time.perf_counter() - t0, r.num_products, float(r.eigenvalues[0]))
    try:
        from pyhessian import hessian as pyh

        t0 = time.perf_counter()
        comp = pyh(model, lf, data=(X, y), cuda=False)
        top, _ = comp.eigenvalues(top_n=1, tol=1e-3)
        res["pyhessian power iteration"] = (time.perf_counter() - t0, None, float(top[0]))
    except Exception as err:
        res["pyhessian power iteration"] = f"failed: {type(err).__name__}: {str(err)[:60]}"
    if H is not None:
        from scipy.sparse.linalg import eigsh

        t0 = time.perf_counter()
        try:
            val = eigsh(H.to_scipy(), k=1, which="LA", tol=1e-3, return_eigenvectors=False)
            res["curvlinops + eigsh"] = (time.perf_counter() - t0, None, float(val[0]))
        except Exception as err:
            res["curvlinops + eigsh"] = f"failed: {type(err).__name__}"
    for k, val in res.items():
        if isinstance(val, tuple):
            n = "" if val[1] is None else f", {val[1]} products"
            print(f"  top eigenvalue, {k}: {val[2]:.5g} in {val[0]:.2f} s{n}")
        else:
            print(f"  top eigenvalue, {k}: {val}")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet18", "gpt2", "lstm"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32")
    results = [products(m, args.repeats) for m in args.models]
    print(f"\npeak resident memory of the run: {peak_mb():.0f} MB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "peak_mb": peak_mb()}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
