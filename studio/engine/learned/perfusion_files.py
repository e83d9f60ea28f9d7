"""Perfusion files: the studio's form, one safetensors file per concept.

    {"emb_params": [n, dim]}  (SDXL: "clip_l", "clip_g")   the word, as in the studio's word files
    "perfusion.target": [D]          i*, the concept's target input (D: the UNet's cross-attention width)
    "perfusion.target_metric": [D]   C^-1 i* (so no covariance is needed to use it)
    "perfusion.keys": [sum of widths]    o*_K of every layer, end to end, in `layers` order
    "perfusion.values": [sum of widths]  o*_V likewise
    metadata: studio_format "studio-perfusion", token, class_word, layers and widths (JSON), beta, tau, base_model,
    family, init_text, steps, created, studio_version.

Keys and values are stored end to end rather than a tensor per layer, so the header holds 5 entries, not 35; on
SD 1.5's shapes the file is 110,736 bytes (108 KiB, measured). The two public codebases' checkpoints (lucidrains/perfusion-pytorch,
ChenDarYen's research code) are not read here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_save

from studio.engine.files import atomic_write
from studio.engine.learned.perfusion import PerfusionConcept
from studio.engine.learned.word import ConceptError
from studio.engine.learned.word_files import _for_writing, _studio_metadata, safetensors_output, word_from_data

STUDIO_PERFUSION_FORMAT = "studio-perfusion"  # metadata "studio_format" of the studio's Perfusion files
PREFIX = "perfusion."
WORD_KEYS = ("emb_params", "clip_l", "clip_g")


def is_perfusion_content(data: object, metadata: dict[str, str]) -> bool:
    """Whether a concept file's content is a Perfusion concept (its metadata says so)."""
    return metadata.get("studio_format") == STUDIO_PERFUSION_FORMAT


def read_perfusion(data: dict, metadata: dict[str, str], path: Path, token: str | None = None) -> PerfusionConcept:
    """The Perfusion concept in a file's content (`is_perfusion_content`); the word as `word_files` reads it."""
    missing = [k for k in ("target", "target_metric", "keys", "values") if PREFIX + k not in data]
    if missing:
        raise ConceptError(f"{path.name}: a Perfusion file without {', '.join(PREFIX + k for k in missing)}; the file "
                           "is damaged, train or export it again")
    layers, widths = _stored_layers(metadata, path)
    tensors = {k: _check_vector(data[PREFIX + k], path, PREFIX + k) for k in ("target", "target_metric", "keys",
                                                                            "values")}
    for name in ("keys", "values"):
        if tensors[name].dim() != 1 or tensors[name].shape[0] != sum(widths):
            raise ConceptError(f"{path.name}: {PREFIX}{name} holds {list(tensors[name].shape)} numbers, the layers' "
                               f"widths add up to {sum(widths)}; the file is damaged")
    word_data = {k: v for k, v in data.items() if k in WORD_KEYS}
    word_meta = {k: v for k, v in metadata.items() if k not in ("studio_format", "layers", "widths")}
    word = word_from_data(word_data, word_meta, path, token)
    try:
        concept = PerfusionConcept(
            word.token, word.vectors, {**word.meta, "source_format": "studio-perfusion"}, layers=layers,
            target=tensors["target"], target_metric=tensors["target_metric"],
            keys=list(tensors["keys"].split(widths)), values=list(tensors["values"].split(widths)),
            class_word=metadata.get("class_word", ""), beta=_number(metadata, "beta", path),
            tau=_number(metadata, "tau", path))
    except ConceptError as exc:
        raise ConceptError(f"{path.name}: {exc}") from None
    concept.meta["family"] = concept.family
    return concept


def _check_vector(tensor: object, path: Path, key: str) -> torch.Tensor:
    """A 1-D float tensor of finite numbers, else a `ConceptError` naming the file and the key."""
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() or tensor.dim() != 1:
        raise ConceptError(f"{path.name}: {key} must be a 1-D float tensor; the file is damaged, train it again")
    if not torch.isfinite(tensor).all():
        raise ConceptError(f"{path.name}: {key} holds NaN or infinite values (a diverged run); use an earlier "
                           "checkpoint")
    return tensor.detach().float().contiguous()


def _stored_layers(metadata: dict[str, str], path: Path) -> tuple[list[str], list[int]]:
    try:
        layers, widths = json.loads(metadata.get("layers", "")), json.loads(metadata.get("widths", ""))
    except json.JSONDecodeError:
        layers = widths = None
    if (not isinstance(layers, list) or not isinstance(widths, list) or not layers or len(layers) != len(widths)
            or not all(isinstance(x, str) for x in layers) or not all(isinstance(w, int) and w > 0 for w in widths)):
        raise ConceptError(f"{path.name}: its 'layers' and 'widths' metadata are not a list of layer names and one "
                           "width each; the file is damaged, train or export it again")
    return layers, widths


def _number(metadata: dict[str, str], key: str, path: Path) -> float:
    try:
        return float(metadata[key])
    except (KeyError, ValueError):
        raise ConceptError(f"{path.name}: its {key!r} metadata is missing or not a number; the file is damaged") from None


def save_perfusion(concept: PerfusionConcept, path: str | os.PathLike) -> Path:
    """Write a Perfusion concept atomically in the studio's form (the module's docstring); returns the path."""
    path = safetensors_output(path, "Perfusion concepts")
    if "text_encoder_2" in concept.vectors:
        body = {"clip_l": concept.vectors["text_encoder"], "clip_g": concept.vectors["text_encoder_2"]}
    else:
        body = {"emb_params": concept.vectors["text_encoder"]}
    body = {k: _for_writing(v, concept, k) for k, v in body.items()}
    parts = {"target": concept.target, "target_metric": concept.target_metric,
             "keys": torch.cat(list(concept.keys)), "values": torch.cat(list(concept.values))}
    body.update({PREFIX + k: _for_writing(v.float(), concept, PREFIX + k) for k, v in parts.items()})
    metadata = _studio_metadata(concept)
    metadata.update(studio_format=STUDIO_PERFUSION_FORMAT, class_word=concept.class_word, beta=str(concept.beta),
                    tau=str(concept.tau), layers=json.dumps(concept.layers),
                    widths=json.dumps([int(k.shape[0]) for k in concept.keys]))
    atomic_write(path, safetensors_save(body, metadata))
    return path
