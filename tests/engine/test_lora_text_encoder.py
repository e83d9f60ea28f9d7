"""Text-encoder parts of LoRA files, applied per request (studio.engine.learned.lora: `LoraCache`, `loras_applied`).

The LoRAs are made in the test from real components: peft's LoRA on a tiny random pipeline's UNet attention and on
every linear layer of its text encoders (attention and MLP, as kohya's scripts target them), saved by diffusers'
`save_lora_weights`; kohya forms by diffusers' `convert_state_dict_to_kohya` and by the studio's own export (A1111's
`lora_te_text_model_…` names). What these tests guard: the studio's pictures equal diffusers' `load_lora_weights` +
`set_adapters` pictures (the whole file, within 1/255 in fp32) on the tiny SD1, SD2 and SDXL pipelines (SDXL: both
text encoders), in diffusers' and kohya's forms (SD1 also A1111's and `text_model.` names), at weights 0, 0.5 and 1 and
for two LoRAs at once; the prompt is encoded while the text-encoder part is active; a request without LoRA afterwards
is bit for bit a fresh pipeline's, on each family; evicting an adapter takes it out of the text encoders too;
`studio generate --concept FILE:W` gives diffusers' picture.
"""

from __future__ import annotations

import functools
import re

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
from peft import LoraConfig
from PIL import Image
from safetensors.torch import load_file, save_file
from test_lora_files import add_random_lora

from studio.cli import main
from studio.engine.families import FAMILIES
from studio.engine.generate import GenerateRequest, generate
from studio.engine.learned.lora import adapter_name, loras_applied
from studio.engine.learned.lora_export import export_lora
from studio.engine.learned.lora_files import load_lora
from studio.engine.models import ModelManager
from studio.errors import LoraError

UNET_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_LINEAR = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
RANK = 4
ONE_LEVEL = 1 / 255  # one step of an 8-bit picture


def _diffusers_file(folder, family: str, model_dir, seed: int):
    """A diffusers-form LoRA on the UNet's attention and each text encoder's linear layers."""
    pipeline_class = FAMILIES[family].pipeline_class("txt2img")
    pipe = pipeline_class.from_pretrained(model_dir)
    layers = {"unet_lora_layers": add_random_lora(pipe.unet, UNET_ATTENTION, seed, 0.2)}
    for k, name in enumerate(FAMILIES[family].encoder_keys, start=1):
        layers[f"{name}_lora_layers"] = add_random_lora(getattr(pipe, name), TEXT_LINEAR, seed + k, 0.3)
    folder.mkdir(parents=True, exist_ok=True)
    pipeline_class.save_lora_weights(folder, **layers)
    return folder / "pytorch_lora_weights.safetensors"


def _lora_files(root, family: str, model_dir) -> dict[str, object]:
    """A family's LoRA files by form: "diffusers" (UNet and text encoders), "kohya" (the same under diffusers' kohya
    names), "a1111" (the studio's kohya export: `lora_te_text_model_…`, float alphas), "text_model" (diffusers keys
    with `text_model.`, as transformers 4 named them), "unet" (its UNet half alone), "text" (its text-encoder half
    alone), "second" (another whole LoRA)."""
    full = _diffusers_file(root / "full", family, model_dir, seed=1)
    weights = load_file(full)
    text_parts = tuple(f"{name}." for name in FAMILIES[family].encoder_keys)
    files = {"diffusers": full, "second": _diffusers_file(root / "second", family, model_dir, seed=7)}
    halves = {"kohya": convert_state_dict_to_kohya(weights),
              "text_model": {re.sub(r"^(text_encoder(_2)?)\.", r"\1.text_model.", k): t for k, t in weights.items()},
              "unet": {k: t for k, t in weights.items() if k.startswith("unet.")},
              "text": {k: t for k, t in weights.items() if k.startswith(text_parts)}}
    for form, tensors in halves.items():
        save_file(tensors, root / f"{form}.safetensors")
        files[form] = root / f"{form}.safetensors"
    files["a1111"] = export_lora(load_lora(full), root, "a1111", "kohya").path
    return files


@pytest.fixture(scope="module")
def lora_files(tiny_model_dirs, tmp_path_factory):
    """family -> its LoRA files by form (`_lora_files`), made on first ask."""
    @functools.cache
    def files(family: str) -> dict[str, object]:
        return _lora_files(tmp_path_factory.mktemp(f"te-loras-{family}"), family, tiny_model_dirs[family])
    return files


@pytest.fixture(scope="module")
def models(tiny_model_dirs):
    """family -> the studio's model of its tiny pipeline, shared by the module's tests, loaded on first ask."""
    return functools.cache(lambda family: ModelManager().load(tiny_model_dirs[family]))


@pytest.fixture(scope="module")
def references(tiny_model_dirs, lora_files):
    """family -> diffusers' own pipeline with the whole files loaded by `load_lora_weights`: "x" the LoRA, "y" the
    second."""
    @functools.cache
    def reference(family: str):
        pipe = FAMILIES[family].pipeline_class("txt2img").from_pretrained(tiny_model_dirs[family])
        pipe.load_lora_weights(str(lora_files(family)["diffusers"]), adapter_name="x")
        pipe.load_lora_weights(str(lora_files(family)["second"]), adapter_name="y")
        adapters = pipe.get_list_adapters()
        for part in FAMILIES[family].encoder_keys:
            assert adapters[part] == ["x", "y"], f"diffusers left out the {part} parts"
        return pipe
    return reference


@pytest.fixture(scope="module")
def sd1_files(lora_files):
    return lora_files("sd1")


@pytest.fixture(scope="module")
def sd1(models):
    return models("sd1")


def draw(pipe, prompt: str = "a photo of a cat", seed: int = 5) -> np.ndarray:
    """The pipeline's float picture (fp32, before any rounding to 8 bits), its prompt encoded by diffusers."""
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt, num_inference_steps=3, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(seed)).images[0]


def studio_draw(model, loras) -> np.ndarray:
    """The same picture with the studio's adapters on the shared UNet and text encoders for the block."""
    with model.lock, loras_applied(model, loras):
        return draw(model.pipe)


def request_picture(model, loras=(), prompt: str = "a photo of a cat") -> np.ndarray:
    """The studio's own request (its prompt encoder, `generate`), as an 8-bit picture."""
    req = GenerateRequest(prompt, seed=7, steps=3, width=64, height=64, preview_every=0, concepts=list(loras))
    return np.array(generate(model, req).images[0])


def text_adapters(model) -> set[str]:
    """The adapters loaded in any of the model's text encoders."""
    return {name for part in model.spec.encoder_keys for name in (getattr(getattr(model.pipe, part), "peft_config",
                                                                      None) or {})}


# ------------------------------------------------------------------------------------------- equal to diffusers


@pytest.mark.parametrize("family, form", [("sd1", "diffusers"), ("sd1", "kohya"), ("sd1", "a1111"),
                                          ("sd1", "text_model"), ("sd2", "diffusers"), ("sd2", "kohya"),
                                          ("sdxl", "diffusers"), ("sdxl", "kohya")])
def test_pictures_equal_diffusers_set_adapters_at_weights_0_half_and_1(family, form, models, lora_files, references):
    lora = load_lora(lora_files(family)[form])
    assert set(FAMILIES[family].encoder_keys) <= set(lora.modules)
    reference = references(family)
    for weight in (0.0, 0.5, 1.0):
        reference.set_adapters(["x"], [weight])
        picture = studio_draw(models(family), [(lora, weight)])
        assert np.abs(picture - draw(reference)).max() <= ONE_LEVEL, f"weight {weight}"


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_two_loras_at_once_equal_diffusers(family, models, lora_files, references):
    reference = references(family)
    reference.set_adapters(["x", "y"], [0.5, 1.0])
    loras = [(load_lora(lora_files(family)["diffusers"]), 0.5), (load_lora(lora_files(family)["second"]), 1.0)]
    assert np.abs(studio_draw(models(family), loras) - draw(reference)).max() <= ONE_LEVEL


def test_a_saved_text_encoder_config_sets_the_scale_as_in_diffusers(sd1, tiny_model_dirs, tmp_path):
    """A file whose text-encoder part has diffusers' adapter metadata (lora_alpha = 2 * rank): the studio's text
    encoder computes what diffusers' does with the file, not the scale-1 output of the same weights without it."""
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dirs["sd1"])
    layers = add_random_lora(pipe.text_encoder, TEXT_LINEAR, seed=5, scale=0.3)
    config = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TEXT_LINEAR).to_dict()
    StableDiffusionPipeline.save_lora_weights(tmp_path / "meta", text_encoder_lora_layers=layers,
                                              text_encoder_lora_adapter_metadata=config)
    StableDiffusionPipeline.save_lora_weights(tmp_path / "plain", text_encoder_lora_layers=layers)
    ids = torch.arange(1, 9).unsqueeze(0)

    def encoded(lora_pipe) -> torch.Tensor:
        with torch.no_grad():
            return lora_pipe.text_encoder(ids).last_hidden_state

    reference = StableDiffusionPipeline.from_pretrained(tiny_model_dirs["sd1"])
    reference.load_lora_weights(str(tmp_path / "meta" / "pytorch_lora_weights.safetensors"))
    results = {}
    for name in ("meta", "plain"):
        with sd1.lock, loras_applied(sd1, [(load_lora(tmp_path / name / "pytorch_lora_weights.safetensors"), 1.0)]):
            results[name] = encoded(sd1.pipe)
    torch.testing.assert_close(results["meta"], encoded(reference), atol=1e-5, rtol=0)
    assert not torch.allclose(results["meta"], results["plain"], atol=1e-3), "the saved alpha was not used"


def test_the_text_encoder_half_matters_and_a_text_encoder_only_lora_is_applied(sd1, sd1_files):
    """Guards the issue's bug: the picture with the whole file must not be the UNet half's picture (the text encoder
    part was dropped), and a file with only a text-encoder part (refused before) changes the picture."""
    whole = studio_draw(sd1, [(load_lora(sd1_files["diffusers"]), 1.0)])
    assert np.abs(whole - studio_draw(sd1, [(load_lora(sd1_files["unet"]), 1.0)])).max() > ONE_LEVEL
    text_only = load_lora(sd1_files["text"])
    assert set(text_only.modules) == {"text_encoder"} and text_only.families == ("sd1",)
    assert np.abs(studio_draw(sd1, [(text_only, 1.0)]) - studio_draw(sd1, [])).max() > ONE_LEVEL


def test_a_request_encodes_its_prompt_with_the_text_encoder_part_active(sd1, sd1_files):
    """`generate` runs the studio's prompt encoder inside `loras_applied`: a text-encoder-only LoRA changes a request's
    picture, and at weight 0 gives the picture without it."""
    text_only = load_lora(sd1_files["text"])
    without = request_picture(sd1)
    assert not np.array_equal(request_picture(sd1, [(text_only, 1.0)]), without)
    assert np.array_equal(request_picture(sd1, [(text_only, 0.0)]), without)


# ------------------------------------------------------------------------------------- shared state left as is


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_no_lora_after_text_encoder_lora_requests_is_bit_identical_to_a_fresh_pipeline(family, tiny_model_dirs,
                                                                                        lora_files):
    model = ModelManager().load(tiny_model_dirs[family])
    encoders = [getattr(model.pipe, part) for part in FAMILIES[family].encoder_keys]
    flags = [param.requires_grad for encoder in encoders for param in encoder.parameters()]
    whole, second, text = (load_lora(lora_files(family)[k]) for k in ("diffusers", "second", "text"))
    for loras in ([(whole, 1.0)], [(text, 0.7)], [(whole, 0.5), (second, 1.2)], [(second, 1.0)]):
        request_picture(model, loras)
    assert text_adapters(model) == {adapter_name(lora) for lora in (whole, second, text)}, "the cache reloaded"
    fresh = ModelManager().load(tiny_model_dirs[family])
    assert np.array_equal(request_picture(model), request_picture(fresh))
    base = [p for encoder in encoders for n, p in encoder.named_parameters() if "lora_" not in n]
    assert [param.requires_grad for param in base] == flags, "loading an adapter changed the encoders' grad flags"


def test_eviction_takes_the_adapter_out_of_the_text_encoder_too(tiny_model_dirs, sd1_files):
    model = ModelManager().load(tiny_model_dirs["sd1"])
    model.lora_cache.budget_bytes = 1  # keeps only what the request at hand uses
    whole, second = load_lora(sd1_files["diffusers"]), load_lora(sd1_files["second"])
    before = request_picture(model, [(whole, 0.8)])
    size = model.lora_cache.sizes[adapter_name(whole)]
    assert size == sum(t.numel() * 4 for t in whole.state_dict.values()), "the size leaves out the text encoder"
    request_picture(model, [(second, 1.0)])
    assert text_adapters(model) == {adapter_name(second)}
    request_picture(model, [(load_lora(sd1_files["unet"]), 1.0)])  # an adapter with no text-encoder part
    assert not text_adapters(model), "an evicted adapter stayed in the text encoder"
    assert np.array_equal(request_picture(model, [(whole, 0.8)]), before), "reloaded, it draws another picture"
    fresh = ModelManager().load(tiny_model_dirs["sd1"])
    request_picture(model, [(load_lora(sd1_files["unet"]), 1.0)])
    assert np.array_equal(request_picture(model), request_picture(fresh))


def test_a_text_encoder_pair_for_a_layer_the_model_lacks_is_refused_in_one_line(sd1, sd1_files, tmp_path):
    weights = load_file(sd1_files["diffusers"])
    width = sd1.pipe.text_encoder.config.hidden_size
    weights["text_encoder.encoder.layers.9.self_attn.q_proj.lora_A.weight"] = torch.zeros(RANK, width)
    weights["text_encoder.encoder.layers.9.self_attn.q_proj.lora_B.weight"] = torch.zeros(width, RANK)
    save_file(weights, tmp_path / "deeper.safetensors")
    lora = load_lora(tmp_path / "deeper.safetensors")
    with pytest.raises(LoraError, match=r"deeper\.safetensors: it changes layer encoder\.layers\.9\.self_attn\.q_proj, "
                                        r"which .*'s text_encoder does not have") as raised:
        studio_draw(sd1, [(lora, 1.0)])
    assert len(str(raised.value).splitlines()) == 1
    assert adapter_name(lora) not in text_adapters(sd1)


# -------------------------------------------------------------------------------------------------------- CLI


def test_cli_concept_lora_with_text_encoder_part_gives_diffusers_picture(tiny_model_dirs, sd1_files, tmp_path):
    """The issue's interface: `studio generate --model M --prompt P --seed S --steps N --guidance G --scheduler euler
    --concept FILE:W --out X.png`, FILE a LoRA with UNet and text-encoder parts (diffusers and kohya forms): the
    picture is diffusers' within 1/255 and not the UNet half's."""
    prompt, seed, steps, guidance, weight = "a photo of a dog", 11, 4, 6.0, 0.8

    def cli(file) -> np.ndarray:
        out = tmp_path / f"{file.stem}.png"
        assert main(["generate", "--model", str(tiny_model_dirs["sd1"]), "--prompt", prompt, "--seed", str(seed),
                     "--steps", str(steps), "--guidance", str(guidance), "--scheduler", "euler", "--width", "64",
                     "--height", "64", "--concept", f"{file}:{weight}", "--out", str(out)]) == 0
        return np.array(Image.open(out).convert("RGB")).astype(int)

    reference = StableDiffusionPipeline.from_pretrained(tiny_model_dirs["sd1"])
    reference.set_progress_bar_config(disable=True)
    reference.load_lora_weights(str(sd1_files["diffusers"]), adapter_name="x")
    reference.set_adapters(["x"], [weight])
    expected = np.array(reference(prompt, num_inference_steps=steps, guidance_scale=guidance, height=64, width=64,
                                  generator=torch.Generator().manual_seed(seed)).images[0]).astype(int)
    unet_half = cli(sd1_files["unet"])
    for form in ("diffusers", "kohya"):
        picture = cli(sd1_files[form])
        assert np.abs(picture - expected).max() <= 1, form
        assert np.abs(picture - unet_half).max() > 1, f"{form}: the text-encoder part changed nothing"
