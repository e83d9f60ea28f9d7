"""CLIP, the paper's scorer, on any model: image and text embeddings and their cosine similarities. Reconstruction
is the mean image-image similarity of "a photo of S*" pictures and the concept's training pictures, editability the
mean image-text similarity of each edit prompt's pictures and that prompt with S* left out.

    clip = ClipScorer.load("openai/clip-vit-base-patch32")   # or a local folder holding a CLIP model
    clip.image_similarity(pictures, training_pictures)
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from studio.evaluation.config import ScoringError


class ClipScorer:
    """CLIP image and text embeddings (transformers CLIPModel + CLIPProcessor) and their cosine similarities."""

    def __init__(self, model, processor, source: str):
        self.model = model.eval()
        self.processor = processor
        self.source = source

    @classmethod
    def load(cls, source: str | Path, device: torch.device | str = "cpu") -> "ClipScorer":
        """A CLIP model from a hub id (e.g. `openai/clip-vit-large-patch14`, the paper's) or a local folder."""
        from transformers import CLIPModel, CLIPProcessor

        source = str(source).strip()
        if not source:
            raise ScoringError("no CLIP model given: name a hub id like openai/clip-vit-base-patch32 or a folder")
        try:
            model = CLIPModel.from_pretrained(source)
            processor = CLIPProcessor.from_pretrained(source)
        except (OSError, ValueError) as exc:  # not found, offline, or not a CLIP checkpoint
            raise ScoringError(f"could not load the CLIP model {source!r} ({str(exc).splitlines()[0]}): give a hub id "
                               "such as openai/clip-vit-base-patch32 (downloaded once, or found in the cache when "
                               "offline) or a local folder holding a CLIP model and its processor files") from exc
        return cls(model.to(device), processor, source)

    @staticmethod
    def _unit(features) -> torch.Tensor:
        # transformers 5 returns a model output whose pooler_output is the projected embedding; 4.x a tensor.
        emb = features if isinstance(features, torch.Tensor) else features.pooler_output
        return torch.nn.functional.normalize(emb.float(), dim=-1)

    @torch.no_grad()
    def image_embeddings(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Unit-length image embeddings [N, D]."""
        device = next(self.model.parameters()).device
        inputs = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt").to(device)
        return self._unit(self.model.get_image_features(pixel_values=inputs["pixel_values"]))

    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-length text embeddings [N, D] (texts longer than CLIP's 77 tokens are cut)."""
        device = next(self.model.parameters()).device
        inputs = self.processor(text=list(texts), return_tensors="pt", padding=True, truncation=True).to(device)
        return self._unit(self.model.get_text_features(input_ids=inputs["input_ids"],
                                                       attention_mask=inputs["attention_mask"]))

    def image_similarities(self, images: Sequence[Image.Image], references: Sequence[Image.Image]) -> list[float]:
        """Per picture: its mean cosine similarity to the references (the paper's reconstruction, per picture)."""
        if not images or not references:
            raise ScoringError("image similarity needs pictures on both sides")
        return (self.image_embeddings(images) @ self.image_embeddings(references).T).mean(dim=1).tolist()

    def image_similarity(self, images: Sequence[Image.Image], references: Sequence[Image.Image]) -> float:
        """Mean cosine similarity over every (picture, reference) pair: the paper's reconstruction score."""
        return float(sum(self.image_similarities(images, references)) / len(images))

    def text_similarities(self, images: Sequence[Image.Image], texts: Sequence[str]) -> list[float]:
        """Per picture: its cosine similarity with its own text (the paper's editability, per picture)."""
        if len(images) != len(texts) or not images:
            raise ScoringError(f"text similarity needs one text per picture, got {len(images)} and {len(texts)}")
        return (self.image_embeddings(images) * self.text_embeddings(texts)).sum(-1).tolist()

    def text_similarity(self, images: Sequence[Image.Image], texts: Sequence[str]) -> float:
        """Mean cosine similarity of each picture with its own text: the paper's editability score."""
        return float(sum(self.text_similarities(images, texts)) / len(images))
