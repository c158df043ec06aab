"""``hesse influence``: which training points help or harm the loss of given test points
(influence functions with the exact inverse curvature, `hesse.influence`)."""

from __future__ import annotations

import argparse
from typing import Any

import hesse
from hesse._cli.inputs import build_setup
from hesse._cli.output import write_json_atomic

__all__ = ["influence_command"]


def _test_indices(text: str, n: int) -> list[int]:
    """``"0,5,7"`` or ``"-5:"`` (a Python slice of the samples) -> indices."""
    try:
        if ":" in text:
            a, _, b = text.partition(":")
            return list(range(n))[slice(int(a) if a else None, int(b) if b else None)]
        out = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise SystemExit(
            f"hesse influence: --test {text!r}: expected indices such as '0,5,7' or a slice "
            "such as '-5:'"
        ) from None
    bad = [i for i in out if not -n <= i < n]
    if bad:
        raise SystemExit(f"hesse influence: --test indices {bad} are outside the {n} samples")
    return [i % n for i in out]


def influence_command(args: argparse.Namespace, progress: bool | None) -> int:
    """Scores of every training point on each test point, the top ``k`` of each kind
    printed, all of them saved with ``--json``."""
    del progress
    if args.world > 1:
        raise SystemExit("hesse influence runs in one process (not under torchrun)")
    setup = build_setup(args)
    n = len(setup.X)
    test = _test_indices(args.test, n)
    if not test:
        raise SystemExit("hesse influence: --test selects no sample")
    train = [i for i in range(n) if i not in set(test)]
    if args.k > len(train):
        raise SystemExit(
            f"hesse influence: --top-k {args.k} exceeds the {len(train)} training points"
        )
    X, y = setup.X, setup.y
    problem = hesse.Problem(setup.model, setup.loss_fn, (X[train], y[train]))
    res = hesse.influence(
        problem, (X[test], y[test]), damping=args.damping, curvature=args.curvature
    )
    helpful, harmful = hesse.top_influences(res.scores, args.k)
    print(f"model       {setup.description}")
    print(
        f"influence   {len(test)} test x {len(train)} training points, P = "
        f"{problem.num_params}, {args.curvature} + {args.damping:g} I, {res.method} engine "
        f"(residual {res.residual:.1e})"
    )
    print("score = predicted change of the test loss when the training point is removed")

    def name(i: int) -> str:
        t = y[i]
        own = t.ndim == 0 and not t.is_floating_point()
        return f"#{i}" + (f" (label {int(t)})" if own else "")

    rows: list[dict[str, Any]] = []
    for j, tj in enumerate(test):
        print(f"\ntest {name(tj)}")
        for kind, idx in (("helpful", helpful[j]), ("harmful", harmful[j])):
            cells = ", ".join(f"{name(train[int(i)])} {float(res.scores[j, i]):+.3e}" for i in idx)
            print(f"  most {kind:<8} {cells}")
        rows.append(
            {
                "test": tj,
                "helpful": [train[int(i)] for i in helpful[j]],
                "harmful": [train[int(i)] for i in harmful[j]],
            }
        )
    if args.json:
        write_json_atomic(
            args.json,
            {
                "model": setup.description,
                "curvature": args.curvature,
                "damping": args.damping,
                "method": res.method,
                "residual": res.residual,
                "test": test,
                "train": train,
                "scores": res.scores.tolist(),
                "top": rows,
            },
        )
    return 0
