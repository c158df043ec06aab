"""``hesse train``: the built-in training examples or a user's model and data,
checkpoints, loss curves and the trained weights.

A CLI-side module (it prints and writes files). Checkpoints hold the model, the
optimiser's ``state_dict`` (damping, trust radius, CG warm start, counters), every
random generator and the history so far, and are written atomically (temporary file,
then rename), so a run killed between steps resumes from its last checkpoint and
reproduces the uninterrupted run's losses exactly. After each optimiser's run its model's
``state_dict`` is written to ``weights_OPTIMIZER.pt``, which ``hesse analyze --model ...
--weights`` reads.

Under ``torchrun`` each rank trains on its contiguous shard of the data and of each
curvature batch: the second-order optimisers reduce the closure's loss and gradient with
the ranks' shares (``samples=``), Adam and SGD get their gradient all-reduced the same
way, so every rank holds the same model after every step (the same model as one process,
to rounding). Rank 0 alone writes the checkpoints, CSV files and curves; every rank reads
the checkpoint on ``--resume``; the stop decisions (time budget) are taken together.
"""

from __future__ import annotations

import csv
import functools
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
from hesse._autodiff.distributed import Group
from hesse._autodiff.layers import flatten_sequential
from hesse._autodiff.problem import Parameters
from hesse._chain.chain import train_mode_refusal
from hesse._cli.data import load_digits_data, shard_bounds
from hesse._util.files import atomic_path, save_png
from hesse._util.progress import progress_bar

EXAMPLES = ("autoencoder", "classifier")
OPTIMIZERS = ("hf", "chain-newton", "adam", "sgd")
DEFAULT_LR = {"adam": 3e-3, "sgd": 0.1, "hf": 1.0, "chain-newton": 1.0}
CHECKPOINT_FORMAT = "hesse-train-checkpoint"
RUN_FILES = (("checkpoint", "pt"), ("losses", "csv"), ("weights", "pt"))
"""What a run of optimiser ``k`` writes into ``--out``: ``checkpoint_k.pt``,
``losses_k.csv``, ``weights_k.pt`` (and ``curves.png`` for all)."""


@dataclass
class Example:
    name: str
    model: nn.Module
    loss_fn: nn.Module
    X: Tensor
    y: Tensor


@dataclass(frozen=True)
class Source:
    """What ``hesse train`` trains: a built-in ``example``, or a user's ``model``
    (``FILE.py:FACTORY``, built after ``torch.manual_seed(seed)``) on ``data`` (an
    ``.npz`` with ``X`` and ``y``; default the digits, ``y`` their labels) with ``loss``
    (``auto``, ``ce``, ``mse``), from ``weights`` (a ``state_dict``) when given."""

    example: str = "classifier"
    model: str | None = None
    data: str | None = None
    loss: str = "auto"
    weights: str | None = None

    @property
    def label(self) -> str:
        """The run's name in checkpoints, titles and messages."""
        return self.example if self.model is None else self.model

    @property
    def folder(self) -> str:
        """The default ``--out``: ``hesse-train-EXAMPLE`` or ``hesse-train-FACTORY``."""
        name = self.example if self.model is None else self.model.rsplit(":", 1)[1]
        return f"hesse-train-{name}"

    def settings(self) -> dict[str, Any]:
        """What a resumed run must share with its checkpoint, beyond the optimiser's."""
        if self.model is None:
            return {}
        return {"data": self.data, "loss": self.loss, "weights": self.weights}

    def build(self, seed: int, dtype: torch.dtype = torch.float64) -> Example:
        """The example, or the user's model, loss and data, checked against each other."""
        if self.model is None:
            return make_example(self.example, seed, dtype)
        from hesse._cli import inputs

        if self.data:
            X, y = inputs.load_npz(self.data, dtype)
        else:
            X, y = load_digits_data(dtype)
        torch.manual_seed(seed)
        model = inputs.load_factory(self.model).to(dtype)
        inputs.check_accepts(model, X)
        if self.weights:
            inputs.load_weights(model, self.weights)
        loss_fn, y = inputs.make_loss(self.loss, y, dtype)
        inputs.check_loss(model, loss_fn, X, y)
        return Example(self.label, model, loss_fn, X, y)


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
        opt = optim.ChainNewton(ex.model, ex.loss_fn, lr=lr, damping=damping)
        for name, module in flatten_sequential(ex.model):  # the chain's refusals, up front:
            why = train_mode_refusal(module)  # hesse train trains in train mode
            if why is not None:
                raise ValueError(
                    f"chain-newton cannot train this model (stage {name!r}: {why}; hesse "
                    "train trains in train mode): leave it out, e.g. --optimizer hf,adam,sgd"
                )
        return opt
    raise ValueError(f"unknown optimizer {kind!r}; choose from {OPTIMIZERS}")


# ----------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename it into place (a
    checkpoint, or the trained weights)."""
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


CHECKPOINT_VERSION = 2  # 2: the weights' checksum (version 1 had none)


def weights_checksum(state: dict[str, Tensor]) -> str:
    """SHA-256 over a ``state_dict``'s names, dtypes, shapes and bytes: a flipped bit in
    a stored weight changes it."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def load_checkpoint(path: Path, example: str, optimizer: str) -> dict[str, Any]:
    """Load and validate a checkpoint; clear errors for a corrupt file, one from another
    example or optimiser, an unknown format version, missing settings, weights that do
    not match their checksum or are not finite (nothing is modified)."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise ValueError(
            f"checkpoint {str(path)!r} is corrupt or not a hesse checkpoint ({type(err).__name__})"
        ) from None
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint {str(path)!r} is not a hesse training checkpoint")
    if ck.get("version") != CHECKPOINT_VERSION:
        raise ValueError(
            f"checkpoint {str(path)!r} has format version {ck.get('version')!r}; this hesse "
            f"reads version {CHECKPOINT_VERSION}: train into a new --out"
        )
    missing = [k for k in ("settings", "checksum", "model", "optim", "history") if k not in ck]
    if missing or not isinstance(ck.get("model"), dict):
        raise ValueError(f"checkpoint {str(path)!r} lacks {missing or ['model']}: it is damaged")
    if weights_checksum(ck["model"]) != ck["checksum"]:
        raise ValueError(
            f"checkpoint {str(path)!r}: its weights do not match their checksum (the file was "
            "damaged or edited); resume from a copy, or train into a new --out"
        )
    bad = [n for n, t in ck["model"].items() if t.is_floating_point() and not t.isfinite().all()]
    if bad:
        raise ValueError(
            f"checkpoint {str(path)!r} holds non-finite weights in {bad[:3]}: the run had "
            "diverged; train into a new --out (a lower --lr or higher --damping)"
        )
    if ck.get("example") != example or ck.get("optimizer") != optimizer:
        raise ValueError(
            f"checkpoint {str(path)!r} is from example {ck.get('example')!r} with optimizer "
            f"{ck.get('optimizer')!r}, not {example!r} with {optimizer!r}"
        )
    return ck


# ----------------------------------------------------------------------------- ranks
@dataclass(frozen=True)
class Ranks:
    """This process's place in a ``torchrun`` job (``world == 1``: one process)."""

    rank: int = 0
    world: int = 1

    def shard(self, n: int) -> slice:
        """This rank's contiguous part of ``n`` samples."""
        return slice(*shard_bounds(n, self.rank, self.world))

    def group(self) -> Group | None:
        """The default group's collectives (``None`` in one process)."""
        import torch.distributed as dist

        return Group(dist.group.WORLD) if self.world > 1 else None

    def agree(self, error: str | None) -> None:
        """Raise ``ValueError`` on every rank when any rank met ``error`` (a check that
        only rank 0 makes, such as writing to ``--out``): no rank is left waiting."""
        group = self.group()
        if group is not None:
            said = group.gather_objects(error, "agreement on the set-up")
            error = next((e for e in said if e), None)
        if error:
            raise ValueError(error)


# ----------------------------------------------------------------------------- one run
def _curvature_batch(
    ex: Example, gen: torch.Generator, size: int, ranks: Ranks
) -> tuple[Tensor, Tensor]:
    """``size`` random samples (the same on every rank), this rank's part of them."""
    idx = torch.randperm(len(ex.X), generator=gen)[:size]
    idx = idx[ranks.shard(len(idx))]
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
    ranks: Ranks = field(default_factory=Ranks)
    history: list[dict[str, float]] = field(default_factory=list)
    start: int = 0
    elapsed: float = 0.0

    def full_loss(self) -> float:
        """The training loss on all the data (every rank: the same model, the same data)."""
        with torch.no_grad():
            return float(self.ex.loss_fn(self.ex.model(self.ex.X), self.ex.y))

    @property
    def samples(self) -> int:
        """How many samples this rank's closure averages over."""
        part = self.ranks.shard(len(self.ex.X))
        return part.stop - part.start

    @functools.cached_property
    def space(self) -> Parameters:
        """The model's parameters as one flat vector (for the reduced gradient)."""
        return Parameters(self.ex.model)

    def closure(self) -> Tensor:
        """The loss on this rank's shard (all the data in one process), backward."""
        part = self.ranks.shard(len(self.ex.X))
        self.opt.zero_grad()
        loss = self.ex.loss_fn(self.ex.model(self.ex.X[part]), self.ex.y[part])
        loss.backward()
        return loss

    def reduced_closure(self) -> Tensor:
        """`closure` with the loss and gradient reduced over the ranks by their shares of
        the samples (what the second-order optimisers do themselves), for Adam and SGD."""
        loss = self.closure()
        if self.ranks.world == 1:
            return loss
        share = self.samples / len(self.ex.X)
        flat = torch.cat([loss.detach().reshape(1), self.space.grad_vector()])
        flat = self.ranks.group().all_reduce(flat * share, "gradient")  # type: ignore[union-attr]
        for p, g in zip(self.space.tensors, self.space.split(flat[1:]), strict=True):
            if p.grad is not None:
                p.grad.copy_(g)
        return flat[0]


def _resume(run: _Run) -> None:
    """Restore ``run`` from its checkpoint, refusing one written with other settings or
    for another model; says so when there is none to resume."""
    if not run.ck_path.exists():
        if run.ranks.rank == 0:
            print(
                f"hesse train: no checkpoint {str(run.ck_path)!r} to resume; {run.kind} "
                "starts at step 0",
                file=sys.stderr,
            )
        return
    ck = load_checkpoint(run.ck_path, run.example, run.kind)
    stored = ck["settings"]
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
    """Rank 0 writes (atomically); the other ranks hold the same state."""
    if run.ranks.rank != 0:
        return
    save_checkpoint(
        run.ck_path,
        {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "checksum": weights_checksum(run.ex.model.state_dict()),
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
    source: Source | str,
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
    ranks: Ranks | None = None,
) -> list[dict[str, float]]:
    """Train one optimiser; returns the history ``[{step, seconds, loss}]`` (the full-data
    training loss after each step; step 0 is the initial loss). ``ranks``: this
    process's place under ``torchrun`` (the module docstring)."""
    ranks = ranks or Ranks()
    source = Source(source) if isinstance(source, str) else source
    ex = source.build(seed)
    settings = {"seed": seed, "lr": lr, "damping": damping, "curvature_batch": curvature_batch}
    settings |= source.settings()
    run = _Run(
        kind,
        source.label,
        ex,
        make_optimizer(kind, ex, lr, damping),
        torch.Generator().manual_seed(seed + 1),
        out / f"checkpoint_{kind}.pt",
        settings,
        ranks,
    )
    if resume:
        _resume(run)
    if not run.history:
        run.history.append({"step": 0, "seconds": 0.0, "loss": run.full_loss()})
    bar = progress_bar(
        steps, f"{ex.name} / {kind}", progress, unit="step", initial=run.start, leave=True
    )
    for step in range(run.start, steps):
        if time_budget is not None and _elapsed(run) >= time_budget:
            break
        t0 = time.perf_counter()
        if kind in ("hf", "chain-newton"):
            batch = _curvature_batch(ex, run.gen, curvature_batch, ranks)
            run.opt.step(run.closure, curvature_batch=batch, samples=run.samples)  # type: ignore[call-arg]
        else:
            run.opt.step(run.reduced_closure)
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
    if ranks.rank == 0:
        write_csv(out / f"losses_{kind}.csv", run.history)
        save_weights(out / f"weights_{kind}.pt", ex.model)
    return run.history


def save_weights(path: Path, model: nn.Module) -> None:
    """The trained ``state_dict``, atomically: what ``hesse analyze --weights`` reads."""
    save_checkpoint(path, model.state_dict())


def _elapsed(run: _Run) -> float:
    """The run's time so far; under ``torchrun`` the slowest rank's, so that every rank
    stops at the same step."""
    group = run.ranks.group()
    return run.elapsed if group is None else group.max(run.elapsed, "agreement on the time")


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
