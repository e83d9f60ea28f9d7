"""Pictures -> an image concept in one pass of a CLIP vision model: the encoder route to a concept (no training).

    concept = encode_pictures(model, [open_picture(p) for p in paths], "<my-dog>", adapter="demo")
    save_image_concept(concept, "my-dog.safetensors")

What the vision model gives each picture is what diffusers' pipelines give an IP-Adapter (`encode_image`): the
projected `image_embeds` for a plain adapter, zeros for guidance's negative half; the penultimate hidden states for a
Plus or full-face adapter, the hidden states of a black picture for the negative half. Pictures are prepared by the
encoder folder's own processor, else CLIP's at the model's image size (diffusers' default in `load_ip_adapter`).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from PIL import Image

from studio.engine.learned.image_prompt import ImageConcept
from studio.engine.learned.ip_adapter import (DEMO_ADAPTER, ImagePromptError, adapter_reads_hidden_states,
                                              image_encoder_folder, read_adapter, resolve_adapter)
from studio.engine.learned.ip_adapter_fit import adapter_shapes, check_adapter_fit, encoder_config

MAX_PICTURES = 16  # reference pictures per concept: every one adds its tokens to each cross-attention call


def encode_pictures(model, pictures: list[Image.Image], token: str, adapter: str = DEMO_ADAPTER, *,
                    image_encoder: str | Path | None = None, prompt_text: str = "") -> ImageConcept:
    """The image concept of `pictures` (RGB) for `model` (a LoadedModel) and the IP-Adapter `adapter` ("demo", a
    file, or a hub file "owner/repo/path"); its vision model from `image_encoder` or beside the adapter."""
    # 1. Check inputs.
    if not 1 <= len(pictures) <= MAX_PICTURES:
        raise ImagePromptError(f"an image concept takes 1 to {MAX_PICTURES} pictures, not {len(pictures)}; pass a "
                               "folder with a few pictures of the concept")
    # 2. The adapter: which embeddings it reads, its digest, that it fits the model and the vision model; then the
    #    vision model.
    path = resolve_adapter(adapter, who="studio encode")
    state, digest = read_adapter(path)
    hidden = adapter_reads_hidden_states(state)
    folder = image_encoder_folder(path, image_encoder)
    denoiser = model.denoiser
    check_adapter_fit(adapter_shapes(state), denoiser, path.name, f"the model {model.name}", encoder_config(folder))
    encoder, processor = model.image_adapters.image_encoder(folder, denoiser.device, denoiser.dtype)
    # 3. One pass of the vision model over every picture (and a black one for Plus's negative half).
    pixels = processor(images=pictures, return_tensors="pt").pixel_values.to(denoiser.device, denoiser.dtype)
    with model.lock, torch.inference_mode():
        if hidden:
            embeds = encoder(pixels, output_hidden_states=True).hidden_states[-2]
            negative = encoder(torch.zeros_like(pixels), output_hidden_states=True).hidden_states[-2]
        else:
            embeds = encoder(pixels).image_embeds
            negative = torch.zeros_like(embeds)
    # 4. The concept, naming the adapter as given when it is the demo's or a hub file, else by its full path.
    ref = adapter if adapter == DEMO_ADAPTER or not Path(adapter).expanduser().is_file() else str(path)
    meta = {"image_encoder": str(folder), "base_model": model.name, "family": model.family,
            "pictures": str(len(pictures)), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    return ImageConcept(token, embeds.float().cpu(), negative.float().cpu(), ref, digest, dict(model.encoder_dims),
                        prompt_text, meta)
