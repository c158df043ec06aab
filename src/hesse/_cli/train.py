"""``hesse train``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

__all__ = ["train_command"]


def _out_error(out: Path, ours: list[str], replace: bool) -> str | None:
    """Why ``--out`` cannot take this run, from what is on disk (``None``: it can, as far
    as can be told without making it): an earlier run's files, or a nearest existing
    folder that is a file or not writable."""
    not_files = [n for n in ours if (out / n).exists() and not (out / n).is_file()]
    if not_files:  # a folder (or a device) named like a run's file: never replaced
        return (
            f"--out {str(out)!r} holds {', '.join(not_files[:4])}, which "
            f"{'is' if len(not_files) == 1 else 'are'} not a file hesse wrote (a folder?); "
            "hesse replaces only its own files: move it or choose another --out"
        )
    there = [n for n in ours if (out / n).exists()]
    if there and not replace:
        return (
            f"--out {str(out)!r} already holds {', '.join(there[:4])}"
            f"{', ...' if len(there) > 4 else ''}; pass --resume to continue that run, "
            "--overwrite to replace it, or choose another --out"
        )
    home = out.absolute()
    while not home.exists() and home.parent != home:
        home = home.parent
    if not home.is_dir():
        return f"cannot write to --out {str(out)!r}: Not a directory ({home})"
    if not os.access(home, os.W_OK | os.X_OK):
        return f"cannot write to --out {str(out)!r}: Permission denied ({home})"
    return None


def train_command(args: argparse.Namespace, progress: bool | None) -> int:
    from hesse._cli import training as _train

    kinds = [k.strip() for k in args.optimizer.split(",") if k.strip()]
    bad = [k for k in kinds if k not in _train.OPTIMIZERS]
    if bad or not kinds:
        raise SystemExit(
            f"hesse train: unknown optimizer(s) {bad}; choose from {list(_train.OPTIMIZERS)}"
        )
    if args.model and args.example:
        raise SystemExit("hesse train: give --example or --model FILE.py:FACTORY, not both")
    if not args.model and (args.data or args.weights or args.loss != "auto"):
        raise SystemExit(
            "hesse train: --data, --weights and --loss go with --model FILE.py:FACTORY"
        )
    source = _train.Source(
        args.example or "classifier", args.model, args.data, args.loss, args.weights
    )
    ranks = _train.Ranks(getattr(args, "rank", 0), getattr(args, "world", 1))
    out = Path(args.out or source.folder)
    ours = [f"{f}_{k}.{e}" for k in kinds for f, e in _train.RUN_FILES] + ["curves.png"]
    # one rank writes (checkpoints, CSV files, curves) and checks --out: first what needs
    # no folder made (in a second, before the model, the data and torch's optimisers load)
    error = _out_error(out, ours, args.resume or args.overwrite) if ranks.rank == 0 else None
    try:
        ranks.agree(error)  # every rank stops when rank 0 cannot write
    except ValueError as err:
        raise SystemExit(f"hesse train: {err}") from None
    try:  # every optimiser on the model, before any heavy work
        ex = source.build(args.seed)
        for kind in kinds:
            _train.make_optimizer(kind, ex, args.lr, args.damping)
    except ValueError as err:
        raise SystemExit(f"hesse train: {err}") from None
    if ranks.rank == 0:  # then the folder itself, made only once the inputs are good
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / ".hesse-write-check"
            probe.touch()
            probe.unlink()
        except OSError as err:
            error = f"cannot write to --out {str(out)!r}: {err.strerror or err}"
    try:
        ranks.agree(error)  # every rank stops when rank 0 cannot write
    except ValueError as err:
        raise SystemExit(f"hesse train: {err}") from None
    print(f"{'optimizer':<14}{'steps':>7}{'seconds':>10}{'final loss':>14}{'best loss':>14}")
    for kind in kinds:
        try:
            hist = _train.train_one(
                kind,
                source,
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
                ranks=ranks,
            )
        except ValueError as err:
            raise SystemExit(f"hesse train: {err}") from None
        last = hist[-1]
        best = min(r["loss"] for r in hist)
        print(
            f"{kind:<14}{int(last['step']):>7}{last['seconds']:>10.1f}{last['loss']:>14.6g}"
            f"{best:>14.6g}"
        )
    if ranks.rank == 0:
        png = _train.plot_curves(out, source.label)
        print(f"curves: {png} (and losses_*.csv); trained weights: {out}/weights_*.pt")
    return 0
