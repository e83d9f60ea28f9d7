"""Image concepts (IP-Adapter) through `generate`: studio.engine.learned.image_prompt, ip_adapter, image_encoding.

The adapters are random weights in diffusers' real layout (h94/IP-Adapter's keys: `image_proj.*`, `ip_adapter.<n>.*`;
plain and Plus), saved to a local folder beside a tiny random CLIP vision model, for the tiny random SD1 and SDXL
pipelines. What these tests guard: the studio's picture is the one diffusers draws from the same pictures with
`load_ip_adapter` + `set_ip_adapter_scale` (within 1/255); a request without the image concept, or at weight 0, is
bit-identical to the model as loaded, and nothing of a request stays on the shared UNet for the next; image concepts
compose with words, per-layer words, LoRAs and each other; files are read back as written and refused in one line.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from diffusers import EulerAncestralDiscreteScheduler
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from studio.engine.families import FAMILIES
from studio.engine.generate import GenerateRequest, generate, read_infotext, save_png
from studio.engine.learned.image_encoding import encode_pictures
from studio.engine.learned.image_prompt import embeds_arguments
from studio.engine.learned.image_prompt_files import read_image_concept, save_image_concept
from studio.engine.learned.ip_adapter import ImagePromptError, image_prompts_applied
from studio.engine.learned.layer_word import XtiConcept, cross_attention_layers
from studio.engine.learned.registry import read_learned
from studio.engine.learned.word import Concept, ConceptMismatchError
from studio.engine.models import ModelManager

ONE_LEVEL = 1  # one step of an 8-bit picture
VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8, projection_dim=16)


def _random(shape, generator, scale=0.2) -> torch.Tensor:
    return torch.randn(shape, generator=generator) * scale


def _plus_projection(generator, cross: int, embed: int, dim: int = 64, queries: int = 4) -> dict:
    """IP-Adapter Plus's Resampler in the original (h94) names: 4 layers of attention + feed-forward, 1 head of 64."""
    keys = {"latents": (1, queries, dim), "proj_in.weight": (dim, embed), "proj_in.bias": (dim,),
            "proj_out.weight": (cross, dim), "proj_out.bias": (cross,), "norm_out.weight": (cross,),
            "norm_out.bias": (cross,)}
    for i in range(4):
        keys.update({f"layers.{i}.0.norm1.weight": (dim,), f"layers.{i}.0.norm1.bias": (dim,),
                     f"layers.{i}.0.norm2.weight": (dim,), f"layers.{i}.0.norm2.bias": (dim,),
                     f"layers.{i}.0.to_q.weight": (64, dim), f"layers.{i}.0.to_kv.weight": (128, dim),
                     f"layers.{i}.0.to_out.weight": (dim, 64), f"layers.{i}.1.0.weight": (dim,),
                     f"layers.{i}.1.0.bias": (dim,), f"layers.{i}.1.1.weight": (dim * 4, dim),
                     f"layers.{i}.1.3.weight": (dim, dim * 4)})
    return {k: (1 + _random(s, generator, 0.05) if k.endswith("norm1.weight") or k.endswith("norm2.weight")
                or k.endswith("1.0.weight") or k == "norm_out.weight" else _random(s, generator))
            for k, s in keys.items()}


def _adapter_file(folder, unet, plus: bool, seed: int):
    """An IP-Adapter for `unet` with random weights in diffusers' file layout, and the vision model beside it."""
    generator = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim
    if plus:
        image_proj = _plus_projection(generator, cross, VISION["hidden_size"])
    else:
        tokens = 4
        image_proj = {"proj.weight": _random((tokens * cross, VISION["projection_dim"]), generator),
                      "proj.bias": _random((tokens * cross,), generator),
                      "norm.weight": 1 + _random((cross,), generator, 0.05), "norm.bias": _random((cross,), generator)}
    tensors = {f"image_proj.{k}": v for k, v in image_proj.items()}
    # diffusers numbers the cross-attention layers 1, 3, 5, ... in `attn_processors` order (down, up, mid blocks)
    cross_keys = [key.removesuffix(".processor") for key in unet.attn_processors if key.endswith("attn2.processor")]
    for n, key in enumerate(cross_keys):
        hidden = unet.get_submodule(key).to_k.out_features
        for part in ("to_k_ip", "to_v_ip"):
            tensors[f"ip_adapter.{2 * n + 1}.{part}.weight"] = _random((hidden, cross), generator, 0.5)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "ip-adapter.safetensors"))
    torch.manual_seed(seed)
    CLIPVisionModelWithProjection(CLIPVisionConfig(**VISION)).save_pretrained(folder / "image_encoder")
    return folder / "ip-adapter.safetensors"


def _pictures(seed: int, n: int = 2) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def models(tiny_model_dirs):
    return functools.cache(lambda family: ModelManager().load(tiny_model_dirs[family]))


@pytest.fixture(scope="module")
def adapters(models, tmp_path_factory):
    """(family, "plain" | "plus") -> adapter file, made on first ask."""
    root = tmp_path_factory.mktemp("ip-adapters")
    return functools.cache(lambda family, form: _adapter_file(root / f"{family}-{form}", models(family).denoiser,
                                                              form == "plus", seed=len(family) + len(form)))


def _request(model, concepts=(), prompt="a photo of <dog>", seed=3, **extra) -> np.ndarray:
    req = GenerateRequest(prompt, seed=seed, steps=3, width=64, height=64, preview_every=0, concepts=list(concepts),
                          **extra)
    return np.array(generate(model, req).images[0]).astype(int)


def _diffusers_picture(family, model_dir, adapter, pictures, scales, prompt="a photo of", seed=3,
                       scheduler=EulerAncestralDiscreteScheduler) -> np.ndarray:
    """diffusers' own: `load_ip_adapter` (with its image encoder) + `set_ip_adapter_scale` + `ip_adapter_image`."""
    no_watermark = {"add_watermarker": False} if family == "sdxl" else {}  # as the studio loads SDXL
    pipe = FAMILIES[family].pipeline_class("txt2img").from_pretrained(model_dir, **no_watermark)
    pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter([str(adapter.parent)] * len(pictures), subfolder=[""] * len(pictures),
                         weight_name=[adapter.name] * len(pictures))
    pipe.set_ip_adapter_scale(scales)
    image = pipe(prompt, ip_adapter_image=pictures, num_inference_steps=3, height=64, width=64,
                 generator=[torch.Generator().manual_seed(seed)]).images[0]
    return np.array(image).astype(int)


def _patched_pipe_picture(model, uses, prompt="a photo of", seed=3) -> np.ndarray:
    """The shared pipeline itself (its prompt encoded by diffusers) with the studio's patch on its UNet: the runtime
    alone, for SDXL, where `generate`'s own picture is not diffusers' even without image prompts (16 levels apart
    on the tiny SDXL; its prompt embeddings are equal, so the difference lies outside image prompts)."""
    with model.lock, image_prompts_applied(model, uses):
        image = model.pipe(prompt, ip_adapter_image_embeds=embeds_arguments(uses, model, 7.5), num_inference_steps=3,
                           height=64, width=64, generator=[torch.Generator().manual_seed(seed)]).images[0]
    return np.array(image).astype(int)


# ------------------------------------------------------------------------------------------- equal to diffusers


@pytest.mark.parametrize("family, form", [("sd1", "plain"), ("sd1", "plus"), ("sdxl", "plain"), ("sdxl", "plus")])
def test_picture_equals_diffusers_load_ip_adapter(family, form, models, adapters, tiny_model_dirs, tmp_path):
    model, adapter = models(family), adapters(family, form)
    pictures = _pictures(1)
    concept = encode_pictures(model, pictures, "<dog>", str(adapter))
    concept = read_image_concept(save_image_concept(concept, tmp_path / "dog.safetensors"))  # through its file
    assert concept.plus == (form == "plus") and concept.pictures == 2
    if family == "sd1":  # the whole request: the word in the prompt, the plan, generate
        ours = _request(model, [(concept, 0.7)])
        theirs = _diffusers_picture(family, tiny_model_dirs[family], adapter, [pictures], 0.7)
    else:
        ours = _patched_pipe_picture(model, [(concept, 0.7)])
        theirs = _diffusers_picture(family, tiny_model_dirs[family], adapter, [pictures], 0.7,
                                    scheduler=type(model.pipe.scheduler))
    assert np.abs(ours - theirs).max() <= ONE_LEVEL
    assert not np.array_equal(ours, _request(model)), "the image prompt had no effect"


def test_two_image_concepts_equal_diffusers_with_two_adapters(models, adapters, tiny_model_dirs):
    model, adapter = models("sd1"), adapters("sd1", "plain")
    a, b = _pictures(2, 1), _pictures(3, 2)
    dog, cat = (encode_pictures(model, p, t, str(adapter)) for p, t in ((a, "<dog>"), (b, "<cat>")))
    ours = _request(model, [(dog, 0.5), (cat, 1.0)], prompt="<dog> and <cat>")
    theirs = _diffusers_picture("sd1", tiny_model_dirs["sd1"], adapter, [a, b], [0.5, 1.0], prompt="and")
    assert np.abs(ours - theirs).max() <= ONE_LEVEL


# ------------------------------------------------------------------------------------ per request, nothing leaks


def test_weight_0_and_no_image_concept_are_bit_identical_and_nothing_stays(models, adapters, tiny_model_dirs):
    model, adapter = models("sd1"), adapters("sd1", "plus")
    unet = model.denoiser
    processors, config_type = dict(unet.attn_processors), unet.config.encoder_hid_dim_type
    concept = encode_pictures(model, _pictures(4), "<dog>", str(adapter))
    fresh = _request(ModelManager().load(tiny_model_dirs["sd1"]), prompt="a photo of")
    assert np.array_equal(_request(model, [(concept, 0.0)]), fresh)  # its word becomes its (empty) prompt text
    _request(model, [(concept, 1.0)])
    assert np.array_equal(_request(model, prompt="a photo of"), fresh)
    assert unet.attn_processors == processors and unet.encoder_hid_proj is None
    assert unet.config.encoder_hid_dim_type == config_type


def test_kept_slotted_processors_take_each_requests_weight_and_touch_only_cross_attention(models, adapters,
                                                                                           tiny_model_dirs):
    """The slotted processors are built once per (adapters, order) and kept: a request's weight must not stick to
    them (1.0 then 0.4 draws what a fresh model draws at 0.4), a block inside a block with the same adapters gives
    the outer one its weight back, and only the cross-attention layers' processors change."""
    model, adapter = models("sd1"), adapters("sd1", "plain")
    unet = model.denoiser
    concept = encode_pictures(model, _pictures(12), "<dog>", str(adapter))
    fresh = _request(ModelManager().load(tiny_model_dirs["sd1"]), [(concept, 0.4)])
    _request(model, [(concept, 1.0)])
    assert np.array_equal(_request(model, [(concept, 0.4)]), fresh)
    before = dict(unet.attn_processors)
    cross = {f"{name}.processor" for name in cross_attention_layers(unet)}
    with image_prompts_applied(model, [(concept, 0.4)]):
        outer = dict(unet.attn_processors)
        with image_prompts_applied(model, [(concept, 1.0)]):
            assert {key for key, proc in unet.attn_processors.items() if proc is not before[key]} == cross
            assert all(unet.attn_processors[key].scale == [1.0] for key in cross)
        assert all(unet.attn_processors[key] is outer[key] and outer[key].scale == [0.4] for key in cross)
    kept = model.image_adapters.slotted(unet, [concept]).layers  # the same objects every request
    assert {id(outer[key]) for key in cross} == {id(proc) for _, proc in kept}
    assert unet.attn_processors == before


def test_an_evicted_adapter_takes_its_slotted_processors_with_it(models, adapters):
    from studio.engine.learned.ip_adapter import ImageAdapterCache

    model = models("sd1")
    plain, plus = (encode_pictures(model, _pictures(13), "<dog>", str(adapters("sd1", form)))
                   for form in ("plain", "plus"))
    cache = ImageAdapterCache(max_adapters=1)
    first = cache.slotted(model.denoiser, [plain])
    assert cache.slotted(model.denoiser, [plain]) is first  # kept
    cache.slotted(model.denoiser, [plus])
    assert len(cache.parts) == 1 and len(cache.slottings) == 1  # nothing holds the plain adapter's weights
    assert cache.slotted(model.denoiser, [plain]) is not first


def test_composes_with_words_and_per_layer_words(models, adapters):
    """A per-layer word whose layers all hold one word's vectors draws that word's picture, image prompt or not."""
    model, adapter = models("sd1"), adapters("sd1", "plain")
    concept = encode_pictures(model, _pictures(5), "<dog>", str(adapter))
    vectors = {"text_encoder": torch.randn(1, 768, generator=torch.Generator().manual_seed(0))}
    word = Concept("<hat>", vectors)
    layers = cross_attention_layers(model.denoiser)
    per_layer = XtiConcept.from_layers("<hat>", layers, [vectors] * len(layers))
    prompt = "a photo of <dog> in <hat>"
    with_word = _request(model, [concept, word], prompt=prompt)
    assert np.array_equal(_request(model, [concept, per_layer], prompt=prompt), with_word)
    assert not np.array_equal(with_word, _request(model, [word], prompt=prompt))


def test_composes_with_a_lora(models, adapters, tiny_model_dirs, tmp_path):
    from tests.engine.test_lora_runtime import _unet_lora_file
    from studio.engine.learned.lora_files import load_lora
    from diffusers import StableDiffusionPipeline

    model, adapter = models("sd1"), adapters("sd1", "plain")
    lora = load_lora(_unet_lora_file(tmp_path / "lora", tiny_model_dirs["sd1"], StableDiffusionPipeline, 1))
    concept = encode_pictures(model, _pictures(6), "<dog>", str(adapter))
    both, alone = _request(model, [concept, lora]), _request(model, [lora])
    assert not np.array_equal(both, alone) and not np.array_equal(both, _request(model, [concept]))
    assert np.array_equal(_request(model, prompt="a photo of"),
                          _request(ModelManager().load(tiny_model_dirs["sd1"]), prompt="a photo of"))


# --------------------------------------------------------------------------------------------- files and checks


def test_png_parameters_list_image_concepts_and_read_back(models, adapters, tmp_path):
    """The infotext names each image concept with its weight (0 too), its adapter and the adapter's digest, in one
    quoted value (A1111's form for values with commas); reading it back keeps every other field as it was."""
    model, adapter = models("sd1"), adapters("sd1", "plain")
    dog, cat = (encode_pictures(model, _pictures(14), token, str(adapter)) for token in ("<dog>", "<cat>"))
    word = Concept("<hat>", {"text_encoder": torch.zeros(1, 768)})
    req = GenerateRequest("<dog>, <cat> in <hat>", negative_prompt="blurry", seed=5, steps=2, width=64, height=64,
                          guidance=6.0, preview_every=0, concepts=[(dog, 0.7), (cat, 0.0), word])
    text = generate(model, req).infotexts[0]
    digest = dog.adapter_sha256[:12]
    assert f'Image concepts: "<dog>: 0.7 ip-adapter [{digest}], <cat>: 0 ip-adapter [{digest}]"' in text
    assert str(adapter.parent) not in text  # no folder of this machine in a picture
    back = read_infotext(save_png(Image.new("RGB", (8, 8)), tmp_path / "x.png", text))
    assert back == {"prompt": "<dog>, <cat> in <hat>", "negative_prompt": "blurry", "steps": 2, "guidance": 6.0,
                    "seed": 5, "scheduler": "euler_a", "width": 64, "height": 64, "concepts": ["<hat>"],
                    "image_concepts": {"<dog>": 0.7, "<cat>": 0.0}}



def test_file_reads_back_as_written_and_names_its_kind(models, adapters, tmp_path):
    model, adapter = models("sd1"), adapters("sd1", "plain")
    concept = encode_pictures(model, _pictures(7, 3), "<dog>", str(adapter), prompt_text="dog")
    path = save_image_concept(concept, tmp_path / "dog.safetensors")
    back = read_learned(path)
    assert back.kind == "image" and back.name == "<dog>" and back.prompt_text == "dog"
    assert torch.equal(back.embeds, concept.embeds) and back.adapter == str(adapter.resolve())
    assert back.encoder_dims == {"text_encoder": 768} and back.meta["pictures"] == "3"
    assert path.stat().st_size < 20_000  # 3 pictures of 16 numbers and their metadata


def test_an_image_concept_for_another_model_is_refused_in_one_line(models, adapters):
    concept = encode_pictures(models("sdxl"), _pictures(8), "<dog>", str(adapters("sdxl", "plain")))
    with pytest.raises(ConceptMismatchError, match=r"encode the pictures again") as caught:
        _request(models("sd1"), [concept])
    assert "\n" not in str(caught.value)


def test_a_missing_or_changed_adapter_is_refused_in_one_line(models, adapters, tmp_path):
    model = models("sd1")
    source = adapters("sd1", "plain")
    moved = tmp_path / "ip-adapter.safetensors"
    moved.write_bytes(source.read_bytes())
    (tmp_path / "image_encoder").symlink_to(source.parent / "image_encoder")
    concept = encode_pictures(model, _pictures(9), "<dog>", str(moved))
    moved.write_bytes(adapters("sd1", "plus").read_bytes())  # another adapter at its place
    with pytest.raises(ImagePromptError, match="another adapter"):
        _request(model, [concept])
    moved.unlink()
    with pytest.raises(ImagePromptError, match="not on this machine"):
        _request(model, [concept])


def test_a_damaged_file_and_a_non_adapter_are_refused_in_one_line(models, adapters, tmp_path):
    concept = encode_pictures(models("sd1"), _pictures(10), "<dog>", str(adapters("sd1", "plain")))
    path = save_image_concept(concept, tmp_path / "dog.safetensors")
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(ImagePromptError) as caught:
        read_image_concept(path)
    assert "\n" not in str(caught.value)
    not_adapter = tmp_path / "word.safetensors"
    save_file({"emb_params": torch.zeros(1, 768)}, str(not_adapter))
    with pytest.raises(ImagePromptError, match="not an IP-Adapter file"):
        encode_pictures(models("sd1"), _pictures(10), "<dog>", str(not_adapter))


def test_the_library_lists_an_image_concept_and_a_prompt_names_it(models, adapters, tmp_path):
    from studio.library import ConceptLibrary

    sd1 = models("sd1")
    concept = encode_pictures(sd1, _pictures(11), "<dog>", str(adapters("sd1", "plain")))
    save_image_concept(concept, tmp_path / "dog.safetensors")
    word = Concept("<hat>", {"text_encoder": torch.zeros(1, 768)})
    library = ConceptLibrary(tmp_path)
    library.save(word)
    entries = {e.token: e for e in library.entries(sd1.encoder_dims)}
    assert entries["<dog>"].kind == "image" and entries["<dog>"].fits
    on_xl = {e.token: e for e in library.entries(models("sdxl").encoder_dims, model_name="xl")}
    assert not on_xl["<dog>"].fits and "encode the pictures again" in on_xl["<dog>"].reason
    named = library.resolve("a photo of <dog> in <hat>")
    assert [thing.name for thing in named] == ["<dog>", "<hat>"] and named[0].kind == "image"
    assert np.array_equal(_request(sd1, named, prompt="a photo of <dog> in <hat>"),
                          _request(sd1, [read_learned(tmp_path / "dog.safetensors"), word],
                                   prompt="a photo of <dog> in <hat>"))
