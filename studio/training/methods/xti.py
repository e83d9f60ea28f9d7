"""`xti`: Extended Textual Inversion (P+, Voynov et al. 2023): one set of the word's vectors per cross-attention layer
of the UNet, each layer's prompt embeddings its own (studio.engine.learned.layer_word: through the attention processors' per-call
arguments). Every layer starts from the init words; the file is the studio's per-layer form (kohya's XTI form by
`studio concepts export`-style conversion through `studio.engine.learned.layer_word_files.save_xti(..., "kohya")`)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from studio.engine.learned.word import Concept
from studio.training.methods.base import Method


class ExtendedTextualInversion(Method):
    name = "xti"
    summary = ("Extended Textual Inversion (P+): the word learns one set of vectors per cross-attention layer of "
               "the UNet; a file of a few KB per layer; write the word.")

    def __init__(self, trainer) -> None:
        from studio.engine.learned.layer_word import cross_attention_layers

        super().__init__(trainer)
        self.layers = cross_attention_layers(self.model.denoiser)

    def init_vectors(self, vectors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each encoder's `[n, dim]` start, repeated for every layer: `[layers, n, dim]`."""
        return {key: v.unsqueeze(0).repeat(len(self.layers), 1, 1) for key, v in vectors.items()}

    def word(self, vectors: dict[str, torch.Tensor], meta: dict[str, str]) -> Concept:
        from studio.engine.learned.layer_word import XtiConcept

        return XtiConcept.from_layers(self.config.token, self.layers,
                                      [{key: v[i] for key, v in vectors.items()} for i in range(len(self.layers))],
                                      meta)

    def encode(self, prompts: list[str], vectors: dict[str, torch.Tensor], resolution: int,
               others: list[Concept] = ()) -> tuple[torch.Tensor, dict]:
        from studio.engine.learned.layer_word import encode_per_layer

        encoded = encode_per_layer(self.model.encoder, prompts, [self.word(vectors, {}), *others], self.layers)
        extra = {"cross_attention_kwargs": encoded.cross_attention_kwargs()}
        return encoded.base.embeds, {**extra, **self.sdxl_arguments(encoded.base, resolution, len(prompts))}

    @contextmanager
    def training_context(self) -> Iterator[None]:
        from studio.engine.learned.layer_word import per_layer_attention

        with per_layer_attention(self.model.denoiser):
            yield

    def save(self, path: Path, word: Concept | None, weights, step: int) -> Path:
        from studio.engine.learned.layer_word_files import save_xti

        return save_xti(word, path, format="studio")

    def result(self, path: Path, word: Concept | None) -> Concept:
        return word
