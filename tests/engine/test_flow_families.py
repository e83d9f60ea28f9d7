"""SD3 and Flux: tiny random pipelines (benchmarks/architectures.py) saved and loaded back offline; their family
records, loading through ModelManager and drawing through `generate`."""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline

from benchmarks.architectures import T5_WIDTH, build_random_pipeline


def test_tiny_flow_pipelines_round_trip_through_save_pretrained(flow_model_dirs):
    """The folders load back with diffusers' own from_pretrained, offline, with real encoder widths and a T5
    tokenizer that keeps the vocabulary's words whole (a tokenizer built wrong would split every word in letters)."""
    for family, t5_key in (("sd3", "text_encoder_3"), ("flux", "text_encoder_2")):
        pipe = DiffusionPipeline.from_pretrained(flow_model_dirs[family])
        assert type(pipe).__name__ == {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}[family]
        t5 = getattr(pipe, t5_key)
        assert t5.get_input_embeddings().embedding_dim == T5_WIDTH
        tokenizer = getattr(pipe, t5_key.replace("text_encoder", "tokenizer"))
        pieces = tokenizer.convert_ids_to_tokens(tokenizer("a photo of a cat").input_ids)
        assert pieces == ["▁a", "▁photo", "▁of", "▁a", "▁cat", "</s>"]


def test_tiny_flow_pipelines_are_deterministic_for_a_seed():
    a, b = build_random_pipeline("flux", "tiny", seed=3), build_random_pipeline("flux", "tiny", seed=3)
    assert torch.equal(a.transformer.proj_out.weight, b.transformer.proj_out.weight)


# ---- records, loading, drawing ------------------------------------------------------------------------------------
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from studio.engine.families import FAMILIES, family_of, family_of_pipe  # noqa: E402
from studio.engine.generate import GenerateRequest, generate  # noqa: E402


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_flow_families_are_found_by_their_transformer(flow_models):
    """SD3 and Flux are told by the denoiser's class; widths alone would call an SD3 without T5 an SDXL."""
    for family, model in flow_models.items():
        assert model.family == family and model.spec is FAMILIES[family]
        assert model.denoiser is model.pipe.transformer
        assert family_of(model.encoder_dims)[0] == family
        assert type(model.img2img()).__name__ == model.spec.pipelines["img2img"]
    no_t5 = flow_models["sd3"].pipe
    stripped = type(no_t5)(**{**no_t5.components, "text_encoder_3": None, "tokenizer_3": None})
    assert family_of_pipe(stripped) is FAMILIES["sd3"]


@pytest.mark.parametrize("family", ["sd3", "flux"])
@pytest.mark.parametrize("mode", ["txt2img", "img2img", "inpaint"])
def test_generate_equals_the_diffusers_pipeline(flow_models, family, mode):
    """The studio's prompt encoding (CLIP and T5 from input embeddings) and its per-request pipeline draw the
    picture diffusers' own pipeline draws from the prompt text, within 1/255, in every mode diffusers has."""
    model = flow_models[family]
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    extra = {"txt2img": {}, "img2img": {"init_image": picture}, "inpaint": {"init_image": picture, "mask": mask}}
    req = GenerateRequest("a photo of a red cat", seed=1, steps=2, width=64, height=64, guidance=4.0,
                          preview_every=0, **extra[mode])
    ours = generate(model, req).images[0]
    pipe = {"txt2img": model.pipe, "img2img": model.img2img(), "inpaint": model.inpaint()}[mode]
    call = {"txt2img": {}, "img2img": {"image": picture, "strength": 0.75},
            "inpaint": {"image": picture, "mask_image": mask, "strength": 0.75}}[mode]
    theirs = pipe("a photo of a red cat", num_inference_steps=2, width=64, height=64, guidance_scale=4.0,
                  generator=torch.Generator().manual_seed(1), **call).images[0]
    assert np.abs(_pixels(ours) - _pixels(theirs)).max() <= 1


def test_flux_previews_unpack_its_latent_tokens(flow_models):
    """Flux's latents are packed 2x2 patches [B, seq, 64]; a preview decodes them at the picture's size."""
    seen = []
    req = GenerateRequest("a cat", seed=1, steps=2, width=64, height=48, preview_every=1)
    generate(flow_models["flux"], req, on_step=lambda step, total, preview: seen.append(preview))
    assert seen[0] is None and seen[1].size == (64, 48)  # the VAE fallback previews every 2 x preview_every steps


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_unset_guidance_is_the_familys_default_as_in_diffusers(flow_models, family):
    """A request that sets no guidance draws what diffusers' pipeline draws with its own default (Flux 3.5, SD3 7.0),
    not the studio's old 7.5 for every family (which would differ: the tiny Flux embeds its guidance); the infotext
    names the flow scheduler that drew, not the ignored sampler, and Flux's guidance as Forge's distilled scale."""
    from studio.engine.generate import read_infotext

    model = flow_models[family]
    unset = GenerateRequest("a photo of a red cat", seed=1, steps=2, width=64, height=64, preview_every=0)
    result = generate(model, unset)
    theirs = model.pipe("a photo of a red cat", num_inference_steps=2, width=64, height=64,
                        generator=torch.Generator().manual_seed(1)).images[0]
    assert np.abs(_pixels(result.images[0]) - _pixels(theirs)).max() <= 1
    old = generate(model, GenerateRequest("a photo of a red cat", seed=1, steps=2, width=64, height=64, guidance=7.5,
                                          preview_every=0)).images[0]
    assert np.abs(_pixels(old) - _pixels(theirs)).max() > 1
    text = result.infotexts[0]
    assert "Sampler: FlowMatchEulerDiscreteScheduler" in text and "Euler a" not in text
    default = {"sd3": 7.0, "flux": 3.5}[family]
    assert (f"Distilled CFG Scale: {default}" if family == "flux" else f"CFG scale: {default}") in text
    assert read_infotext(result.images[0])["guidance"] == default
