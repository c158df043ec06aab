"""``hesse train``: the built-in training examples, checkpoints and loss curves.

A CLI-side module (it prints and writes files). Checkpoints hold the model, the
optimiser's ``state_dict`` (damping, trust radius, CG warm start, counters), every
random generator and the history so far, and are written atomically (temporary file,
then rename), so a run killed between steps resumes from its last checkpoint and
reproduces the uninterrupted run's losses exactly.
"""

from __future__ import annotations

import csv
import io
import itertools
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from hesse import optim
from hesse._cli.data import load_digits_data
from hesse._util.files import atomic_path, save_png
from hesse._util.progress import progress_bar

EXAMPLES = ("autoencoder", "classifier")
OPTIMIZERS = ("hf", "chain-newton", "adam", "sgd")
DEFAULT_LR = {"adam": 3e-3, "sgd": 0.1, "hf": 1.0, "chain-newton": 1.0}
CHECKPOINT_FORMAT = "hesse-train-checkpoint"


@dataclass
class Example:
    name: str
    model: nn.Sequential
    loss_fn: nn.Module
    X: Tensor
    y: Tensor


def make_example(name: str, seed: int, dtype: torch.dtype = torch.float64) -> Example:
    """``autoencoder``: 64-32-16-6-16-32-64 with sigmoid units and a linear code layer,
    cross-entropy reconstruction of the digits (in the spirit of Hinton and
    Salakhutdinov 2006 and Martens 2010). ``classifier``: a deep narrow tanh network,
    64-16-16-16-16-16-16-10, cross-entropy on the digit labels."""
    X, labels = load_digits_data(dtype)
    torch.manual_seed(seed)
    if name == "autoencoder":
        widths = [64, 32, 16, 6, 16, 32, 64]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(widths)):
            layers.append(nn.Linear(a, b))
            if i not in (2, len(widths) - 2):  # linear code layer and logits output
                layers.append(nn.Sigmoid())
        return Example(name, nn.Sequential(*layers).to(dtype), nn.BCEWithLogitsLoss(), X, X)
    if name == "classifier":
        widths = [64] + [16] * 6 + [10]
        layers = []
        for i, (a, b) in enumerate(itertools.pairwise(widths)):
            layers.append(nn.Linear(a, b))
            if i < len(widths) - 2:
                layers.append(nn.Tanh())
        return Example(name, nn.Sequential(*layers).to(dtype), nn.CrossEntropyLoss(), X, labels)
    raise ValueError(f"unknown example {name!r}; choose from {EXAMPLES}")


def make_optimizer(
    kind: str, ex: Example, lr: float | None, damping: float | None = None
) -> torch.optim.Optimizer:
    """The optimiser ``kind`` with learning rate ``lr`` (and initial damping for the
    second-order ones; default 1)."""
    lr = DEFAULT_LR[kind] if lr is None else lr
    damping = 1.0 if damping is None else damping
    if kind == "adam":
        return torch.optim.Adam(ex.model.parameters(), lr=lr)
    if kind == "sgd":
        return torch.optim.SGD(ex.model.parameters(), lr=lr, momentum=0.9)
    if kind == "hf":
        return optim.HessianFree(ex.model, ex.loss_fn, lr=lr, damping=damping, cg_max_iter=50)
    if kind == "chain-newton":
        return optim.ChainNewton(ex.model, ex.loss_fn, lr=lr, damping=damping)
    raise ValueError(f"unknown optimizer {kind!r}; choose from {OPTIMIZERS}")


# ----------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename it into place."""
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: Path, example: str, optimizer: str) -> dict[str, Any]:
    """Load and validate a checkpoint; clear errors for a corrupt file or one from
    another example or optimiser (nothing is modified)."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise ValueError(
            f"checkpoint {str(path)!r} is corrupt or not a hesse checkpoint ({type(err).__name__})"
        ) from None
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint {str(path)!r} is not a hesse training checkpoint")
    if ck.get("example") != example or ck.get("optimizer") != optimizer:
        raise ValueError(
            f"checkpoint {str(path)!r} is from example {ck.get('example')!r} with optimizer "
            f"{ck.get('optimizer')!r}, not {example!r} with {optimizer!r}"
        )
    return ck


# ----------------------------------------------------------------------------- one run
def _curvature_batch(ex: Example, gen: torch.Generator, size: int) -> tuple[Tensor, Tensor]:
    idx = torch.randperm(len(ex.X), generator=gen)[:size]
    return ex.X[idx], ex.y[idx]


@dataclass
class _Run:
    """One optimiser's run: what a checkpoint holds and restores."""

    kind: str
    example: str
    ex: Example
    opt: torch.optim.Optimizer
    gen: torch.Generator
    ck_path: Path
    settings: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)
    start: int = 0
    elapsed: float = 0.0

    def full_loss(self) -> float:
        with torch.no_grad():
            return float(self.ex.loss_fn(self.ex.model(self.ex.X), self.ex.y))

    def closure(self) -> Tensor:
        self.opt.zero_grad()
        loss = self.ex.loss_fn(self.ex.model(self.ex.X), self.ex.y)
        loss.backward()
        return loss


def _resume(run: _Run) -> None:
    """Restore ``run`` from its checkpoint, refusing one written with other settings or
    for another model; says so when there is none to resume."""
    if not run.ck_path.exists():
        print(
            f"hesse train: no checkpoint {str(run.ck_path)!r} to resume; {run.kind} starts "
            "at step 0",
            file=sys.stderr,
        )
        return
    ck = load_checkpoint(run.ck_path, run.example, run.kind)
    stored = ck.get("settings", {})
    changed = {k: (stored[k], v) for k, v in run.settings.items() if k in stored and stored[k] != v}
    if changed:
        what = ", ".join(f"{k}={old!r} (now {new!r})" for k, (old, new) in changed.items())
        raise ValueError(
            f"checkpoint {str(run.ck_path)!r} was written with {what}; resume with the "
            "run's own settings, or train into a new --out"
        )
    try:
        run.ex.model.load_state_dict(ck["model"])
        run.opt.load_state_dict(ck["optim"])
    except (RuntimeError, ValueError, KeyError) as err:
        raise ValueError(
            f"checkpoint {str(run.ck_path)!r} does not fit this model: {err}"
        ) from None
    run.gen.set_state(ck["generator"])
    torch.set_rng_state(ck["torch_rng"])
    run.history, run.start, run.elapsed = ck["history"], int(ck["step"]), float(ck["elapsed"])


def _checkpoint(run: _Run, step: int) -> None:
    save_checkpoint(
        run.ck_path,
        {
            "format": CHECKPOINT_FORMAT,
            "version": 1,
            "example": run.example,
            "optimizer": run.kind,
            "step": step,
            "elapsed": run.elapsed,
            "model": run.ex.model.state_dict(),
            "optim": run.opt.state_dict(),
            "generator": run.gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "history": run.history,
            "settings": run.settings,
        },
    )


def train_one(
    kind: str,
    example: str,
    out: Path,
    *,
    steps: int,
    seed: int,
    lr: float | None,
    time_budget: float | None,
    checkpoint_every: int,
    resume: bool,
    curvature_batch: int,
    progress: bool | None,
    damping: float | None = None,
) -> list[dict[str, float]]:
    """Train one optimiser; returns the history ``[{step, seconds, loss}]`` (the full-data
    training loss after each step; step 0 is the initial loss)."""
    ex = make_example(example, seed)
    settings = {"seed": seed, "lr": lr, "damping": damping, "curvature_batch": curvature_batch}
    run = _Run(
        kind,
        example,
        ex,
        make_optimizer(kind, ex, lr, damping),
        torch.Generator().manual_seed(seed + 1),
        out / f"checkpoint_{kind}.pt",
        settings,
    )
    if resume:
        _resume(run)
    if not run.history:
        run.history.append({"step": 0, "seconds": 0.0, "loss": run.full_loss()})
    bar = progress_bar(
        steps, f"{example} / {kind}", progress, unit="step", initial=run.start, leave=True
    )
    for step in range(run.start, steps):
        if time_budget is not None and run.elapsed >= time_budget:
            break
        t0 = time.perf_counter()
        if kind in ("hf", "chain-newton"):
            batch = _curvature_batch(ex, run.gen, curvature_batch)
            run.opt.step(run.closure, curvature_batch=batch)  # type: ignore[call-arg]
        else:
            run.opt.step(run.closure)
        run.elapsed += time.perf_counter() - t0
        loss = run.full_loss()
        run.history.append({"step": step + 1, "seconds": run.elapsed, "loss": loss})
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4g}")
        if checkpoint_every and (step + 1) % checkpoint_every == 0:
            _checkpoint(run, step + 1)
        if not math.isfinite(loss):
            break
    bar.close()
    write_csv(out / f"losses_{kind}.csv", run.history)
    return run.history


def write_csv(path: Path, rows: list[dict[str, float]]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["step", "seconds", "loss"])
    w.writeheader()
    for r in rows:
        w.writerow(
            {
                "step": int(r["step"]),
                "seconds": f"{r['seconds']:.6f}",
                "loss": repr(float(r["loss"])),
            }
        )
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())


def read_csv(path: Path) -> list[dict[str, float]]:
    with open(path) as f:
        return [
            {"step": int(r["step"]), "seconds": float(r["seconds"]), "loss": float(r["loss"])}
            for r in csv.DictReader(f)
        ]


def plot_curves(out: Path, example: str) -> Path:
    """Overlay every ``losses_*.csv`` in ``out``: loss per step and per second."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {p.stem.removeprefix("losses_"): read_csv(p) for p in sorted(out.glob("losses_*.csv"))}
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, rows in runs.items():
        a1.semilogy([r["step"] for r in rows], [r["loss"] for r in rows], label=name)
        a2.semilogy([r["seconds"] for r in rows], [r["loss"] for r in rows], label=name)
    for ax, xl in ((a1, "step"), (a2, "seconds")):
        ax.set_xlabel(xl)
        ax.set_ylabel("training loss (full data)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    a1.set_title(f"{example}: loss per step")
    a2.set_title(f"{example}: loss per second")
    fig.tight_layout()
    return save_png(fig, out / "curves.png")
