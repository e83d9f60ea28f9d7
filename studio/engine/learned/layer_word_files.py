"""Per-layer word files: kohya sd-scripts' XTI form and the studio's own.

kohya's form (`train_textual_inversion_XTI.py`): one tensor `[n_vectors, dim]` per layer, keyed by the layer's A1111
block name (IN01 ... MID ... OUT11), safetensors or a torch pickle, no metadata. The studio's own: safetensors, one
tensor per layer and encoder keyed `<layer>.<encoder key>`, with metadata (`STUDIO_XTI_FORMAT`).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Sequence

from safetensors.torch import save as safetensors_save

from studio.engine.families import ENCODER_KEYS
from studio.engine.files import atomic_write
from studio.engine.learned.layer_word import XtiConcept
from studio.engine.learned.word import ConceptError
from studio.engine.learned.word_files import _check_tensor, _for_writing, _studio_metadata, safetensors_output
from studio.engine.names import file_stem


STUDIO_XTI_FORMAT = "studio-xti"  # metadata "studio_format" of the studio's own per-layer files
XTI_FORMATS = ("studio", "kohya")
# kohya's layer names are A1111's UNet block names: input block k (IN), the middle block, output block k (OUT).
# Input block 0 is conv_in; each down block then has layers_per_block resnet(+attention) blocks and a downsampler,
# each up block layers_per_block + 1 blocks. kohya's XTI supports SD 1.x/2.x only, whose layers_per_block is 2.
_KOHYA_NAME = re.compile(r"^(IN|OUT)(\d\d)$|^MID$")
_DIFFUSERS_LAYER = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.attentions\.(\d+)\.transformer_blocks\.(\d+)\.attn2$"
                              r"|^mid_block\.attentions\.0\.transformer_blocks\.(\d+)\.attn2$")
KOHYA_LAYERS_PER_BLOCK = 2  # SD 1.x/2.x UNets (diffusers' UNet2DConditionModel default); kohya hard-codes their names


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
    path = safetensors_output(path, "per-layer files (kohya's XTI trainer loads only those)")
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
