"""The prompts an evaluation draws, after the Textual Inversion paper (Gal et al. 2022, section 5): reconstruction
prompts ask for the concept and nothing else ("a photo of S*"), editing prompts change something else about it
("S* on the beach"). Each is drawn once with the concept's word and once with plain words in its place.

Two sets: the CLIP prompts work on any model; the judge prompts stay inside the demo world's vocabulary and say
what the judge must see of each edit. "{}" and `subject` are the subject phrase: the word, or the plain words.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from studio.evaluation.world import GroundTruth

# For CLIP, on any model; the kinds of concept an evaluation knows are these keys.
RECONSTRUCTION_PROMPTS = {"object": ("a photo of a {}", "a rendering of a {}"),
                          "style": ("a painting {}", "a picture {}")}
EDITING_PROMPTS = {"object": ("a photo of a {} on a red background", "a {} in watercolor style",
                              "a photo of a {} on the beach", "a {} in pixel art style"),
                   "style": ("a dog {}", "a house {}", "a bowl of fruit {}", "a portrait of a woman {}")}

# Style transfer on the demo world: the (shape, colour) of each plain picture restyled "in the style of S*".
STYLE_TRANSFER_CONTENT = (("circle", "red"), ("square", "blue"), ("triangle", "yellow"), ("cross", "green"))


def subject_phrases(cs: GroundTruth, token: str | None) -> str:
    """What stands in a prompt for the concept: the token's clause, or the plain words (the baseline)."""
    if cs.kind == "style":
        return f"in the style of {token}" if token else cs.plain_subject
    return token or cs.plain_subject


def reconstruction_prompts(cs: GroundTruth, subject: str) -> list[str]:
    """Judge prompts that ask for the concept and nothing else (the paper's "a photo of S*")."""
    if cs.kind == "style":
        return [f"a painting {subject}", f"a picture {subject}"]
    return [f"a photo of a {subject}", f"a picture of a {subject}", f"a rendering of a {subject}"]


def editing_prompts(cs: GroundTruth, subject: str) -> list[tuple[str, dict[str, Any]]]:
    """Judge prompts that change something else, with what the judge must see of that change."""
    if cs.kind == "style":
        return [(f"a red circle {subject}", {"shape": "circle", "color": "red"}),
                (f"a blue square {subject}", {"shape": "square", "color": "blue"}),
                (f"a yellow triangle {subject}", {"shape": "triangle", "color": "yellow"}),
                (f"a pink diamond on the left {subject}", {"shape": "diamond", "color": "pink", "position": "left"})]
    return [(f"a photo of a {subject} on a gray background", {"background": "gray"}),
            (f"a photo of a {subject} on a black background", {"background": "black"}),
            (f"a {subject} in outline style", {"style": "outline"}),
            (f"a mosaic picture of a {subject}", {"style": "mosaic"}),
            (f"two shapes, a {subject} and a {subject}", {"count": 2})]


def without_subject(prompt: str, subject: str) -> str:
    """The prompt with the concept's phrase left out ("a photo of a S* on the beach" -> "a photo of a on the beach"),
    which is what the paper compares edited pictures with."""
    return re.sub(r"\s+", " ", prompt.replace(subject, " ")).strip()
