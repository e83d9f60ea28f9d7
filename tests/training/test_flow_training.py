"""Training on SD3 and Flux (rectified flow): the objective agrees with diffusers' own flow-matching sampler, a word
learns in CLIP's and T5's slots through the same trainer and methods, pivotal and DreamBooth-LoRA train a LoRA on
the transformer's attention that diffusers' `load_lora_weights` reads, and resume bit for bit."""

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


def _lora_config(method: str, **kw) -> TrainConfig:
    base = dict(init_text="toy", steps=4, batch_size=1, seed=1, resolution=32, method=method, unet_lr=5e-2, rank=2,
                learning_rate=0.05, stop_when_learned=False)
    return TrainConfig("<my-toy>", **{**base, **kw})


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_pivotal_file_is_diffusers_form_and_draws_what_load_lora_weights_draws(flow_models, flow_model_dirs,
                                                                                pictures, tmp_path, family):
    """pivotal on a transformer: LoRA pairs on the attention's to_q/to_k/to_v/to_out.0 under `transformer.` keys,
    the word beside it in the family's words-file names; diffusers' `load_lora_weights(file)` draws the studio's
    picture with the same LoRA (within 1/255), and the LoRA learned something."""
    from diffusers import DiffusionPipeline
    from safetensors.torch import load_file

    from studio.engine.families import FAMILIES

    model, out = flow_models[family], tmp_path / "toy.safetensors"
    learned = Trainer(model, _lora_config("pivotal"), pictures, out).run()
    keys = load_file(str(out))
    assert keys and all(k.startswith("transformer.") for k in keys)
    assert {k.split(".attn.")[1].rsplit(".lora_", 1)[0] for k in keys} == {"to_q", "to_k", "to_v", "to_out.0"}
    assert set(load_file(str(tmp_path / "toy_emb.safetensors"))) == set(FAMILIES[family].file_names)
    assert learned.kind == "word+lora" and learned.families == (family,) and learned.words[0].token == "<my-toy>"
    pipe = DiffusionPipeline.from_pretrained(flow_model_dirs[family])
    pipe.load_lora_weights(str(out))
    theirs = pipe("a photo of a toy", num_inference_steps=2, width=64, height=64,
                  generator=torch.Generator().manual_seed(1)).images[0]
    ours = _generate(model, "a photo of a toy", [(learned, 1.0)])
    assert np.abs(ours - np.asarray(theirs, dtype=np.int16)).max() <= 1
    assert np.abs(ours - _generate(model, "a photo of a toy")).max() > 0, "the LoRA learned nothing"


def _generate(model, prompt, concepts=()) -> np.ndarray:
    req = GenerateRequest(prompt, concepts=list(concepts), seed=1, steps=2, width=64, height=64, preview_every=0)
    return np.asarray(generate(model, req).images[0], dtype=np.int16)


@pytest.mark.parametrize("family, method", [("flux", "lora"), ("sd3", "pivotal")])
def test_lora_methods_on_a_flow_model_resume_bit_for_bit(flow_models, pictures, tmp_path, family, method):
    """Guards against losing the transformer LoRA's weights, their Adam moments or the random streams on resume."""
    import threading

    from studio.training.resume import load_state, state_path

    model = flow_models[family]
    Trainer(model, _lora_config(method), pictures, tmp_path / "straight.safetensors").run()
    cancel = threading.Event()
    stop = lambda e: cancel.set() if e.kind == "step" and e.step == 2 else None  # noqa: E731
    Trainer(model, _lora_config(method, save_every=2), pictures, tmp_path / "parts.safetensors").run(stop, cancel)
    checkpoint = tmp_path / "parts-step2.safetensors"
    assert state_path(checkpoint).is_file()
    resumed = _lora_config(method, resume=str(checkpoint))
    Trainer(model, resumed, pictures, tmp_path / "parts.safetensors").run()
    want, got = (load_state(tmp_path / f"{n}.safetensors").params for n in ("straight", "parts"))
    assert want.keys() == got.keys() and any(k.startswith("transformer.") for k in want)
    assert max(float((want[k] - got[k]).abs().max()) for k in want) <= 1e-6
    assert max(float((want[k] - load_state(checkpoint).params[k]).abs().max()) for k in want) > 1e-6


def test_kohya_form_on_a_flow_model_is_refused_in_one_line(flow_models, pictures, tmp_path):
    cfg = _lora_config("pivotal", steps=1, lora_format="kohya")
    with pytest.raises(TrainError, match=r"^--lora-format kohya on Flux.1: .* --lora-format diffusers"):
        Trainer(flow_models["flux"], cfg, pictures, tmp_path / "toy.safetensors").run()
    assert not (tmp_path / "toy.safetensors").exists()
