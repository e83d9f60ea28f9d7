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
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from studio.engine.concepts import Concept, load_concept, save_concept
from studio.engine.memory import is_out_of_memory, oom_advice, release_memory
from studio.engine.model_facts import encoders_of
from studio.engine.names import file_stem, inside
from studio.training.config import TrainConfig, parse_lr_schedule
from studio.training.data import TrainError, check_captions, encode_latents, find_images, load_images
from studio.training.memory import training_memory
from studio.training.resume import (TrainState, check_matches, find_checkpoint, load_state, restore_rngs, save_state,
                                    state_path)
from studio.training.templates import TEMPLATES


@contextmanager
def frozen(*modules) -> Iterator[None]:
    """No gradients for the parameters of `modules` inside the block; each parameter's own flag comes back after."""
    modules = [m for m in modules if m is not None]
    flags = [[p.requires_grad for p in m.parameters()] for m in modules]
    for module in modules:
        module.requires_grad_(False)
    try:
        yield
    finally:
        for module, module_flags in zip(modules, flags):
            for param, flag in zip(module.parameters(), module_flags):
                param.requires_grad_(flag)


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


@dataclass
class LastGood:
    """The newest vectors that came through a step whole, and how to snapshot the run at them: what a run that
    fails before its final save (out of memory) still saves."""

    step: int = 0
    vectors: dict[str, torch.Tensor] | None = None
    snapshot: Callable[[int], TrainState] | None = None


@dataclass
class _Run:
    """What a run sets up before its loop (`Trainer._setup`) and the loop works on."""

    images: list
    latents: torch.Tensor
    templates: tuple[str, ...]
    resolution: int
    init: dict[str, torch.Tensor]  # the starting vectors, which `regularization` pulls back towards
    vectors: dict[str, torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    generator: torch.Generator  # noise and timesteps
    rng: random.Random  # pictures and templates
    first: int  # the first step still to do
    lr_at: Callable[[int], float]
    concept: Concept  # the vectors as a per-request concept, for the prompt encoder
    autocast_dtype: torch.dtype | None
    precision: str
    noise_scheduler: object
    norm_limit: dict[str, float] = field(default_factory=dict)


# Divergence beyond NaN: a vector this many times the norm of the embedding table's largest row has left the space
# the text encoder was trained on. Shared SD 1.5 embeddings that work reach 44x the vocabulary's typical norm
# (0.39): SingleInsert's 43.95, dgtlv2's 10.5 (../shared/compat); a learning rate of 1e6 reaches 5.7e6 in a few
# steps while the loss stays finite. 100x the largest row (demo model: 0.65 -> 65) keeps the first and stops the last.
NORM_LIMIT_FACTOR = 100.0


class Trainer:
    """Learn `config.token` from `images` on a LoadedModel.

    `out` is a folder (the final file is `<word>.safetensors` in it, the word made file-safe by
    `studio.engine.names.file_stem`) or a `.safetensors` path, which is then the final file; checkpoints are written
    beside it as `<stem>-stepN.safetensors`.
    """

    def __init__(self, model, config: TrainConfig, images, out: Path | str):
        self.model = model
        self.config = config
        self.paths = find_images(images)
        out = Path(out)
        if out.suffix.lower() == ".safetensors":
            self.out_dir, self.file_stem = out.parent, out.stem
        else:
            self.out_dir, self.file_stem = out, file_stem(config.token)

    def _init_vectors(self) -> dict[str, torch.Tensor]:
        """Vectors start from the embeddings of `init_text`'s tokens, repeated or cut to `n_vectors`."""
        cfg = self.config
        vectors = {}
        for key, tok, enc in encoders_of(self.model.pipe):
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

    def _save(self, vectors, step: int, name: str, state: TrainState | None = None) -> Path:
        """Write the concept file `name`, with its resume sidecar when `state` is given (else none is left)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = save_concept(self._concept(vectors, step), inside(self.out_dir, name), format="studio")
        if state is not None:
            save_state(path, state)
        else:
            state_path(path).unlink(missing_ok=True)  # a sidecar of an older run would no longer match the vectors
        return path

    def _state(self, step: int, run: _Run) -> TrainState:
        """The run at `step`: what `--resume` needs to go on bit for bit as if it had never stopped."""
        adam = {k: {name: value.detach().clone() for name, value in run.optimizer.state[p].items()}
                for k, p in run.vectors.items() if p in run.optimizer.state}
        return TrainState(step=step, token=self.config.token, base_model=self.model.name, family=self.model.family,
                          dims=dict(self.model.encoder_dims), init=run.init, adam=adam,
                          noise_rng=run.generator.get_state(), data_rng=run.rng.getstate(),
                          scaler=run.scaler.state_dict() if run.scaler.is_enabled() else None)

    def _restore(self, state: TrainState, vectors, optimizer, generator, rng, scaler) -> int:
        """Load the optimizer, random streams and loss scale of `state`; return the first step still to do."""
        for key, param in vectors.items():
            if key in state.adam:
                # Adam keeps its step count on the CPU (unless capturable); the moments live by the vectors.
                optimizer.state[param] = {n: v if n == "step" else v.to(param.device) for n, v in state.adam[key].items()}
        restore_rngs(state, generator, rng)
        if state.scaler and scaler.is_enabled():
            scaler.load_state_dict(state.scaler)
        return state.step + 1

    def _precision(self) -> tuple[torch.dtype | None, str]:
        """The autocast dtype (None: no autocast) and its name, from `mixed_precision` and the device."""
        wanted, device = self.config.mixed_precision, self.model.device
        if wanted == "auto":
            if device.type != "cuda":
                wanted = "no"  # CPU autocast to bf16 is slower than fp32 on most CPUs
            elif self.model.dtype == torch.float16:
                wanted = "fp16"
            else:
                wanted = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[wanted], wanted

    def _stop(self, kind: str, step: int, kept: LastGood, emit, message: Callable[[str], str],
              error: Callable[[str], str] | None = None, resumable: bool = False) -> Concept:
        """End the run early: save the last good vectors as the final file (with their resume sidecar when
        `resumable`: the run can go on where it was), emit a `kind` event at `step`, then return the concept of those
        vectors (`cancelled`) or raise TrainError (`failed`). `message(file name)` is the event's message, `error`
        the TrainError's (None: the same)."""
        snapshot = kept.snapshot(kept.step) if resumable else None
        path = self._save(kept.vectors, kept.step, f"{self.file_stem}.safetensors", snapshot)
        emit(TrainEvent(kind, step=step, total=self.config.steps, path=path, message=message(path.name)))
        if kind == "cancelled":
            return self._concept(kept.vectors, kept.step)
        raise TrainError((error or message)(path.name)) from None

    @contextmanager
    def _out_of_memory_fails(self, mode: str, kept: LastGood, emit) -> Iterator[None]:
        """Out of memory anywhere in the block (latent cache, a step, a preview) ends the run as `failed`: the memory
        the failed step held is freed, the last good vectors are saved (resumable, so the run can go on in the
        smaller mode), and the event and the TrainError name the memory mode to switch to (studio.engine.memory)."""
        try:
            yield
        except RuntimeError as exc:  # torch.OutOfMemoryError, and a preview's OutOfMemory, are RuntimeErrors
            if not is_out_of_memory(exc):
                raise
            release_memory(exc)
            where = f"at step {kept.step + 1}" if kept.vectors is not None else "while encoding the pictures"
            message = f"out of memory {where} in '{mode}' memory mode: {oom_advice(mode)} and train again"
            if kept.vectors is None:
                emit(TrainEvent("failed", step=kept.step, total=self.config.steps, message=message))
                raise TrainError(message) from None
            self._stop("failed", kept.step, kept, emit, resumable=True, message=lambda file: (
                f"{message}; the vectors of step {kept.step} were saved to {file} (--resume continues from it)"))

    def _resume_point(self) -> tuple[Path | None, TrainState | None]:
        """The checkpoint `config.resume` names and its state, checked against this run (None, None: a new run)."""
        cfg, model = self.config, self.model
        if not cfg.resume:
            return None, None
        resume_from = find_checkpoint(cfg.resume, cfg.token)
        state = load_state(resume_from)
        check_matches(state, resume_from, token=cfg.token, base_model=model.name, family=model.family,
                      dims=dict(model.encoder_dims), n_vectors=cfg.n_vectors, total_steps=cfg.steps)
        return resume_from, state

    def _setup(self, savings, emit, resume_from: Path | None, state: TrainState | None,
               autocast: tuple[torch.dtype | None, str]) -> _Run:
        """Steps 2 and 3 of `run`: the pictures and their latents, the parameters, optimizer and random streams."""
        cfg, model = self.config, self.model
        pipe = model.pipe
        # 2. Pictures and the latent cache (each picture encoded once, not every step).
        resolution = cfg.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
        images, warnings = load_images(self.paths, resolution)
        for message in warnings:
            emit(TrainEvent("warning", message=message))
        if cfg.template == "captions":
            check_captions(images)
        latents = encode_latents(pipe.vae, images, cfg.flip, model.device, model.dtype, savings.latent_batch)
        savings.after_latent_cache()

        # 3. Parameters (the new vectors only, in fp32 whatever the model's dtype), optimizer, random streams.
        generator = torch.Generator(model.device).manual_seed(cfg.seed)  # noise and timesteps
        rng = random.Random(cfg.seed)  # pictures and templates
        if state is None:
            init = self._init_vectors()
            start = {k: v.clone() for k, v in init.items()}
        else:
            init = {k: v.to(model.device) for k, v in state.init.items()}
            saved = load_concept(resume_from, token=cfg.token)
            start = {k: v.to(device=model.device, dtype=torch.float32) for k, v in saved.vectors.items()}
        vectors = {k: torch.nn.Parameter(v) for k, v in start.items()}
        optimizer = torch.optim.AdamW(vectors.values(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        autocast_dtype, precision = autocast  # from _precision()
        scaler = torch.amp.GradScaler(model.device.type, enabled=precision == "fp16" and model.device.type == "cuda")
        first = 1 if state is None else self._restore(state, vectors, optimizer, generator, rng, scaler)
        from diffusers import DDPMScheduler
        # A picture's caption is its prompt; "object" / "style" draw one from the paper's lists for pictures
        # without one ("captions" has none: every picture has a caption, checked above).
        return _Run(images=images, latents=latents, templates=TEMPLATES.get(cfg.template, ()), resolution=resolution,
                    init=init, vectors=vectors, optimizer=optimizer, scaler=scaler, generator=generator, rng=rng,
                    first=first,
                    lr_at=parse_lr_schedule(cfg.lr_schedule, cfg.learning_rate, cfg.warmup_steps, cfg.steps),
                    concept=Concept(cfg.token, dict(vectors), {}), autocast_dtype=autocast_dtype, precision=precision,
                    noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config))

    def _loss(self, run: _Run) -> torch.Tensor:
        """The denoising loss of one batch: pictures and prompts drawn from `run.rng`, noise and timesteps from
        `run.generator` (in that order: a resumed run draws the same ones)."""
        cfg, model, pipe = self.config, self.model, self.model.pipe
        idx = [run.rng.randrange(len(run.latents)) for _ in range(cfg.batch_size)]
        x0 = run.latents[idx]
        prompts = [(run.images[i // (2 if cfg.flip else 1)].caption or run.rng.choice(run.templates)).replace(
            "{}", cfg.token).replace("[name]", cfg.token) for i in idx]
        noise = torch.randn(x0.shape, generator=run.generator, device=model.device, dtype=x0.dtype)
        t = torch.randint(0, run.noise_scheduler.config.num_train_timesteps, (len(idx),),
                          generator=run.generator, device=model.device)
        noisy = run.noise_scheduler.add_noise(x0, noise, t)
        with torch.autocast(model.device.type, dtype=run.autocast_dtype, enabled=run.autocast_dtype is not None):
            encoded = model.encoder.encode(prompts, [run.concept])
            extra = {}
            if model.family == "sdxl":
                size = run.resolution
                time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=x0.dtype, device=x0.device)
                extra["added_cond_kwargs"] = {"text_embeds": encoded.pooled, "time_ids": time_ids.repeat(len(idx), 1)}
            pred = pipe.unet(noisy, t, encoded.embeds, **extra).sample
        prediction = run.noise_scheduler.config.prediction_type
        target = run.noise_scheduler.get_velocity(x0, noise, t) if prediction == "v_prediction" else noise
        loss = F.mse_loss(pred.float(), target.float())
        if cfg.regularization:
            loss = loss + cfg.regularization * sum((run.vectors[k] - run.init[k]).square().mean() for k in run.vectors)
        return loss

    def _step(self, run: _Run, step: int, kept: LastGood, emit) -> tuple[float, float]:
        """One training step: the learning rate, the loss, the update; returns (loss, lr). A loss that is not finite,
        or vectors that left the vocabulary's space (`_exploded`), end the run as `failed` with the vectors of the
        step before saved, without a resume sidecar."""
        cfg, vectors, optimizer, scaler = self.config, run.vectors, run.optimizer, run.scaler
        lr = run.lr_at(step - 1)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = self._loss(run)
        value = loss.item()
        if not math.isfinite(value):
            self._stop("failed", step, kept, emit, message=lambda file: (
                f"the loss became {value} at step {step}: lower the learning rate (now {lr:g}) or train in fp32 "
                f"(mixed precision now {run.precision}); the last good vectors were saved to {file}"),
                error=lambda file: (f"training diverged at step {step} (loss {value}): lower the learning rate "
                                    f"(now {lr:g}); the vectors of step {step - 1} were saved to {file}"))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(list(vectors.values()), cfg.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        exploded = self._exploded(vectors, run.norm_limit)
        if exploded:
            with torch.no_grad():
                for k in vectors:
                    vectors[k].copy_(kept.vectors[k])
            self._stop("failed", step, kept, emit, message=lambda file: (
                f"training diverged at step {step}: {exploded}; lower the learning rate (now {lr:g}); the vectors of "
                f"step {step - 1} were saved to {file}"))
        return value, lr

    def run(self, on_event: Callable[[TrainEvent], None] | None = None,
            cancel: threading.Event | None = None) -> Concept:
        """Train; emits events to `on_event`; returns the learned concept (also written to `out_dir`)."""
        emit = on_event or (lambda _e: None)
        cfg, model = self.config, self.model
        pipe = model.pipe

        # 1. What to continue from, checked before any work is done.
        resume_from, state = self._resume_point()
        autocast = self._precision()
        encoders = [encoder for _, _, encoder in encoders_of(pipe)]
        kept = LastGood()
        with model.lock, training_memory(pipe, cfg.memory) as savings, frozen(pipe.unet, pipe.vae, *encoders), \
                self._out_of_memory_fails(savings.preset.name, kept, emit):
            # 2. Pictures and their latents; 3. parameters, optimizer, random streams.
            run = self._setup(savings, emit, resume_from, state, autocast)
            first = run.first
            resumed = f"; resumed from {resume_from.name} at step {first - 1}" if resume_from else ""
            savings_text = ", ".join(savings.applied) or "none"
            emit(TrainEvent("started", step=first - 1, total=cfg.steps,
                            message=f"{len(run.images)} pictures, {len(run.latents)} latents; memory mode "
                                    f"{savings.preset.name} (savings: {savings_text}); "
                                    f"precision {run.precision}{resumed}"))
            run.norm_limit = self._norm_limit()

            # 4. The loop.
            kept.step, kept.snapshot = first - 1, lambda step: self._state(step, run)
            kept.vectors = {k: v.detach().clone() for k, v in run.vectors.items()}
            started = time.time()
            for step in range(first, cfg.steps + 1):
                if cancel is not None and cancel.is_set():
                    return self._stop("cancelled", step - 1, kept, emit, resumable=True, message=lambda _file: (
                        f"cancelled; vectors of step {step - 1} saved (resumable)"))
                loss, lr = self._step(run, step, kept, emit)
                kept.step, kept.vectors = step, {k: v.detach().clone() for k, v in run.vectors.items()}
                rate = (step - first + 1) / max(1e-9, time.time() - started)
                emit(TrainEvent("step", step=step, total=cfg.steps, loss=loss, lr=lr, steps_per_s=rate,
                                eta_s=(cfg.steps - step) / rate))
                if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                    name = f"{self.file_stem}-step{step}.safetensors"
                    path = self._save(kept.vectors, step, name, kept.snapshot(step))
                    emit(TrainEvent("checkpoint", step=step, total=cfg.steps, path=path))
                if cfg.preview_every and step % cfg.preview_every == 0:
                    with savings.vae_back():
                        emit(TrainEvent("preview", step=step, total=cfg.steps, images=self._preview(kept.vectors)))

            # 5. The final file (resumable too: a later run can ask for more steps).
            path = self._save(kept.vectors, cfg.steps, f"{self.file_stem}.safetensors", kept.snapshot(cfg.steps))
        emit(TrainEvent("finished", step=cfg.steps, total=cfg.steps, path=path,
                        message=f"{cfg.steps - first + 1} steps in {time.time() - started:.1f}s"))
        return self._concept(kept.vectors, cfg.steps)

    def _norm_limit(self) -> dict[str, float]:
        """Per encoder: NORM_LIMIT_FACTOR times the largest row norm of its embedding table."""
        return {key: NORM_LIMIT_FACTOR * float(enc.get_input_embeddings().weight.detach().float().norm(dim=1).max())
                for key, _, enc in encoders_of(self.model.pipe)}

    @staticmethod
    def _exploded(vectors: dict[str, torch.Tensor], norm_limit: dict[str, float]) -> str:
        """Why the vectors are no longer usable ("" while they are): NaN/inf, or a norm far above the vocabulary's."""
        for key, v in vectors.items():
            if not torch.isfinite(v).all():
                return "the vectors became NaN/inf"
            norm = float(v.detach().norm(dim=-1).max())
            if norm > norm_limit[key]:
                return (f"the vectors' norm reached {norm:.3g}, over {NORM_LIMIT_FACTOR:g}x the largest word of the "
                        f"vocabulary ({norm_limit[key] / NORM_LIMIT_FACTOR:.3g})")
        return ""

    def _preview(self, vectors) -> list:
        """Pictures of the fixed preview prompts with fixed seeds, from the same loaded modules."""
        from studio.engine.generate import GenerateRequest, generate

        concept = self._concept(vectors, 0)
        images = []
        for k, prompt in enumerate(self.config.preview_prompts):
            req = GenerateRequest(prompt.replace("{}", self.config.token), concepts=[concept], seed=k, steps=20)
            images.extend(generate(self.model, req).images)
        return images
