"""The Textual Inversion loop: only the new word's vectors learn; everything else is frozen.

Reads top to bottom as numbered steps. Events go to `on_event`; a `cancel` event stops it within one step.
Prompts are encoded through the same PromptEncoder that generation uses, with the vectors as a per-request
concept, so no token is added to the tokenizer and no row of the embedding table is touched.
"""

from __future__ import annotations

import math
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from studio.engine.concepts import ENCODER_KEYS, Concept, save_concept
from studio.training.config import TrainConfig, parse_lr_schedule
from studio.training.data import TrainError, encode_latents, find_images, load_images
from studio.training.templates import TEMPLATES


@dataclass
class TrainEvent:
    kind: str  # started | warning | step | preview | checkpoint | finished | failed | cancelled
    step: int = 0
    total: int = 0
    loss: float | None = None
    lr: float | None = None
    steps_per_s: float | None = None
    eta_s: float | None = None
    message: str = ""
    path: Path | None = None
    images: list = field(default_factory=list)


class Trainer:
    """Learn `config.token` from `images` on a LoadedModel; files go to `out_dir`."""

    def __init__(self, model, config: TrainConfig, images, out_dir: Path | str):
        self.model = model
        self.config = config
        self.paths = find_images(images)
        self.out_dir = Path(out_dir)

    def _init_vectors(self) -> dict[str, torch.Tensor]:
        """Vectors start from the embeddings of `init_text`'s tokens, repeated or cut to `n_vectors`."""
        pipe, cfg = self.model.pipe, self.config
        tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if self.model.family == "sdxl" else [])
        encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if self.model.family == "sdxl" else [])
        vectors = {}
        for key, tok, enc in zip(ENCODER_KEYS, tokenizers, encoders):
            ids = tok(cfg.init_text, add_special_tokens=False).input_ids or [tok.eos_token_id]
            ids = (ids * cfg.n_vectors)[: cfg.n_vectors]
            table = enc.get_input_embeddings().weight
            vectors[key] = table[torch.tensor(ids, device=table.device)].detach().float().clone()
        return vectors

    def _concept(self, vectors: dict[str, torch.Tensor], step: int) -> Concept:
        cfg = self.config
        meta = {"base_model": self.model.name, "family": self.model.family, "init_text": cfg.init_text,
                "steps": str(step), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        return Concept(cfg.token, {k: v.detach().cpu().clone() for k, v in vectors.items()}, meta)

    def _save(self, vectors, step: int, name: str) -> Path:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        return save_concept(self._concept(vectors, step), self.out_dir / name, format="studio")

    def run(self, on_event: Callable[[TrainEvent], None] | None = None,
            cancel: threading.Event | None = None) -> Concept:
        emit = on_event or (lambda _e: None)
        cfg, model = self.config, self.model
        pipe = model.pipe
        token_file = cfg.token.strip("<>").replace("/", "_") or "concept"

        # 1. Pictures and the latent cache (each picture encoded once, not every step).
        resolution = cfg.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
        images, warnings = load_images(self.paths, resolution)
        for message in warnings:
            emit(TrainEvent("warning", message=message))
        with model.lock:
            latents = encode_latents(pipe.vae, images, cfg.flip, model.device, model.dtype)
        templates = TEMPLATES["style" if cfg.template == "style" else "object"]

        # 2. Parameters: the new vectors only.
        torch.manual_seed(cfg.seed)
        rng = random.Random(cfg.seed)
        init = self._init_vectors()
        vectors = {k: torch.nn.Parameter(v.clone()) for k, v in init.items()}
        optimizer = torch.optim.AdamW(vectors.values(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        lr_at = parse_lr_schedule(cfg.lr_schedule, cfg.learning_rate, cfg.warmup_steps, cfg.steps)
        concept = Concept(cfg.token, dict(vectors), {})
        from diffusers import DDPMScheduler
        noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        prediction = noise_scheduler.config.prediction_type

        for module in (pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
            if module is not None:
                module.requires_grad_(False)
        emit(TrainEvent("started", total=cfg.steps, message=f"{len(images)} pictures, {len(latents)} latents"))

        # 3. The loop.
        last_good = {k: v.detach().clone() for k, v in vectors.items()}
        started, step = time.time(), 0
        with model.lock:
            for step in range(1, cfg.steps + 1):
                if cancel is not None and cancel.is_set():
                    path = self._save(last_good, step - 1, f"{token_file}.safetensors")
                    emit(TrainEvent("cancelled", step=step - 1, total=cfg.steps, path=path,
                                    message=f"cancelled; vectors of step {step - 1} saved"))
                    return self._concept(last_good, step - 1)
                lr = lr_at(step - 1)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                idx = [rng.randrange(len(latents)) for _ in range(cfg.batch_size)]
                x0 = latents[idx]
                prompts = [(images[i // (2 if cfg.flip else 1)].caption or rng.choice(templates)).replace(
                    "{}", cfg.token).replace("[name]", cfg.token) for i in idx]
                noise = torch.randn_like(x0)
                t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(idx),), device=x0.device)
                noisy = noise_scheduler.add_noise(x0, noise, t)
                encoded = model.encoder.encode(prompts, [concept])
                extra = {}
                if model.family == "sdxl":
                    size = resolution
                    time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=x0.dtype, device=x0.device)
                    extra["added_cond_kwargs"] = {"text_embeds": encoded.pooled, "time_ids": time_ids.repeat(len(idx), 1)}
                pred = pipe.unet(noisy, t, encoded.embeds, **extra).sample
                target = noise_scheduler.get_velocity(x0, noise, t) if prediction == "v_prediction" else noise
                loss = F.mse_loss(pred.float(), target.float())
                if cfg.regularization:
                    loss = loss + cfg.regularization * sum((vectors[k] - init[k]).square().mean() for k in vectors)
                if not math.isfinite(loss.item()):
                    path = self._save(last_good, step - 1, f"{token_file}.safetensors")
                    emit(TrainEvent("failed", step=step, total=cfg.steps, path=path,
                                    message=f"the loss became {loss.item()} at step {step}: lower the learning rate "
                                            f"(now {lr:g}) or use fp32; the last good vectors were saved to {path.name}"))
                    raise TrainError(f"training diverged at step {step} (loss {loss.item()}); lower the learning rate")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(list(vectors.values()), cfg.max_grad_norm)
                optimizer.step()
                if not all(torch.isfinite(v).all() for v in vectors.values()):
                    with torch.no_grad():
                        for k in vectors:
                            vectors[k].copy_(last_good[k])
                    path = self._save(last_good, step - 1, f"{token_file}.safetensors")
                    emit(TrainEvent("failed", step=step, total=cfg.steps, path=path,
                                    message=f"the vectors became NaN/inf at step {step}: lower the learning rate"))
                    raise TrainError(f"training diverged at step {step}; lower the learning rate (now {lr:g})")
                last_good = {k: v.detach().clone() for k, v in vectors.items()}
                rate = step / max(1e-9, time.time() - started)
                emit(TrainEvent("step", step=step, total=cfg.steps, loss=loss.item(), lr=lr, steps_per_s=rate,
                                eta_s=(cfg.steps - step) / rate))
                if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                    path = self._save(last_good, step, f"{token_file}-step{step}.safetensors")
                    emit(TrainEvent("checkpoint", step=step, total=cfg.steps, path=path))
                if cfg.preview_every and step % cfg.preview_every == 0:
                    emit(TrainEvent("preview", step=step, total=cfg.steps, images=self._preview(last_good)))

        # 4. The final file.
        path = self._save(last_good, cfg.steps, f"{token_file}.safetensors")
        emit(TrainEvent("finished", step=cfg.steps, total=cfg.steps, path=path,
                        message=f"{cfg.steps} steps in {time.time() - started:.1f}s"))
        return self._concept(last_good, cfg.steps)

    def _preview(self, vectors) -> list:
        """Pictures of the fixed preview prompts with fixed seeds, from the same loaded modules."""
        from studio.engine.generate import GenerateRequest, generate

        concept = self._concept(vectors, 0)
        images = []
        for k, prompt in enumerate(self.config.preview_prompts):
            req = GenerateRequest(prompt.replace("{}", self.config.token), concepts=[concept], seed=k, steps=20)
            images.extend(generate(self.model, req).images)
        return images
