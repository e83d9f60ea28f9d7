"""The judge: reads known renders right (toys as "toy"), its recorded accuracy — clean and on the demo VAE's
reconstructions — is what a fresh measurement finds, no style is its default for blurry input, and its scoring
rules (object pairing, "any of these" values, an individual's own pattern, bad attribute names) behave as
evaluate.py relies on."""

import json

import pytest

from studio.demo import world
from studio.demo.judge import (JUDGE_DIR, VOCAB, Judge, JudgeError, check, load_vae_roundtrip, measure,
                               measure_accuracy, scene_attributes)

TARGET = 0.95  # per-attribute target on clean renders
VAE_TARGET = 0.9  # issue #16: per attribute (style included) on VAE reconstructions of fresh renders
DEFAULT_SHARE = 0.17  # most of the other styles' reconstructions one style may take; measured: soft takes 6.7% of 2,000
# (judge.json; the previous judge 12.3%); a default for blurry input would take most of them


@pytest.fixture(scope="module")
def judge() -> Judge:
    return Judge.load()


@pytest.fixture(scope="module")
def roundtrip():
    """Reconstructions through the demo model's VAE (assets/demo-model/vae): what generated pictures look like."""
    return load_vae_roundtrip()


def _toy(k: int, size: str = "big", position: str = "center") -> world.Obj:
    """Held-out individual number `k`: neither the judge's nor the demo model's training drew it."""
    return world.individual(world.HELD_OUT_INDIVIDUALS[k * 7919], size, position)


KNOWN_SCENES = [
    world.Scene([world.Obj("star", "purple", "solid", "big", "center")], "white", "flat"),
    world.Scene([world.Obj("heart", "cyan", "dotted", "big", "left")], "gray", "flat"),
    world.Scene([world.Obj("triangle", "yellow", "checkered", "big", "top")], "beige", "soft"),
    world.Scene([world.Obj("ring", "green", "zigzag", "big", "right")], "black", "flat"),
    world.Scene([world.Obj("cross", "orange", "solid", "small", "bottom")], "white", "outline"),
    world.Scene([world.Obj("circle", "red", "striped", "small", "left"),
                 world.Obj("square", "blue", "solid", "small", "right")], "gray", "flat"),
    world.Scene([_toy(1)], "white", "flat"),
    world.Scene([_toy(2, "small", "top")], "black", "soft"),
    world.Scene([_toy(3, "small", "left"), world.Obj("square", "yellow", "solid", "small", "right")], "gray", "flat"),
    # read as flat by the previous judge (4,000 steps, 40% of its pictures through the VAE); this one reads it
    world.Scene([world.Obj("diamond", "pink", "solid", "small", "right"),
                 world.Obj("star", "blue", "solid", "small", "left")], "beige", "mosaic"),
]

# Flat pictures whose VAE reconstructions the old judge (trained on clean renders) called "soft".
FLAT_SCENES = [
    world.Scene([world.Obj("circle", "red", "solid", "big", "center")], "white", "flat"),
    world.Scene([world.Obj("square", "blue", "striped", "big", "left")], "gray", "flat"),
    world.Scene([world.Obj("heart", "pink", "dotted", "small", "top")], "beige", "flat"),
    world.Scene([world.Obj("star", "green", "solid", "small", "left"),
                 world.Obj("ring", "orange", "solid", "small", "right")], "black", "flat"),
    world.Scene([_toy(4)], "white", "flat"),
    world.Scene([_toy(5, "small", "bottom")], "gray", "flat"),
]


def test_judge_reads_every_attribute_of_known_renders(judge):
    """Held-out pairs, the unnamed zigzag, held-out toys, two-object scenes and each style: every attribute read
    right (a toy's pattern is its own, OWN_PATTERN, on both sides)."""
    predictions = judge.predict([world.render(s) for s in KNOWN_SCENES])
    for scene, pred in zip(KNOWN_SCENES, predictions):
        assert pred == scene_attributes(scene), f"judge misread {scene}"


def test_toys_from_held_out_seeds_are_read_as_toys_of_their_main_colour(judge):
    """The judge reads the class "toy" (not the toys it was trained on) anywhere, in any style and background."""
    scenes = [world.Scene([_toy(10 + k, world.SIZES[k % 2], world.POSITIONS[k % 5])],
                          world.ATTRIBUTES["background"][k % 4], ("flat", "outline", "soft", "flat")[k % 4])
              for k in range(12)]
    for scene, pred in zip(scenes, judge.predict([world.render(s) for s in scenes])):
        assert pred["objects"][0]["shape"] == world.TOY, scene
        assert pred["objects"][0]["color"] == scene.objects[0].color, scene
        assert pred["objects"][0]["pattern"] == world.OWN_PATTERN


def test_agreement_is_one_for_the_truth_and_drops_with_each_wrong_attribute(judge):
    image = world.render(KNOWN_SCENES[0])
    assert judge.agreement(image, {"shape": "star", "color": "purple", "background": "white", "style": "flat"}) == 1.0
    assert judge.agreement(image, {"shape": "star", "color": "red", "background": "white", "style": "flat"}) == 0.75
    assert judge.agreement(image, {"shape": "circle", "color": "red", "background": "black", "style": "soft"}) == 0.0
    truth = {"shape": "star", "color": "purple"}
    wrong = {"shape": "star", "color": "green"}
    assert judge.soft_agreement([image], truth) > 0.9 > 0.6 > judge.soft_agreement([image], wrong)


def test_recorded_accuracy_is_what_a_fresh_measurement_finds(judge):
    """judge.json's clean accuracy is re-measured on renders it was not measured on (another seed) and must hold."""
    recorded = json.loads((JUDGE_DIR / "judge.json").read_text())["accuracy"]
    fresh = measure_accuracy(judge, n=400, seed=777)
    for attribute in VOCAB:
        assert recorded[attribute] >= TARGET, f"recorded {attribute} accuracy {recorded[attribute]} < {TARGET}"
        # 400 renders: a binomial sd of ~1% at 0.96; 4 points of slack catches a stale or wrong file.
        assert fresh[attribute] >= recorded[attribute] - 0.04, (attribute, fresh[attribute], recorded[attribute])
        assert fresh[attribute] >= TARGET - 0.03, (attribute, fresh[attribute])


def test_accuracy_on_vae_reconstructions_meets_the_target_and_no_style_is_a_default(judge, roundtrip):
    """Issue #16: >= 0.9 per attribute on the demo VAE's reconstructions of fresh renders, recorded and re-measured
    on another seed; and on reconstructions no style takes the others' pictures (the old judge read 11 of 16
    generated pictures as "soft")."""
    info = json.loads((JUDGE_DIR / "judge.json").read_text())
    fresh = measure(judge, n=300, seed=778, transform=roundtrip)
    for attribute in VOCAB:
        recorded = info["accuracy_vae"][attribute]
        assert recorded >= VAE_TARGET, f"recorded {attribute} accuracy on reconstructions {recorded} < {VAE_TARGET}"
        # 300 pictures: a binomial sd of ~1.7% at 0.92; 5 points of slack.
        assert fresh["accuracy"][attribute] >= recorded - 0.05, (attribute, fresh["accuracy"][attribute], recorded)
    for confusion in (info["style_confusion_vae"], fresh["style_confusion"]):
        for read in VOCAB["style"]:
            others = sum(sum(row.values()) for true, row in confusion.items() if true != read)
            taken = sum(row[read] for true, row in confusion.items() if true != read)
            assert taken <= DEFAULT_SHARE * others, f"{taken} of {others} reconstructions of other styles read as {read!r}"


def test_vae_reconstructions_of_flat_pictures_are_not_read_as_soft(judge, roundtrip):
    """The blur a VAE adds is not the "soft" style: fixed flat scenes, reconstructed, still read as flat."""
    for scene, pred in zip(FLAT_SCENES, judge.predict(roundtrip([world.render(s) for s in FLAT_SCENES]))):
        assert pred["style"] == "flat", (scene, pred["style"])


def _pred(*objects, count=None, background="white", style="flat"):
    objs = [dict(zip(("shape", "color", "pattern", "size", "position"), o)) for o in objects]
    return {"count": count or len(objs), "background": background, "style": style, "objects": objs}


def test_named_objects_pair_one_to_one_with_predicted_objects():
    """'a red circle and a blue square' is satisfied in either order, but not by two red circles."""
    pred = _pred(("square", "blue", "solid", "small", "left"), ("circle", "red", "solid", "small", "right"))
    wanted = {"count": 2, "objects": [{"shape": "circle", "color": "red"}, {"shape": "square", "color": "blue"}]}
    assert all(check(pred, wanted).values())
    twins = _pred(("circle", "red", "solid", "small", "left"), ("circle", "red", "solid", "small", "right"))
    assert sum(check(twins, wanted).values()) == 3  # count + one circle's shape and colour; the square is missing
    single = _pred(("circle", "red", "solid", "big", "center"))
    result = check(single, wanted)
    assert result["count"] is False and result["objects[1].shape"] is False


def test_flat_object_attributes_match_the_best_object_and_lists_mean_any_of():
    pred = _pred(("star", "pink", "solid", "small", "left"), ("ring", "green", "zigzag", "small", "right"))
    assert check(pred, {"shape": "ring", "pattern": "zigzag"}) == {"shape": True, "pattern": True}
    assert check(pred, {"shape": "star", "color": ["red", "pink"]}) == {"shape": True, "color": True}
    assert check(pred, {"color": ["red", "blue"]}) == {"color": False}


def test_an_individuals_own_pattern_is_not_checked_but_a_named_pattern_on_a_toy_fails(judge):
    """A concept's ground truth may say pattern "own" (its surface is its own): not applicable, in flat attributes,
    `objects` entries and soft_agreement alike; a toy still does not show a named pattern."""
    toy = _pred(("toy", "red", world.OWN_PATTERN, "big", "center"))
    own = {"shape": "toy", "color": "red", "pattern": world.OWN_PATTERN}
    assert check(toy, own) == {"shape": True, "color": True}
    assert check(toy, {"objects": [own]}) == {"objects[0].shape": True, "objects[0].color": True}
    assert check(toy, {"shape": "toy", "pattern": "striped"}) == {"shape": True, "pattern": False}
    circle = _pred(("circle", "red", "solid", "big", "center"))
    assert check(circle, own) == {"shape": False, "color": True}
    image = world.render(KNOWN_SCENES[7])
    assert judge.soft_agreement([image], {"shape": "toy", "pattern": world.OWN_PATTERN}) > 0.9


def test_unknown_attribute_or_value_is_a_clear_error():
    pred = _pred(("star", "pink", "solid", "big", "center"))
    with pytest.raises(JudgeError, match="knows no attribute 'hue'"):
        check(pred, {"hue": "pink"})
    with pytest.raises(JudgeError, match="'magenta' is not a color"):
        check(pred, {"color": "magenta"})


def test_missing_judge_says_how_to_train_it(tmp_path):
    with pytest.raises(JudgeError, match="python -m studio.demo.judge --train"):
        Judge.load(tmp_path)


def test_missing_vae_says_what_to_do(tmp_path):
    with pytest.raises(JudgeError, match="build the demo model"):
        load_vae_roundtrip(tmp_path)
