"""SD3 loaded without T5 (`text_encoder_3=None, tokenizer_3=None`, diffusers' documented memory saving): the prompt
encoder puts zero T5 embeddings after the CLIP tokens as diffusers' StableDiffusion3Pipeline does, and words still
fit it as SD3 words."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from test_flow_words import _diffusers_with_tokens, _draw, _word

from studio.engine.families import family_of
from studio.engine.generate import GenerateRequest, generate
from studio.engine.models import ModelManager


@pytest.fixture(scope="module")
def no_t5(flow_model_dirs, tmp_path_factory):
    """(folder, LoadedModel): the tiny SD3 loaded by diffusers without T5, saved so (model_index.json: T5 null,
    which diffusers' from_pretrained refuses unless told text_encoder_3=None) and loaded through ModelManager."""
    pipe = StableDiffusion3Pipeline.from_pretrained(flow_model_dirs["sd3"], text_encoder_3=None, tokenizer_3=None)
    folder = tmp_path_factory.mktemp("sd3-no-t5")
    pipe.save_pretrained(folder)
    return folder, ModelManager().load(folder)


def test_sd3_without_t5_draws_what_diffusers_draws_with_zero_t5(no_t5, flow_models):
    """Zero T5 tokens (256 x joint_attention_dim) after the CLIPs, prompt and negative alike: within 1/255 of
    diffusers' pipeline; and not the picture the same weights draw with T5 (the zeros are what changed)."""
    folder, model = no_t5
    assert model.pipe.text_encoder_3 is None and model.family == "sd3"
    req = GenerateRequest("a photo of a red cat", negative_prompt="blue", seed=1, steps=2, width=64, height=64,
                          guidance=4.0, preview_every=0)
    ours = np.asarray(generate(model, req).images[0], dtype=np.int16)
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
    theirs = pipe("a photo of a red cat", negative_prompt="blue", num_inference_steps=2, width=64, height=64,
                  guidance_scale=4.0, generator=torch.Generator().manual_seed(1)).images[0]
    assert np.abs(ours - np.asarray(theirs, dtype=np.int16)).max() <= 1
    with_t5 = np.asarray(generate(flow_models["sd3"], req).images[0], dtype=np.int16)
    assert np.abs(ours - with_t5).max() > 2


def test_an_sd3_word_fits_sd3_without_t5_and_its_t5_vectors_go_unused(no_t5, flow_models):
    """The model is still SD3 by its encoder widths (not SDXL by its two CLIPs): a word with T5 vectors fits and
    draws what diffusers draws with its CLIP vectors as added tokens; one without T5 vectors draws the same."""
    folder, model = no_t5
    assert family_of(model.encoder_dims)[0] == "sd3"
    word = _word(flow_models["sd3"], ("text_encoder", "text_encoder_2", "text_encoder_3"))
    ours = _draw(model, "a photo of <my-toy> on the beach", [word])
    clip_keys = ("text_encoder", "text_encoder_2")
    pipe = _diffusers_with_tokens(folder, word, clip_keys, text_encoder_3=None, tokenizer_3=None)
    theirs = pipe("a photo of <w0><w1> on the beach", num_inference_steps=2, width=64, height=64,
                  generator=torch.Generator().manual_seed(1)).images[0]
    assert np.abs(ours - np.asarray(theirs, dtype=np.int16)).max() <= 1
    clip_only = type(word)(word.token, {k: word.vectors[k] for k in clip_keys})
    assert np.array_equal(ours, _draw(model, "a photo of <my-toy> on the beach", [clip_only]))
