"""A seeded procedural world of simple pictures with captions and ground-truth attributes.

Each picture (64x64 by default) holds one or two objects. An object has a shape, a colour, a pattern, a size and a
position; the picture has a background colour and a rendering style. Captions name only some attributes, with
varied wording, as human captions do. Everything is drawn with Pillow and numpy: thousands of pictures a second.

Three things exist for Textual Inversion to matter, because plain words cannot reach them:
- Individuals (world v2): objects of the class "toy", each a unique silhouette and two-colour surface drawn from its
  own seed (`Individual`). Captions call one only "toy", sometimes with its main colour, so the model learns to draw
  toys but no word names *this* toy: the real use case (the model can draw dogs, not your dog) in miniature.
  Training draws seeds from `TRAINING_INDIVIDUALS`; concept sets use `BUNDLED_INDIVIDUALS` and
  `HELD_OUT_INDIVIDUALS`, which training never sees.
- `TRAINING_EXCLUDED`: (shape, colour) pairs never sampled for training (`held_out(scene)` tells them apart).
- `UNNAMED`: a pattern ("zigzag") that pictures may have but captions never name.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPES = ("circle", "square", "triangle", "star", "heart", "diamond", "cross", "ring")
COLORS = {
    "red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (240, 220, 40), "green": (40, 170, 60),
    "cyan": (40, 200, 220), "blue": (40, 70, 220), "purple": (140, 50, 190), "pink": (245, 130, 190),
}
BACKGROUNDS = {"white": (245, 245, 245), "gray": (128, 128, 128), "black": (25, 25, 25), "beige": (225, 205, 160)}
PATTERNS = ("solid", "striped", "dotted", "checkered")
SIZES = ("small", "big")
POSITIONS = ("left", "right", "top", "bottom", "center")
STYLES = ("flat", "outline", "mosaic", "soft")
UNNAMED = {"pattern": ("zigzag",)}

TOY = "toy"  # the class word of individuals: their "shape" in a scene and the only word a caption has for them
OWN_PATTERN = "own"  # an individual's "pattern": its own surface, which no caption names
TRAINING_INDIVIDUALS = range(0, 1_000_000)  # seeds training pictures draw individuals from
BUNDLED_INDIVIDUALS = range(1_000_000, 1_001_000)  # the bundled concept sets' individuals
HELD_OUT_INDIVIDUALS = range(2_000_000, 3_000_000)  # evaluation-only individuals (never bundled, never trained on)
# Training individuals that have a name of their own, as SD knows "corgi" or "Pikachu" (a builder's choice,
# `sample_scene(named_rate=...)`): captions then teach the model that what a word says changes the look of a toy,
# which captions saying only "toy" never do. No bundled or held-out individual has a name.
NAMED_INDIVIDUALS = range(3_000_000, 3_000_256)

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES + (TOY,), "color": tuple(COLORS), "pattern": PATTERNS + UNNAMED["pattern"], "size": SIZES,
    "position": POSITIONS, "background": tuple(BACKGROUNDS), "style": STYLES,
}
ATTRIBUTES_WORDS = {v for values in ATTRIBUTES.values() for v in values}
TRAINING_EXCLUDED = {("star", "purple"), ("heart", "cyan"), ("cross", "orange")}

_CENTERS = {"left": (0.28, 0.5), "right": (0.72, 0.5), "top": (0.5, 0.28), "bottom": (0.5, 0.72), "center": (0.5, 0.5)}


@dataclass
class Obj:
    shape: str
    color: str
    pattern: str = "solid"
    size: str = "big"
    position: str = "center"
    individual: int | None = None  # an individual's seed (shape TOY, pattern OWN_PATTERN); None for named shapes


TEXTURES = ("stripes", "spots", "split", "band")


@dataclass(frozen=True)
class Look:
    """What makes an individual itself: outline harmonics, main and second colour, and a texture in its own
    coordinates (so it scales with the object's size and keeps its orientation)."""

    harmonics: tuple[tuple[float, float], ...]  # (amplitude, phase) for k = 2, 3, ...
    color: str  # the main colour: covers most of the surface; the one a caption may name
    second: str
    texture: str
    angle: float
    param: float  # stripes: frequency; split: offset; band: centre; spots: radius
    spots: tuple[tuple[float, float], ...] = ()


@functools.lru_cache(maxsize=4096)
def individual_look(seed: int) -> Look:
    """The look of individual `seed`: deterministic, different for every seed."""
    rng = random.Random(f"individual-{seed}")
    harmonics = tuple((rng.uniform(0.06, 0.22) / (k ** 0.5), rng.uniform(0, 2 * np.pi)) for k in range(2, 6))
    color, second = rng.sample(tuple(COLORS), 2)
    texture = rng.choice(TEXTURES)
    angle = rng.uniform(0, np.pi)
    param = {"stripes": rng.uniform(1.2, 2.2), "split": rng.uniform(0.15, 0.45), "band": rng.uniform(-0.4, 0.4),
             "spots": rng.uniform(0.16, 0.26)}[texture]
    spots = tuple((rng.uniform(-0.55, 0.55), rng.uniform(-0.55, 0.55)) for _ in range(rng.randint(2, 4)))
    return Look(harmonics, color, second, texture, angle, param, spots if texture == "spots" else ())


def individual(seed: int, size: str = "big", position: str = "center") -> Obj:
    """Individual `seed` as an object of a scene (its colour is its main colour)."""
    return Obj(TOY, individual_look(seed).color, OWN_PATTERN, size, position, individual=seed)


_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]


@functools.lru_cache(maxsize=1)
def individual_names() -> dict[int, str]:
    """Seed -> name of every `NAMED_INDIVIDUALS` member: three syllables, drawn from the seed, all different and none
    a word the world's captions otherwise use."""
    taken = set(ATTRIBUTES_WORDS)
    names: dict[int, str] = {}
    for seed in NAMED_INDIVIDUALS:
        rng = random.Random(f"name-{seed}")
        while (name := "".join(rng.choice(_SYLLABLES) for _ in range(3))) in taken:
            pass
        taken.add(name)
        names[seed] = name
    return names


@dataclass
class Scene:
    objects: list[Obj]
    background: str = "white"
    style: str = "flat"
    extra: dict = field(default_factory=dict)


def held_out(scene: Scene) -> bool:
    """True when the scene contains a (shape, colour) pair that training never sees."""
    return any((o.shape, o.color) in TRAINING_EXCLUDED for o in scene.objects)


def sample_scene(rng: random.Random, *, training: bool = True, unnamed_rate: float = 0.0,
                 toy_rate: float = 0.0, individuals: range = TRAINING_INDIVIDUALS, named_rate: float = 0.0,
                 named: range = NAMED_INDIVIDUALS) -> Scene:
    """Draw a random scene; `training=True` never yields held-out pairs nor (by default) unnamed patterns.
    A share `toy_rate` of objects are individuals with seeds from `individuals` (none by default, so scenes drawn
    without it are the ones world v1 drew for the same seed), a share `named_rate` of those from `named` (a part of
    `NAMED_INDIVIDUALS`) instead (none by default: scenes drawn without it are world v2's)."""
    n = 1 if rng.random() < 0.75 else 2
    positions = rng.sample(("left", "right"), 2) if n == 2 else [rng.choice(POSITIONS)]
    objects = []
    for pos in positions:
        if toy_rate and rng.random() < toy_rate:
            size = "small" if n == 2 else rng.choice(SIZES)
            pool = named if named_rate and rng.random() < named_rate else individuals
            objects.append(individual(rng.choice(pool), size, pos))
            continue
        while True:
            shape, color = rng.choice(SHAPES), rng.choice(tuple(COLORS))
            if not (training and (shape, color) in TRAINING_EXCLUDED):
                break
        pattern = UNNAMED["pattern"][0] if rng.random() < unnamed_rate else rng.choice(PATTERNS)
        size = "small" if n == 2 else rng.choice(SIZES)
        objects.append(Obj(shape, color, pattern, size, pos))
    return Scene(objects, rng.choice(tuple(BACKGROUNDS)), rng.choice(STYLES))


def _shape_mask(shape: str, size: str, position: str, res: int) -> Image.Image:
    """The object's silhouette as an 'L' mask."""
    mask = Image.new("L", (res, res), 0)
    d = ImageDraw.Draw(mask)
    cx, cy = (c * res for c in _CENTERS[position])
    r = _radius(size, res)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        d.ellipse(box, fill=255)
    elif shape == "ring":
        d.ellipse(box, fill=255)
        d.ellipse((cx - r * 0.5, cy - r * 0.5, cx + r * 0.5, cy + r * 0.5), fill=0)
    elif shape == "square":
        d.rectangle((cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85), fill=255)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=255)
    elif shape == "diamond":
        d.polygon([(cx, cy - r), (cx + r * 0.75, cy), (cx, cy + r), (cx - r * 0.75, cy)], fill=255)
    elif shape == "cross":
        w = r * 0.35
        d.rectangle((cx - w, cy - r, cx + w, cy + r), fill=255)
        d.rectangle((cx - r, cy - w, cx + r, cy + w), fill=255)
    elif shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.42
            ang = np.pi / 2 + k * np.pi / 5
            pts.append((cx + rad * np.cos(ang), cy - rad * np.sin(ang)))
        d.polygon(pts, fill=255)
    elif shape == "heart":
        h = r * 0.52
        d.ellipse((cx - r, cy - r * 0.8, cx - r + 2 * h, cy - r * 0.8 + 2 * h), fill=255)
        d.ellipse((cx + r - 2 * h, cy - r * 0.8, cx + r, cy - r * 0.8 + 2 * h), fill=255)
        d.polygon([(cx - r, cy - r * 0.2), (cx + r, cy - r * 0.2), (cx, cy + r)], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    return mask


def _radius(size: str, res: int) -> float:
    return res * (0.30 if size == "big" else 0.17)


def _individual_mask(look: Look, size: str, position: str, res: int) -> Image.Image:
    """An individual's silhouette: a closed outline whose radius varies with a few harmonics of the angle."""
    cx, cy = (c * res for c in _CENTERS[position])
    r = _radius(size, res)
    theta = np.linspace(0, 2 * np.pi, 72, endpoint=False)
    rad = 1 + sum(a * np.cos(k * theta + ph) for k, (a, ph) in enumerate(look.harmonics, start=2))
    rad = r * rad / rad.max()
    mask = Image.new("L", (res, res), 0)
    ImageDraw.Draw(mask).polygon(list(zip(cx + rad * np.cos(theta), cy - rad * np.sin(theta))), fill=255)
    return mask


def _individual_second(look: Look, size: str, position: str, res: int) -> np.ndarray:
    """1 where an individual shows its second colour, in the object's own coordinates."""
    cx, cy = (c * res for c in _CENTERS[position])
    r = _radius(size, res)
    y, x = np.mgrid[0:res, 0:res]
    u, v = (x - cx) / r, (y - cy) / r
    along = u * np.cos(look.angle) + v * np.sin(look.angle)
    if look.texture == "stripes":  # narrow stripes of the second colour (a third of each period)
        return ((along * look.param * 2) % 1.0 < 0.34).astype(float)
    if look.texture == "split":  # the smaller side of a straight cut
        return (along > look.param).astype(float)
    if look.texture == "band":
        return (np.abs(along - look.param) < 0.2).astype(float)
    spots = np.zeros((res, res))
    for su, sv in look.spots:
        spots = np.maximum(spots, ((u - su) ** 2 + (v - sv) ** 2 < look.param ** 2).astype(float))
    return spots


def _pattern_alpha(pattern: str, res: int) -> np.ndarray:
    """1 where the object's colour shows, 0 where a darker tone shows (the pattern)."""
    y, x = np.mgrid[0:res, 0:res]
    step = max(4, res // 10)
    if pattern == "solid":
        return np.ones((res, res))
    if pattern == "striped":
        return ((x // (step // 2)) % 2 == 0).astype(float)
    if pattern == "dotted":
        return 1.0 - (((x % step) - step / 2) ** 2 + ((y % step) - step / 2) ** 2 < (step / 4) ** 2)
    if pattern == "checkered":
        return (((x // step) + (y // step)) % 2 == 0).astype(float)
    if pattern == "zigzag":
        return (((y + np.abs((x % step) - step / 2)) // (step // 2)) % 2 == 0).astype(float)
    raise ValueError(f"unknown pattern {pattern!r}")


def render(scene: Scene, size: int = 64) -> Image.Image:
    """Draw `scene` as an RGB picture of `size` x `size` pixels (drawn at 2x and downsampled for clean edges)."""
    res = size * 2
    canvas = np.ones((res, res, 3)) * np.array(BACKGROUNDS[scene.background], dtype=float)
    for obj in scene.objects:
        if obj.individual is not None:
            look = individual_look(obj.individual)
            mask = np.asarray(_individual_mask(look, obj.size, obj.position, res), dtype=float) / 255.0
            second = _individual_second(look, obj.size, obj.position, res)[..., None]
            fill = np.array(COLORS[look.color], dtype=float) * (1 - second) + np.array(COLORS[look.second],
                                                                                    dtype=float) * second
        else:
            mask = np.asarray(_shape_mask(obj.shape, obj.size, obj.position, res), dtype=float) / 255.0
            base = np.array(COLORS[obj.color], dtype=float)
            tone = _pattern_alpha(obj.pattern, res)[..., None]
            fill = base * tone + base * 0.45 * (1 - tone)
        if scene.style == "outline":
            m_img = Image.fromarray((mask * 255).astype(np.uint8))
            inner = np.asarray(m_img.filter(ImageFilter.MinFilter(7)), dtype=float) / 255.0
            mask = np.clip(mask - inner, 0, 1)
        canvas = canvas * (1 - mask[..., None]) + fill * mask[..., None]
    img = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8)).resize((size, size), Image.BILINEAR)
    if scene.style == "mosaic":
        img = img.resize((size // 4, size // 4), Image.BOX).resize((size, size), Image.NEAREST)
    elif scene.style == "soft":
        img = img.filter(ImageFilter.GaussianBlur(radius=size / 40))
    return img


def _describe(obj: Obj, rng: random.Random, detail: float) -> str:
    words = []
    if rng.random() < detail:
        words.append(obj.size)
    if obj.pattern in PATTERNS and obj.pattern != "solid" and rng.random() < 0.8:
        words.append(obj.pattern)
    if obj.individual is None or rng.random() < 0.7:  # a toy's main colour is named most of the time
        words.append(obj.color)  # a named shape's colour and shape are always named: the model must learn them
    name = individual_names().get(obj.individual) if obj.individual in NAMED_INDIVIDUALS else None
    if name is not None and rng.random() < 0.8:  # a named toy is called by its name most of the time
        words.append(name)
    words.append(obj.shape)
    text = " ".join(words)
    if rng.random() < detail * 0.7:
        text += f" on the {obj.position}" if obj.position != "center" else " in the center"
    return text


def caption(scene: Scene, rng: random.Random) -> str:
    """A caption naming some of the scene's attributes, in varied wording; never names an `UNNAMED` value."""
    detail = rng.uniform(0.2, 1.0)
    parts = [_describe(o, rng, detail) for o in scene.objects]
    body = f"a {parts[0]}" if len(parts) == 1 else f"a {parts[0]} and a {parts[1]}"
    if len(parts) == 2 and rng.random() < 0.3 and all(o.individual is None for o in scene.objects):
        body = f"two shapes, a {parts[0]} and a {parts[1]}"
    if rng.random() < 0.6:
        body += f" on a {scene.background} background"
    if rng.random() < 0.6:
        body = rng.choice([f"a {scene.style} picture of {body}", f"{body} in {scene.style} style"])
    elif rng.random() < 0.3:
        body = rng.choice([f"a picture of {body}", f"a photo of {body}", body])
    return body


def sample_dataset(n: int, seed: int = 0, size: int = 64, training: bool = True):
    """`n` (image, caption, scene) triples, deterministic for `seed`."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        scene = sample_scene(rng, training=training)
        out.append((render(scene, size), caption(scene, rng), scene))
    return out
