"""The demo world as the evaluation takes it: what a caption names is scored right, the bundled concept sets are what
their ground truth says (and what plain words cannot name), and the captions the world hands the evaluation are the
world's own, seeded."""

import json
import random

import numpy as np
import pytest
from PIL import Image

from studio.demo import world
from studio.demo.concept_sets import CONCEPTS_DIR, build_concept_sets, list_concept_sets, load_concept_set
from studio.demo.evaluate import DemoJudge, DemoWorld, caption_attributes, concept_set_for
from studio.demo.judge import Judge, check
from studio.demo.vocab import demo_words


@pytest.fixture(scope="module")
def judge() -> Judge:
    return Judge.load()


def test_caption_attributes_are_named_in_the_caption_true_of_the_scene_and_judged_right_on_clean_renders(judge):
    """Compliance scoring: a perfect generation (the scene's own render) scores ~1 against what its caption names."""
    rng = random.Random(5)
    scores, named_keys = [], set()
    for _ in range(300):
        scene = world.sample_scene(rng, training=True)
        text = world.caption(scene, rng)
        named = caption_attributes(scene, text)
        objects = named.get("objects", [{k: v for k, v in named.items() if k in ("shape", "color", "pattern",
                                                                                   "size", "position")}])
        for spec, obj in zip(objects, scene.objects):
            for key, value in spec.items():
                assert getattr(obj, key) == value and value in text.split() + text.replace(",", "").split()
                named_keys.add(key)
        checks = check(judge.predict([world.render(scene)])[0], named)
        scores.append(sum(checks.values()) / len(checks))
    assert named_keys == {"shape", "color", "pattern", "size", "position"}
    assert np.mean(scores) >= 0.95


def test_bundled_concept_sets_show_their_ground_truth_and_plain_words_cannot_name_them(judge):
    names = list_concept_sets()
    sets = [load_concept_set(n) for n in names]
    kinds = [s.kind for s in sets]
    assert kinds.count("object") >= 3 and kinds.count("style") >= 2 and kinds.count("diverse") >= 1
    vocabulary = set(demo_words())
    for cs in sets:
        assert 4 <= len(cs.images) <= 6, cs.name
        pictures = [Image.open(p) for p in cs.images]
        assert all(p.size == (64, 64) and p.mode == "RGB" for p in pictures)
        assert judge.mean_agreement(pictures, cs.attributes) >= 0.9, cs.name
        assert cs.init_word in vocabulary and set(cs.best_prompt.split()) <= vocabulary
        if cs.kind in ("object", "style"):  # an individual, a held-out (shape, colour) pair, or the unnamed pattern
            unreachable = cs.attributes.get("pattern") in world.UNNAMED["pattern"] or \
                (cs.attributes.get("shape"), cs.attributes.get("color")) in world.TRAINING_EXCLUDED or \
                (cs.attributes.get("shape") == world.TOY and cs.individual in world.BUNDLED_INDIVIDUALS)
            assert unreachable, f"{cs.name}: a plain prompt could name it"
    assert "zigzag" not in vocabulary


def test_concept_sets_regenerate_bit_for_bit(tmp_path):
    """The committed PNGs are exactly what the seeded script draws."""
    build_concept_sets(tmp_path)
    for name in list_concept_sets():
        for png in sorted((CONCEPTS_DIR / name).glob("*.png")):
            assert np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(tmp_path / name / png.name)))
        committed = json.loads((CONCEPTS_DIR / name / "concept.json").read_text())
        assert committed == json.loads((tmp_path / name / "concept.json").read_text())


def test_unknown_concept_set_lists_the_bundled_ones():
    with pytest.raises(ValueError, match="purple-star"):
        load_concept_set("no-such-set")


def test_the_world_hands_the_evaluation_seeded_captions_with_what_they_name():
    """Compliance reads its prompts from `DemoWorld.captions`: the same seed gives the same captions, each naming
    what `caption_attributes` finds in it, and another seed gives others."""
    captions = DemoWorld().captions(20, seed=0)
    assert captions == DemoWorld().captions(20, seed=0) and captions != DemoWorld().captions(20, seed=1)
    for text, named in captions:
        assert named["count"] in (1, 2) and set(named) - {"count"}, text


def test_the_demo_judge_checks_readings_and_finds_a_sets_ground_truth_by_its_word():
    judge = DemoJudge()
    reading = judge.predict([Image.open(load_concept_set("purple-star").images[0])])[0]
    assert judge.check(reading, {"shape": "star", "color": "purple"}) == {"shape": True, "color": True}
    assert judge.colors == len(world.COLORS) and "purple-star" in judge.ground_truths()
    assert concept_set_for("<purple-star>").name == "purple-star" and concept_set_for("<nothing>") is None


def test_the_world_hands_out_unseen_individuals_and_says_how_to_get_a_missing_identity_encoder(tmp_path):
    """`studio eval --held-out` reads its subjects from `DemoWorld.held_out_sets`: individuals of the evaluation-only
    range, written where it is told, the same for the same seed; no identity encoder is a ValueError saying what to
    do (the run then reports identity as not measured)."""
    sets = DemoWorld().held_out_sets(2, seed=0, folder=tmp_path / "a")
    assert len(sets) == 2 and set(sets) == set(DemoWorld().held_out_sets(2, seed=0, folder=tmp_path / "b"))
    for cs in sets.values():
        assert cs.individual in world.HELD_OUT_INDIVIDUALS and cs.attributes["shape"] == world.TOY
        assert all(p.is_file() and (tmp_path / "a") in p.parents for p in cs.images)
    with pytest.raises(ValueError, match="train it"):
        DemoWorld(identity_folder=tmp_path / "none").identity()
