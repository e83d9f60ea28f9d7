"""Stable Diffusion pipelines with random weights, built from configs alone (no model hub).

Two sizes per family:
- ``tiny``: the real text-encoder widths (768 / 1024 / 768+1280, so family detection and concept-size checks
  behave as on real models) but one transformer layer and a few UNet channels; builds in about a second on a CPU.
  The tests use these.
  SD3 and Flux (``tiny`` only) keep their real encoder widths too (CLIP-L 768, CLIP-G 1280, T5 4096) around a
  one-block transformer, with a T5 tokenizer built in code (`build_t5_tokenizer`: a Unigram vocabulary of the same
  words, no sentencepiece file).
- ``full``: the real SD 1.5 / SD 2.1 / SDXL architectures (49,408-token vocabulary, full UNet) with random
  weights, for the speed and memory benchmarks.

Test and benchmark code, kept out of the product package: the benchmarks import it as their sibling
(`from architectures import ...`), the tests as `benchmarks.architectures` (tests/conftest.py puts the repo root on
sys.path).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Literal

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel, T5Tokenizer

from studio.demo.tokenizer import build_clip_tokenizer

Family = Literal["sd1", "sd2", "sdxl", "sd3", "flux"]
Size = Literal["tiny", "full"]

# A small English vocabulary for the tiny pipelines' tokenizer; any other word still tokenizes (into bytes).
TINY_WORDS = (
    "a an the of in on with and photo picture painting rendering drawing style toy cat dog red blue green yellow "
    "black white small big beach forest city background two three close up bright dark art by sculpture cute "
    "good bad ugly blurry detailed hands face man woman portrait landscape"
).split()

CLIP_EOS_TOKEN_ID = 49407  # only meaningful for the full vocabulary; tiny tokenizers set their own


def _text_config(hidden: int, size: Size, vocab_size: int, eos_id: int, bos_id: int, projection: int) -> CLIPTextConfig:
    if size == "full":
        layers = {768: 12, 1024: 23, 1280: 32}[hidden]
        heads = {768: 12, 1024: 16, 1280: 20}[hidden]
        inner = hidden * 4
        act = "quick_gelu" if hidden == 768 else "gelu"
    else:
        layers, heads, inner, act = 1, 4, 64, "quick_gelu"
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=inner,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        hidden_act=act,
        projection_dim=projection,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )


def _unet(family: Family, size: Size, cross_dim: int) -> UNet2DConditionModel:
    if size == "full":
        if family == "sdxl":
            return UNet2DConditionModel(
                sample_size=128,
                block_out_channels=(320, 640, 1280),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=(1, 2, 10),
                attention_head_dim=(5, 10, 20),
                cross_attention_dim=2048,
                use_linear_projection=True,
                addition_embed_type="text_time",
                addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816,
            )
        return UNet2DConditionModel(
            sample_size=64 if family == "sd1" else 96,
            cross_attention_dim=cross_dim,
            attention_head_dim=8 if family == "sd1" else (5, 10, 20, 20),
            use_linear_projection=family == "sd2",
        )
    common = dict(
        sample_size=16,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=(2, 4),
        use_linear_projection=family != "sd1",
    )
    if family == "sdxl":
        return UNet2DConditionModel(
            cross_attention_dim=768 + 1280,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=32 + 6 * 8,
            **common,
        )
    return UNet2DConditionModel(cross_attention_dim=cross_dim, **common)


def _vae(size: Size) -> AutoencoderKL:
    if size == "full":
        return AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            latent_channels=4,
            sample_size=512,
        )
    return AutoencoderKL(
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )


def build_random_pipeline(family: Family = "sd1", size: Size = "tiny", seed: int = 0, tokenizer_dir: str | Path | None = None):
    """Return a diffusers pipeline of `family` with random weights (fp32, CPU), deterministic for a `seed`."""
    if family not in ("sd1", "sd2", "sdxl", "sd3", "flux"):
        raise ValueError(f"family must be 'sd1', 'sd2', 'sdxl', 'sd3' or 'flux', not {family!r}")
    if family in ("sd3", "flux") and size != "tiny":
        raise ValueError(f"{family} is built at size 'tiny' only, not {size!r}")
    torch.manual_seed(seed)
    tok_dir = Path(tokenizer_dir) if tokenizer_dir else Path(tempfile.mkdtemp(prefix="studio-tok-"))
    tokenizer = build_clip_tokenizer(TINY_WORDS, tok_dir)
    if family in ("sd3", "flux"):
        return _flow_pipeline(family, tokenizer, tok_dir)
    # The full architectures keep the real 49,408-row table (its size is what the swap benchmark is about);
    # the tokenizer only ever produces ids below its own length, which is smaller.
    vocab_size = 49408 if size == "full" else len(tokenizer)
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        prediction_type="v_prediction" if family == "sd2" else "epsilon",
        timestep_spacing="leading", steps_offset=1,
    )
    if family == "sdxl":
        te1 = CLIPTextModel(_text_config(768, size, vocab_size, eos, bos, 768))
        te2 = CLIPTextModelWithProjection(_text_config(1280, size, vocab_size, eos, bos, 1280 if size == "full" else 32))
        return StableDiffusionXLPipeline(
            vae=_vae(size), text_encoder=te1, text_encoder_2=te2, tokenizer=tokenizer, tokenizer_2=tokenizer,
            unet=_unet(family, size, 2048), scheduler=scheduler, add_watermarker=False,
        )
    hidden = 768 if family == "sd1" else 1024
    te = CLIPTextModel(_text_config(hidden, size, vocab_size, eos, bos, hidden))
    return StableDiffusionPipeline(
        vae=_vae(size), text_encoder=te, tokenizer=tokenizer, unet=_unet(family, size, hidden),
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


# ---- SD3 and Flux (tiny) --------------------------------------------------------------------------------------------
T5_WIDTH = 4096  # T5-XXL's d_model: what SD3's and Flux's word vectors for T5 have
T5_MAX_LENGTH = 32  # the tiny tokenizers' length; the pipelines pad T5 prompts to their max_sequence_length


def build_t5_tokenizer(words, out_dir: str | Path) -> T5Tokenizer:
    """A T5 tokenizer over `words` built in code (Unigram pieces "▁word", then single letters so that any other
    text still tokenizes), saved to `out_dir` (tokenizer.json) and loaded back: T5's special ids (pad 0, eos 1, unk 2)
    as in google/t5-v1_1-xxl."""
    letters = sorted(set("".join(words)) | set("abcdefghijklmnopqrstuvwxyz0123456789<>-_.,"))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(f"▁{w}", -1.0) for w in sorted(set(words))]
    vocab += [(c, -5.0) for c in letters] + [(f"▁{c}", -6.0) for c in letters]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=T5_MAX_LENGTH)
    out = Path(out_dir)
    tokenizer.save_pretrained(out)
    return T5Tokenizer.from_pretrained(out)


def _t5(vocab_size: int) -> T5EncoderModel:
    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=T5_WIDTH, d_kv=8, d_ff=32, num_layers=1,
                                   num_heads=2, relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
                                   is_encoder_decoder=False, use_cache=False))


def _flow_vae(latent_channels: int, shift: float, scale: float) -> AutoencoderKL:
    """SD3's / Flux's VAE layout (16 latent channels, no quant convs, a shift factor) at the tiny size; SD3's
    inpainting pipeline refuses a transformer without 16 (or 33) input channels."""
    return AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8,
                         latent_channels=latent_channels, sample_size=32, use_quant_conv=False,
                         use_post_quant_conv=False, shift_factor=shift, scaling_factor=scale)


def _flow_pipeline(family: str, tokenizer, tok_dir: Path):
    """A tiny SD3 (CLIP-L + CLIP-G with projections, T5, MMDiT) or Flux (CLIP-L pooled, T5, guidance-distilled
    transformer) pipeline; the scheduler configs are those of stabilityai/stable-diffusion-3-medium-diffusers and
    black-forest-labs/FLUX.1-dev."""
    t5_tokenizer = build_t5_tokenizer(TINY_WORDS, tok_dir / "t5")
    eos, bos, vocab = tokenizer.eos_token_id, tokenizer.bos_token_id, len(tokenizer)
    if family == "sd3":
        te1 = CLIPTextModelWithProjection(_text_config(768, "tiny", vocab, eos, bos, 32))
        te2 = CLIPTextModelWithProjection(_text_config(1280, "tiny", vocab, eos, bos, 32))
        transformer = SD3Transformer2DModel(
            sample_size=32, patch_size=1, in_channels=16, out_channels=16, num_layers=1, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=T5_WIDTH, caption_projection_dim=16,
            pooled_projection_dim=64, pos_embed_max_size=64)
        return StableDiffusion3Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=_flow_vae(16, 0.0609, 1.5305), text_encoder=te1, tokenizer=tokenizer, text_encoder_2=te2,
            tokenizer_2=tokenizer, text_encoder_3=_t5(len(t5_tokenizer)), tokenizer_3=t5_tokenizer)
    te1 = CLIPTextModel(_text_config(768, "tiny", vocab, eos, bos, 768))
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, out_channels=None, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=T5_WIDTH, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(4, 4, 8))
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096)
    return FluxPipeline(
        scheduler=scheduler, vae=_flow_vae(16, 0.1159, 0.3611), text_encoder=te1, tokenizer=tokenizer,
        text_encoder_2=_t5(len(t5_tokenizer)), tokenizer_2=t5_tokenizer, transformer=transformer)
