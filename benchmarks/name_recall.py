"""Did a build learn its named individuals? (`world.NAMED_INDIVIDUALS`, `studio.demo.build --named-rate`)

`python benchmarks/name_recall.py [--model DIR] [--names 16]`

For the first `--names` named toys: 3 pictures of "a <main colour> <name> toy" and 3 of "a <main colour> toy" (the
same seeds), each scored by the demo identity encoder against 5 clean renders of the toy (every position and
background); prints both means and the name's margin with a 95% bootstrap interval over toys. A model that never
saw the names reads one as a string of letters.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from studio.demo import world
from studio.demo.evaluate import DemoWorld
from studio.engine.models import ModelManager
from studio.evaluation.stats import bootstrap_mean

PLACES = (("left", "white"), ("right", "gray"), ("top", "black"), ("bottom", "beige"), ("center", "white"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model folder (default: the built-in demo)")
    parser.add_argument("--names", type=int, default=16)
    args = parser.parse_args()
    pipe = ModelManager().load(args.model).pipe
    identity, names = DemoWorld().identity(), world.individual_names()
    scores = {"name": [], "plain": []}
    for seed in list(world.NAMED_INDIVIDUALS)[:args.names]:
        color = world.individual_look(seed).color
        references = [world.render(world.Scene([world.individual(seed, "big", place)], background, "flat"), 64)
                      for place, background in PLACES]
        for side, prompt in (("name", f"a {color} {names[seed]} toy"), ("plain", f"a {color} toy")):
            generator = torch.Generator().manual_seed(1000 + seed % 1000)
            pictures = pipe([prompt] * 3, num_inference_steps=20, guidance_scale=7.5, generator=generator,
                            height=64, width=64).images
            scores[side].append(np.mean(identity.similarity(pictures, references)))
    margin = bootstrap_mean([a - b for a, b in zip(scores["name"], scores["plain"])])
    print(f"{args.model or 'demo'}: identity with the name {np.mean(scores['name']):.3f}, without "
          f"{np.mean(scores['plain']):.3f}, margin {margin.mean:+.3f} [{margin.low:+.3f}, {margin.high:+.3f}] "
          f"({margin.n} toys)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
