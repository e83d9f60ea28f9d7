"""From a file to the learned thing it holds: the one place that tells the kinds of files apart.

    read_learned(path)                  # a word, per-layer word, Perfusion concept, image concept or LoRA file
    load_concept(path, token=None)      # a word file: a word, a per-layer word or a Perfusion concept
    save_concept(concept, path, "a1111")  # a word or a per-layer word in one of its kind's forms

`KINDS` lists each kind of file: the suffixes it may have, whether a file's content is of that kind, and its reader.
A word file and a per-layer word file share their containers (`word_files.read_container`), so one read of the
container serves both; a LoRA file is told apart by its key names before it is read (`lora_files.is_lora_file`).
Readers fail closed: whatever a reader raises becomes a one-line `ConceptError` or `LoraError` naming the file.
"""

from __future__ import annotations

import os
from pathlib import Path

from studio.engine.containers import failing_closed
from studio.engine.learned.image_prompt import ImageConcept
from studio.engine.learned.image_prompt_files import is_image_concept_file, read_image_concept, save_image_concept
from studio.engine.learned.layer_word import XtiConcept
from studio.engine.learned.layer_word_files import is_xti_content, read_xti, save_xti
from studio.engine.learned.lora import LoraFile
from studio.engine.learned.lora_files import LORA_SUFFIXES, is_lora_file, load_lora
from studio.engine.learned.perfusion import PerfusionConcept
from studio.engine.learned.perfusion_files import is_perfusion_content, read_perfusion, save_perfusion
from studio.engine.learned.word import Concept, ConceptError
from studio.engine.learned.word_files import FORMATS, read_word_container, save_word, word_from_data

def load_concept(path: str | os.PathLike, token: str | None = None) -> Concept:
    """Read a word file in any known form (.safetensors/.pt/.bin/.png/.webp): a Perfusion concept
    (`PerfusionConcept`) or a per-layer word (`XtiConcept`) when its content is one, else a word.

    The token is `token` when given, else the file name stem (A1111's rule; for PNG/WebP, A1111 uses the stored
    name). For a diffusers SDXL pair `<stem>.safetensors` + `<stem>_2.safetensors`, either file loads both. Raises
    `ConceptError` with the reason, whatever went wrong in reading (`failing_closed`).
    """
    path = Path(path)
    if path.suffix.lower() == ".safetensors" and is_image_concept_file(path):  # a session's encoded concept
        return read_image_concept(path, token)
    with failing_closed(path, ConceptError, "concept file"):
        data, metadata = read_word_container(path)  # one read serves every kind of word file
        if is_perfusion_content(data, metadata):
            return read_perfusion(data, metadata, path, token)
        if is_xti_content(data, metadata):
            return read_xti(data, metadata, path, token)
        return word_from_data(data, metadata, path, token)


def save_concept(concept: Concept, path: str | os.PathLike, format: str = "studio") -> Path:
    """Write a word atomically in one of `FORMATS` (`word_files.save_word`), a per-layer word in one of
    `layer_word_files.XTI_FORMATS` (`save_xti`); returns the path written (the first file of a pair)."""
    if format not in FORMATS:
        raise ConceptError(f"unknown concept format {format!r}; choose one of {', '.join(FORMATS)}")
    if isinstance(concept, PerfusionConcept):
        if format != "studio":
            raise ConceptError(f"Perfusion concept {concept.token!r}: {format} files hold no Perfusion edits; save it "
                               "in the studio form")
        return save_perfusion(concept, path)
    if isinstance(concept, XtiConcept):
        return save_xti(concept, path, format)
    if isinstance(concept, ImageConcept):
        if format != "studio":
            raise ConceptError(f"image concept {concept.token!r}: {format} files hold no image embeddings; save it "
                               "in the studio form")
        return save_image_concept(concept, path)
    return save_word(concept, path, format)


def read_learned(path: str | os.PathLike, token: str | None = None) -> Concept | LoraFile | ImageConcept:
    """The learned thing a file holds, whatever its kind: a `.safetensors` file is a LoRA when its key names say so
    (`is_lora_file`, so no file is read twice); any other container is tried as a word first, the common case in
    an A1111 embeddings folder, then as a LoRA (a kohya `.pt`). Raises `ConceptError` or `LoraError` (UserErrors)
    with the file's own reason."""
    path = Path(path)
    suffix = path.suffix.lower()
    with failing_closed(path, ConceptError, "concept or LoRA file"):
        if suffix == ".safetensors" and is_image_concept_file(path):
            return read_image_concept(path, token)
        if suffix == ".safetensors" and is_lora_file(path):
            return load_lora(path)
        try:
            return load_concept(path, token)
        except ConceptError:
            if suffix in LORA_SUFFIXES and suffix != ".safetensors" and is_lora_file(path):
                return load_lora(path)
            raise
