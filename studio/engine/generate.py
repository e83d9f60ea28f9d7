"""Generation requests -> images, with their parameters written into each PNG the way A1111 does.

The mode follows from the request: an `init_image` makes it img2img, an `init_image` and a `mask` inpainting,
neither text-to-image. Concepts are per-request data passed to the prompt encoder; the shared pipeline, its
scheduler and its embedding table are never changed.
"""

from __future__ import annotations

import os
import random
import re
import tempfile
import threading
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch
from PIL import Image, PngImagePlugin

from studio.engine.concepts import Concept, check_fits

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


class Cancelled(Exception):
    """The request was cancelled; no partial result is returned."""


@dataclass
class GenerateRequest:
    prompt: str
    negative_prompt: str = ""
    concepts: list[Concept] = field(default_factory=list)
    seed: int | None = None  # None: a random seed, reported in the result
    steps: int = 20
    guidance: float = 7.5
    scheduler: str = "euler_a"
    width: int | None = None  # None: the model's native size
    height: int | None = None
    batch: int = 1
    init_image: Image.Image | None = None
    strength: float = 0.75
    mask: Image.Image | None = None

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


def _native_size(model) -> int:
    return model.pipe.unet.config.sample_size * model.pipe.vae_scale_factor


def validate(model, req: GenerateRequest) -> tuple[int, int]:
    """Check the request against the model; return (width, height). Errors say what to change."""
    if not req.prompt.strip():
        raise ValueError("the prompt is empty: describe what to generate")
    if req.scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {req.scheduler!r}; choose one of: {', '.join(SCHEDULERS)}")
    if not 1 <= req.steps <= 150:
        raise ValueError(f"steps must be between 1 and 150, not {req.steps}")
    if not 1 <= req.batch <= 16:
        raise ValueError(f"batch must be between 1 and 16, not {req.batch}")
    if not 0.0 <= req.strength <= 1.0:
        raise ValueError(f"strength must be between 0 and 1, not {req.strength}")
    native = _native_size(model)
    width, height = req.width or native, req.height or native
    if req.init_image is not None and not (req.width or req.height):
        width, height = req.init_image.size
    if width % 8 or height % 8 or width <= 0 or height <= 0:
        raise ValueError(f"width and height have to be positive multiples of 8 but are {width} and {height}")
    if req.mask is not None:
        if req.init_image is None:
            raise ValueError("a mask needs the picture it belongs to (init_image)")
        if req.mask.size != req.init_image.size:
            raise ValueError(f"the mask is {req.mask.size[0]}x{req.mask.size[1]} but the picture is "
                             f"{req.init_image.size[0]}x{req.init_image.size[1]}: draw the mask on this picture")
    for concept in req.concepts:
        check_fits(concept, model.encoder_dims, where=f"concept {concept.token!r}")
    return width, height


def _scheduler_for(pipe, name: str):
    import diffusers

    cls_name, overrides, _ = SCHEDULERS[name]
    return getattr(diffusers, cls_name).from_config(pipe.scheduler.config, **overrides)


def infotext(req: GenerateRequest, seed: int, width: int, height: int, model_name: str) -> str:
    """The A1111 `parameters` text: prompt, negative prompt, then a line of `Key: value` pairs."""
    items = [("Steps", req.steps), ("Sampler", SCHEDULERS[req.scheduler][2]), ("CFG scale", req.guidance),
             ("Seed", seed), ("Size", f"{width}x{height}"), ("Model", model_name)]
    if req.init_image is not None:
        items.append(("Denoising strength", req.strength))
    if req.concepts:
        items.append(("Concepts", " ".join(c.token for c in req.concepts)))
    text = req.prompt
    if req.negative_prompt:
        text += f"\nNegative prompt: {req.negative_prompt}"
    return text + "\n" + ", ".join(f"{k}: {v}" for k, v in items)


def generate(model, req: GenerateRequest, *, on_step: Callable[[int, int, Image.Image | None], None] | None = None,
             cancel: threading.Event | None = None) -> GenerateResult:
    """Run one request on `model` (a LoadedModel). Cancel stops within one step and raises `Cancelled`."""
    # 1. Check inputs.
    width, height = validate(model, req)
    base_seed = req.seed if req.seed is not None else random.randrange(2**32 - 1)
    seeds = [base_seed + k for k in range(req.batch)]

    with model.lock:
        if cancel is not None and cancel.is_set():
            raise Cancelled("cancelled before it started")
        # 2. Pipeline for this request: the mode's view with its own scheduler, sharing every module.
        view = {"txt2img": lambda: model.pipe, "img2img": model.img2img, "inpaint": model.inpaint}[req.mode]()
        pipe = view.__class__(**{**view.components, "scheduler": _scheduler_for(view, req.scheduler)})
        pipe.set_progress_bar_config(disable=True)
        # 3. Prompt embeddings with this request's concepts.
        kwargs = model.encoder.pipeline_kwargs(req.prompt, req.negative_prompt, req.concepts, req.batch, req.guidance)
        # 4. One generator per image, so image k equals a single run with seed + k.
        generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]

        def step_end(_pipe, step: int, _t, tensors: dict) -> dict:
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"cancelled at step {step + 1} of {req.steps}")
            if on_step is not None:
                on_step(step + 1, req.steps, None)
            return tensors

        call = dict(kwargs, num_inference_steps=req.steps, guidance_scale=req.guidance, generator=generators,
                    num_images_per_prompt=1, callback_on_step_end=step_end)
        if req.mode == "txt2img":
            call.update(width=width, height=height)
        else:
            call.update(image=req.init_image.convert("RGB").resize((width, height)), strength=req.strength)
            if req.mode == "inpaint":
                call.update(mask_image=req.mask.convert("L").resize((width, height)), width=width, height=height)
        # 5. Denoise.
        with torch.inference_mode():
            images = pipe(**call).images
    texts = [infotext(req, s, width, height, model.name) for s in seeds]
    for image, text in zip(images, texts):
        image.info["parameters"] = text
    return GenerateResult(images, seeds, texts)


def save_png(image: Image.Image, path: str | os.PathLike, text: str | None = None) -> Path:
    """Write `image` as PNG with its `parameters` chunk, atomically."""
    path = Path(path)
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text if text is not None else image.info.get("parameters", ""))
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        image.save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


_SAMPLER_TO_NAME = {v[2]: k for k, v in SCHEDULERS.items()}


def read_infotext(image_or_path) -> dict:
    """Parse an A1111 `parameters` chunk back into GenerateRequest fields (and `concepts` token names)."""
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
    pairs = dict(m.groups() for m in re.finditer(r"\s*([\w ]+): ([^,]+)(?:,|$)", settings))
    if "Steps" in pairs:
        out["steps"] = int(pairs["Steps"])
    if "CFG scale" in pairs:
        out["guidance"] = float(pairs["CFG scale"])
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
    return out


REQUEST_FIELDS = {f.name for f in fields(GenerateRequest)}
