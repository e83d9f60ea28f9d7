"""Memory modes: named presets of the options that trade speed for GPU memory, and out-of-memory handling."""

from __future__ import annotations

import gc
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Iterator

import torch

from studio.engine.families import family_of_pipe
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

    def explain(self, device: torch.device | str) -> str:
        """What this mode does for a model on `device`, naming that device: the modes trade speed for GPU memory,
        so on the CPU (or Apple's MPS) the explanation says where the model runs instead of promising a GPU."""
        kind = torch.device(device).type
        if kind == "cuda":
            return self.explanation
        return (f"everything runs on the {kind.upper()} (no CUDA GPU); the memory modes trade speed for GPU memory, "
                "so here they change little.")


PRESETS: dict[str, MemoryPreset] = {
    "fast": MemoryPreset("fast", "Everything on the GPU with SDPA/xformers attention: fastest, needs the most memory."),
    "balanced": MemoryPreset("balanced", "VAE slicing and gradient checkpointing: a little slower, noticeably smaller.",
                             vae_slicing=True, gradient_checkpointing=True),
    "low-vram": MemoryPreset("low-vram", "Attention and VAE slicing/tiling, model CPU offload, frozen parts off the GPU "
                             "while training: slowest, fits 4-8 GB cards.", attention_slicing=True, vae_slicing=True,
                             vae_tiling=True, offload="model", gradient_checkpointing=True,
                             offload_frozen_after_caching=True),
}
# Every memory mode a user can ask for: the presets and `auto`, which picks one of them (pick_auto).
MEMORY_MODES = ("auto", *PRESETS)
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
        raise ValueError(f"memory mode must be one of {', '.join(MEMORY_MODES)}; not {name!r}")
    return PRESETS[name]


def apply_preset(name: str, options: LoadOptions | None = None) -> LoadOptions:
    """`options` with the generation settings of the preset `name` switched on."""
    p = preset(name)
    return replace(options or LoadOptions(), attention_slicing=p.attention_slicing, vae_slicing=p.vae_slicing,
                   vae_tiling=p.vae_tiling, offload=p.offload)


def memory_settings(pipe) -> dict[str, bool]:
    """What is really in effect on a loaded pipeline (offload only happens on CUDA), read from its modules."""
    from diffusers.models.attention_processor import SlicedAttnProcessor

    denoiser = family_of_pipe(pipe).denoiser_of(pipe)
    return {
        "attention_slicing": any(isinstance(p, SlicedAttnProcessor) for p in denoiser.attn_processors.values()),
        "vae_slicing": bool(getattr(pipe.vae, "use_slicing", False)),
        "vae_tiling": bool(getattr(pipe.vae, "use_tiling", False)),
        "cpu_offload": hasattr(denoiser, "_hf_hook"),  # accelerate's offload hooks
    }


class OutOfMemory(ModelError):
    """The accelerator (or the CPU) ran out of memory; the message names the memory mode to switch to."""


# Messages of the allocators whose errors are not torch.OutOfMemoryError: CUDA raised plain RuntimeErrors before
# torch 2.5, MPS still does, and the CPU allocator says "not enough memory".
OOM_MESSAGES = ("out of memory", "not enough memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is an out-of-memory error of torch (CUDA, MPS or CPU allocator) or one already turned into an
    `OutOfMemory` advice by this module."""
    if isinstance(exc, (torch.OutOfMemoryError, OutOfMemory, MemoryError)):  # MemoryError: a capped CPU process
        return True
    return isinstance(exc, RuntimeError) and any(text in str(exc) for text in OOM_MESSAGES)


def oom_advice(mode: str) -> str:
    """What to do after running out of memory in memory mode `mode`: the next smaller preset, or a smaller job."""
    smaller = NEXT_SMALLER.get(mode)
    return f"switch the memory mode to '{smaller}'" if smaller else "use a smaller picture size or batch"


def release_memory(exc: BaseException | None = None) -> None:
    """Free what a failed step held: the local tensors of the finished frames in `exc`'s traceback (the
    activations of the layer that ran out; kept alive by the traceback otherwise), then garbage, then CUDA's cache."""
    if exc is not None and exc.__traceback__ is not None:
        traceback.clear_frames(exc.__traceback__)  # frames still running (the callers) are skipped
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def mode_in_effect(pipe) -> str:
    """The memory mode whose generation settings a loaded pipeline has (see `memory_settings`): the smallest preset
    whose slicing and tiling are all on. Offload is left out: it only happens on CUDA."""
    settings = memory_settings(pipe)
    # SD3's and Flux's transformers have no sliced attention (diffusers' enable_attention_slicing passes them by)
    slices = hasattr(family_of_pipe(pipe).denoiser_of(pipe), "set_attention_slice")
    for name in ("low-vram", "balanced"):
        p = PRESETS[name]
        wanted = {"attention_slicing": p.attention_slicing and slices, "vae_slicing": p.vae_slicing,
                  "vae_tiling": p.vae_tiling}
        if all(settings[key] for key, on in wanted.items() if on):
            return name
    return "fast"  # turns nothing on, so any pipeline has its settings


@contextmanager
def oom_guard(mode: str = "fast") -> Iterator[None]:
    """Turn an out-of-memory error into an `OutOfMemory` (a ModelError) that names the next smaller mode, after
    freeing the memory the failed work held. An `OutOfMemory` raised inside (by a nested guard) passes unchanged."""
    try:
        yield
    except (RuntimeError, MemoryError) as exc:  # torch.OutOfMemoryError is a RuntimeError
        if isinstance(exc, OutOfMemory) or not is_out_of_memory(exc):
            raise
        release_memory(exc)
        raise OutOfMemory(f"the model ran out of memory in '{mode}' memory mode: {oom_advice(mode)} and try "
                          "again") from None
