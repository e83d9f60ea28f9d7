"""Perfusion at run time: the gated rank-one edit is the paper's formula (and its closed form for several concepts),
a prompt that does not name the word draws the base model's picture bit for bit, the shared UNet is put back after
every request (a LoRA's layers included), and the files round-trip, fail closed, and stay small on SD 1.5's shapes."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from studio.engine.generate import GenerateRequest, generate
from studio.engine.learned.layer_word import cross_attention_layers
from studio.engine.learned.perfusion import GatedRankOne, PerfusionConcept, perfusion_edited
from studio.engine.learned.perfusion_files import save_perfusion
from studio.engine.learned.registry import load_concept, read_learned, save_concept
from studio.engine.learned.word import ConceptError, ConceptMismatchError
from studio.engine.models import ModelManager


@pytest.fixture(scope="module")
def demo(demo_model_dir):
    return ModelManager().load(demo_model_dir)


def _concept(unet, token: str = "<pf>", seed: int = 0, scale: float = 1.0, **kw) -> PerfusionConcept:
    """A Perfusion concept for `unet` with random tensors of the right shapes (`scale` sets the values' size)."""
    g = torch.Generator().manual_seed(seed)
    layers = cross_attention_layers(unet)
    widths = [unet.get_submodule(layer).inner_kv_dim for layer in layers]
    width = unet.get_submodule(layers[0]).cross_attention_dim
    target = torch.randn(width, generator=g)
    metric = target + 0.1 * torch.randn(width, generator=g)
    return PerfusionConcept(token, {"text_encoder": torch.randn(1, width, generator=g) * 0.02}, {}, layers=layers,
                            target=target, target_metric=metric,
                            keys=[torch.randn(w, generator=g) * scale for w in widths],
                            values=[torch.randn(w, generator=g) * scale for w in widths], class_word="toy", **kw)


def _draw(model, prompt: str, concepts) -> np.ndarray:
    request = GenerateRequest(prompt, concepts=list(concepts), seed=3, steps=4, width=64, height=64)
    return np.asarray(generate(model, request).images[0]).astype(int)


def test_the_edit_is_the_papers_formula_and_locks_the_key_at_the_target():
    """W'(e) = W e - s(e) W i* + sigmoid((s(e) - beta)/tau) o*, s(e) = e^T C^-1 i* / i*^T C^-1 i*."""
    g = torch.Generator().manual_seed(0)
    d, out = 16, 8
    linear = torch.nn.Linear(d, out, bias=True)
    a = torch.randn(d, d, generator=g)
    inverse = a @ a.T / d + torch.eye(d)  # a C^-1: symmetric positive definite
    target, o = torch.randn(d, generator=g), torch.randn(out, generator=g)
    edit = GatedRankOne(linear, [target], [inverse @ target], [o], [(0.75, 0.1, 1.0)])
    e = torch.randn(3, 5, d, generator=g)
    s = (e @ inverse @ target) / (target @ inverse @ target)
    w = linear.weight
    want = linear(e) - s[..., None] * (w @ target) + torch.sigmoid((s[..., None] - 0.75) / 0.1) * o
    assert torch.allclose(edit(e), want, atol=1e-5)
    # At the target itself s = 1: the word's key becomes o* (the class's) but for the gate's small leak.
    at_target = edit(target[None])[0] - linear.bias
    assert torch.allclose(at_target, torch.sigmoid(torch.tensor(2.5)) * o, atol=1e-5)


def test_two_concepts_each_see_only_their_own_target():
    """The closed form for several edits: at concept a's target, a's share is 1 and b's 0, whatever their overlap."""
    g = torch.Generator().manual_seed(1)
    d = 12
    linear = torch.nn.Linear(d, 6, bias=False)
    ta = torch.randn(d, generator=g)
    tb = 0.6 * ta + torch.randn(d, generator=g)  # overlapping targets
    oa, ob = torch.randn(6, generator=g), torch.randn(6, generator=g)
    edit = GatedRankOne(linear, [ta, tb], [ta, tb], [oa, ob], [(0.5, 0.1, 1.0), (0.5, 0.1, 1.0)])
    low, high = torch.sigmoid(torch.tensor(-5.0)), torch.sigmoid(torch.tensor(5.0))
    assert torch.allclose(edit(ta[None])[0], high * oa + low * ob, atol=1e-5)
    assert torch.allclose(edit(tb[None])[0], low * oa + high * ob, atol=1e-5)


def test_a_prompt_without_the_word_draws_the_base_picture_bit_for_bit(demo):
    concept = _concept(demo.denoiser, scale=3.0, beta=-2.0)  # a gate open everywhere: an edit that shows
    base = _draw(demo, "a toy on a black background", [])
    assert np.array_equal(_draw(demo, "a toy on a black background", [concept]), base)
    named = _draw(demo, "<pf> on a black background", [concept])
    word_alone = _draw(demo, "<pf> on a black background", [load_concept_as_word(concept)])
    assert np.abs(named - word_alone).mean() > 1.0  # the edit, not only the word, changes the picture
    assert np.array_equal(_draw(demo, "a toy on a black background", []), base)  # nothing stayed behind


def load_concept_as_word(concept: PerfusionConcept):
    from studio.engine.learned.word import Concept

    return Concept(concept.token, concept.vectors, {})


def test_weight_zero_is_off_and_the_gate_is_per_request(demo):
    concept = _concept(demo.denoiser)
    word = load_concept_as_word(concept)
    off = _draw(demo, "<pf> on a black background", [(concept, 0.0)])
    assert np.array_equal(off, _draw(demo, "<pf> on a black background", [word]))
    local = _draw(demo, "<pf> on a black background", [concept.with_gate(beta=0.75)])
    wide = _draw(demo, "<pf> on a black background", [concept.with_gate(beta=-5.0)])
    assert not np.array_equal(local, wide)
    assert concept.beta == 0.7  # with_gate made a copy


def test_the_shared_unet_is_put_back_even_when_the_request_fails(demo):
    unet = demo.denoiser
    layers = cross_attention_layers(unet)
    before = [(type(unet.get_submodule(l).to_k), type(unet.get_submodule(l).to_v)) for l in layers]
    concept = _concept(unet)
    with pytest.raises(RuntimeError, match="on purpose"):
        with perfusion_edited(unet, [(concept, 1.0)]):
            assert isinstance(unet.get_submodule(layers[0]).to_k, GatedRankOne)
            raise RuntimeError("on purpose")
    assert [(type(unet.get_submodule(l).to_k), type(unet.get_submodule(l).to_v)) for l in layers] == before


def test_two_perfusion_concepts_and_a_lora_in_one_prompt(demo, tmp_path):
    """Composition: two edits at once (one GatedRankOne per projection), over a LoRA's peft layers."""
    unet = demo.denoiser
    a, b = _concept(unet, "<pa>", seed=1), _concept(unet, "<pb>", seed=2, scale=3.0, beta=-2.0)
    lora = _random_lora(unet, tmp_path)
    both = _draw(demo, "<pa> and <pb>", [a, b, lora])
    only_a = _draw(demo, "<pa> and <pb>", [a, load_concept_as_word(b), lora])
    assert not np.array_equal(both, only_a)
    assert all(not isinstance(unet.get_submodule(l).to_k, GatedRankOne) for l in cross_attention_layers(unet))


def _random_lora(unet, folder):
    """A small random LoRA for `unet`'s cross-attention keys and values, written and read back as the studio reads
    LoRA files."""
    from safetensors.torch import save_file

    from studio.engine.learned.lora_files import load_lora

    g = torch.Generator().manual_seed(5)
    tensors = {}
    for layer in cross_attention_layers(unet):
        attention = unet.get_submodule(layer)
        for name in ("to_k", "to_v"):
            key = f"unet.{layer}.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(2, attention.cross_attention_dim, generator=g) * 0.1
            tensors[f"{key}.lora_B.weight"] = torch.randn(attention.inner_kv_dim, 2, generator=g) * 0.1
    path = folder / "cross.safetensors"
    save_file(tensors, str(path))
    return load_lora(path, unet.config)


def test_files_round_trip_and_name_their_kind(demo, tmp_path):
    concept = _concept(demo.denoiser, beta=0.6)
    path = save_concept(concept, tmp_path / "pf.safetensors")
    back = read_learned(path)
    assert isinstance(back, PerfusionConcept) and back.kind == "perfusion" and back.token == "<pf>"
    assert back.layers == concept.layers and back.beta == 0.6 and back.class_word == "toy"
    assert all(torch.equal(x, y) for x, y in zip(back.keys + back.values, concept.keys + concept.values))
    assert torch.equal(back.target, concept.target) and torch.equal(back.target_metric, concept.target_metric)
    out = subprocess.run([sys.executable, "-m", "studio", "concepts", "inspect", str(path), "--json"],
                         capture_output=True, text=True, check=True).stdout
    info = json.loads(out)
    assert info["kind"] == "perfusion" and info["layers"] == 7 and info["size_bytes"] == path.stat().st_size


@pytest.mark.parametrize("damage, message", [
    (lambda t, m: t.pop("perfusion.values"), "without perfusion.values"),
    (lambda t, m: t.__setitem__("perfusion.keys", t["perfusion.keys"][:-1]), "the layers' widths add up"),
    (lambda t, m: t["perfusion.target"].__setitem__(0, float("nan")), "NaN"),
    (lambda t, m: m.__setitem__("layers", "not json"), "'layers' and 'widths' metadata"),
    (lambda t, m: m.__setitem__("tau", "0"), "tau"),
])
def test_a_damaged_file_fails_in_one_line(demo, tmp_path, damage, message):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = save_perfusion(_concept(demo.denoiser), tmp_path / "pf.safetensors")
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        metadata = dict(f.metadata())
    damage(tensors, metadata)
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(ConceptError, match=message) as caught:
        load_concept(path)
    assert "\n" not in str(caught.value)


def test_a_concept_for_another_unet_is_refused_in_one_line(demo, tiny_model_dirs):
    other = ModelManager().load(tiny_model_dirs["sd1"])
    concept = _concept(demo.denoiser)
    concept = PerfusionConcept(concept.token, {"text_encoder": torch.zeros(1, other.encoder_dims["text_encoder"])},
                               {}, layers=concept.layers, target=concept.target, target_metric=concept.target_metric,
                               keys=concept.keys, values=concept.values)
    with pytest.raises(ConceptMismatchError, match="studio train --method perfusion"):
        generate(other, GenerateRequest("<pf>", concepts=[concept], seed=1, steps=2, width=64, height=64))


def test_a_perfusion_file_on_sd15_shapes_is_at_most_110_kb(tmp_path):
    """Counted on SD 1.5's UNet built on the meta device (no memory): 16 layers' o*_K and o*_V, i*, C^-1 i* and the
    768-wide word, in fp32, written as the studio writes it."""
    from diffusers import UNet2DConditionModel

    config = {"sample_size": 64, "cross_attention_dim": 768, "attention_head_dim": 8,
              "block_out_channels": [320, 640, 1280, 1280]}
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    layers = cross_attention_layers(unet)
    widths = [unet.get_submodule(layer).inner_kv_dim for layer in layers]
    assert len(layers) == 16 and sum(widths) == 12_480
    concept = PerfusionConcept("<pf>", {"text_encoder": torch.zeros(1, 768)}, {"base_model": "sd15"}, layers=layers,
                               target=torch.ones(768), target_metric=torch.ones(768),
                               keys=[torch.ones(w) for w in widths], values=[torch.ones(w) for w in widths])
    path = save_perfusion(concept, tmp_path / "pf.safetensors")
    assert path.stat().st_size <= 110 * 1024
