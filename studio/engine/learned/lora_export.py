"""Writing LoRA files: a `LoraFile` (weights and bundled words) in diffusers' form or in kohya/A1111's.

- "diffusers": what `pipe.save_lora_weights` writes (`unet.…lora_A/lora_B.weight` in peft form, the adapter
  metadata diffusers saved kept), written by diffusers itself; words go to diffusers' pivotal form, a
  `<stem>_emb.safetensors` beside it with `clip_l` (and `clip_g` for SDXL), which `load_lora` reads back as one
  concept with the word "<s0><s1>…".
- "kohya": `lora_unet_…` / `lora_te_…` (SDXL `lora_te1_`/`lora_te2_`) with `.lora_down.weight`/`.lora_up.weight`/
  `.alpha` (a float tensor, as kohya writes it), named by diffusers' `convert_state_dict_to_kohya`; words bundled in
  the same file as A1111 does (`bundle_emb.<word>.string_to_param.*`, SDXL `bundle_emb.<word>.clip_l`/`.clip_g`).

Both forms compute what the studio applies: `export_lora` then `load_lora` gives the same UNet and text-encoder
outputs (tests/engine/test_lora_export.py). Files are written atomically, never over an existing file unless asked,
and only inside the folder given.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_save

from studio.engine.families import ENCODER_KEYS, FAMILIES, SDXL_ENCODER_NAMES
from studio.engine.files import atomic_write
from studio.engine.learned.lora import DENOISER_PARTS, LoraFile, peft_parts
from studio.engine.learned.lora_files import BUNDLE_PREFIX, WORD_KEY, pivotal_embeddings
from studio.engine.learned.word import Concept
from studio.engine.names import inside
from studio.errors import LoraError

EXPORT_FORMATS = ("diffusers", "kohya")
SUFFIX = ".safetensors"  # both forms; pickled LoRA files are read, never written
# kohya, A1111 and ComfyUI name a CLIP text encoder's layers from `text_model.` (`lora_te_text_model_encoder_…`);
# transformers 5 made `CLIPTextModel` flat (`encoder.layers.…`), so its peft keys lack it. diffusers reads both.
_CLIP_TOP_LEVEL = ("text_model.", "text_projection.")


@dataclass
class LoraExport:
    """What `export_lora` wrote: the LoRA file and, for diffusers' pivotal form, its words file."""

    path: Path
    format: str
    words_path: Path | None = None


def export_lora(lora: LoraFile, folder: str | os.PathLike, name: str, format: str = "diffusers", *,
                overwrite: bool = False) -> LoraExport:
    """Write `lora` (its weights and bundled words) as `folder/name` in one of `EXPORT_FORMATS`.

    `name` gets ".safetensors" unless it ends so. Raises `LoraError` for an unknown format, a pickle suffix, an
    existing file (unless `overwrite`), words the form cannot hold, and a stale `*_emb.safetensors` that would be read
    back as the new file's words; `WordError` for a name that leaves `folder`. Nothing is written when it raises.
    """
    # 1. Check the request and where it goes.
    if format not in EXPORT_FORMATS:
        raise LoraError(f"unknown LoRA format {format!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    suffix = Path(name).suffix.lower()
    if suffix in (".pt", ".bin", ".ckpt"):
        raise LoraError(f"{Path(name).name}: LoRA files are written as {SUFFIX}; name it {Path(name).stem}{SUFFIX}")
    if suffix != SUFFIX:
        name += SUFFIX  # "style-v1.5" -> "style-v1.5.safetensors"
    path = inside(folder, name)
    words_path = inside(folder, f"{path.stem}_emb{SUFFIX}") if format == "diffusers" and lora.words else None

    # 2. What the form holds, so that words it cannot hold are refused before anything is written.
    words_body = _pivotal_body(lora.words) if words_path is not None else None
    kohya_body = {**_kohya_weights(lora), **_kohya_bundle(lora.words)} if format == "kohya" else None

    # 3. Never over a file unasked, nor beside a words file that would be read back as this file's words.
    for target in (path, words_path):
        if target is not None and target.exists() and not overwrite:
            raise LoraError(f"{target} already exists; choose another name or pass overwrite=True (--overwrite)")
    stale = pivotal_embeddings(path)
    if not lora.words and stale is not None:
        raise LoraError(f"{stale.name} beside {path.name} would be read as its words (diffusers' pivotal form); "
                        "move it away or choose another name")

    # 4. Write: the words file first, so the LoRA file never appears without the words it is read with.
    if kohya_body is not None:
        atomic_write(path, safetensors_save(kohya_body, {"format": "pt"}))
        return LoraExport(path=path, format=format)
    if words_body is not None:
        # The word itself beside diffusers' tensors: diffusers reads the tensors only (its prompts say "<s0><s1>"),
        # the studio reads the word back (`studio.engine.learned.lora_files._pivotal_words`).
        atomic_write(words_path, safetensors_save(words_body, {"format": "pt", WORD_KEY: lora.words[0].token}))
    try:
        atomic_write(path, lambda tmp: _save_diffusers(lora, tmp))
    except BaseException:
        if words_path is not None:
            words_path.unlink(missing_ok=True)  # written in step 4 just now: no words file without its LoRA
        raise
    return LoraExport(path=path, format=format, words_path=words_path)


# ------------------------------------------------------------------------------------------------------ weights


def _part_metadata(lora: LoraFile, part: str) -> dict[str, object] | None:
    """The peft LoraConfig diffusers saved for `part` (`"unet.r"` -> `"r"`), or None."""
    found = {key.removeprefix(f"{part}."): value for key, value in lora.adapter_metadata.items()
             if key.startswith(f"{part}.")}
    return found or None


def _scales(module_names: list[str], metadata: dict[str, object] | None) -> dict[str, float]:
    """module -> the factor peft multiplies its `lora_B @ lora_A` by when diffusers loads it.

    With the part's saved LoraConfig: peft's own rule (`LoraModel._create_and_replace`: rank and alpha from
    `rank_pattern`/`alpha_pattern` by `get_pattern_key`, else `r`/`lora_alpha`; `alpha / r`, or `alpha / sqrt(r)`
    with rslora). Without one, 1.0: diffusers then sets alpha to each module's rank (`get_peft_kwargs`).
    """
    if metadata is None:
        return dict.fromkeys(module_names, 1.0)
    from peft import LoraConfig
    from peft.utils.other import get_pattern_key

    config = LoraConfig(**metadata)
    scales = {}
    for module in module_names:
        r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module), config.r)
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha)
        scales[module] = alpha / math.sqrt(r) if config.use_rslora else alpha / r
    return scales


def _kohya_weights(lora: LoraFile) -> dict[str, torch.Tensor]:
    """The weights under kohya's names with each pair's peft scale folded into `lora_up` and `alpha` = rank (scale
    1 in kohya's alpha / rank), so the file computes what diffusers computes from the saved config."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    folded: dict[str, torch.Tensor] = {}
    if any(part in lora.modules for part in DENOISER_PARTS if part != "unet"):
        raise LoraError(f"{lora.path.name}: a transformer LoRA (SD3, Flux); the studio writes kohya's names for UNet "
                        "LoRAs only: export it as --format diffusers, which ComfyUI, Forge and diffusers read")
    for part, tensors in peft_parts(lora).items():
        extra = sorted(k for k in tensors if not k.endswith((".lora_A.weight", ".lora_B.weight")))
        if extra:
            raise LoraError(f"{lora.path.name}: {extra[0]!r} has no place in kohya's form (lora_down/lora_up/alpha "
                            "only); export it as --format diffusers")
        modules = [k.removesuffix(".lora_A.weight") for k in tensors if k.endswith(".lora_A.weight")]
        scales = _scales(modules, _part_metadata(lora, part))
        for key, tensor in tensors.items():
            module = key.removesuffix(".lora_B.weight")
            if module in scales and scales[module] != 1.0:
                tensor = tensor * scales[module]
            if part != "unet" and not key.startswith(_CLIP_TOP_LEVEL):
                key = f"text_model.{key}"  # transformers 5's flat CLIPTextModel; see _CLIP_TOP_LEVEL
            folded[f"{part}.{key}"] = tensor
    kohya = convert_state_dict_to_kohya(folded)
    # diffusers' converter writes each alpha as an integer tensor; kohya's scripts write a float one, in the dtype they
    # save the pair in, and A1111's and ComfyUI's readers take it as a float.
    for key in [key for key in kohya if key.endswith(".alpha")]:
        down = kohya[key.removesuffix(".alpha") + ".lora_down.weight"]
        kohya[key] = kohya[key].to(down.dtype if down.is_floating_point() else torch.float32)
    if "text_encoder_2" in lora.modules or "sdxl" in lora.families:
        return kohya
    # One text encoder (SD 1.x/2.x): A1111 and kohya's own scripts call it `lora_te_`; diffusers' converter names
    # every first encoder `lora_te1_` (SDXL's).
    return {("lora_te_" + key.removeprefix("lora_te1_") if key.startswith("lora_te1_") else key): tensor
            for key, tensor in kohya.items()}


def _save_diffusers(lora: LoraFile, path: Path) -> None:
    """`save_lora_weights` of the pipeline class that has every part of `lora`, into `path` exactly: the pipeline of
    its family (SD3's and Flux's write `transformer.` keys), else SD's or SDXL's by its text encoders."""
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin

    parts = peft_parts(lora)
    savers = [FAMILIES[f].pipeline_class("txt2img") for f in lora.families if f in FAMILIES]
    saver = next((cls for cls in savers if set(parts) <= set(cls._lora_loadable_modules)), None) or (
        StableDiffusionXLLoraLoaderMixin if "text_encoder_2" in parts else StableDiffusionLoraLoaderMixin)
    arguments = {}
    for part, tensors in parts.items():
        arguments[f"{part}_lora_layers"] = tensors
        arguments[f"{part}_lora_adapter_metadata"] = _part_metadata(lora, part)
    saver.save_lora_weights(path.parent, weight_name=path.name, **arguments)


# -------------------------------------------------------------------------------------------------------- words


def _kohya_bundle(words: list[Concept]) -> dict[str, torch.Tensor]:
    """A1111's bundled embeddings: `bundle_emb.<word>.string_to_param.*` (one encoder) or `.clip_l`/`.clip_g`."""
    bundle = {}
    for word in words:
        if "." in word.token:
            raise LoraError(f"the word {word.token!r} has a dot, which A1111's bundle keys (bundle_emb.<word>.…) "
                            "cannot hold; rename the word")
        prefix = f"{BUNDLE_PREFIX}{word.token}"
        if "text_encoder_2" in word.vectors:
            bundle[f"{prefix}.clip_l"] = _tensor(word, "text_encoder")
            bundle[f"{prefix}.clip_g"] = _tensor(word, "text_encoder_2")
        else:
            bundle[f"{prefix}.string_to_param.*"] = _tensor(word, "text_encoder")
    return bundle


def _pivotal_body(words: list[Concept]) -> dict[str, torch.Tensor]:
    """diffusers' pivotal words file, one concept whose word reads back as "<s0><s1>…": `clip_l` (and `clip_g`), or
    its family's names (`ModelFamily.file_names`: Flux `clip_l`, `t5`, as the advanced Flux script writes them)."""
    if len(words) > 1:
        listed = ", ".join(w.token for w in words)
        raise LoraError(f"{len(words)} bundled words ({listed}); diffusers' pivotal form holds one: export it as "
                        "--format kohya, which bundles each word")
    (word,) = words
    family = FAMILIES.get(word.family)
    names = (family.file_names if family else ()) or tuple(SDXL_ENCODER_NAMES)
    return {name: _tensor(word, key) for key, name in zip(ENCODER_KEYS, names) if key in word.vectors}


def _tensor(word: Concept, encoder: str) -> torch.Tensor:
    return word.vectors[encoder].detach().to("cpu").contiguous().clone()  # clone: never save a view of more
