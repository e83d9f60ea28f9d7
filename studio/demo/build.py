"""Train the embedded demo model on the procedural world and save it as a Stable Diffusion 1.x folder.

`python -m studio.demo.build [--out assets/demo-model] [--minutes 12] [--seed 0]`

Recipe (seeded; the wall-clock budget sets the number of steps, so a faster machine trains longer):
1. Render the world: pictures with captions (`studio.demo.world`).
2. Build the tokenizer over the demo vocabulary (`studio.demo.vocab`).
3. Train a small AutoencoderKL (64x64 RGB -> 4x16x16 latents) for ~20% of the budget.
4. Encode every picture once; set the VAE's scaling factor to 1/std of the latents, as SD does.
5. Train a small CLIP text encoder jointly with a small UNet on the cached latents (epsilon prediction, SD's
   scaled-linear betas, 10% empty captions so classifier-free guidance works), cosine LR over the remaining time.
6. Save a standard diffusers StableDiffusionPipeline folder atomically (temp folder, then rename).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from studio.demo.tokenizer import build_clip_tokenizer
from studio.demo.vocab import demo_words
from studio.demo.world import sample_dataset

DEFAULT_OUT = Path(__file__).resolve().parents[2] / "assets" / "demo-model"
RESOLUTION = 64


def make_vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, latent_channels=4,
        norm_num_groups=16, sample_size=RESOLUTION,
    )


def make_text_encoder(tokenizer) -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=128,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))


def make_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=RESOLUTION // 4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(64, 128, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=128, attention_head_dim=8, norm_num_groups=32,
    )


def _to_tensor(images) -> torch.Tensor:
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def train_vae(vae, pixels: torch.Tensor, seconds: float, batch: int, log: dict) -> None:
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    start, step = time.time(), 0
    while time.time() - start < seconds:
        idx = torch.randint(0, len(pixels), (batch,))
        x = pixels[idx]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = F.mse_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 50 == 0:
            log["vae_loss"].append((step, round(loss.item(), 5)))
            print(f"vae step {step} loss {loss.item():.4f}", flush=True)
    log["vae_steps"] = step


def save_pipeline(out: Path, vae, text_encoder, tokenizer, unet, log: dict) -> None:
    """Write the pipeline folder atomically: a temp folder beside `out`, then rename."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(tmp)
    (tmp / "training_log.json").write_text(json.dumps(log, indent=1))
    old = out.with_name(out.name + ".old")
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def build(out: Path, minutes: float, seed: int, n_images: int) -> Path:
    t0 = time.time()
    budget = minutes * 60
    torch.manual_seed(seed)
    random.seed(seed)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    log = {"seed": seed, "minutes": minutes, "n_images": n_images, "hardware": f"{platform.processor() or platform.machine()}, "
           f"{os.cpu_count()} CPU cores, torch {torch.__version__}", "vae_loss": [], "unet_loss": []}

    # 1-2. Data and tokenizer.
    data = sample_dataset(n_images, seed=seed, size=RESOLUTION, training=True)
    pixels = _to_tensor([d[0] for d in data])
    captions = [d[1] for d in data]
    tokenizer = build_clip_tokenizer(demo_words(), out.with_name(out.name + ".tokenizer"))
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    empty_ids = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length,
                          return_tensors="pt").input_ids
    print(f"data: {len(data)} pictures, vocabulary {len(tokenizer)} tokens, {time.time() - t0:.0f}s", flush=True)

    # 3-4. VAE, then the latent cache.
    vae = make_vae()
    train_vae(vae, pixels, budget * 0.2, 32, log)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        latents = torch.cat([vae.encode(pixels[i:i + 256]).latent_dist.mean for i in range(0, len(pixels), 256)])
    scaling = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling)
    latents = latents * scaling
    log["vae_scaling_factor"] = scaling
    print(f"latents cached {tuple(latents.shape)}, scaling {scaling:.3f}, {time.time() - t0:.0f}s", flush=True)

    # 5. Text encoder + UNet.
    text_encoder, unet = make_text_encoder(tokenizer), make_unet()
    noise_sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                num_train_timesteps=1000)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=1e-2)
    remaining = budget - (time.time() - t0) - 30  # leave time to save
    start, step, batch = time.time(), 0, 48
    while (elapsed := time.time() - start) < remaining:
        for g in opt.param_groups:  # cosine decay over wall-clock time, with a short warm-up
            frac = elapsed / remaining
            g["lr"] = 5e-4 * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        idx = torch.randint(0, len(latents), (batch,))
        x0 = latents[idx]
        tok = ids[idx].clone()
        drop = torch.rand(batch) < 0.1
        tok[drop] = empty_ids
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (batch,))
        xt = noise_sched.add_noise(x0, noise, t)
        cond = text_encoder(tok).last_hidden_state
        loss = F.mse_loss(unet(xt, t, cond).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        if step % 25 == 0:
            log["unet_loss"].append((step, round(loss.item(), 5)))
            print(f"unet step {step} loss {loss.item():.4f} {time.time() - t0:.0f}s", flush=True)
    log["unet_steps"] = step
    log["seconds"] = round(time.time() - t0, 1)

    # 6. Save.
    unet.eval()
    text_encoder.eval()
    save_pipeline(out, vae, text_encoder, tokenizer, unet, log)
    shutil.rmtree(out.with_name(out.name + ".tokenizer"), ignore_errors=True)
    print(f"saved {out} after {time.time() - t0:.0f}s", flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: assets/demo-model)")
    parser.add_argument("--minutes", type=float, default=12.0, help="wall-clock training budget")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=8000, help="number of world pictures to train on")
    args = parser.parse_args(argv)
    build(args.out, args.minutes, args.seed, args.images)


if __name__ == "__main__":
    main()
