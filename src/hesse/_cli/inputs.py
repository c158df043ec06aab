"""The command line's inputs: the model (built-in, or a user's factory), its weights, the
data (the digits, or an ``.npz``) and the loss, checked before any heavy work."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from hesse._cli.data import load_digits_data, shard_bounds

__all__ = [
    "Setup",
    "build_setup",
    "check_accepts",
    "check_loss",
    "default_model",
    "load_factory",
    "load_npz",
    "load_weights",
    "make_loss",
]

DEFAULT_HIDDEN = 32
DEFAULT_TRAIN_STEPS = 300
DEFAULT_SEED = 0


@dataclass
class Setup:
    """What a subcommand works on: a model, its loss, its data and a description."""

    model: nn.Module
    loss_fn: nn.Module
    X: Tensor
    y: Tensor
    description: str
    offset: int = 0  # the index of the first sample in the whole data (a rank's shard)


# ----------------------------------------------------------------------------- inputs
def default_model(hidden: int = DEFAULT_HIDDEN, seed: int = DEFAULT_SEED) -> nn.Module:
    """The built-in model: a 64-hidden-10 tanh MLP for the 8x8 digits."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10))


def train_default(setup: Setup, steps: int, seed: int) -> float:
    """A few seconds of full-batch Adam, seeded, so the summary is of a trained net."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(setup.model.parameters(), lr=1e-2)
    start = time.perf_counter()
    setup.model.train()
    for _ in range(steps):
        opt.zero_grad()
        setup.loss_fn(setup.model(setup.X), setup.y).backward()
        opt.step()
    return time.perf_counter() - start


def load_factory(spec: str) -> nn.Module:
    """``path/to/file.py:factory`` -> ``factory()``, which must return an ``nn.Module``."""
    if ":" not in spec:
        raise SystemExit(f"--model expects FILE.py:FACTORY; got {spec!r}")
    path, name = spec.rsplit(":", 1)
    if not Path(path).is_file():
        raise SystemExit(f"--model: no such file {path!r}")
    mod_spec = importlib.util.spec_from_file_location("hesse_user_model", path)
    assert mod_spec is not None and mod_spec.loader is not None
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    factory = getattr(module, name, None)
    if not callable(factory):
        raise SystemExit(f"--model: {path!r} has no callable {name!r}")
    model = factory()
    if not isinstance(model, nn.Module):
        raise SystemExit(f"--model: {name}() returned {type(model).__name__}, not an nn.Module")
    return model


def load_npz(path: str, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Arrays ``X`` (or ``x``) and ``y`` from a ``.npz`` file; integer ``y`` are class labels."""
    if not Path(path).is_file():
        raise SystemExit(f"--data: no such file {path!r}")
    try:
        f = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise SystemExit(f"--data: {path!r} is not a readable .npz file ({err})") from None
    if not isinstance(f, np.lib.npyio.NpzFile):
        raise SystemExit(f"--data: {path!r} holds one array; expected an .npz with X and y")
    with f:
        keys = set(f.files)
        xk = "X" if "X" in keys else "x" if "x" in keys else None
        if xk is None or "y" not in keys:
            raise SystemExit(f"--data: {path!r} must hold arrays 'X' and 'y'; found {sorted(keys)}")
        X, y = f[xk], f["y"]
    if len(X) != len(y) or len(X) == 0:
        raise SystemExit(f"--data: X has {len(X)} rows and y {len(y)}; expected equal, non-zero")
    yt = torch.as_tensor(y)
    yt = yt.long() if not yt.is_floating_point() else yt.to(dtype)
    return torch.as_tensor(X).to(dtype), yt


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _load_data(args: argparse.Namespace, dtype: torch.dtype) -> tuple[Tensor, Tensor, str]:
    """``X``, ``y`` and their description: ``--data`` or the digits, ``--samples`` cut."""
    if args.data:
        X, y = load_npz(args.data, dtype)
        desc = f"{args.data} ({len(X)} samples)"
    else:
        X, y = load_digits_data(dtype)
        desc = f"scikit-learn digits ({len(X)} samples)"
    if args.samples and args.samples < len(X):
        desc = desc.replace(f"({len(X)} samples)", f"(first {args.samples} of {len(X)} samples)")
        X, y = X[: args.samples], y[: args.samples]
    return X, y, desc


@contextlib.contextmanager
def _probing(model: nn.Module) -> Iterator[None]:
    """A probe's forward: no graph, eval mode (a train-mode BatchNorm refuses one sample
    and would move its running statistics), the model's mode restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, training in modes:
            m.training = training


def check_accepts(model: nn.Module, X: Tensor) -> None:
    """Refuse (``SystemExit``) a model that cannot take one sample of the data."""
    try:
        with _probing(model):
            model(X[:1])
    except Exception as err:  # the user's model meets the user's data: any error
        raise SystemExit(
            f"the model does not accept the data's inputs (one sample of shape "
            f"{tuple(X.shape[1:])}): {_first_line(err)}"
        ) from None


def load_weights(model: nn.Module, path: str) -> None:
    """``--weights``: a ``state_dict`` saved with ``torch.save`` (read ``weights_only``)."""
    if not Path(path).is_file():
        raise SystemExit(f"--weights: no such file {path!r}")
    try:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as err:  # torch raises several types for foreign or bad files
        raise SystemExit(
            f"--weights: {path!r} is not a state_dict of this model ({_first_line(err)})"
        ) from None


def make_loss(kind: str, y: Tensor, dtype: torch.dtype) -> tuple[nn.Module, Tensor]:
    """``--loss`` (``auto``: cross-entropy for integer ``y``, MSE otherwise) and the
    targets in the loss's shape (one regression target a sample: ``(N, 1)``)."""
    if kind == "auto":
        kind = "ce" if not y.is_floating_point() else "mse"
    if kind == "ce" and y.is_floating_point():
        raise SystemExit("--loss ce needs integer class labels y; the data's y are floating-point")
    loss_fn = nn.CrossEntropyLoss() if kind == "ce" else nn.MSELoss()
    if kind == "mse" and y.ndim == 1:
        y = y.reshape(-1, 1)
    return loss_fn, y.to(dtype) if kind == "mse" else y


def check_loss(model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor) -> None:
    """Refuse (``SystemExit``) outputs the loss cannot take (two samples tried), and
    outputs that MSELoss would broadcast against its targets (it only warns)."""
    try:
        with _probing(model):
            out = model(X[:2])
            value = loss_fn(out, y[:2]) if not _broadcasts(loss_fn, out, y) else None
    except Exception as err:
        raise SystemExit(
            f"{type(loss_fn).__name__} does not accept the model's outputs with the data's "
            f"targets (y of shape {tuple(y.shape[1:])} a sample): {_first_line(err)}"
        ) from None
    if value is None:
        labels = not y.is_floating_point() or bool((y == y.round()).all())
        hint = " (y holds whole numbers: for class labels --loss ce, or one-hot y)"
        raise SystemExit(
            f"MSELoss needs targets shaped like the model's outputs: the outputs are "
            f"{tuple(out.shape[1:])} a sample, y {tuple(y.shape[1:])}"
            f"{hint if labels else ''}"
        )
    if value.ndim != 0:
        raise SystemExit(
            f"{type(loss_fn).__name__} returned shape {tuple(value.shape)}, not a scalar"
        )


def _broadcasts(loss_fn: nn.Module, out: object, y: Tensor) -> bool:
    """Whether MSELoss would broadcast ``out`` against ``y`` (a silently wrong loss)."""
    return (
        isinstance(loss_fn, nn.MSELoss) and isinstance(out, Tensor) and out.shape[1:] != y.shape[1:]
    )


def _load_model(args: argparse.Namespace, X: Tensor, dtype: torch.dtype) -> tuple[nn.Module, str]:
    """The model (``--model`` or the built-in one) in ``dtype`` and in eval mode,
    checked against one sample, with ``--weights`` loaded; and its description.

    Eval mode comes first: hesse analyses the model in eval mode, and a probe in train
    mode would refuse a BatchNorm model on one sample and move its running statistics.
    """
    if args.model:
        model, desc = load_factory(args.model), f"{args.model}"
    else:
        model, desc = default_model(args.hidden, args.seed), f"tanh MLP 64-{args.hidden}-10"
    model = model.to(dtype).eval()
    check_accepts(model, X)
    if args.weights:
        load_weights(model, args.weights)
        desc += f", weights {args.weights}"
    return model, desc


def build_setup(args: argparse.Namespace) -> Setup:
    """The model, loss and data the command line asks for (the built-in model trained
    for ``--train-steps`` Adam steps when no model or weights are given), in eval mode."""
    dtype = {"float64": torch.float64, "float32": torch.float32}[args.dtype]
    X, y, data_desc = _load_data(args, dtype)
    model, desc = _load_model(args, X, dtype)
    loss_fn, y = make_loss(args.loss, y, dtype)
    check_loss(model, loss_fn, X, y)
    setup = Setup(model, loss_fn, X, y, f"{desc} on {data_desc}, {type(loss_fn).__name__}")
    if not args.model and not args.weights and args.train_steps > 0:
        secs = train_default(setup, args.train_steps, args.seed)  # every rank: all the data
        setup.description += f", trained {args.train_steps} Adam steps ({secs:.1f} s)"
    model.eval()
    rank, world = getattr(args, "rank", 0), getattr(args, "world", 1)
    if world > 1:  # torchrun: each rank its contiguous shard (no sampler, no padding)
        lo, hi = shard_bounds(len(setup.X), rank, world)
        setup.X, setup.y = setup.X[lo:hi], setup.y[lo:hi]
        setup.offset = lo
        setup.description += f", sharded over {world} ranks"
    return setup
