"""Stop when learned against the full run: the same quality in less time? (issue 15's target: scores within their
intervals in <= 1/5 of the wall time.)

`python benchmarks/time_to_concept.py [--held-out 8] [--seed 11] [--steps 400] [--json FILE]`

On the demo model, for `--held-out` individuals no model has seen (their concept sets written from `--seed`, a seed
the stopping rule was not chosen on), trains Textual Inversion twice per subject with the same settings — every step
of `--steps` (`--no-stop-when-learned`), and the default that stops when its held-back score is flat — and scores
both on the same prompts and seeds as `studio eval` does (`studio.evaluation.runner.compare_methods`: identity, prompt
fidelity and reconstruction pooled over subjects x prompts x pictures with 95% hierarchical-bootstrap intervals, and
the stopped run's margin over the full one paired by subject, prompt and seed). Prints both rows, the mean training
seconds and steps of each, the time ratio, and whether each score's paired margin interval holds 0.

Run it alone on the machine (both cores; docs/demo-model.md on autogroup): the times are wall times.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from studio.demo.evaluate import DemoJudge, DemoWorld
from studio.engine.models import ModelManager
from studio.evaluation.config import EvalConfig
from studio.evaluation.report import methods_table
from studio.evaluation.runner import compare_methods

FULL, STOPPED = "ti-all-steps", "ti"
MEASURES = ("identity", "prompt_fidelity", "reconstruction")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--held-out", type=int, default=8, help="subjects (held-out individuals)")
    parser.add_argument("--seed", type=int, default=11, help="which individuals, and the sampling seeds")
    parser.add_argument("--steps", type=int, default=None, help="the full run's steps (default: TrainConfig's)")
    parser.add_argument("--images", type=int, default=EvalConfig.images, help="pictures per prompt")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()

    cfg = EvalConfig(held_out=args.held_out, seed=args.seed, images=args.images, train_steps=args.steps,
                     skip_compliance=True)
    world, judge = DemoWorld(), DemoJudge()
    model = ModelManager().load(None)
    work = Path(tempfile.mkdtemp(prefix="time-to-concept-"))
    sets = world.held_out_sets(args.held_out, args.seed, work / "held-out")
    rows = compare_methods(model, judge, sets, [FULL, STOPPED], cfg, work / "runs", world.identity(),
                           progress=lambda m: print(m, flush=True))

    print("\n".join(methods_table(rows, "Every step against stopping when learned")))
    full, stopped = rows[FULL], rows[STOPPED]
    ratio = stopped["train_seconds"] / full["train_seconds"]
    steps = {name: rows[name]["train_steps"] for name in (FULL, STOPPED)}
    print(f"training: full {full['train_seconds']:.1f} s ({steps[FULL]:.0f} steps), stopped "
          f"{stopped['train_seconds']:.1f} s ({steps[STOPPED]:.0f} steps): {ratio:.2f} of the time (target <= 0.20)")
    margins = full.get("vs_ti", {})  # the margin over the row named "ti", the stopped run
    for measure in MEASURES:
        m = margins.get(measure)
        if m:
            holds = m["low"] <= 0 <= m["high"]
            print(f"{measure}: full - stopped {m['mean']:+.3f} [{m['low']:+.3f}, {m['high']:+.3f}] (n={m['n']}): "
                  f"{'within' if holds else 'OUTSIDE'} the interval of no difference")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "time_ratio": ratio, "mean_steps": steps}, indent=1,
                                        default=str))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
