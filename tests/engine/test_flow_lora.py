"""LoRA per request on the transformer of SD3 and Flux (issue 27).

Random (non-zero) LoRA weights in the layouts people share: diffusers' form written by the pipelines' own
`save_lora_weights` (what diffusers' DreamBooth-LoRA scripts and ai-toolkit write: `transformer.…lora_A/lora_B`, with
the CLIP text encoders' parts), and kohya's Flux form (sd-scripts / FluxGym: fused qkv pairs, alphas, `lora_te1_`).
What these tests guard: the studio's picture equals diffusers' `load_lora_weights(file)` within 1/255, a LoRA at
weight 0 and a request without LoRA draw the picture of the model without it bit for bit (nothing stays on the
shared transformer), and a LoRA of the other family is refused in one line before any work.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import save_file

from studio.engine.generate import GenerateRequest, generate
from studio.engine.learned.lora_files import load_lora
from studio.errors import LoraError

RANK = 4
ATTENTION = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0")  # diffusers' Flux/SD3 LoRA scripts' defaults
CLIP_ATTENTION = ("self_attn.q_proj", "self_attn.v_proj")


def _pairs(module: torch.nn.Module, suffixes, generator, scale=0.3) -> dict[str, torch.Tensor]:
    """Random down/up pairs, in peft's names, for `module`'s linear layers whose names end with one of `suffixes`."""
    pairs = {}
    for name, layer in module.named_modules():
        if isinstance(layer, torch.nn.Linear) and name.endswith(suffixes):
            pairs[f"{name}.lora_A.weight"] = torch.randn(RANK, layer.in_features, generator=generator) * scale
            pairs[f"{name}.lora_B.weight"] = torch.randn(layer.out_features, RANK, generator=generator) * scale
    return pairs


def _diffusers_form(pipe, path, seed: int):
    """The transformer's attention and the first text encoder's, saved by the pipeline's `save_lora_weights`."""
    generator = torch.Generator().manual_seed(seed)
    pipe.save_lora_weights(path.parent, weight_name=path.name,
                           transformer_lora_layers=_pairs(pipe.transformer, ATTENTION, generator),
                           text_encoder_lora_layers=_pairs(pipe.text_encoder, CLIP_ATTENTION, generator))
    return path


def _alphas_form(pipe, path, seed: int, part: str = "transformer.", alpha: float = 2.0):
    """diffusers' form with an alpha per pair of `part` (`transformer.….alpha`, as some shared Flux LoRAs hold)."""
    from safetensors.torch import load_file

    weights = load_file(_diffusers_form(pipe, path, seed))
    for key in [k for k in weights if k.startswith(part) and k.endswith(".lora_A.weight")]:
        weights[key.replace(".lora_A.weight", ".alpha")] = torch.tensor(alpha)
    save_file(weights, path)
    return path


def _text_alphas_form(pipe, path, seed: int):
    """Alphas on the text encoder's pairs alone (diffusers' Flux loader folds those too; before, the studio folded
    alphas only when a transformer pair had one): alpha 4x the rank, so that dropping them shows."""
    return _alphas_form(pipe, path, seed, part="text_encoder.", alpha=4.0 * RANK)


def _kohya_flux(pipe, path, seed: int):
    """kohya's Flux layout: the double block's fused img qkv and its out projection, the single block's linear2, and
    CLIP-L's q_proj and out_proj (`lora_te1_`), each with an alpha other than its rank."""
    generator = torch.Generator().manual_seed(seed)
    inner = pipe.transformer.config.num_attention_heads * pipe.transformer.config.attention_head_dim
    single_in = pipe.transformer.single_transformer_blocks[0].proj_out.in_features
    clip = pipe.text_encoder.config.hidden_size
    shapes = {"lora_unet_double_blocks_0_img_attn_qkv": (inner, 3 * inner),
              "lora_unet_double_blocks_0_img_attn_proj": (inner, inner),
              "lora_unet_single_blocks_0_linear2": (single_in, inner),
              "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (clip, clip),
              # an out projection too: diffusers' text-encoder loader tells the old key form by `to_out_lora` alone
              "lora_te1_text_model_encoder_layers_0_self_attn_out_proj": (clip, clip)}
    weights = {}
    for name, (width_in, width_out) in shapes.items():
        weights[f"{name}.lora_down.weight"] = torch.randn(RANK, width_in, generator=generator) * 0.3
        weights[f"{name}.lora_up.weight"] = torch.randn(width_out, RANK, generator=generator) * 0.3
        weights[f"{name}.alpha"] = torch.tensor(2.0)
    save_file(weights, path)
    return path


def _ours(model, loras=(), prompt="a photo of a cat") -> np.ndarray:
    req = GenerateRequest(prompt, concepts=list(loras), seed=1, steps=2, width=64, height=64, preview_every=0)
    return np.asarray(generate(model, req).images[0], dtype=np.int16)


def _diffusers(folder, path, prompt="a photo of a cat") -> np.ndarray:
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.load_lora_weights(path)
    picture = pipe(prompt, num_inference_steps=2, width=64, height=64,
                   generator=torch.Generator().manual_seed(1)).images[0]
    return np.asarray(picture, dtype=np.int16)


def _base_weights(model) -> dict[str, torch.Tensor]:
    """The transformer's own weights by their names before any adapter (peft moves a layer's under `base_layer`)."""
    return {k.replace(".base_layer", ""): v.clone() for k, v in model.denoiser.state_dict().items()
            if "lora_" not in k}


@pytest.mark.parametrize("family, layout", [("sd3", "diffusers"), ("flux", "diffusers"), ("flux", "kohya"),
                                            ("flux", "alphas"), ("flux", "text-alphas")])
def test_lora_draws_what_diffusers_load_lora_weights_draws(flow_models, flow_model_dirs, tmp_path, family, layout):
    """Within 1/255 of diffusers' own loader; weight 0 and no LoRA after it are the plain picture bit for bit."""
    model, folder = flow_models[family], flow_model_dirs[family]
    write = {"diffusers": _diffusers_form, "kohya": _kohya_flux, "alphas": _alphas_form,
             "text-alphas": _text_alphas_form}[layout]
    path = write(DiffusionPipeline.from_pretrained(folder), tmp_path / f"{family}-{layout}.safetensors", seed=3)
    lora = load_lora(path)
    assert lora.families == ((family,) if layout == "kohya" or family == "flux" else ("flux", "sd3"))
    assert "transformer" in lora.modules and "text_encoder" in lora.modules
    plain = _ours(model)
    base = _base_weights(model)
    with_lora = _ours(model, [(lora, 1.0)])
    assert np.abs(with_lora - _diffusers(folder, path)).max() <= 1
    assert np.abs(with_lora - plain).max() > 2, "the LoRA had no effect beyond the tolerance"
    assert np.array_equal(_ours(model, [(lora, 0.0)]), plain)
    assert np.array_equal(_ours(model), plain)
    after = _base_weights(model)
    assert after.keys() == base.keys() and all(torch.equal(after[k], base[k]) for k in base)


def test_a_flux_lora_is_refused_on_sd3_and_kohya_sd3_names_one_line(flow_models, flow_model_dirs, tmp_path):
    flux_file = _kohya_flux(DiffusionPipeline.from_pretrained(flow_model_dirs["flux"]), tmp_path / "f.safetensors", 1)
    with pytest.raises(LoraError, match="a LoRA for flux, but the model .* is sd3"):
        _ours(flow_models["sd3"], [(load_lora(flux_file), 1.0)])
    sd3_kohya = tmp_path / "sd3-kohya.safetensors"
    save_file({"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight": torch.zeros(24, 4)}, sd3_kohya)
    with pytest.raises(LoraError, match="kohya's layout .* diffusers' form"):
        load_lora(sd3_kohya)
