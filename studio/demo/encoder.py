"""The demo model's image encoder and IP-Adapter (assets/demo-encoder/), trained on the demo world: `studio encode`'s
offline default.

Recipe (the IP-Adapter paper's, Ye et al. 2023, at the demo's size): pairs of pictures of one individual toy of the
world in two different scenes (`identity.render_view`: random size, position, background, style); the first goes
through a small CLIP vision model, whose projected embedding the adapter's image projection turns into 4 tokens; the
second is the denoising target, captioned by the world's captioner; the UNet, VAE and text encoder are frozen, only
the vision model and the adapter learn (the noise-prediction loss; the image embedding is dropped for 5% of samples,
as the paper does, so guidance has an unconditional image). The adapter is written in diffusers' IP-Adapter layout
(`image_proj.*`, `ip_adapter.<n>.to_k_ip/to_v_ip`), the vision model as a transformers folder `image_encoder/` beside
it, so the studio's runtime and diffusers' `load_ip_adapter` both read them.

    python -m studio.demo.encoder --out assets/demo-encoder --steps 8000 --batch 16   # about 75 min, 2-core CPU
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from studio.demo import identity, world
from studio.demo.vae import to_tensor

# Vision model: CLIP's architecture at the demo's scale (64-pixel pictures, 8-pixel patches: 65 tokens), about 0.2M
# parameters; the projection is the adapter's image embedding width.
VISION = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4, image_size=64,
              patch_size=8, projection_dim=64)
IMAGE_TOKENS = 4  # the plain IP-Adapter's image tokens (diffusers' ImageProjection default, h94's SD 1.5 adapter)
IMAGE_DROP = 0.05  # share of samples trained without their image (the IP-Adapter paper's 0.05)


@dataclass
class EncoderRecipe:
    steps: int = 8000  # 0.55 s a step at batch 16 on one core of the 2-core CPU (measured): about 75 minutes
    batch: int = 16
    lr: float = 1e-4  # the IP-Adapter paper's AdamW learning rate
    seed: int = 0
    views: int = 2  # pictures per individual drawn each step: one conditions, another is denoised


def _vision_model(seed: int):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    return CLIPVisionModelWithProjection(CLIPVisionConfig(**VISION))


def _attach_adapter(unet) -> list[torch.nn.Module]:
    """A plain IP-Adapter in diffusers' form on `unet` (processors, image projection, config), randomly initialised
    with the image keys/values from the text ones' scale; returns the modules that learn."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
    from diffusers.models.embeddings import ImageProjection, MultiIPAdapterImageProjection

    from studio.engine.learned.layer_word import cross_attention_layers

    cross = set(cross_attention_layers(unet))
    processors = {}
    for key, proc in unet.attn_processors.items():
        name = key.removesuffix(".processor")
        if name not in cross:
            processors[key] = proc
            continue
        attn = unet.get_submodule(name)
        ip = IPAdapterAttnProcessor2_0(attn.to_k.out_features, unet.config.cross_attention_dim, IMAGE_TOKENS)
        with torch.no_grad():  # start from the text projections, as the paper does
            ip.to_k_ip[0].weight.copy_(attn.to_k.weight)
            ip.to_v_ip[0].weight.copy_(attn.to_v.weight)
        processors[key] = ip
    unet.set_attn_processor(dict(processors))  # diffusers pops the entries of the dict it is given
    projection = ImageProjection(VISION["projection_dim"], unet.config.cross_attention_dim, IMAGE_TOKENS)
    unet.encoder_hid_proj = MultiIPAdapterImageProjection([projection])
    unet.config.encoder_hid_dim_type = "ip_image_proj"
    return [projection, *[p for p in processors.values() if isinstance(p, IPAdapterAttnProcessor2_0)]]


def adapter_state(unet) -> dict[str, torch.Tensor]:
    """The adapter on `unet` in diffusers' file layout (h94's key names): what `load_ip_adapter` reads."""
    from studio.engine.learned.layer_word import cross_attention_layers

    projection = unet.encoder_hid_proj.image_projection_layers[0]
    state = {"image_proj.proj.weight": projection.image_embeds.weight, "image_proj.proj.bias": projection.image_embeds.bias,
             "image_proj.norm.weight": projection.norm.weight, "image_proj.norm.bias": projection.norm.bias}
    for n, name in enumerate(cross_attention_layers(unet)):
        proc = unet.attn_processors[f"{name}.processor"]
        state[f"ip_adapter.{2 * n + 1}.to_k_ip.weight"] = proc.to_k_ip[0].weight
        state[f"ip_adapter.{2 * n + 1}.to_v_ip.weight"] = proc.to_v_ip[0].weight
    return {k: v.detach().float().contiguous().cpu() for k, v in state.items()}


def _pairs(rng: random.Random, batch: int) -> tuple[list, list, list[str]]:
    """`batch` pairs: a reference view of an individual, another view of it, and that view's caption."""
    references, targets, captions = [], [], []
    for _ in range(batch):
        toy = world.individual(rng.choice(world.TRAINING_INDIVIDUALS))
        references.append(identity.render_view(toy, rng))
        target = world.Scene([replace(toy, size=rng.choice(world.SIZES), position=rng.choice(world.POSITIONS))],
                             rng.choice(tuple(world.BACKGROUNDS)), rng.choice(world.STYLES))
        targets.append(world.render(target, identity.RESOLUTION))
        captions.append(world.caption(target, rng))
    return references, targets, captions


def _step_loss(pipe, vision, processor, batch_pairs, gen: torch.Generator, noise_sched) -> torch.Tensor:
    """The denoising loss of one batch of pairs with the adapter reading the references' embeddings."""
    references, targets, captions = batch_pairs
    with torch.no_grad():
        x0 = pipe.vae.encode(to_tensor(targets)).latent_dist.mean * pipe.vae.config.scaling_factor
        ids = pipe.tokenizer(captions, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        cond = pipe.text_encoder(ids).last_hidden_state
    pixels = processor(images=references, return_tensors="pt").pixel_values
    embeds = vision(pixels).image_embeds
    keep = (torch.rand(len(embeds), 1, generator=gen) >= IMAGE_DROP).to(embeds.dtype)
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(x0),), generator=gen)
    xt = noise_sched.add_noise(x0, noise, t)
    target = noise_sched.get_velocity(x0, noise, t) if noise_sched.config.prediction_type == "v_prediction" else noise
    pred = pipe.unet(xt, t, cond, added_cond_kwargs={"image_embeds": [(embeds * keep)[:, None]]}).sample
    return F.mse_loss(pred, target)


def train(pipe, recipe: EncoderRecipe, on_step=None):
    """Train the vision model and an adapter on `pipe`'s frozen demo model; returns (vision model, its picture
    processor, the adapter's state in diffusers' file layout, the losses). `pipe`'s UNet is left as it was."""
    from diffusers import DDPMScheduler
    from transformers import CLIPImageProcessor

    vision = _vision_model(recipe.seed)
    processor = CLIPImageProcessor(size=VISION["image_size"], crop_size=VISION["image_size"])
    unet = pipe.unet
    originals, hid_proj, hid_type = dict(unet.attn_processors), unet.encoder_hid_proj, unet.config.encoder_hid_dim_type
    frozen = [p for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters()]
    flags = [p.requires_grad for p in frozen]
    try:
        for p in frozen:
            p.requires_grad_(False)
        learning = _attach_adapter(unet)
        params = [p for m in [vision, *learning] for p in m.parameters()]
        optimizer = torch.optim.AdamW(params, lr=recipe.lr)
        noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
        rng, gen, losses = random.Random(recipe.seed), torch.Generator().manual_seed(recipe.seed), []
        for step in range(recipe.steps):
            loss = _step_loss(pipe, vision, processor, _pairs(rng, recipe.batch), gen, noise_sched)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            if on_step is not None:
                on_step(step + 1, losses[-1])
        return vision.eval(), processor, adapter_state(unet), losses
    finally:
        unet.encoder_hid_proj, unet.config.encoder_hid_dim_type = hid_proj, hid_type
        unet.set_attn_processor(originals)
        for p, flag in zip(frozen, flags):
            p.requires_grad_(flag)


def build(out: Path, recipe: EncoderRecipe, model_dir: str | None = None) -> Path:
    """Train on the demo model (`model_dir`, default the built-in one) and write `out/ip-adapter.safetensors`,
    `out/image_encoder/` and `out/encoder_training.json` (the recipe, the time, the loss at the start and end)."""
    from safetensors.torch import save_file

    from studio.engine.learned.ip_adapter import ADAPTER_FILE, IMAGE_ENCODER_FOLDER
    from studio.engine.models import ModelManager

    t0 = time.time()
    pipe = ModelManager().load(model_dir).pipe

    def report(step: int, loss: float) -> None:
        if step % 100 == 0 or step == recipe.steps:
            print(f"step {step}/{recipe.steps} loss {loss:.4f} ({time.time() - t0:.0f}s)", flush=True)

    vision, processor, state, losses = train(pipe, recipe, report)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / ADAPTER_FILE), metadata={"studio_recipe": "studio.demo.encoder"})
    vision.save_pretrained(out / IMAGE_ENCODER_FOLDER)
    processor.save_pretrained(out / IMAGE_ENCODER_FOLDER)
    tail = max(1, len(losses) // 10)
    log = {"recipe": recipe.__dict__, "seconds": round(time.time() - t0, 1),
           "loss_first_tenth": sum(losses[:tail]) / tail, "loss_last_tenth": sum(losses[-tail:]) / tail}
    (out / "encoder_training.json").write_text(json.dumps(log, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m studio.demo.encoder", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("assets/demo-encoder"))
    parser.add_argument("--model", help="the demo model folder (default: the built-in one)")
    for name, value in EncoderRecipe().__dict__.items():
        parser.add_argument(f"--{name}", type=type(value), default=value)
    args = parser.parse_args(argv)
    recipe = EncoderRecipe(**{k: getattr(args, k) for k in EncoderRecipe().__dict__})
    print(f"wrote {build(args.out, recipe, args.model)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
