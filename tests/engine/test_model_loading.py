"""ModelManager's loading edges (issue 29): no safety-checker warning, whole error messages, views that share the
model's weights as they are."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers.utils import logging as diffusers_logging

from studio.engine.generate import GenerateRequest, generate
from studio.engine.models import LoadOptions, ModelError, ModelManager, whole_sentences


@pytest.fixture
def diffusers_warnings():
    """diffusers at its default verbosity (the suite's conftest turns it down to errors)."""
    before = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_warning()
    yield
    diffusers_logging.set_verbosity(before)


def test_no_safety_checker_paragraph_at_load_generation_or_views(tiny_model_dirs, tmp_path, capfd,
                                                                  diffusers_warnings):
    """diffusers warns whenever an SD pipeline is built with no safety checker unless told it is not required: a
    model folder that says it is (as DreamBooth outputs and many shared models do) and every per-request pipeline."""
    folder = shutil.copytree(tiny_model_dirs["sd1"], tmp_path / "sd1")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "requires_safety_checker": True}))
    model = ModelManager(LoadOptions(device="cpu")).load(folder)
    generate(model, GenerateRequest("a red circle", steps=1, seed=1))
    model.img2img()
    model.inpaint()
    assert "safety checker" not in capfd.readouterr().err
    assert model.pipe.safety_checker is None and not model.pipe.config.requires_safety_checker


def test_views_share_the_models_weights_in_its_dtype(tiny_model_dirs):
    """diffusers' from_pipe casts every module it shares to float32 unless given a dtype: an fp16 model's first
    img2img request would double its memory and switch txt2img to fp32 for everyone."""
    model = ModelManager(LoadOptions(device="cpu", dtype="fp16")).load(tiny_model_dirs["sd1"])
    view = model.img2img()
    assert view.unet is model.pipe.unet and view.vae is model.pipe.vae
    assert model.pipe.unet.dtype == model.pipe.text_encoder.dtype == torch.float16


def test_an_uncached_hub_id_offline_says_what_to_do_in_one_whole_message():
    """It used to end mid-word, 300 characters into diffusers' paragraph ("... pass 'local_files")."""
    with pytest.raises(ModelError) as caught:
        ModelManager(LoadOptions(device="cpu")).load("nobody-here/not-a-model")
    message = str(caught.value)
    assert message == ("could not load 'nobody-here/not-a-model': it is not in the local Hugging Face cache and "
                       "HF_HUB_OFFLINE is set. Download it once with the network on (`hf download "
                       "nobody-here/not-a-model`), or pass a local diffusers folder or .safetensors/.ckpt file")


def test_library_messages_are_cut_at_a_sentence_end():
    long = "First sentence here. " + "Second one is long " * 20 + "and ends. Third."
    assert whole_sentences(long, limit=100) == "First sentence here."
    assert whole_sentences("One. Two.\n  Three.", limit=100) == "One. Two. Three."
    first = "a" * 150 + ". Next."
    assert whole_sentences(first, limit=100) == "a" * 150 + "."  # a first sentence is kept whole
    assert whole_sentences("no end at all " * 30, limit=100).endswith("all")
