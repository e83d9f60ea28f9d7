"""`Method`: the few things a training method defines (see studio/training/methods/__init__.py)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from studio.engine.learned.word import Concept


class Method:
    name = ""
    summary = ""  # one line for the UI and help: what learns, what is written, what to write in a prompt
    learns_word = True  # the new word's vectors learn and the prompts say the word (ti, pivotal)
    writes_folder = False  # the result is a model folder (dreambooth), else one .safetensors file
    folder_marker: str | None = None  # a file the method writes into each folder it makes: what --overwrite replaces
    default_unet_lr: float | None = None  # the weights' learning rate when the config gives none
    stops_when_learned = True  # whether `TrainConfig.stop_when_learned` applies (perfusion: no, measured)

    def __init__(self, trainer) -> None:
        self.trainer = trainer
        self.config = trainer.config
        self.model = trainer.model
        self._prompt_cache: dict[str, object] = {}  # `_fixed`: prompt -> its EncodedPrompt

    # ---- what learns ---------------------------------------------------------------------------------------------

    @property
    def unet(self) -> torch.nn.Module:
        """The UNet the loss runs (the shared one, or a copy that learns)."""
        return self.model.denoiser

    def add_weights(self) -> dict[str, torch.nn.Parameter]:
        """Make the weights that learn (inside the trainer's `frozen` block) and return them by name."""
        return {}

    def remove_weights(self) -> None:
        """Undo `add_weights` on the shared model: what generation sees afterwards is what it saw before."""

    def unet_lr(self) -> float:
        return self.config.unet_lr if self.config.unet_lr is not None else float(self.default_unet_lr or 0.0)

    def weight_groups(self, weights: dict[str, torch.nn.Parameter]) -> list[dict]:
        """The weights as parameter groups of their one optimizer, each with its own learning rate (`initial_lr`;
        the learning-rate schedule scales every group by the same factor each step)."""
        return [{"params": list(weights.values()), "initial_lr": self.unet_lr()}]

    def learning_encoders(self) -> list[torch.nn.Module]:
        """The text encoders whose own weights learn (a text-encoder LoRA): prompts go through them with gradients
        every step, and DDP averages their gradients."""
        return []

    def weights_learn(self, step: int) -> bool:
        """Whether the weights are updated at `step` (1-based); the word always is."""
        return True

    def phrase(self) -> str:
        """What a template's `{}` becomes: the word, or for DreamBooth "<token> <class>"."""
        return self.config.token

    # ---- the word ------------------------------------------------------------------------------------------------

    def init_vectors(self, vectors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The trainable vectors from the init words' `[n, dim]` per encoder (xti: one set per layer)."""
        return vectors

    def word(self, vectors: dict[str, torch.Tensor], meta: dict[str, str]) -> Concept:
        """The vectors as the concept the prompt encoder places (tensors kept as given: gradients flow)."""
        return Concept(self.config.token, vectors, meta)

    def encode(self, prompts: list[str], vectors: dict[str, torch.Tensor], resolution: int,
               others: list[Concept] = ()) -> tuple[torch.Tensor, dict]:
        """Prompts with the word of `vectors` (the live parameters; none for lora/dreambooth) and `others` (the
        per-image words) -> the UNet's prompt embeddings and its extra arguments. The word is built anew each
        batch, so autograd sees this batch's use; so are the prompts when a text encoder learns."""
        words = ([self.word(vectors, {})] if vectors else []) + list(others)
        if words or self.learning_encoders():
            encoded = self.model.encoder.encode(prompts, words)
        else:
            encoded = self._fixed(prompts)
        return encoded.embeds, self.sdxl_arguments(encoded, resolution, len(prompts))

    def _fixed(self, prompts: list[str]):
        """Prompts with no learned word (lora, dreambooth) through the frozen text encoder, each encoded once, alone
        (so its embeddings never depend on what it was batched with: a resumed run reads the same) and kept."""
        from studio.engine.prompts import EncodedPrompt

        cache = self._prompt_cache
        for prompt in prompts:
            if prompt not in cache:
                with torch.no_grad():
                    cache[prompt] = self.model.encoder.encode([prompt], [])
        embeds = torch.cat([cache[p].embeds for p in prompts])
        pooled = torch.cat([cache[p].pooled for p in prompts]) if cache[prompts[0]].pooled is not None else None
        return EncodedPrompt(embeds, pooled)

    def sdxl_arguments(self, encoded, resolution: int, count: int) -> dict:
        """SDXL's pooled embeddings and size conditioning; SD3's and Flux's pooled projections (nothing for SD
        1.x/2.x)."""
        if self.model.spec.objective == "flow":
            return {"pooled_projections": encoded.pooled}
        if self.model.family != "sdxl":
            return {}
        time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]],
                                dtype=encoded.embeds.dtype, device=encoded.embeds.device)
        return {"added_cond_kwargs": {"text_embeds": encoded.pooled, "time_ids": time_ids.repeat(count, 1)}}

    @contextmanager
    def training_context(self) -> Iterator[None]:
        """Around the whole loop (xti: the per-layer attention processors)."""
        yield

    # ---- what is saved -------------------------------------------------------------------------------------------

    @classmethod
    def file_name(cls, stem: str) -> str:
        return stem if cls.writes_folder else f"{stem}.safetensors"

    def meta(self, step: int) -> dict[str, str]:
        cfg = self.config
        return {"base_model": self.model.name, "family": self.model.family, "init_text": cfg.init_text,
                "steps": str(step), "method": self.name, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}

    def save(self, path: Path, word: Concept | None, weights: dict[str, torch.Tensor], step: int) -> Path:
        raise NotImplementedError

    def preview_concept(self, word: Concept | None):
        """What a preview's request uses for the word at its step (quick-tuning: the word with its image prompt)."""
        return word

    def result(self, path: Path, word: Concept | None):
        """What `Trainer.run` returns: a Concept (ti), a LoraFile (pivotal, lora) or the model folder (dreambooth)."""
        raise NotImplementedError
