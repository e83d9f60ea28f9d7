"""Quick-tuning (E4T-style): Textual Inversion that starts from an encoder's output (`--init-from-encoder`).

E4T (Gal et al. 2023, "Encoder-based Domain Tuning for Fast Personalization") maps a picture to a word embedding
(an offset from the class word's) and then tunes 5-15 steps. The studio's encoder is an IP-Adapter, whose output is
image embeddings read by decoupled cross-attention, not a point in the word embedding space; so the encoder's output
is kept as it is and the word learns beside it: the pictures are encoded once (`encode_pictures`), the image prompt is
applied to the UNet for the whole run at weight 1, the word starts from the class word (`init_text`) and learns what
the image prompt misses. At step 0 the result draws what `studio encode --class-word <init>` draws. What is written
is one image concept that holds the image embeddings and the word (`ImageConcept.word`). docs/encoders.md.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from studio.engine.learned.image_encoding import encode_pictures
from studio.engine.learned.image_prompt import ImageConcept
from studio.engine.learned.image_prompt_files import save_image_concept
from studio.engine.learned.ip_adapter import image_prompts_applied
from studio.engine.learned.word import Concept
from studio.engine.pictures import open_picture
from studio.training.methods.ti import TextualInversion

IMAGE_WEIGHT = 1.0  # the image prompt's scale while the word learns: generate's default weight of a concept


class QuickTuning(TextualInversion):
    summary = ("Quick-tuning: the pictures are encoded (IP-Adapter), then a word trains a few steps beside them; one "
               "image concept file holds both.")

    def __init__(self, trainer) -> None:
        super().__init__(trainer)
        self.image: ImageConcept | None = None  # the encoder's output, set when the run starts

    @contextmanager
    def training_context(self) -> Iterator[None]:
        """Encode the run's pictures once, then keep the image prompt on the shared UNet for the loop."""
        pictures = [open_picture(path) for path in self.trainer.paths]
        self.image = encode_pictures(self.model, pictures, self.config.token, self.config.init_from_encoder)
        with image_prompts_applied(self.model, [(self.image, IMAGE_WEIGHT)]):
            yield

    def encode(self, prompts: list[str], vectors: dict[str, torch.Tensor], resolution: int,
               others: list[Concept] = ()) -> tuple[torch.Tensor, dict]:
        """The word's prompts, and the pictures' embeddings as the UNet's `added_cond_kwargs["image_embeds"]` (one
        image prompt of all the pictures for every sample, as the pipelines pass `ip_adapter_image_embeds`)."""
        embeds, extra = super().encode(prompts, vectors, resolution, others)
        unet = self.unet
        image = self.image.embeds[None].expand(len(prompts), *self.image.embeds.shape)
        added = dict(extra.get("added_cond_kwargs", {}))
        added["image_embeds"] = [image.to(device=unet.device, dtype=embeds.dtype)]
        return embeds, {**extra, "added_cond_kwargs": added}

    def preview_concept(self, word: Concept | None):
        return self._bundle(word)

    def meta(self, step: int) -> dict[str, str]:
        return {**super().meta(step), "init_from_encoder": self.config.init_from_encoder}

    def _bundle(self, word: Concept | None) -> ImageConcept:
        """The image concept of the run: the encoder's output with the word as it is now."""
        image = self.image
        meta = {**image.meta, **(word.meta if word is not None else {})}
        return ImageConcept(image.token, image.embeds, image.negative, image.adapter, image.adapter_sha256,
                            image.encoder_dims, "", meta, word=word)

    def save(self, path: Path, word: Concept | None, weights, step: int) -> Path:
        return save_image_concept(self._bundle(word), path)

    def result(self, path: Path, word: Concept | None) -> ImageConcept:
        bundle = self._bundle(word)
        bundle.path = path
        return bundle
