"""The ``hesse`` command line: ``hesse analyze``, ``hesse check`` and ``hesse train``, a
function each; the parser and the one-line refusals (``hesse: ...``) live here."""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import signal
import sys
import threading
from typing import Any

import hesse
from hesse._cli.analysis import Analysis
from hesse._cli.inputs import DEFAULT_HIDDEN, DEFAULT_SEED, DEFAULT_TRAIN_STEPS, build_setup
from hesse._cli.output import check_output_file, format_summary, write_json_atomic
from hesse._cli.train import train_command

__all__ = ["analyze_command", "check_command", "main"]


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
    _threads(p)


def _threads(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads",
        type=_POS_INT,
        default=None,
        help="torch's intra-op threads (default: torch's, one a core); on a shared machine "
        "fewer threads than cores keep timings from collapsing",
    )


def _analyze_parser(sub: Any) -> None:
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
        help="samples for the exact section (counts, log-determinant and Newton steps "
        "from an exact factorisation; the chain sweep's memory grows as "
        "(samples x width)^2); 0 skips it",
    )
    pa.add_argument(
        "--method",
        choices=["auto", "dense", "gram", "chain"],
        default="auto",
        help="the exact section's engine (auto: the fastest the plan predicts)",
    )
    pa.add_argument(
        "--damping", type=_FLOAT, default=1e-3, help="eps of H + eps I (negative: a shift)"
    )
    pa.add_argument(
        "--report",
        metavar="DIR",
        help="write report.json and PNG figures (density, top eigenvalues, "
        "block norms, loss along the top eigenvector) into DIR",
    )
    pa.add_argument(
        "--overwrite", action="store_true", help="replace a non-empty --report directory"
    )


def _train_parser(sub: Any) -> None:
    pt = sub.add_parser(
        "train", help="train a built-in example or your model with second-order optimisers"
    )
    pt.add_argument(
        "--example",
        choices=["autoencoder", "classifier"],
        default=None,
        help="a built-in example (default classifier, when no --model is given)",
    )
    pt.add_argument(
        "--model",
        help="FILE.py:FACTORY returning an nn.Module (built after torch.manual_seed(--seed))",
    )
    pt.add_argument(
        "--data", help="with --model: .npz with arrays X and y (default: scikit-learn digits)"
    )
    pt.add_argument(
        "--weights", help="with --model: initial state_dict (torch.save; loaded weights_only)"
    )
    pt.add_argument(
        "--loss",
        choices=["auto", "ce", "mse"],
        default="auto",
        help="with --model: auto is cross-entropy for integer y, MSE otherwise",
    )
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
    pt.add_argument(
        "--out",
        default=None,
        help="output folder: checkpoints, losses_*.csv, curves.png, weights_*.pt "
        "(default hesse-train-EXAMPLE or hesse-train-FACTORY)",
    )
    pt.add_argument("--checkpoint-every", type=_NONNEG_INT, default=10, help="0: no checkpoints")
    pt.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    pt.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier run's files in --out (without it, or --resume, they are kept)",
    )
    pt.add_argument("--seed", type=int, default=0)
    pt.add_argument("--no-progress", action="store_true")
    _threads(pt)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hesse", description="Exact second-order calculus of deep networks."
    )
    parser.add_argument("--version", action="version", version=f"hesse {hesse.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _analyze_parser(sub)
    _train_parser(sub)
    pi = sub.add_parser(
        "influence",
        help="which training points help or harm given test points (influence functions)",
    )
    _common(pi)
    pi.add_argument(
        "--test",
        default="-5:",
        help="the test points among the samples: indices '0,5,7' or a slice '-5:' (default; "
        "the others are the training points)",
    )
    pi.add_argument("--top-k", dest="k", type=_POS_INT, default=3, help="points shown a kind")
    pi.add_argument(
        "--damping",
        type=_FLOAT,
        default=1e-3,
        help="eps of C + eps I: the L2 regulariser the model was trained with",
    )
    pi.add_argument("--curvature", choices=["hessian", "ggn"], default="hessian")
    pc = sub.add_parser("check", help="derivatives against finite differences")
    _common(pc)
    pc.add_argument("--hessian", action="store_true", help="also check the dense Hessian")
    return parser


def _terminated(signum: int, _frame: Any) -> None:
    """SIGTERM (a scheduler's stop, ``kill``) as an exception, so that what is being
    written is removed by its own clean-up (the report's temporary folder, a checkpoint's
    temporary file) instead of being left half-written on disk."""
    raise SystemExit(f"hesse: stopped by signal {signum}; nothing half-written was kept")


def _attach_negative_numbers(argv: list[str]) -> list[str]:
    """``--option -1e6`` as ``--option=-1e6``: argparse takes a value that starts with
    ``-`` for an option unless it looks like ``-1`` or ``-0.5`` (an exponent, ``-1e6``,
    does not), and a negative damping is a legal shift."""
    out: list[str] = []
    for i, a in enumerate(argv):
        if out and out[-1].startswith("--") and "=" not in out[-1] and a.startswith("-"):
            try:
                float(a)
            except ValueError:
                pass
            else:
                if i > 0 and argv[i - 1] == out[-1]:
                    out[-1] = f"{out[-1]}={a}"
                    continue
        out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    """The ``hesse`` command; returns the exit status."""
    args = _parser().parse_args(_attach_negative_numbers(sys.argv[1:] if argv is None else argv))
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminated) if in_main else None
    try:
        return _run(args)
    except SystemExit as err:  # one line, "hesse: ...", for every refusal
        if isinstance(err.code, str) and not err.code.startswith("hesse"):
            raise SystemExit(f"hesse: {err.code}") from None
        raise
    except OSError as err:  # a disk full, a file system that refuses a rename: one line
        where = f" ({err.filename})" if err.filename else ""
        raise SystemExit(
            f"hesse: {args.command}: could not write or read a file{where}: "
            f"{err.strerror or err}; nothing half-written was kept"
        ) from None
    finally:
        if in_main and previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _distributed() -> tuple[int, int]:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1): the process group, initialised here if the
    launcher did not (gloo on CPU, NCCL with CUDA); ``(rank, world size)``."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _run(args: argparse.Namespace) -> int:
    progress = False if args.no_progress else None
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    args.rank, args.world = _distributed()
    if args.rank > 0:  # one rank prints and writes; every rank computes
        progress = False
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the rest of the process
    if getattr(args, "json", None):
        model = getattr(args, "model", None)
        inputs = {
            "--data": getattr(args, "data", None),
            "--weights": getattr(args, "weights", None),
            "--model": model.rsplit(":", 1)[0] if model else None,
        }
        check_output_file(args.json, "--json", inputs)
    if args.command == "train":
        return train_command(args, progress)
    if args.command == "analyze":
        return analyze_command(args, progress)
    if args.command == "influence":
        from hesse._cli.influence import influence_command

        return influence_command(args, progress)
    return check_command(args)


def _check_report_dir(args: argparse.Namespace) -> None:
    """Refuse a report that cannot be drawn or written, before any heavy work."""
    if importlib.util.find_spec("matplotlib") is None:
        raise SystemExit(
            "hesse analyze: --report draws figures with matplotlib, which is not "
            "installed: pip install matplotlib"
        )
    from hesse._report.files import prepare_report_dir

    try:
        prepare_report_dir(args.report, args.overwrite)
    except ValueError as err:
        raise SystemExit(f"hesse analyze: {err}") from None


def analyze_command(args: argparse.Namespace, progress: bool | None) -> int:
    """``hesse analyze``: the summary (printed, and ``--json``), the plan, the exact
    section and the ``--report``, all from one `Analysis`."""
    setup = build_setup(args)
    analysis = Analysis(
        setup,
        max_dense=args.max_dense,
        exact_samples=args.chain_samples,
        damping=args.damping,
        progress=progress,
        method=args.method,
    )
    analysis.check_exact_memory()
    if args.report:
        _check_report_dir(args)
    summary = analysis.summary()
    if args.world > 1:
        summary["ranks"] = args.world
    print(format_summary(summary))
    if args.json and args.rank == 0:
        write_json_atomic(args.json, summary)
    if args.report:
        from hesse._report.files import write_report

        report = analysis.report(args.seed)  # every rank: the products are collective
        if args.rank == 0:
            path = write_report(report, args.report, overwrite=args.overwrite)
            print(f"\nreport: {path}/report.json and {len(os.listdir(path)) - 1} figures")
    return 0


def check_command(args: argparse.Namespace) -> int:
    """``hesse check``: derivatives against finite differences; exit status 1 on a
    failure."""
    setup = build_setup(args)
    prob = hesse.Problem(setup.model, setup.loss_fn, (setup.X, setup.y))
    report = hesse.check(prob, hessian=args.hessian or None)
    print(f"model       {setup.description}")
    print(report)
    if args.json and args.rank == 0:
        write_json_atomic(args.json, report.to_dict() | {"model": setup.description})
    return 0 if report.passed else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
