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


def reconstruction_prompts(cs: GroundTruth, subject: str, limit: int | None = None) -> list[str]:
    """Judge prompts that ask for the concept and nothing else (the paper's "a photo of S*"; the first `limit`)."""
    if cs.kind == "style":
        return [f"a painting {subject}", f"a picture {subject}"][:limit]
    return [f"a photo of a {subject}", f"a picture of a {subject}", f"a rendering of a {subject}"][:limit]


# Editing prompts for objects (DreamBench's "recontextualization" and "property" prompts, in the demo vocabulary),
# each with the scene attributes it names: prompt fidelity checks those only, never the concept's own look. The four
# the issue names come first ("S* on a black background", "a small S* at the top", "S* in mosaic style", "two S*";
# captions say "on the top" and "a X and a Y", so the prompts do too).
OBJECT_EDITS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("a photo of a {} on a black background", {"background": "black"}),
    ("a small {} on the top", {"size": "small", "position": "top"}),
    ("a {} in mosaic style", {"style": "mosaic"}),
    ("a {0} and a {0}", {"count": 2}),
    ("a photo of a {} on a gray background", {"background": "gray"}),
    ("a {} in outline style", {"style": "outline"}),
)
STYLE_EDITS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("a red circle {}", {"shape": "circle", "color": "red"}),
    ("a blue square {}", {"shape": "square", "color": "blue"}),
    ("a yellow triangle {}", {"shape": "triangle", "color": "yellow"}),
    ("a pink diamond on the left {}", {"shape": "diamond", "color": "pink", "position": "left"}),
)


def editing_prompts(cs: GroundTruth, subject: str, limit: int | None = None) -> list[tuple[str, dict[str, Any]]]:
    """Judge prompts that change something else, with what the judge must see of that change (the first `limit`)."""
    edits = STYLE_EDITS if cs.kind == "style" else OBJECT_EDITS
    return [(template.format(subject), dict(wanted)) for template, wanted in edits[:limit]]


def without_subject(prompt: str, subject: str) -> str:
    """The prompt with the concept's phrase left out ("a photo of a S* on the beach" -> "a photo of a on the beach"),
    which is what the paper compares edited pictures with."""
    return re.sub(r"\s+", " ", prompt.replace(subject, " ")).strip()
