"""Textual Inversion trainer on tiny random models: learns, touches nothing else, writes loadable files, cancels."""

import threading

import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from studio.engine.learned.registry import load_concept
from studio.engine.models import ModelManager
from studio.training import TrainConfig, TrainError, Trainer
from studio.training.config import parse_lr_schedule


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_training_changes_only_the_new_vectors(tiny_model_dirs, pictures, tmp_path, family):
    model = ModelManager().load(tiny_model_dirs[family])
    encoders = [model.pipe.text_encoder] + ([model.pipe.text_encoder_2] if family == "sdxl" else [])
    before = [e.get_input_embeddings().weight.detach().clone() for e in encoders]
    unet_before = next(model.pipe.unet.parameters()).detach().clone()
    events = []
    cfg = TrainConfig("<thing>", init_text="toy", n_vectors=2, steps=6, batch_size=2, learning_rate=0.05)
    concept = Trainer(model, cfg, pictures, tmp_path / "out").run(events.append)
    assert all(torch.equal(e.get_input_embeddings().weight, b) for e, b in zip(encoders, before))
    assert torch.equal(next(model.pipe.unet.parameters()), unet_before)
    init = model.pipe.text_encoder.get_input_embeddings().weight[model.pipe.tokenizer("toy", add_special_tokens=False).input_ids[0]]
    assert not torch.allclose(concept.vectors["text_encoder"][0], init)
    assert concept.vectors["text_encoder"].shape == (2, 768)
    if family == "sdxl":
        assert concept.vectors["text_encoder_2"].shape == (2, 1280)
    kinds = [e.kind for e in events]
    assert kinds[0] == "started" and kinds[-1] == "finished" and kinds.count("step") == 6


def test_loss_falls_on_fixed_noise(tiny_model_dirs, pictures, tmp_path):
    """Training lowers the denoising loss of the training pictures under the same noise and timesteps."""
    from studio.training.data import encode_latents, load_images, find_images

    model = ModelManager().load(tiny_model_dirs["sd1"])
    images, _ = load_images(find_images(pictures), 32)
    latents = encode_latents(model.pipe.vae, images, False, "cpu", torch.float32)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(latents.shape, generator=g)
    t = torch.full((len(latents),), 500)
    from diffusers import DDPMScheduler
    noisy = DDPMScheduler.from_config(model.pipe.scheduler.config).add_noise(latents, noise, t)

    def loss_of(concept):
        with torch.no_grad():
            emb = model.encoder.encode(["a photo of a <thing>"] * len(latents), [concept]).embeds
            return torch.nn.functional.mse_loss(model.pipe.unet(noisy, t, emb).sample, noise).item()

    cfg = TrainConfig("<thing>", init_text="toy", steps=1, learning_rate=0.0, resolution=32)
    start = Trainer(model, cfg, pictures, tmp_path / "a").run()
    cfg = TrainConfig("<thing>", init_text="toy", steps=40, batch_size=4, learning_rate=0.05, resolution=32)
    trained = Trainer(model, cfg, pictures, tmp_path / "b").run()
    assert loss_of(trained) < loss_of(start)


def test_written_file_loads_in_studio_and_diffusers_with_the_same_embeddings(tiny_model_dirs, pictures, tmp_path):
    model = ModelManager().load(tiny_model_dirs["sd1"])
    events = []
    cfg = TrainConfig("<thing>", init_text="toy", steps=3, batch_size=2, save_every=2)
    concept = Trainer(model, cfg, pictures, tmp_path).run(events.append)
    path = tmp_path / "thing.safetensors"
    assert [e.path.name for e in events if e.kind == "checkpoint"] == ["thing-step2.safetensors"]
    loaded = load_concept(path, token="<thing>")
    assert torch.equal(loaded.vectors["text_encoder"], concept.vectors["text_encoder"])
    ref = StableDiffusionPipeline.from_pretrained(tiny_model_dirs["sd1"])
    ref.load_textual_inversion(str(path), token="<thing>")
    with torch.no_grad():
        theirs = ref.encode_prompt("a photo of <thing>", "cpu", 1, False)[0]
        ours = model.encoder.encode(["a photo of <thing>"], [loaded]).embeds
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0)


def test_cancel_leaves_a_valid_file(tiny_model_dirs, pictures, tmp_path):
    model = ModelManager().load(tiny_model_dirs["sd1"])
    cancel = threading.Event()

    def on_event(event):
        if event.kind == "step" and event.step == 2:
            cancel.set()

    events = []
    Trainer(model, TrainConfig("<thing>", steps=50, batch_size=1), pictures, tmp_path).run(
        lambda e: (events.append(e), on_event(e)), cancel)
    assert events[-1].kind == "cancelled" and events[-1].step == 2
    assert load_concept(events[-1].path).meta["steps"] == "2"


def test_bad_pictures_are_reported_and_training_goes_on(tiny_model_dirs, pictures, tmp_path):
    (pictures / "broken.png").write_bytes(b"not a png")
    Image.new("RGB", (8, 8)).save(pictures / "tiny.png")
    events = []
    Trainer(ModelManager().load(tiny_model_dirs["sd1"]), TrainConfig("<t>", steps=1), pictures, tmp_path).run(events.append)
    warnings = [e.message for e in events if e.kind == "warning"]
    assert any("broken.png" in w for w in warnings) and any("tiny.png" in w for w in warnings)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "x.png").write_bytes(b"junk")
    with pytest.raises(TrainError, match="no usable training pictures: x.png"):
        Trainer(ModelManager().load(tiny_model_dirs["sd1"]), TrainConfig("<t>", steps=1), empty, tmp_path).run()


def test_diverging_loss_stops_with_a_clear_message_and_keeps_good_vectors(tiny_model_dirs, pictures, tmp_path):
    events = []
    cfg = TrainConfig("<t>", steps=5, learning_rate=1e36)  # diverges within a step or two
    with pytest.raises(TrainError, match="lower the learning rate"):
        Trainer(ModelManager().load(tiny_model_dirs["sd1"]), cfg, pictures, tmp_path).run(events.append)
    assert events[-1].kind == "failed"
    assert torch.isfinite(load_concept(events[-1].path).vectors["text_encoder"]).all()


def test_a_finite_but_exploding_norm_stops_the_run_naming_the_learning_rate(tiny_model_dirs, pictures, tmp_path):
    """Guards 'learning rate 1e6: vectors reach 5.7e6, status ready': the loss stays finite, the norm explodes."""
    events = []
    model = ModelManager().load(tiny_model_dirs["sd1"])
    cfg = TrainConfig("<t>", steps=5, learning_rate=1e6)
    with pytest.raises(TrainError, match=r"norm reached .* lower the learning rate \(now 1e\+06\)"):
        Trainer(model, cfg, pictures, tmp_path).run(events.append)
    assert events[-1].kind == "failed" and "t.safetensors" in events[-1].message
    kept = load_concept(events[-1].path).vectors["text_encoder"]
    largest = model.pipe.text_encoder.get_input_embeddings().weight.norm(dim=1).max()
    assert kept.norm(dim=-1).max() <= 100 * largest
    # The default learning rate stays well inside the limit.
    assert Trainer(model, TrainConfig("<ok>", steps=3), pictures, tmp_path / "ok").run().vectors[
        "text_encoder"].norm(dim=-1).max() < 10 * largest


def test_out_ending_in_safetensors_is_the_file_and_hostile_words_stay_in_the_folder(tiny_model_dirs, pictures,
                                                                                  tmp_path):
    model = ModelManager().load(tiny_model_dirs["sd1"])
    target = tmp_path / "out" / "my-file.safetensors"
    Trainer(model, TrainConfig("<t>", steps=2, save_every=1), pictures, target).run()
    assert sorted(p.name for p in target.parent.iterdir()) == [
        "my-file-step1.safetensors", "my-file-step1.safetensors.trainstate", "my-file.safetensors",
        "my-file.safetensors.trainstate"]
    assert load_concept(target).token == "<t>"
    folder = tmp_path / "deep" / "folder"
    Trainer(model, TrainConfig("../../evil", steps=1), pictures, folder).run()
    assert sorted(p.name for p in folder.iterdir()) == ["evil.safetensors", "evil.safetensors.trainstate"]
    assert not (tmp_path / "evil.safetensors").exists()
    with pytest.raises(ValueError, match="at most 100"):
        TrainConfig("x" * 300)


def test_a1111_learning_rate_schedule_and_bad_config():
    lr = parse_lr_schedule("0.005:100, 1e-3:1000, 1e-5", 0.005, 0, 2000)
    assert (lr(0), lr(99), lr(100), lr(999), lr(1500)) == (0.005, 0.005, 1e-3, 1e-3, 1e-5)
    with pytest.raises(ValueError, match="cannot read learning-rate schedule"):
        parse_lr_schedule("fast please", 0.005, 0, 10)
    with pytest.raises(ValueError, match="one word"):
        TrainConfig("my cat")


def test_captions_template_refuses_pictures_without_a_caption_before_any_step(tiny_model_dirs, pictures, tmp_path):
    """Guards 'captions' quietly prompting uncaptioned pictures with the object templates."""
    (pictures / "p0.txt").write_text("a photo of {} on a table")
    (pictures / "p1.txt").write_text("  \n")
    events = []
    cfg = TrainConfig("<t>", template="captions", steps=2)
    with pytest.raises(TrainError, match=r"needs a caption for every picture, but 3 of 4 have none: p1.png \(p1.txt "
                                         r"is empty\), p2.png \(p2.txt missing\), p3.png") as caught:
        Trainer(ModelManager().load(tiny_model_dirs["sd1"]), cfg, pictures, tmp_path / "out").run(events.append)
    assert "or train with template 'object' or 'style'" in str(caught.value)
    assert not any(e.kind == "step" for e in events) and not (tmp_path / "out").exists()


def test_captions_template_prompts_each_picture_with_its_caption(tiny_model_dirs, pictures, tmp_path):
    for k in range(4):
        (pictures / f"p{k}.txt").write_text(f"a drawing of [name], number {k}")
    model = ModelManager().load(tiny_model_dirs["sd1"])
    prompts, encode = [], model.encoder.encode
    model.encoder.encode = lambda texts, concepts=(), **kw: prompts.extend(texts) or encode(texts, concepts, **kw)
    try:
        # no held-back scoring: only the training batches' prompts are counted
        Trainer(model, TrainConfig("<t>", template="captions", steps=3, batch_size=2, stop_when_learned=False),
                pictures, tmp_path).run()
    finally:
        del model.encoder.encode
    assert len(prompts) == 6 and set(prompts) <= {f"a drawing of <t>, number {k}" for k in range(4)}
