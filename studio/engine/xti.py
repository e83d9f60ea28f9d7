"""Per-layer words: Extended Textual Inversion (XTI / P+, Voynov et al. 2023), at run time and in files.

A per-layer word (`XtiConcept`) holds one set of vectors per cross-attention layer of the UNet, in forward order:
SD 1.x/2.x have 16 such layers, SDXL 70, the demo model 7 (`cross_attention_layers` counts them on the UNet itself).

Run time, per request:
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
the pooled projection); they are the prompt encoded with the mean of each word's layers.

Files: kohya sd-scripts' XTI form (`train_textual_inversion_XTI.py`): one tensor `[n_vectors, dim]` per layer, keyed
by the layer's A1111 block name (IN01 ... MID ... OUT11), safetensors or a torch pickle, no metadata; and the
studio's own safetensors form, one tensor per layer and encoder keyed `<layer>.<encoder key>`, with metadata.
"""

from __future__ import annotations

import json
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
from safetensors.torch import save as safetensors_save

from studio.engine.concepts import (
    Concept,
    ConceptError,
    ConceptMismatchError,
    _check_tensor,
    _for_writing,
    _studio_metadata,
)
from studio.engine.families import ENCODER_KEYS, family_of
from studio.engine.files import atomic_write
from studio.engine.names import file_stem
from studio.engine.prompts import EncodedPrompt, PromptEncoder

# The key of `cross_attention_kwargs` that carries `{layer name: prompt embeddings}`; `LayerPromptProcessor.__call__`
# names a parameter exactly so (diffusers passes a processor only the arguments its signature names).
LAYER_EMBEDS_KWARG = "layer_prompt_embeds"

# The UNet's parts in the order its forward runs them. `named_modules` lists them in registration order, which in
# diffusers' UNet2DConditionModel puts up_blocks before mid_block.
UNET_FORWARD_ORDER = ("down_blocks", "mid_block", "up_blocks")

STUDIO_XTI_FORMAT = "studio-xti"  # metadata "studio_format" of the studio's own per-layer files
XTI_FORMATS = ("studio", "kohya")
MAX_LAYERS = 256  # SDXL has 70; a file claiming more is not a per-layer word

# kohya's layer names are A1111's UNet block names: input block k (IN), the middle block, output block k (OUT).
# Input block 0 is conv_in; each down block then has layers_per_block resnet(+attention) blocks and a downsampler,
# each up block layers_per_block + 1 blocks. kohya's XTI supports SD 1.x/2.x only, whose layers_per_block is 2.
_KOHYA_NAME = re.compile(r"^(IN|OUT)(\d\d)$|^MID$")
_DIFFUSERS_LAYER = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.attentions\.(\d+)\.transformer_blocks\.(\d+)\.attn2$"
                              r"|^mid_block\.attentions\.0\.transformer_blocks\.(\d+)\.attn2$")
KOHYA_LAYERS_PER_BLOCK = 2  # SD 1.x/2.x UNets (diffusers' UNet2DConditionModel default); kohya hard-codes their names


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


def kohya_layer_name(layer: str, layers_per_block: int) -> str:
    """kohya's (A1111's) block name of a diffusers cross-attention layer: `down_blocks.0.attentions.0...attn2` ->
    "IN01", the mid block's -> "MID", `up_blocks.1.attentions.0...attn2` -> "OUT03" (SD 1.x, layers_per_block 2).

    kohya names a block, not a transformer block inside it: a layer other than the first transformer block of its
    attention (SDXL's blocks hold 2 or 10) has no kohya name and raises `ConceptError`."""
    match = _DIFFUSERS_LAYER.match(layer)
    if match is None or (match[4] or match[5]) != "0":
        raise ConceptError(f"cross-attention layer {layer!r} has no kohya XTI name (kohya's form holds one vector set "
                           "per UNet block, as in SD 1.x/2.x); save this word in the studio form instead")
    if match[1] is None:
        return "MID"
    block, attention = int(match[2]), int(match[3])
    if match[1] == "down_blocks":
        return f"IN{1 + block * (layers_per_block + 1) + attention:02d}"
    return f"OUT{block * (layers_per_block + 1) + attention:02d}"


def _layers_per_block(layers: Sequence[str]) -> int:
    """A UNet's layers_per_block read off its cross-attention layer names: a down block has one attention per
    resnet, so the highest down-block attention index is layers_per_block - 1."""
    down = [int(m[3]) for m in map(_DIFFUSERS_LAYER.match, layers) if m is not None and m[1] == "down_blocks"]
    if not down:
        raise ConceptError("this word's layers include no down-block cross-attention, so they have no kohya XTI "
                           "names; save it in the studio form instead")
    return max(down) + 1


def _layers_from_kohya(names: Sequence[str], layers_per_block: int = KOHYA_LAYERS_PER_BLOCK) -> list[str]:
    """Diffusers layer names, in forward order, for kohya names of a UNet with `layers_per_block`; `ConceptError`
    for a name such a UNet does not have."""
    def diffusers_name(name: str) -> tuple[int, int, str]:
        if name == "MID":
            return (1, 0, "mid_block.attentions.0.transformer_blocks.0.attn2")
        number = int(name[-2:])
        if name.startswith("IN"):
            block, attention = divmod(number - 1, layers_per_block + 1)
            if number == 0 or attention == layers_per_block:  # conv_in and the downsamplers hold no attention
                raise ConceptError(f"{name} is no cross-attention layer of a UNet with {layers_per_block} layers "
                                   "per block")
            return (0, number, f"down_blocks.{block}.attentions.{attention}.transformer_blocks.0.attn2")
        block, attention = divmod(number, layers_per_block + 1)
        return (2, number, f"up_blocks.{block}.attentions.{attention}.transformer_blocks.0.attn2")

    return [name for *_, name in sorted(map(diffusers_name, names))]


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

    def check_fit(self, model) -> None:
        """The widths of a word, and vectors for exactly the cross-attention layers of `model`'s denoiser."""
        super().check_fit(model)
        check_layers(self, cross_attention_layers(model.denoiser))

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
                                 "them with studio.engine.xti.encode_per_layer for this UNet's layers")
            expected = encoder_hidden_states.shape[0] if encoder_hidden_states is not None else hidden_states.shape[0]
            if states.shape[0] != expected:
                raise ValueError(f"per-layer prompt embeddings for layer {self.layer} have batch {states.shape[0]} "
                                 f"but the UNet runs batch {expected}; build them for the same prompts, images per "
                                 "prompt and guidance (negative rows first when guiding)")
            like = encoder_hidden_states if encoder_hidden_states is not None else hidden_states
            encoder_hidden_states = states.to(device=like.device, dtype=like.dtype)
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


# ---- files --------------------------------------------------------------------------------------------------------
def is_xti_content(data: object, metadata: dict[str, str]) -> bool:
    """Whether a concept file's content is a per-layer word: the studio's form (its metadata says so) or kohya's
    (every key a block name: IN01 ... MID ... OUT11)."""
    if metadata.get("studio_format") == STUDIO_XTI_FORMAT:
        return True
    return (isinstance(data, dict) and len(data) > 1 and all(isinstance(k, str) and _KOHYA_NAME.match(k) for k in data)
            and "MID" in data)


def read_xti(data: dict, metadata: dict[str, str], path: Path, token: str | None = None) -> XtiConcept:
    """The per-layer word in a file's content (`is_xti_content`). The word: `token`; else the one the studio stored
    (in a kohya-form file only while the file is still named after it); else the file's stem (kohya's rule)."""
    if metadata.get("studio_format") == STUDIO_XTI_FORMAT:
        layers, source_format = _stored_layers(metadata, path), "studio"
        layer_vectors = []
        for layer in layers:
            found = {key: data[f"{layer}.{key}"] for key in ENCODER_KEYS if f"{layer}.{key}" in data}
            if "text_encoder" not in found:
                raise ConceptError(f"{path.name}: no vectors for layer {layer} ({layer}.text_encoder); the file is "
                                   "damaged, re-export it")
            layer_vectors.append(found)
    else:
        source_format = "kohya-xti"
        # A file the studio wrote carries its layer names (the demo model's UNet is not SD 1.x/2.x's); kohya's do not.
        layers = _stored_layers(metadata, path) if "layers" in metadata else _layers_from_kohya(list(data))
        per_block = _layers_per_block(layers)
        names = {layer: kohya_layer_name(layer, per_block) for layer in layers}
        if sorted(names.values()) != sorted(data):
            raise ConceptError(f"{path.name}: its keys {sorted(data)} are not the kohya names of the layers in its "
                               f"metadata ({sorted(names.values())}); re-export the file")
        layer_vectors = [{"text_encoder": data[names[layer]]} for layer in layers]

    layer_vectors = [{key: _check_tensor(t, path, f"{layer} {key}") for key, t in vectors.items()}
                     for layer, vectors in zip(layers, layer_vectors)]
    meta = {k: v for k, v in metadata.items() if k not in ("format", "layers", "studio_format")}
    meta.update(source_format=source_format, source_path=str(path))
    stored = metadata.get("token")
    if source_format == "kohya-xti" and stored and file_stem(stored) != path.stem:
        stored = None  # a renamed kohya file answers to its new name, as kohya reads it (concepts' rule too)
    try:
        concept = XtiConcept.from_layers(token or stored or path.stem, layers, layer_vectors, meta)
    except ConceptError as exc:
        raise ConceptError(f"{path.name}: {exc}") from None
    concept.meta["family"] = concept.family
    return concept


def _stored_layers(metadata: dict[str, str], path: Path) -> list[str]:
    try:
        layers = json.loads(metadata.get("layers", ""))
    except json.JSONDecodeError:
        layers = None
    if not isinstance(layers, list) or not layers or not all(isinstance(x, str) for x in layers):
        raise ConceptError(f"{path.name}: its 'layers' metadata is not a list of layer names; re-export the file")
    return layers


def save_xti(concept: XtiConcept, path: str | os.PathLike, format: str = "studio") -> Path:
    """Write a per-layer word atomically; returns the path written.

    - "studio": safetensors `{"<layer>.<encoder key>": [n, dim]}` with metadata (studio_format, token, layers as
      JSON, base_model, family, init_text, steps, created, studio_version).
    - "kohya": kohya sd-scripts' XTI form, `{"IN01": [n, dim], ..., "MID": ..., "OUT11": ...}`; one encoder and one
      transformer block per UNet block only (SD 1.x/2.x, the demo model), else `ConceptError`. The word and the
      layer names ride along as metadata, which kohya's loaders ignore. (kohya also reads and writes .pt pickles of
      the same dict; `load_concept` reads those.)"""
    if format not in XTI_FORMATS:
        raise ConceptError(f"per-layer word {concept.token!r}: {format} files hold no per-layer words; save it as "
                           f"{' or '.join(XTI_FORMATS)}")
    path = Path(path)
    if path.suffix == "":
        path = path.with_name(path.name + ".safetensors")
    elif path.suffix.lower() != ".safetensors":
        raise ConceptError(f"{path.name}: per-layer files are written as .safetensors (kohya's XTI trainer loads only "
                           f"those); name the output {path.stem}.safetensors")
    metadata = _studio_metadata(concept)
    metadata["layers"] = json.dumps(concept.layers)

    if format == "studio":
        metadata["studio_format"] = STUDIO_XTI_FORMAT
        body = {f"{layer}.{key}": _for_writing(t, concept, f"{layer} {key}")
                for layer, vectors in zip(concept.layers, concept.layer_vectors) for key, t in vectors.items()}
        atomic_write(path, safetensors_save(body, metadata))
        return path

    if "text_encoder_2" in concept.vectors:
        raise ConceptError(f"per-layer word {concept.token!r}: kohya's XTI form holds one text encoder's vectors "
                           "(SD 1.x/2.x); save this SDXL word in the studio form")
    per_block = _layers_per_block(concept.layers)
    body = {kohya_layer_name(layer, per_block): _for_writing(vectors["text_encoder"], concept, layer)
            for layer, vectors in zip(concept.layers, concept.layer_vectors)}
    atomic_write(path, safetensors_save(body, {"format": "pt", "token": concept.token, "layers": metadata["layers"]}))
    return path
