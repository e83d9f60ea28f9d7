"""The procedural world behind the demo model: deterministic, honest captions, held-out pairs really held out."""

import random

import numpy as np

from studio.demo import world
from studio.demo.vocab import demo_words


def test_same_seed_same_pictures_and_captions():
    a = world.sample_dataset(20, seed=7)
    b = world.sample_dataset(20, seed=7)
    assert [c for _, c, _ in a] == [c for _, c, _ in b]
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for (x, _, _), (y, _, _) in zip(a, b))
    assert [c for _, c, _ in world.sample_dataset(20, seed=8)] != [c for _, c, _ in a]


def test_captions_name_only_what_the_scene_has():
    """A caption never names a colour, shape or style the picture does not contain."""
    rng = random.Random(3)
    for _ in range(300):
        scene = world.sample_scene(rng)
        words = set(world.caption(scene, rng).replace(",", "").split())
        for attr, values in (("color", world.COLORS), ("shape", world.SHAPES)):
            present = {getattr(o, attr) for o in scene.objects}
            assert words & set(values) <= present
        assert words & set(world.STYLES) <= {scene.style}
        assert words & set(world.BACKGROUNDS) <= {scene.background}


def test_held_out_pairs_never_sampled_for_training_and_unnamed_never_named():
    rng = random.Random(0)
    for _ in range(2000):
        scene = world.sample_scene(rng, training=True, unnamed_rate=0.2)
        assert not world.held_out(scene)
        assert "zigzag" not in world.caption(scene, rng)
    assert "zigzag" not in demo_words()
    evaluation = [world.sample_scene(rng, training=False) for _ in range(3000)]
    assert any(world.held_out(s) for s in evaluation)


def test_render_is_64px_rgb_and_attributes_change_pixels():
    base = world.Scene([world.Obj("circle", "red")], "white", "flat")
    img = world.render(base)
    assert img.size == (64, 64) and img.mode == "RGB"
    for change in (world.Scene([world.Obj("square", "red")], "white", "flat"),
                   world.Scene([world.Obj("circle", "blue")], "white", "flat"),
                   world.Scene([world.Obj("circle", "red", "striped")], "white", "flat"),
                   world.Scene([world.Obj("circle", "red")], "white", "mosaic")):
        assert np.abs(np.asarray(world.render(change), float) - np.asarray(img, float)).mean() > 1.0


def test_named_individuals_are_their_own_seeds_and_only_drawn_when_asked():
    """Names (a builder's choice) belong to seeds no other range holds, differ from each other and from every word
    the world uses, are said by captions of those toys only, and change nothing of a world drawn without them."""
    names = world.individual_names()
    assert list(names) == list(world.NAMED_INDIVIDUALS) and len(set(names.values())) == len(names)
    assert not set(names.values()) & set(demo_words())
    for other in (world.TRAINING_INDIVIDUALS, world.BUNDLED_INDIVIDUALS, world.HELD_OUT_INDIVIDUALS):
        assert not set(world.NAMED_INDIVIDUALS) & set(other)
    plain, named = random.Random(5), random.Random(5)
    for _ in range(300):
        a = world.sample_scene(plain, toy_rate=0.5)
        b = world.sample_scene(named, toy_rate=0.5, named_rate=0.0)
        assert a == b and world.caption(a, plain) == world.caption(b, named)
        assert not any(o.individual in world.NAMED_INDIVIDUALS for o in a.objects)
    rng, said = random.Random(6), 0
    for _ in range(300):
        scene = world.sample_scene(rng, toy_rate=1.0, named_rate=1.0)
        text = world.caption(scene, rng).split()
        assert all(o.individual in world.NAMED_INDIVIDUALS for o in scene.objects)
        said += any(names[o.individual] in text for o in scene.objects)
        assert set(text) & set(names.values()) <= {names[o.individual] for o in scene.objects}
    assert 0.7 < said / 300 < 0.97  # most of the time, as the rule says (0.8 per toy)
    few = world.NAMED_INDIVIDUALS[:4]  # a build may draw from the first few only (`--names`)
    drawn = {o.individual for _ in range(200) for o in world.sample_scene(rng, toy_rate=1.0, named_rate=1.0,
                                                                           named=few).objects}
    assert drawn == set(few) and len(demo_words(names=4)) == len(demo_words()) + 4
    assert set(names.values()) <= set(demo_words(names=len(world.NAMED_INDIVIDUALS)))
