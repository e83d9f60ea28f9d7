"""The look code (world v3, lever 2c): a fixed, smooth map from an individual's look to a point of the text encoder's
input-embedding space, the demo world's stand-in for CLIP's visually ordered word space.

SD's text encoder can place a learned word near the looks its captions named, because millions of captions named
looks. The demo world's captions never can ("a purple toy" for thousands of toys), so its UNet never learnt to let
the conditioning choose a look, and no learned word can point at one. Here a share of captions call a toy by
`world.LOOK_CODE_WORD`, and the build replaces that word's input embedding by the toy's code:

    code(look) = center + scale * P @ standardised(features(look)) / sqrt(F)

`features` lists the look's parameters as numbers that change smoothly with the look (colours as RGB, each outline
harmonic as a 2-vector, the region's direction as cos/sin, the marks' mean and spread); `standardised` centres and
scales each over 2,000 training individuals; P is a fixed random Gaussian projection (entries N(0, 1/D), seeded), so
near looks get near codes and the code of a look is the same in every build with the same `center` and `scale`.
`center` is the class word's ("toy") input embedding when the build starts, so the codes sit around the point a
Textual Inversion word starts from; `scale` is the spread of the vocabulary's word embeddings around their mean, so
codes lie as far apart as words do. The codes are never learned: the UNet and the text transformer learn to read
them. At generation nothing is special: a learned word is a vector of the same input space, free to move to the
code of a toy no caption named. The build records the map in `training_log.json` ("look_code"), which
`LookCode.from_json` reads back (benchmarks use it to ask the model for a toy by its exact code).
"""

from __future__ import annotations

import math
import random
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import Iterator, Sequence

import numpy as np
import torch

from studio.demo import world

LOOK_CODE_SEED = 28  # the projection's seed: fixed, so a look's code is a property of the world, not of a build
FIT_INDIVIDUALS = 2000  # training individuals whose features set the standardisation


def _rgb(name: str) -> list[float]:
    return [c / 127.5 - 1.0 for c in world.COLORS[name]]


def _one_hot(value: str, values: Sequence[str]) -> list[float]:
    return [float(value == v) for v in values]


def _marks(points: Sequence[tuple[float, float]], most: int) -> list[float]:
    """A set of points, order-free: their share of `most`, mean and spread (variances and covariance)."""
    if not points:
        return [0.0] * 6
    p = np.asarray(points, dtype=float)
    mean, centred = p.mean(0), p - p.mean(0)
    return [len(p) / most, *mean, *(centred ** 2).mean(0), float((centred[:, 0] * centred[:, 1]).mean())]


def look_features(look: world.Look | world.CoarseLook) -> np.ndarray:
    """The look's parameters as a vector that changes smoothly with the look (within one kind of texture)."""
    harmonics = [x for a, phase in look.harmonics for x in (a * math.cos(phase), a * math.sin(phase))]
    direction = [math.cos(look.angle), math.sin(look.angle)]
    if isinstance(look, world.Look):
        kinds = world.TEXTURES
        colours = _rgb(look.color) + _rgb(look.second)
        marks = _marks(look.spots, 4)
    else:
        kinds = world.REGIONS
        colours = _rgb(look.color) + _rgb(look.second) + _rgb(look.mark)
        marks = _marks(look.marks, 2)
    # The texture's own parameter in its own slot: a stripe frequency and a cut's offset are not one quantity.
    param = [look.param if look.texture == kind else 0.0 for kind in kinds]
    return np.asarray(colours + harmonics + _one_hot(look.texture, kinds) + direction + param + marks,
                      dtype=np.float32)


@dataclass
class LookCode:
    """The map from looks of one kind (`world.LOOKS`) to input embeddings; build with `LookCode.fit`."""

    looks: str
    center: torch.Tensor  # [D]: the class word's input embedding when the build started
    scale: float  # the spread of the codes: the vocabulary's word embeddings' around their mean
    feature_mean: torch.Tensor  # [F]
    feature_std: torch.Tensor  # [F]
    seed: int = LOOK_CODE_SEED

    @classmethod
    def fit(cls, looks: str, center: torch.Tensor, scale: float, seed: int = LOOK_CODE_SEED) -> "LookCode":
        """Standardise over `FIT_INDIVIDUALS` training individuals (the same ones every time)."""
        seeds = random.Random(f"look-code-{seed}").sample(world.TRAINING_INDIVIDUALS, FIT_INDIVIDUALS)
        feats = torch.from_numpy(np.stack([look_features(world.individual_look(s, looks)) for s in seeds]))
        std = feats.std(0)
        std[std < 1e-6] = 1.0  # a feature that never varies (none today) stays as it is
        return cls(looks, center.detach().float().cpu().clone(), float(scale), feats.mean(0), std, seed)

    @cached_property
    def projection(self) -> torch.Tensor:
        """P, [D, F]: Gaussian with variance 1/D, so P maps a unit vector to one of length ~1."""
        dim, n = len(self.center), len(self.feature_mean)
        gen = torch.Generator().manual_seed(self.seed)
        return torch.randn((dim, n), generator=gen) / math.sqrt(dim)

    def normalised(self, looks: Sequence[world.Look | world.CoarseLook]) -> torch.Tensor:
        """[N, F]: the standardised features of `looks` over sqrt(F) (length ~1 on average)."""
        feats = torch.from_numpy(np.stack([look_features(look) for look in looks]))
        return (feats - self.feature_mean) / self.feature_std / math.sqrt(len(self.feature_mean))

    def from_normalised(self, normalised: torch.Tensor) -> torch.Tensor:
        """[..., F] normalised features -> [..., D] codes."""
        return self.center.to(normalised) + self.scale * normalised @ self.projection.to(normalised).T

    def codes(self, seeds: Sequence[int]) -> torch.Tensor:
        """[N, D]: the codes of individuals `seeds` (in this map's kind of looks)."""
        return self.from_normalised(self.normalised([world.individual_look(s, self.looks) for s in seeds]))

    def to_json(self) -> dict:
        return {"word": world.LOOK_CODE_WORD, "looks": self.looks, "seed": self.seed, "scale": self.scale,
                "center": self.center.tolist(), "feature_mean": self.feature_mean.tolist(),
                "feature_std": self.feature_std.tolist()}

    @classmethod
    def from_json(cls, data: dict) -> "LookCode":
        return cls(data["looks"], torch.tensor(data["center"]), float(data["scale"]),
                   torch.tensor(data["feature_mean"]), torch.tensor(data["feature_std"]), int(data["seed"]))


def word_spread(table: torch.Tensor, rows: Sequence[int]) -> float:
    """The root-mean-square distance of the embedding rows `rows` of `table` from their mean."""
    words = table[list(rows)].detach().float()
    return float((words - words.mean(0)).pow(2).sum(1).mean().sqrt())


@contextmanager
def input_rows_replaced(text_encoder, where: torch.Tensor, rows: torch.Tensor) -> Iterator[None]:
    """Inside the block, the text encoder's input embeddings at the positions `where` ([B, L] bool) are `rows`
    ([where.sum(), D], in row-major order of `where`); the embedding table itself is never written, so the rows get
    no gradient and stay the fixed codes. The hook is removed in `finally`."""
    def replace(_module, _inputs, output: torch.Tensor) -> torch.Tensor:
        out = output.clone()
        out[where.to(out.device)] = rows.to(out)
        return out

    handle = text_encoder.get_input_embeddings().register_forward_hook(replace)
    try:
        yield
    finally:
        handle.remove()
