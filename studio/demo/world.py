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

World v3's levers (`WorldOptions`; all off by default, so the default world is v2, build 5's, draw for draw):
- `looks="coarse"`: individuals whose identity is what a 64 px picture and a 16x16 latent hold (`CoarseLook`: a
  smooth outline, a second colour over a large region, up to two large marks; nothing 1-2 px wide).
- `look_words`: a share of toy descriptions say part of the toy's look in words ("a long red toy with a yellow
  side"), from the words `LOOK_WORDS`; `look_description` is the fullest such phrase (the best plain words).
- `look_code`: a share of toy descriptions call the toy by `LOOK_CODE_WORD`, whose input embedding the build
  replaces by a fixed smooth function of the toy's look (`studio.demo.look_code`): the world's stand-in for CLIP's
  visually ordered word space, so the model learns to draw a look from a point a learned word can reach.
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


LOOKS = ("fine", "coarse")  # how individuals look: world v2's ("fine") or world v3's lever 1 ("coarse")


@dataclass
class Obj:
    shape: str
    color: str
    pattern: str = "solid"
    size: str = "big"
    position: str = "center"
    individual: int | None = None  # an individual's seed (shape TOY, pattern OWN_PATTERN); None for named shapes
    looks: str = "fine"  # an individual's kind of look (`LOOKS`); named shapes ignore it


@dataclass(frozen=True)
class WorldOptions:
    """What a version of the world draws and what its captions say. The defaults are world v2 (build 5's world):
    scenes and captions drawn with them are v2's, draw for draw."""

    looks: str = "fine"  # individuals' looks: "fine" (v2, `Look`) or "coarse" (v3 lever 1, `CoarseLook`)
    look_words: float = 0.0  # share of toy descriptions that say part of the toy's look in words (lever 2a)
    look_code: float = 0.0  # share of toy descriptions whose class word is `LOOK_CODE_WORD` (lever 2c)

    def __post_init__(self) -> None:
        if self.looks not in LOOKS:
            raise ValueError(f"looks must be one of {', '.join(LOOKS)}, not {self.looks!r}")
        for name in ("look_words", "look_code"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} is a share of toy descriptions, between 0 and 1, not {getattr(self, name)}")


WORLD_V2 = WorldOptions()


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

    # Thresholds of the outline words (amplitudes of the k = 2 and k = 3 harmonics): about a third each.
    LONG, LUMPY = 0.11, 0.09


@dataclass(frozen=True)
class CoarseLook:
    """An individual whose identity a 64 px picture and a 16x16 latent can hold (world v3, lever 1): a smooth
    outline (two harmonics, large enough to see), a second colour over one large region, and up to two large round
    marks of a third colour, all placed in the object's own coordinates. Its smallest part (a mark on a small toy)
    is ~6 px across, one and a half latent cells; world v2's stripes were 2 px."""

    harmonics: tuple[tuple[float, float], ...]  # (amplitude, phase) for k = 2 (elongation), 3 (a three-lobed bulge)
    color: str  # the main colour: most of the surface; the one a caption may name
    second: str  # the region's colour
    texture: str  # where the second colour lies (`REGIONS`): "side" (beyond a straight cut), "band", "cap" (a disc
    #               over the rim)
    angle: float  # the region's direction, radians (a full turn: regions are not symmetric)
    param: float  # side: offset of the cut; band: its centre; cap: its radius (object radii)
    mark: str  # the marks' colour (neither the main nor the second)
    marks: tuple[tuple[float, float], ...] = ()  # centres of 0-2 marks of radius MARK_RADIUS (object radii)

    LONG, LUMPY = 0.22, 0.13  # outline-word thresholds, as `Look`'s


# Where a coarse look's second colour lies, and the range of its `param` there: a side's cut leaves the second
# colour under half the surface, a band is centred within 0.35 of the middle, a cap's radius is 0.55-0.85; the main
# colour stays the largest, as captions say it is.
COARSE_PARAMS = {"side": (0.1, 0.45), "band": (-0.35, 0.35), "cap": (0.55, 0.85)}
REGIONS = tuple(COARSE_PARAMS)
MARK_RADIUS = 0.28  # object radii: 11 px across on a big toy, 6 px on a small one
BAND_HALF_WIDTH = 0.25  # object radii: 10 px wide on a big toy, 5 px on a small one


def individual_look(seed: int, looks: str = "fine") -> Look | CoarseLook:
    """The look of individual `seed` in the world's kind of looks (`LOOKS`): deterministic, different for every
    seed."""
    if looks == "fine":
        return _fine_look(seed)
    if looks == "coarse":
        return _coarse_look(seed)
    raise ValueError(f"looks must be one of {', '.join(LOOKS)}, not {looks!r}")


@functools.lru_cache(maxsize=4096)
def _coarse_look(seed: int) -> CoarseLook:
    rng = random.Random(f"coarse-individual-{seed}")
    harmonics = tuple((rng.uniform(*amplitude), rng.uniform(0, 2 * np.pi)) for amplitude in ((0.08, 0.35), (0.04, 0.2)))
    color, second, mark = rng.sample(tuple(COLORS), 3)
    texture = rng.choice(REGIONS)
    angle = rng.uniform(0, 2 * np.pi)
    param = {region: rng.uniform(*bounds) for region, bounds in COARSE_PARAMS.items()}[texture]
    marks = tuple((rng.uniform(-0.4, 0.4), rng.uniform(-0.4, 0.4)) for _ in range(rng.randint(0, 2)))
    return CoarseLook(harmonics, color, second, texture, angle, param, mark, marks)


@functools.lru_cache(maxsize=4096)
def _fine_look(seed: int) -> Look:
    rng = random.Random(f"individual-{seed}")
    harmonics = tuple((rng.uniform(0.06, 0.22) / (k ** 0.5), rng.uniform(0, 2 * np.pi)) for k in range(2, 6))
    color, second = rng.sample(tuple(COLORS), 2)
    texture = rng.choice(TEXTURES)
    angle = rng.uniform(0, np.pi)
    param = {"stripes": rng.uniform(1.2, 2.2), "split": rng.uniform(0.15, 0.45), "band": rng.uniform(-0.4, 0.4),
             "spots": rng.uniform(0.16, 0.26)}[texture]
    spots = tuple((rng.uniform(-0.55, 0.55), rng.uniform(-0.55, 0.55)) for _ in range(rng.randint(2, 4)))
    return Look(harmonics, color, second, texture, angle, param, spots if texture == "spots" else ())


def individual(seed: int, size: str = "big", position: str = "center", looks: str = "fine") -> Obj:
    """Individual `seed` as an object of a scene (its colour is its main colour)."""
    return Obj(TOY, individual_look(seed, looks).color, OWN_PATTERN, size, position, individual=seed, looks=looks)


# Words that describe a toy's look partially and coarsely (lever 2a): its outline, its second colour's kind of
# region or texture, its marks. "one" keeps a single mark's phrase free of " and a ", which separates two objects.
OUTLINE_WORDS = ("round", "long", "lumpy")
MARKING_WORDS = ("stripes", "spots", "spot", "side", "band", "cap", "one")
LOOK_WORDS = OUTLINE_WORDS + MARKING_WORDS
# The pseudo-word of the look code (lever 2c): it stands where "toy" would, and the build replaces its input
# embedding by the toy's code; typed in a prompt it means the average toy (`studio.demo.look_code`).
LOOK_CODE_WORD = "lookcode"


def outline_word(look: Look | CoarseLook) -> str:
    """The one word for an individual's outline: "long" (elongated), "lumpy" (a bulging k = 3 harmonic), or
    "round" (neither, by the look's thresholds)."""
    a2, a3 = look.harmonics[0][0], look.harmonics[1][0]
    return "long" if a2 >= look.LONG else "lumpy" if a3 >= look.LUMPY else "round"


def _region_phrase(look: Look | CoarseLook, color: bool) -> str:
    second = f"{look.second} " if color else ""
    if look.texture in ("stripes", "spots"):
        return f"{second}{look.texture}"
    return f"a {second}{'side' if look.texture == 'split' else look.texture}"


def _marks_phrase(look: CoarseLook, color: bool) -> str:
    mark = f"{look.mark} " if color else ""
    return f"one {mark}spot" if len(look.marks) == 1 else f"{mark}spots"


def look_description(look: Look | CoarseLook, rng: random.Random | None = None) -> tuple[str, str]:
    """(outline adjective, "with ..." clause) for a toy's look; either may be "".

    Without `rng`: everything the words can say (the best plain words for the toy). With it, part of it, as a
    caption would: the outline word half of the time, the region 70%, the marks half, each colour 80%."""
    def say(p: float) -> bool:
        return rng is None or rng.random() < p

    adjective = outline_word(look) if say(0.5) else ""
    parts = []
    if say(0.7):
        parts.append(_region_phrase(look, say(0.8)))
    if isinstance(look, CoarseLook) and look.marks and say(0.5):
        parts.append(_marks_phrase(look, say(0.8)))
    return adjective, f"with {' and '.join(parts)}" if parts else ""


def look_subject(look: Look | CoarseLook, describe: bool) -> str:
    """The plain words for a toy of this look: its main colour and the class word, and with `describe` everything
    `look_description` can say ("long red toy with a yellow side and one blue spot")."""
    if not describe:
        return f"{look.color} {TOY}"
    adjective, clause = look_description(look)
    return " ".join(w for w in (adjective, look.color, TOY, clause) if w)


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
                 named: range = NAMED_INDIVIDUALS, looks: str = "fine") -> Scene:
    """Draw a random scene; `training=True` never yields held-out pairs nor (by default) unnamed patterns.
    A share `toy_rate` of objects are individuals with seeds from `individuals` (none by default, so scenes drawn
    without it are the ones world v1 drew for the same seed), a share `named_rate` of those from `named` (a part of
    `NAMED_INDIVIDUALS`) instead (none by default: scenes drawn without it are world v2's). Individuals have the
    `looks` given (the same draws either way)."""
    n = 1 if rng.random() < 0.75 else 2
    positions = rng.sample(("left", "right"), 2) if n == 2 else [rng.choice(POSITIONS)]
    objects = []
    for pos in positions:
        if toy_rate and rng.random() < toy_rate:
            size = "small" if n == 2 else rng.choice(SIZES)
            pool = named if named_rate and rng.random() < named_rate else individuals
            objects.append(individual(rng.choice(pool), size, pos, looks))
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


def _individual_mask(look: Look | CoarseLook, size: str, position: str, res: int) -> Image.Image:
    """An individual's silhouette: a closed outline whose radius varies with a few harmonics of the angle."""
    cx, cy = (c * res for c in _CENTERS[position])
    r = _radius(size, res)
    theta = np.linspace(0, 2 * np.pi, 72, endpoint=False)
    rad = 1 + sum(a * np.cos(k * theta + ph) for k, (a, ph) in enumerate(look.harmonics, start=2))
    rad = r * rad / rad.max()
    mask = Image.new("L", (res, res), 0)
    ImageDraw.Draw(mask).polygon(list(zip(cx + rad * np.cos(theta), cy - rad * np.sin(theta))), fill=255)
    return mask


def _object_coordinates(size: str, position: str, res: int) -> tuple[np.ndarray, np.ndarray]:
    """Every pixel's place in the object's own coordinates (object radii from its centre)."""
    cx, cy = (c * res for c in _CENTERS[position])
    r = _radius(size, res)
    y, x = np.mgrid[0:res, 0:res]
    return (x - cx) / r, (y - cy) / r


def _individual_fill(look: Look | CoarseLook, size: str, position: str, res: int) -> np.ndarray:
    """An individual's colours over the whole canvas ([res, res, 3]); its silhouette cuts them out."""
    def colour(name: str) -> np.ndarray:
        return np.array(COLORS[name], dtype=float)

    if isinstance(look, Look):
        second = _individual_second(look, size, position, res)[..., None]
        return colour(look.color) * (1 - second) + colour(look.second) * second
    u, v = _object_coordinates(size, position, res)
    along = u * np.cos(look.angle) + v * np.sin(look.angle)
    if look.texture == "side":
        region = along > look.param
    elif look.texture == "band":
        region = np.abs(along - look.param) < BAND_HALF_WIDTH
    else:  # cap: a disc centred on the outline's unit circle
        region = (u - np.cos(look.angle)) ** 2 + (v - np.sin(look.angle)) ** 2 < look.param ** 2
    marks = np.zeros((res, res), dtype=bool)
    for mu, mv in look.marks:
        marks |= (u - mu) ** 2 + (v - mv) ** 2 < MARK_RADIUS ** 2
    fill = np.where(region[..., None], colour(look.second), colour(look.color))
    return np.where(marks[..., None], colour(look.mark), fill)


def _individual_second(look: Look, size: str, position: str, res: int) -> np.ndarray:
    """1 where a world v2 individual shows its second colour, in the object's own coordinates."""
    u, v = _object_coordinates(size, position, res)
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
            look = individual_look(obj.individual, obj.looks)
            mask = np.asarray(_individual_mask(look, obj.size, obj.position, res), dtype=float) / 255.0
            fill = _individual_fill(look, obj.size, obj.position, res)
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


def _describe(obj: Obj, rng: random.Random, detail: float, options: WorldOptions, coded: list[int]) -> str:
    """One object's words; a toy whose class word is the look code appends its seed to `coded`."""
    words = []
    if rng.random() < detail:
        words.append(obj.size)
    if obj.pattern in PATTERNS and obj.pattern != "solid" and rng.random() < 0.8:
        words.append(obj.pattern)
    toy = obj.individual is not None
    adjective, clause = "", ""
    if toy and options.look_words and rng.random() < options.look_words:  # lever 2a: part of its look in words
        adjective, clause = look_description(individual_look(obj.individual, obj.looks), rng)
    if adjective:
        words.append(adjective)
    if not toy or rng.random() < 0.7:  # a toy's main colour is named most of the time
        words.append(obj.color)  # a named shape's colour and shape are always named: the model must learn them
    name = individual_names().get(obj.individual) if obj.individual in NAMED_INDIVIDUALS else None
    if name is not None and rng.random() < 0.8:  # a named toy is called by its name most of the time
        words.append(name)
    if toy and options.look_code and rng.random() < options.look_code:  # lever 2c: called by its look's code
        words.append(LOOK_CODE_WORD)
        coded.append(obj.individual)
    else:
        words.append(obj.shape)
    if clause:
        words.append(clause)
    text = " ".join(words)
    if rng.random() < detail * 0.7:
        text += f" on the {obj.position}" if obj.position != "center" else " in the center"
    return text


def coded_caption(scene: Scene, rng: random.Random, options: WorldOptions = WORLD_V2) -> tuple[str, list[int]]:
    """`caption`, and the seeds of the toys the caption calls by `LOOK_CODE_WORD`, in the order it says them."""
    coded: list[int] = []
    detail = rng.uniform(0.2, 1.0)
    parts = [_describe(o, rng, detail, options, coded) for o in scene.objects]
    body = f"a {parts[0]}" if len(parts) == 1 else f"a {parts[0]} and a {parts[1]}"
    if len(parts) == 2 and rng.random() < 0.3 and all(o.individual is None for o in scene.objects):
        body = f"two shapes, a {parts[0]} and a {parts[1]}"
    if rng.random() < 0.6:
        body += f" on a {scene.background} background"
    if rng.random() < 0.6:
        body = rng.choice([f"a {scene.style} picture of {body}", f"{body} in {scene.style} style"])
    elif rng.random() < 0.3:
        body = rng.choice([f"a picture of {body}", f"a photo of {body}", body])
    return body, coded


def caption(scene: Scene, rng: random.Random, options: WorldOptions = WORLD_V2) -> str:
    """A caption naming some of the scene's attributes, in varied wording; never names an `UNNAMED` value. With
    `options` (world v3's levers), toys' descriptions may also say part of their look, or use the look code."""
    return coded_caption(scene, rng, options)[0]


def sample_dataset(n: int, seed: int = 0, size: int = 64, training: bool = True):
    """`n` (image, caption, scene) triples, deterministic for `seed`."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        scene = sample_scene(rng, training=training)
        out.append((render(scene, size), caption(scene, rng), scene))
    return out
