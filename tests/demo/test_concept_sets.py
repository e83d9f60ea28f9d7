"""Concept sets of world v2 individuals: bundled ones and evaluation-only (held-out) ones, written and read alike.

Guards: an individual's set shows one and the same individual (its look, in concept.json) in varied scenes; the
bundled individuals come from their own seed range and differ from each other; held-out individuals are never
training's nor the bundle's, and the same seed writes the same sets; adding a set leaves the others unchanged.
"""

import json
from dataclasses import asdict

import numpy as np
import pytest
from PIL import Image

from studio.demo import world
from studio.demo.concept_sets import (CONCEPTS_DIR, SPECS, held_out_individuals, list_concept_sets, load_concept_set,
                                      write_concept_set, write_held_out_sets)

INDIVIDUAL_SETS = [spec.name for spec in SPECS if spec.individual is not None]


def _look_json(seed: int) -> dict:
    """The look as concept.json stores it (tuples become lists)."""
    return json.loads(json.dumps(asdict(world.individual_look(seed))))


def _assert_one_individual_in_varied_scenes(cs, seed: int) -> None:
    look = world.individual_look(seed)
    assert cs.individual == seed and cs.look == _look_json(seed)
    assert cs.kind == "object" and cs.template == "object" and cs.init_word == world.TOY
    assert cs.attributes == {"shape": world.TOY, "color": look.color}
    assert cs.best_prompt == f"a {look.color} {world.TOY}" and cs.token == f"<{cs.name}>"
    scenes = []
    for picture, path in zip(cs.pictures, cs.images):
        (obj,) = picture["scene"]["objects"]  # the individual alone: nothing else for the word to take in
        assert obj == {"shape": world.TOY, "color": look.color, "pattern": world.OWN_PATTERN, "size": obj["size"],
                       "position": obj["position"], "individual": seed}
        scene = world.Scene([world.Obj(**obj)], picture["scene"]["background"], picture["scene"]["style"])
        drawn = np.asarray(world.render(scene, 64))
        assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), drawn), path  # the picture is its scene
        scenes.append(scene)
    # Everything but the individual varies: every position differs, every background is used, mostly big and flat.
    assert len({s.objects[0].position for s in scenes}) == len(scenes)
    assert {s.background for s in scenes} == set(world.BACKGROUNDS)
    assert sum(s.objects[0].size == "big" for s in scenes) >= len(scenes) - 1
    assert sum(s.style == "flat" for s in scenes) >= len(scenes) - 1


@pytest.mark.parametrize("name", INDIVIDUAL_SETS)
def test_bundled_individual_sets_load_and_show_one_individual_in_different_scenes(name):
    cs = load_concept_set(name)
    assert cs.individual in world.BUNDLED_INDIVIDUALS and cs.individual not in world.TRAINING_INDIVIDUALS
    assert len(cs.images) == 5
    _assert_one_individual_in_varied_scenes(cs, cs.individual)


def test_bundled_folder_lists_the_individuals_beside_the_earlier_sets():
    names = list_concept_sets()
    earlier = ["zigzag-ring", "zigzag-soft", "zigzag-night", "diverse-star", "purple-star", "dotted-cyan-heart"]
    assert set(earlier) <= set(names) and set(INDIVIDUAL_SETS) <= set(names)
    assert sorted(names) == sorted(spec.name for spec in SPECS)
    looks = [world.individual_look(spec.individual) for spec in SPECS if spec.individual is not None]
    assert 3 <= len(looks) <= 4
    assert len({look.color for look in looks}) == len(looks), "two bundled toys share a main colour"
    assert len({look.texture for look in looks}) == len(looks), "two bundled toys share a kind of surface"


def test_a_set_renders_the_same_alone_as_in_the_bundle(tmp_path):
    """One rng stream per set: writing one set without the others gives its committed pictures bit for bit (so
    adding a set to SPECS cannot change another's)."""
    for spec in (SPECS[2], SPECS[-1]):  # zigzag-ring, and the last individual
        folder = write_concept_set(spec, tmp_path)
        for png in sorted((CONCEPTS_DIR / spec.name).glob("*.png")):
            assert (folder / png.name).read_bytes() == png.read_bytes(), png
        assert (folder / "concept.json").read_text() == (CONCEPTS_DIR / spec.name / "concept.json").read_text()


def test_held_out_individuals_are_neither_trained_on_nor_bundled_and_follow_their_seed():
    drawn = held_out_individuals(8, seed=0)
    assert len(set(drawn)) == 8 and drawn == held_out_individuals(8, seed=0)
    assert all(s in world.HELD_OUT_INDIVIDUALS and s not in world.TRAINING_INDIVIDUALS
               and s not in world.BUNDLED_INDIVIDUALS for s in drawn)
    assert not set(drawn) & set(held_out_individuals(8, seed=1))
    with pytest.raises(ValueError, match="between 1 and"):
        held_out_individuals(0)


def test_write_held_out_sets_is_deterministic_and_loads_like_a_bundled_set(tmp_path):
    first = write_held_out_sets(tmp_path / "a", 2, seed=4)
    again = write_held_out_sets(tmp_path / "b", 2, seed=4)
    assert [f.name for f in first] == [f.name for f in again] == [f"toy-{s}" for s in held_out_individuals(2, 4)]
    for a, b in zip(first, again):
        files = sorted(p.name for p in a.iterdir())
        assert files == sorted(p.name for p in b.iterdir()) == ["01.png", "02.png", "03.png", "04.png", "05.png",
                                                                  "concept.json"]
        assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files), a.name
        cs = load_concept_set(a)  # a folder from anywhere, as `studio eval --concepts` reads it
        assert cs.individual in world.HELD_OUT_INDIVIDUALS
        _assert_one_individual_in_varied_scenes(cs, cs.individual)
    other = write_held_out_sets(tmp_path / "c", 2, seed=5)
    assert not {f.name for f in first} & {f.name for f in other}


def test_held_out_sets_are_refused_in_the_bundled_folder():
    with pytest.raises(ValueError, match="must not be bundled"):
        write_held_out_sets(CONCEPTS_DIR, 1)
