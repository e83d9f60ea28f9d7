"""LoRAs applied per request (studio.engine.learned.lora.loras_applied through `generate`) and `studio generate --lora`.

The LoRAs are made in the test from real components, as in test_lora_files.py: peft's LoRA on the attention of a
tiny random SD1/SDXL UNet, saved by diffusers' `save_lora_weights`. What these tests guard: a request without LoRA
after any number of LoRA requests gives the picture of a fresh pipeline bit for bit (the shared UNet is left as
loaded), LoRAs change the picture and compose, a LoRA for another family is refused before any work, and adapters that
other code disabled between requests (diffusers' `disable_lora`) are switched on again by the next request.
"""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from peft import LoraConfig, inject_adapter_in_model
from PIL import Image

from studio.cli import main
from studio.engine.generate import GenerateRequest, generate
from studio.engine.learned.lora import adapter_name, loras_applied
from studio.engine.learned.lora_files import load_lora
from studio.engine.models import ModelManager
from studio.errors import LoraError

UNET_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
RANK = 4


def _unet_lora_file(folder, pipeline_dir, pipeline_class, seed: int, scale: float = 0.3):
    """A diffusers-form LoRA file with random (non-zero) A and B on the UNet's attention."""
    pipe = pipeline_class.from_pretrained(pipeline_dir)
    inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=UNET_ATTENTION), pipe.unet)
    generator = torch.Generator().manual_seed(seed)
    layers = {}
    with torch.no_grad():
        for name, param in pipe.unet.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
                layers[name.replace(".default", "")] = param.detach().clone()
    folder.mkdir(parents=True, exist_ok=True)
    pipeline_class.save_lora_weights(folder, unet_lora_layers=layers)
    return folder / "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def lora_files(tiny_model_dirs, tmp_path_factory):
    """{"a": SD1 LoRA, "b": another SD1 LoRA, "xl": an SDXL LoRA}, each file named by its key."""
    root = tmp_path_factory.mktemp("loras")
    made = {"a": (tiny_model_dirs["sd1"], StableDiffusionPipeline, 1),
            "b": (tiny_model_dirs["sd1"], StableDiffusionPipeline, 2),
            "xl": (tiny_model_dirs["sdxl"], StableDiffusionXLPipeline, 3)}
    files = {}
    for key, (folder, cls, seed) in made.items():
        path = _unet_lora_file(root / key, folder, cls, seed)
        files[key] = path.rename(root / f"{key}.safetensors")
    return files


@pytest.fixture(scope="module")
def sd1(tiny_model_dirs):
    return ModelManager().load(tiny_model_dirs["sd1"])


def _picture(model, loras=(), prompt="a photo of a cat", seed=7) -> np.ndarray:
    req = GenerateRequest(prompt, seed=seed, steps=3, width=64, height=64, preview_every=0, concepts=list(loras))
    return np.array(generate(model, req).images[0])


def test_a_lora_changes_the_picture_and_weight_0_is_the_picture_without_it(sd1, lora_files):
    lora = load_lora(lora_files["a"])
    without = _picture(sd1)
    assert not np.array_equal(_picture(sd1, [(lora, 1.0)]), without), "the LoRA had no effect on the picture"
    # peft with scale 0 adds lora_B(lora_A(x)) * 0: exactly zero for finite values, so bit-identical here.
    assert np.array_equal(_picture(sd1, [(lora, 0.0)]), without)


def test_no_lora_after_several_lora_requests_is_bit_identical_to_a_fresh_pipeline(sd1, lora_files, tiny_model_dirs):
    """Guards the shared UNet: adapters stay loaded (cached) but disabled must compute exactly what it did before."""
    a, b = load_lora(lora_files["a"]), load_lora(lora_files["b"])
    for loras in ([(a, 1.0)], [(b, 0.7)], [(a, 0.5), (b, 1.2)], [(a, 1.0)]):
        _picture(sd1, loras)
    fresh = ModelManager().load(tiny_model_dirs["sd1"])
    assert np.array_equal(_picture(sd1), _picture(fresh))


def test_two_loras_compose(sd1, lora_files):
    a, b = load_lora(lora_files["a"]), load_lora(lora_files["b"])
    only_a, only_b, both = _picture(sd1, [(a, 1.0)]), _picture(sd1, [(b, 1.0)]), _picture(sd1, [(a, 1.0), (b, 1.0)])
    assert not np.array_equal(both, only_a) and not np.array_equal(both, only_b)
    assert not np.array_equal(_picture(sd1, [(a, 1.0), (b, 0.5)]), both), "the second LoRA's weight was ignored"


def test_a_tag_in_the_prompt_sets_the_weight_and_is_not_encoded_as_words(sd1, lora_files):
    a = load_lora(lora_files["a"])
    assert np.array_equal(_picture(sd1, [(a, 1.0)], prompt="a photo of <lora:a:0.5> a cat"),
                          _picture(sd1, [(a, 0.5)], prompt="a photo of a cat"))
    with pytest.raises(ValueError, match="<lora:zzz> in the prompt names no LoRA"):
        _picture(sd1, prompt="a cat <lora:zzz:0.5>")


def test_an_sdxl_lora_on_an_sd1_model_is_refused_naming_both(sd1, lora_files):
    xl = load_lora(lora_files["xl"])
    with pytest.raises(LoraError, match=r"xl\.safetensors: a LoRA for sdxl, but the model .* is sd1"):
        _picture(sd1, [(xl, 1.0)])
    assert not getattr(sd1.pipe.unet, "peft_config", {}).keys() & {"xl"}


def test_infotext_keeps_the_tags_and_names_the_hashes(sd1, lora_files):
    a = load_lora(lora_files["a"])
    req = GenerateRequest("a cat", seed=1, steps=1, width=64, height=64, preview_every=0, concepts=[(a, 0.8)])
    text = generate(sd1, req).infotexts[0]
    assert text.splitlines()[0] == "a cat <lora:a:0.8>" and 'Lora hashes: "a: ' in text


def test_cli_generate_with_lora_writes_a_png_and_a_bad_lora_exits_2_in_one_line(tiny_model_dirs, lora_files,
                                                                               tmp_path, capsys):
    out = tmp_path / "out.png"
    code = main(["generate", "--model", str(tiny_model_dirs["sd1"]), "--prompt", "a cat <lora:a:0.6>",
                 "--lora", str(lora_files["a"]), "--lora", f"{lora_files['b']}:0.5", "--seed", "3", "--steps", "2",
                 "--width", "64", "--height", "64", "--out", str(out)])
    assert code == 0
    text = Image.open(out).info["parameters"]
    assert text.startswith("a cat <lora:a:0.6> <lora:b:0.5>") and "Lora hashes" in text

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a lora")
    capsys.readouterr()
    code = main(["generate", "--model", str(tiny_model_dirs["sd1"]), "--prompt", "a cat", "--lora", str(bad),
                 "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "bad.safetensors" in err


def test_a_lora_is_loaded_once_and_a_changed_file_replaces_its_old_adapter(sd1, lora_files, tmp_path):
    """The adapters in the UNet are the cache: one per file (path and mtime), never one per request."""
    copy = tmp_path / "c.safetensors"
    copy.write_bytes(lora_files["a"].read_bytes())
    first = load_lora(copy)
    for _ in range(3):
        _picture(sd1, [(first, 1.0)])
    count = len(sd1.pipe.unet.peft_config)
    for _ in range(2):
        _picture(sd1, [(first, 0.5)])
    assert len(sd1.pipe.unet.peft_config) == count, "a request loaded a file that was loaded already"
    copy.write_bytes(lora_files["b"].read_bytes())
    os.utime(copy, ns=(first.mtime_ns + 10**9, first.mtime_ns + 10**9))
    changed = load_lora(copy)
    assert np.array_equal(_picture(sd1, [(changed, 1.0)]), _picture(sd1, [(load_lora(lora_files["b"]), 1.0)]))
    loaded = set(sd1.pipe.unet.peft_config)
    assert adapter_name(changed) in loaded and adapter_name(first) not in loaded, "the stale adapter was kept"


def test_a_text_encoder_part_named_from_text_model_is_applied_too(sd1, lora_files, tmp_path):
    """Guards the text-encoder half (it used to be skipped): a pair named as kohya and transformers 4 name CLIP's
    layers (`text_model.encoder.…`) finds the layer of transformers 5's flat CLIPTextModel and changes the picture;
    tests/engine/test_lora_text_encoder.py compares such pictures with diffusers'."""
    from safetensors.torch import load_file, save_file

    path = tmp_path / "with_te.safetensors"
    weights = load_file(lora_files["a"])
    width = sd1.pipe.text_encoder.config.hidden_size
    generator = torch.Generator().manual_seed(0)
    weights["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"] = torch.randn(
        RANK, width, generator=generator)
    weights["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight"] = torch.randn(
        width, RANK, generator=generator)
    save_file(weights, path)
    with_te = _picture(sd1, [(load_lora(path), 1.0)])
    assert not np.array_equal(with_te, _picture(sd1, [(load_lora(lora_files["a"]), 1.0)]))
    assert "encoder.layers.0.self_attn.q_proj" in {name for name, module in sd1.pipe.text_encoder.named_modules()
                                                   if hasattr(module, "lora_A")}


def test_concurrent_requests_with_and_without_a_lora_never_see_each_other(sd1, lora_files):
    """Two users on one model: each picture equals the one its request gives alone."""
    a = load_lora(lora_files["a"])
    alone = {"with": _picture(sd1, [(a, 1.0)]), "without": _picture(sd1)}
    got: dict[str, list] = {"with": [], "without": []}

    def user(key, loras):
        for _ in range(3):
            got[key].append(_picture(sd1, loras))

    threads = [threading.Thread(target=user, args=("with", [(a, 1.0)])),
               threading.Thread(target=user, args=("without", []))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(np.array_equal(p, alone["with"]) for p in got["with"])
    assert all(np.array_equal(p, alone["without"]) for p in got["without"])


# ---- the adapter cache: least recently used out first, bounded by the bytes of the adapters' tensors ----


def _copies(lora_files, tmp_path, names: str) -> dict[str, object]:
    """LoRA files under other names (other paths: other adapters), alternately A's and B's weights."""
    files = {}
    for k, name in enumerate(names):
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(lora_files["ab"[k % 2]].read_bytes())
        files[name] = load_lora(path)
    return files


def _cached(model) -> list[str]:
    """The adapters in the UNet, checked against the cache's own list (least recently used first)."""
    in_unet = set(getattr(model.pipe.unet, "peft_config", None) or {})
    assert in_unet == set(model.lora_cache.sizes), "the cache and the UNet disagree on what is loaded"
    return list(model.lora_cache.sizes)


def test_the_cache_evicts_the_least_recently_used_adapter_and_never_one_the_request_uses(tiny_model_dirs, lora_files,
                                                                                          tmp_path):
    model = ModelManager().load(tiny_model_dirs["sd1"])
    c = _copies(lora_files, tmp_path, "pqrs")
    with model.lock, loras_applied(model, [(c["p"], 1.0)]):
        pass
    size = model.lora_cache.sizes[adapter_name(c["p"])]
    assert size == sum(t.numel() * 4 for t in c["p"].state_dict.values()), "the size is not the adapter's fp32 bytes"
    model.lora_cache.budget_bytes = 2 * size  # room for two
    for name in "qpr":  # p used after q: q is the least recently used when r comes
        with model.lock, loras_applied(model, [(c[name], 1.0)]):
            pass
    assert _cached(model) == [adapter_name(c["p"]), adapter_name(c["r"])], "q, the least recently used, was kept"
    # A request needing three adapters on a budget of two keeps all three while it runs ...
    three = [(c["p"], 1.0), (c["q"], 1.0), (c["s"], 1.0)]
    with model.lock, loras_applied(model, three):
        assert set(_cached(model)) == {adapter_name(lora) for lora, _ in three}
        assert model.lora_cache.total_bytes == 3 * size
    # ... and the next request evicts the least recently used of those it does not use (q), down to the budget.
    with model.lock, loras_applied(model, [(c["p"], 1.0)]):
        assert _cached(model) == [adapter_name(c["s"]), adapter_name(c["p"])]


def test_after_evictions_a_request_without_lora_is_bit_identical_to_a_fresh_pipeline(tiny_model_dirs, lora_files,
                                                                                      tmp_path):
    """Guards delete_adapters: evicting must leave the UNet computing what a freshly loaded one computes."""
    model = ModelManager().load(tiny_model_dirs["sd1"])
    model.lora_cache.budget_bytes = 1  # keeps only what the request at hand uses: every switch evicts
    c = _copies(lora_files, tmp_path, "pqr")
    for loras in ([(c["p"], 1.0)], [(c["q"], 0.7)], [(c["p"], 0.5), (c["r"], 1.2)], [(c["q"], 1.0)]):
        _picture(model, loras)
        assert _cached(model) == [adapter_name(lora) for lora, _ in loras]
    fresh = ModelManager().load(tiny_model_dirs["sd1"])
    assert np.array_equal(_picture(model), _picture(fresh))


def test_an_evicted_lora_used_again_is_reloaded_and_gives_the_same_picture(tiny_model_dirs, lora_files):
    model = ModelManager().load(tiny_model_dirs["sd1"])
    model.lora_cache.budget_bytes = 1
    a, b = load_lora(lora_files["a"]), load_lora(lora_files["b"])
    before = _picture(model, [(a, 0.8)])
    _picture(model, [(b, 1.0)])
    assert adapter_name(a) not in _cached(model), "A was not evicted"
    assert np.array_equal(_picture(model, [(a, 0.8)]), before)
    assert _cached(model) == [adapter_name(a)]


def test_adapters_disabled_by_other_code_are_switched_on_again_by_the_next_request(tiny_model_dirs, lora_files):
    """Between requests the cache's adapters are loaded but none is active; code that disables the layers instead
    (diffusers' `disable_lora`, as the trainer does when its run ends) must not turn the next request's LoRA into a
    no-op, nor leave a later request without LoRA other than a fresh pipeline's."""
    model = ModelManager().load(tiny_model_dirs["sd1"])
    a, b = load_lora(lora_files["a"]), load_lora(lora_files["b"])
    with_a, with_both = _picture(model, [(a, 1.0)]), _picture(model, [(a, 1.0), (b, 0.5)])
    model.pipe.unet.disable_lora()
    assert np.array_equal(_picture(model, [(a, 1.0)]), with_a), "the disabled adapter stayed off"
    model.pipe.unet.disable_lora()
    assert np.array_equal(_picture(model, [(a, 1.0), (b, 0.5)]), with_both)
    fresh = ModelManager().load(tiny_model_dirs["sd1"])
    assert np.array_equal(_picture(model), _picture(fresh))
