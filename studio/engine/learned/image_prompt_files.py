"""Image concept files (`studio.engine.learned.image_prompt.ImageConcept`).

An image concept file is a safetensors file of two tensors, `image_embeds` and `negative_image_embeds` (one row per
reference picture; `[n, dim]` for a plain adapter, `[n, tokens, width]` for Plus), and metadata strings:
`studio_format=studio-image-prompt`, `token`, `adapter` (where its IP-Adapter is: `find_adapter`), `adapter_sha256`,
`encoder_dims` (JSON: the text encoders' widths of the model it was encoded for), `prompt_text`, and `image_encoder`,
`base_model`, `family`, `pictures`, `created`. A quick-tuned concept (`studio train --init-from-encoder`) also holds
its word's vectors, one tensor per text encoder named `word.<encoder>` (`word.text_encoder`, `word.text_encoder_2`).

Readers fail closed (`containers.failing_closed`): whatever goes wrong is one `ImagePromptError` line naming the file.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from studio.engine.containers import MAX_EMBEDDING_BYTES, check_file_size, failing_closed, safetensors_header
from studio.engine.files import atomic_write
from studio.engine.learned.image_prompt import ImageConcept
from studio.engine.learned.ip_adapter import ImagePromptError
from studio.engine.learned.word import Concept

IMAGE_PROMPT_FORMAT = "studio-image-prompt"
EMBEDS_KEY, NEGATIVE_KEY = "image_embeds", "negative_image_embeds"
WORD_PREFIX = "word."  # a quick-tuned concept's word vectors: word.<encoder key>


def is_image_concept_file(path: str | os.PathLike) -> bool:
    """Whether `path` is a safetensors file whose metadata says it is an image concept (reads the header only)."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        return False
    try:
        _, metadata = safetensors_header(path, ImagePromptError)
    except ImagePromptError:
        return False
    return metadata.get("studio_format") == IMAGE_PROMPT_FORMAT


def read_image_concept(path: str | os.PathLike, token: str | None = None) -> ImageConcept:
    """Read an image concept file (its token `token` when given, else the stored one)."""
    from safetensors import safe_open

    path = Path(path)
    with failing_closed(path, ImagePromptError, "image concept file"):
        check_file_size(path, MAX_EMBEDDING_BYTES, "image concept file", ImagePromptError)
        tensors, metadata = safetensors_header(path, ImagePromptError)
        words = {name for name in tensors if name.startswith(WORD_PREFIX)}
        if set(tensors) - words != {EMBEDS_KEY, NEGATIVE_KEY} or metadata.get("studio_format") != IMAGE_PROMPT_FORMAT:
            raise ImagePromptError(f"{path.name}: not an image concept file (it needs {EMBEDS_KEY} and "
                                   f"{NEGATIVE_KEY} and studio_format={IMAGE_PROMPT_FORMAT}); make one with studio "
                                   "encode")
        with safe_open(str(path), framework="pt") as handle:
            embeds, negative = handle.get_tensor(EMBEDS_KEY), handle.get_tensor(NEGATIVE_KEY)
            vectors = {name[len(WORD_PREFIX):]: handle.get_tensor(name).float() for name in words}
        dims = json.loads(metadata.get("encoder_dims") or "{}")
        if not isinstance(dims, dict) or not all(isinstance(v, int) for v in dims.values()):
            raise ImagePromptError(f"{path.name}: its encoder_dims metadata is not a map of widths; encode it again")
        known = {"studio_format", "token", "adapter", "adapter_sha256", "encoder_dims", "prompt_text"}
        meta = {k: v for k, v in metadata.items() if k not in known}
        token = token or metadata.get("token") or path.stem
        return ImageConcept(token, embeds.float(), negative.float(), metadata.get("adapter", ""),
                            metadata.get("adapter_sha256", ""), dims, metadata.get("prompt_text", ""), meta, path,
                            Concept(token, vectors, meta) if vectors else None)


def save_image_concept(concept: ImageConcept, path: str | os.PathLike) -> Path:
    """Write `concept` atomically as an image concept file; returns the path."""
    from safetensors.torch import save_file

    metadata = {**concept.meta, "studio_format": IMAGE_PROMPT_FORMAT, "token": concept.token,
                "adapter": concept.adapter, "adapter_sha256": concept.adapter_sha256,
                "encoder_dims": json.dumps(concept.encoder_dims, sort_keys=True), "prompt_text": concept.prompt_text}
    metadata.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%S"))
    tensors = {EMBEDS_KEY: concept.embeds.detach().float().contiguous().cpu(),
               NEGATIVE_KEY: concept.negative.detach().float().contiguous().cpu()}
    if concept.word is not None:
        tensors.update({WORD_PREFIX + key: v.detach().float().contiguous().cpu()
                        for key, v in concept.word.vectors.items()})
    return atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
