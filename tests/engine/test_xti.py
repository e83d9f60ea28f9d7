"""Per-layer words (XTI / P+): the UNet's layers, per-layer embeddings through the attention processors, files.

The guard of the whole path: a per-layer word whose every layer holds the same vectors must draw the very picture of
the ordinary word with those vectors (wrong layer order, wrong negative/positive order for guidance, a layer left on
the base embeddings or a processor left wrapped would all break it), and one whose layers differ must not."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from studio.cli import main
from studio.engine.generate import GenerateRequest, generate
from studio.engine.learned.layer_word import (
    LAYER_EMBEDS_KWARG,
    LayerPromptProcessor,
    XtiConcept,
    cross_attention_layers,
    encode_per_layer,
    per_layer_attention,
)
from studio.engine.learned.lora_files import load_lora
from studio.engine.learned.registry import load_concept, save_concept
from studio.engine.learned.word import Concept, ConceptError, ConceptMismatchError
from studio.engine.models import ModelManager
from studio.library import ConceptLibrary
from test_lora_runtime import _unet_lora_file

# kohya sd-scripts' train_textual_inversion_XTI.py (save_weights / XTI_layers): the keys it writes, in its order.
KOHYA_XTI_KEYS = ["IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID", "OUT03", "OUT04", "OUT05", "OUT06", "OUT07",
                  "OUT08", "OUT09", "OUT10", "OUT11"]
PROMPT = "a photo of (<w>:1.2) on the beach"  # weighting on the word: per-layer words take it like any word
NEGATIVE = "blurry"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Pictures are compared bit for bit, which only one thread makes meaningful: with two, the text encoder's
    matmuls round a batch of every layer's rows differently from the ordinary path's single rows (the CPU kernels
    block by rows), and the tiny random UNet turns those last bits into whole pixel levels in two steps. What the
    tests check is that both paths compute the same thing; the demo model's float comparison holds with any count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sd1(tiny_model_dirs):
    return ModelManager().load(tiny_model_dirs["sd1"])


@pytest.fixture(scope="module")
def demo(demo_model_dir):
    return ModelManager().load(demo_model_dir)


@pytest.fixture(scope="module")
def sd15_layers() -> list[str]:
    """The cross-attention layers of a UNet with SD 1.5's layout (diffusers' defaults) at a tiny width."""
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(8, 8, 8, 8), norm_num_groups=4,
                                attention_head_dim=2, cross_attention_dim=16)
    return cross_attention_layers(unet)


def _words(model, differ: bool = False, n_vectors: int = 2):
    """(ordinary word, per-layer word) for `model`: the same vectors in every layer, or, when `differ`, the vectors
    plus random noise of their own size in each layer. (Not a constant offset: the text encoder's layer norms take
    a vector's mean out, so v + c draws what v draws.)"""
    generator = torch.Generator().manual_seed(0)
    vectors = {key: torch.randn(n_vectors, dim, generator=generator) for key, dim in model.encoder_dims.items()}
    layers = cross_attention_layers(model.pipe.unet)
    per_layer = [{key: t + (torch.randn(t.shape, generator=generator) if differ else 0) for key, t in vectors.items()}
                 for _ in layers]
    return Concept("<w>", vectors), XtiConcept.from_layers("<w>", layers, per_layer)


def _picture(model, *concepts, prompt=PROMPT, negative=NEGATIVE, **fields):
    req = GenerateRequest(prompt, negative, concepts=list(concepts), seed=3, steps=2, **fields)
    return np.asarray(generate(model, req).images[0], dtype=np.int16)


# ---------------------------------------------------------------------------------------------------------- layers


def test_layer_counts_are_the_unets_own(sd1, demo, sd15_layers):
    assert len(sd15_layers) == 16  # SD 1.x/2.x
    assert len(cross_attention_layers(demo.pipe.unet)) == 7  # 2 down + mid + 4 up blocks with cross-attention
    assert len(cross_attention_layers(sd1.pipe.unet)) == 4


def test_layers_are_listed_in_the_order_the_unet_runs_them(demo):
    """named_modules lists up_blocks before mid_block; the forward runs the mid block first."""
    unet, called = demo.pipe.unet, []
    hooks = [module.register_forward_pre_hook(lambda m, a, name=name: called.append(name))
             for name, module in unet.named_modules() if name.endswith(".attn2")]
    try:
        with torch.no_grad():
            unet(torch.zeros(1, 4, 8, 8), 10, encoder_hidden_states=torch.zeros(1, 77, 128))
    finally:
        for hook in hooks:
            hook.remove()
    assert called == cross_attention_layers(unet)


# ------------------------------------------------------------------------------------------------------ generation


@pytest.mark.parametrize("mode", ["txt2img", "img2img", "inpaint", "no guidance"])
def test_equal_layers_draw_the_ordinary_words_picture(sd1, mode):
    ti, per_layer = _words(sd1)
    fields = dict(width=32, height=32, batch=2)
    if mode in ("img2img", "inpaint"):
        fields.update(init_image=Image.new("RGB", (32, 32), (120, 40, 200)), strength=0.6)
    if mode == "inpaint":
        fields.update(mask=Image.new("L", (32, 32), 255))
    if mode == "no guidance":  # guidance 1: the pipeline runs the positive rows alone
        fields.update(guidance=1.0)
    assert np.array_equal(_picture(sd1, ti, **fields), _picture(sd1, per_layer, **fields))


def test_per_layer_words_mix_with_ordinary_words_and_loras(sd1, tiny_model_dirs, tmp_path):
    """Two per-layer words, an ordinary word and a LoRA (peft layers in the projections the processors call)."""
    lora = load_lora(_unet_lora_file(tmp_path / "lora", tiny_model_dirs["sd1"], StableDiffusionPipeline, seed=2))
    ti, per_layer = _words(sd1)
    other = Concept("toy-style", {"text_encoder": torch.randn(1, 768)})
    second = XtiConcept.from_layers("<v>", per_layer.layers, [{"text_encoder": other.vectors["text_encoder"]}] * 4)
    second_ti = Concept("<v>", dict(other.vectors))
    prompt = "a photo of <w> and <v> in toy-style"
    fields = dict(prompt=prompt, width=32, height=32)
    plain = _picture(sd1, ti, second_ti, other, (lora, 0.8), **fields)
    assert np.array_equal(plain, _picture(sd1, per_layer, second, other, (lora, 0.8), **fields))
    assert not np.array_equal(plain, _picture(sd1, ti, second_ti, other, **fields))  # the LoRA counts


def test_equal_layers_match_the_ordinary_word_within_1e5_before_rounding(demo):
    """On the demo model, pipeline output as floats: batch 2, guidance on, a negative prompt."""
    ti, per_layer = _words(demo)
    pipe = demo.pipe
    from studio.engine.learned.layer_word import pipeline_kwargs_with_layers

    def draw(concept):
        kwargs = pipeline_kwargs_with_layers(demo.encoder, pipe.unet, PROMPT, NEGATIVE, [concept], 2, 7.5)
        generators = [torch.Generator().manual_seed(s) for s in (1, 2)]
        with per_layer_attention(pipe.unet, enabled=isinstance(concept, XtiConcept)), torch.no_grad():
            return pipe(**kwargs, num_inference_steps=3, guidance_scale=7.5, generator=generators,
                        output_type="np").images

    plain, layered = draw(ti), draw(per_layer)
    assert np.abs(plain - layered).max() <= 1e-5
    assert np.abs(plain[0] - plain[1]).max() > 1e-2  # two seeds, two pictures: the comparison can see a difference


def test_layers_that_differ_draw_another_picture_and_the_processors_come_back(demo):
    before = dict(demo.pipe.unet.attn_processors)
    ti, per_layer = _words(demo, differ=True)
    assert np.abs(_picture(demo, ti) - _picture(demo, per_layer)).mean() > 1.0
    after = demo.pipe.unet.attn_processors
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)


def test_no_warning_about_arguments_a_processor_does_not_take(sd1):
    """diffusers' Attention.forward warns on every call for an argument its processor does not name; self-attention
    layers are wrapped too so that it never does."""
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger("diffusers")
    level = logger.level  # the suite runs with DIFFUSERS_VERBOSITY=error, which would hide the warning
    logger.setLevel(logging.WARNING)
    logger.addHandler(handler)
    try:
        _picture(sd1, _words(sd1)[1], width=32, height=32)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert not [m for m in seen if "cross_attention_kwargs" in m]


def test_a_word_for_another_layer_count_is_refused_in_one_line(sd1, sd15_layers):
    vectors = {"text_encoder": torch.randn(1, 768)}
    word = XtiConcept.from_layers("<w>", sd15_layers, [vectors] * 16, {"base_model": "sd15"})
    with pytest.raises(ConceptMismatchError) as caught:
        generate(sd1, GenerateRequest("a photo of <w>", concepts=[word], steps=1, width=32, height=32))
    message = str(caught.value)
    assert "\n" not in message and "16 cross-attention layers" in message and "has 4" in message
    assert "load the model it was trained on" in message


def test_gradients_reach_every_layers_vectors(sd1):
    """The trainer's path: per-layer Parameters -> encode_per_layer -> UNet inside per_layer_attention -> loss."""
    unet, encoder = sd1.pipe.unet, sd1.encoder
    layers = cross_attention_layers(unet)
    params = [torch.nn.Parameter(torch.randn(2, 768) * 0.1) for _ in layers]
    word = XtiConcept.from_layers("<w>", layers, [{"text_encoder": p} for p in params])
    plain = Concept("toy-style", {"text_encoder": torch.nn.Parameter(torch.randn(1, 768) * 0.1)})
    encoded = encode_per_layer(encoder, ["a photo of <w> in toy-style", "<w> on the beach"], [word, plain], layers)
    assert set(encoded.layers) == set(layers) and encoded.base.embeds.shape == (2, 77, 768)
    with per_layer_attention(unet):
        out = unet(torch.randn(2, 4, 4, 4), 500, encoder_hidden_states=encoded.base.embeds,
                   cross_attention_kwargs=encoded.cross_attention_kwargs()).sample
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert plain.vectors["text_encoder"].grad.abs().sum() > 0
    assert not any(isinstance(p, LayerPromptProcessor) for p in unet.attn_processors.values())


def test_the_processor_names_the_argument_the_kwarg_is_sent_as():
    import inspect

    assert LAYER_EMBEDS_KWARG in inspect.signature(LayerPromptProcessor.__call__).parameters


# ----------------------------------------------------------------------------------------------------------- files


def test_kohya_form_round_trip_with_kohyas_key_names(tmp_path, sd15_layers):
    per_layer = [{"text_encoder": torch.randn(2, 768)} for _ in sd15_layers]
    word = XtiConcept.from_layers("<my-cat>", sd15_layers, per_layer)
    path = save_concept(word, tmp_path / "my-cat", format="kohya")
    with safe_open(str(path), "pt") as handle:
        assert sorted(handle.keys()) == sorted(KOHYA_XTI_KEYS)
        assert handle.get_tensor("IN01").shape == (2, 768)
        assert torch.equal(handle.get_tensor("OUT11"), per_layer[-1]["text_encoder"])
    back = load_concept(path)
    assert isinstance(back, XtiConcept) and back.token == "<my-cat>" and back.layers == sd15_layers
    assert all(torch.equal(a["text_encoder"], b["text_encoder"]) for a, b in zip(per_layer, back.layer_vectors))
    path.rename(tmp_path / "my-dog.safetensors")  # renamed, it answers to its new name, as kohya reads it
    assert load_concept(tmp_path / "my-dog.safetensors").token == "my-dog"


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_file_as_kohya_writes_it_reads_with_sd_layers(tmp_path, sd15_layers, suffix):
    """kohya's save_file(state_dict) or torch.save(state_dict) (--save_model_as pt): its 16 keys, no metadata; the
    word is the file's stem (kohya's rule)."""
    data = {key: torch.full((1, 768), float(k)) for k, key in enumerate(KOHYA_XTI_KEYS)}
    path = tmp_path / f"kohya_word{suffix}"
    if suffix == ".safetensors":
        save_file(data, path)
    else:
        torch.save(data, path)
    word = load_concept(path)
    assert isinstance(word, XtiConcept) and word.token == "kohya_word" and word.meta["source_format"] == "kohya-xti"
    assert word.layers == sd15_layers
    assert [float(v["text_encoder"][0, 0]) for v in word.layer_vectors] == [float(k) for k in range(16)]
    assert word.vectors_at("mid_block.attentions.0.transformer_blocks.0.attn2")["text_encoder"][0, 0] == 6.0


def test_kohya_form_round_trip_on_the_demo_model(tmp_path, demo):
    _, word = _words(demo, differ=True)
    path = save_concept(word, tmp_path / "w.safetensors", format="kohya")
    with safe_open(str(path), "pt") as handle:
        assert sorted(handle.keys()) == ["IN03", "IN05", "MID", "OUT00", "OUT01", "OUT02", "OUT03"]
    back = load_concept(path)
    assert back.layers == word.layers
    assert all(torch.equal(a["text_encoder"], b["text_encoder"]) for a, b in zip(word.layer_vectors,
                                                                                back.layer_vectors))


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_studio_form_round_trip(tmp_path, tiny_model_dirs, family):
    model = ModelManager().load(tiny_model_dirs[family])
    _, word = _words(model, differ=True)
    word.meta.update(base_model=f"tiny-{family}", init_text="cat")
    path = save_concept(word, tmp_path / "w", format="studio")
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["studio_format"] == "studio-xti" and metadata["token"] == "<w>"
    assert json.loads(metadata["layers"]) == word.layers and metadata["family"] == word.family
    assert metadata["base_model"] == f"tiny-{family}"
    back = load_concept(path)
    assert isinstance(back, XtiConcept) and back.token == "<w>" and back.layers == word.layers
    for mine, theirs in zip(word.layer_vectors, back.layer_vectors):
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_sdxl_words_have_no_kohya_form_and_no_other_format_holds_layers(tmp_path, tiny_model_dirs, sd15_layers):
    sdxl = ModelManager().load(tiny_model_dirs["sdxl"])
    with pytest.raises(ConceptError, match="studio form"):
        save_concept(_words(sdxl)[1], tmp_path / "w", format="kohya")
    word = XtiConcept.from_layers("<w>", sd15_layers, [{"text_encoder": torch.randn(1, 768)}] * 16)
    with pytest.raises(ConceptError, match="hold no per-layer words"):
        save_concept(word, tmp_path / "w", format="a1111")


@pytest.mark.parametrize("negative", [NEGATIVE, ""])
def test_equal_layers_match_on_sdxl_too(tiny_model_dirs, negative):
    """SDXL: two encoders per layer, the pooled projection from the base embeddings; no negative prompt: zeros."""
    sdxl = ModelManager().load(tiny_model_dirs["sdxl"])
    ti, per_layer = _words(sdxl)
    fields = dict(width=32, height=32, negative=negative)
    assert np.array_equal(_picture(sdxl, ti, **fields), _picture(sdxl, per_layer, **fields))


def test_cli_inspect_json_says_kind_xti_and_the_layer_count(tmp_path, sd15_layers, capsys):
    save_file({key: torch.randn(2, 768) for key in KOHYA_XTI_KEYS}, tmp_path / "cat.safetensors")
    assert main(["concepts", "inspect", str(tmp_path / "cat.safetensors"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "xti" and info["layers"] == 16 and info["layer_names"] == sd15_layers
    assert info["vectors"] == 2 and info["family"] == "sd1" and info["token"] == "cat"
    assert main(["concepts", "inspect", str(tmp_path / "cat.safetensors")]) == 0
    assert "kind:    xti" in capsys.readouterr().out


def test_the_library_finds_a_per_layer_word_and_generation_uses_its_layers(sd1, tmp_path):
    ti, per_layer = _words(sd1)
    save_concept(per_layer, tmp_path / "w.safetensors")
    with ConceptLibrary(tmp_path, watch=False) as library:
        found = library.resolve("a photo of <w>")
        assert [entry.kind for entry in library.entries()] == ["xti"]  # the Library tab's kind column
    assert len(found) == 1 and isinstance(found[0], XtiConcept) and found[0].layers == per_layer.layers
    assert np.array_equal(_picture(sd1, ti, width=32, height=32), _picture(sd1, found[0], width=32, height=32))
