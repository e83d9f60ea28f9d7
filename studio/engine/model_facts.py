"""What a loaded pipeline is: its text encoders (each with its tokenizer), their widths, and its family.

The one place these are read off a diffusers StableDiffusion(XL) pipeline. The encoder keys and the widths of each
family are `studio.engine.concepts`' (`ENCODER_KEYS`, `family_of`): the same table that names a concept file's
likely family names the model's, so a file and a model can never be told apart by two different rules.
"""

from __future__ import annotations

from studio.engine.concepts import ENCODER_KEYS, family_of


def tokenizer_key(encoder_key: str) -> str:
    """The pipeline attribute of an encoder's tokenizer, by diffusers' naming: text_encoder_2 -> tokenizer_2."""
    return "tokenizer" + encoder_key.removeprefix("text_encoder")


def encoders_of(pipe) -> list[tuple[str, object, object]]:
    """(key, tokenizer, text encoder) for each text encoder of `pipe`, in `ENCODER_KEYS` order: one for SD 1.x/2.x,
    two for SDXL. The keys are those of a concept's vectors. A second encoder counts only after a first one."""
    found = []
    for key in ENCODER_KEYS:
        encoder = getattr(pipe, key, None)
        if encoder is None:
            break
        found.append((key, getattr(pipe, tokenizer_key(key)), encoder))
    return found


def encoder_width(text_encoder) -> int:
    """The width of a text encoder's input token embeddings: what a concept's vectors for it must have."""
    return int(text_encoder.get_input_embeddings().embedding_dim)


def encoder_dims(pipe) -> dict[str, int]:
    """Encoder key -> input embedding width, e.g. `{"text_encoder": 768}`; what `check_fits` compares concepts with."""
    return {key: encoder_width(encoder) for key, _, encoder in encoders_of(pipe)}


def detect_family(pipe) -> str:
    """The architecture of `pipe`: "sdxl" with two text encoders, "sd2" with SD 2.x's encoder width (`family_of`),
    else "sd1" (SD 1.x's architecture, whatever its width: the demo model's 128-wide encoder is one)."""
    dims = encoder_dims(pipe)
    if len(dims) == 2:
        return "sdxl"
    return "sd2" if family_of(dims)[0] == "sd2" else "sd1"
