"""A learned word (Textual Inversion, Gal et al. 2022): a trigger word plus one `[n_vectors, dim]` tensor per text
encoder, and the one check of whether it fits a model.

`Concept` is a learned thing (`studio.engine.learned.plan.Learned`): in a request its vectors stand in the prompt's
slots wherever its token is written (`studio.engine.prompts.PromptEncoder`), so the shared model is never changed.
Its files are read and written by `studio.engine.learned.word_files`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from studio.engine.families import ENCODER_KEYS, FAMILIES, SDXL_ENCODER_NAMES, family_of
from studio.engine.names import WordError, check_word
from studio.errors import UserError


# A1111 allows 1-75 vectors per token (a 77-slot CLIP window minus start/end); wider than 8192 is no CLIP we know.
MAX_VECTORS = 75
MAX_DIM = 8192


class ConceptError(UserError):
    """An unreadable, unsafe or malformed concept file; the message says what is wrong and what to do."""


class ConceptMismatchError(ConceptError):
    """A concept that does not fit a model: names the file, its vector sizes and the model's."""


@dataclass(eq=False)  # identity equality: comparing tensor dicts with == is ambiguous; also keeps Concept hashable
class Concept:
    """A learned pseudo-word: `token` as written in prompts, one `[n_vectors, dim]` tensor per text encoder."""

    token: str
    vectors: dict[str, torch.Tensor]
    meta: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        try:
            check_word(self.token, "concept word")
        except WordError as exc:
            raise ConceptError(f"{exc} (rename the file or pass token=)") from None
        if "text_encoder" not in self.vectors or not set(self.vectors) <= set(ENCODER_KEYS):
            raise ConceptError(f"concept {self.token!r}: vectors must be keyed by {ENCODER_KEYS} "
                               f"(text_encoder required), got {sorted(self.vectors)}")
        rows = set()
        for key, tensor in self.vectors.items():
            if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() or tensor.dim() != 2:
                raise ConceptError(f"concept {self.token!r}: vectors[{key!r}] must be a 2-D float tensor "
                                   f"[n_vectors, dim], got {_describe(tensor)}")
            rows.add(tensor.shape[0])
        if len(rows) != 1:
            raise ConceptError(f"concept {self.token!r}: encoders hold different vector counts {self.shapes()}")
        self.meta = {str(k): str(v) for k, v in self.meta.items()}

    @property
    def n_vectors(self) -> int:
        """How many prompt slots the token expands to."""
        return int(self.vectors["text_encoder"].shape[0])

    @property
    def dims(self) -> dict[str, int]:
        """Encoder key -> vector width, e.g. `{"text_encoder": 768}`."""
        return {key: int(t.shape[1]) for key, t in self.vectors.items()}

    @property
    def family(self) -> str:
        """Likely base family from the widths: "sd1", "sd2", "sdxl" or "unknown"."""
        return family_of(self.dims)[0]

    def shapes(self) -> dict[str, list[int]]:
        return {key: list(t.shape) for key, t in self.vectors.items()}

    # ---- a learned thing (`studio.engine.learned.plan.Learned`) ----
    tag = None  # no extra-networks tag names a word: its token in the prompt's text does

    @property
    def kind(self) -> str:
        return "word"

    @property
    def name(self) -> str:
        return self.token

    def check_fit(self, encoder_dims: dict[str, int], model_name: str = "", where: str = "") -> None:
        """Raise `ConceptMismatchError` unless it has vectors of these widths (`check_fits`; `where` names it)."""
        check_fits(self, encoder_dims, where=where)

    def join(self, plan, weight: float = 1.0) -> None:
        """Its vectors stand in the prompt's slots wherever its token is written (a weight is written in the
        prompt, A1111's `(word:1.2)`)."""
        plan.add_words([self])


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {list(value.shape)}"
    return f"a {type(value).__name__}"


# ------------------------------------------------------------------------------------------------------- checking


def check_fits(concept: Concept, encoder_dims: dict[str, int], *, where: str = "") -> None:
    """Raise `ConceptMismatchError` unless the concept has a vector of the right width for every encoder of the model.

    The message names the file (or `where`), its sizes and the model's, and the likely family of each.
    """
    mine = concept.dims
    model = FAMILIES.get(family_of(encoder_dims)[0])
    optional = set(model.optional_words) if model else set()  # a Flux/SD3 word without T5 vectors fits
    if mine == dict(encoder_dims) or (set(encoder_dims) - set(mine) <= optional
                                      and all(encoder_dims.get(k) == width for k, width in mine.items())):
        return
    origin = where or concept.meta.get("source_path") or concept.token
    (mine_family, mine_name), model_name = family_of(mine), family_of(encoder_dims)[1]
    matching = all(encoder_dims.get(k) == width for k, width in mine.items())  # else another family's word
    missing = [k for k in encoder_dims if k not in mine] if matching else []
    clip_names = {dst: src for src, dst in SDXL_ENCODER_NAMES.items()}
    if model and model.file_names:
        clip_names = dict(zip(model.encoder_keys, model.file_names))
    detail = f" (it has no {', '.join(f'{k} ({clip_names[k]})' for k in missing)} vectors)" if missing else ""
    raise ConceptMismatchError(
        f"{origin}: concept {concept.token!r} ({concept.n_vectors} vector(s) of {_widths(mine)}) was trained for "
        f"{mine_name} ({_widths(mine)}) but the model is {model_name} ({_widths(encoder_dims)}){detail}. "
        f"To use it, {_how_to_load(mine_family, mine)}; "
        f"or pick a concept trained for {model_name}."
    )


def _how_to_load(family: str, encoder_dims: dict[str, int]) -> str:
    known = FAMILIES.get(family)
    return known.how_to_load if known else f"load a model with {_widths(encoder_dims)} text encoders"


def _widths(encoder_dims: dict[str, int]) -> str:
    return " + ".join(f"{encoder_dims[k]}-d" for k in ENCODER_KEYS if k in encoder_dims)
