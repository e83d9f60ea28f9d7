"""What the denoiser learns to predict, per family objective (`ModelFamily.objective`): DDPM noise (epsilon or v, SD
1.x/2.x/SDXL) or rectified flow (SD3, Flux). The trainer's loop draws latents, noise and a timestep index the same
way for both; this module turns them into the noisy input, the target and the denoiser's call.

Flow matching as diffusers' train_dreambooth_lora_sd3.py / train_dreambooth_lora_flux.py train it (weighting scheme
"none"): an index drawn uniformly over the scheduler's 1000 training sigmas (SD3's shifted by its config's shift,
Flux's left unshifted because its config shifts dynamically at inference), x_t = (1 - sigma) x0 + sigma noise, the
target noise - x0; SD3's transformer takes the timestep sigma * 1000, Flux's sigma itself, its latents packed into 2x2
patch tokens with their position ids, and its guidance input at 3.5 (the scripts' default for FLUX.1-dev).
"""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import torch

FLUX_TRAINING_GUIDANCE = 3.5  # diffusers' train_dreambooth_lora_flux.py --guidance_scale default (FLUX.1-dev)


def training_noise(model):
    """The noise schedule a `model` (LoadedModel) trains with: DDPM from its scheduler's config, or flow matching."""
    from diffusers import DDPMScheduler

    if model.spec.objective == "flow":
        return FlowMatching(model.pipe.scheduler.config, model.pipe.vae_scale_factor)
    return DDPMScheduler.from_config(model.pipe.scheduler.config)


def denoising_target(schedule, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the denoiser should predict: the noise (epsilon), the velocity (v-prediction), or noise - x0 (flow)."""
    prediction = schedule.config.prediction_type
    if prediction == "flow":
        return noise - x0
    return schedule.get_velocity(x0, noise, t) if prediction == "v_prediction" else noise


def predict(schedule, denoiser, noisy: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, extra: dict):
    """The denoiser's prediction for `noisy` latents at timestep indices `t` (a UNet's or a flow transformer's)."""
    if isinstance(schedule, FlowMatching):
        return schedule.predict(denoiser, noisy, t, embeds, extra)
    return denoiser(noisy, t, embeds, **extra).sample


class FlowMatching:
    """Rectified-flow training over the model's own FlowMatchEulerDiscreteScheduler config (the module docstring)."""

    def __init__(self, scheduler_config, vae_scale_factor: int):
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        self.sigmas = scheduler.sigmas.float()  # [1000], index 0 = pure noise, as the scripts index them
        self.config = SimpleNamespace(num_train_timesteps=scheduler.config.num_train_timesteps,
                                      prediction_type="flow")
        self.vae_scale_factor = vae_scale_factor

    def _sigma(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return self.sigmas.to(like.device)[t].to(like.dtype).view(-1, *([1] * (like.dim() - 1)))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = self._sigma(t, x0)
        return (1.0 - sigma) * x0 + sigma * noise

    def predict(self, transformer, noisy: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, extra: dict):
        sigma = self.sigmas.to(noisy.device)[t].to(noisy.dtype)
        if "txt_ids" not in inspect.signature(transformer.forward).parameters:  # SD3's MMDiT
            return transformer(hidden_states=noisy, timestep=sigma * self.config.num_train_timesteps,
                               encoder_hidden_states=embeds, return_dict=False, **extra)[0]
        from diffusers import FluxPipeline

        b, c, h, w = noisy.shape
        packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
        image_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, noisy.dtype)
        text_ids = torch.zeros(embeds.shape[1], 3, device=noisy.device, dtype=noisy.dtype)
        guidance = (torch.full((b,), FLUX_TRAINING_GUIDANCE, device=noisy.device, dtype=noisy.dtype)
                    if transformer.config.guidance_embeds else None)
        out = transformer(hidden_states=packed, timestep=sigma, guidance=guidance, encoder_hidden_states=embeds,
                          txt_ids=text_ids, img_ids=image_ids, return_dict=False, **extra)[0]
        scale = self.vae_scale_factor
        return FluxPipeline._unpack_latents(out, h * scale, w * scale, scale)
