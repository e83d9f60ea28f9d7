"""Prompt text + the concepts active for this request -> prompt embeddings for the diffusers pipelines.

Concepts are per-request data. The shared tokenizer and embedding table are never changed: the prompt is split
at each concept's token, the plain text between is tokenized as usual, and each concept occurrence becomes
`n_vectors` slots whose input embeddings are the concept's vectors. The text transformer then runs from those
input embeddings. So two users of one server never see each other's words, a swap costs nothing, and the trainer
uses this very path (gradients reach the concept vectors, and nothing else).

The result equals what a pipeline produces after diffusers' `load_textual_inversion` for the same file
(tests/engine/test_prompts.py). One deliberate difference: transformers pools SDXL's second encoder at
`argmax(input_ids)` when a config carries the legacy `eos_token_id == 2`; after `load_textual_inversion` that
lands on the added token rather than the end of the prompt. We always pool at the real end-of-text position.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Sequence

import torch

from studio.engine.concepts import ENCODER_KEYS, Concept

log = logging.getLogger(__name__)


@dataclass
class EncodedPrompt:
    embeds: torch.Tensor  # [B, 77, D]: what the pipeline takes as prompt_embeds
    pooled: torch.Tensor | None  # SDXL only: [B, P] pooled projection of the second encoder


class PromptEncoder:
    """Encodes prompts with per-request concepts for SD 1.x / 2.x (one encoder) or SDXL (two)."""

    def __init__(self, tokenizers: list, text_encoders: list, family: str, force_zeros_for_empty_prompt: bool = True):
        if len(tokenizers) != len(text_encoders) or not 1 <= len(text_encoders) <= 2:
            raise ValueError("PromptEncoder needs one tokenizer per text encoder, one or two of each")
        self.tokenizers = tokenizers
        self.text_encoders = text_encoders
        self.family = family
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt

    @classmethod
    def from_pipeline(cls, pipe) -> "PromptEncoder":
        """The encoder for a diffusers StableDiffusion(XL) pipeline, sharing its modules."""
        te2 = getattr(pipe, "text_encoder_2", None)
        if te2 is not None:
            force = bool(getattr(pipe.config, "force_zeros_for_empty_prompt", True))
            return cls([pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, te2], "sdxl", force)
        family = "sd2" if pipe.text_encoder.config.hidden_size == 1024 else "sd1"
        return cls([pipe.tokenizer], [pipe.text_encoder], family)

    # ---- tokenization -------------------------------------------------------------------------------------------
    @staticmethod
    def _split(prompt: str, concepts: Sequence[Concept]) -> list[str | Concept]:
        """Split `prompt` into plain text and concept occurrences (whole words, longest token first)."""
        if not concepts:
            return [prompt]
        by_token = {c.token: c for c in concepts}
        alternatives = "|".join(re.escape(t) for t in sorted(by_token, key=len, reverse=True))
        pattern = re.compile(rf"(?<![\w<>\-]){'(' + alternatives + ')'}(?![\w<>\-])")
        parts: list[str | Concept] = []
        pos = 0
        for match in pattern.finditer(prompt):
            parts.append(prompt[pos:match.start()])
            parts.append(by_token[match.group(1)])
            pos = match.end()
        parts.append(prompt[pos:])
        return parts

    def _ids_and_slots(self, prompt: str, concepts: Sequence[Concept], tokenizer) -> tuple[list[int], list[tuple[int, Concept, int]], int]:
        """Token ids padded to the model length, (position, concept, vector index) per concept slot, EOS position.

        A slot's id is a placeholder whose embedding is replaced; it is never EOS (CLIP's unknown token *is* EOS)."""
        placeholder = tokenizer.bos_token_id
        max_len = tokenizer.model_max_length
        ids: list[int] = [tokenizer.bos_token_id]
        slots: list[tuple[int, Concept, int]] = []
        for part in self._split(prompt, concepts):
            if isinstance(part, str):
                if part.strip():
                    ids.extend(tokenizer(part, add_special_tokens=False).input_ids)
            else:
                for k in range(part.n_vectors):
                    slots.append((len(ids), part, k))
                    ids.append(placeholder)
        if len(ids) > max_len - 1:
            log.warning("prompt truncated to %d tokens (CLIP's limit): %d tokens cut", max_len, len(ids) - (max_len - 1))
            ids = ids[: max_len - 1]
            slots = [s for s in slots if s[0] < max_len - 1]
        eos_position = len(ids)
        ids.append(tokenizer.eos_token_id)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        ids.extend([pad] * (max_len - len(ids)))
        return ids, slots, eos_position

    # ---- encoding -----------------------------------------------------------------------------------------------
    def _run_encoder(self, index: int, prompts: list[str], concepts: Sequence[Concept], clip_skip: int | None):
        tokenizer, encoder = self.tokenizers[index], self.text_encoders[index]
        key = ENCODER_KEYS[index]
        text_model = getattr(encoder, "text_model", encoder)  # CLIPTextModelWithProjection wraps a CLIPTextModel
        device = text_model.embeddings.token_embedding.weight.device
        dtype = text_model.embeddings.token_embedding.weight.dtype

        rows, eos_positions, all_slots = [], [], []
        for b, prompt in enumerate(prompts):
            ids, slots, eos_position = self._ids_and_slots(prompt, concepts, tokenizer)
            rows.append(ids)
            eos_positions.append(eos_position)
            all_slots.extend((b, pos, concept, k) for pos, concept, k in slots)
        input_ids = torch.tensor(rows, device=device)
        inputs = text_model.embeddings.token_embedding(input_ids)
        if all_slots:
            # Out-of-place: the shared table is untouched, and autograd reaches the concept vectors.
            batch_idx = torch.tensor([s[0] for s in all_slots], device=device)
            pos_idx = torch.tensor([s[1] for s in all_slots], device=device)
            values = torch.stack([s[2].vectors[key][s[3]].to(device=device, dtype=dtype) for s in all_slots])
            inputs = inputs.index_put((batch_idx, pos_idx), values)

        hidden = text_model.embeddings(inputs_embeds=inputs)
        seq = hidden.shape[1]
        causal = torch.full((seq, seq), torch.finfo(hidden.dtype).min, device=device, dtype=hidden.dtype).triu(1)
        causal = causal[None, None].expand(hidden.shape[0], 1, seq, seq)
        states = [hidden]
        for layer in text_model.encoder.layers:
            hidden = layer(hidden, causal)
            if isinstance(hidden, tuple):
                hidden = hidden[0]
            states.append(hidden)
        last = text_model.final_layer_norm(hidden)

        pooled = None
        if hasattr(encoder, "text_projection"):
            eos = torch.tensor(eos_positions, device=device)
            pooled = encoder.text_projection(last[torch.arange(len(prompts), device=device), eos])
        if self.family == "sdxl":  # SDXL: penultimate layer, no final norm
            embeds = states[-(clip_skip + 2)] if clip_skip else states[-2]
        elif clip_skip:
            embeds = text_model.final_layer_norm(states[-(clip_skip + 1)])
        else:
            embeds = last
        return embeds, pooled

    def encode(self, prompts: list[str] | str, concepts: Sequence[Concept] = (), *, clip_skip: int | None = None) -> EncodedPrompt:
        """Embeddings for `prompts` with `concepts` active; autograd flows into concept vectors that need it."""
        if isinstance(prompts, str):
            prompts = [prompts]
        outputs = [self._run_encoder(i, prompts, concepts, clip_skip) for i in range(len(self.text_encoders))]
        embeds = torch.cat([o[0] for o in outputs], dim=-1) if len(outputs) > 1 else outputs[0][0]
        pooled = outputs[-1][1] if self.family == "sdxl" else None
        return EncodedPrompt(embeds, pooled)

    def pipeline_kwargs(self, prompt: str, negative_prompt: str, concepts: Sequence[Concept] = (),
                        num_images: int = 1, guidance: float = 7.5, clip_skip: int | None = None) -> dict:
        """Keyword arguments for a StableDiffusion(XL) pipeline call: prompt (and negative) embeddings."""
        with torch.no_grad():
            pos = self.encode([prompt], concepts, clip_skip=clip_skip)
            if self.family == "sdxl" and not negative_prompt and self.force_zeros_for_empty_prompt:
                neg = EncodedPrompt(torch.zeros_like(pos.embeds), torch.zeros_like(pos.pooled))
            else:
                neg = self.encode([negative_prompt or ""], concepts, clip_skip=clip_skip)
        kwargs = {
            "prompt_embeds": pos.embeds.repeat(num_images, 1, 1),
            "negative_prompt_embeds": neg.embeds.repeat(num_images, 1, 1),
        }
        if self.family == "sdxl":
            kwargs["pooled_prompt_embeds"] = pos.pooled.repeat(num_images, 1)
            kwargs["negative_pooled_prompt_embeds"] = neg.pooled.repeat(num_images, 1)
        return kwargs
