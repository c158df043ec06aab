"""The ``hesse`` command line: ``hesse analyze`` and ``hesse check``.

The only module that prints or writes files; the library never imports it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import hesse
from hesse._autodiff.problem import float64_problem
from hesse._cli.training import load_digits_data
from hesse._report.compute import build_report, prepare_report_dir, write_report
from hesse._util.files import atomic_path
from hesse._util.memory import MemoryBudgetError, check_memory

DEFAULT_HIDDEN = 32
DEFAULT_TRAIN_STEPS = 300
DEFAULT_SEED = 0
NEGATIVE_TOL = 1e-9  # the chain section counts eigenvalues below -NEGATIVE_TOL as negative


@dataclass
class Setup:
    """What a subcommand works on: a model, its loss, its data and a description."""

    model: nn.Module
    loss_fn: nn.Module
    X: Tensor
    y: Tensor
    description: str


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


def build_setup(args: argparse.Namespace) -> Setup:
    dtype = {"float64": torch.float64, "float32": torch.float32}[args.dtype]
    if args.data:
        X, y = load_npz(args.data, dtype)
        data_desc = f"{args.data} ({len(X)} samples)"
    else:
        X, y = load_digits_data(dtype)
        data_desc = f"scikit-learn digits ({len(X)} samples)"
    if args.samples and args.samples < len(X):
        data_desc = data_desc.replace(
            f"({len(X)} samples)", f"(first {args.samples} of {len(X)} samples)"
        )
        X, y = X[: args.samples], y[: args.samples]
    if args.model:
        model = load_factory(args.model)
        desc = f"{args.model}"
    else:
        model = default_model(args.hidden, args.seed)
        desc = f"tanh MLP 64-{args.hidden}-10"
    model = model.to(dtype)
    try:
        with torch.no_grad():
            model(X[:1])
    except Exception as err:  # the user's model meets the user's data: any error
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SystemExit(
            f"the model does not accept the data's inputs (one sample of shape "
            f"{tuple(X.shape[1:])}): {first}"
        ) from None
    if args.weights:
        if not Path(args.weights).is_file():
            raise SystemExit(f"--weights: no such file {args.weights!r}")
        try:
            state = torch.load(args.weights, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        except Exception as err:  # torch raises several types for foreign or bad files
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise SystemExit(
                f"--weights: {args.weights!r} is not a state_dict of this model ({first})"
            ) from None
        desc += f", weights {args.weights}"
    loss_kind = args.loss
    if loss_kind == "auto":
        loss_kind = "ce" if not y.is_floating_point() else "mse"
    loss_fn = nn.CrossEntropyLoss() if loss_kind == "ce" else nn.MSELoss()
    if loss_kind == "mse" and y.ndim == 1:  # one regression target a sample: (N, 1)
        y = y.reshape(-1, 1)
    setup = Setup(model, loss_fn, X, y, f"{desc} on {data_desc}, {type(loss_fn).__name__}")
    if not args.model and not args.weights and args.train_steps > 0:
        secs = train_default(setup, args.train_steps, args.seed)
        setup.description += f", trained {args.train_steps} Adam steps ({secs:.1f} s)"
    model.eval()
    return setup


# ----------------------------------------------------------------------------- output
def check_output_file(path: str, flag: str) -> None:
    """Refuse, before any work, an output file that cannot be written: its folder must
    exist (no folders are created: a typo would make a tree) and be writable, and the
    path must not be a folder."""
    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise SystemExit(f"hesse: {flag} {path!r} is a folder; expected a file path")
    if not parent.is_dir():
        raise SystemExit(
            f"hesse: {flag} {path!r}: the folder {str(parent)!r} does not exist "
            "(create it first; hesse creates no folders for an output file)"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SystemExit(f"hesse: {flag} {path!r}: the folder {str(parent)!r} is not writable")


def write_json_atomic(path: str, payload: dict[str, Any]) -> None:
    """Write JSON to a temporary file in the target folder, then rename it into place,
    so that no half-written file is ever left at ``path``."""
    target = Path(path)
    with atomic_path(target) as tmp, open(tmp, "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")


def analyze(
    setup: Setup, max_dense: int, progress: bool | None
) -> tuple[dict[str, Any], hesse.Decomposition | None, Tensor | None]:
    """The exact curvature summary of a problem, as a JSON-ready dict, with the dense
    decomposition and the Hessian's eigenvalues it was computed from (``None`` beyond
    ``max_dense``)."""
    prob = hesse.Problem(setup.model, setup.loss_fn, (setup.X, setup.y))
    t0 = time.perf_counter()
    loss, g = hesse.loss_and_gradient(prob)
    P = prob.num_params
    out: dict[str, Any] = {
        "model": setup.description,
        "num_params": P,
        "num_samples": prob.num_samples,
        "dtype": str(prob.dtype).replace("torch.", ""),
        "loss": float(loss),
        "grad_norm": float(g.norm()),
    }
    dec = evals = None
    if P <= max_dense:
        dec = hesse.decompose(prob, progress=progress)
        evals = torch.linalg.eigvalsh(dec.hessian)
        tol = float(evals.abs().max()) * P * torch.finfo(prob.dtype).eps
        out |= {
            "method": "dense",
            "trace": float(dec.hessian.trace()),
            "eig_max": float(evals[-1]),
            "eig_min": float(evals[0]),
            "num_negative": int((evals < -tol).sum()),
            "num_zero": int((evals.abs() <= tol).sum()),
            "zero_tol": tol,
            "ggn_trace": float(dec.ggn.trace()),
            "residual_trace": float(dec.residual.trace()),
        }
        layers, counts, norms = dec.layer_blocks(prob)
        rows = [
            {
                "layer": layer,
                "params": count,
                **{f"{k}_norm": float(m[i, i]) for k, m in norms.items()},
            }
            for i, (layer, count) in enumerate(zip(layers, counts, strict=True))
        ]
        out["layers"] = rows
    else:
        from scipy.sparse.linalg import eigsh

        lin = hesse.HessianOperator(prob).to_scipy()
        top = eigsh(lin, k=1, which="LA", return_eigenvectors=False)
        bottom = eigsh(lin, k=1, which="SA", return_eigenvectors=False)
        out |= {"method": "lanczos", "eig_max": float(top[0]), "eig_min": float(bottom[0])}
    out["seconds"] = time.perf_counter() - t0
    return out, dec, evals


def check_chain_memory(setup: Setup, samples: int) -> None:
    """Refuse, before any other work, a chain section that would not fit in memory."""
    if not isinstance(setup.model, nn.Sequential):
        return
    n = min(samples, len(setup.X))
    prob = float64_problem(setup.model, setup.loss_fn, setup.X[:n], setup.y[:n])
    try:
        est = hesse.Chain.from_problem(prob).memory_estimate()
        check_memory(
            est,
            f"the chain section ({n} samples)",
            "pass a smaller --chain-samples (its memory grows as (samples x width)^2), "
            "or 0 to skip it",
        )
    except (ValueError, TypeError):
        return  # not a chain the solver takes: the section says so later
    except MemoryBudgetError as err:
        raise SystemExit(f"hesse analyze: {err}") from None


def chain_summary(
    setup: Setup, samples: int, damping: float, max_dense: int, progress: bool | None = None
) -> dict[str, Any]:
    """Exact chain-sweep quantities on the first ``samples`` samples: the number of
    negative Hessian eigenvalues, ``log det(H + eps I)`` and the damped Newton and
    Gauss-Newton steps' predicted loss change, cross-checked against the dense
    eigendecomposition of the same problem when it is small enough."""
    t0 = time.perf_counter()
    # always float64 (on a copy): counts near zero and log-determinants need the digits
    prob = float64_problem(setup.model, setup.loss_fn, setup.X[:samples], setup.y[:samples])
    # "negative" = below -tau: a Hessian may have many eigenvalues within rounding of 0
    tau = NEGATIVE_TOL
    out: dict[str, Any] = {"samples": prob.num_samples, "damping": damping, "negative_below": -tau}
    out["num_negative"] = hesse.count_eigenvalues(prob, below=-tau, progress=progress)
    f = hesse.factorize(prob, damping, progress=progress)
    sign, logabs = f.logdet()
    out |= {"logdet_sign": sign, "logdet": logabs, "inertia": list(f.inertia())}
    st = f.status
    out["pivoting"] = {"max_delayed": st.max_delayed, "growth": st.growth, "kinds": st.kinds}
    for curvature in ("hessian", "ggn"):
        st = hesse.newton_step(prob, damping, curvature, method="chain")
        out[f"{curvature}_step_predicted_change"] = st.predicted_change
        out[f"{curvature}_step_norm"] = float(st.step.norm())
    out["seconds"] = time.perf_counter() - t0
    if prob.num_params <= max_dense:
        H = hesse.hessian(prob, progress=False)
        ev = torch.linalg.eigvalsh(H)
        shifted = ev + damping
        out["dense_check"] = {
            "num_negative": int((ev < -tau).sum()),
            "logdet": float(torch.log(shifted.abs()).sum()),
            "inertia": [int((shifted < 0).sum()), 0, int((shifted > 0).sum())],
        }
    return out


def format_summary(s: dict[str, Any]) -> str:
    lines = [
        f"model       {s['model']}",
        f"parameters  {s['num_params']}    samples {s['num_samples']}    dtype {s['dtype']}",
        f"loss        {s['loss']:.6g}    |grad| {s['grad_norm']:.3e}",
    ]
    if s["method"] == "dense":
        lines += [
            f"Hessian     trace {s['trace']:.6g}    eigenvalues in "
            f"[{s['eig_min']:.4g}, {s['eig_max']:.4g}]",
            f"            {s['num_negative']} negative, {s['num_zero']} zero "
            f"(|lambda| <= {s['zero_tol']:.1e}) of {s['num_params']}",
            f"split       trace H = trace GGN {s['ggn_trace']:.6g} + trace residual "
            f"{s['residual_trace']:.4g}",
            "",
            f"{'layer':<12}{'params':>8}{'|H| block':>13}{'|GGN|':>12}{'|residual|':>13}",
        ]
        for r in s["layers"]:
            lines.append(
                f"{r['layer']:<12}{r['params']:>8}{r['hessian_norm']:>13.4e}"
                f"{r['ggn_norm']:>12.4e}{r['residual_norm']:>13.4e}"
            )
    else:
        lines.append(
            f"Hessian     eigenvalues in [{s['eig_min']:.4g}, {s['eig_max']:.4g}] (Lanczos; "
            f"P > --max-dense, so no trace or counts)"
        )
    lines.append(f"({s['seconds']:.1f} s)")
    c = s.get("chain")
    if c:

        def row(label: str, value: str) -> str:
            return f"  {label:<31}{value}"

        lines += [
            "",
            f"chain sweep, exact, linear in depth (first {c['samples']} samples, "
            f"eps = {c['damping']:g}, float64):",
            row(f"Hessian eigenvalues < {c['negative_below']:.0e}", str(c["num_negative"])),
            row(
                "log|det(H + eps I)|",
                f"{c['logdet']:.6g}   (sign {c['logdet_sign']:+.0f}; "
                f"inertia {c['inertia'][0]} negative, {c['inertia'][2]} positive)",
            ),
            row(
                "predicted loss change",
                f"Newton {c['hessian_step_predicted_change']:.4e}, "
                f"Gauss-Newton {c['ggn_step_predicted_change']:.4e}",
            ),
            row(
                "pivoting (stable sweep)",
                f"largest delayed front {c['pivoting']['max_delayed']}, "
                f"growth {c['pivoting']['growth']:.2g}",
            ),
        ]
        if "dense_check" in c:
            d = c["dense_check"]
            lines.append(
                row(
                    "dense check (same samples)",
                    f"{d['num_negative']} below, log|det| {d['logdet']:.6g}",
                )
            )
        lines.append(f"  ({c['seconds']:.1f} s)")
    elif "chain_skipped" in s:
        lines += ["", f"chain sweep skipped: {s['chain_skipped']}"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main
def _number(kind: type, low: float | None, strict: bool, what: str) -> Any:
    """An argparse type: a finite ``kind`` number above ``low`` (``strict``: not equal)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}; got {text!r}") from None
        if not math.isfinite(value) or (
            low is not None and (value <= low if strict else value < low)
        ):
            raise argparse.ArgumentTypeError(f"expected {what}; got {text!r}")
        return value

    return parse


_POS_INT = _number(int, 0, True, "a positive integer")
_NONNEG_INT = _number(int, 0, False, "an integer >= 0")
_POS_FLOAT = _number(float, 0.0, True, "a positive finite number")
_FLOAT = _number(float, None, False, "a finite number")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        help="FILE.py:FACTORY returning an nn.Module (default: built-in "
        "tanh MLP trained on digits)",
    )
    p.add_argument("--data", help=".npz with arrays X and y (default: scikit-learn digits)")
    p.add_argument("--weights", help="state_dict saved with torch.save (loaded weights_only)")
    p.add_argument(
        "--loss",
        choices=["auto", "ce", "mse"],
        default="auto",
        help="loss; auto: cross-entropy for integer y, MSE otherwise",
    )
    p.add_argument(
        "--samples", type=_NONNEG_INT, default=0, help="use only the first N samples (0: all)"
    )
    p.add_argument("--hidden", type=_POS_INT, default=DEFAULT_HIDDEN, help="built-in model's width")
    p.add_argument(
        "--train-steps",
        type=_NONNEG_INT,
        default=DEFAULT_TRAIN_STEPS,
        help="Adam steps for the built-in model (0: analyse at initialisation)",
    )
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    p.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    p.add_argument("--no-progress", action="store_true", help="never show progress bars")


def train_command(args: argparse.Namespace, progress: bool | None) -> int:
    from hesse._cli import training as _train

    kinds = [k.strip() for k in args.optimizer.split(",") if k.strip()]
    bad = [k for k in kinds if k not in _train.OPTIMIZERS]
    if bad or not kinds:
        raise SystemExit(
            f"hesse train: unknown optimizer(s) {bad}; choose from {list(_train.OPTIMIZERS)}"
        )
    out = Path(args.out or f"hesse-train-{args.example}")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".hesse-write-check"
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise SystemExit(
            f"hesse train: cannot write to --out {str(out)!r}: {err.strerror or err}"
        ) from None
    print(f"{'optimizer':<14}{'steps':>7}{'seconds':>10}{'final loss':>14}{'best loss':>14}")
    for kind in kinds:
        try:
            hist = _train.train_one(
                kind,
                args.example,
                out,
                steps=args.steps,
                seed=args.seed,
                lr=args.lr,
                time_budget=args.time_budget,
                checkpoint_every=args.checkpoint_every,
                resume=args.resume,
                curvature_batch=args.curvature_batch,
                progress=progress,
                damping=args.damping,
            )
        except ValueError as err:
            raise SystemExit(f"hesse train: {err}") from None
        last = hist[-1]
        best = min(r["loss"] for r in hist)
        print(
            f"{kind:<14}{int(last['step']):>7}{last['seconds']:>10.1f}{last['loss']:>14.6g}"
            f"{best:>14.6g}"
        )
    png = _train.plot_curves(out, args.example)
    print(f"curves: {png} (and losses_*.csv)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="hesse", description="Exact second-order calculus of deep networks."
    )
    parser.add_argument("--version", action="version", version=f"hesse {hesse.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    pa = sub.add_parser("analyze", help="exact curvature summary of a model")
    _common(pa)
    pa.add_argument(
        "--max-dense",
        type=_NONNEG_INT,
        default=6000,
        help="largest P for the dense Hessian (beyond: Lanczos extremes only)",
    )
    pa.add_argument(
        "--chain-samples",
        type=_NONNEG_INT,
        default=128,
        help="samples for the exact chain sweep (its memory grows as "
        "(samples x width)^2); 0 skips it",
    )
    pa.add_argument("--damping", type=_FLOAT, default=1e-3, help="eps of H + eps I")
    pa.add_argument(
        "--report",
        metavar="DIR",
        help="write report.json and PNG figures (density, top eigenvalues, "
        "block norms, loss along the top eigenvector) into DIR",
    )
    pa.add_argument(
        "--overwrite", action="store_true", help="replace a non-empty --report directory"
    )
    pt = sub.add_parser("train", help="train a built-in example with second-order optimisers")
    pt.add_argument("--example", choices=["autoencoder", "classifier"], default="classifier")
    pt.add_argument(
        "--optimizer",
        default="hf,chain-newton,adam,sgd",
        help="comma-separated: hf, chain-newton, adam, sgd (each runs in turn)",
    )
    pt.add_argument("--steps", type=_POS_INT, default=100)
    pt.add_argument(
        "--time-budget",
        type=_POS_FLOAT,
        default=None,
        help="seconds of optimisation per optimiser (stops early)",
    )
    pt.add_argument(
        "--lr", type=_POS_FLOAT, default=None, help="learning rate (default per optimiser)"
    )
    pt.add_argument(
        "--damping",
        type=_POS_FLOAT,
        default=None,
        help="initial damping of hf and chain-newton (default 1)",
    )
    pt.add_argument(
        "--curvature-batch",
        type=_POS_INT,
        default=64,
        help="samples for HF's and ChainNewton's curvature per step",
    )
    pt.add_argument("--out", default=None, help="output folder (default hesse-train-EXAMPLE)")
    pt.add_argument("--checkpoint-every", type=_NONNEG_INT, default=10, help="0: no checkpoints")
    pt.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    pt.add_argument("--seed", type=int, default=0)
    pt.add_argument("--no-progress", action="store_true")
    pc = sub.add_parser("check", help="derivatives against finite differences")
    _common(pc)
    pc.add_argument("--hessian", action="store_true", help="also check the dense Hessian")
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except SystemExit as err:  # one line, "hesse: ...", for every refusal
        if isinstance(err.code, str) and not err.code.startswith("hesse"):
            raise SystemExit(f"hesse: {err.code}") from None
        raise


def _run(args: argparse.Namespace) -> int:
    progress = False if args.no_progress else None
    if getattr(args, "json", None):
        check_output_file(args.json, "--json")
    if args.command == "train":
        return train_command(args, progress)

    setup = build_setup(args)
    if args.command == "analyze" and args.chain_samples > 0:
        check_chain_memory(setup, args.chain_samples)
    if args.command == "analyze":
        if args.report and importlib.util.find_spec("matplotlib") is None:
            raise SystemExit(
                "hesse analyze: --report draws figures with matplotlib, which is not "
                "installed: pip install matplotlib"
            )
        if args.report:  # refuse a bad report directory before any heavy work
            try:
                prepare_report_dir(args.report, args.overwrite)
            except ValueError as err:
                raise SystemExit(f"hesse analyze: {err}") from None
        summary, dec, evals = analyze(setup, args.max_dense, progress)
        if args.chain_samples > 0:
            if isinstance(setup.model, nn.Sequential):
                summary["chain"] = chain_summary(
                    setup, args.chain_samples, args.damping, args.max_dense, progress
                )
            else:
                summary["chain_skipped"] = "the model is not an nn.Sequential"
        print(format_summary(summary))
        if args.json:
            write_json_atomic(args.json, summary)
        if args.report:
            prob = hesse.Problem(setup.model, setup.loss_fn, (setup.X, setup.y))
            rep = build_report(
                prob,
                description=setup.description,
                max_dense=args.max_dense,
                chain_samples=args.chain_samples,
                seed=args.seed,
                progress=progress,
                decomposition=dec,
                hessian_eigenvalues=evals,
            )
            path = write_report(rep, args.report, overwrite=args.overwrite)
            print(f"\nreport: {path}/report.json and {len(os.listdir(path)) - 1} figures")
        return 0
    prob = hesse.Problem(setup.model, setup.loss_fn, (setup.X, setup.y))
    report = hesse.check(prob, hessian=args.hessian or None)
    print(f"model       {setup.description}")
    print(report)
    if args.json:
        write_json_atomic(args.json, report.to_dict() | {"model": setup.description})
    return 0 if report.passed else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
