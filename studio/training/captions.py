"""Caption sets: what Perfusion measures a model's text encodings on (the covariance its edits are whitened by).

`captions_for(model, path)` picks, in order: a prompt file the user gives (one caption a line); the model folder's
`captions.txt` (the demo model ships its world's, `python -m studio.demo.captions`); else `bundled_captions()`,
written here from the paper's object templates and a list of everyday subjects and settings (the studio's own
words, so the set is free to ship). The paper measured on captions of LAION; what matters for the whitening is that
the set spans ordinary prompts, not any one caption.
"""

from __future__ import annotations

import itertools
from pathlib import Path

from studio.training.data import TrainError
from studio.training.templates import TEMPLATES

MAX_CAPTIONS = 20_000  # enough for a stable covariance of a 2048-wide encoding (SDXL); more only costs time
MAX_CAPTION_FILE_BYTES = 4 * 2**20
SUBJECTS = ("dog", "cat", "bird", "horse", "car", "bicycle", "house", "tree", "flower", "mountain", "river", "beach",
            "city street", "kitchen", "chair", "table", "cup", "bottle", "book", "lamp", "teddy bear", "toy robot",
            "backpack", "shoe", "hat", "guitar", "clock", "bowl of fruit", "cake", "sandwich", "boat", "train",
            "airplane", "bridge", "castle", "forest", "desert", "lake", "snowy field", "garden", "woman", "man",
            "child", "old man", "sculpture", "vase", "candle", "painting", "sofa", "window")
SETTINGS = ("", " on a table", " in the snow", " at the beach", " in a forest", " on a city street", " at night",
            " in the rain", " in a living room", " on grass", " in a watercolor painting", " in an oil painting",
            " as a pencil sketch", " in a cartoon", " in low light")


def bundled_captions() -> list[str]:
    """The studio's own caption set (750 captions): subjects in the paper's object templates and in settings."""
    templates = TEMPLATES["object"]
    captions = []
    for k, (subject, setting) in enumerate(itertools.product(SUBJECTS, SETTINGS)):
        captions.append(templates[k % len(templates)].format(f"{subject}{setting}"))
    return captions


def read_captions(path: str | Path) -> list[str]:
    """A prompt file's captions (one a line, blank lines skipped); a `TrainError` says what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise TrainError(f"{path}: no such caption file; give a text file with one caption a line")
    if path.stat().st_size > MAX_CAPTION_FILE_BYTES:
        raise TrainError(f"{path.name}: {path.stat().st_size / 2**20:.1f} MB is more captions than a covariance needs "
                         f"(limit {MAX_CAPTION_FILE_BYTES // 2**20} MB); give up to {MAX_CAPTIONS} lines")
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError:
        raise TrainError(f"{path.name}: not UTF-8 text; give a text file with one caption a line") from None
    captions = [line for line in lines if line][:MAX_CAPTIONS]
    if len(captions) < 10:
        raise TrainError(f"{path.name}: {len(captions)} captions; a covariance needs at least 10 (a few hundred is "
                         "better)")
    return captions


def captions_for(model_source: str, path: str | None = None) -> tuple[list[str], str]:
    """(captions, where they came from) for a model loaded from `model_source` (`captions_for`'s order above)."""
    if path:
        return read_captions(path), str(path)
    beside = Path(model_source) / "captions.txt"
    if beside.is_file():
        return read_captions(beside), str(beside)
    return bundled_captions(), "the studio's bundled captions"
