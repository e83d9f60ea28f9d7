"""Per-layer words: Extended Textual Inversion (XTI / P+, Voynov et al. 2023), at run time.

A per-layer word (`XtiConcept`) holds one set of vectors per cross-attention layer of the UNet, in forward order:
SD 1.x/2.x have 16 such layers, SDXL 70, the demo model 7 (`cross_attention_layers` counts them on the UNet itself).

Run time, per request (what `XtiConcept.join` adds to a request's plan):
1. The prompt encoder encodes the prompt once per layer, that layer's vectors in the word's slots, all layers in one
   text-encoder batch (`encode_per_layer`). Plain words and ordinary concepts read the same in every layer, and
   prompt weighting works as everywhere (it is the same `PromptEncoder`).
2. The embeddings reach the layers through the attention processors' per-call arguments: the pipeline's or UNet's
   `cross_attention_kwargs={LAYER_EMBEDS_KWARG: {layer: embeds}}`. For the length of a `with per_layer_attention(unet)`
   block each processor of the UNet is wrapped: a cross-attention wrapper swaps its layer's embeddings in for
   `encoder_hidden_states` and calls the processor that was there (SDPA, xformers, sliced; peft LoRA layers sit in
   the projections and are untouched); a self-attention wrapper only drops the argument. The originals are put
   back in `finally`. Every processor is wrapped, not only cross-attention ones, because diffusers'
   `Attention.forward` logs a warning on every call for an argument its processor's signature does not name.
   The UNet's forward is never patched (kohya's XTI_hijack replaces the UNet's and its blocks' forwards).

The base `prompt_embeds` still go to the pipeline (it needs them for shapes, classifier-free guidance and, on SDXL,
the pooled projection); they are the prompt encoded with the mean of each word's layers. Files:
`studio.engine.learned.layer_word_files`.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from studio.engine.families import family_of
from studio.engine.learned.word import Concept, ConceptError, ConceptMismatchError
from studio.engine.prompts import EncodedPrompt, PromptEncoder


# The key of `cross_attention_kwargs` that carries `{layer name: prompt embeddings}`; `LayerPromptProcessor.__call__`
# names a parameter exactly so (diffusers passes a processor only the arguments its signature names).
LAYER_EMBEDS_KWARG = "layer_prompt_embeds"
# The UNet's parts in the order its forward runs them. `named_modules` lists them in registration order, which in
# diffusers' UNet2DConditionModel puts up_blocks before mid_block.
UNET_FORWARD_ORDER = ("down_blocks", "mid_block", "up_blocks")
MAX_LAYERS = 256  # SDXL has 70; a file claiming more is not a per-layer word


# ---- the UNet's layers -------------------------------------------------------------------------------------------
def cross_attention_layers(unet: torch.nn.Module) -> list[str]:
    """Module names of the UNet's cross-attention layers (the `attn2` of each transformer block) in forward order:
    down blocks, mid block, up blocks. SD 1.x/2.x: 16, SDXL: 70, the demo model: 7."""
    found = {part: [] for part in UNET_FORWARD_ORDER}
    for name, module in unet.named_modules():
        part = name.split(".", 1)[0]
        if part in found and name.endswith(".attn2") and getattr(module, "is_cross_attention", False):
            found[part].append(name)
    return [name for part in UNET_FORWARD_ORDER for name in found[part]]


# ---- the per-layer word ------------------------------------------------------------------------------------------
@dataclass(eq=False)
class XtiConcept(Concept):
    """A per-layer word: `layers` (the UNet's cross-attention module names in forward order) and, per layer, a
    `{encoder key: [n_vectors, dim]}` dict like `Concept.vectors`.

    It is a `Concept`, so the library, fit checks and every list of concepts take it as they are; its `vectors` are
    the mean of its layers (what a prompt's pooled projection and base embeddings are encoded with). Build one with
    `XtiConcept.from_layers`."""

    layers: list[str] = field(default_factory=list)
    layer_vectors: list[dict[str, torch.Tensor]] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= len(self.layers) <= MAX_LAYERS or len(self.layers) != len(self.layer_vectors):
            raise ConceptError(f"per-layer word {self.token!r}: {len(self.layers)} layer names for "
                               f"{len(self.layer_vectors)} vector sets; give one set per layer (1-{MAX_LAYERS})")
        if len(set(self.layers)) != len(self.layers):
            raise ConceptError(f"per-layer word {self.token!r}: a layer is named twice in {self.layers}")
        shapes = self.shapes()
        for layer, vectors in zip(self.layers, self.layer_vectors):
            found = {key: list(t.shape) for key, t in vectors.items()}
            if found != shapes:
                raise ConceptError(f"per-layer word {self.token!r}: layer {layer} holds {found}, the mean of all "
                                   f"layers {shapes}; every layer needs the same vector count and widths")

    @classmethod
    def from_layers(cls, token: str, layers: Sequence[str], layer_vectors: Sequence[dict[str, torch.Tensor]],
                    meta: dict[str, str] | None = None) -> "XtiConcept":
        """A per-layer word from its layers' vectors (tensors or `torch.nn.Parameter`s, kept as given)."""
        layer_vectors = list(layer_vectors)
        if not layer_vectors:
            raise ConceptError(f"per-layer word {token!r}: no layers given")
        with torch.no_grad():
            mean = {key: torch.stack([lv[key] for lv in layer_vectors]).mean(0) for key in layer_vectors[0]}
        return cls(token, mean, dict(meta or {}), list(layers), layer_vectors)

    def vectors_at(self, layer: str) -> dict[str, torch.Tensor]:
        """This layer's `{encoder key: [n_vectors, dim]}`."""
        return self.layer_vectors[self.layers.index(layer)]

    @property
    def kind(self) -> str:
        return "xti"

    def join(self, plan, weight: float = 1.0) -> None:
        """Its mean vectors in the prompt's slots, its layers' own vectors given to each cross-attention layer
        through the attention processors (`per_layer_attention`, with one prompt encoded per layer)."""
        plan.add_words([self])
        plan.encode = pipeline_kwargs_with_layers
        plan.edit_attention("per-layer words", per_layer_attention)


def check_layers(concept: XtiConcept, layers: Sequence[str], *, where: str = "") -> None:
    """Raise `ConceptMismatchError` unless `concept` holds vectors for exactly the UNet's cross-attention `layers`;
    the message names the file, both layer counts and what to do."""
    if sorted(concept.layers) == sorted(layers):
        return
    origin = where or concept.meta.get("source_path") or concept.token
    trained = concept.meta.get("base_model") or family_of(concept.dims)[1]
    if len(concept.layers) != len(layers):
        detail = f"{len(concept.layers)} cross-attention layers but this model's UNet has {len(layers)}"
    else:
        theirs = next(layer for layer in concept.layers if layer not in layers)
        detail = f"the same number of layers as this model's UNet ({len(layers)}) but not the same ones ({theirs})"
    raise ConceptMismatchError(f"{origin}: per-layer word {concept.token!r} was trained on {trained} and holds "
                               f"vectors for {detail}; load the model it was trained on, or train the word on this "
                               "one (studio train --method xti)")


# ---- encoding -----------------------------------------------------------------------------------------------------
@dataclass
class PerLayerPrompt:
    base: EncodedPrompt  # prompt_embeds [B, 77, D] (+ SDXL pooled) with each per-layer word's mean vectors
    layers: dict[str, torch.Tensor]  # cross-attention layer name -> [B, 77, D], that layer's vectors in the slots

    def cross_attention_kwargs(self) -> dict:
        """What the UNet (or a pipeline) takes as `cross_attention_kwargs` inside `per_layer_attention`."""
        return {LAYER_EMBEDS_KWARG: self.layers}


def _word_at(concept: Concept, layer: str | None) -> Concept:
    """The word as an ordinary concept for one layer (None: its mean); ordinary concepts as they are."""
    if not isinstance(concept, XtiConcept):
        return concept
    if layer is None:  # the mean, computed here so that gradients reach every layer's vectors
        vectors = {key: torch.stack([lv[key] for lv in concept.layer_vectors]).mean(0) for key in concept.vectors}
    else:
        vectors = concept.vectors_at(layer)
    return Concept(concept.token, vectors, concept.meta)


def _encode_rows(encoder: PromptEncoder, prompts: list[str], concept_sets: list[list[Concept]],
                 clip_skip: int | None, weighting: bool) -> list[EncodedPrompt]:
    """`prompts` encoded once with each set of concepts, all sets in one batch per text encoder."""
    per_encoder = []
    for index in range(len(encoder.text_encoders)):
        rows = [encoder.input_embeddings(index, prompts, concepts, weighting) for concepts in concept_sets]
        inputs = torch.cat([r[0] for r in rows])
        eos = [position for r in rows for position in r[1]]
        weights = torch.cat([r[2] for r in rows])
        per_encoder.append(encoder.encode_input_embeddings(index, inputs, eos, weights, clip_skip))
    embeds = torch.cat([e for e, _ in per_encoder], dim=-1) if len(per_encoder) > 1 else per_encoder[0][0]
    pooled = per_encoder[-1][1] if encoder.family == "sdxl" else None
    n = len(prompts)
    return [EncodedPrompt(embeds[k * n:(k + 1) * n], None if pooled is None else pooled[k * n:(k + 1) * n])
            for k in range(len(concept_sets))]


def encode_per_layer(encoder: PromptEncoder, prompts: list[str] | str, concepts: Sequence[Concept],
                     layers: Sequence[str], *, clip_skip: int | None = None, weighting: bool = True,
                     base: bool = True) -> PerLayerPrompt:
    """`prompts` encoded for each cross-attention layer of a UNet (`cross_attention_layers(unet)`), the base
    embeddings too unless `base=False` (then `base` is None).

    `concepts` may mix ordinary concepts (the same vectors in every layer) and per-layer words; autograd reaches
    every layer's vectors that require grad (the trainer's path). Raises `ConceptMismatchError` for a concept that
    does not fit the encoder or a per-layer word whose layers are not `layers`."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    concepts = list(concepts)
    encoder.check_concepts(concepts)
    for concept in concepts:
        if isinstance(concept, XtiConcept):
            check_layers(concept, layers)
    wanted = ([None] if base else []) + list(layers)
    rows = _encode_rows(encoder, prompts, [[_word_at(c, layer) for c in concepts] for layer in wanted],
                        clip_skip, weighting)
    base_prompt = rows.pop(0) if base else None
    return PerLayerPrompt(base_prompt, {layer: row.embeds for layer, row in zip(layers, rows)})


def has_layer_words(concepts: Sequence[Concept]) -> bool:
    """Whether any of `concepts` is a per-layer word (so the request needs `per_layer_attention`)."""
    return any(isinstance(c, XtiConcept) for c in concepts)


def pipeline_kwargs_with_layers(encoder: PromptEncoder, unet, prompt: str, negative_prompt: str,
                                concepts: Sequence[Concept], num_images: int = 1, guidance: float = 7.5,
                                clip_skip: int | None = None) -> dict:
    """`PromptEncoder.pipeline_kwargs`, plus `cross_attention_kwargs` with per-layer embeddings when a per-layer word
    is among `concepts` (else exactly what the encoder gives).

    Per-layer embeddings follow the pipeline's batch: negative then positive rows when it guides (diffusers'
    `torch.cat([negative_prompt_embeds, prompt_embeds])`, its rule `guidance_scale > 1` and no
    `time_cond_proj_dim`), each repeated `num_images` times as `pipeline_kwargs` repeats the base ones."""
    kwargs = encoder.pipeline_kwargs(prompt, negative_prompt, concepts, num_images, guidance, clip_skip)
    if not has_layer_words(concepts):
        return kwargs
    layers = cross_attention_layers(unet)
    with torch.no_grad():
        encoded = encode_per_layer(encoder, [negative_prompt or "", prompt], concepts, layers, clip_skip=clip_skip,
                                   base=False).layers
    guides = guidance > 1 and unet.config.time_cond_proj_dim is None
    zero_negative = encoder.zeros_for_negative(negative_prompt)
    per_layer = {}
    for layer, rows in encoded.items():
        positive = rows[1:].repeat(num_images, 1, 1)
        if guides:
            negative = torch.zeros_like(rows[:1]) if zero_negative else rows[:1]
            per_layer[layer] = torch.cat([negative.repeat(num_images, 1, 1), positive])
        else:
            per_layer[layer] = positive
    return {**kwargs, "cross_attention_kwargs": {LAYER_EMBEDS_KWARG: per_layer}}


# ---- the attention processors ------------------------------------------------------------------------------------
class LayerPromptProcessor:
    """Wraps the attention processor that was on a layer: a cross-attention layer (`layer` set) attends to its own
    embeddings from `cross_attention_kwargs[LAYER_EMBEDS_KWARG]`; any layer drops that argument before calling the
    processor it wraps. Only the arguments diffusers' `Attention.forward` passes are forwarded."""

    def __init__(self, inner, layer: str | None):
        self.inner = inner
        self.layer = layer

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 layer_prompt_embeds: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        if self.layer is not None and layer_prompt_embeds is not None:
            states = layer_prompt_embeds.get(self.layer)
            if states is None:
                raise ValueError(f"no per-layer prompt embeddings for cross-attention layer {self.layer}; build "
                                 "them with studio.engine.learned.layer_word.encode_per_layer for this UNet's layers")
            # With image prompts (IP-Adapter) the UNet passes (text states, image states): the text part is the layer's.
            image_states = encoder_hidden_states[1] if isinstance(encoder_hidden_states, tuple) else None
            text_states = encoder_hidden_states[0] if image_states is not None else encoder_hidden_states
            expected = text_states.shape[0] if text_states is not None else hidden_states.shape[0]
            if states.shape[0] != expected:
                raise ValueError(f"per-layer prompt embeddings for layer {self.layer} have batch {states.shape[0]} "
                                 f"but the UNet runs batch {expected}; build them for the same prompts, images per "
                                 "prompt and guidance (negative rows first when guiding)")
            like = text_states if text_states is not None else hidden_states
            encoder_hidden_states = states.to(device=like.device, dtype=like.dtype)
            if image_states is not None:
                encoder_hidden_states = (encoder_hidden_states, image_states)
        return self.inner(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                          attention_mask=attention_mask)


@contextmanager
def per_layer_attention(unet, enabled: bool = True) -> Iterator[None]:
    """For the length of the block, every attention processor of `unet` is wrapped in a `LayerPromptProcessor`,
    so calls with `cross_attention_kwargs={LAYER_EMBEDS_KWARG: ...}` give each cross-attention layer its own
    embeddings; the original processors are put back in `finally`. `enabled=False` changes nothing.

    The UNet is shared: hold the model's lock around the block (generate does), as for LoRAs."""
    if not enabled:
        yield
        return
    originals = unet.attn_processors  # "<module name>.processor" -> processor
    cross = set(cross_attention_layers(unet))
    wrapped = {key: LayerPromptProcessor(processor, key.removesuffix(".processor")
                                         if key.removesuffix(".processor") in cross else None)
               for key, processor in originals.items()}
    unet.set_attn_processor(wrapped)
    try:
        yield
    finally:
        unet.set_attn_processor(dict(originals))
