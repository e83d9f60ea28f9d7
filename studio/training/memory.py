"""Memory savings for Textual Inversion, picked by the same presets as generation (studio.engine.memory).

What makes sense when only a few input vectors learn:
- gradient checkpointing on the text encoder layers and the UNet blocks: the gradient reaches the vectors through
  the UNet's cross-attention and then the text encoder, so both backward passes are needed and both can recompute
  their activations instead of keeping them;
- attention slicing in the UNet (low-vram);
- the VAE is used once, for the latent cache (one picture at a time with VAE slicing), then leaves the accelerator.
Everything is applied for the length of a `with` block and undone in `finally`: the loaded model is shared with
generation and must come back as it was.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch

from studio.engine.memory import MemoryPreset, preset as memory_preset
from studio.engine.families import encoders_of, family_of_pipe


@dataclass
class TrainingMemory:
    """The savings in force for one run, and what to restore afterwards."""

    preset: MemoryPreset
    pipe: object
    applied: list[str] = field(default_factory=list)  # human-readable, for the "started" event
    _undo: list = field(default_factory=list)  # callables run in reverse order on exit
    _vae_device: torch.device | None = None

    @property
    def latent_batch(self) -> int:
        """Pictures per VAE call when building the latent cache (1 with VAE slicing)."""
        return 1 if self.preset.vae_slicing else 8

    def _text_encoders(self) -> list:
        return [encoder for _, _, encoder in encoders_of(self.pipe)]

    def _checkpoint_text_encoders(self) -> None:
        for encoder in self._text_encoders():
            was_on, modes = encoder.is_gradient_checkpointing, {m: m.training for m in encoder.modules()}
            encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            # transformers recomputes a layer only in training mode; CLIP's dropouts are 0, so this changes no value.
            encoder.train()

            def undo(encoder=encoder, was_on=was_on, modes=modes) -> None:
                if not was_on:
                    encoder.gradient_checkpointing_disable()
                for module, mode in modes.items():
                    module.training = mode
            self._undo.append(undo)

    def _checkpoint_unet(self) -> None:
        unet = family_of_pipe(self.pipe).denoiser_of(self.pipe)
        if not unet.is_gradient_checkpointing:
            unet.enable_gradient_checkpointing()
            self._undo.append(unet.disable_gradient_checkpointing)

    def _slice_attention(self) -> None:
        unet = family_of_pipe(self.pipe).denoiser_of(self.pipe)
        before = dict(unet.attn_processors)
        unet.set_attention_slice("auto")
        self._undo.append(lambda: unet.set_attn_processor(before))

    def apply(self) -> None:
        """Switch on the preset's training savings (undone by `restore`)."""
        if self.preset.gradient_checkpointing:
            self._checkpoint_text_encoders()
            self._checkpoint_unet()
            self.applied.append("gradient checkpointing (text encoder and UNet)")
        if self.preset.attention_slicing:
            self._slice_attention()
            self.applied.append("attention slicing")
        if self.preset.vae_slicing:
            self.applied.append("VAE one picture at a time")

    def after_latent_cache(self) -> None:
        """The VAE is not needed by the loop: move it off the accelerator until the run ends."""
        vae = self.pipe.vae
        hooked = hasattr(vae, "_hf_hook")  # under model CPU offload, accelerate already moves it
        if not self.preset.offload_frozen_after_caching or hooked or vae.device.type == "cpu":
            return
        self._vae_device = vae.device
        vae.to("cpu")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.applied.append("VAE moved to the CPU after the latent cache")

    @contextmanager
    def vae_back(self) -> Iterator[None]:
        """Bring the VAE back for a preview, and send it away again."""
        device = self._vae_device
        if device is None:
            yield
            return
        self.pipe.vae.to(device)
        try:
            yield
        finally:
            self.pipe.vae.to("cpu")

    def restore(self) -> None:
        """Undo everything `apply` and `after_latent_cache` changed."""
        if self._vae_device is not None:
            self.pipe.vae.to(self._vae_device)
            self._vae_device = None
        while self._undo:
            self._undo.pop()()


@contextmanager
def training_memory(pipe, mode: str) -> Iterator[TrainingMemory]:
    """Apply memory mode `mode` (one of studio.engine.memory.MEMORY_MODES) to `pipe` for a training run."""
    savings = TrainingMemory(memory_preset(mode), pipe)
    try:
        savings.apply()
        yield savings
    finally:
        savings.restore()
