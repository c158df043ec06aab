"""Second-order against first-order training at equal wall-clock budget.

Usage:
    python bench/bench_train.py [--budget 20] [--examples classifier autoencoder] [--json out.json]

For each built-in example of ``hesse train`` (the deep narrow tanh classifier and the
sigmoid deep autoencoder, both on the 1797 digits, full-batch gradients, float64) and each
optimiser, every setting of a small grid runs for the same wall-clock budget in this
process (seed 0); the table reports the best setting's best training loss and writes
the curves of the best settings to ``bench/results/curves_<example>.png``.

Grids: Adam lr {1e-3, 3e-3, 1e-2}; SGD with momentum 0.9, lr {0.03, 0.1, 0.3};
HF initial damping {0.1, 1, 10} (curvature batch 256); ChainNewton (exact damped
Gauss-Newton) initial damping {0.1, 1, 10} (curvature batch 64).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from hesse._cli import training as _train

GRIDS = {
    "adam": [{"lr": 1e-3}, {"lr": 3e-3}, {"lr": 1e-2}],
    "sgd": [{"lr": 0.03}, {"lr": 0.1}, {"lr": 0.3}],
    "hf": [{"damping": 0.1}, {"damping": 1.0}, {"damping": 10.0}],
    "chain-newton": [{"damping": 0.1}, {"damping": 1.0}, {"damping": 10.0}],
}
CURVATURE_BATCH = {"hf": 256, "chain-newton": 64, "adam": 0, "sgd": 0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--budget", type=float, default=20.0, help="seconds per run")
    ap.add_argument("--examples", nargs="+", default=["classifier", "autoencoder"])
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    results = {}
    outdir = Path(__file__).parent / "results"
    outdir.mkdir(exist_ok=True)
    for example in args.examples:
        print(f"\n{example}: best training loss in {args.budget:.0f} s (best of the grid)")
        print(f"{'optimizer':<14}{'setting':<18}{'steps':>7}{'best loss':>14}")
        best_runs = Path(tempfile.mkdtemp())
        results[example] = {}
        for kind, grid in GRIDS.items():
            runs = []
            for hp in grid:
                with tempfile.TemporaryDirectory() as tmp:
                    hist = _train.train_one(
                        kind,
                        example,
                        Path(tmp),
                        steps=10**6,
                        seed=0,
                        lr=hp.get("lr"),
                        time_budget=args.budget,
                        checkpoint_every=0,
                        resume=False,
                        curvature_batch=CURVATURE_BATCH[kind] or 64,
                        progress=False,
                        damping=hp.get("damping"),
                    )
                runs.append((min(r["loss"] for r in hist), hp, hist))
            best, hp, hist = min(runs, key=lambda r: r[0])
            _train.write_csv(best_runs / f"losses_{kind}.csv", hist)
            setting = ", ".join(f"{k}={v:g}" for k, v in hp.items())
            print(f"{kind:<14}{setting:<18}{int(hist[-1]['step']):>7}{best:>14.6g}")
            results[example][kind] = {
                "best_loss": best,
                "setting": hp,
                "steps": int(hist[-1]["step"]),
                "grid": [{"setting": h, "best_loss": b} for b, h, _ in runs],
            }
        png = _train.plot_curves(best_runs, example)
        target = outdir / f"curves_{example}.png"
        png.replace(target)
        print(f"curves: {target}")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"budget": args.budget, "results": results}, indent=2)
        )


if __name__ == "__main__":
    main()
