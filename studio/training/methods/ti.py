"""`ti`: Textual Inversion — only the word's vectors learn (Gal et al. 2022)."""

from __future__ import annotations

from pathlib import Path

from studio.engine.learned.registry import save_concept
from studio.engine.learned.word import Concept
from studio.training.methods.base import Method


class TextualInversion(Method):
    name = "ti"
    summary = "Textual Inversion: only a new word learns; a file of a few KB; the model stays as it is."

    def save(self, path: Path, word: Concept | None, weights, step: int) -> Path:
        return save_concept(word, path, format="studio")

    def result(self, path: Path, word: Concept | None) -> Concept:
        return word
