"""Words for SD3 and Flux: vectors per encoder (CLIP-L, CLIP-G, T5) in the layout diffusers' advanced Flux script
writes, the fit check by encoder widths, and prompt slots in CLIP's and T5's input embeddings that draw what
diffusers draws after adding the same vectors as tokens to every tokenizer and embedding table."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file, save_file

from studio.engine.generate import GenerateRequest, generate
from studio.engine.learned.registry import load_concept, save_concept
from studio.engine.learned.word import Concept, ConceptMismatchError

KEYS = {"flux": ("text_encoder", "text_encoder_2"), "sd3": ("text_encoder", "text_encoder_2", "text_encoder_3")}
NAMES = {"flux": ["clip_l", "t5"], "sd3": ["clip_g", "clip_l", "t5"]}


def _word(model, keys, seed=0) -> Concept:
    generator = torch.Generator().manual_seed(seed)
    return Concept("<my-toy>", {k: torch.randn(2, model.encoder_dims[k], generator=generator) for k in keys})


def _draw(model, prompt, words=()):
    req = GenerateRequest(prompt, concepts=list(words), seed=1, steps=2, width=64, height=64, preview_every=0)
    return np.asarray(generate(model, req).images[0], dtype=np.int16)


def _diffusers_with_tokens(folder, word: Concept, keys, **load):
    """diffusers' own pipeline (`load`: from_pretrained's arguments) with the word's vectors added as tokens <w0> <w1>
    to each tokenizer and table (what load_textual_inversion does; SD3's pipeline has no load_textual_inversion)."""
    pipe = DiffusionPipeline.from_pretrained(folder, **load)
    if pipe.tokenizer_2 is pipe.tokenizer or getattr(pipe, "tokenizer_3", None) is pipe.tokenizer:
        raise AssertionError("each encoder needs a tokenizer of its own here")
    for key in keys:
        tokenizer, encoder = getattr(pipe, key.replace("text_encoder", "tokenizer")), getattr(pipe, key)
        tokenizer.add_tokens(["<w0>", "<w1>"])
        encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(["<w0>", "<w1>"])] = word.vectors[key]
    return pipe


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_word_draws_what_diffusers_draws_with_added_tokens(flow_models, flow_model_dirs, family):
    """CLIP and T5 slots: equal to diffusers within 1/255 (0 measured), and the word does change the picture."""
    model = flow_models[family]
    word = _word(model, KEYS[family])
    ours = _draw(model, "a photo of <my-toy> on the beach", [word])
    pipe = _diffusers_with_tokens(flow_model_dirs[family], word, KEYS[family])
    theirs = pipe("a photo of <w0><w1> on the beach", num_inference_steps=2, width=64, height=64,
                  generator=torch.Generator().manual_seed(1)).images[0]
    assert np.abs(ours - np.asarray(theirs, dtype=np.int16)).max() <= 1
    assert np.abs(ours - _draw(model, "a photo of on the beach")).max() > 2  # beyond the tolerance above


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_word_files_in_the_advanced_script_layout_round_trip(flow_models, tmp_path, family):
    """{"clip_l", ("clip_g",) "t5"} files: read as the family's encoders, written back in the same layout, bit for
    bit; the studio form adds metadata naming the family."""
    word = _word(flow_models[family], KEYS[family])
    written = save_concept(word, tmp_path / "my-toy.safetensors")
    assert sorted(load_file(written)) == NAMES[family]
    back = load_concept(written)
    assert back.family == family and all(torch.equal(back.vectors[k], word.vectors[k]) for k in KEYS[family])
    script = tmp_path / "script_emb.safetensors"  # what the advanced Flux script's save_embeddings writes
    save_file({name: load_file(written)[name] for name in NAMES[family]}, script)
    assert load_concept(script, token="<s0>").dims == word.dims


def test_flux_word_without_t5_vectors_is_plain_text_to_t5(flow_models):
    """The advanced script writes only clip_l without --enable_t5_ti: such a word fits Flux, stands in CLIP-L's
    slots, and T5 reads its token as text (as diffusers' pipeline does when only CLIP-L learned it)."""
    model = flow_models["flux"]
    clip_only = _word(model, ("text_encoder",))
    model.encoder.check_concepts([clip_only])
    kwargs = model.encoder.pipeline_kwargs("a photo of <my-toy>", "", [clip_only])
    plain = model.encoder.pipeline_kwargs("a photo of <my-toy>", "", [])
    assert torch.equal(kwargs["prompt_embeds"], plain["prompt_embeds"])  # T5: the same text
    assert not torch.equal(kwargs["pooled_prompt_embeds"], plain["pooled_prompt_embeds"])  # CLIP-L: the word


def test_a_word_for_another_family_is_refused_naming_both(flow_models):
    sdxl_word = Concept("<x>", {"text_encoder": torch.zeros(1, 768), "text_encoder_2": torch.zeros(1, 1280)})
    with pytest.raises(ConceptMismatchError, match=r"SDXL \(768-d \+ 1280-d\) but the model is Flux.1"):
        flow_models["flux"].encoder.check_concepts([sdxl_word])
    flux_word = _word(flow_models["flux"], KEYS["flux"])
    with pytest.raises(ConceptMismatchError, match=r"trained for Flux.1 \(768-d \+ 4096-d\) but the model is SD3 \(768-d \+ 1280-d \+ 4096-d\)\. To use it, load a Flux"):
        flow_models["sd3"].encoder.check_concepts([flux_word])
