"""Two learned concepts in one prompt, method against method: are both there, and is each recognisable as itself?

`python benchmarks/two_concepts.py --work WORK --methods ti,pivotal,perfusion [--seeds 4] [--out F.json]`

WORK is a `studio eval --held-out N --methods ... --work-dir WORK` folder: its held-out sets (`WORK/held-out/*`) and
what each method learned on them (TI's files in WORK, the others' in WORK/methods/<method>/). For every pair of sets
and every seed, each method draws "a <a> and a <b>" at `studio eval`'s sampling settings with the same seeds. A picture
is split into its left and right halves (the world puts two objects left and right), each half shown alone on the
picture's background; the demo's identity encoder scores each half against every held-out set's own pictures. Both
concepts are *recognisable* when each half's closest set is one of the pair's two, a different one each (top-1
identification among all the held-out individuals, as a person picking each toy out of the line-up would). Reported
per method: that share, the judge's count of two objects, and each method's shares minus the others' paired by pair
and seed (95% hierarchical bootstrap over pairs, then seeds). `--also NAME=FOLDER` adds a method whose files are in
FOLDER (a variant trained apart). Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
from PIL import Image

from studio.demo.concept_sets import load_concept_set
from studio.demo.evaluate import DemoJudge, DemoWorld
from studio.engine.learned.registry import read_learned
from studio.engine.models import ModelManager
from studio.evaluation.config import EvalConfig
from studio.evaluation.drawing import generate_pictures
from studio.evaluation.stats import hierarchical_bootstrap, paired_margin


def learned_file(work: Path, method: str, token: str, elsewhere: dict[str, Path] | None = None) -> Path:
    """Where `studio eval` wrote `method`'s result for the set of `token` (TI's in WORK itself, the others' in
    WORK/methods/<method>), or the folder `elsewhere` gives for it."""
    folder = (elsewhere or {}).get(method) or (work if method == "ti" else work / "methods" / method)
    return folder / f"{token.strip('<>')}.safetensors"


def alone(picture: Image.Image, side: str) -> Image.Image:
    """One half of `picture` on its background: the other half painted with the picture's corner colour."""
    array = np.asarray(picture.convert("RGB")).copy()
    half = array.shape[1] // 2
    background = np.median(np.concatenate([array[:4, :4], array[:4, -4:], array[-4:, :4], array[-4:, -4:]]).reshape(
        -1, 3), axis=0).astype(np.uint8)
    if side == "left":
        array[:, half:] = background
    else:
        array[:, :half] = background
    return Image.fromarray(array)


def recognisable(identity, picture: Image.Image, references: list[list[Image.Image]], pair: tuple[int, int]) -> bool:
    """Whether the picture's two halves are identified as the pair's two concepts: each half's closest set among
    all `references` (the concepts of the pair and the other held-out sets) is one of the pair, a different one each."""
    halves = [alone(picture, side) for side in ("left", "right")]
    scores = np.array([identity.similarity(halves, refs) for refs in references])  # [set, half]
    return sorted(int(k) for k in scores.argmax(axis=0)) == sorted(pair)


def draw_pairs(model, judge, identity, sets: dict, methods: list[str], work: Path, seeds: int,
               cfg: EvalConfig, elsewhere: dict[str, Path] | None = None) -> dict[str, dict[str, list]]:
    """Per method: `recognised` and `two_objects` as pairs x seeds x 1 (the bootstrap's nesting)."""
    out = {m: {"recognised": [], "two_objects": []} for m in methods}
    names = sorted(sets)
    references = [[Image.open(p).convert("RGB") for p in sets[name].images] for name in names]
    for a, b in itertools.combinations(names, 2):
        sa, sb = sets[a], sets[b]
        for method in methods:
            things = [read_learned(learned_file(work, method, cs.token, elsewhere)) for cs in (sa, sb)]
            pictures = generate_pictures(model, f"a {sa.token} and a {sb.token}", things, seeds, cfg.seed, cfg)
            out[method]["recognised"].append(
                [[float(recognisable(identity, p, references, (names.index(a), names.index(b))))] for p in pictures])
            counts = [int(prediction.get("count", 0)) == 2 for prediction in judge.predict(pictures)]
            out[method]["two_objects"].append([[float(c)] for c in counts])
    return out


def summary(scores: dict[str, dict[str, list]]) -> dict:
    """Each method's shares with intervals, and each method minus each other paired."""
    result = {m: {k: hierarchical_bootstrap(v).__dict__ for k, v in parts.items()} for m, parts in scores.items()}
    for first, second in itertools.permutations(scores, 2):
        for key in ("recognised", "two_objects"):
            result[first][f"{key}_minus_{second}"] = paired_margin(scores[first][key], scores[second][key]).__dict__
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="a studio eval --held-out --methods work folder")
    parser.add_argument("--methods", default="ti,pivotal,perfusion")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--seed", type=int, default=41)
    parser.add_argument("--model", default=None)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--also", action="append", default=[], metavar="NAME=FOLDER")
    args = parser.parse_args(argv)
    elsewhere = {name: Path(folder) for name, _, folder in (spec.partition("=") for spec in args.also)}
    world, judge = DemoWorld.for_model(args.model), DemoJudge()
    sets = {f.name: load_concept_set(f) for f in sorted((args.work / "held-out").iterdir()) if f.is_dir()}
    model = ModelManager().load(args.model)
    methods = args.methods.split(",") + list(elsewhere)
    scores = draw_pairs(model, judge, world.identity(), sets, methods, args.work, args.seeds, EvalConfig(seed=args.seed),
                        elsewhere)
    result = {"pairs": len(list(itertools.combinations(sets, 2))), "seeds": args.seeds, "seed": args.seed,
              "methods": summary(scores)}
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
