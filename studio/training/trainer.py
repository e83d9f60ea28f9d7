"""The training loop of every method: the new word's vectors and/or the weights a method adds learn; the rest is frozen.

Reads top to bottom as numbered steps. Events go to `on_event`; a `cancel` event stops it within one step. What
learns and what is saved is the method's (studio/training/methods); the loop is this file's. Prompts are encoded
through the same PromptEncoder that generation uses, with the vectors as a per-request concept, so no token is added
to the tokenizer and no row of the embedding table is touched.

The loop runs through accelerate: `accelerate launch -m studio train ...` trains on several processes (DDP over the
word and the weights, gloo on CPUs). Every process draws the same global batch from the same random streams and
takes its fixed share of it, so N processes x batch B/N compute the update of one process x batch B, and a run
resumes bit for bit whatever the process count. The frozen model runs under the studio's own autocast (the learned
tensors stay fp32), as in generation; accelerate is asked for no mixed precision of its own.
"""

from __future__ import annotations

import math
import random
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from studio.engine.families import encoders_of
from studio.engine.files import OutputError, check_folder, check_new_output
from studio.engine.generate import native_size
from studio.engine.learned.lora_files import pivotal_embeddings
from studio.engine.learned.registry import load_concept
from studio.engine.learned.word import Concept
from studio.engine.memory import is_out_of_memory, oom_advice, release_memory
from studio.engine.names import file_stem, inside
from studio.training.config import TrainConfig, parse_lr_schedule
from studio.training.data import TrainError, check_captions, encode_latents, find_images, load_images
from studio.training.memory import training_memory
from studio.training.objectives import denoising_target, predict, training_noise
from studio.training.resume import (TrainState, check_matches, check_weights, find_checkpoint, load_state,
                                    restore_rngs, save_state, state_path)
from studio.training.templates import TEMPLATES


@contextmanager
def frozen(*modules) -> Iterator[None]:
    """No gradients for the parameters of `modules` inside the block; each parameter's own flag comes back after."""
    modules = [m for m in modules if m is not None]
    # By parameter, not by position: a method adds (and removes) adapter parameters inside the block.
    flags = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    for module in modules:
        module.requires_grad_(False)
    try:
        yield
    finally:
        for param, flag in flags:
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
    weights: dict[str, torch.Tensor] = field(default_factory=dict)  # the live ones (see `Trainer._keep`)
    snapshot: Callable[[int], TrainState] | None = None


@dataclass
class _Run:
    """What a run sets up before its loop (`Trainer._setup`) and the loop works on."""

    images: list
    latents: torch.Tensor
    templates: tuple[str, ...]
    resolution: int
    init: dict[str, torch.Tensor]  # the starting vectors, which `regularization` pulls back towards
    vectors: dict[str, torch.nn.Parameter]  # the word's (empty for lora/dreambooth)
    weights: dict[str, torch.nn.Parameter]  # the method's (empty for ti)
    optimizers: dict[str, torch.optim.Optimizer]  # "word" and/or "weights": each has its own learning rate
    scaler: torch.amp.GradScaler
    accelerator: object  # accelerate.Accelerator
    denoiser: torch.nn.Module | None  # _Denoiser, or accelerate's DDP around it (`Trainer._denoiser`: set once the
    # run exists, whose step and vectors its prompts are encoded with)
    generator: torch.Generator  # noise and timesteps
    rng: random.Random  # pictures and templates
    first: int  # the first step still to do
    lr_at: Callable[[int], float]
    autocast_dtype: torch.dtype | None
    precision: str
    noise_scheduler: object
    class_latents: torch.Tensor | None = None  # prior preservation: the base model's pictures of the class
    norm_limit: dict[str, float] = field(default_factory=dict)
    norm_target: dict[str, float] = field(default_factory=dict)  # keep_norm: the vocabulary's median row norm
    image_words: dict[str, torch.nn.Parameter] = field(default_factory=dict)  # per-image tokens: "image3.<encoder>"
    step: int = 0  # the step being trained (the progressive schedule's clock)
    started: float = 0.0  # when the loop began (time.time()): steps per second, the finished event
    held_back: tuple | None = None  # stop when learned: the fixed draw (latents, noise, timesteps, prompts)
    scores: list[tuple[int, float]] = field(default_factory=list)  # (step, score on the held-back draw)

    @property
    def trainable(self) -> dict[str, torch.nn.Parameter]:
        return {**self.vectors, **self.image_words, **self.weights}


class _Denoiser(torch.nn.Module):
    """What DDP wraps: the UNet that runs, the word's vectors and the text encoders that learn (a text-encoder LoRA),
    one forward from noisy latents and prompts to the UNet's prediction (prompts encoded inside, so the gradients of
    the vectors and of the encoders' LoRA are DDP's to average too)."""

    def __init__(self, unet: torch.nn.Module, vectors: dict[str, torch.nn.Parameter], encode: Callable,
                 encoders: list[torch.nn.Module] = (), schedule=None) -> None:
        super().__init__()
        self.unet = unet
        self.schedule = schedule  # the run's noise schedule: how the denoiser is called (objectives.predict)
        self.words = torch.nn.ParameterDict({name.replace(".", "__"): v for name, v in vectors.items()})
        self.encoders = torch.nn.ModuleList(encoders)
        self._encode = encode  # prompts -> (prompt embeddings, the UNet's extra arguments)

    def forward(self, noisy: torch.Tensor, t: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        embeds, extra = self._encode(prompts)
        return predict(self.schedule, self.unet, noisy, t, embeds, extra)


def _filled(template: str, said: str) -> str:
    """A template or caption with the concept's words in place of `{}` (the paper's lists) or `[name]` (A1111's)."""
    return template.replace("{}", said).replace("[name]", said)


def _by_picture(image_words: dict[str, torch.nn.Parameter]) -> list[dict[str, torch.nn.Parameter]]:
    """Per-image words named "image<i>.<encoder>" -> one `{encoder: vectors}` per picture, in picture order."""
    pictures: dict[int, dict[str, torch.nn.Parameter]] = {}
    for name, vectors in image_words.items():
        picture, key = name.split(".", 1)
        pictures.setdefault(int(picture.removeprefix("image")), {})[key] = vectors
    return [pictures[i] for i in sorted(pictures)]


def image_token(token: str, index: int) -> str:
    """The word of picture `index` in a run with per-image tokens ("a photo of S* with S_i")."""
    return f"<{file_stem(token)}-image{index}>"


@dataclass(frozen=True)
class TrainOutput:
    """Where a run writes: `folder`, and `stem`, the name its files are made from (`<stem>.safetensors` and
    `<stem>-stepN.safetensors` checkpoints; dreambooth: the model folders `<stem>`, `<stem>-stepN`)."""

    folder: Path
    stem: str


def check_train_output(config: TrainConfig, images, out: Path | str, *, overwrite: bool = False) -> TrainOutput:
    """Where a run of `config` on `images` writes, given `out` (a folder, a `.safetensors` file; dreambooth: the
    model folder), checked before any work (`studio train` calls it before loading the model); a UserError
    (OutputError, TrainError) says what the run would destroy and what to do.

    Every output of the run goes through `studio.engine.files.check_new_output`: the final file, the `--save-every`
    checkpoints, pivotal's diffusers words file, the per-image words kept. A plain file where a folder goes is
    refused always, an existing output unless `overwrite` (a folder then only if the studio wrote it). A run that
    resumes from its own final file or checkpoint, in its folder, continues that run and replaces its files. A
    diffusers LoRA (lora) beside a words file that would be read as its words is refused, as `export_lora` refuses it.
    """
    from studio.training.methods import METHOD_CLASSES
    from studio.training.methods.lora import LoraWeights

    method = METHOD_CLASSES[config.method]
    out = Path(out)
    names_a_file = out.suffix.lower() == ".safetensors"
    # 1. The folder and the stem.
    if method.writes_folder:
        if names_a_file:
            raise TrainError(f"{out.name}: dreambooth writes a model folder; give --out a folder path")
        output = TrainOutput(out.parent, out.name)
    elif names_a_file:
        output = TrainOutput(out.parent, out.stem)
    else:
        output = TrainOutput(out, file_stem(config.token))
    check_folder(output.folder)

    # 2. What the run writes: the final file (or folder) and the checkpoints; the files beside them.
    final = inside(output.folder, method.file_name(output.stem))
    saved_at = range(config.save_every, config.steps, config.save_every) if config.save_every else ()
    results = [final] + [inside(output.folder, method.file_name(f"{output.stem}-step{step}")) for step in saved_at]
    files = []
    words = pivotal_embeddings(final)
    if issubclass(method, LoraWeights) and config.lora_format == "diffusers" and words is not None:
        if not method.learns_word:
            raise OutputError(f"{words.name} beside {final.name} would be read as this LoRA's words (diffusers' "
                              "pivotal form): move it away, or give --out another path")
        files.append(words)
    if config.per_image_tokens and config.keep_image_words:
        kept = check_folder(inside(output.folder, f"{output.stem}-image-words"))
        files += [inside(kept, f"{file_stem(image_token(config.token, i))}.safetensors")
                  for i in range(len(find_images(images)))]

    # 3. Each checked; a run that continues its own files in place replaces them.
    overwrite = overwrite or _resumes_in_place(config, output, method)
    for path in results:
        earlier_run = state_path(path).is_file() and path.exists() and path.is_dir() == method.writes_folder
        if earlier_run and not overwrite:  # one that can be continued rather than replaced
            raise OutputError(f"{path} already exists, from an earlier run: pass --resume {path} (and more --steps) "
                              "to continue it, --overwrite to replace it, or give --out another path")
        check_new_output(path, overwrite=overwrite, folder=method.writes_folder, marker=method.folder_marker)
    for path in files:
        check_new_output(path, overwrite=overwrite)
    return output


def _resumes_in_place(config: TrainConfig, output: TrainOutput, method) -> bool:
    """Whether the run resumes from its own final file or a checkpoint of it in its folder (`--resume` continues
    a run where it writes)."""
    if not config.resume:
        return False
    checkpoint = find_checkpoint(config.resume, config.token)
    if checkpoint.parent.resolve() != output.folder.resolve():
        return False
    names = {method.file_name(output.stem)} | {method.file_name(f"{output.stem}-step{n}")
                                               for n in re.findall(r"-step(\d+)", checkpoint.name)}
    return checkpoint.name in names


# Divergence beyond NaN: a vector this many times the norm of the embedding table's largest row has left the space
# the text encoder was trained on. Shared SD 1.5 embeddings that work reach 44x the vocabulary's typical norm
# (0.39): SingleInsert's 43.95, dgtlv2's 10.5 (../shared/compat); a learning rate of 1e6 reaches 5.7e6 in a few
# steps while the loss stays finite. 100x the largest row (demo model: 0.65 -> 65) keeps the first and stops the last.
NORM_LIMIT_FACTOR = 100.0


class Trainer:
    """Learn `config.token` from `images` on a LoadedModel, by `config.method`.

    `out` is a folder (the final file is `<word>.safetensors` in it, the word made file-safe by
    `studio.engine.names.file_stem`) or a `.safetensors` path, which is then the final file; checkpoints are written
    beside it as `<stem>-stepN.safetensors`. For `dreambooth`, `out` is the model folder to write (checkpoints
    `<folder>-stepN` beside it). `check_train_output` checks it here, before any work: a plain file where a folder
    goes and a folder the studio did not write are never replaced; other existing outputs are replaced only with
    `overwrite` (True, the default, serves the studio's own work folders; `studio train` passes its --overwrite).
    """

    def __init__(self, model, config: TrainConfig, images, out: Path | str, *, overwrite: bool = True):
        from studio.training.methods import method_for

        self.model = model
        self.config = config
        self.paths = find_images(images)
        output = check_train_output(config, self.paths, out, overwrite=overwrite)
        self.out_dir, self.file_stem = output.folder, output.stem
        self.method = method_for(self)
        self._accelerator = None  # set by run()

    @property
    def class_word(self) -> str:
        """The class in "a photo of <token> <class>" (lora, dreambooth): `class_word`, else the init words."""
        cfg = self.config
        return cfg.class_word if cfg.class_word is not None else ("" if cfg.init_text == "*" else cfg.init_text)

    def _init_vectors(self, plain: bool = False) -> dict[str, torch.Tensor]:
        """Vectors start from the embeddings of `init_text`'s tokens, repeated or cut to `n_vectors` (none for a
        method that learns no word)."""
        cfg = self.config
        vectors = {}
        if not self.method.learns_word:
            return vectors
        for key, tok, enc in encoders_of(self.model.pipe):
            ids = tok(cfg.init_text, add_special_tokens=False).input_ids or [tok.eos_token_id]
            ids = (ids * cfg.n_vectors)[: cfg.n_vectors]
            table = enc.get_input_embeddings().weight
            vectors[key] = table[torch.tensor(ids, device=table.device)].detach().float().clone()
        return vectors if plain else self.method.init_vectors(vectors)

    def _concept(self, vectors: dict[str, torch.Tensor], step: int) -> Concept | None:
        if not vectors:
            return None
        active = self._active(vectors, max(step, 1))
        return self.method.word({k: v.detach().cpu().clone() for k, v in active.items()}, self.method.meta(step))

    def _active(self, vectors: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        """The vectors the word has at `step`: all of them, or the progressive schedule's count so far (the later
        ones wait at their init-word start, untouched: no gradient reaches them)."""
        if not self.config.progressive:
            return vectors
        from studio.training.config import progressive_schedule

        count = max(n for n, start in progressive_schedule(self.config.progressive) if step > start)
        return {k: v[..., :count, :] for k, v in vectors.items()}

    def _save(self, kept: LastGood, step: int, stem: str, state: TrainState | None = None) -> Path:
        """Write the method's file (or folder) `stem`, with its resume sidecar when `state` is given (else none is
        left). Only the main process writes; the others wait for it."""
        path = inside(self.out_dir, self.method.file_name(stem))
        accelerator = self._accelerator
        if accelerator is None or accelerator.is_main_process:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            path = self.method.save(path, self._concept(kept.vectors, step), kept.weights, step)
            if state is not None:
                save_state(path, state)
            else:
                state_path(path).unlink(missing_ok=True)  # a sidecar of an older run would no longer match
        if accelerator is not None:
            accelerator.wait_for_everyone()
        return path

    def _state(self, step: int, run: _Run) -> TrainState:
        """The run at `step`: what `--resume` needs to go on bit for bit as if it had never stopped (the optimizers'
        moments, the random streams, the loss scale and every trainable tensor)."""
        adam = {}
        for name, param in run.trainable.items():
            for optimizer in run.optimizers.values():
                if param in optimizer.state:
                    adam[name] = {field: value.detach().clone() for field, value in optimizer.state[param].items()}
        return TrainState(step=step, token=self.config.token, base_model=self.model.name, family=self.model.family,
                          dims=dict(self.model.encoder_dims), init=run.init, adam=adam,
                          noise_rng=run.generator.get_state(), data_rng=run.rng.getstate(),
                          scaler=run.scaler.state_dict() if run.scaler.is_enabled() else None,
                          method=self.method.name, scores=list(run.scores),
                          params={k: v.detach().clone() for k, v in run.trainable.items()})

    def _restore(self, state: TrainState, trainable, optimizers, generator, rng, scaler) -> int:
        """Load the optimizers, random streams and loss scale of `state`; return the first step still to do."""
        owner = {id(p): opt for opt in optimizers.values() for group in opt.param_groups for p in group["params"]}
        for key, param in trainable.items():
            if key in state.adam:
                # Adam keeps its step count on the CPU (unless capturable); the moments live by the tensors.
                owner[id(param)].state[param] = {n: v if n == "step" else v.to(param.device)
                                                 for n, v in state.adam[key].items()}
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
              error: Callable[[str], str] | None = None, resumable: bool = False) -> object:
        """End the run early: save the last good state as the final file (with its resume sidecar when
        `resumable`: the run can go on where it was), emit a `kind` event at `step`, then return the result of that
        state (`cancelled`) or raise TrainError (`failed`). `message(file name)` is the event's message, `error`
        the TrainError's (None: the same)."""
        snapshot = kept.snapshot(kept.step) if resumable else None
        path = self._save(kept, kept.step, self.file_stem, snapshot)
        emit(TrainEvent(kind, step=step, total=self.config.steps, path=path, message=message(path.name)))
        if kind == "cancelled":
            return self.method.result(path, self._concept(kept.vectors, kept.step))
        raise TrainError((error or message)(path.name)) from None

    @contextmanager
    def _out_of_memory_fails(self, mode: str, kept: LastGood, emit) -> Iterator[None]:
        """Out of memory anywhere in the block (latent cache, a step, a preview) ends the run as `failed`: the memory
        the failed step held is freed, the last good state is saved (resumable, so the run can go on in the
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
                f"{message}; the state of step {kept.step} was saved to {file} (--resume continues from it)"))

    def _resume_point(self) -> tuple[Path | None, TrainState | None]:
        """The checkpoint `config.resume` names and its state, checked against this run (None, None: a new run)."""
        cfg, model = self.config, self.model
        if not cfg.resume:
            return None, None
        resume_from = find_checkpoint(cfg.resume, cfg.token)
        state = load_state(resume_from)
        check_matches(state, resume_from, token=cfg.token, base_model=model.name, family=model.family,
                      dims=dict(model.encoder_dims), n_vectors=cfg.n_vectors, total_steps=cfg.steps,
                      method=self.method.name)
        return resume_from, state

    def _class_latents(self, savings, resolution: int) -> torch.Tensor | None:
        """Prior preservation: the latents of the base model's pictures of "a photo of a <class>", drawn once and
        kept on disk (studio.training.prior)."""
        cfg, model = self.config, self.model
        if not cfg.prior_preservation:
            return None
        from studio.training.prior import class_pictures

        root = self.out_dir / "class-pictures"
        if self._accelerator.is_main_process:  # one process draws them, the others read them
            class_pictures(model, self.class_prompt, cfg.class_images, root, seed=cfg.seed)
        self._accelerator.wait_for_everyone()
        paths = class_pictures(model, self.class_prompt, cfg.class_images, root, seed=cfg.seed)
        images, _warnings = load_images(paths, resolution)
        return encode_latents(model.pipe.vae, images, False, model.device, model.dtype, savings.latent_batch)

    @property
    def class_prompt(self) -> str:
        return f"a photo of a {self.class_word}".strip()

    def _optimizers(self, vectors, weights) -> dict[str, torch.optim.Optimizer]:
        """AdamW for the word (no decay: it would pull the vectors to zero) and one for the weights (diffusers' 1e-2
        decay; bitsandbytes' 8-bit AdamW when asked and on CUDA), a group per learning rate (the method's
        `weight_groups`: a text-encoder LoRA has its own)."""
        cfg = self.config
        optimizers = {}
        if vectors:
            optimizers["word"] = torch.optim.AdamW(vectors.values(), lr=cfg.learning_rate,
                                                   weight_decay=cfg.weight_decay)
        if weights:
            adam = torch.optim.AdamW
            if cfg.use_8bit_adam:
                if self.model.device.type != "cuda":
                    raise TrainError("8-bit Adam (bitsandbytes) needs a CUDA GPU; train without --use-8bit-adam")
                try:
                    import bitsandbytes
                except ImportError:
                    raise TrainError("8-bit Adam needs bitsandbytes: pip install bitsandbytes, or train without "
                                     "--use-8bit-adam") from None
                adam = bitsandbytes.optim.AdamW8bit
            groups = [{**group, "lr": group["initial_lr"]} for group in self.method.weight_groups(weights)]
            optimizers["weights"] = adam(groups, lr=self.method.unet_lr(), weight_decay=1e-2)
        return optimizers

    def _setup(self, savings, emit, resume_from: Path | None, state: TrainState | None,
               autocast: tuple[torch.dtype | None, str], accelerator) -> _Run:
        """Steps 2 and 3 of `run`: the pictures and their latents, the parameters, optimizers and random streams."""
        cfg, model = self.config, self.model
        # 2. Pictures and the latent cache (each picture encoded once, not every step).
        images, latents, class_latents, resolution = self._pictures(savings, emit)

        # 3. Parameters (the new vectors and the method's weights, in fp32 whatever the model's dtype), optimizers,
        #    random streams.
        generator = torch.Generator(model.device).manual_seed(cfg.seed)  # noise and timesteps
        rng = random.Random(cfg.seed)  # pictures and templates
        weights = self.method.add_weights()
        init, vectors = self._start_vectors(state, resume_from, weights)
        image_words = self._image_words(state, len(images))
        optimizers = self._optimizers({**vectors, **image_words}, weights)
        autocast_dtype, precision = autocast  # from _precision()
        scaler = torch.amp.GradScaler(model.device.type, enabled=precision == "fp16" and model.device.type == "cuda")
        first = 1 if state is None else self._restore(state, {**vectors, **image_words, **weights}, optimizers,
                                                      generator, rng, scaler)
        # A picture's caption is its prompt; "object" / "style" draw one from the paper's lists for pictures
        # without one ("captions" has none: every picture has a caption, checked above).
        run = _Run(images=images, latents=latents, templates=TEMPLATES.get(cfg.template, ()), resolution=resolution,
                   init=init, vectors=vectors, weights=weights, optimizers=optimizers, scaler=scaler,
                   accelerator=accelerator, denoiser=None, generator=generator, rng=rng, first=first,
                   lr_at=parse_lr_schedule(cfg.lr_schedule, cfg.learning_rate, cfg.warmup_steps, cfg.steps),
                   autocast_dtype=autocast_dtype, precision=precision,
                   noise_scheduler=training_noise(model), class_latents=class_latents,
                   image_words=image_words, scores=list(state.scores or []) if state is not None else [])
        run.denoiser = self._denoiser(run)
        run.held_back = self._held_back(run) if cfg.stop_when_learned and self.method.stops_when_learned else None
        return run

    def _pictures(self, savings, emit) -> tuple[list, torch.Tensor, torch.Tensor | None, int]:
        """Step 2 of `run`: the pictures at the training resolution, their latents (and with prior preservation the
        class pictures'), each encoded once; then the memory mode may let the VAE go."""
        cfg, model = self.config, self.model
        pipe = model.pipe
        resolution = cfg.resolution or native_size(model)
        images, warnings = load_images(self.paths, resolution)
        for message in warnings:
            emit(TrainEvent("warning", message=message))
        if cfg.template == "captions":
            check_captions(images)
        latents = encode_latents(pipe.vae, images, cfg.flip, model.device, model.dtype, savings.latent_batch)
        class_latents = self._class_latents(savings, resolution)
        savings.after_latent_cache()
        return images, latents, class_latents, resolution

    def _start_vectors(self, state: TrainState | None, resume_from: Path | None,
                       weights: dict[str, torch.nn.Parameter]) -> tuple[dict[str, torch.Tensor],
                                                                         dict[str, torch.nn.Parameter]]:
        """The word's vectors at step 0 (`init`, which `regularization` pulls back towards) and the trainable ones: the
        init words' in a new run; a resumed run's from its checkpoint, which also puts the method's weights back."""
        cfg, model = self.config, self.model
        if state is None:
            init = self._init_vectors()
            return init, {k: torch.nn.Parameter(v.clone()) for k, v in init.items()}
        init = {k: v.to(model.device) for k, v in state.init.items()}
        if state.params:
            check_weights(state, {name: param.shape for name, param in weights.items()}, resume_from)
            start = {k: state.params[k].to(device=model.device, dtype=torch.float32) for k in init}
            with torch.no_grad():
                for name, param in weights.items():
                    param.copy_(state.params[name])
        else:  # a sidecar from before the weight-tuning methods: the vectors are in the concept file
            saved = load_concept(resume_from, token=cfg.token)
            start = {k: v.to(device=model.device, dtype=torch.float32) for k, v in saved.vectors.items()}
        return init, {k: torch.nn.Parameter(v) for k, v in start.items()}

    def _image_words(self, state: TrainState | None, pictures: int) -> dict[str, torch.nn.Parameter]:
        """Per-image tokens: one vector per picture and encoder ("image<i>.<encoder>"), from the init words' first
        token (a resumed run's from its checkpoint); none without `per_image_tokens`."""
        if not self.config.per_image_tokens:
            return {}
        plain = self._init_vectors(plain=True)
        image_words = {}
        for i in range(pictures):
            for key, v in plain.items():
                name = f"image{i}.{key}"
                value = state.params[name] if state is not None and state.params else v[:1]
                image_words[name] = torch.nn.Parameter(value.to(device=self.model.device, dtype=torch.float32).clone())
        return image_words

    def _denoiser(self, run: _Run) -> torch.nn.Module:
        """The module the loss runs (`_Denoiser`: prompts encoded with the word of the step, `_active`), inside
        accelerate's DDP when there are several processes."""
        # The per-image words hold their Parameters themselves (no view of them), so they serve every batch.
        others = [Concept(image_token(self.config.token, i), words, {})
                  for i, words in enumerate(_by_picture(run.image_words))]

        def encode(prompts: list[str]):
            return self.method.encode(prompts, self._active(run.vectors, max(run.step, 1)), run.resolution, others)

        denoiser = _Denoiser(self.method.unet, {**run.vectors, **run.image_words}, encode,
                             self.method.learning_encoders(), run.noise_scheduler)
        if run.accelerator.num_processes > 1:  # DDP; one process: the module itself (the model manager placed it)
            denoiser = run.accelerator.prepare_model(denoiser, device_placement=False)
        return denoiser

    HELD_BACK = 8  # pictures in stop-when-learned's fixed draw (each latent at least once up to this many)

    def _held_back(self, run: _Run) -> tuple:
        """Stop when learned's fixed draw: latents in order, noise from its own generator, timesteps evenly over
        the schedule, each picture's caption or the templates in order; the same for every process and every
        resume, and no draw from the training streams."""
        cfg = self.config
        count = min(2 * self.HELD_BACK, max(self.HELD_BACK, len(run.latents)))
        idx = [k % len(run.latents) for k in range(count)]
        x0 = run.latents[idx]
        generator = torch.Generator(x0.device).manual_seed(cfg.seed + 7919)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        steps = run.noise_scheduler.config.num_train_timesteps
        t = torch.linspace(0.05 * steps, 0.95 * steps, count, device=x0.device).long()
        phrase = self.method.phrase()
        templates = run.templates or ("{}",)
        prompts = [_filled(run.images[i // (2 if cfg.flip else 1)].caption or templates[k % len(templates)], phrase)
                   for k, i in enumerate(idx)]
        return run.noise_scheduler.add_noise(x0, noise, t), noise, t, prompts, x0

    def _score(self, run: _Run) -> float:
        """The denoising error on the held-back draw (lower is better), with no gradient."""
        noisy, noise, t, prompts, x0 = run.held_back
        with torch.no_grad(), torch.autocast(self.model.device.type, dtype=run.autocast_dtype,
                                             enabled=run.autocast_dtype is not None):
            pred = run.denoiser(noisy, t, prompts)
        target = denoising_target(run.noise_scheduler, x0, noise, t)
        value = torch.nn.functional.mse_loss(pred.float(), target.float())
        return float(run.accelerator.reduce(value.detach(), reduction="mean"))

    def _learned(self, run: _Run) -> bool:
        """Whether the best of the last `stop_window` scores is no more than `stop_threshold` below the best
        before them (DVAR's "loss is informative" line: the word has stopped getting better)."""
        cfg, values = self.config, [value for _step, value in run.scores]
        if len(values) <= cfg.stop_window:
            return False
        before, recent = min(values[:-cfg.stop_window]), min(values[-cfg.stop_window:])
        return recent > before * (1 - cfg.stop_threshold)

    def _draw(self, run: _Run, latents: torch.Tensor, count: int, prompt_of: Callable[[int], str]):
        """One global batch of `count`: which latents (from `run.rng`), their prompts, noise and timesteps (from
        `run.generator`), in that order, so that a resumed run and any process count draw the same ones."""
        idx = [run.rng.randrange(len(latents)) for _ in range(count)]
        prompts = [prompt_of(i) for i in idx]
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=run.generator, device=x0.device, dtype=x0.dtype)
        t = torch.randint(0, run.noise_scheduler.config.num_train_timesteps, (count,),
                          generator=run.generator, device=x0.device)
        return x0, prompts, noise, t

    def _loss(self, run: _Run) -> torch.Tensor:
        """The denoising loss of this process's share of one global batch (with prior preservation: plus the
        weighted loss of as many class pictures)."""
        cfg, model = self.config, self.model
        phrase = self.method.phrase()

        def prompt_of(i: int) -> str:
            picture = i // (2 if cfg.flip else 1)
            said = f"{phrase} with {image_token(cfg.token, picture)}" if run.image_words else phrase
            return _filled(run.images[picture].caption or run.rng.choice(run.templates), said)

        x0, prompts, noise, t = self._draw(run, run.latents, cfg.batch_size, prompt_of)
        parts = [(x0, prompts, noise, t)]
        if run.class_latents is not None:
            parts.append(self._draw(run, run.class_latents, cfg.batch_size, lambda _i: self.class_prompt))
        accelerator = run.accelerator
        share = cfg.batch_size // accelerator.num_processes
        mine = slice(accelerator.process_index * share, (accelerator.process_index + 1) * share)
        parts = [(x[mine], p[mine], n[mine], tt[mine]) for x, p, n, tt in parts]
        x0 = torch.cat([part[0] for part in parts])
        noise = torch.cat([part[2] for part in parts])
        t = torch.cat([part[3] for part in parts])
        prompts = [prompt for part in parts for prompt in part[1]]
        noisy = run.noise_scheduler.add_noise(x0, noise, t)
        with torch.autocast(model.device.type, dtype=run.autocast_dtype, enabled=run.autocast_dtype is not None):
            pred = run.denoiser(noisy, t, prompts)
        target = denoising_target(run.noise_scheduler, x0, noise, t)
        errors = (pred.float() - target.float()).square().flatten(1).mean(1)
        loss = errors[:share].mean()
        if run.class_latents is not None:
            loss = loss + cfg.prior_weight * errors[share:].mean()
        if cfg.regularization and run.vectors:
            loss = loss + cfg.regularization * sum((run.vectors[k] - run.init[k]).square().mean() for k in run.vectors)
        return loss

    def _step(self, run: _Run, step: int, kept: LastGood, emit) -> tuple[float, float]:
        """One training step: the learning rate, the loss (over `gradient_accumulation` batches), the update;
        returns (loss, lr). A loss that is not finite, or vectors that left the vocabulary's space (`_exploded`),
        end the run as `failed` with the state of the step before saved, without a resume sidecar."""
        cfg, scaler, accelerator = self.config, run.scaler, run.accelerator
        run.step = step
        lr = run.lr_at(step - 1)
        scale = lr / cfg.learning_rate if cfg.learning_rate else 1.0  # the schedule's shape, for the weights too
        stepping = {"word": True, "weights": self.method.weights_learn(step)}
        for name, optimizer in run.optimizers.items():
            for group in optimizer.param_groups:
                group["lr"] = lr if name == "word" else group["initial_lr"] * scale
        for optimizer in run.optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(cfg.gradient_accumulation):
            with accelerator.accumulate(run.denoiser):
                loss = self._loss(run)
                accelerator.backward(scaler.scale(loss))  # divided by the accumulation count there
            total += loss.detach().float() / cfg.gradient_accumulation
        value = float(accelerator.reduce(total, reduction="mean"))  # every process decides on the same loss
        if not math.isfinite(value):
            self._stop("failed", step, kept, emit, message=lambda file: (
                f"the loss became {value} at step {step}: lower the learning rate (now {lr:g}) or train in fp32 "
                f"(mixed precision now {run.precision}); the last good state was saved to {file}"),
                error=lambda file: (f"training diverged at step {step} (loss {value}): lower the learning rate "
                                    f"(now {lr:g}); the state of step {step - 1} was saved to {file}"))
        for optimizer in run.optimizers.values():
            scaler.unscale_(optimizer)
        norm = float(torch.nn.utils.clip_grad_norm_(list(run.trainable.values()), cfg.max_grad_norm))
        if not math.isfinite(norm) and not scaler.is_enabled():  # fp16's scaler skips such a step by itself
            # Before any update: the tensors are still the last good ones, so nothing needs a copy to restore.
            self._stop("failed", step, kept, emit, message=lambda file: (
                f"the gradients became {norm} at step {step}: lower the learning rate (now {lr:g}, weights "
                f"{self.method.unet_lr():g}); the state of step {step - 1} was saved to {file}"))
        for name, optimizer in run.optimizers.items():
            if stepping[name]:
                scaler.step(optimizer)
        scaler.update()
        if cfg.keep_norm:
            with torch.no_grad():
                for key, v in run.vectors.items():
                    v.mul_(run.norm_target[key] / v.norm(dim=-1, keepdim=True).clamp_min(1e-12))
        exploded = self._exploded(run.vectors, run.norm_limit)
        if exploded:
            with torch.no_grad():
                for k, param in run.vectors.items():
                    param.copy_(kept.vectors[k])
            self._stop("failed", step, kept, emit, message=lambda file: (
                f"training diverged at step {step}: {exploded}; lower the learning rate (now {lr:g}); the state of "
                f"step {step - 1} was saved to {file}"))
        return value, lr

    def _keep(self, kept: LastGood, run: _Run, step: int) -> None:
        """The state after `step`: a copy of the vectors (a later step that sends them out of the vocabulary's space
        puts them back), the live weights (finite gradients give a finite update, checked before it)."""
        kept.step = step
        kept.vectors = {k: v.detach().clone() for k, v in run.vectors.items()}
        kept.weights = dict(run.weights)

    def run(self, on_event: Callable[[TrainEvent], None] | None = None,
            cancel: threading.Event | None = None):
        """Train; emits events to `on_event`; returns what was learned (also written to `out_dir`): a Concept (ti),
        a LoraFile (pivotal, lora) or the model folder's Path (dreambooth)."""
        emit = on_event or (lambda _e: None)
        cfg, model = self.config, self.model
        pipe = model.pipe

        # 1. What to continue from, checked before any work is done; the processes.
        resume_from, state = self._resume_point()
        autocast = self._precision()
        accelerator = self._accelerator = self._processes()
        encoders = [encoder for _, _, encoder in encoders_of(pipe)]
        kept = LastGood()
        with model.lock, training_memory(pipe, cfg.memory) as savings, frozen(model.denoiser, pipe.vae, *encoders), \
                self._out_of_memory_fails(savings.preset.name, kept, emit), self.method.training_context():
            try:
                # 2. Pictures and their latents; 3. parameters, optimizers, random streams.
                run = self._setup(savings, emit, resume_from, state, autocast, accelerator)
                emit(self._started(run, savings, resume_from))
                self._set_norm_limits(run)

                # 4. The loop.
                last, cancelled = self._loop(run, savings, kept, emit, cancel)
                if cancelled:
                    return self._stop("cancelled", last, kept, emit, resumable=True, message=lambda _file: (
                        f"cancelled; the state of step {last} saved (resumable)"))

                # 5. The final file (resumable too: a later run can ask for more steps).
                path = self._save(kept, last, self.file_stem, kept.snapshot(last))
                self._save_image_words(run, last)
                result = self.method.result(path, self._concept(kept.vectors, last))
            finally:
                self.method.remove_weights()
        converged = ""
        if last < cfg.steps:
            converged = (f"; converged at step {last}: the held-back score improved less than "
                         f"{cfg.stop_threshold:.0%} over the last {cfg.stop_window * cfg.stop_every} steps")
        emit(TrainEvent("finished", step=last, total=cfg.steps, path=path,
                        message=f"{last - run.first + 1} steps in {time.time() - run.started:.1f}s{converged}"))
        return result

    def _processes(self):
        """accelerate's Accelerator of the run (one process, or each of `accelerate launch`'s), checked to split the
        batch evenly."""
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        cfg = self.config
        # A learning text encoder's last layer may take no part in the loss (SDXL's first encoder gives its
        # penultimate layer), which DDP must be told, as diffusers' SDXL LoRA script does.
        unused = [DistributedDataParallelKwargs(find_unused_parameters=True)] if self.method.learning_encoders() else []
        accelerator = Accelerator(cpu=self.model.device.type == "cpu", kwargs_handlers=unused,
                                  gradient_accumulation_steps=cfg.gradient_accumulation)
        if cfg.batch_size % accelerator.num_processes:
            raise TrainError(f"batch {cfg.batch_size} does not split over {accelerator.num_processes} processes: "
                             f"give --batch a multiple of {accelerator.num_processes}")
        return accelerator

    def _started(self, run: _Run, savings, resume_from: Path | None) -> TrainEvent:
        """The `started` event: the method and what learns, the pictures, memory mode, precision and processes."""
        resumed = f"; resumed from {resume_from.name} at step {run.first - 1}" if resume_from else ""
        savings_text = ", ".join(savings.applied) or "none"
        learns = ", ".join(part for part, have in (("the word", run.vectors), ("the weights", run.weights)) if have)
        processes = run.accelerator.num_processes
        processes_text = f"; {processes} processes" if processes > 1 else ""
        return TrainEvent("started", step=run.first - 1, total=self.config.steps,
                          message=f"{self.method.name} (learning {learns}): {len(run.images)} pictures, "
                                  f"{len(run.latents)} latents; memory mode {savings.preset.name} (savings: "
                                  f"{savings_text}); precision {run.precision}{processes_text}{resumed}")

    def _set_norm_limits(self, run: _Run) -> None:
        """The divergence guard's limit per encoder (NORM_LIMIT_FACTOR x the vocabulary's largest row) and, with
        keep_norm, the norm the vectors are held at (the median row's)."""
        norms = self._vocabulary_norms()
        run.norm_limit = {key: NORM_LIMIT_FACTOR * float(n.max()) for key, n in norms.items()}
        if self.config.keep_norm:
            run.norm_target = {key: float(n.median()) for key, n in norms.items()}

    def _loop(self, run: _Run, savings, kept: LastGood, emit, cancel: threading.Event | None) -> tuple[int, bool]:
        """Step 4 of `run`: the steps from `run.first`, each followed by its event and, when due, a score (stop when
        learned), a checkpoint and a preview. Returns the last step done and whether a cancel ended the loop."""
        cfg = self.config
        kept.snapshot = lambda step: self._state(step, run)
        self._keep(kept, run, run.first - 1)
        run.started = time.time()
        if run.held_back is not None and not run.scores:
            self._take_score(run, 0, emit)
        for step in range(run.first, cfg.steps + 1):
            if cancel is not None and cancel.is_set():
                return step - 1, True
            loss, lr = self._step(run, step, kept, emit)
            self._keep(kept, run, step)
            rate = (step - run.first + 1) / max(1e-9, time.time() - run.started)
            emit(TrainEvent("step", step=step, total=cfg.steps, loss=loss, lr=lr, steps_per_s=rate,
                            eta_s=(cfg.steps - step) / rate))
            if run.held_back is not None and step % cfg.stop_every == 0:
                self._take_score(run, step, emit)
                if step < cfg.steps and self._learned(run):
                    return step, False
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                path = self._save(kept, step, f"{self.file_stem}-step{step}", kept.snapshot(step))
                emit(TrainEvent("checkpoint", step=step, total=cfg.steps, path=path))
            if cfg.preview_every and step % cfg.preview_every == 0:
                with savings.vae_back():
                    emit(TrainEvent("preview", step=step, total=cfg.steps, images=self._preview(kept.vectors)))
        return cfg.steps, False

    def _take_score(self, run: _Run, step: int, emit) -> None:
        """Score the run on the held-back draw at `step`, keep it and emit it."""
        run.scores.append((step, self._score(run)))
        emit(TrainEvent("score", step=step, total=self.config.steps, loss=run.scores[-1][1]))

    def _save_image_words(self, run: _Run, step: int) -> None:
        """keep_image_words: each picture's word as a concept file in `<name>-image-words/` (for inspection)."""
        if not (self.config.keep_image_words and run.image_words):
            return
        if self._accelerator is not None and not self._accelerator.is_main_process:
            return
        from studio.engine.learned.registry import save_concept

        folder = inside(self.out_dir, f"{self.file_stem}-image-words")
        for i, words in enumerate(_by_picture(run.image_words)):
            token = image_token(self.config.token, i)
            vectors = {key: v.detach().cpu().clone() for key, v in words.items()}
            meta = {**self.method.meta(step), "picture": run.images[i].path.name}
            save_concept(Concept(token, vectors, meta), inside(folder, f"{file_stem(token)}.safetensors"))

    def _vocabulary_norms(self) -> dict[str, torch.Tensor]:
        """Per encoder: the norm of every row of its embedding table (the divergence guard's limit is
        NORM_LIMIT_FACTOR times the largest; keep_norm holds the vectors at the median)."""
        return {key: enc.get_input_embeddings().weight.detach().float().norm(dim=1)
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
        """Pictures of the fixed preview prompts with fixed seeds, from the same loaded modules (the run's LoRA is
        the UNet's active adapter; dreambooth's learning UNet stands in for the shared one meanwhile)."""
        from studio.engine.generate import GenerateRequest, generate

        concept = self.method.preview_concept(self._concept(vectors, 0))
        pipe, attribute = self.model.pipe, self.model.spec.denoiser
        shared = getattr(pipe, attribute)
        images = []
        try:
            setattr(pipe, attribute, self.method.unet)
            for k, prompt in enumerate(self.config.preview_prompts):
                req = GenerateRequest(prompt.replace("{}", self.method.phrase()),
                                      concepts=[concept] if concept is not None else [], seed=k, steps=20)
                images.extend(generate(self.model, req).images)
        finally:
            setattr(pipe, attribute, shared)
        return images
