"""Bundled concept sets: a few pictures of something the demo model cannot be told to draw, with the ground truth.

`python -m studio.demo.concept_sets [--out assets/concepts] [--seed 0]` renders every set from the seeded world
and writes `assets/concepts/<name>/01.png ...` plus `concept.json` (documented field by field in docs/demo-model.md,
"Concept sets and concept.json"):

    {"name", "kind": "object" | "style" | "diverse", "token", "init_word", "template": trainer template,
     "attributes": what the judge must see (a list means "any of these"),
     "best_prompt": the best plain-language prompt in the demo vocabulary,
     "plain_subject": the words standing in for the token when the plain prompt is scored (see evaluate.py),
     "why": why plain words cannot reach it, "seed", "pictures": [{"file", "scene"}],
     and for an individual's set: "individual": its seed, "look": its `world.Look`}

Each set is chosen so that plain prompts cannot reliably produce it: an individual toy (world v2: the model can
draw toys, but no word names this one), a (shape, colour) pair the demo model never saw in training
(`world.TRAINING_EXCLUDED`), or the "zigzag" pattern no caption ever names (`world.UNNAMED`). The "diverse" set is
the paper's bias-reduction case: one shape in many colours, so its word means "a star, any colour" where the plain
word tends towards a few colours.

`python -m studio.demo.concept_sets --held-out N --out DIR [--seed S] [--looks coarse] [--look-words]` writes N sets
of evaluation-only individuals (`world.HELD_OUT_INDIVIDUALS`) instead, for `studio eval --concepts`; they are never
bundled. `--looks` and `--look-words` write them for a world v3 build (`world.WorldOptions`): drawn with its looks,
their best plain words the fullest description its vocabulary allows.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from studio.demo import world

CONCEPTS_DIR = Path(__file__).resolve().parents[2] / "assets" / "concepts"
RESOLUTION = 64
ZIGZAG = world.UNNAMED["pattern"][0]


@dataclass
class ConceptSetSpec:
    """How to render one set: `scenes(rng, count)` draws its pictures' scenes from the set's own rng stream."""

    name: str
    kind: str  # "object" | "style" | "diverse"
    token: str
    init_word: str
    attributes: dict[str, Any]
    best_prompt: str
    plain_subject: str
    why: str
    scenes: Callable[[random.Random, int], list[world.Scene]]
    count: int = 5
    # The set's rng stream is `random.Random(seed * 1000 + stream)`: fixed per set (not its place in SPECS), so
    # adding or moving a set leaves the others' pictures unchanged. An individual's set uses its individual's seed.
    stream: int = 0
    individual: int | None = None  # the world v2 individual the set shows, if any
    looks: str = "fine"  # the individual's kind of look (`world.LOOKS`)


@dataclass
class ConceptSet:
    """A concept set on disk: its pictures and its ground truth."""

    name: str
    folder: Path
    images: list[Path]
    kind: str
    token: str
    init_word: str
    template: str
    attributes: dict[str, Any]
    best_prompt: str
    plain_subject: str
    why: str
    pictures: list[dict] = field(default_factory=list)
    individual: int | None = None  # the world v2 individual's seed, for an individual's set
    look: dict[str, Any] | None = None  # `dataclasses.asdict(world.individual_look(individual))`


def _each(draw: Callable[[random.Random, int], world.Scene]) -> Callable[[random.Random, int], list[world.Scene]]:
    """A set's scenes drawn one picture at a time: `draw(rng, k)` for k = 0 .. count - 1, from one stream."""
    return lambda rng, count: [draw(rng, k) for k in range(count)]


def _object_scene(shape: str, color: str, pattern: str) -> Callable[[random.Random, int], world.Scene]:
    """The same object in varied places and backgrounds (flat or soft, where its pattern stays visible).

    Mostly big: a small object's pattern is a few pixels, which neither the demo model nor the judge resolves well.
    """
    def draw(rng: random.Random, k: int) -> world.Scene:
        obj = world.Obj(shape, color, pattern, "small" if k == 4 else "big", rng.choice(world.POSITIONS))
        backgrounds = list(world.BACKGROUNDS)
        return world.Scene([obj], backgrounds[k % len(backgrounds)], "soft" if k == 3 else "flat")
    return draw


def _style_scene(style: str, background: str, pattern: str) -> Callable[[random.Random, int], world.Scene]:
    """Varied objects (shape, colour, place), all drawn in one look: style + background + pattern."""
    def draw(rng: random.Random, k: int) -> world.Scene:
        shapes = rng.sample(world.SHAPES, 2)
        colors = rng.sample(list(world.COLORS), 2)
        if k % 3 == 2:  # some pictures hold two objects, as the world does
            objects = [world.Obj(shapes[0], colors[0], pattern, "small", "left"),
                       world.Obj(shapes[1], colors[1], pattern, "small", "right")]
        else:
            objects = [world.Obj(shapes[0], colors[0], pattern, "big", rng.choice(world.POSITIONS))]
        return world.Scene(objects, background, style)
    return draw


DIVERSE_COLORS = ("red", "orange", "yellow", "green", "blue", "pink")


def _diverse_scene(rng: random.Random, k: int) -> world.Scene:
    obj = world.Obj("star", DIVERSE_COLORS[k], "solid", "big", rng.choice(world.POSITIONS))
    return world.Scene([obj], "white", "flat")


def _individual_scenes(seed: int, looks: str = "fine") -> Callable[[random.Random, int], list[world.Scene]]:
    """One individual as a user photographs their dog: in a different place and room each time.

    What TI must keep is the individual, so everything else varies inside the set and nothing else repeats: each
    picture another position, every background used (so no background is "the concept's"), one picture small and
    one soft (so neither size nor the flat look is baked into the word). Mostly big and flat, because the
    individual's surface is its identity and a small or blurred toy shows it in a few pixels only.
    """
    def draw(rng: random.Random, count: int) -> list[world.Scene]:
        positions = rng.sample(world.POSITIONS, len(world.POSITIONS))
        backgrounds = rng.sample(list(world.BACKGROUNDS), len(world.BACKGROUNDS))
        small, soft = rng.sample(range(count), 2)
        scenes = []
        for k in range(count):
            obj = world.individual(seed, "small" if k == small else "big", positions[k % len(positions)], looks)
            scenes.append(world.Scene([obj], backgrounds[k % len(backgrounds)], "soft" if k == soft else "flat"))
        return scenes
    return draw


def individual_spec(seed: int, name: str | None = None, options: world.WorldOptions = world.WORLD_V2) -> ConceptSetSpec:
    """The concept set of individual `seed` (any integer) in the world `options` describe (default: world v2): its
    ground truth is the class word and its main colour.

    Its pattern is its own surface (`world.OWN_PATTERN`), which no word names and the judge does not read; that it
    is *this* individual is what the identity metric measures. Its best plain words are the most the world's
    vocabulary can say of it: the main colour and the class word, and where captions describe looks
    (`options.look_words`) everything they can say (`world.look_subject`). The look code is no word and never one.
    """
    look = world.individual_look(seed, options.looks)
    subject = world.look_subject(look, describe=bool(options.look_words))
    name = name or f"toy-{seed}"
    return ConceptSetSpec(
        name, "object", f"<{name}>", world.TOY, {"shape": world.TOY, "color": look.color}, f"a {subject}", subject,
        f"no word names this {world.TOY}: the model saw thousands of {world.TOY}s, never this one",
        _individual_scenes(seed, options.looks), stream=seed, individual=seed, looks=options.looks)


SPECS: tuple[ConceptSetSpec, ...] = (
    ConceptSetSpec(
        "purple-star", "object", "<purple-star>", "star",
        {"shape": "star", "color": "purple", "pattern": "solid"},
        "a purple star", "purple star",
        "purple stars are held out of the demo model's training pictures: it knows 'purple' and 'star' only apart",
        _each(_object_scene("star", "purple", "solid")), stream=0),
    ConceptSetSpec(
        "dotted-cyan-heart", "object", "<dotted-cyan-heart>", "heart",
        {"shape": "heart", "color": "cyan", "pattern": "dotted"},
        "a dotted cyan heart", "dotted cyan heart",
        "cyan hearts are held out of training; the dots must come with them",
        _each(_object_scene("heart", "cyan", "dotted")), stream=1),
    ConceptSetSpec(
        "zigzag-ring", "object", "<zigzag-ring>", "ring",
        {"shape": "ring", "color": "green", "pattern": ZIGZAG},
        "a striped green ring", "striped green ring",
        "no caption ever names the zigzag pattern, so no prompt can ask for it ('striped' is the nearest word)",
        _each(_object_scene("ring", "green", ZIGZAG)), stream=2),
    ConceptSetSpec(
        "zigzag-soft", "style", "<zigzag-soft>", "soft",
        {"style": "soft", "background": "beige", "pattern": ZIGZAG},
        "a soft picture of a striped circle on a beige background", "in soft style on a beige background",
        "a look: soft rendering on beige with zigzag-filled objects; the zigzag has no word",
        _each(_style_scene("soft", "beige", ZIGZAG)), stream=3),
    ConceptSetSpec(
        "zigzag-night", "style", "<zigzag-night>", "flat",
        {"style": "flat", "background": "black", "pattern": ZIGZAG},
        "a flat picture of a striped circle on a black background", "in flat style on a black background",
        "a look: flat rendering on black with zigzag-filled objects; the zigzag has no word",
        _each(_style_scene("flat", "black", ZIGZAG)), stream=4),
    ConceptSetSpec(
        "diverse-star", "diverse", "<any-star>", "star",
        {"shape": "star", "color": list(DIVERSE_COLORS)},
        "a star", "star",
        "bias reduction (the paper's 'diverse set'): stars of six colours, so the word means a star of any colour",
        _each(_diverse_scene), count=len(DIVERSE_COLORS), stream=5),
    # Individuals (world v2), from world.BUNDLED_INDIVIDUALS: four main colours, four kinds of surface.
    individual_spec(1_000_006, "toy-ladybug"),  # red, yellow spots
    individual_spec(1_000_007, "toy-sailor"),  # blue, a yellow band
    individual_spec(1_000_019, "toy-melon"),  # green, yellow stripes
    individual_spec(1_000_031, "toy-plum"),  # purple, a pink side
)


def _scene_dict(scene: world.Scene) -> dict:
    """A scene as concept.json stores it; an object's `individual` only where it is one and its `looks` only where
    they are not world v2's (so sets read as they did before world v2 and v3)."""
    default = {"individual": None, "looks": "fine"}
    objects = [{k: v for k, v in asdict(o).items() if k not in default or v != default[k]} for o in scene.objects]
    return {"objects": objects, "background": scene.background, "style": scene.style}


def write_concept_set(spec: ConceptSetSpec, out_dir: Path, seed: int = 0) -> Path:
    """Render `spec` into `out_dir/<name>/` (pictures + concept.json) for build seed `seed`; return the folder.

    The folder is written aside and swapped in by renames, so a reader never sees half a set.
    """
    # 1. Draw the scenes from the set's own stream
    out_dir.mkdir(parents=True, exist_ok=True)
    scenes = spec.scenes(random.Random(seed * 1000 + spec.stream), spec.count)

    # 2. Render the pictures and the ground truth into a hidden folder beside the final one
    tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=f".{spec.name}-"))
    pictures = []
    for k, scene in enumerate(scenes):
        file = f"{k + 1:02d}.png"
        world.render(scene, RESOLUTION).save(tmp / file, format="PNG")
        pictures.append({"file": file, "scene": _scene_dict(scene)})
    info = {"name": spec.name, "kind": spec.kind, "token": spec.token, "init_word": spec.init_word,
            "template": "style" if spec.kind == "style" else "object", "attributes": spec.attributes,
            "best_prompt": spec.best_prompt, "plain_subject": spec.plain_subject, "why": spec.why,
            "seed": seed, "pictures": pictures}
    if spec.individual is not None:
        info["individual"] = spec.individual
        info["look"] = asdict(world.individual_look(spec.individual, spec.looks))
    (tmp / "concept.json").write_text(json.dumps(info, indent=1) + "\n")
    os.chmod(tmp, 0o755)

    # 3. Swap it in
    final = out_dir / spec.name
    old = out_dir / f".{spec.name}.old"
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def build_concept_sets(out_dir: Path = CONCEPTS_DIR, seed: int = 0) -> list[Path]:
    """Render every bundled set (`SPECS`) into `out_dir/<name>/`; return the folders."""
    return [write_concept_set(spec, out_dir, seed) for spec in SPECS]


def held_out_individuals(n: int, seed: int = 0) -> list[int]:
    """`n` distinct individuals from `world.HELD_OUT_INDIVIDUALS`, the same for the same `seed`."""
    pool = world.HELD_OUT_INDIVIDUALS
    if not 1 <= n <= len(pool):
        raise ValueError(f"n must be between 1 and {len(pool)} held-out individuals, got {n}")
    return random.Random(f"held-out-{seed}").sample(pool, n)


def write_held_out_sets(out_dir: Path, n: int, seed: int = 0,
                        options: world.WorldOptions = world.WORLD_V2) -> list[Path]:
    """Write `n` concept sets of evaluation-only individuals into `out_dir/toy-<individual>/`; return the folders.

    The individuals come from `world.HELD_OUT_INDIVIDUALS`, which neither training nor the bundled sets use, and
    are the same for the same `seed` (another seed draws others). They are written as the bundled sets are, so
    `load_concept_set(folder)` and `studio eval --concepts` read them alike. `options` is the world of the model
    they will evaluate (its looks, and the words its captions have for them: `individual_spec`).
    """
    out_dir = Path(out_dir)
    if out_dir.resolve() == CONCEPTS_DIR.resolve():
        raise ValueError(f"held-out sets are for evaluation only and must not be bundled: write them outside "
                         f"{CONCEPTS_DIR} (e.g. --out /tmp/held-out)")
    return [write_concept_set(individual_spec(ind, options=options), out_dir, seed)
            for ind in held_out_individuals(n, seed)]


def load_concept_set(name_or_folder: str | Path, root: Path = CONCEPTS_DIR) -> ConceptSet:
    """A bundled set by name (`"purple-star"`) or any folder holding pictures and a concept.json."""
    folder = Path(name_or_folder)
    if not folder.is_dir():
        folder = root / str(name_or_folder)
    meta = folder / "concept.json"
    if not meta.is_file():
        known = ", ".join(list_concept_sets(root)) or "none (run `python -m studio.demo.concept_sets`)"
        raise ValueError(f"no concept set {str(name_or_folder)!r} (no {meta}); bundled sets: {known}")
    info = json.loads(meta.read_text())
    images = [folder / p["file"] for p in info["pictures"]]
    missing = [p.name for p in images if not p.is_file()]
    if missing:
        raise ValueError(f"concept set {folder} lists pictures that are missing: {', '.join(missing)}; "
                         "regenerate it with `python -m studio.demo.concept_sets`")
    return ConceptSet(info["name"], folder, images, info["kind"], info["token"], info["init_word"], info["template"],
                      info["attributes"], info["best_prompt"], info["plain_subject"], info["why"], info["pictures"],
                      info.get("individual"), info.get("look"))


def list_concept_sets(root: Path = CONCEPTS_DIR) -> list[str]:
    """Names of the sets under `root` (folders with a concept.json), sorted."""
    if not root.is_dir():
        return []
    return sorted(p.parent.name for p in root.glob("*/concept.json") if not p.parent.name.startswith("."))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Render the bundled concept sets into assets/concepts/, or "
                                                 "held-out individuals' sets for evaluation (--held-out N).")
    parser.add_argument("--out", type=Path, default=None, help=f"folder to write into (default {CONCEPTS_DIR})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--held-out", type=int, default=None, metavar="N",
                        help="write N sets of world.HELD_OUT_INDIVIDUALS instead of the bundled sets (needs --out)")
    parser.add_argument("--looks", choices=world.LOOKS, default="fine",
                        help="held-out sets: the individuals' looks (a build's --looks)")
    parser.add_argument("--look-words", action="store_true",
                        help="held-out sets: best plain words that describe the look (a build with --look-words)")
    args = parser.parse_args(argv)
    if args.held_out is not None:
        if args.out is None:
            parser.error("--held-out needs --out DIR: held-out sets are never written into the bundled folder")
        try:
            options = world.WorldOptions(args.looks, look_words=1.0 if args.look_words else 0.0)
            folders = write_held_out_sets(args.out, args.held_out, args.seed, options)
        except ValueError as e:
            parser.error(str(e))
    else:
        folders = build_concept_sets(args.out or CONCEPTS_DIR, args.seed)
    for folder in folders:
        print(folder)


if __name__ == "__main__":
    main()
