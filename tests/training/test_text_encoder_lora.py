"""Training with a text-encoder LoRA (`text_encoder_lora`, `studio train --text-encoder-lora`; issue 30) on the demo
model: the lora and pivotal methods train a LoRA on the text encoder's attention projections beside the UNet's.

What these tests guard: the text-encoder half learns and is saved in both forms (diffusers' `text_encoder.` keys,
kohya's `lora_te_`); diffusers' `load_lora_weights` reads the file and draws what the studio draws with it, which is not
the picture of its UNet half alone (the studio applies the text-encoder half when it generates); the shared model is
left as it was; a run killed after a checkpoint resumes bit for bit, and refuses to resume without the flag.

Runs are two or three steps at learning rates high enough that both LoRAs are far from their zero start; what the
flag does to a concept is measured in docs/benchmarks.md, not here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import load_file, save_file
from test_methods import PICTURES, _draw

from studio.engine.generate import GenerateRequest, generate
from studio.engine.learned.lora import loras_applied
from studio.engine.learned.lora_export import export_lora
from studio.engine.learned.lora_files import load_lora
from studio.engine.models import ModelManager
from studio.training import TrainConfig, TrainError, Trainer
from studio.training.resume import load_state

ONE_LEVEL = 1 / 255  # one step of an 8-bit picture
ATTENTION = {"q_proj", "k_proj", "v_proj", "out_proj"}  # diffusers' scripts' text-encoder targets


@pytest.fixture(scope="module")
def demo(demo_model_dir):
    return ModelManager().load(demo_model_dir)


def _config(method: str, **kw) -> TrainConfig:
    base = dict(init_text="toy", steps=2, batch_size=2, seed=1, method=method, unet_lr=2e-2, rank=2,
                text_encoder_lora=True, stop_when_learned=False)
    return TrainConfig("<lb>", **{**base, **kw})


def _studio_draw(model, lora, prompt: str) -> np.ndarray:
    """The studio's picture: its LoRA mechanism on the shared UNet and text encoder, the prompt encoded inside it."""
    with model.lock, loras_applied(model, [(lora, 1.0)]):
        return _draw(model.pipe, **model.encoder.pipeline_kwargs(prompt, "", lora.words))


def _text_output(model, prompt: str) -> torch.Tensor:
    tokenizer = model.pipe.tokenizer
    ids = tokenizer([prompt], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
    with torch.no_grad():
        return model.pipe.text_encoder(ids.input_ids.to(model.device))[0]


def test_a_lora_run_with_the_flag_learns_the_text_encoder_and_diffusers_draws_what_the_studio_draws(
        demo, demo_model_dir, tmp_path):
    request = GenerateRequest("a photo of a red toy", seed=4, steps=2, width=64, height=64, preview_every=0)
    before = np.asarray(generate(demo, request).images[0])
    out = tmp_path / "te.safetensors"
    learned = Trainer(demo, _config("lora", class_word="toy"), PICTURES, out).run()

    # 1. Both halves in diffusers' form, the text encoder's on its attention projections, learned.
    saved = load_file(out)
    text = [key for key in saved if key.startswith("text_encoder.")]
    assert text and any(key.startswith("unet.") for key in saved)
    assert {key.split(".")[-3] for key in text} == ATTENTION
    assert min(float(saved[key].abs().max()) for key in text if ".lora_B." in key) > 0, "a text-encoder pair is zero"
    prompt = "a photo of <lb> toy"
    with demo.lock, loras_applied(demo, [(learned, 1.0)]):
        applied = _text_output(demo, prompt)
    assert float((applied - _text_output(demo, prompt)).abs().max()) > 1e-3

    # 2. diffusers loads the whole file and draws the studio's picture; without its text-encoder half it differs.
    reference = StableDiffusionPipeline.from_pretrained(demo_model_dir)
    reference.load_lora_weights(str(out))
    assert reference.get_list_adapters().keys() == {"unet", "text_encoder"}
    ours = _studio_draw(demo, learned, prompt)
    assert np.abs(ours - _draw(reference, prompt=prompt)).max() <= ONE_LEVEL
    save_file({key: t for key, t in saved.items() if key.startswith("unet.")}, tmp_path / "unet-half.safetensors")
    unet_half = load_lora(tmp_path / "unet-half.safetensors", demo.pipe.unet.config)
    assert np.abs(ours - _studio_draw(demo, unet_half, prompt)).max() > 10 * ONE_LEVEL

    # 3. The kohya form (the studio's export): lora_te_ keys that draw the same picture.
    kohya = export_lora(learned, tmp_path, "kohya", "kohya").path
    assert any(key.startswith("lora_te_text_model_encoder_layers_") for key in load_file(kohya))
    assert np.abs(ours - _studio_draw(demo, load_lora(kohya, demo.pipe.unet.config), prompt)).max() <= 1e-5

    # 4. The shared model as it was: no adapter of the run left, the same picture without a LoRA.
    assert "studio-train" not in (getattr(demo.pipe.text_encoder, "peft_config", None) or {})
    assert np.array_equal(np.asarray(generate(demo, request).images[0]), before)


def test_sdxl_learns_a_lora_on_both_text_encoders_that_diffusers_draws_as_the_studio_does(tiny_model_dirs, pictures,
                                                                                          tmp_path):
    model = ModelManager().load(tiny_model_dirs["sdxl"])
    out = tmp_path / "xl.safetensors"
    learned = Trainer(model, _config("lora", class_word="toy"), pictures, out).run()
    assert {key.split(".")[0] for key in load_file(out)} == {"unet", "text_encoder", "text_encoder_2"}
    reference = StableDiffusionXLPipeline.from_pretrained(tiny_model_dirs["sdxl"])
    reference.load_lora_weights(str(out))
    assert reference.get_list_adapters().keys() == {"unet", "text_encoder", "text_encoder_2"}
    prompt = "a photo of <lb> toy"
    assert np.abs(_studio_draw(model, learned, prompt) - _draw(reference, prompt=prompt)).max() <= ONE_LEVEL
    kohya = load_file(export_lora(learned, tmp_path, "kohya", "kohya").path)
    assert any(key.startswith("lora_te1_") for key in kohya) and any(key.startswith("lora_te2_") for key in kohya)


class Killed(Exception):
    """The process dying right after a checkpoint was written (nothing of the run's own ending runs)."""


def _kill_after_checkpoint(event) -> None:
    if event.kind == "checkpoint":
        raise Killed


def test_a_pivotal_run_with_the_flag_killed_after_a_checkpoint_resumes_bit_for_bit(demo, tmp_path):
    """Guards against losing the text encoder's LoRA or its Adam moments on resume, and against a word that stops
    learning beside it; the kohya form written by the trainer itself holds the text encoder's pairs and the word."""
    cfg = dict(steps=3, lora_format="kohya")
    straight = tmp_path / "straight.safetensors"
    Trainer(demo, _config("pivotal", **cfg), PICTURES, straight).run()
    parts = tmp_path / "parts.safetensors"
    with pytest.raises(Killed):
        Trainer(demo, _config("pivotal", save_every=2, **cfg), PICTURES, parts).run(_kill_after_checkpoint)
    checkpoint = tmp_path / "parts-step2.safetensors"
    assert not parts.exists()
    state = load_state(checkpoint)
    assert any(key.startswith("text_encoder.") for key in state.adam), "the text encoder's Adam moments were lost"
    Trainer(demo, _config("pivotal", resume=str(checkpoint), **cfg), PICTURES, parts).run()

    want, got = load_state(straight).params, load_state(parts).params
    assert want.keys() == got.keys() and any(key.startswith("text_encoder.") for key in want)
    assert all(torch.equal(want[key], got[key]) for key in want)
    assert float((want["text_encoder"] - state.init["text_encoder"]).abs().max()) > 0, "the word did not learn"
    written = load_file(straight)
    assert any(key.startswith("lora_te_") for key in written) and "bundle_emb.<lb>.string_to_param.*" in written
    with pytest.raises(TrainError, match="with a text-encoder LoRA: resume it with --text-encoder-lora"):
        Trainer(demo, _config("pivotal", resume=str(checkpoint), text_encoder_lora=False, **cfg), PICTURES,
                tmp_path / "other.safetensors").run()
    with pytest.raises(TrainError, match="other LoRA weights than this run makes .*--text-encoder-rank"):
        Trainer(demo, _config("pivotal", resume=str(checkpoint), text_encoder_rank=1, **cfg), PICTURES,
                tmp_path / "other.safetensors").run()


def test_the_flag_is_for_the_lora_methods_only():
    for method in ("ti", "xti", "dreambooth"):
        with pytest.raises(ValueError, match="text-encoder LoRA is for the lora and pivotal methods"):
            TrainConfig("<lb>", method=method, text_encoder_lora=True)
