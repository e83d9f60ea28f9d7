"""ModelManager and generation on tiny random pipelines: shared modules, seeds, threads, cancel, PNG parameters."""

import threading

import numpy as np
import pytest
import torch
from PIL import Image

from studio.engine.generate import Cancelled, GenerateRequest, generate, read_infotext, save_png
from studio.engine.learned.word import Concept, ConceptMismatchError
from studio.engine.models import ModelError, ModelManager


@pytest.fixture(scope="module")
def sd1(tiny_model_dirs):
    return ModelManager().load(tiny_model_dirs["sd1"])


def _arr(img):
    return np.asarray(img, dtype=np.int16)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_family_detected_and_views_share_every_parameter(tiny_model_dirs, family):
    model = ModelManager().load(tiny_model_dirs[family])
    assert model.family == family
    assert model.attention == "sdpa"
    base = {p.data_ptr() for p in model.pipe.unet.parameters()} | {p.data_ptr() for p in model.pipe.vae.parameters()}
    for view in (model.img2img(), model.inpaint()):
        assert {p.data_ptr() for p in view.unet.parameters()} | {p.data_ptr() for p in view.vae.parameters()} == base
        assert view.text_encoder is model.pipe.text_encoder


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(ModelError, match="not a diffusers model folder"):
        ModelManager().load(tmp_path)
    bad = tmp_path / "model.bin"
    bad.write_bytes(b"junk")
    with pytest.raises(ModelError, match="must be .safetensors or .ckpt"):
        ModelManager().load(bad)


def test_seeds_reproducible_and_batch_image_k_equals_seed_plus_k(sd1):
    req = GenerateRequest("a red cat", seed=5, steps=2, width=32, height=32, batch=2)
    batch = generate(sd1, req)
    single = generate(sd1, GenerateRequest("a red cat", seed=6, steps=2, width=32, height=32))
    assert batch.seeds == [5, 6]
    # Same noise, same picture: batched convolutions may round differently from single ones on the CPU, so allow
    # a level or two of 255; a wrong seed gives a different picture everywhere (checked on image 0 just below).
    assert np.abs(_arr(batch.images[1]) - _arr(single.images[0])).max() <= 2
    assert np.abs(_arr(batch.images[0]) - _arr(batch.images[1])).mean() > 10


def test_concurrent_requests_never_mix(sd1):
    prompts = [("a red cat", 1), ("a blue dog", 2), ("a green toy", 3)]
    expected = {p: _arr(generate(sd1, GenerateRequest(p, seed=s, steps=2, width=32, height=32)).images[0])
                for p, s in prompts}
    got, threads = {}, []
    for p, s in prompts:
        t = threading.Thread(target=lambda p=p, s=s: got.__setitem__(
            p, _arr(generate(sd1, GenerateRequest(p, seed=s, steps=2, width=32, height=32)).images[0])))
        threads.append(t)
        t.start()
    [t.join() for t in threads]
    assert all(np.array_equal(got[p], expected[p]) for p, _ in prompts)


def test_cancel_stops_at_the_step_and_the_model_stays_usable(sd1):
    cancel, seen = threading.Event(), []

    def on_step(step, total, _preview):
        seen.append(step)
        cancel.set()

    with pytest.raises(Cancelled):
        generate(sd1, GenerateRequest("a cat", seed=1, steps=10, width=32, height=32), on_step=on_step, cancel=cancel)
    assert seen == [1]
    assert sd1.lock.acquire(blocking=False)
    sd1.lock.release()
    assert len(generate(sd1, GenerateRequest("a cat", seed=1, steps=2, width=32, height=32)).images) == 1


def test_concept_changes_the_image_and_a_wrong_size_concept_is_refused(sd1):
    plain = generate(sd1, GenerateRequest("a photo of <me>", seed=3, steps=2, width=32, height=32)).images[0]
    me = Concept("<me>", {"text_encoder": torch.randn(2, 768)}, {})
    with_concept = generate(sd1, GenerateRequest("a photo of <me>", concepts=[me], seed=3, steps=2, width=32, height=32))
    assert not np.array_equal(_arr(plain), _arr(with_concept.images[0]))
    assert "Concepts: <me>" in with_concept.infotexts[0]
    sd2_file = Concept("<wide>", {"text_encoder": torch.randn(1, 1024)}, {})
    with pytest.raises(ConceptMismatchError, match="1024"):
        generate(sd1, GenerateRequest("a <wide>", concepts=[sd2_file], steps=2, width=32, height=32))


def test_img2img_and_inpaint_produce_pictures_of_the_input_size(sd1):
    picture = Image.new("RGB", (40, 32), (200, 30, 30))
    out = generate(sd1, GenerateRequest("a cat", init_image=picture, strength=0.6, steps=3, seed=1))
    assert out.images[0].size == (40, 32)
    mask = Image.new("L", (40, 32), 0)
    mask.paste(255, (10, 10, 30, 24))
    out = generate(sd1, GenerateRequest("a cat", init_image=picture, mask=mask, steps=3, seed=1))
    assert out.images[0].size == (40, 32)
    with pytest.raises(ValueError, match="mask is 20x20 but the picture is 40x32"):
        generate(sd1, GenerateRequest("a cat", init_image=picture, mask=Image.new("L", (20, 20)), steps=2))


def test_validation_messages_name_the_value(sd1):
    with pytest.raises(ValueError, match="multiples of 8 but are 65 and 64"):
        generate(sd1, GenerateRequest("a cat", width=65, height=64))
    with pytest.raises(ValueError, match="unknown scheduler"):
        generate(sd1, GenerateRequest("a cat", scheduler="nope"))


def test_png_parameters_round_trip(sd1, tmp_path):
    req = GenerateRequest("a red cat\non two lines", negative_prompt="blurry", seed=42, steps=2, guidance=5.0,
                          scheduler="ddim", width=32, height=32)
    out = generate(sd1, req)
    path = save_png(out.images[0], tmp_path / "x.png")
    back = read_infotext(path)
    assert back == {"prompt": "a red cat\non two lines", "negative_prompt": "blurry", "steps": 2, "guidance": 5.0,
                    "seed": 42, "scheduler": "ddim", "width": 32, "height": 32}


def test_width_beyond_the_model_bound_is_refused_naming_value_bound_and_model(sd1):
    """Guards against a 100000x100000 request allocating memory: refused by validate, before any work."""
    with pytest.raises(ValueError, match=r"width 100000 is outside 8\.\.128, the sizes sd1 \(native 32x32\) draws at"):
        generate(sd1, GenerateRequest("a cat", width=100_000, height=32, steps=1))
    with pytest.raises(ValueError, match=r"height 136 is outside 8\.\.128"):
        generate(sd1, GenerateRequest("a cat", width=32, height=136, steps=1))
    assert generate(sd1, GenerateRequest("a cat", width=128, height=8, steps=1, seed=1)).images[0].size == (128, 8)


def test_seeds_beyond_64_bits_are_refused_clearly_and_minus_1_is_random(sd1):
    """Guards against torch's "Overflow when unpacking long long" for seed 2**70."""
    with pytest.raises(ValueError, match=r"seed 1180591620717411303424 is out of range: use 0 to 9223372036854775807"):
        generate(sd1, GenerateRequest("a cat", seed=2**70, steps=1, width=32, height=32))
    with pytest.raises(ValueError, match=r"seed -2 is out of range: .* or -1 for a random one"):
        generate(sd1, GenerateRequest("a cat", seed=-2, steps=1, width=32, height=32))
    with pytest.raises(ValueError, match=r"for a batch of 2 \(it uses seed \.\.\. seed \+ 1\): use 0 to "):
        generate(sd1, GenerateRequest("a cat", seed=2**63 - 1, batch=2, steps=1, width=32, height=32))
    last = generate(sd1, GenerateRequest("a cat", seed=2**63 - 1, steps=1, width=32, height=32))
    assert last.seeds == [2**63 - 1]
    assert 0 <= generate(sd1, GenerateRequest("a cat", seed=-1, steps=1, width=32, height=32)).seeds[0] < 2**32


def test_a_big_init_image_and_its_mask_are_drawn_at_the_working_size(sd1):
    """A camera-sized picture runs at 2x the model's side (64 here), not at its own size; its mask goes with it."""
    picture = Image.new("RGB", (1600, 1200), (200, 30, 30))
    out = generate(sd1, GenerateRequest("a cat", init_image=picture, strength=0.5, steps=2, seed=1))
    assert out.images[0].size == (64, 48) and "Size: 64x48" in out.infotexts[0]
    mask = Image.new("L", (1600, 1200), 0)
    mask.paste(255, (400, 300, 1200, 900))
    out = generate(sd1, GenerateRequest("a cat", init_image=picture, mask=mask, steps=2, seed=1))
    assert out.images[0].size == (64, 48)


def test_a_1x1_or_odd_sized_init_image_is_scaled_not_refused(sd1):
    """Guards against diffusers' "multiples of 8" reaching the user for a 1x1 icon or a 500x375 photo."""
    dot = generate(sd1, GenerateRequest("a cat", init_image=Image.new("RGB", (1, 1), (9, 9, 9)), steps=2, seed=1))
    assert dot.images[0].size == (8, 8)
    odd = generate(sd1, GenerateRequest("a cat", init_image=Image.new("RGB", (45, 35)), steps=2, seed=1))
    assert odd.images[0].size == (48, 32)


def test_a_generation_checks_each_concept_fits_once(sd1, monkeypatch):
    """Guards against the fit check repeated per request (it ran in the library, in validate and per encode): the
    prompt encoder's check in pipeline_kwargs is the one every generation passes."""
    import studio.engine.prompts as prompts

    calls = []
    real = prompts.check_fits
    monkeypatch.setattr(prompts, "check_fits",
                        lambda concept, dims, **kw: calls.append(concept.token) or real(concept, dims, **kw))
    me = Concept("<me>", {"text_encoder": torch.randn(2, 768)}, {})
    generate(sd1, GenerateRequest("a photo of <me>", negative_prompt="blurry <me>", concepts=[me], seed=3, steps=2,
                                  width=32, height=32, preview_every=0))
    assert calls == ["<me>"]
