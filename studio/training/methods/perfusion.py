"""`perfusion`: the word and a key-locked rank-one edit of every cross-attention layer (Tewel et al. 2023).

What learns: the word's vectors (as in TI, at the word's learning rate) and o*_V, the value each cross-attention layer
gives the concept (at the weights' rate; the paper's 0.03). What is fixed: o*_K = W_K i_class, the class word's
encoding (averaged over the training prompts) through each key projection, so the concept is attended where its class
would be. What follows the run: i*, the running mean (decay 0.99) of the word's encoding in the training prompts, and
with it C^-1 i*. C is the covariance of the model's text encodings over a caption set
(`studio.training.captions.captions_for`), measured once per model and caption set and kept in the user's cache.

During the run every cross-attention `to_k`/`to_v` of the shared UNet is wrapped in the runtime's `GatedRankOne`
(`studio.engine.learned.perfusion`) with the training gate (beta 0.75, tau 0.1) over the live tensors, so the loss,
the held-back score and the previews all see the edit; the wrappers are taken out at the end. i* is kept as a weight
that takes no gradient, so a checkpoint holds it and a resumed run goes on bit for bit.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from studio.engine.learned.layer_word import cross_attention_layers
from studio.engine.learned.perfusion import (TRAIN_BETA, TRAIN_TAU, PerfusionConcept, edit_projections,
                                             encoding_covariance, inverse_covariance, restore_projections)
from studio.engine.learned.word import Concept
from studio.training.captions import captions_for
from studio.training.methods.base import Method

TARGET_DECAY = 0.99  # the paper's running mean of i* (and of the class encoding)
CLASS_PROMPTS = 16  # templates the class word's encoding is averaged over
# The run's weights by name (a checkpoint's keys; "unet." as for the other methods' weights of the UNet)
TARGET, VALUE = "unet.perfusion.target", "unet.perfusion.value."


class Perfusion(Method):
    name = "perfusion"
    summary = ("Perfusion: the word and a key-locked rank-one edit of each cross-attention layer learn; about 100 KB "
               "on SD 1.5; write the word. Concepts combine in one prompt.")
    default_unet_lr = 0.03  # the paper's learning rate of o*_V
    # All of `steps` (400 by default): stopped once learned, runs ended at ~58 steps with identity 0.24 on 6 held-out
    # individuals, against 0.46 after 400 (seed 23, docs/benchmarks.md "Perfusion").
    stops_when_learned = False

    def __init__(self, trainer) -> None:
        super().__init__(trainer)
        self.layers = cross_attention_layers(self.model.denoiser)
        self._replaced: list = []
        self.inverse: torch.Tensor | None = None  # C^-1
        self.metric: torch.Tensor | None = None  # C^-1 i*, follows i*
        self.keys: list[torch.Tensor] = []
        self.target: torch.nn.Parameter | None = None  # i*

    # ---- what learns ---------------------------------------------------------------------------------------------
    def add_weights(self) -> dict[str, torch.nn.Parameter]:
        """o*_V per layer (from the class encoding's value) and i* (no gradient: it follows the word's encoding);
        the cross-attention projections wrapped for the run."""
        unet, device = self.unet, self.model.device
        self.inverse = self._inverse_covariance().to(device)
        class_encoding = self._class_encoding().to(device)
        with torch.no_grad():
            projections = [unet.get_submodule(layer) for layer in self.layers]
            self.keys = [a.to_k(class_encoding.to(a.to_k.weight.dtype)).float() for a in projections]
            values = {f"{VALUE}{i}": torch.nn.Parameter(a.to_v(class_encoding.to(a.to_v.weight.dtype)).float())
                      for i, a in enumerate(projections)}
        self.target = torch.nn.Parameter(class_encoding.clone(), requires_grad=False)
        self.metric = self.inverse @ self.target.detach()
        concept = self._concept(self.target, list(values.values()))
        self._replaced = edit_projections(unet, self.layers, [concept], [1.0])
        return {TARGET: self.target, **values}

    def remove_weights(self) -> None:
        restore_projections(self._replaced)
        self._replaced = []

    def weight_groups(self, weights: dict[str, torch.nn.Parameter]) -> list[dict]:
        return [{"params": [p for n, p in weights.items() if n != TARGET], "initial_lr": self.unet_lr()}]

    def _concept(self, target: torch.Tensor, values: list[torch.Tensor],
                 vectors: dict[str, torch.Tensor] | None = None, meta: dict[str, str] | None = None,
                 ) -> PerfusionConcept:
        """The concept over the live tensors (`vectors` None: a placeholder word, for the training wrappers)."""
        if vectors is None:
            vectors = {key: torch.zeros(1, width) for key, width in self.model.encoder_dims.items()}
        return PerfusionConcept(self.config.token, vectors, dict(meta or {}), layers=list(self.layers),
                                target=target, target_metric=self.metric, keys=self.keys, values=values,
                                class_word=self.trainer.class_word, beta=TRAIN_BETA, tau=TRAIN_TAU)

    # ---- the encodings -------------------------------------------------------------------------------------------
    def encode(self, prompts: list[str], vectors: dict[str, torch.Tensor], resolution: int,
               others: list[Concept] = ()) -> tuple[torch.Tensor, dict]:
        """The prompts with the word; on a training batch (gradients on; the held-back score runs without), i*
        first moves towards the word's mean encoding in this batch."""
        word = Concept(self.config.token, vectors, {})
        encoded = self.model.encoder.encode(prompts, [word, *others])
        if torch.is_grad_enabled() and self._replaced:
            self._follow_target(encoded.embeds.detach(), prompts, [word, *others], word)
        with torch.no_grad():  # also after a resume has put a checkpoint's i* back
            self.metric.copy_(self.inverse @ self.target)
        return encoded.embeds, self.sdxl_arguments(encoded, resolution, len(prompts))

    def _follow_target(self, embeds: torch.Tensor, prompts: list[str], concepts: list[Concept], word: Concept) -> None:
        rows = [embeds[b, position] for b, prompt in enumerate(prompts)
                for position in self.model.encoder.slot_positions(prompt, concepts, word)]
        if not rows:
            return
        mean = torch.stack(rows).float().mean(0)
        accelerator = self.trainer._accelerator
        if accelerator is not None and accelerator.num_processes > 1:  # every process follows the global batch's mean
            mean = accelerator.reduce(mean, reduction="mean")
        with torch.no_grad():
            self.target.mul_(TARGET_DECAY).add_(mean, alpha=1 - TARGET_DECAY)

    def _class_encoding(self) -> torch.Tensor:
        """i_class: the class word's encoding (the mean over its tokens) in `CLASS_PROMPTS` of the paper's templates."""
        from studio.training.templates import TEMPLATES

        encoder, class_word = self.model.encoder, self.trainer.class_word or "object"
        vectors = {}
        for index, (key, table) in enumerate(zip(encoder.encoder_dims, encoder.text_encoders)):
            tokenizer = encoder.tokenizers[index]
            ids = tokenizer(class_word, add_special_tokens=False).input_ids or [tokenizer.eos_token_id]
            weight = table.get_input_embeddings().weight
            vectors[key] = weight[torch.tensor(ids, device=weight.device)].detach().float()
        word = Concept("<perfusion-class>", vectors, {})
        prompts = [template.format(word.token) for template in TEMPLATES["object"][:CLASS_PROMPTS]]
        with torch.no_grad():
            embeds = encoder.encode(prompts, [word]).embeds
        rows = [embeds[b, p] for b, prompt in enumerate(prompts) for p in encoder.slot_positions(prompt, [word], word)]
        return torch.stack(rows).float().mean(0)

    def _inverse_covariance(self) -> torch.Tensor:
        """C^-1 of the model's text encodings over its caption set, from the cache when measured before."""
        from safetensors.torch import load_file, save_file

        from studio.engine.files import atomic_write

        captions, _origin = captions_for(self.model.source, self.config.captions)
        path = _cache_folder() / f"{self._fingerprint(captions)}.safetensors"
        if path.is_file():
            return load_file(str(path))["inverse"]
        inverse = inverse_covariance(encoding_covariance(self.model.encoder, captions))
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: save_file({"inverse": inverse.contiguous()}, str(tmp)))
        return inverse

    def _fingerprint(self, captions: list[str]) -> str:
        """What the covariance depends on: the captions and the text encoders (their weights, sampled)."""
        digest = hashlib.sha256("\n".join(captions).encode())
        for encoder in self.model.encoder.text_encoders:
            for tensor in list(encoder.state_dict().values())[-4:] + [encoder.get_input_embeddings().weight[:256]]:
                digest.update(tensor.detach().float().cpu().numpy().tobytes())
        return digest.hexdigest()[:24]

    # ---- what is saved -------------------------------------------------------------------------------------------
    def save(self, path: Path, word: Concept | None, weights: dict[str, torch.Tensor], step: int) -> Path:
        from studio.engine.learned.perfusion import DEMO_BETA, INFERENCE_BETA, INFERENCE_TAU
        from studio.engine.learned.perfusion_files import save_perfusion

        values = [weights[f"{VALUE}{i}"].detach().cpu().clone() for i in range(len(self.layers))]
        concept = self._concept(weights[TARGET].detach().cpu().clone(), values,
                                {k: v.detach().cpu() for k, v in word.vectors.items()}, word.meta)
        concept.target_metric = (self.inverse @ weights[TARGET].detach()).cpu()
        concept.keys = [k.detach().cpu().clone() for k in self.keys]
        # The gate its file carries: the paper's for SD models, the demo's measured one for the demo model.
        concept.beta, concept.tau = (DEMO_BETA if self.model.is_demo else INFERENCE_BETA), INFERENCE_TAU
        return save_perfusion(concept, path)

    def result(self, path: Path, word: Concept | None) -> PerfusionConcept:
        from studio.engine.learned.registry import load_concept

        return load_concept(path)


def _cache_folder() -> Path:
    """Where measured covariances are kept: $CONCEPT_STUDIO_CACHE/perfusion, else ~/.cache/concept-studio/perfusion."""
    root = os.environ.get("CONCEPT_STUDIO_CACHE") or Path.home() / ".cache" / "concept-studio"
    return Path(root) / "perfusion"
