"""The demo model's recipe (studio.demo.build) on a few pictures and steps: it writes a folder the ModelManager
loads and generates from, repeatably, and its VAE loss looks where the objects are."""

import json

import torch

from studio.demo import build
from studio.demo.world import Obj, Scene, render
from studio.engine.generate import GenerateRequest, generate
from studio.engine.models import ModelManager


def _pixels(scene: Scene) -> torch.Tensor:
    return build._to_tensor([render(scene, build.RESOLUTION)])


def test_object_weight_marks_the_object_and_not_the_background():
    scene = Scene([Obj("square", "red", "solid", "big", "center")], "white", "flat")
    weight = build._object_weight(_pixels(scene))[0, 0]
    assert weight[0, 0] == 1.0 and weight[-1, -1] == 1.0  # corners: background
    assert weight[32, 32] == build.OBJECT_WEIGHT  # the middle of a big centred square
    assert 0.05 < (weight > 1).float().mean() < 0.6


def test_object_crops_find_the_object():
    scene = Scene([Obj("circle", "blue", "solid", "small", "left")], "gray", "flat")
    x = _pixels(scene).repeat(4, 1, 1, 1)
    crops = build._object_crops(x, torch.Generator().manual_seed(0), tries=16)
    assert crops.shape == (4, 3, build.VAE_CROP, build.VAE_CROP)
    assert all((build._object_weight(c[None]) > 1).any() for c in crops)


def test_a_tiny_build_loads_generates_and_repeats(tmp_path):
    def run(out):
        return build.build(out, minutes=5, seed=3, n_images=48, vae_steps=5, unet_steps=3, snapshot_minutes=0,
                           batch=4, ceiling_pictures=8)

    first = run(tmp_path / "a")
    log = json.loads((first / "training_log.json").read_text())
    assert log["recipe"] == 5 and log["schedule"] == "sd" and log["unet_steps"] == 3 and log["vae_steps"] == 5
    assert 0.0 <= log["vae_judge"]["color"] <= 1.0  # the judge read the VAE's reconstructions
    model = ModelManager().load(first)
    assert model.pipe.scheduler.config.prediction_type == "epsilon"
    result = generate(model, GenerateRequest(prompt="a red circle", seed=0, steps=2, width=64, height=64,
                                             preview_every=0))
    assert result.images[0].size == (64, 64)

    second = run(tmp_path / "b")  # same seed, same steps: the same weights
    a = ModelManager().load(first).pipe.unet.state_dict()
    b = ModelManager().load(second).pipe.unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_last_training_step_is_pure_noise_and_keeps_its_loss_weight():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(**build.NOISE_SCHEDULES["zero-snr"])
    assert float(sched.alphas_cumprod[-1]) == 0.0  # nothing of the picture is left to read off the noise
    x0, noise = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    last = torch.tensor([999])
    assert torch.allclose(sched.add_noise(x0, noise, last), noise)
    assert torch.allclose(sched.get_velocity(x0, noise, last), -x0)  # the target there: the picture itself


def test_pyramid_noise_keeps_unit_variance_and_hides_the_layout():
    """Multi-resolution noise: still unit variance per picture, but its 2x2 means (where the big shapes are) vary
    about 3x more than white noise's, so the noisiest steps no longer show the layout; repeatable per generator."""
    white = torch.randn(256, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    mixed = build.pyramid_noise(white, torch.Generator().manual_seed(1), 4, 0.7)
    again = build.pyramid_noise(white, torch.Generator().manual_seed(1), 4, 0.7)
    assert torch.equal(mixed, again) and mixed.shape == white.shape
    assert torch.allclose(mixed.flatten(1).std(1), torch.ones(256), atol=1e-5)
    coarse = lambda x: float(torch.nn.functional.avg_pool2d(x, 8).std())  # noqa: E731
    assert coarse(white) < 0.15 and coarse(mixed) > 2.5 * coarse(white)


def test_a_zero_snr_build_saves_a_v_prediction_sampler(tmp_path):
    out = build.build(tmp_path / "z", minutes=5, seed=3, n_images=16, vae_steps=2, unet_steps=2, snapshot_minutes=0,
                      batch=4, ceiling_pictures=0, schedule="zero-snr")
    sampler = ModelManager().load(out).pipe.scheduler.config  # sampling starts from the last timestep
    assert sampler.rescale_betas_zero_snr and sampler.prediction_type == "v_prediction"
    assert sampler.timestep_spacing == "trailing"
    assert json.loads((out / "training_log.json").read_text())["schedule"] == "zero-snr"


def test_a_build_leaves_the_thread_count_as_it_found_it(tmp_path):
    """Guards the flake of the repeat test above: torch's thread count is process-wide and sets how float sums are
    split, and build() set it to all cores and left it so, changing every later result of the process."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        build.build(tmp_path / "t", minutes=5, seed=3, n_images=8, vae_steps=1, unet_steps=1, snapshot_minutes=0,
                    batch=2, ceiling_pictures=0)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_a_world_v3_build_continues_build_5_with_new_words_and_the_look_code(tmp_path, demo_model_dir):
    """Continuing a build whose tokenizer lacks the levers' words (issue 28's pilots): the embedding table is resized
    for the new tokenizer, every old word keeps its row, a new word starts at its near word's row (or the words'
    mean), and the saved look-code word is the codes' centre; the build records its world for the evaluation."""
    from transformers import CLIPTextModel, CLIPTokenizer

    from studio.demo.tokenizer import build_clip_tokenizer
    from studio.demo.vocab import demo_words
    from studio.demo.world import LOOK_CODE_WORD, LOOK_WORDS, WorldOptions

    assert set(build.NEW_WORD_INIT) == set(LOOK_WORDS) | {LOOK_CODE_WORD}  # every word a lever adds has its start
    options = WorldOptions(looks="coarse", look_words=0.5, look_code=0.5)
    tokenizer = build_clip_tokenizer(demo_words(options=options), tmp_path / "tokenizer")
    encoder, _ = build.warm_start(demo_model_dir, tokenizer)
    old = CLIPTextModel.from_pretrained(demo_model_dir / "text_encoder").get_input_embeddings().weight
    old_vocab = CLIPTokenizer.from_pretrained(demo_model_dir / "tokenizer").get_vocab()
    rows, vocab = encoder.get_input_embeddings().weight, tokenizer.get_vocab()
    assert rows.shape[0] == len(tokenizer) > old.shape[0]
    assert torch.equal(rows[vocab["red</w>"]], old[old_vocab["red</w>"]])
    assert torch.equal(rows[vocab["stripes</w>"]], old[old_vocab["striped</w>"]])
    assert torch.equal(rows[vocab[f"{LOOK_CODE_WORD}</w>"]], old[old_vocab["toy</w>"]])
    assert torch.equal(rows[vocab["round</w>"]], old[old_vocab["circle</w>"]])
    words = [i for token, i in old_vocab.items() if token.endswith("</w>") and len(token) > len("x</w>")]
    assert torch.allclose(rows[vocab["long</w>"]], old[words].mean(0))  # no near word: the earlier words' mean

    out = build.build(tmp_path / "v3", minutes=5, seed=3, n_images=24, unet_steps=2, snapshot_minutes=0, batch=4,
                      ceiling_pictures=0, vae_dir=demo_model_dir / "vae", init_from=demo_model_dir, threads=1,
                      toy_rate=1.0, options=options)
    log = json.loads((out / "training_log.json").read_text())
    assert log["world"] == 3 and log["world_options"] == {"looks": "coarse", "look_words": 0.5, "look_code": 0.5}
    saved = ModelManager().load(out).pipe
    word = saved.tokenizer.convert_tokens_to_ids(f"{LOOK_CODE_WORD}</w>")
    centre = torch.tensor(log["look_code"]["center"])
    assert torch.allclose(saved.text_encoder.get_input_embeddings().weight[word], centre)
