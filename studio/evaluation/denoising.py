"""What the model itself says, before any picture is drawn: the denoising loss Textual Inversion minimises.

`conditioning_gap` asks whether the model listens to text at all; `denoising_loss` compares two concepts (the
untrained `initial_concept` against the trained one) by the training objective on fixed draws.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from diffusers import DDPMScheduler

from studio.engine.generate import native_size
from studio.engine.learned.word import Concept
from studio.evaluation.world import BundledSet, World
from studio.training.data import TrainingImage, encode_latents, load_images
from studio.training.templates import TEMPLATES


def conditioning_gap(model, world: World, pictures: int = 64, seed: int = 4242) -> dict[str, float]:
    """Does the model listen to text at all? Denoising loss on world pictures with their captions vs empty prompts.

    A model whose UNet ignores the text has `relative_gap` near 0: no prompt, and so no learned word, can steer it
    (then compliance sits at chance and Textual Inversion cannot help). A few seconds on a CPU.
    """
    pipe, denoiser = model.pipe, model.denoiser
    data = world.captioned_pictures(pictures, seed, native_size(model))
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    gen = torch.Generator().manual_seed(seed)
    losses = {}
    with model.lock, torch.inference_mode():
        x0 = encode_latents(pipe.vae, [TrainingImage(Path("."), im, None) for im, _ in data], False,
                            model.device, model.dtype)
        noise = torch.randn(x0.shape, generator=gen).to(x0)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=gen).to(x0.device)
        noisy = scheduler.add_noise(x0, noise, t)
        target = scheduler.get_velocity(x0, noise, t) if scheduler.config.prediction_type == "v_prediction" else noise
        for name, prompts in (("captions", [c for _, c in data]), ("empty", [""] * len(data))):
            embeds = model.encoder.encode(prompts).embeds
            losses[name] = float(((denoiser(noisy, t, embeds).sample.float() - target.float()) ** 2).mean())
    return {"loss_with_captions": round(losses["captions"], 5), "loss_with_empty_prompt": round(losses["empty"], 5),
            "relative_gap": round((losses["empty"] - losses["captions"]) / losses["empty"], 4)}


def initial_concept(model, cs: BundledSet) -> Concept:
    """The untrained starting point: one vector per encoder equal to the initial word's input embedding.

    Only for SD 1.x/2.x-shaped models (the demo model is one); the trainer starts from exactly this.
    """
    tokenizer, encoder = model.pipe.tokenizer, model.pipe.text_encoder
    ids = tokenizer(cs.init_word, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise ValueError(f"the initial word {cs.init_word!r} of {cs.name} is {len(ids)} tokens; use a one-token word")
    table = encoder.get_input_embeddings().weight
    vector = table[torch.tensor(ids, device=table.device)].detach().float().cpu().clone()
    return Concept(cs.token, {"text_encoder": vector}, {"init_text": cs.init_word, "steps": "0"})


def denoising_loss(model, cs: BundledSet, concept: Concept, samples: int = 64, seed: int = 0) -> float:
    """The objective Textual Inversion minimises, on the set's pictures with fixed noise, timesteps and prompts.

    Lower means the word explains the pictures better. Fixed draws make two concepts directly comparable (the
    untrained initial word against the trained vectors), with no sampling noise from generation or the judge.
    """
    pipe, denoiser = model.pipe, model.denoiser
    resolution = native_size(model)
    images, _ = load_images(cs.images, resolution)
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    templates = TEMPLATES[cs.template]
    losses = []
    with model.lock, torch.inference_mode():
        latents = encode_latents(pipe.vae, images, False, model.device, model.dtype)
        for start in range(0, samples, 16):
            n = min(16, samples - start)
            idx = torch.randint(0, len(latents), (n,), generator=gen)
            x0 = latents[idx]
            noise = torch.randn(x0.shape, generator=gen).to(x0)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=gen).to(x0.device)
            prompts = [rng.choice(templates).format(cs.token) for _ in range(n)]
            embeds = model.encoder.encode(prompts, [concept]).embeds
            pred = denoiser(scheduler.add_noise(x0, noise, t), t, embeds).sample
            v_prediction = scheduler.config.prediction_type == "v_prediction"
            target = scheduler.get_velocity(x0, noise, t) if v_prediction else noise
            losses.append(float(((pred.float() - target.float()) ** 2).mean()) * n)
    return sum(losses) / samples
