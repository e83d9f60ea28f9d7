"""Memory modes: named presets of the options that trade speed for GPU memory, and out-of-memory handling."""

from __future__ import annotations

import gc
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch

from studio.engine.models import LoadOptions, ModelError


@dataclass(frozen=True)
class MemoryPreset:
    name: str
    explanation: str
    attention_slicing: bool = False
    vae_slicing: bool = False
    vae_tiling: bool = False
    offload: str = "none"  # generation: "none" | "model" | "sequential"
    gradient_checkpointing: bool = False  # training
    offload_frozen_after_caching: bool = False  # training: VAE and text encoder leave the GPU once latents are cached


PRESETS: dict[str, MemoryPreset] = {
    "fast": MemoryPreset("fast", "Everything on the GPU with SDPA/xformers attention: fastest, needs the most memory."),
    "balanced": MemoryPreset("balanced", "VAE slicing and gradient checkpointing: a little slower, noticeably smaller.",
                             vae_slicing=True, gradient_checkpointing=True),
    "low-vram": MemoryPreset("low-vram", "Attention and VAE slicing/tiling, model CPU offload, frozen parts off the GPU "
                             "while training: slowest, fits 4-8 GB cards.", attention_slicing=True, vae_slicing=True,
                             vae_tiling=True, offload="model", gradient_checkpointing=True,
                             offload_frozen_after_caching=True),
}
NEXT_SMALLER = {"fast": "balanced", "balanced": "low-vram", "low-vram": None}
AUTO_THRESHOLDS_GIB = ((12.0, "fast"), (7.0, "balanced"))  # free GPU memory -> preset; below both: low-vram


def pick_auto(free_gib: float | None = None) -> MemoryPreset:
    """`auto`: choose by free GPU memory (on a machine without CUDA, `fast`: there is no GPU memory to save)."""
    if free_gib is None:
        if not torch.cuda.is_available():
            return PRESETS["fast"]
        free_gib = torch.cuda.mem_get_info()[0] / 2**30
    for threshold, name in AUTO_THRESHOLDS_GIB:
        if free_gib >= threshold:
            return PRESETS[name]
    return PRESETS["low-vram"]


def preset(name: str) -> MemoryPreset:
    if name == "auto":
        return pick_auto()
    if name not in PRESETS:
        raise ValueError(f"memory mode must be one of auto, {', '.join(PRESETS)}; not {name!r}")
    return PRESETS[name]


def apply_preset(name: str, options: LoadOptions | None = None) -> LoadOptions:
    """`options` with the generation settings of the preset `name` switched on."""
    p = preset(name)
    return replace(options or LoadOptions(), attention_slicing=p.attention_slicing, vae_slicing=p.vae_slicing,
                   vae_tiling=p.vae_tiling, offload=p.offload)


def memory_settings(pipe) -> dict[str, bool]:
    """What is really in effect on a loaded pipeline (offload only happens on CUDA), read from its modules."""
    from diffusers.models.attention_processor import SlicedAttnProcessor

    return {
        "attention_slicing": any(isinstance(p, SlicedAttnProcessor) for p in pipe.unet.attn_processors.values()),
        "vae_slicing": bool(getattr(pipe.vae, "use_slicing", False)),
        "vae_tiling": bool(getattr(pipe.vae, "use_tiling", False)),
        "cpu_offload": hasattr(pipe.unet, "_hf_hook"),  # accelerate's offload hooks
    }


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc))


@contextmanager
def oom_guard(mode: str = "fast"):
    """Turn an out-of-memory error into a ModelError that names the next smaller mode, after freeing memory."""
    try:
        yield
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not _is_oom(exc):
            raise
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        smaller = NEXT_SMALLER.get(mode)
        advice = f"switch the memory mode to '{smaller}'" if smaller else "use a smaller size or batch"
        raise ModelError(f"the GPU ran out of memory in '{mode}' mode: {advice} and try again") from None
