"""benchmarks/two_concepts.py's rule on the world's own pictures: two individuals drawn left and right are each
picked out of a line-up of sets as themselves; the same picture does not pass for a pair it does not hold."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from studio.demo import world
from studio.demo.evaluate import DemoWorld

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from two_concepts import alone, recognisable  # noqa: E402


def _set(seed: int) -> list:
    return [world.render(world.Scene([world.individual(seed, "big", position)], background, "flat"))
            for position, background in (("center", "white"), ("left", "gray"), ("right", "beige"), ("top", "black"))]


@pytest.fixture(scope="module")
def identity():
    return DemoWorld().identity()


def test_two_individuals_side_by_side_are_each_recognised(identity):
    a, b, c, d = 2_000_011, 2_000_517, 2_000_902, 2_001_313
    line_up = [_set(seed) for seed in (a, b, c, d)]
    picture = world.render(world.Scene([world.individual(a, "small", "left"), world.individual(b, "small", "right")],
                                       "white", "flat"))
    assert recognisable(identity, picture, line_up, (0, 1))
    assert recognisable(identity, picture, line_up, (1, 0))  # either way round
    assert not recognisable(identity, picture, line_up, (0, 2))  # b's half is not c's
    twice = world.render(world.Scene([world.individual(a, "small", "left"), world.individual(a, "small", "right")],
                                     "white", "flat"))
    assert not recognisable(identity, twice, line_up, (0, 1))  # one concept drawn twice is not two
    left = alone(picture, "left")
    assert left.getpixel((60, 32)) == picture.getpixel((0, 0))  # the other half is the picture's background
