"""The demo world as `studio.evaluation` takes it: its judge (`DemoJudge`), its captions, renders, bundled and
held-out concept sets and identity encoder (`DemoWorld`). `studio eval` and the Evaluate tab build these and pass
them in; the evaluation itself imports nothing of the demo.

    run_evaluation(None, DemoJudge(), DemoWorld(), EvalConfig(prompts=20))
    score_concept(model, concept, judge=DemoJudge(), concept_set=concept_set_for(concept.token))
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Sequence

from PIL import Image

from studio.demo import world
from studio.demo.concept_sets import ConceptSet, list_concept_sets, load_concept_set, write_held_out_sets
from studio.demo.identity import IDENTITY_DIR, IdentityEncoder
from studio.demo.judge import JUDGE_DIR, VOCAB, Judge, check


class DemoJudge:
    """The demo's judge (studio/demo/judge.py) with its checking rule; loads its network on first use."""

    colors = len(VOCAB["color"])

    def __init__(self, folder: Path | str = JUDGE_DIR):
        self.folder = folder
        self._judge: Judge | None = None

    @property
    def judge(self) -> Judge:
        """The loaded judge; a missing one raises JudgeError, which says how to train it."""
        if self._judge is None:
            self._judge = Judge.load(self.folder)
        return self._judge

    @property
    def info(self) -> dict[str, Any]:
        """judge.json: vocabularies, architecture, training settings and the measured accuracy."""
        return self.judge.info

    def predict(self, images: Sequence[Image.Image]) -> list[dict[str, Any]]:
        """One reading per picture (studio.demo.judge.Judge.predict)."""
        return self.judge.predict(images)

    def check(self, prediction: dict[str, Any], attributes: dict[str, Any]) -> dict[str, bool]:
        """Which wanted attributes a reading shows (studio.demo.judge.check: object pairing, "any of" lists)."""
        return check(prediction, attributes)

    def ground_truths(self) -> list[str]:
        """The bundled concept sets' names."""
        return list_concept_sets()


class DemoWorld:
    """The procedural world (studio/demo/world.py), its bundled concept sets (assets/concepts/), its held-out
    individuals and its identity encoder (studio/demo/identity.py, loaded on first use).

    `options` is the world a model was built in (`DemoWorld.for_model` reads it from the build's log): held-out
    individuals are drawn with its looks and compared with the fullest plain words its captions allow. Base
    compliance captions are world v2's whatever the options, so every build is asked the same prompts."""

    def __init__(self, identity_folder: Path | str = IDENTITY_DIR, options: world.WorldOptions = world.WORLD_V2):
        self.identity_folder = identity_folder
        self.options = options
        self._identity: IdentityEncoder | None = None

    @classmethod
    def for_model(cls, model: str | Path | None, identity_folder: Path | str = IDENTITY_DIR) -> "DemoWorld":
        """The world the demo-model build in folder `model` was trained in (its training_log.json's
        "world_options"); world v2 for a build from before world v3, a model without a log or None (the built-in
        demo, world v2)."""
        log = Path(model) / "training_log.json" if model else None
        saved = json.loads(log.read_text()).get("world_options") if log is not None and log.is_file() else None
        return cls(identity_folder, world.WorldOptions(**saved) if saved else world.WORLD_V2)

    def identity(self) -> IdentityEncoder:
        """The identity encoder; a missing one raises IdentityError (a ValueError), which says how to train it."""
        if self._identity is None:
            self._identity = IdentityEncoder.load(self.identity_folder)
        return self._identity

    def held_out_sets(self, n: int, seed: int, folder: Path) -> dict[str, ConceptSet]:
        """`n` individuals from `world.HELD_OUT_INDIVIDUALS` (no model or bundled set has seen them), rendered as
        concept sets of this world under `folder` (concept_sets.write_held_out_sets) and keyed by name."""
        sets = [load_concept_set(f) for f in write_held_out_sets(Path(folder), n, seed, self.options)]
        return {cs.name: cs for cs in sets}

    def captions(self, n: int, seed: int) -> list[tuple[str, dict[str, Any]]]:
        """`n` captions of training scenes (held-out pairs excluded), each with what it names (`caption_attributes`)."""
        rng = random.Random(seed + 7919)  # not the demo model's training seed stream
        out = []
        for _ in range(n):
            scene = world.sample_scene(rng, training=True)
            text = world.caption(scene, rng)
            out.append((text, caption_attributes(scene, text)))
        return out

    def captioned_pictures(self, n: int, seed: int, size: int) -> list[tuple[Image.Image, str]]:
        """`n` training-distribution renders at `size` px with their captions (world.sample_dataset)."""
        return [(image, text) for image, text, _ in world.sample_dataset(n, seed=seed, size=size)]

    def plain_render(self, shape: str, color: str) -> Image.Image:
        """A big solid `color` `shape` at the centre, flat on white."""
        return world.render(world.Scene([world.Obj(shape, color, "solid", "big", "center")], "white", "flat"))

    def concept_sets(self, names: Sequence[str] | None) -> dict[str, ConceptSet]:
        """The named sets (names or folders; None: every bundled one), keyed as named."""
        names = list(names or list_concept_sets())
        if not names:
            raise ValueError("no concept sets found: render them with `python -m studio.demo.concept_sets`")
        return {n: load_concept_set(n) for n in names}


def concept_set_for(token: str) -> ConceptSet | None:
    """The bundled concept set (assets/concepts/) whose word is `token`, if any: its ground truth applies."""
    for name in list_concept_sets():
        cs = load_concept_set(name)
        if cs.token == token:
            return cs
    return None


def caption_attributes(scene: world.Scene, caption: str) -> dict[str, Any]:
    """The attributes a world caption names, in the judge's form.

    Object words name the object whose description they sit in (descriptions come in scene order, joined by
    " and a "); the number of objects is named by the caption's grammar ("a X" vs "a X and a Y").
    """
    words = set(caption.replace(",", " ").split())
    named: dict[str, Any] = {"count": len(scene.objects)}
    if scene.background in words:
        named["background"] = scene.background
    if scene.style in words:
        named["style"] = scene.style
    segments = caption.split(" and a ", 1) if len(scene.objects) == 2 else [caption]
    objects = []
    for obj, segment in zip(scene.objects, segments):
        seg_words = set(segment.replace(",", " ").split())
        spec = {key: getattr(obj, key) for key in ("shape", "color", "pattern", "size", "position")
                if getattr(obj, key) in seg_words}
        objects.append(spec)
    if len(objects) == 1:
        named.update(objects[0])
    else:
        named["objects"] = objects
    return named
