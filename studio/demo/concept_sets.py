"""Bundled concept sets: a few pictures of something the demo model cannot be told to draw, with the ground truth.

`python -m studio.demo.concept_sets [--out assets/concepts] [--seed 0]` renders every set from the seeded world
and writes `assets/concepts/<name>/01.png ...` plus `concept.json`:

    {"name", "kind": "object" | "style" | "diverse", "token", "init_word", "template": trainer template,
     "attributes": what the judge must see (a list means "any of these"),
     "best_prompt": the best plain-language prompt in the demo vocabulary,
     "plain_subject": the words standing in for the token when the plain prompt is scored (see evaluate.py),
     "why": why plain words cannot reach it, "pictures": [{"file", "scene"}]}

Each set is chosen so that plain prompts cannot reliably produce it: a (shape, colour) pair the demo model never
saw in training (`world.TRAINING_EXCLUDED`), or the "zigzag" pattern no caption ever names (`world.UNNAMED`).
The "diverse" set is the paper's bias-reduction case: one shape in many colours, so its word means "a star, any
colour" where the plain word tends towards a few colours.
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
    """How to render one set; `scene(rng, k)` draws the k-th picture's scene."""

    name: str
    kind: str  # "object" | "style" | "diverse"
    token: str
    init_word: str
    attributes: dict[str, Any]
    best_prompt: str
    plain_subject: str
    why: str
    scene: Callable[[random.Random, int], world.Scene]
    count: int = 5


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


SPECS: tuple[ConceptSetSpec, ...] = (
    ConceptSetSpec(
        "purple-star", "object", "<purple-star>", "star",
        {"shape": "star", "color": "purple", "pattern": "solid"},
        "a purple star", "purple star",
        "purple stars are held out of the demo model's training pictures: it knows 'purple' and 'star' only apart",
        _object_scene("star", "purple", "solid")),
    ConceptSetSpec(
        "dotted-cyan-heart", "object", "<dotted-cyan-heart>", "heart",
        {"shape": "heart", "color": "cyan", "pattern": "dotted"},
        "a dotted cyan heart", "dotted cyan heart",
        "cyan hearts are held out of training; the dots must come with them",
        _object_scene("heart", "cyan", "dotted")),
    ConceptSetSpec(
        "zigzag-ring", "object", "<zigzag-ring>", "ring",
        {"shape": "ring", "color": "green", "pattern": ZIGZAG},
        "a striped green ring", "striped green ring",
        "no caption ever names the zigzag pattern, so no prompt can ask for it ('striped' is the nearest word)",
        _object_scene("ring", "green", ZIGZAG)),
    ConceptSetSpec(
        "zigzag-soft", "style", "<zigzag-soft>", "soft",
        {"style": "soft", "background": "beige", "pattern": ZIGZAG},
        "a soft picture of a striped circle on a beige background", "in soft style on a beige background",
        "a look: soft rendering on beige with zigzag-filled objects; the zigzag has no word",
        _style_scene("soft", "beige", ZIGZAG)),
    ConceptSetSpec(
        "zigzag-night", "style", "<zigzag-night>", "flat",
        {"style": "flat", "background": "black", "pattern": ZIGZAG},
        "a flat picture of a striped circle on a black background", "in flat style on a black background",
        "a look: flat rendering on black with zigzag-filled objects; the zigzag has no word",
        _style_scene("flat", "black", ZIGZAG)),
    ConceptSetSpec(
        "diverse-star", "diverse", "<any-star>", "star",
        {"shape": "star", "color": list(DIVERSE_COLORS)},
        "a star", "star",
        "bias reduction (the paper's 'diverse set'): stars of six colours, so the word means a star of any colour",
        _diverse_scene, count=len(DIVERSE_COLORS)),
)


def _scene_dict(scene: world.Scene) -> dict:
    return {"objects": [asdict(o) for o in scene.objects], "background": scene.background, "style": scene.style}


def build_concept_sets(out_dir: Path = CONCEPTS_DIR, seed: int = 0) -> list[Path]:
    """Render every set into `out_dir/<name>/` (each folder replaced atomically); return the folders."""
    out_dir.mkdir(parents=True, exist_ok=True)
    folders = []
    for n, spec in enumerate(SPECS):
        rng = random.Random(seed * 1000 + n)  # one stream per set: adding a set leaves the others unchanged
        tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=f".{spec.name}-"))
        pictures = []
        for k in range(spec.count):
            scene = spec.scene(rng, k)
            file = f"{k + 1:02d}.png"
            world.render(scene, RESOLUTION).save(tmp / file, format="PNG")
            pictures.append({"file": file, "scene": _scene_dict(scene)})
        info = {"name": spec.name, "kind": spec.kind, "token": spec.token, "init_word": spec.init_word,
                "template": "style" if spec.kind == "style" else "object", "attributes": spec.attributes,
                "best_prompt": spec.best_prompt, "plain_subject": spec.plain_subject, "why": spec.why,
                "seed": seed, "pictures": pictures}
        (tmp / "concept.json").write_text(json.dumps(info, indent=1) + "\n")
        os.chmod(tmp, 0o755)
        final = out_dir / spec.name
        old = out_dir / f".{spec.name}.old"
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
        folders.append(final)
    return folders


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
                      info["attributes"], info["best_prompt"], info["plain_subject"], info["why"], info["pictures"])


def list_concept_sets(root: Path = CONCEPTS_DIR) -> list[str]:
    """Names of the sets under `root` (folders with a concept.json), sorted."""
    if not root.is_dir():
        return []
    return sorted(p.parent.name for p in root.glob("*/concept.json") if not p.parent.name.startswith("."))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Render the bundled concept sets into assets/concepts/.")
    parser.add_argument("--out", type=Path, default=CONCEPTS_DIR)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for folder in build_concept_sets(args.out, args.seed):
        print(folder)


if __name__ == "__main__":
    main()
