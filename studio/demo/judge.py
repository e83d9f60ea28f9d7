"""The judge: a small CNN that reads every attribute of a demo-world picture, so generations can be scored.

`python -m studio.demo.judge --train` renders seeded world pictures (every shape/colour pair, the unnamed
"zigzag" pattern and a quarter of individuals, "toy", included: the judge must see what the demo model was never
told about), passes a share of them through the demo model's VAE (`assets/demo-model/vae`), trains the classifier
on one CPU thread with the degradations generated pictures have (VAE reconstructions, mild blur, colour shifts,
tinted backgrounds, noise), measures it on fresh renders, clean and VAE-reconstructed, with individuals it never
saw, and writes `assets/judge/judge.safetensors` (weights, fp16) and `assets/judge/judge.json` (vocabularies,
architecture, training settings, measured accuracy, and on reconstructions which style it reads for each style).

The judge reads a toy's class ("toy") and main colour, never its surface: an individual's pattern is
`world.OWN_PATTERN`, which `predict` reports for anything read as a toy and `check` treats as not applicable
(telling one individual from another is the identity encoder's work).

One network, one head per attribute. Scenes hold one object anywhere or two small objects at left and right, so the
object heads come in two slots: slot 0 is the single object (or the left one), slot 1 the right one.

    judge = Judge.load()
    judge.predict([image])[0]
    # {"count": 1, "background": "white", "style": "flat",
    #  "objects": [{"shape": "star", "color": "purple", "pattern": "solid", "size": "big", "position": "center"}]}
    judge.agreement(image, {"shape": "star", "color": "purple", "background": "white"})   # -> 0.0 .. 1.0
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from studio.demo import world
from studio.demo.vae import vae_roundtrip
from studio.engine.files import atomic_write

JUDGE_DIR = Path(__file__).resolve().parents[2] / "assets" / "judge"
RESOLUTION = 64

VAE_DIR = Path(__file__).resolve().parents[2] / "assets" / "demo-model" / "vae"  # the VAE generations decode through
TOY_RATE = 0.25  # share of objects that are individuals in the judge's training and measuring scenes

# Every attribute value the judge can name: the world's (unnamed pattern and "toy" included; the judge reads
# pictures, not captions). `world.OWN_PATTERN` is no class: an individual's surface is its own.
VOCAB: dict[str, tuple[str, ...]] = {
    "count": ("1", "2"),
    **{k: world.ATTRIBUTES[k] for k in ("background", "style", "shape", "color", "pattern", "size", "position")},
}
SCENE_KEYS = ("count", "background", "style")
OBJECT_KEYS = ("shape", "color", "pattern", "size", "position")
SLOT_KEYS = ("shape", "color", "pattern")  # per-slot heads; size and position are fixed for two-object scenes
# Output heads in the order of the network's last layer: name -> vocabulary.
HEADS: dict[str, tuple[str, ...]] = {
    "count": VOCAB["count"], "background": VOCAB["background"], "style": VOCAB["style"],
    **{f"obj0_{k}": VOCAB[k] for k in SLOT_KEYS}, **{f"obj1_{k}": VOCAB[k] for k in SLOT_KEYS},
    "size": VOCAB["size"], "position": VOCAB["position"],
}


class JudgeError(ValueError):
    """The judge is missing or was asked something it cannot answer; the message says what to do."""


class JudgeNet(nn.Module):
    """Five 3x3 conv blocks (64 -> 4 px) and a shared 256-wide layer feeding one linear head per attribute.

    The first block keeps full resolution because patterns (stripes, dots, zigzags) are 2-3 pixels wide; the
    flattened 4x4 map (not a global pool) keeps where things are, which position and left/right slots need.
    """

    def __init__(self, width: int = 32, hidden: int = 256):
        super().__init__()
        chans = [3, width // 2, width, 2 * width, 4 * width, 4 * width]
        layers: list[nn.Module] = []
        for k, (cin, cout) in enumerate(zip(chans[:-1], chans[1:])):
            layers += [nn.Conv2d(cin, cout, 3, stride=1 if k == 0 else 2, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.shared = nn.Sequential(nn.Flatten(), nn.Linear(chans[-1] * 16, hidden), nn.ReLU(), nn.Dropout(0.1))
        self.heads = nn.ModuleDict({name: nn.Linear(hidden, len(values)) for name, values in HEADS.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.shared(self.features(x))
        return {name: head(h) for name, head in self.heads.items()}


# ---------------------------------------------------------------------------------------------- ground truth

def _ordered(scene: world.Scene) -> list[world.Obj]:
    """Objects in slot order: the single object, or left then right."""
    return sorted(scene.objects, key=lambda o: {"left": 0, "right": 1}.get(o.position, 0))


def scene_attributes(scene: world.Scene) -> dict[str, Any]:
    """A scene's ground truth in the judge's output form (see `Judge.predict`; a toy's pattern is OWN_PATTERN)."""
    objects = [{"shape": o.shape, "color": o.color, "pattern": o.pattern, "size": o.size, "position": o.position}
               for o in _ordered(scene)]
    return {"count": len(objects), "background": scene.background, "style": scene.style, "objects": objects}


def _scene_targets(scene: world.Scene) -> dict[str, int]:
    """Class index per head; -1 where the head does not apply (slot 1 of a single object, size of a pair, the
    pattern of a toy)."""
    objs = _ordered(scene)
    t = {"count": len(objs) - 1, "background": VOCAB["background"].index(scene.background),
         "style": VOCAB["style"].index(scene.style)}
    for slot in (0, 1):
        for key in SLOT_KEYS:
            value = getattr(objs[slot], key) if slot < len(objs) else None
            t[f"obj{slot}_{key}"] = VOCAB[key].index(value) if value in VOCAB[key] else -1
    single = len(objs) == 1
    t["size"] = VOCAB["size"].index(objs[0].size) if single else -1
    t["position"] = VOCAB["position"].index(objs[0].position) if single else -1
    return t


def judge_scenes(rng: random.Random, n: int, unnamed_rate: float = 0.2, toy_rate: float = TOY_RATE,
                 individuals: range = world.TRAINING_INDIVIDUALS, looks: str = "fine") -> list[world.Scene]:
    """Scenes for training or measuring the judge: every (shape, colour) pair, zigzag at `unnamed_rate`, a share
    `toy_rate` of individuals drawn from `individuals` (training's seeds to train; `world.HELD_OUT_INDIVIDUALS` to
    measure, so "toy" is read as a class, not as the toys it was trained on) with `looks` (`world.LOOKS`)."""
    return [world.sample_scene(rng, training=False, unnamed_rate=unnamed_rate, toy_rate=toy_rate,
                               individuals=individuals, looks=looks) for _ in range(n)]


def to_batch(images: Sequence[Image.Image]) -> torch.Tensor:
    """RGB pictures -> float tensor [N, 3, 64, 64] in [-1, 1] (resized when they are not 64x64)."""
    arrays = []
    for im in images:
        im = im.convert("RGB")
        if im.size != (RESOLUTION, RESOLUTION):
            im = im.resize((RESOLUTION, RESOLUTION), Image.BILINEAR)
        arrays.append(np.asarray(im, dtype=np.float32))
    if not arrays:
        return torch.zeros(0, 3, RESOLUTION, RESOLUTION)
    return torch.from_numpy(np.stack(arrays) / 127.5 - 1.0).permute(0, 3, 1, 2).contiguous()


# ---------------------------------------------------------------------------------------------- the judge

def load_net(folder: Path | str, stem: str, what: str, make_net: Callable[..., nn.Module], error: type[Exception],
             command: str, check: Callable[[dict, Path], None] | None = None) -> tuple[nn.Module, dict]:
    """A small network shipped as `<stem>.safetensors` (fp16 weights) + `<stem>.json` (its "architecture" and what
    was measured), as the judge and the identity encoder are: (network in fp32, the json). A missing or unreadable
    pair raises `error` saying to run `command`; `check(info, json_path)` may refuse the json first."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    weights, meta = folder / f"{stem}.safetensors", folder / f"{stem}.json"
    if not weights.is_file() or not meta.is_file():
        raise error(f"no {what} in {folder} ({stem}.safetensors + {stem}.json): train it with `{command}`")
    try:
        info = json.loads(meta.read_text())
        if check is not None:
            check(info, meta)
        net = make_net(**info["architecture"])
        state = {k: v.float() if v.dtype.is_floating_point else v for k, v in load_file(weights).items()}
        net.load_state_dict(state)
    except error:
        raise
    except (SafetensorError, ValueError, KeyError, TypeError, RuntimeError, OSError) as exc:  # bad file or shapes
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise error(f"the {what} in {folder} is unreadable or does not match its network ({first}); retrain it with "
                    f"`{command}`") from exc
    return net, info


class Judge:
    """Reads attributes from pictures. Build with `Judge.load()`; never holds more than its own small network."""

    def __init__(self, net: JudgeNet, info: dict):
        self.net = net.eval()
        self.info = info

    @classmethod
    def load(cls, folder: Path | str = JUDGE_DIR) -> "Judge":
        """Load the judge written by `python -m studio.demo.judge --train`."""
        def same_vocabularies(info: dict, meta: Path) -> None:
            if info.get("heads") != {k: list(v) for k, v in HEADS.items()}:
                raise JudgeError(f"{meta} was trained for other attribute vocabularies than studio/demo/world.py has "
                                 "now; retrain it with `python -m studio.demo.judge --train`")

        net, info = load_net(folder, "judge", "judge", JudgeNet, JudgeError, "python -m studio.demo.judge --train",
                             check=same_vocabularies)
        return cls(net, info)

    @torch.no_grad()
    def probabilities(self, images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        """Softmax per head: name -> [N, classes]."""
        out: dict[str, list[torch.Tensor]] = {name: [] for name in HEADS}
        batch = to_batch(images)
        for i in range(0, len(batch), 256):
            for name, logits in self.net(batch[i:i + 256]).items():
                out[name].append(logits.softmax(-1))
        return {name: torch.cat(parts) if parts else torch.zeros(0, len(HEADS[name])) for name, parts in out.items()}

    def predict(self, images: Sequence[Image.Image] | Image.Image) -> list[dict[str, Any]]:
        """One dict per picture: count, background, style and `objects` (slot order: single, or left then right).

        Two-object scenes in the world always hold two small objects at left and right, so those fields follow
        from the count rather than from the single-object heads.
        """
        if isinstance(images, Image.Image):
            images = [images]
        probs = self.probabilities(images)
        preds = {name: p.argmax(-1).tolist() for name, p in probs.items()}
        results = []
        for i in range(len(images)):
            count = int(VOCAB["count"][preds["count"][i]])
            objects = []
            for slot in range(count):
                obj = {k: VOCAB[k][preds[f"obj{slot}_{k}"][i]] for k in SLOT_KEYS}
                if obj["shape"] == world.TOY:  # a toy's surface is its own: the pattern head was not trained on it
                    obj["pattern"] = world.OWN_PATTERN
                if count == 1:
                    obj.update(size=VOCAB["size"][preds["size"][i]], position=VOCAB["position"][preds["position"][i]])
                else:
                    obj.update(size="small", position=("left", "right")[slot])
                objects.append(obj)
            results.append({"count": count, "background": VOCAB["background"][preds["background"][i]],
                            "style": VOCAB["style"][preds["style"][i]], "objects": objects})
        return results

    def agreement(self, image: Image.Image, attributes: dict[str, Any]) -> float:
        """Fraction of the named `attributes` the picture shows (see `check` for the form of `attributes`)."""
        checks = check(self.predict([image])[0], attributes)
        return sum(checks.values()) / len(checks) if checks else 1.0

    def mean_agreement(self, images: Sequence[Image.Image], attributes: dict[str, Any]) -> float:
        """Mean `agreement` over several pictures judged against the same attributes (batched)."""
        if not images:
            raise JudgeError("no pictures to judge")
        scores = []
        for pred in self.predict(images):
            checks = check(pred, attributes)
            scores.append(sum(checks.values()) / len(checks) if checks else 1.0)
        return float(np.mean(scores))


    def soft_agreement(self, images: Sequence[Image.Image], attributes: dict[str, Any]) -> float:
        """Mean probability the judge gives the named values (a list: their sum), over attributes and pictures.

        A continuous companion to `mean_agreement`: it moves before the judge's top choice flips, so a few pictures
        are enough to see whether something (a short training run) brings generations nearer to the target.
        Takes scene keys and flat object keys; an object value counts in whichever slot holds it more strongly.
        """
        _validate(attributes)
        if "objects" in attributes:
            raise JudgeError("soft_agreement takes flat attributes (one object), not an `objects` list")
        if not images:
            raise JudgeError("no pictures to judge")
        attributes = _applicable(attributes)
        probs = self.probabilities(images)
        per_attribute = []
        for key, wanted in attributes.items():
            values = wanted if isinstance(wanted, (list, tuple)) else [wanted]
            idx = [VOCAB[key].index(str(v)) for v in values]
            if key in SLOT_KEYS:
                p = torch.maximum(probs[f"obj0_{key}"][:, idx].sum(-1), probs[f"obj1_{key}"][:, idx].sum(-1))
            else:
                p = probs[key][:, idx].sum(-1)
            per_attribute.append(p)
        return float(torch.stack(per_attribute).mean()) if per_attribute else 1.0


def _validate(attributes: dict[str, Any]) -> None:
    for key, value in attributes.items():
        if key == "objects":
            for obj in value:
                _validate(obj)
            continue
        if key not in VOCAB:
            raise JudgeError(f"the judge knows no attribute {key!r}; it reads: {', '.join(VOCAB)} and 'objects'")
        for one in (value if isinstance(value, (list, tuple)) else [value]):
            if str(one) not in VOCAB[key] and not (key == "pattern" and one == world.OWN_PATTERN):
                raise JudgeError(f"{one!r} is not a {key} the judge knows; known: {', '.join(VOCAB[key])}")


def _is_own(pattern: Any) -> bool:
    """A wanted pattern of OWN_PATTERN (or a list holding it) asks for an individual's own surface."""
    return world.OWN_PATTERN in (pattern if isinstance(pattern, (list, tuple)) else [pattern])


def _applicable(attributes: dict[str, Any]) -> dict[str, Any]:
    """`attributes` without what the judge cannot check: a wanted pattern of OWN_PATTERN (an individual's surface
    is not a pattern class; the identity encoder judges whose toy it is)."""
    out = {k: v for k, v in attributes.items() if not (k == "pattern" and _is_own(v))}
    if "objects" in attributes:
        out["objects"] = [_applicable(spec) for spec in attributes["objects"]]
    return out


def _matches(predicted: Any, wanted: Any) -> bool:
    """A named value matches itself; a list of values matches any of them ("a star of any of these colours")."""
    if isinstance(wanted, (list, tuple)):
        return str(predicted) in {str(w) for w in wanted}
    return str(predicted) == str(wanted)


def check(prediction: dict[str, Any], attributes: dict[str, Any]) -> dict[str, bool]:
    """Which named attributes a prediction satisfies: `{"shape": True, "background": False, ...}`.

    `attributes` names any of count/background/style (the scene) and shape/color/pattern/size/position (one
    object: scored against whichever predicted object matches it best), or `objects`, a list of such object dicts
    (e.g. "a red circle and a blue square"), scored under the best one-to-one pairing with the predicted objects;
    a value may be a list, meaning any of those values;
    a named object with no predicted partner fails all its checks. Keys of `objects` entries come back as
    `objects[i].shape` and so on. A wanted pattern of `world.OWN_PATTERN` is not checked (not applicable).
    """
    _validate(attributes)
    attributes = _applicable(attributes)
    result: dict[str, bool] = {}
    for key in SCENE_KEYS:
        if key in attributes:
            result[key] = _matches(prediction[key], attributes[key])
    flat = {k: attributes[k] for k in OBJECT_KEYS if k in attributes}
    predicted = prediction["objects"]
    if flat:
        best = max(predicted, key=lambda o: sum(_matches(o[k], v) for k, v in flat.items())) if predicted else {}
        result.update({k: k in best and _matches(best[k], v) for k, v in flat.items()})
    specs = attributes.get("objects", [])
    if specs:
        best_pairs: dict[str, bool] = {}
        slots = list(range(len(predicted))) + [None] * len(specs)
        for perm in set(itertools.permutations(slots, len(specs))):
            pairs = {f"objects[{i}].{k}": perm[i] is not None and _matches(predicted[perm[i]][k], v)
                     for i, spec in enumerate(specs) for k, v in spec.items()}
            if not best_pairs or sum(pairs.values()) > sum(best_pairs.values()):
                best_pairs = pairs
        result.update(best_pairs)
    return result


# ---------------------------------------------------------------------------------------------- measuring

def measure(judge: Judge, n: int = 2000, seed: int = 12345,
            transform: Callable[[list[Image.Image]], list[Image.Image]] | None = None,
            toy_rate: float = TOY_RATE, looks: str = "fine") -> dict[str, Any]:
    """The judge on `n` fresh renders (a seed training never used, individuals from `world.HELD_OUT_INDIVIDUALS`
    with `looks`: "coarse" asks whether it reads world v3's toys),
    or on what `transform` makes of them (e.g. a VAE's reconstructions: the most a model decoding through that VAE
    can reach). Returns `accuracy` (see `measure_accuracy`) and `style_confusion`: for each true style, how many
    pictures the judge read as each style (a style that takes the others' pictures is a default, not a reading).
    """
    rng = random.Random(seed)
    scenes = judge_scenes(rng, n, toy_rate=toy_rate, individuals=world.HELD_OUT_INDIVIDUALS, looks=looks)
    pictures = [world.render(s, RESOLUTION) for s in scenes]
    preds = judge.predict(transform(pictures) if transform else pictures)
    hits: dict[str, list[bool]] = {k: [] for k in VOCAB}
    confusion = {true: {read: 0 for read in VOCAB["style"]} for true in VOCAB["style"]}
    whole = []
    for scene, pred in zip(scenes, preds):
        truth = scene_attributes(scene)
        hits["count"].append(pred["count"] == truth["count"])
        hits["background"].append(pred["background"] == truth["background"])
        hits["style"].append(pred["style"] == truth["style"])
        confusion[truth["style"]][pred["style"]] += 1
        for slot, obj in enumerate(truth["objects"]):
            got = pred["objects"][slot] if slot < len(pred["objects"]) else {}
            for key in SLOT_KEYS:
                if key == "pattern" and obj[key] == world.OWN_PATTERN:
                    continue  # a toy's surface is not a pattern class; reading it as a toy is the shape's hit
                hits[key].append(got.get(key) == obj[key])
            if truth["count"] == 1:
                hits["size"].append(got.get("size") == obj["size"])
                hits["position"].append(got.get("position") == obj["position"])
        whole.append(pred == truth)
    acc = {k: round(float(np.mean(v)), 4) for k, v in hits.items()}
    acc["scene"] = round(float(np.mean(whole)), 4)
    return {"accuracy": acc, "style_confusion": confusion}


def measure_accuracy(judge: Judge, n: int = 2000, seed: int = 12345,
                     transform: Callable[[list[Image.Image]], list[Image.Image]] | None = None,
                     toy_rate: float = TOY_RATE) -> dict[str, float]:
    """Per-attribute accuracy on `n` fresh renders, clean or through `transform` (see `measure`).

    shape/color/pattern count every object (pattern: every object but toys); size/position only single objects
    (pairs fix them); `scene` is the fraction of pictures with every attribute right.
    """
    return measure(judge, n, seed, transform, toy_rate)["accuracy"]


def load_vae_roundtrip(vae_dir: Path | str = VAE_DIR) -> Callable[[list[Image.Image]], list[Image.Image]]:
    """Pictures -> their reconstructions through the VAE at `vae_dir` (the demo model's: what generations decode
    through), as `studio.demo.vae.vae_roundtrip` makes them."""
    from diffusers import AutoencoderKL

    vae_dir = Path(vae_dir)
    if not (vae_dir / "config.json").is_file():
        raise JudgeError(f"no VAE in {vae_dir} (a diffusers AutoencoderKL folder): the judge trains and is measured "
                         "on its reconstructions; build the demo model (`python -m studio.demo.build`) or pass "
                         "--vae FOLDER")
    return vae_roundtrip(AutoencoderKL.from_pretrained(vae_dir).eval())


# ---------------------------------------------------------------------------------------------- training

@dataclass
class Degradations:
    """What generated pictures have and clean renders do not, applied to training pictures (labels unchanged)."""

    # of the training pool, precomputed through the VAE (24,000 of 30,000: ~5 CPU-minutes); 0.4 and 4,000 steps left
    # reconstructed mosaic read as soft (style 0.86 on reconstructions), 0.8 and 8,000 steps reach 0.92
    vae_share: float = 0.8
    vae_rate: float = 0.75  # chance a pooled picture that has a reconstruction is shown as it (~30% of batches)
    blur_rate: float = 0.25  # of the other pictures, blurred a little
    blur_sigma: tuple[float, float] = (0.3, 0.7)  # px at 64 px; the "soft" style is a blur of 1.6 px: clearly milder
    tint_rate: float = 0.35  # background pixels shifted by one random tint (generated backgrounds are tinted)
    tint: float = 0.2  # per channel, in [-1, 1] units (25/255): white stays nearer white than beige (97/255 apart)
    color_shift: float = 0.04  # per-channel gain and offset, in [-1, 1] units: the VAE's slight colour shifts
    noise: float = 0.06  # the largest noise sd


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each picture of `x` [N, 3, H, W] with its own Gaussian `sigma` [N] (px; 5x5 kernel, enough for <= 1)."""
    n, c, h, w = x.shape
    r = torch.arange(-2, 3, dtype=x.dtype)
    k1 = torch.exp(-r[None, :] ** 2 / (2 * sigma[:, None] ** 2))
    k1 = k1 / k1.sum(-1, keepdim=True)
    k2 = (k1[:, :, None] * k1[:, None, :]).repeat_interleave(c, 0)[:, None]  # [N*C, 1, 5, 5]
    y = F.conv2d(F.pad(x.reshape(1, n * c, h, w), (2, 2, 2, 2), mode="reflect"), k2, groups=n * c)
    return y.reshape(n, c, h, w)


def _augment(x: torch.Tensor, background: torch.Tensor, reconstructed: torch.Tensor, gen: torch.Generator,
             d: Degradations) -> torch.Tensor:
    """Degrade a batch as generations are degraded: tinted backgrounds, mild blur (pictures not already through
    the VAE), colour shifts, brightness jitter, noise and 0-2 px shifts.

    `background` [N, 1, H, W] is 1 where the clean render shows its background colour. Blur stays well below the
    "soft" style's, so the judge keeps telling soft apart; a VAE reconstruction keeps its true style's label.
    """
    n = len(x)
    rand = lambda *shape: torch.rand(*shape, generator=gen)  # noqa: E731
    tinted = (rand(n, 1, 1, 1) < d.tint_rate).float()
    x = x + background * tinted * d.tint * (2 * rand(n, 3, 1, 1) - 1)
    blurred = (~reconstructed & (rand(n) < d.blur_rate)).view(n, 1, 1, 1)
    sigma = d.blur_sigma[0] + (d.blur_sigma[1] - d.blur_sigma[0]) * rand(n)
    x = torch.where(blurred, _gaussian_blur(x, sigma), x)
    x = x * (1 + d.color_shift * (2 * rand(n, 3, 1, 1) - 1)) + d.color_shift * (2 * rand(n, 3, 1, 1) - 1)
    x = x * (1 + 0.06 * (rand(n, 1, 1, 1) - 0.5)) + 0.06 * (rand(n, 1, 1, 1) - 0.5)
    x = x + torch.randn(x.shape, generator=gen) * rand(n, 1, 1, 1) * d.noise
    dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
    x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    return x.clamp(-1, 1)


def _shown_path(path: Path | str) -> str:
    """`path` relative to the repository when it is inside it (judge.json must not name one machine's folders)."""
    root = JUDGE_DIR.parents[1]
    resolved = Path(path).resolve()
    return str(resolved.relative_to(root)) if resolved.is_relative_to(root) else str(path)


def _to_pixels(pictures: Sequence[Image.Image]) -> torch.Tensor:
    """PIL pictures -> uint8 tensor [N, H, W, 3]."""
    return torch.from_numpy(np.stack([np.asarray(p.convert("RGB")) for p in pictures]))


@dataclass
class _Pool:
    """The training pictures, rendered once: `pixels` uint8 [N, H, W, 3], each head's target per picture (-1: the
    head does not apply), each scene's background colour, and the reconstructions of the first `n_vae` pictures."""

    pixels: torch.Tensor
    targets: dict[str, torch.Tensor]
    bg_colors: torch.Tensor
    vae_pixels: torch.Tensor
    n_vae: int


def _render_pool(n_train: int, seed: int, roundtrip: Callable[[list[Image.Image]], list[Image.Image]],
                 d: Degradations, vae_dir: Path | str, t0: float) -> _Pool:
    """Step 1 of `train`: render the training pictures once; pass a share of them through the VAE."""
    scenes = judge_scenes(random.Random(seed), n_train)
    pixels = _to_pixels([world.render(s, RESOLUTION) for s in scenes])  # uint8 NHWC
    targets = {name: torch.tensor([t[name] for t in map(_scene_targets, scenes)]) for name in HEADS}
    bg_colors = torch.tensor([world.BACKGROUNDS[s.background] for s in scenes], dtype=torch.float32)
    print(f"rendered {n_train} pictures in {time.time() - t0:.0f}s", flush=True)
    n_vae = int(round(d.vae_share * n_train))
    chunks = []
    for i in range(0, n_vae, 1000):
        clean = [Image.fromarray(a) for a in pixels[i:min(i + 1000, n_vae)].numpy()]
        chunks.append(_to_pixels(roundtrip(clean)))
    vae_pixels = torch.cat(chunks) if chunks else pixels[:0]
    print(f"reconstructed {n_vae} of them through {vae_dir} by {time.time() - t0:.0f}s", flush=True)
    return _Pool(pixels, targets, bg_colors, vae_pixels, n_vae)


def _training_batch(pool: _Pool, batch: int, gen: torch.Generator,
                    d: Degradations) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw `batch` pool pictures: (their indices, the pictures as shown, [-1, 1] NCHW), a share of those that
    have a reconstruction shown as it, each degraded as `_augment` says."""
    idx = torch.randint(0, len(pool.pixels), (batch,), generator=gen)
    clean = pool.pixels[idx].float()
    reconstructed = (idx < pool.n_vae) & (torch.rand(batch, generator=gen) < d.vae_rate)
    if pool.n_vae:
        through = pool.vae_pixels[idx.clamp(max=pool.n_vae - 1)].float()
        shown = torch.where(reconstructed.view(-1, 1, 1, 1), through, clean)
    else:
        shown = clean
    # Background: pixels within 6/255 of the scene's background colour in the clean render, edges softened.
    near = ((clean - pool.bg_colors[idx].view(-1, 1, 1, 3)).abs().amax(-1) < 6).float()[:, None]
    background = F.avg_pool2d(near, 3, stride=1, padding=1, count_include_pad=False)
    return idx, _augment(shown.permute(0, 3, 1, 2) / 127.5 - 1.0, background, reconstructed, gen, d)


def fp16_round_trip(net: nn.Module) -> dict[str, torch.Tensor]:
    """`net`'s state in fp16 (floating tensors), with `net` set to those weights: what is saved is what is measured."""
    state = {k: (v.detach().half() if v.dtype.is_floating_point else v.detach()).contiguous()
             for k, v in net.state_dict().items()}
    net.load_state_dict({k: v.float() if v.dtype.is_floating_point else v for k, v in state.items()})
    return state


def train(out_dir: Path = JUDGE_DIR, *, n_train: int = 30000, steps: int = 8000, batch: int = 64, seed: int = 0,
          threads: int = 1, eval_n: int = 2000, log_every: int = 100, vae_dir: Path | str = VAE_DIR,
          degradations: Degradations | None = None) -> dict:
    """Train the judge, measure it, and write judge.safetensors + judge.json atomically. Returns judge.json's dict."""
    from safetensors.torch import save_file

    d = degradations or Degradations()
    t0 = time.time()
    torch.set_num_threads(threads)  # the CPU is shared; one thread keeps the machine usable for others
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    roundtrip = load_vae_roundtrip(vae_dir)  # first: a missing VAE fails before minutes of rendering

    # 1. Render the training pictures once; pass a share of them through the VAE.
    pool = _render_pool(n_train, seed, roundtrip, d, vae_dir, t0)

    # 2. Train: summed cross-entropy over heads, ignoring heads that do not apply (-1); AdamW, cosine LR.
    net = JudgeNet()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    net.train()
    for step in range(1, steps + 1):
        idx, x = _training_batch(pool, batch, gen, d)
        logits = net(x)
        loss = sum(F.cross_entropy(logits[name], pool.targets[name][idx], ignore_index=-1)
                   for name in HEADS if (pool.targets[name][idx] >= 0).any())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % log_every == 0:
            print(f"step {step}/{steps} loss {loss.item():.4f} {time.time() - t0:.0f}s", flush=True)
    train_seconds = time.time() - t0

    # 3. Measure on fresh renders, clean and through the VAE, and save.
    info = {
        "architecture": {"width": 32, "hidden": 256}, "heads": {k: list(v) for k, v in HEADS.items()},
        "resolution": RESOLUTION,
        "training": {"seed": seed, "pictures": n_train, "steps": steps, "batch": batch, "threads": threads,
                     "toy_rate": TOY_RATE, "vae": _shown_path(vae_dir), "degradations": asdict(d),
                     "seconds": round(train_seconds, 1), "torch": torch.__version__},
    }
    # fp16 halves the file; accuracy is measured after the fp16 round trip, so it is the shipped judge's.
    state = fp16_round_trip(net)
    judge = Judge(net, info)
    info.update(measured(judge, eval_n, roundtrip))
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "judge.safetensors", lambda p: save_file(state, p))
    atomic_write(out_dir / "judge.json", (json.dumps(info, indent=1) + "\n").encode())
    print(json.dumps({k: info[k] for k in ("accuracy", "accuracy_vae", "style_confusion_vae")}), flush=True)
    return info


def measured(judge: Judge, n: int, roundtrip: Callable[[list[Image.Image]], list[Image.Image]]) -> dict[str, Any]:
    """judge.json's measurements: accuracy on fresh clean renders and on their VAE reconstructions, and which
    style the judge reads for each true style on the reconstructions (the blurry-default check)."""
    clean, vae = measure(judge, n), measure(judge, n, transform=roundtrip)
    return {"accuracy": clean["accuracy"], "accuracy_vae": vae["accuracy"],
            "style_confusion_vae": vae["style_confusion"],
            "accuracy_measured_on": (f"{n} fresh renders (seed 12345), every shape/colour pair, 20% zigzag, "
                                     f"{TOY_RATE:.0%} held-out individuals; accuracy_vae and style_confusion_vae "
                                     "(true style -> read style -> pictures) on their reconstructions through "
                                     "the training VAE; `python -m studio.demo.judge --measure`")}


def main(argv: Iterable[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train or measure the demo world's attribute judge.")
    parser.add_argument("--train", action="store_true", help="train and write assets/judge/")
    parser.add_argument("--measure", action="store_true",
                        help="measure the saved judge on fresh renders, clean and through the VAE")
    parser.add_argument("--out", type=Path, default=JUDGE_DIR)
    parser.add_argument("--vae", type=Path, default=VAE_DIR, help="the VAE whose reconstructions it trains on")
    parser.add_argument("--steps", type=int, default=8000)
    parser.add_argument("--pictures", type=int, default=30000)
    parser.add_argument("--eval", type=int, default=2000, help="fresh pictures per measurement")
    parser.add_argument("--vae-share", type=float, default=Degradations.vae_share,
                        help="share of the training pictures also drawn through the VAE")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.train:
        train(args.out, n_train=args.pictures, steps=args.steps, threads=args.threads, seed=args.seed,
              eval_n=args.eval, vae_dir=args.vae, degradations=Degradations(vae_share=args.vae_share))
    elif args.measure:
        torch.set_num_threads(args.threads)
        print(json.dumps(measured(Judge.load(args.out), args.eval, load_vae_roundtrip(args.vae)), indent=1))
    else:
        parser.error("give --train or --measure")


if __name__ == "__main__":
    main()
