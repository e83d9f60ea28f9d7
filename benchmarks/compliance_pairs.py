"""Models compared on the same captions and seeds: per-attribute compliance, and each model's difference from the
first paired by caption (a tighter interval than two separate `studio eval` runs give).

`python benchmarks/compliance_pairs.py MODEL_A,MODEL_B[,...] [--captions 120] [--seed 29] [--pictures 2]
[--naming position]`

Draws world captions from `--seed` (one no choice was made on), keeps the first `--captions` that name the
attribute `--naming` (every caption with `--naming ""`), makes `--pictures` pictures of each with every model at
`studio eval`'s sampling settings and seeds shared between models, and has the demo judge check them. Prints each
model's mean per attribute and, for position, colour and the mean, each model minus the first with a 95% bootstrap
interval over captions. Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from studio.demo.evaluate import DemoJudge, DemoWorld
from studio.engine.models import ModelManager
from studio.evaluation.config import EvalConfig
from studio.evaluation.drawing import generate_pictures
from studio.evaluation.stats import bootstrap_mean

SHOWN = ("position", "color", "shape", "pattern", "style", "background")


def judged(model, judge, captions, seed: int, pictures: int) -> list[dict[str, float]]:
    """Per caption: each attribute's share of checks passed over its pictures (and over its objects)."""
    cfg = EvalConfig(seed=seed)
    rows = []
    for i, (text, named) in enumerate(captions):
        passed: dict[str, list[float]] = {}
        for j in range(pictures):
            image = generate_pictures(model, text, seed=seed * 1000 + 10 * i + j, cfg=cfg)[0]
            for key, ok in judge.check(judge.predict([image])[0], named).items():
                passed.setdefault(key.split(".")[-1], []).append(float(ok))
        row = {a: float(np.mean(v)) for a, v in passed.items()}
        row["mean"] = float(np.mean(list(row.values())))
        rows.append(row)
    return rows




def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", help="comma-separated model folders; the first is the reference")
    parser.add_argument("--captions", type=int, default=120)
    parser.add_argument("--seed", type=int, default=29)
    parser.add_argument("--pictures", type=int, default=2)
    parser.add_argument("--naming", default="position", help='keep captions naming this attribute ("": all)')
    args = parser.parse_args()
    world, judge = DemoWorld(), DemoJudge()
    pool = world.captions(8 * args.captions, args.seed)
    captions = [(t, a) for t, a in pool if not args.naming or args.naming in json.dumps(a)][:args.captions]
    models = args.models.split(",")
    rows = {}
    for name in models:
        rows[name] = judged(ModelManager().load(name), judge, captions, args.seed, args.pictures)
        means = {a: round(float(np.mean([r[a] for r in rows[name] if a in r])), 3)
                 for a in (*SHOWN, "mean") if any(a in r for r in rows[name])}
        print(name, means, flush=True)
    for name in models[1:]:
        for attribute in ("position", "color", "mean"):
            d = bootstrap_mean([x[attribute] - y[attribute] for x, y in zip(rows[name], rows[models[0]])
                                if attribute in x and attribute in y], seed=args.seed)
            print(f"{attribute}: {name} - {models[0]}: {d.mean:+.3f} [{d.low:+.3f}, {d.high:+.3f}] (n={d.n} captions)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
