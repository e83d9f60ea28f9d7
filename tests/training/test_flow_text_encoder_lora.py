"""`--text-encoder-lora` on SD3 and Flux: pivotal's LoRA learns in the CLIP encoders that the family's diffusers
pipeline loads LoRAs into (`_lora_loadable_modules`: SD3 both CLIPs, Flux CLIP-L; never T5), and diffusers'
`load_lora_weights` draws the studio's picture with the file."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file
from test_flow_training import _generate, _lora_config

from studio.training.trainer import Trainer

CLIPS = {"sd3": {"text_encoder", "text_encoder_2"}, "flux": {"text_encoder"}}


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_pivotal_text_encoder_lora_on_the_clips_draws_what_load_lora_weights_draws(flow_models, flow_model_dirs,
                                                                                    pictures, tmp_path, family):
    """The file holds the transformer's pairs and the CLIPs' (q/k/v/out_proj), no T5; loaded by diffusers it draws
    the studio's picture within 1/255, and without its CLIP parts another one (they learned and are drawn with)."""
    model, out = flow_models[family], tmp_path / "toy.safetensors"
    cfg = _lora_config("pivotal", steps=2, text_encoder_lora=True, text_encoder_lr=0.5)
    learned = Trainer(model, cfg, pictures, out).run()
    tensors = load_file(str(out))
    assert {key.split(".", 1)[0] for key in tensors} == {"transformer"} | CLIPS[family]
    clip_b = [t for k, t in tensors.items() if k.startswith("text_encoder") and ".lora_B." in k]
    assert {k.rsplit(".lora_", 1)[0].rsplit(".", 1)[1] for k in tensors if k.startswith("text_encoder")} == {
        "q_proj", "k_proj", "v_proj", "out_proj"}
    assert max(float(t.abs().max()) for t in clip_b) > 0, "the CLIPs' LoRA learned nothing"
    pipe = DiffusionPipeline.from_pretrained(flow_model_dirs[family])
    pipe.load_lora_weights(str(out))
    ours = _generate(model, "a photo of a toy", [(learned, 1.0)])
    assert np.abs(ours - _diffusers_picture(pipe)).max() <= 1
    pipe.unload_lora_weights()
    pipe.load_lora_weights({k: t for k, t in tensors.items() if k.startswith("transformer.")})
    assert np.abs(ours - _diffusers_picture(pipe)).max() > 1, "without its CLIP parts the file draws the same"


def _diffusers_picture(pipe) -> np.ndarray:
    picture = pipe("a photo of a toy", num_inference_steps=2, width=64, height=64,
                   generator=torch.Generator().manual_seed(1)).images[0]
    return np.asarray(picture, dtype=np.int16)
