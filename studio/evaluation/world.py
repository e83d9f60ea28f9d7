"""What an evaluation is given and never loads itself: a judge, the ground truths it checks against, the world
whose pictures it reads, and (optionally) an identity scorer. These are protocols; `studio.demo.evaluate`
implements them for the demo world (`DemoJudge`, `DemoWorld`: the bundled and held-out concept sets, the identity
encoder) and the callers (`studio eval`, the Evaluate tab) pass them in, so this package imports nothing of the demo.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

from PIL import Image


class Judge(Protocol):
    """Reads the attributes of pictures from a world whose ground truth is known (the demo's: `DemoJudge`).

    A reading is `{"count": 1, "background": "white", "style": "flat", "objects": [{"shape": "star",
    "color": "purple", "pattern": "solid", "size": "big", "position": "center"}]}`.
    """

    info: dict[str, Any]  # what the judge records of itself; its "accuracy" is reported beside the scores
    colors: int  # how many colours it tells apart: the base of the colour-spread entropy

    def predict(self, images: Sequence[Image.Image]) -> list[dict[str, Any]]:
        """One reading per picture."""
        ...

    def check(self, prediction: dict[str, Any], attributes: dict[str, Any]) -> dict[str, bool]:
        """Which of the wanted `attributes` a reading shows: `{"shape": True, "background": False, ...}`."""
        ...

    def ground_truths(self) -> list[str]:
        """The names of the bundled ground truths (concept sets) a concept can be checked against."""
        ...


class IdentityScorer(Protocol):
    """Tells whether pictures show the same individual, as DINO / CLIP-I do in DreamBench (Ruiz et al. 2023); the
    demo's is `studio.demo.identity.IdentityEncoder`."""

    info: dict[str, Any]  # what the encoder records of itself; its measured "quality" is reported beside the scores

    def similarity(self, generated: Sequence[Image.Image], references: Sequence[Image.Image]) -> list[float]:
        """Per generated picture: its mean cosine similarity to the references."""
        ...

    def cross_similarity(self, references: Sequence[Image.Image]) -> list[float]:
        """Per reference: its mean cosine similarity to the other references (the "real images" ceiling)."""
        ...


class GroundTruth(Protocol):
    """What the judge checks a concept against: a bundled concept set (`studio.demo.concept_sets.ConceptSet`) or
    what the judge read alike in the concept's own pictures (`SharedAttributes`)."""

    name: str
    kind: str  # "object" | "style" | "diverse"
    token: str
    attributes: dict[str, Any]  # in the judge's form, a value may be a list ("any of these")
    plain_subject: str  # the plain words a prompt names it by; "" when there are none
    images: list[Path]  # its pictures (CLIP's references)


class BundledSet(GroundTruth, Protocol):
    """A bundled concept set: ground truth, and how Textual Inversion trains a word for it."""

    init_word: str
    template: str  # studio.training.templates key
    best_prompt: str  # the best plain-language prompt for it, reported beside the scores


@dataclass
class SharedAttributes:
    """A ground truth read by the judge: what every one of a concept's training pictures shows."""

    token: str
    kind: str
    attributes: dict[str, Any]
    name: str = "the training pictures"
    plain_subject: str = ""
    images: list[Path] = field(default_factory=list)


class World(Protocol):
    """The procedural world a run draws its prompts, pictures and ground truths from (the demo's: `DemoWorld`)."""

    def captions(self, n: int, seed: int) -> list[tuple[str, dict[str, Any]]]:
        """`n` seeded captions of scenes like the model was trained on, each with the attributes it names."""
        ...

    def captioned_pictures(self, n: int, seed: int, size: int) -> list[tuple[Image.Image, str]]:
        """`n` seeded pictures `size` pixels wide, with their captions."""
        ...

    def plain_render(self, shape: str, color: str) -> Image.Image:
        """One big solid `color` `shape`, flat on white: a picture to restyle."""
        ...

    def concept_sets(self, names: Sequence[str] | None) -> dict[str, BundledSet]:
        """The named bundled sets (names or folders; None: all of them), keyed as named."""
        ...

    def held_out_sets(self, n: int, seed: int, folder: Path) -> dict[str, BundledSet]:
        """`n` concept sets of subjects no model was trained on, written under `folder`, keyed by name."""
        ...

    def identity(self) -> IdentityScorer | None:
        """The identity scorer, or None when the world has none; raises ValueError (saying what to do) when it
        should have one but cannot load it."""
        ...
