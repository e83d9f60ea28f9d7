"""Generation requests -> images, with their parameters written into each PNG the way A1111 does.

The mode follows from the request: an `init_image` makes it img2img, an `init_image` and a `mask` inpainting,
neither text-to-image. A request's learned things (words, per-layer words, LoRA files, each with a weight) become
one plan (`studio.engine.learned.plan`): the words are per-request data passed to the prompt encoder, so the shared
pipeline, its scheduler and its embedding table are never changed; what the plan does change on the shared modules
(LoRA adapters on the denoiser and text encoders, the attention processors of per-layer words) is entered in one
`ExitStack` under the model's lock and undone when it closes.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import random
import re
import threading
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
from PIL import Image, PngImagePlugin

from studio.engine.families import FAMILIES
from studio.engine.files import atomic_write
from studio.engine.learned import image_prompt
from studio.engine.learned.lora import LoraFile, loras_applied
from studio.engine.learned.plan import RequestPlan, Use, plan_request, uses_of
from studio.engine.learned.word import Concept
from studio.engine.memory import mode_in_effect, oom_guard
from studio.engine.models import pipeline_over
from studio.engine.pictures import MAX_SIDE, SIDE_STEP, scaled, side_limits, working_size

# Seeds go to torch.Generator.manual_seed as a 64-bit integer (2**70 gave torch's "Overflow when unpacking long
# long"); below 2**63 every seed + k of a batch fits a signed 64-bit integer.
SEED_LIMIT = 2**63
RANDOM_SEED = -1  # what a seed field (the UI's, the CLI's --seed) takes for "pick one", as in A1111

# UI name -> (diffusers scheduler class name, config overrides, A1111's sampler name)
SCHEDULERS: dict[str, tuple[str, dict, str]] = {
    "euler_a": ("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    "euler": ("EulerDiscreteScheduler", {}, "Euler"),
    "dpm++_2m": ("DPMSolverMultistepScheduler", {}, "DPM++ 2M"),
    "dpm++_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, "DPM++ 2M Karras"),
    "ddim": ("DDIMScheduler", {}, "DDIM"),
    "pndm": ("PNDMScheduler", {}, "PLMS"),
    "lms": ("LMSDiscreteScheduler", {}, "LMS"),
    "heun": ("HeunDiscreteScheduler", {}, "Heun"),
    "unipc": ("UniPCMultistepScheduler", {}, "UniPC"),
}


# A VAE decode costs about as much as several UNet steps at full size, so the fallback previews this many times
# less often than `preview_every` asks.
VAE_PREVIEW_SLOWDOWN = 2


class Cancelled(Exception):
    """The request was cancelled; no partial result is returned."""


@dataclass
class GenerateRequest:
    prompt: str
    negative_prompt: str = ""
    # Every learned thing the request uses, in one list: a word (`Concept`, `XtiConcept`), a LoRA file (`LoraFile`),
    # each alone (weight 1.0, A1111's default) or as `(thing, weight)`; held as `Use`s. A `<lora:name:w>` tag in the
    # prompt names a LoRA of this list by its stem and sets its weight; tags are taken out before encoding. The words
    # a LoRA file carries (A1111's bundled words, a diffusers pivotal pair's) come with it.
    concepts: list = field(default_factory=list)
    seed: int | None = None  # None or RANDOM_SEED: a random seed, reported in the result; else 0 <= seed < SEED_LIMIT
    steps: int = 20
    guidance: float | None = None  # None: the model family's (`ModelFamily.default_guidance`: Flux 3.5, SD3 7.0, 7.5)
    scheduler: str = "euler_a"  # ignored by a flow model (SD3, Flux), which keeps its own flow-matching scheduler
    width: int | None = None  # None: the model's native size (or the init image's working size); see side_limits
    height: int | None = None
    batch: int = 1
    init_image: Image.Image | None = None  # drawn at studio.engine.pictures.working_size unless width/height say
    strength: float = 0.75
    mask: Image.Image | None = None
    preview_every: int = 5  # on_step gets a preview every N steps (0: never); cheap, see ModelFamily.latent_rgb

    def __post_init__(self) -> None:
        self.concepts: list[Use] = uses_of(self.concepts)

    @property
    def words(self) -> list[Concept]:
        """Its words: those it names, then those its LoRA files carry."""
        words = [use.thing for use in self.concepts if isinstance(use.thing, Concept)]
        carried = [w for use in self.concepts for w in getattr(use.thing, "words", ())]
        return words + [w for w in carried if not any(w is known for known in words)]

    @property
    def loras(self) -> list[tuple[LoraFile, float]]:
        """Its LoRA files with the weights it gives them (a prompt's tag may set another: `plan`)."""
        return [tuple(use) for use in self.concepts if isinstance(use.thing, LoraFile)]

    @property
    def plan(self) -> RequestPlan:
        """What its learned things add to it (`studio.engine.learned.plan`), the prompt parsed once."""
        return plan_request(self.prompt, self.negative_prompt, self.concepts)

    @property
    def mode(self) -> str:
        if self.init_image is None:
            return "txt2img"
        return "inpaint" if self.mask is not None else "img2img"


@dataclass
class GenerateResult:
    images: list[Image.Image]
    seeds: list[int]
    infotexts: list[str]


def native_size(model) -> int:
    """The side, in pixels, `model` (a LoadedModel) was trained at: 512 for SD1 and SD2-base, 768 for SD2, 1024
    for SDXL."""
    # Flux's transformer config has no sample_size; its pipeline's default_sample_size (128) stands for it.
    sample_size = getattr(model.denoiser.config, "sample_size", None) or model.pipe.default_sample_size
    return sample_size * model.pipe.vae_scale_factor


def check_size(width: int | None, height: int | None, native_side: int | None = None, model_name: str = "") -> None:
    """Refuse a width or height that is not a positive multiple of 8 or lies outside `side_limits(native_side)`;
    without a model (`native_side` None), outside what any model allows. None: not asked for, not checked."""
    given = {"width": width, "height": height}
    if any(v is not None and (v <= 0 or v % SIDE_STEP) for v in given.values()):
        raise ValueError(f"width and height have to be positive multiples of {SIDE_STEP} but are {width} and {height}")
    smallest, largest = side_limits(native_side) if native_side else (SIDE_STEP, MAX_SIDE)
    of = f"{model_name} (native {native_side}x{native_side})" if native_side else "any model"
    for name, value in given.items():
        if value is not None and not smallest <= value <= largest:
            raise ValueError(f"{name} {value} is outside {smallest}..{largest}, the sizes {of} draws at; choose a "
                             f"multiple of {SIDE_STEP} in that range")


def check_seed(seed: int | None, batch: int = 1) -> None:
    """Refuse a seed torch cannot take: 0 to SEED_LIMIT - 1 (image k of a batch uses seed + k), or None or
    RANDOM_SEED for a random one."""
    if seed is None or seed == RANDOM_SEED:
        return
    if not 0 <= seed <= SEED_LIMIT - batch:
        batch_note = f" for a batch of {batch} (it uses seed ... seed + {batch - 1})" if batch > 1 else ""
        raise ValueError(f"seed {seed} is out of range{batch_note}: use 0 to {SEED_LIMIT - batch}, or {RANDOM_SEED} "
                         "for a random one")


def validate(model, req: GenerateRequest) -> tuple[int, int, RequestPlan]:
    """Check the request against the model; return (width, height) and its plan. Errors say what to change.

    Nothing is allocated here, so a request for 100000x100000 is refused before any memory is taken. Whether the
    words fit the model is checked once, by the prompt encoder every request passes (`pipeline_kwargs`); every
    other learned thing is checked here (`check_fit`)."""
    if not req.prompt.strip():
        raise ValueError("the prompt is empty: describe what to generate")
    if req.scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {req.scheduler!r}; choose one of: {', '.join(SCHEDULERS)}")
    if not 1 <= req.steps <= 150:
        raise ValueError(f"steps must be between 1 and 150, not {req.steps}")
    if not 1 <= req.batch <= 16:
        raise ValueError(f"batch must be between 1 and 16, not {req.batch}")
    check_seed(req.seed, req.batch)
    if req.preview_every < 0:
        raise ValueError(f"preview_every must be 0 (no previews) or a number of steps, not {req.preview_every}")
    if not 0.0 <= req.strength <= 1.0:
        raise ValueError(f"strength must be between 0 and 1, not {req.strength}")
    plan = req.plan
    for use in req.concepts:
        if not isinstance(use.thing, Concept):  # words: by the prompt encoder, which every request passes
            use.thing.check_fit(model.encoder_dims, model.name)
    native = native_size(model)
    check_size(req.width or None, req.height or None, native, model.name)  # 0 or None: the native size
    width, height = req.width or native, req.height or native
    if req.init_image is not None and not (req.width or req.height):
        # A camera original is drawn scaled down, a 1x1 icon scaled up: the size the model works at.
        width, height = working_size(req.init_image.size, native)
    if req.mask is not None:
        if req.init_image is None:
            raise ValueError("a mask needs the picture it belongs to (init_image)")
        if req.mask.size != req.init_image.size:
            raise ValueError(f"the mask is {req.mask.size[0]}x{req.mask.size[1]} but the picture is "
                             f"{req.init_image.size[0]}x{req.init_image.size[1]}: draw the mask on this picture")
    return width, height, plan


def _scheduler_for(pipe, name: str, objective: str = "noise"):
    """A scheduler of its own for one request: the named one; a flow-matching model (`ModelFamily.objective`)
    keeps its own (SCHEDULERS are DDPM-noise samplers, which flow models cannot use)."""
    import diffusers

    if objective == "flow":
        return type(pipe.scheduler).from_config(pipe.scheduler.config)
    cls_name, overrides, _ = SCHEDULERS[name]
    return getattr(diffusers, cls_name).from_config(pipe.scheduler.config, **overrides)


def infotext(req: GenerateRequest, seed: int, width: int, height: int, model_name: str,
             plan: RequestPlan | None = None, spec=None, scheduler: str | None = None) -> str:
    """The A1111 `parameters` text: prompt, negative prompt, then a line of `Key: value` pairs. `plan`: the
    request's (`req.plan`), when already made. `spec`: the model's family record; a flow model's sampler is
    `scheduler`, the class of its own flow-matching scheduler that drew (the request's sampler is not used), and
    Flux's distilled guidance is written as Forge writes it ("Distilled CFG Scale"), not as a CFG scale."""
    plan = plan or req.plan
    sampler = SCHEDULERS[req.scheduler][2]
    guidance = ("CFG scale", req.guidance)
    if spec is not None and spec.objective == "flow":
        sampler = scheduler
    if spec is not None and spec.guidance == "distilled":
        guidance = ("Distilled CFG Scale", req.guidance)
    items = [("Steps", req.steps), ("Sampler", sampler), guidance,
             ("Seed", seed), ("Size", f"{width}x{height}"), ("Model", model_name)]
    if req.init_image is not None:
        items.append(("Denoising strength", req.strength))
    if req.words:
        items.append(("Concepts", " ".join(c.token for c in req.words)))
    loras = plan.patched(loras_applied)
    if loras:
        items.append(("Lora hashes", '"' + ", ".join(f"{lora.name}: {_short_hash(lora)}" for lora, _ in loras)
                      + '"'))
    images = [tuple(use) for use in req.concepts if isinstance(use.thing, image_prompt.ImageConcept)]
    if images:  # at weight 0 too: its word still became its prompt text
        items.append((image_prompt.INFOTEXT_KEY, image_prompt.infotext_value(images)))
    text = req.prompt
    tagged = {name for name, _ in plan.tags}
    missing = [f"<lora:{lora.name}:{weight:g}>" for lora, weight in loras if lora.name not in tagged]
    if missing:  # A1111 keeps the tags in the prompt: a LoRA given apart from the prompt is written as one
        text = " ".join([text, *missing])
    if req.negative_prompt:
        text += f"\nNegative prompt: {req.negative_prompt}"
    return text + "\n" + ", ".join(f"{k}: {v}" for k, v in items)


def _short_hash(lora: LoraFile) -> str:
    """A1111's short LoRA hash (`Lora hashes:`): the first 12 hex digits of the SHA-256 of the file, of a
    .safetensors file after its header (A1111's `addnet_hash_safetensors`)."""
    return _file_short_hash(str(lora.path), lora.mtime_ns)


@functools.lru_cache(maxsize=64)  # a batch writes one infotext per picture; read each file once
def _file_short_hash(path: str, _mtime_ns: int) -> str:
    data = Path(path).read_bytes()
    if path.lower().endswith(".safetensors") and len(data) >= 8:
        data = data[8 + int.from_bytes(data[:8], "little"):]
    return hashlib.sha256(data).hexdigest()[:12]


def preview_method(model) -> str:
    """How previews of `model` are drawn: "linear" (the family's latent->RGB factors) or "vae" (a full decode).

    The factors fit the VAE that SD 1.x/2.x/XL checkpoints ship with; the demo model's own small VAE, or one whose
    latents are not 4 channels, has no fitted factors, so it is decoded instead."""
    if model.is_demo or model.spec.latent_rgb is None or model.pipe.vae.config.latent_channels != 4:
        return "vae"
    return "linear"


def _keep_x0_prediction(scheduler) -> dict:
    """Make this request's own scheduler keep its latest x0 prediction (`pred_original_sample`) for previews.

    Only the per-request scheduler instance is wrapped, never a shared one or the class. Schedulers that predict no
    x0 (DPM++, UniPC, PLMS) leave `x0` as None and previews show the current noisy latents instead."""
    seen: dict = {"x0": None}
    step = scheduler.step

    # wraps: pipelines pass `generator` only to a step whose signature names it; without it euler_a's noise would
    # come from the global RNG and the seed would no longer fix the picture.
    @functools.wraps(step)
    def step_keeping_x0(*args, return_dict: bool = True, **kwargs):
        out = step(*args, return_dict=True, **kwargs)
        seen["x0"] = getattr(out, "pred_original_sample", None)
        return out if return_dict else out.to_tuple()

    scheduler.step = step_keeping_x0
    return seen


def latent_preview(latents: torch.Tensor, family: str, size: tuple[int, int]) -> Image.Image:
    """The first latent of a batch [B, 4, h, w] as a `size` picture through the family's linear RGB projection."""
    weights, bias = FAMILIES[family].latent_rgb
    rgb = torch.einsum("chw,cr->hwr", latents[0, :4].float().cpu(), torch.tensor(weights)) + torch.tensor(bias)
    pixels = ((rgb + 1.0) * 127.5).clamp(0, 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels, "RGB").resize(size, Image.BILINEAR)


def vae_preview(pipe, latents: torch.Tensor, size: tuple[int, int]) -> Image.Image:
    """The first latent of a batch decoded by the pipeline's VAE (for VAEs without fitted linear factors)."""
    vae = pipe.vae
    if latents.dim() == 3:  # Flux packs 2x2 latent patches into tokens [B, seq, 4C]
        latents = pipe._unpack_latents(latents[:1], size[1], size[0], pipe.vae_scale_factor)
    latent = latents[:1, : vae.config.latent_channels].to(vae.dtype)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    decoded = vae.decode(latent / vae.config.scaling_factor + shift, return_dict=False)[0]
    return pipe.image_processor.postprocess(decoded, output_type="pil")[0].resize(size, Image.BILINEAR)


def _request_pipeline(model, req: GenerateRequest, keep_x0: bool):
    """The mode's view of `model`'s pipeline with a scheduler of its own, sharing every module, and the dict in
    which that scheduler keeps its latest x0 prediction when `keep_x0` (else `{"x0": None}`)."""
    view = {"txt2img": lambda: model.pipe, "img2img": model.img2img, "inpaint": model.inpaint}[req.mode]()
    scheduler = _scheduler_for(view, req.scheduler, model.spec.objective)
    denoised = _keep_x0_prediction(scheduler) if keep_x0 else {"x0": None}
    pipe = pipeline_over(view, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe, denoised


def _step_end(model, req: GenerateRequest, size: tuple[int, int], denoised: dict,
              on_step: Callable[[int, int, Image.Image | None], None] | None, cancel: threading.Event | None):
    """The pipeline's `callback_on_step_end`: stops a cancelled request, and calls `on_step` with a preview every
    `req.preview_every` steps (the VAE fallback every VAE_PREVIEW_SLOWDOWN times that)."""
    method = preview_method(model)
    every = req.preview_every * (VAE_PREVIEW_SLOWDOWN if method == "vae" else 1)

    def step_end(step_pipe, step: int, _t, tensors: dict) -> dict:
        # img2img and inpainting run only the last `strength` part of the schedule.
        total = step_pipe.num_timesteps
        if cancel is not None and cancel.is_set():
            raise Cancelled(f"cancelled at step {step + 1} of {total}")
        if on_step is not None:
            preview = None
            if every and (step + 1) % every == 0:
                # The x0 prediction shows the picture-to-be from the first steps; x_t is mostly noise then.
                latents = denoised["x0"] if denoised["x0"] is not None else tensors["latents"]
                preview = (latent_preview(latents, model.family, size) if method == "linear"
                           else vae_preview(step_pipe, latents, size))
            on_step(step + 1, total, preview)
        return tensors

    return step_end


def _mode_arguments(req: GenerateRequest, width: int, height: int, takes_size: bool = False) -> dict:
    """The pipeline arguments of the request's mode: the size, or the picture (and mask) and the strength; the size
    too where the image-to-image pipeline `takes_size` (Flux's draws at its default size otherwise)."""
    if req.mode == "txt2img":
        return dict(width=width, height=height)
    # The picture and its mask are scaled to the same (working) size; one that already has it is kept as is.
    call = dict(image=scaled(req.init_image.convert("RGB"), (width, height)), strength=req.strength)
    if takes_size:
        call.update(width=width, height=height)
    if req.mode == "inpaint":
        call.update(mask_image=scaled(req.mask.convert("L"), (width, height)), width=width, height=height)
    return call


def generate(model, req: GenerateRequest, *, on_step: Callable[[int, int, Image.Image | None], None] | None = None,
             cancel: threading.Event | None = None) -> GenerateResult:
    """Run one request on `model` (a LoadedModel). Cancel stops within one step and raises `Cancelled`.

    `on_step(step, total, preview)` is called after every denoising step; `preview` is a picture of the first image
    of the batch (its current x0 prediction where the scheduler makes one), at the output size, every
    `req.preview_every` steps (the VAE fallback every VAE_PREVIEW_SLOWDOWN times that), else None."""
    # 1. Check inputs; the plan of what the request's learned things add to it; the family's guidance if unset.
    if req.guidance is None:
        req = replace(req, guidance=model.spec.default_guidance)
    width, height, plan = validate(model, req)
    random_seed = req.seed is None or req.seed == RANDOM_SEED
    base_seed = random.randrange(2**32 - 1) if random_seed else req.seed  # A1111's range of random seeds
    seeds = [base_seed + k for k in range(req.batch)]

    with model.lock, ExitStack() as stack:
        if cancel is not None and cancel.is_set():
            raise Cancelled("cancelled before it started")
        # 2. Pipeline for this request: the mode's view with its own scheduler, sharing every module.
        pipe, denoised = _request_pipeline(model, req, keep_x0=bool(req.preview_every and on_step is not None))
        denoiser = model.spec.denoiser_of(pipe)
        # 3. The plan's patches (LoRA adapters) are on the shared denoiser and text encoders from here to the end of
        # the stack: a LoRA's text-encoder part changes the prompt embeddings, so the prompt is encoded inside.
        plan.enter_patches(model, stack)
        # 4. Prompt embeddings with the words' vectors in their slots (for per-layer words one set per
        # cross-attention layer in `cross_attention_kwargs`: studio.engine.learned.layer_word).
        kwargs = plan.prompt_kwargs(model, denoiser, req.batch, req.guidance)
        # One generator per image, so image k equals a single run with seed + k.
        generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
        call = dict(kwargs, num_inference_steps=req.steps, guidance_scale=req.guidance, generator=generators,
                    num_images_per_prompt=1,
                    callback_on_step_end=_step_end(model, req, (width, height), denoised, on_step, cancel),
                    **_mode_arguments(req, width, height, "width" in inspect.signature(pipe.__call__).parameters))
        # 5. Denoise, with the plan's attention edits on the shared denoiser. Out of memory: the memory is freed and
        # the error names the mode to switch to; the model stays loaded and usable.
        stack.enter_context(oom_guard(mode_in_effect(model.pipe)))
        plan.enter_attention(denoiser, stack)
        stack.enter_context(torch.inference_mode())
        images = pipe(**call).images
    # 6. The parameters, A1111's way, in each picture.
    drew = type(pipe.scheduler).__name__
    texts = [infotext(req, s, width, height, model.name, plan, model.spec, drew) for s in seeds]
    for image, text in zip(images, texts):
        image.info["parameters"] = text
    return GenerateResult(images, seeds, texts)


def save_png(image: Image.Image, path: str | os.PathLike, text: str | None = None) -> Path:
    """Write `image` as PNG with its `parameters` chunk, atomically."""
    path = Path(path)
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text if text is not None else image.info.get("parameters", ""))
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


_SAMPLER_TO_NAME = {v[2]: k for k, v in SCHEDULERS.items()}
# One `Key: value` of the parameters' last line; a value with commas is quoted (A1111's `re_param`).
_INFOTEXT_PAIR = re.compile(r'\s*([\w ]+): ("(?:\\.|[^\\"])+"|[^,]+)(?:,|$)')


def read_infotext(image_or_path) -> dict:
    """Parse an A1111 `parameters` chunk back into GenerateRequest fields (and `concepts` token names; the image
    concepts as `image_concepts`, token -> weight)."""
    image = image_or_path if isinstance(image_or_path, Image.Image) else Image.open(image_or_path)
    text = image.info.get("parameters")
    if not text:
        raise ValueError("this picture carries no generation parameters (no A1111 `parameters` chunk)")
    lines = text.strip().split("\n")
    settings = lines.pop() if re.search(r"(^|, )Steps: ", lines[-1]) else ""
    prompt, negative = [], []
    target = prompt
    for line in lines:
        if line.startswith("Negative prompt:"):
            target = negative
            line = line[len("Negative prompt:"):].strip()
        target.append(line)
    out: dict = {"prompt": "\n".join(prompt), "negative_prompt": "\n".join(negative)}
    pairs = {key: _unquote(value) for key, value in _INFOTEXT_PAIR.findall(settings)}
    if "Steps" in pairs:
        out["steps"] = int(pairs["Steps"])
    for key in ("CFG scale", "Distilled CFG Scale"):  # Forge writes a Flux's guidance as the second
        if key in pairs:
            out["guidance"] = float(pairs[key])
    if "Seed" in pairs:
        out["seed"] = int(pairs["Seed"])
    if "Sampler" in pairs:
        out["scheduler"] = _SAMPLER_TO_NAME.get(pairs["Sampler"].strip(), "euler_a")
    if "Size" in pairs:
        w, h = pairs["Size"].split("x")
        out["width"], out["height"] = int(w), int(h)
    if "Denoising strength" in pairs:
        out["strength"] = float(pairs["Denoising strength"])
    if "Concepts" in pairs:
        out["concepts"] = pairs["Concepts"].split()
    if image_prompt.INFOTEXT_KEY in pairs:
        out["image_concepts"] = image_prompt.read_infotext_value(pairs[image_prompt.INFOTEXT_KEY])
    return out


def _unquote(value: str) -> str:
    """A value as A1111 writes it: quoted (JSON) when it holds commas, else as it is."""
    try:
        return json.loads(value) if value.startswith('"') else value
    except json.JSONDecodeError:
        return value

