"""The README's picture of a personal object: a concept set's pictures beside what its learned word draws.

`python -m studio.demo.figures --set assets/concepts/NAME --concept WORD.safetensors [--model DIR] --out FILE.png`

Row 1 holds the set's training pictures; every other row one prompt, drawn with the learned word and, on the right
half, with the set's best plain words instead ("a red toy"), so the picture shows what a word learned from five
pictures adds over what the words can say. Each row uses the same seeds on both sides.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw

from studio.demo.concept_sets import load_concept_set
from studio.engine.files import atomic_write
from studio.engine.generate import GenerateRequest, generate
from studio.engine.learned.registry import load_concept
from studio.engine.models import ModelManager

PROMPTS = ("a photo of a {}", "a {} on a black background", "two {}", "a {} in mosaic style")
CELL, LABEL = 96, 150  # pixels per picture (64 px drawn, scaled up without smoothing), label column width


def personal_object_figure(model, set_folder: Path, concept_file: Path, seeds: int = 3, steps: int = 20) -> Image.Image:
    """The figure for one concept set and its learned word (see the module docstring)."""
    cs = load_concept_set(set_folder)
    concept = load_concept(concept_file)
    rows: list[tuple[str, list[Image.Image]]] = [("training pictures", [Image.open(p).convert("RGB")
                                                                        for p in cs.images])]
    for template in PROMPTS:
        cells = []
        for subject, concepts in ((concept.token, [concept]), (cs.plain_subject, [])):
            req = GenerateRequest(template.format(subject), concepts=concepts, seed=0, steps=steps, batch=seeds,
                                  preview_every=0)
            cells += generate(model, req).images
        rows.append((template.format("S*") + f"  |  plain: {template.format(cs.plain_subject)}", cells))
    width = LABEL + CELL * max(len(cells) for _, cells in rows)
    figure = Image.new("RGB", (width, CELL * len(rows)), "white")
    draw = ImageDraw.Draw(figure)
    for r, (label, cells) in enumerate(rows):
        draw.multiline_text((4, r * CELL + 4), label.replace("  |  ", "\n"), fill="black")
        for c, cell in enumerate(cells):
            figure.paste(cell.resize((CELL, CELL), Image.NEAREST), (LABEL + c * CELL, r * CELL))
    return figure


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--set", type=Path, required=True, help="concept-set folder (pictures + concept.json)")
    parser.add_argument("--concept", type=Path, required=True, help="the word learned on it")
    parser.add_argument("--model", default=None, help="model (default: the built-in demo)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    figure = personal_object_figure(ModelManager().load(args.model), args.set, args.concept)
    atomic_write(args.out, lambda f: figure.save(f, format="PNG"))
    print(args.out)


if __name__ == "__main__":
    main()
