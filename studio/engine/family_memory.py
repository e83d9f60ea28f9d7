"""GPU memory the weights of SD3 and Flux need per memory mode, counted (not measured) from their parameter counts.

The counts are those of the real models' components, built on the meta device from their configs (written in
`reference_components`, no hub) by `count_parameters`; `tests/engine/test_family_memory.py` builds them again and
checks `PARAMETERS`. Counted, not measured: activations, the CUDA context and the allocator's cache come on top.

    for line in memory_lines("flux"): print(line)
"""

from __future__ import annotations

# Parameters of each reference model's components (count_parameters; checked by the test above).
PARAMETERS: dict[str, dict[str, int]] = {
    "SD3 medium": {"transformer": 2_028_328_000, "CLIP-L": 123_650_304, "CLIP-G": 694_659_840,
                   "T5-XXL": 4_762_310_656, "VAE": 83_821_011},
    "SD3.5 large": {"transformer": 8_056_627_520, "CLIP-L": 123_650_304, "CLIP-G": 694_659_840,
                    "T5-XXL": 4_762_310_656, "VAE": 83_821_011},
    "Flux.1-dev": {"transformer": 11_901_408_320, "CLIP-L": 123_650_304, "T5-XXL": 4_762_310_656,
                   "VAE": 83_821_011},
}
FAMILY_OF = {"SD3 medium": "sd3", "SD3.5 large": "sd3", "Flux.1-dev": "flux"}
BYTES = {"bf16": 2, "fp32": 4}  # bf16 or fp16 (2 bytes) on CUDA, fp32 on the CPU


def reference_components(name: str) -> dict:
    """The components of reference model `name` built from their configs (diffusers' and transformers' classes,
    the numbers of the models' published config files); call it under `torch.device("meta")`."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    clip = dict(vocab_size=49408, max_position_embeddings=77)
    parts = {
        "CLIP-L": lambda: CLIPTextModelWithProjection(CLIPTextConfig(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            projection_dim=768, **clip)),
        "CLIP-G": lambda: CLIPTextModelWithProjection(CLIPTextConfig(
            hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
            projection_dim=1280, **clip)),
        "T5-XXL": lambda: T5EncoderModel(T5Config(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
                                                  vocab_size=32128, feed_forward_proj="gated-gelu")),
        "VAE": lambda: AutoencoderKL(latent_channels=16, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                                     down_block_types=("DownEncoderBlock2D",) * 4,
                                     up_block_types=("UpDecoderBlock2D",) * 4),
    }
    sd3 = dict(sample_size=128, patch_size=2, in_channels=16, attention_head_dim=64, joint_attention_dim=4096,
               pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)
    transformers = {
        "SD3 medium": lambda: SD3Transformer2DModel(num_layers=24, num_attention_heads=24,
                                                    caption_projection_dim=1536, **sd3),
        "SD3.5 large": lambda: SD3Transformer2DModel(num_layers=38, num_attention_heads=38,
                                                     caption_projection_dim=2432, qk_norm="rms_norm", **sd3),
        "Flux.1-dev": lambda: FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
            axes_dims_rope=(16, 56, 56)),
    }
    return {"transformer": transformers[name](), **{part: parts[part]() for part in PARAMETERS[name]
                                                    if part != "transformer"}}


def count_parameters(name: str) -> dict[str, int]:
    """Component -> parameters of reference model `name`, built on the meta device (no memory, no download)."""
    import torch

    with torch.device("meta"):
        return {part: sum(p.numel() for p in module.parameters())
                for part, module in reference_components(name).items()}


def gib(parameters: int, dtype: str = "bf16") -> float:
    return parameters * BYTES[dtype] / 2**30


def memory_lines(family: str) -> list[str]:
    """One line per reference model of `family` ("sd3", "flux"): GiB of weights on the GPU in `fast`/`balanced`
    (every component on the GPU in bf16/fp16) and in `low-vram` (model CPU offload: the largest component at a time)."""
    lines = []
    for name, parts in PARAMETERS.items():
        if FAMILY_OF[name] != family:
            continue
        total, largest = sum(parts.values()), max(parts, key=parts.get)
        lines.append(f"{name}: {total / 1e9:.1f}B parameters; fast/balanced {gib(total):.1f} GiB of weights on the GPU "
                     f"(bf16/fp16), low-vram {gib(parts[largest]):.1f} GiB (model offload: the {largest} alone); "
                     f"counted from the weights, activations come on top")
    return lines
