"""Test helper: a diffusers SD3 transformer written back in the original (stabilityai `sd3_medium.safetensors`) layout.

diffusers 0.42.1 converts SD3 single files one way only (`single_file_utils.convert_sd3_transformer_checkpoint_to_
diffusers`); this is its inverse, so that a tiny SD3 can be saved as the file diffusers' `from_single_file` reads.
It lives with the tests because the studio writes no SD3 single files.
"""

from __future__ import annotations

import torch

ORIGINAL_PREFIX = "model.diffusion_model."  # where sd3_medium.safetensors keeps its transformer

# diffusers module -> original module, outside the blocks
_TOP = {"pos_embed.proj": "x_embedder.proj", "context_embedder": "context_embedder",
        "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
        "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
        "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
        "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2", "proj_out": "final_layer.linear"}
# diffusers module inside transformer_blocks.i -> original module inside joint_blocks.i (q/k/v are fused apart)
_BLOCK = {"attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k",
          "attn.norm_added_q": "context_block.attn.ln_q", "attn.norm_added_k": "context_block.attn.ln_k",
          "attn.to_out.0": "x_block.attn.proj", "attn.to_add_out": "context_block.attn.proj",
          "attn2.norm_q": "x_block.attn2.ln_q", "attn2.norm_k": "x_block.attn2.ln_k",
          "attn2.to_out.0": "x_block.attn2.proj", "norm1.linear": "x_block.adaLN_modulation.1",
          "norm1_context.linear": "context_block.adaLN_modulation.1",
          "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2",
          "ff_context.net.0.proj": "context_block.mlp.fc1", "ff_context.net.2": "context_block.mlp.fc2"}
# the fused qkv projections: original module -> its diffusers q, k, v modules
_QKV = {"x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
        "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
        "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v")}


def _swap_halves(weight: torch.Tensor) -> torch.Tensor:
    """diffusers' `swap_scale_shift` (original shift, scale <-> diffusers scale, shift), its own inverse."""
    first, second = weight.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def sd3_transformer_to_original(state: dict[str, torch.Tensor], prefix: str = ORIGINAL_PREFIX) -> dict:
    """diffusers `SD3Transformer2DModel` keys -> the original MMDiT keys under `prefix`: the inverse of
    diffusers' `convert_sd3_transformer_checkpoint_to_diffusers` (fused q/k/v; the last block's context norm and the
    final norm stored shift-then-scale)."""
    state = dict(state)
    blocks = sorted({int(k.split(".")[1]) for k in state if k.startswith("transformer_blocks.")})
    out = {"pos_embed": state.pop("pos_embed.pos_embed")}
    for param in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{param}"] = _swap_halves(state.pop(f"norm_out.linear.{param}"))
        for new, old in _TOP.items():
            out[f"{old}.{param}"] = state.pop(f"{new}.{param}")
    for i in blocks:
        here = f"transformer_blocks.{i}."
        for old, parts in _QKV.items():
            for param in ("weight", "bias"):
                if f"{here}{parts[0]}.{param}" in state:
                    out[f"joint_blocks.{i}.{old}.{param}"] = torch.cat(
                        [state.pop(f"{here}{part}.{param}") for part in parts])
        for new, old in _BLOCK.items():
            for param in ("weight", "bias"):
                value = state.pop(f"{here}{new}.{param}", None)
                if value is None:
                    continue
                if new == "norm1_context.linear" and i == blocks[-1]:  # the last block's is AdaLayerNormContinuous
                    value = _swap_halves(value)
                out[f"joint_blocks.{i}.{old}.{param}"] = value
    if state:
        raise ValueError(f"no original SD3 name for {sorted(state)[:5]}")
    return {prefix + key: value for key, value in out.items()}


# Where stabilityai's _incl_clips_t5xxl files keep each encoder, in transformers' own key names below the prefix
# (the prefixes diffusers' convert_ldm_clip_checkpoint / convert_sd3_t5_checkpoint_to_diffusers remove).
ENCODER_PREFIXES = {"text_encoder": "text_encoders.clip_l.transformer.",
                    "text_encoder_2": "text_encoders.clip_g.transformer.",
                    "text_encoder_3": "text_encoders.t5xxl.transformer."}


def sd3_encoders_to_original(pipe, parts) -> dict[str, torch.Tensor]:
    """The pipeline's encoders in `parts` under their single-file prefixes. Tied weights are written once each
    (T5's embed_tokens beside shared): diffusers loads T5 into an empty model without tying them."""
    return {ENCODER_PREFIXES[part] + key: value.clone()
            for part in parts for key, value in getattr(pipe, part).state_dict().items()}
