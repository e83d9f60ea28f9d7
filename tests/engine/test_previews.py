"""Live previews during generation on tiny real pipelines: which steps get one, its size, off, VAE fallback, cancel."""

import threading

import numpy as np
import pytest
from PIL import Image

from studio.engine.generate import Cancelled, GenerateRequest, generate, preview_method
from studio.engine.models import ModelManager


@pytest.fixture(scope="module")
def sd1(tiny_model_dirs):
    return ModelManager().load(tiny_model_dirs["sd1"])


def _collect(model, req):
    calls = []
    generate(model, req, on_step=lambda step, total, preview: calls.append((step, total, preview)))
    return calls


def _preview_steps(calls):
    return [step for step, _, preview in calls if preview is not None]


def test_txt2img_previews_arrive_every_n_steps_at_the_output_size(sd1):
    assert preview_method(sd1) == "linear"
    calls = _collect(sd1, GenerateRequest("a cat", seed=1, steps=6, width=40, height=32, preview_every=2))
    assert [step for step, _, _ in calls] == [1, 2, 3, 4, 5, 6]
    assert all(total == 6 for _, total, _ in calls)
    assert _preview_steps(calls) == [2, 4, 6]
    previews = [p for _, _, p in calls if p is not None]
    assert all(isinstance(p, Image.Image) and p.size == (40, 32) and p.mode == "RGB" for p in previews)
    # The preview follows the denoising: the first and last differ.
    assert not np.array_equal(np.asarray(previews[0]), np.asarray(previews[-1]))


def test_previews_off_calls_on_step_with_none_every_step(sd1):
    calls = _collect(sd1, GenerateRequest("a cat", seed=1, steps=4, width=32, height=32, preview_every=0))
    assert [(step, preview) for step, _, preview in calls] == [(1, None), (2, None), (3, None), (4, None)]


def test_img2img_and_inpaint_previews_count_the_steps_actually_run(sd1):
    picture = Image.new("RGB", (32, 48), (200, 30, 30))
    calls = _collect(sd1, GenerateRequest("a cat", init_image=picture, strength=0.5, steps=8, seed=1, preview_every=2))
    assert [step for step, _, _ in calls] == [1, 2, 3, 4] and calls[-1][1] == 4
    assert _preview_steps(calls) == [2, 4] and calls[1][2].size == (32, 48)
    mask = Image.new("L", (32, 48), 0)
    mask.paste(255, (8, 8, 24, 40))
    calls = _collect(sd1, GenerateRequest("a cat", init_image=picture, mask=mask, steps=4, seed=1, preview_every=1))
    assert _preview_steps(calls) == [1, 2, 3] and calls[-1][1] == 3 and calls[0][2].size == (32, 48)


def test_sdxl_previews(tiny_model_dirs):
    model = ModelManager().load(tiny_model_dirs["sdxl"])
    calls = _collect(model, GenerateRequest("a cat", seed=1, steps=4, width=32, height=32, preview_every=2))
    assert _preview_steps(calls) == [2, 4] and calls[1][2].size == (32, 32)


def test_a_model_without_latent_factors_is_previewed_by_vae_decode_less_often(tiny_model_dirs):
    model = ModelManager().load(tiny_model_dirs["sd1"])
    model.is_demo = True  # the demo model's own VAE has no fitted linear factors
    assert preview_method(model) == "vae"
    calls = _collect(model, GenerateRequest("a cat", seed=1, steps=8, width=32, height=32, preview_every=2))
    assert _preview_steps(calls) == [4, 8]
    last_preview = calls[-1][2]
    assert last_preview.size == (32, 32)
    # At the last step the latents are the final ones, so the decode is the result itself.
    final = generate(model, GenerateRequest("a cat", seed=1, steps=8, width=32, height=32, preview_every=0)).images[0]
    assert np.abs(np.asarray(last_preview, np.int16) - np.asarray(final, np.int16)).max() <= 1


def test_cancelling_from_a_preview_stops_within_one_step(sd1):
    cancel, seen = threading.Event(), []

    def on_step(step, total, preview):
        seen.append(step)
        if preview is not None:
            cancel.set()

    with pytest.raises(Cancelled, match="step 4 of 10"):
        generate(sd1, GenerateRequest("a cat", seed=1, steps=10, width=32, height=32, preview_every=3),
                 on_step=on_step, cancel=cancel)
    assert seen == [1, 2, 3]


def test_negative_preview_every_is_refused(sd1):
    with pytest.raises(ValueError, match="preview_every must be 0"):
        generate(sd1, GenerateRequest("a cat", steps=2, width=32, height=32, preview_every=-1))


def test_previews_show_the_x0_prediction_and_fall_back_to_the_latents_for_schedulers_without_one(sd1):
    """Guards: previews change nothing (euler_a's noise left the seeded generator when the step was wrapped)."""
    for scheduler in ("euler_a", "ddim", "dpm++_2m", "unipc"):
        req = GenerateRequest("a cat", seed=2, steps=4, width=32, height=32, scheduler=scheduler, preview_every=1)
        calls = []
        with_previews = generate(sd1, req, on_step=lambda s, t, p: calls.append(p)).images[0]
        req.preview_every = 0
        without = generate(sd1, req).images[0]
        assert np.array_equal(np.asarray(with_previews), np.asarray(without)), scheduler
        assert all(isinstance(p, Image.Image) for p in calls) and len(calls) == 4, scheduler


def test_the_demo_model_is_previewed_through_its_own_vae(demo_model_dir):
    model = ModelManager().load(None)
    assert model.is_demo and preview_method(model) == "vae"
    calls = _collect(model, GenerateRequest("a cat", seed=1, steps=4, preview_every=1))
    native = model.pipe.unet.config.sample_size * model.pipe.vae_scale_factor
    assert _preview_steps(calls) == [2, 4] and calls[1][2].size == (native, native)
