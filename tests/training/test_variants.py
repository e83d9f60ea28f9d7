"""The paper's variants on the demo model: per-layer words (xti), progressive extension, per-image tokens, the
norm control and stop-when-learned — each trains, resumes bit for bit and is applied per request like any concept."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from studio.cli import main
from studio.engine.generate import GenerateRequest, generate
from studio.engine.learned.layer_word import XtiConcept, cross_attention_layers
from studio.engine.learned.registry import load_concept
from studio.engine.models import ModelManager
from studio.training import TrainConfig, Trainer
from studio.training.resume import load_state

REPO = Path(__file__).resolve().parents[2]
PICTURES = REPO / "assets" / "concepts" / "toy-ladybug"


@pytest.fixture(scope="module")
def demo(demo_model_dir):
    return ModelManager().load(demo_model_dir)


def _config(**kw) -> TrainConfig:
    base = dict(init_text="toy", steps=4, batch_size=2, seed=1, learning_rate=0.05, stop_when_learned=False)
    return TrainConfig("<lb>", **{**base, **kw})


def test_xti_learns_one_word_per_cross_attention_layer_and_generates_with_it(demo, tmp_path):
    word = Trainer(demo, _config(method="xti"), PICTURES, tmp_path / "x.safetensors").run()
    layers = cross_attention_layers(demo.pipe.unet)
    assert isinstance(word, XtiConcept) and word.layers == layers
    stacked = torch.stack([v["text_encoder"] for v in word.layer_vectors])
    assert float((stacked - stacked.mean(0)).abs().max()) > 0, "every layer learned the same vectors"
    read = load_concept(tmp_path / "x.safetensors")
    assert isinstance(read, XtiConcept) and len(read.layers) == len(layers)
    picture = generate(demo, GenerateRequest("a photo of <lb> on a black background", concepts=[read], seed=1,
                                             steps=4)).images[0]
    plain = generate(demo, GenerateRequest("a photo of <lb> on a black background",
                                           concepts=[read.__class__.__bases__[0](read.token, read.vectors, {})],
                                           seed=1, steps=4)).images[0]
    assert np.abs(np.asarray(picture, float) - np.asarray(plain, float)).max() > 0  # the layers matter


def test_inspect_reports_xti_and_its_layer_count(demo, tmp_path, capsys):
    Trainer(demo, _config(method="xti", steps=2), PICTURES, tmp_path / "x.safetensors").run()
    assert main(["concepts", "inspect", str(tmp_path / "x.safetensors"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "xti" and info["layers"] == len(cross_attention_layers(demo.pipe.unet))


def test_progressive_extension_adds_vectors_at_their_steps(demo, tmp_path):
    events = []
    word = Trainer(demo, _config(progressive="1:0,2:2,3:3"), PICTURES, tmp_path / "p.safetensors").run(events.append)
    assert word.n_vectors == 3
    short = Trainer(demo, _config(progressive="1:0,2:2,3:30"), PICTURES, tmp_path / "s.safetensors").run()
    assert short.n_vectors == 2  # the third vector's step never came
    init = demo.pipe.text_encoder.get_input_embeddings().weight
    start = init[demo.pipe.tokenizer("toy", add_special_tokens=False).input_ids[0]]
    state = load_state(tmp_path / "s.safetensors")
    assert torch.equal(state.params["text_encoder"][2], start.detach().float())  # waiting at its init-word start


def test_per_image_tokens_save_the_shared_word_and_optionally_each_pictures(demo, tmp_path):
    word = Trainer(demo, _config(per_image_tokens=True, keep_image_words=True), PICTURES,
                   tmp_path / "w.safetensors").run()
    plain = Trainer(demo, _config(), PICTURES, tmp_path / "plain.safetensors").run()
    assert word.n_vectors == 1
    assert float((word.vectors["text_encoder"] - plain.vectors["text_encoder"]).abs().max()) > 0
    saved = sorted(p.name for p in (tmp_path / "w-image-words").glob("*.safetensors"))
    assert saved == [f"lb-image{i}.safetensors" for i in range(len(list(PICTURES.glob("*.png"))))]
    assert load_concept(tmp_path / "w-image-words" / saved[0]).meta["picture"].endswith(".png")


def test_keep_norm_holds_the_vectors_at_the_vocabularys_median_norm(demo, tmp_path):
    word = Trainer(demo, _config(keep_norm=True, learning_rate=0.5), PICTURES, tmp_path / "n.safetensors").run()
    median = float(demo.pipe.text_encoder.get_input_embeddings().weight.detach().norm(dim=1).median())
    assert abs(float(word.vectors["text_encoder"].norm(dim=-1).max()) - median) <= 1e-4


@pytest.mark.parametrize("variant", [dict(method="xti"), dict(progressive="1:0,2:3"), dict(per_image_tokens=True),
                                     dict(stop_when_learned=True, stop_every=1, stop_window=10)])
def test_every_variant_resumes_bit_for_bit(demo, tmp_path, variant):
    straight = Trainer(demo, _config(**variant), PICTURES, tmp_path / "a.safetensors").run()
    cancel = threading.Event()
    stop = lambda e: cancel.set() if e.kind == "step" and e.step == 2 else None  # noqa: E731
    Trainer(demo, _config(save_every=2, **variant), PICTURES, tmp_path / "b.safetensors").run(stop, cancel)
    resumed = Trainer(demo, _config(resume=str(tmp_path / "b-step2.safetensors"), **variant), PICTURES,
                      tmp_path / "b.safetensors").run()
    want, got = load_state(tmp_path / "a.safetensors"), load_state(tmp_path / "b.safetensors")
    assert want.params.keys() == got.params.keys()
    assert max(float((want.params[k] - got.params[k]).abs().max()) for k in want.params) <= 1e-6
    assert want.scores == got.scores
    assert float((straight.vectors["text_encoder"] - resumed.vectors["text_encoder"]).abs().max()) <= 1e-6


def test_stop_when_learned_stops_once_the_held_back_score_is_flat(demo, tmp_path):
    events = []
    cfg = _config(steps=400, learning_rate=5e-3, stop_when_learned=True)
    word = Trainer(demo, cfg, PICTURES, tmp_path / "s.safetensors").run(events.append)
    scores = [e for e in events if e.kind == "score"]
    finished = events[-1]
    assert finished.kind == "finished" and "converged at step" in finished.message
    steps = int(word.meta["steps"])
    assert steps == finished.step < 400 and steps % cfg.stop_every == 0
    assert [e.step for e in scores] == list(range(0, steps + 1, cfg.stop_every))
    values = [e.loss for e in scores]
    assert min(values[-cfg.stop_window:]) > min(values[:-cfg.stop_window]) * (1 - cfg.stop_threshold)
    assert not any(min(values[k - cfg.stop_window + 1:k + 1]) > min(values[:k - cfg.stop_window + 1])
                   * (1 - cfg.stop_threshold) for k in range(cfg.stop_window, len(values) - 1)), "it stopped late"
