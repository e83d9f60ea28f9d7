"""Training on SD3 and Flux (rectified flow): the objective agrees with diffusers' own flow-matching sampler, a word
learns in CLIP's and T5's slots through the same trainer and methods, and what cannot be trained yet says so."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from studio.engine.generate import GenerateRequest, generate
from studio.engine.learned.registry import load_concept
from studio.training.config import TrainConfig
from studio.training.data import TrainError
from studio.training.objectives import FlowMatching, denoising_target
from studio.training.trainer import Trainer


def test_flow_target_is_what_the_flow_sampler_steps_along():
    """x_t and the target noise - x0 follow diffusers' FlowMatchEulerDiscreteScheduler: one Euler step from a
    training sigma with the true target lands on the same line at the next sigma (a sign or a sigma taken from the
    wrong end would not)."""
    config = FlowMatchEulerDiscreteScheduler(shift=3.0).config
    # The sampler unshifted, so that it steps between exactly the sigmas given (the training sigmas carry the shift).
    flow, sampler = FlowMatching(config, 8), FlowMatchEulerDiscreteScheduler.from_config(config, shift=1.0)
    x0, noise = torch.randn(1, 16, 4, 4), torch.randn(1, 16, 4, 4)
    index = torch.tensor([250])
    noisy = flow.add_noise(x0, noise, index)
    sampler.set_timesteps(sigmas=[float(flow.sigmas[250]), 0.1])
    stepped = sampler.step(denoising_target(flow, x0, noise, index), sampler.timesteps[0], noisy).prev_sample
    assert abs(float(sampler.sigmas[0]) - float(flow.sigmas[250])) < 1e-6
    next_sigma = float(sampler.sigmas[1])
    assert torch.allclose(stepped, (1 - next_sigma) * x0 + next_sigma * noise, atol=1e-5)
    assert torch.allclose(flow.add_noise(x0, noise, torch.tensor([0])), noise)  # index 0: pure noise


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_ti_learns_a_word_in_clip_and_t5(flow_models, pictures, tmp_path, family):
    """`ti` on a flow model: every encoder's vectors move from the init word (the gradient reaches T5's slots too),
    the file names the family, and generation uses it."""
    model = flow_models[family]
    cfg = TrainConfig("<my-toy>", init_text="toy", steps=2, batch_size=1, learning_rate=0.05, resolution=32,
                      stop_when_learned=False)
    word = Trainer(model, cfg, pictures, tmp_path / "toy.safetensors").run()
    assert set(word.vectors) == set(model.encoder_dims)
    for key, tok, enc in [(k, model.pipe.components[k.replace("text_encoder", "tokenizer")], model.pipe.components[k])
                          for k in model.encoder_dims]:
        init = enc.get_input_embeddings().weight[tok("toy", add_special_tokens=False).input_ids[0]]
        assert not torch.allclose(word.vectors[key][0], init.float()), key
    back = load_concept(tmp_path / "toy.safetensors")
    assert back.family == family and back.meta["method"] == "ti"
    req = GenerateRequest("a photo of <my-toy>", concepts=[back], seed=1, steps=2, width=64, height=64,
                          preview_every=0)
    assert np.asarray(generate(model, req).images[0]).std() > 0


def test_lora_methods_on_a_flow_model_are_refused_in_one_line(flow_models, pictures, tmp_path):
    cfg = TrainConfig("<my-toy>", init_text="toy", steps=1, batch_size=1, resolution=32, method="pivotal")
    with pytest.raises(TrainError, match=r"^--method pivotal on Flux.1 needs a LoRA on its transformer"):
        Trainer(flow_models["flux"], cfg, pictures, tmp_path / "toy.safetensors").run()
    assert not (tmp_path / "toy.safetensors").exists()
