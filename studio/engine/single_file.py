"""Single-file Stable Diffusion checkpoints in the original (LDM / A1111) layout: read safely, identify, export.

A single-file checkpoint holds the UNet under `model.diffusion_model.`, the VAE under `first_stage_model.` and the
text encoder(s) under `cond_stage_model.` (SD 1.x: HF CLIP, SD 2.x: OpenCLIP) or `conditioner.embedders.{0,1}.`
(SDXL: CLIP-L + OpenCLIP bigG). An SD3 file (stabilityai's) holds its MMDiT transformer under the same UNet prefix,
and may hold its VAE and text encoders (`SD3_FILE_PARTS`). A file carries no configs: diffusers' `from_single_file`
builds the pipeline from the component configs of a diffusers model of the same architecture (`config=`), fetched
from the hub unless given; the parts an SD3 file lacks come from that model's weights (`parts_from_config`).

- `read_checkpoint_shapes(path)`: tensor names and shapes, without unpickling anything (`.ckpt` files are opened
  with `torch.load(weights_only=True)`, the same way diffusers opens them, so a pickle that carries code is refused).
- `identify_checkpoint(shapes)`: SD 1.x / 2.x / XL / SD3 from the key layout, or what else the file seems to be.
- `resolve_config(info, config)`: the local folder diffusers should read the component configs from.
- `export_single_file(pipe, path)`: the inverse of diffusers' conversion, for sharing a model with A1111/ComfyUI.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from studio.engine.families import FAMILIES, family_of_index, tokenizer_key
from studio.errors import ModelError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TEXT_PREFIX = "cond_stage_model.transformer."  # HF CLIPTextModel under it
SD2_TEXT_PREFIX = "cond_stage_model.model."  # OpenCLIP ViT-H text tower
SDXL_TEXT_PREFIXES = ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model.")  # CLIP-L, bigG
# The transformer keys that tell an original SD3 / Flux file, with or without UNET_PREFIX (diffusers'
# single_file_utils.CHECKPOINT_KEY_NAMES["sd3"], ["flux"]).
TRANSFORMER_MARKS = {"sd3": "joint_blocks.0.context_block.adaLN_modulation.1.bias",
                     "flux": "double_blocks.0.img_attn.norm.key_norm.scale"}
# Why a Flux file is refused: diffusers 0.42.1's convert_flux_transformer_checkpoint_to_diffusers splits the single
# blocks' fused linear1 at a fixed inner_dim of 3072 (FLUX.1's width), so no file smaller than FLUX.1's blocks loads,
# and the studio has no test of that path (a 3072-wide test transformer is 546 M parameters).
FLUX_FILE_REFUSAL = ("diffusers 0.42.1 converts only FLUX.1's full-width layout (inner_dim 3072) and the studio has no "
                     "test of it")
# The parts an SD3 file may hold besides its transformer, by the key prefixes diffusers' converters read
# (convert_ldm_vae_checkpoint; CHECKPOINT_KEY_NAMES["clip_sd3"], ["open_clip_sd3"]; is_t5_in_single_file).
# sd3_medium.safetensors holds the VAE only; the _incl_clips(_t5xxlfp16) files hold the encoders too.
SD3_FILE_PARTS = {"vae": VAE_PREFIX, "text_encoder": "text_encoders.clip_l.", "text_encoder_2": "text_encoders.clip_g.",
                  "text_encoder_3": "text_encoders.t5xxl."}

FAMILY_NAMES = {"sd1": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x", "sdxl": "Stable Diffusion XL",
                **{family: FAMILIES[family].title for family in ("sd3", "flux")}}
# The hub repos diffusers itself falls back to for these checkpoint types
# (single_file_utils.DIFFUSERS_DEFAULT_PIPELINE_PATHS).
DEFAULT_CONFIG_REPOS = {"sd1": "stable-diffusion-v1-5/stable-diffusion-v1-5", "sd2": "stabilityai/stable-diffusion-2-1",
                        "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
                        "sd3": "stabilityai/stable-diffusion-3-medium-diffusers"}
# What `from_single_file` downloads from a config repo (diffusers' _download_diffusers_model_config_from_hub).
CONFIG_FILE_PATTERNS = ["**/*.json", "*.json", "*.txt", "**/*.txt", "**/*.model"]

Shapes = Mapping[str, tuple[int, ...]]


class UnsafeCheckpointError(ModelError):
    """A pickled checkpoint holding objects other than tensors, refused because unpickling them can run code."""


@dataclass(frozen=True)
class CheckpointInfo:
    """What a single file holds. `family` is set only for a checkpoint the studio loads: a complete SD 1.x / 2.x / XL
    txt2img checkpoint, or an SD3 transformer (its other parts from the file or the config's weights)."""

    family: str | None  # "sd1" | "sd2" | "sdxl" | "sd3" | None
    description: str  # human words: "a Stable Diffusion 1.x checkpoint", "a textual-inversion embedding ..."
    # The hub repo whose configs describe it when none is given; None: DEFAULT_CONFIG_REPOS[family]
    default_config: str | None = None


# --------------------------------------------------------------------------------------------------- reading


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE asks huggingface_hub never to reach the network."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _load_ckpt(path: Path) -> dict:
    """`torch.load` with weights_only=True: tensors and plain containers only; anything else is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if found is None:  # a corrupt or non-pickle file: torch reports it through the same exception
            raise ModelError(f"{path.name} is not a readable PyTorch checkpoint: {str(exc)[-200:]}") from exc
        raise UnsafeCheckpointError(
            f"{path.name} is a pickle that contains Python objects other than tensors (it calls {found.group(1)}); "
            "Concept Studio opens .ckpt files only with torch.load(weights_only=True) because unpickling other "
            "objects can run arbitrary code. Use the .safetensors release of this model, or convert the file "
            "with a tool you trust."
        ) from exc
    except Exception as exc:  # noqa: BLE001 - torch.load fails on foreign bytes with struct/runtime/EOF errors alike
        raise ModelError(f"{path.name} is not a readable PyTorch checkpoint: {exc.__class__.__name__}: "
                         f"{str(exc)[:200]}") from exc


def _unwrap_state_dict(obj) -> dict:
    # Lightning checkpoints nest the weights under "state_dict" (diffusers' load_single_file_checkpoint does the same).
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ModelError(f"the checkpoint holds a {type(obj).__name__}, not a dictionary of tensors")
    return obj


def read_checkpoint_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a `.safetensors` (header only) or `.ckpt` (weights_only, memory-mapped) file."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except (SafetensorError, OSError) as exc:
            raise ModelError(f"{path.name} is not a readable .safetensors file: {str(exc)[:200]}") from exc
    shapes = {}

    def walk(obj: dict, prefix: str) -> None:  # A1111 embeddings nest theirs: {"string_to_param": {"*": tensor}}
        for key, value in obj.items():
            if isinstance(value, torch.Tensor):
                shapes[f"{prefix}{key}"] = tuple(value.shape)
            elif isinstance(value, dict):
                walk(value, f"{prefix}{key}.")

    walk(_unwrap_state_dict(_load_ckpt(path)), "")
    return shapes


# --------------------------------------------------------------------------------------------------- identifying


def _has_prefix(shapes: Shapes, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in shapes)


def _cross_attention_width(shapes: Shapes) -> int | None:
    """In-features of the UNet's cross-attention keys: 768 (SD 1.x), 1024 (SD 2.x), 2048 (SDXL)."""
    for key, shape in shapes.items():
        if key.startswith(UNET_PREFIX) and key.endswith("attn2.to_k.weight"):
            return shape[-1]
    return None


def _describe_other(shapes: Shapes) -> str:
    """Words for a file that is not a complete SD checkpoint, from its key layout."""
    keys = list(shapes)
    if not keys:
        return "an empty file (no tensors)"
    concept_keys = {"emb_params", "clip_l", "clip_g", "string_to_param", "string_to_token"}
    if concept_keys & set(keys) or any(k.startswith("string_to_param.") for k in keys) or (
            len(keys) <= 2 and all(len(s) in (1, 2) and s[-1] in (768, 1024, 1280) for s in shapes.values())):
        vectors = ", ".join(f"{k} {list(s)}" for k, s in list(shapes.items())[:2])
        return (f"a textual-inversion concept (embedding: {vectors}), not a base model; import it into the concept "
                "library and write its token in a prompt instead")
    lora_marks = ("lora_down", "lora_up", ".lora_A.", ".lora_B.")
    if any(k.startswith("lora_") or any(mark in k for mark in lora_marks) for k in keys):
        return "a LoRA (low-rank weight deltas), not a base model; load the base model it was trained on instead"
    if _has_prefix(shapes, "control_model.") or _has_prefix(shapes, "controlnet_cond_embedding."):
        return "a ControlNet, not a base model"
    is_autoencoder = "encoder.conv_in.weight" in shapes and "decoder.conv_out.weight" in shapes
    if is_autoencoder and not _has_prefix(shapes, UNET_PREFIX):
        return "a standalone VAE (image encoder/decoder only), not a complete model"
    if "conv_in.weight" in shapes and _has_prefix(shapes, "down_blocks."):
        return ("one diffusers-format component (a diffusion_pytorch_model.safetensors), not a single-file model; "
                "pass the whole diffusers folder (the one with model_index.json) instead")
    if _has_prefix(shapes, UNET_PREFIX):
        parts = (("VAE", (VAE_PREFIX,)), ("text encoder", ("cond_stage_model.", "conditioner.")))
        missing = [name for name, prefixes in parts if not any(_has_prefix(shapes, p) for p in prefixes)]
        if missing:
            return f"a UNet-only checkpoint (no {' and no '.join(missing)}), not a complete model"
        return "a diffusion model in the LDM layout, but not one of SD 1.x / 2.x / XL"
    sample = ", ".join(keys[:4])
    return f"not a Stable Diffusion checkpoint ({len(keys)} tensors, none under {UNET_PREFIX!r}; first keys: {sample})"


def identify_checkpoint(shapes: Shapes) -> CheckpointInfo:
    """SD family of a single-file checkpoint from its keys, or a description of what else the file is.

    SDXL has a second text encoder under `conditioner.embedders.1`; SD 2.x an OpenCLIP encoder under
    `cond_stage_model.model`; SD 1.x an HF CLIP encoder under `cond_stage_model.transformer` with 768-wide
    cross-attention. Inpainting UNets (9 input channels) and the SDXL refiner are named but not loaded: they
    cannot run txt2img, which the studio's base model must. SD3 and Flux files are told by their transformer
    (`TRANSFORMER_MARKS`); Flux files are named, not loaded (`FLUX_FILE_REFUSAL`).
    """
    for family, mark in TRANSFORMER_MARKS.items():
        if mark in shapes or UNET_PREFIX + mark in shapes:
            if family == "sd3":
                return CheckpointInfo("sd3", f"a single-file {FAMILY_NAMES['sd3']} checkpoint",
                                      default_config=_diffusers_sd3_repo(shapes))
            spec = FAMILIES[family]
            return CheckpointInfo(None, f"a single-file {spec.title} checkpoint, which the studio does not load "
                                        f"({FLUX_FILE_REFUSAL}): {spec.how_to_load}")
    has_unet, has_vae = _has_prefix(shapes, UNET_PREFIX), _has_prefix(shapes, VAE_PREFIX)
    if not (has_unet and has_vae):
        return CheckpointInfo(None, _describe_other(shapes))
    if _has_prefix(shapes, SDXL_TEXT_PREFIXES[1]):
        family = "sdxl"
    elif _has_prefix(shapes, "conditioner.embedders.0.model."):
        return CheckpointInfo(None, "an SDXL refiner checkpoint (one OpenCLIP text encoder, no CLIP-L); it only "
                                    "refines SDXL pictures: load the SDXL base model instead")
    elif _has_prefix(shapes, SD2_TEXT_PREFIX):
        family = "sd2"
    elif _has_prefix(shapes, SD1_TEXT_PREFIX):
        family = "sd2" if _cross_attention_width(shapes) == 1024 else "sd1"
    else:
        return CheckpointInfo(None, _describe_other(shapes))
    conv_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is not None and len(conv_in) == 4 and conv_in[1] != 4:
        return CheckpointInfo(None, f"a {FAMILY_NAMES[family]} inpainting checkpoint (its UNet takes {conv_in[1]} "
                                    "input channels); load the base (non-inpainting) model: the studio inpaints "
                                    "with it")
    return CheckpointInfo(family, f"a {FAMILY_NAMES[family]} checkpoint")


# --------------------------------------------------------------------------------------------------- configs


def _diffusers_sd3_repo(shapes: Shapes) -> str | None:
    """The repo diffusers' `fetch_diffusers_config` picks for an SD3 file (SD3 medium, SD3.5 medium or large, told by
    `infer_diffusers_model_type` from key names and shapes alone, given here as empty meta tensors); None when it
    names none of them (a file of other sizes, as the tests' tiny one)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_DEFAULT_PIPELINE_PATHS, infer_diffusers_model_type

    stand_ins = {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}
    try:
        model_type = infer_diffusers_model_type(stand_ins)
    except UnboundLocalError:  # diffusers 0.42.1 names no type for an SD3 of 1536 width and another pos_embed size
        return None
    if not model_type.startswith("sd3"):
        return None
    return DIFFUSERS_DEFAULT_PIPELINE_PATHS[model_type]["pretrained_model_name_or_path"]


def _config_family(folder: Path) -> str | None:
    """Family of a diffusers model folder from its configs alone, as `models.detect_family` does for a pipeline."""
    index = json.loads((folder / "model_index.json").read_text())
    by_denoiser = family_of_index(index)  # SD3 and Flux, whose folders have a text_encoder_2 too
    if by_denoiser is not None:
        return by_denoiser.id
    if (index.get("text_encoder_2") or [None])[0] is not None:
        return "sdxl"
    encoder_config = folder / "text_encoder" / "config.json"
    if not encoder_config.is_file():
        return None
    return {768: "sd1", 1024: "sd2"}.get(json.loads(encoder_config.read_text()).get("hidden_size"))


def _cached_hub_configs(repo: str) -> Path | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    try:
        return Path(snapshot_download(repo, allow_patterns=CONFIG_FILE_PATTERNS, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError):
        return None


def resolve_config(info: CheckpointInfo, config: str | os.PathLike | None, checkpoint_name: str) -> str:
    """Where diffusers should read the component configs for `info`'s checkpoint from.

    A local diffusers folder is checked (model_index.json, same family) and returned; a hub id (or, when `config`
    is None, diffusers' default repo for the family) is returned as its local cached folder when it is cached,
    else as the id when the hub is reachable. Offline with nothing cached raises a ModelError naming what to pass.
    """
    family_name = FAMILY_NAMES[info.family]
    if config is not None and Path(config).is_dir():
        folder = Path(config)
        if not (folder / "model_index.json").is_file():
            raise ModelError(f"config {str(folder)!r} is not a diffusers model folder (no model_index.json); give the "
                             f"folder of a diffusers {family_name} model, whose component configs describe "
                             f"{checkpoint_name}")
        found = _config_family(folder)
        if found is not None and found != info.family:
            raise ModelError(f"config {str(folder)!r} is a {FAMILY_NAMES[found]} model but {checkpoint_name} is "
                             f"{info.description}; give the folder of a diffusers {family_name} model")
        return str(folder)
    repo = str(config) if config is not None else info.default_config or DEFAULT_CONFIG_REPOS[info.family]
    if config is not None and (repo.count("/") != 1 or repo.startswith((".", "/"))):
        raise ModelError(f"config {repo!r} is neither a local folder nor a hub id (owner/name)")
    cached = _cached_hub_configs(repo)
    if cached is not None:
        return str(cached)
    if hub_offline():
        raise ModelError(
            f"{checkpoint_name} is {info.description} in the original single-file layout, which carries no configs: "
            f"diffusers builds it from the component configs of a diffusers {family_name} model ({repo} on the hub), "
            "and they are not in the local Hugging Face cache while HF_HUB_OFFLINE is set. Pass the folder of any "
            f"diffusers {family_name} model as the config (LoadOptions(config='/path/to/model-folder'); --model-config "
            "on studio generate/train and launch.py; its .json and tokenizer files are read, and the weights of any "
            f"part the file lacks), or go online once so diffusers can cache {repo}'s configs.")
    return repo


def _has_weights(folder: Path) -> bool:
    return folder.is_dir() and any(f.suffix in (".safetensors", ".bin") for f in folder.iterdir())


def parts_from_config(shapes: Shapes, config: str, checkpoint_name: str, dtype: torch.dtype) -> dict[str, object]:
    """The SD3 pipeline parts (`SD3_FILE_PARTS`) that the file lacks, loaded from the weights in the `config` folder.

    diffusers 0.42.1's `from_single_file` looks for a missing part's weights in the config folder under its own file
    names only (`diffusion_pytorch_model.*`), so it cannot find a transformers encoder's `model.safetensors` there and
    asks for the part to be passed: these are what to pass. A T5 the folder leaves out (null in model_index.json,
    `ModelFamily.droppable_encoders`) stays out, passed as None with its tokenizer. A part whose weights are not in the
    folder (or a config that is a hub id, not a local folder or a cached snapshot) raises a ModelError saying what to
    pass.
    """
    import importlib

    missing = [part for part, prefix in SD3_FILE_PARTS.items() if not _has_prefix(shapes, prefix)]
    folder = Path(config)
    index = json.loads((folder / "model_index.json").read_text()) if folder.is_dir() else {}
    spec = FAMILIES["sd3"]
    names = {"vae": "VAE", **dict(zip(spec.encoder_keys, (n.replace("_", "-").upper() for n in spec.file_names)))}
    parts, absent = {}, []
    for part in missing:
        entry = index.get(part)
        if entry == [None, None] and part in spec.droppable_encoders:
            parts.update({part: None, tokenizer_key(part): None})  # as models._from_pretrained passes them
            continue
        if entry is None or not _has_weights(folder / part):
            absent.append(part)
            continue
        library, class_name = entry
        parts[part] = getattr(importlib.import_module(library), class_name).from_pretrained(
            folder, subfolder=part, dtype=dtype)
    if absent:
        where = f"{str(folder)!r} holds no weights for them" if folder.is_dir() else f"{config} is not a local folder"
        raise ModelError(
            f"{checkpoint_name} is a single-file SD3 checkpoint without its {', '.join(names[p] for p in absent)} "
            f"(as sd3_medium.safetensors ships), and {where}: pass the folder of a diffusers SD3 model that has them "
            "as the config (--model-config DIR on studio generate/train and launch.py, LoadOptions(config=DIR); "
            "e.g. after `hf download "
            f"{DEFAULT_CONFIG_REPOS['sd3']}`), or load a file that includes them (sd3_medium_incl_clips_t5xxlfp16)")
    return parts


def check_weights_set(pipe, checkpoint_name: str) -> None:
    """Raise a ModelError when a part of `pipe` built from a single file has weights left unset. diffusers builds a
    file's encoders in empty (meta) models and fills in what the file holds, so a weight the file lacks stays empty
    (a T5 without `encoder.embed_tokens.weight`, which diffusers 0.42.1 does not tie to `shared.weight`) and would
    fail later, when the pipeline is moved to its device."""
    for name, module in pipe.components.items():
        if not isinstance(module, torch.nn.Module):
            continue
        unset = [key for key, tensor in module.state_dict().items() if tensor.is_meta]
        if unset:
            raise ModelError(f"{checkpoint_name}: diffusers built its {name} without {len(unset)} weights the file "
                             f"does not hold ({unset[0]}, ...); load this model from a diffusers folder instead")


# --------------------------------------------------------------------------------------------------- exporting

_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                   "self_attn.out_proj": "attn.out_proj"}


def _split_param(key: str) -> tuple[str, str]:
    module, _, param = key.rpartition(".")
    return module, param


def _unet_to_ldm(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel keys -> `model.diffusion_model.*` (inverse of convert_ldm_unet_checkpoint)."""
    lpb = config.layers_per_block
    if not isinstance(lpb, int):
        raise ModelError(f"cannot export a UNet with per-block layers_per_block={lpb!r} to the single-file layout")
    stride = lpb + 1  # LDM numbers every resnet(+attention) of a level, then its down/upsampler, consecutively
    has_attention = ["CrossAttn" in t for t in config.up_block_types]
    out = {}
    for key, value in state.items():
        module, param = _split_param(key)
        parts = module.split(".")
        if module in _UNET_TOP:
            new = _UNET_TOP[module]
        elif parts[0] == "down_blocks":
            level, kind = int(parts[1]), parts[2]
            if kind == "downsamplers":  # down_blocks.i.downsamplers.0.conv
                new = f"input_blocks.{1 + level * stride + lpb}.0.op"
            else:
                index, rest = 1 + level * stride + int(parts[3]), ".".join(parts[4:])
                new = (f"input_blocks.{index}.0.{_UNET_RESNET[rest]}" if kind == "resnets"
                       else f"input_blocks.{index}.1.{rest}")
        elif parts[0] == "mid_block":
            index, rest = int(parts[2]), ".".join(parts[3:])
            new = (f"middle_block.{2 * index}.{_UNET_RESNET[rest]}" if parts[1] == "resnets"
                   else f"middle_block.1.{rest}")
        elif parts[0] == "up_blocks":
            level, kind = int(parts[1]), parts[2]
            if kind == "upsamplers":  # after the level's last resnet, behind its attention when it has one
                new = f"output_blocks.{level * stride + lpb}.{2 if has_attention[level] else 1}.conv"
            else:
                index, rest = level * stride + int(parts[3]), ".".join(parts[4:])
                new = (f"output_blocks.{index}.0.{_UNET_RESNET[rest]}" if kind == "resnets"
                       else f"output_blocks.{index}.1.{rest}")
        else:
            raise ModelError(f"cannot export UNet weight {key!r}: no place for it in the single-file layout")
        out[f"{UNET_PREFIX}{new}.{param}"] = value
    return out


def _vae_to_ldm(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL keys -> `first_stage_model.*` (inverse of convert_ldm_vae_checkpoint)."""
    levels = len(config.up_block_types)
    top = {"conv_norm_out": "norm_out"}
    out = {}
    for key, value in state.items():
        module, param = _split_param(key)
        parts = module.split(".")
        if len(parts) >= 2 and parts[1] in ("down_blocks", "up_blocks"):
            level = int(parts[2]) if parts[1] == "down_blocks" else levels - 1 - int(parts[2])  # decoder counts down
            side = "down" if parts[1] == "down_blocks" else "up"
            if parts[3] in ("downsamplers", "upsamplers"):
                new = f"{parts[0]}.{side}.{level}.{side}sample.conv"
            else:
                rest = ".".join(parts[5:]).replace("conv_shortcut", "nin_shortcut")
                new = f"{parts[0]}.{side}.{level}.block.{parts[4]}.{rest}"
        elif len(parts) >= 2 and parts[1] == "mid_block":
            if parts[2] == "resnets":
                rest = ".".join(parts[4:]).replace("conv_shortcut", "nin_shortcut")
                new = f"{parts[0]}.mid.block_{int(parts[3]) + 1}.{rest}"
            else:
                new = f"{parts[0]}.mid.attn_1.{_VAE_ATTENTION['.'.join(parts[4:])]}"
                if value.ndim == 2:  # LDM's attention projections are 1x1 convolutions
                    value = value[:, :, None, None]
        else:
            new = ".".join(top.get(p, p) for p in parts)
        out[f"{VAE_PREFIX}{new}.{param}"] = value
    return out


def _clip_keys(model) -> dict[str, torch.Tensor]:
    """State dict keyed as `text_model.*` (+ `text_projection.*`), whichever way transformers nests CLIP."""
    state = model.state_dict()
    if hasattr(model, "text_model"):
        return state
    return {f"text_model.{k}": v for k, v in state.items()}


def _clip_to_openclip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """HF CLIP text keys -> OpenCLIP (resblocks, fused in_proj); inverse of diffusers' convert_open_clip_checkpoint."""
    out, fused = {}, {}
    for key, value in state.items():
        module, param = _split_param(key)
        if module == "text_model.embeddings.position_embedding":
            out[prefix + "positional_embedding"] = value
        elif module == "text_model.embeddings.token_embedding":
            out[prefix + "token_embedding.weight"] = value
        elif module == "text_model.final_layer_norm":
            out[f"{prefix}ln_final.{param}"] = value
        elif module == "text_projection":
            out[prefix + "text_projection"] = value.T.contiguous()  # OpenCLIP multiplies x @ P
        elif module.startswith("text_model.encoder.layers."):
            parts = module.split(".")
            layer, rest = parts[3], ".".join(parts[4:])
            base = f"{prefix}transformer.resblocks.{layer}."
            if rest in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                fused.setdefault(f"{base}attn.in_proj_{param}", {})[rest[-6]] = value
            else:
                out[f"{base}{_OPENCLIP_LAYER[rest]}.{param}"] = value
        else:
            raise ModelError(f"cannot export text-encoder weight {key!r} to the OpenCLIP layout")
    for key, qkv in fused.items():
        out[key] = torch.cat([qkv["q"], qkv["k"], qkv["v"]], dim=0)
    return out


def pipeline_to_checkpoint(pipe) -> dict[str, torch.Tensor]:
    """All weights of an SD 1.x / 2.x / XL diffusers pipeline under their original single-file names."""
    state = {**_unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config),
             **_vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config)}
    if getattr(pipe, "text_encoder_2", None) is not None:
        state.update({SDXL_TEXT_PREFIXES[0] + k: v for k, v in _clip_keys(pipe.text_encoder).items()})
        state.update(_clip_to_openclip(_clip_keys(pipe.text_encoder_2), SDXL_TEXT_PREFIXES[1]))
    elif pipe.text_encoder.config.hidden_size == 1024:
        # diffusers keeps 23 of OpenCLIP ViT-H's 24 layers (SD 2 reads the penultimate one): the file holds those 23.
        state.update(_clip_to_openclip(_clip_keys(pipe.text_encoder), SD2_TEXT_PREFIX))
    else:
        state.update({SD1_TEXT_PREFIX + k: v for k, v in _clip_keys(pipe.text_encoder).items()})
    return state


def export_single_file(pipe, path: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Write `pipe` (SD 1.x / 2.x / XL) as one original-layout `.safetensors` file, as A1111 and ComfyUI load it.

    `dtype` (e.g. torch.float16 to halve the file) converts floating-point weights; None keeps them as they are.
    The file loads back with `ModelManager().load(path, LoadOptions(config=<a diffusers folder of the family>))`.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ModelError(f"export writes .safetensors only (no pickles), not {path.name!r}")
    tensors = {}
    for key, value in pipeline_to_checkpoint(pipe).items():
        value = value.detach().to("cpu")
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        tensors[key] = value.contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(path)
    return path
