"""Whether an IP-Adapter fits a model's UNet and its image encoder, asked before any work.

An IP-Adapter is made for one UNet and one CLIP vision model. For the UNet: one `to_k_ip`/`to_v_ip` pair of shape
[layer width, cross-attention width] per cross-attention layer, numbered 1, 3, 5, ... in the UNet's
`attn_processors` order (diffusers' `_convert_ip_adapter_attn_to_diffusers`, whose widths per layer come from
`block_out_channels`). For the vision model: its image projection reads the projected image embeddings (plain:
`proj.weight` [tokens * cross width, projection_dim]) or the hidden states (Plus: `proj_in.weight`, full face:
`proj.0.weight`, [.., hidden_size]). diffusers finds a mismatch only while it loads the weights, in a message about
`load_state_dict` (and ignores an adapter's extra layers); `check_adapter_fit` compares the shapes first and says
which adapter to use, on a loaded UNet or on one built on the meta device from the model's files
(`unet_from_files`: no weight is read), so `studio encode` and `studio train --init-from-encoder` stop before the
model loads.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from studio.engine.families import FAMILIES, ModelFamily, family_of_index
from studio.engine.learned.word import ConceptMismatchError

PROJECTION_INPUTS = {"proj.weight": "projection_dim", "proj_in.weight": "hidden_size", "proj.0.weight": "hidden_size"}


def adapter_shapes(state: dict) -> dict[str, tuple[int, ...]]:
    """Name -> shape of an adapter's tensors, `image_proj.*` and `ip_adapter.*` (`read_adapter`'s state dict)."""
    return {f"{part}.{name}": tuple(tensor.shape) for part in ("image_proj", "ip_adapter")
            for name, tensor in state[part].items()}


def _cross_layers(unet) -> tuple[list[tuple[str, int]], int]:
    """(processor name, width) of each cross-attention layer of `unet` (a UNet, or a UNet's config: built on the
    meta device, no weight), in diffusers' adapter order; and its cross-attention width."""
    if isinstance(unet, torch.nn.Module):
        names, config = unet.attn_processors, dict(unet.config)
    else:
        from diffusers import UNet2DConditionModel

        config = dict(unet)
        with torch.device("meta"):
            names = UNet2DConditionModel.from_config(config).attn_processors
    channels = list(config["block_out_channels"])
    widths = {"mid_block": lambda name: channels[-1],
              "up_blocks": lambda name: channels[::-1][int(name.split(".")[1])],
              "down_blocks": lambda name: channels[int(name.split(".")[1])]}
    layers = [(name, widths[name.split(".")[0]](name)) for name in names if not name.endswith("attn1.processor")]
    return layers, int(config["cross_attention_dim"])


def _made_for(cross: int) -> str:
    """The family a cross-attention width belongs to (a UNet's is its text encoders' widths together)."""
    for family in FAMILIES.values():
        if family.denoiser == "unet" and sum(family.encoder_widths) == cross:
            return family.title
    return f"a model with {cross}-wide cross-attention"


def check_adapter_fit(shapes: dict[str, tuple[int, ...]], unet, adapter: str, model: str = "this model",
                      encoder_config: dict | None = None) -> None:
    """Raise `ConceptMismatchError` (one line: what differs, which adapter to use) unless the adapter with these
    tensor `shapes` fits `unet` (a UNet, or the dict of a `unet/config.json`) and, when given, the vision model
    with `encoder_config` (its `config.json`)."""
    family = next((f for f in FAMILIES.values() if f.denoiser_class and f.denoiser_class == type(unet).__name__), None)
    if family is not None:  # a loaded transformer (SD3, Flux)
        check_denoiser(family, adapter, model)
    theirs = sorted(int(name.split(".")[1]) for name in shapes if name.startswith("ip_adapter.")
                    and name.endswith(".to_k_ip.weight"))
    if not theirs:
        raise ConceptMismatchError(f"{adapter}: not an IP-Adapter file (no ip_adapter.<n>.to_k_ip weights); use an "
                                   "IP-Adapter in diffusers' layout, such as h94/IP-Adapter's")
    layers, cross = _cross_layers(unet)
    width = shapes.get("ip_adapter.1.to_k_ip.weight", (0, 0))[1]
    use = "use the IP-Adapter made for it (and its image encoder)"
    if width != cross:
        raise ConceptMismatchError(f"{adapter} is an IP-Adapter for {_made_for(width)} ({width}-wide cross-"
                                   f"attention), but {model} is {_made_for(cross)} ({cross}); {use}")
    wanted = [2 * n + 1 for n in range(len(layers))]
    if theirs != wanted:
        raise ConceptMismatchError(f"{adapter} has {len(theirs)} cross-attention layers, {model}'s UNet "
                                   f"{len(layers)}; {use}")
    for n, (name, hidden) in zip(wanted, layers):
        shape = shapes[f"ip_adapter.{n}.to_k_ip.weight"]
        if shape != (hidden, cross):
            raise ConceptMismatchError(f"{adapter}'s layer {n} is {shape[0]} wide, but {model}'s "
                                       f"{name.removesuffix('.processor')} is {hidden}; {use}")
    if encoder_config is not None:
        _check_image_encoder(shapes, encoder_config, adapter)


def _check_image_encoder(shapes: dict, encoder_config: dict, adapter: str) -> None:
    """The vision model gives what the adapter's image projection reads (its projected embeddings or its hidden
    states, by width)."""
    for name, field in PROJECTION_INPUTS.items():
        wanted = shapes.get(f"image_proj.{name}", (0, None))[1]
        if wanted is not None:
            has = encoder_config.get(field)
            if has != wanted:
                raise ConceptMismatchError(
                    f"{adapter} reads {wanted}-wide image features ({field}), but its image encoder gives {has}; use "
                    "the adapter's own image encoder (the image_encoder folder beside it, or --image-encoder)")
            return


def check_denoiser(family: ModelFamily, adapter: str, model: str = "this model") -> None:
    """Image concepts run on UNet models; a transformer model (SD3, Flux) is refused in one line."""
    if family.denoiser != "unet":
        unets = ", ".join(f.title for f in FAMILIES.values() if f.denoiser == "unet" and f.id != "demo")
        raise ConceptMismatchError(f"{adapter}: image concepts run on UNet models ({unets} or the demo model), and "
                                   f"{model} is {family.title}; load one of those for image concepts")


def unet_from_files(source: str) -> tuple[ModelFamily | None, dict | None]:
    """(the family its `model_index.json` names (SD3, Flux), else None; its `unet/config.json`) of a diffusers
    folder or a hub id already in the hub cache, read without loading anything; (None, None) where only loading
    tells (a single file, a hub id not cached)."""
    folder = Path(source)
    try:
        if folder.is_dir():
            index_file, config_file = folder / "model_index.json", folder / "unet" / "config.json"
        elif source.count("/") == 1 and not source.startswith((".", "/")):
            from huggingface_hub import try_to_load_from_cache

            index_file, config_file = (Path(found) if isinstance(found, str) else folder / "absent"
                                       for found in (try_to_load_from_cache(source, "model_index.json"),
                                                     try_to_load_from_cache(source, "unet/config.json")))
        else:
            return None, None
        family = family_of_index(json.loads(index_file.read_text())) if index_file.is_file() else None
        config = json.loads(config_file.read_text()) if config_file.is_file() else None
    except (OSError, ValueError):  # unreadable: the model's own load says what is wrong with it
        return None, None
    return family, config


def check_before_loading(shapes: dict[str, tuple[int, ...]], image_encoder: Path, model_source: str,
                         adapter: str) -> None:
    """`check_denoiser` and `check_adapter_fit` for the model at `model_source` from its files, before it loads;
    a model whose files do not tell is checked once loaded (`encode_pictures`, the adapter cache)."""
    family, config = unet_from_files(model_source)
    model = f"the model {Path(model_source).name or model_source}"
    if family is not None:
        check_denoiser(family, adapter, model)
    if config is not None:
        check_adapter_fit(shapes, config, adapter, model, encoder_config(image_encoder))


def encoder_config(folder: Path) -> dict:
    """The `config.json` of a CLIP vision model folder; `ConceptMismatchError` in one line when unreadable."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConceptMismatchError(f"the image encoder's {folder / 'config.json'} is unreadable ({type(exc).__name__}"
                                   "); use the adapter's own image encoder folder") from None
    if not isinstance(config, dict):
        raise ConceptMismatchError(f"the image encoder's {folder / 'config.json'} is not a config; use the adapter's "
                                   "own image encoder folder")
    return config
