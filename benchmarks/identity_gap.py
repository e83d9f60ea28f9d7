"""Where a learned word loses the individual: the identity each stage of the demo model reaches, on individuals
no model has seen (issue 16: why Textual Inversion stays far below the real pictures).

`python benchmarks/identity_gap.py [--model DIR] [--held-out 4] [--seed 17] [--steps 800] [--json FILE]`

Per subject (a concept set of `--held-out` individuals written from `--seed`), identity (the demo identity encoder's
mean cosine to the set's pictures, as `studio eval` scores it) of:
1. the real pictures against each other: the ceiling;
2. their reconstructions through the model's VAE against the other pictures: what the decoder alone keeps;
3. DreamBooth for every one of `--steps` (the UNet itself learns the individual): what the UNet can draw;
4. Textual Inversion with 3 vectors for every step, and 5. default Textual Inversion (one vector, stopped when
   learned): what a word reaches through the text encoder and the UNet's cross-attention.
3-5 are scored by `studio.evaluation.runner.compare_methods` on the reconstruction prompts and seeds `studio eval`
uses, pooled over subjects x prompts x pictures with 95% hierarchical-bootstrap intervals.
Run it alone on the machine (both cores); 4 subjects take ~9 minutes on the 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from studio.demo.evaluate import DemoJudge, DemoWorld
from studio.demo.vae import vae_roundtrip
from studio.engine.models import ModelManager
from studio.evaluation.config import EvalConfig
from studio.evaluation.runner import compare_methods
from studio.evaluation.stats import hierarchical_bootstrap

METHODS = ("dreambooth-all-steps", "multi3-all-steps", "ti")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model folder (default: the built-in demo)")
    parser.add_argument("--held-out", type=int, default=4, help="subjects (held-out individuals)")
    parser.add_argument("--seed", type=int, default=17, help="which individuals, and the sampling seeds")
    parser.add_argument("--steps", type=int, default=800, help="training steps of the runs that use every step")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()

    world, judge = DemoWorld(), DemoJudge()
    model = ModelManager().load(args.model)
    identity = world.identity()
    work = Path(tempfile.mkdtemp(prefix="identity-gap-"))
    sets = world.held_out_sets(args.held_out, args.seed, work / "held-out")
    roundtrip = vae_roundtrip(model.pipe.vae)
    ceiling, decoded = [], []
    for cs in sets.values():
        pictures = [Image.open(p).convert("RGB") for p in cs.images]
        ceiling.append([identity.cross_similarity(pictures)])
        rebuilt = roundtrip(pictures)
        decoded.append([[identity.similarity([r], pictures[:i] + pictures[i + 1:])[0] for i, r in enumerate(rebuilt)]])
    cfg = EvalConfig(held_out=args.held_out, seed=args.seed, train_steps=args.steps, skip_compliance=True)
    rows = {"real pictures (ceiling)": hierarchical_bootstrap(ceiling, cfg.resamples, cfg.seed).as_dict(),
            "their VAE reconstructions": hierarchical_bootstrap(decoded, cfg.resamples, cfg.seed).as_dict()}
    methods = compare_methods(model, judge, sets, list(METHODS), cfg, work / "methods", identity)
    for name in METHODS:
        rows[name] = {**methods[name]["identity"], "train_steps": methods[name]["train_steps"],
                      "train_seconds": methods[name]["train_seconds"]}
    print(f"{len(sets)} unseen individuals (seed {args.seed}), identity, mean [95% interval] (n):")
    for name, row in rows.items():
        extra = f"  ({row['train_steps']:.0f} steps, {row['train_seconds']:.0f} s)" if "train_steps" in row else ""
        print(f"  {name:28s} {row['mean']:.2f} [{row['low']:.2f}, {row['high']:.2f}] (n={row['n']}){extra}")
    if args.json:
        args.json.write_text(json.dumps({"subjects": sorted(sets), "rows": rows,
                                         "per_subject_ceiling": [float(np.mean(c)) for c in ceiling]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
