"""`--method perfusion` on the demo model: the keys stay locked to the class word, the values and the target learn,
the shared UNet is put back, a run resumes bit for bit (i* included), the covariance is measured once per model and
caption set, and a bad caption file is refused in one line before any step."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from studio.engine.learned.layer_word import cross_attention_layers
from studio.engine.learned.perfusion import DEMO_BETA, PerfusionConcept
from studio.engine.models import ModelManager
from studio.training import TrainConfig, TrainError, Trainer
from studio.training.methods.perfusion import TARGET, VALUE
from studio.training.resume import load_state

REPO = Path(__file__).resolve().parents[2]
PICTURES = REPO / "assets" / "concepts" / "toy-ladybug"


@pytest.fixture(scope="module")
def demo(demo_model_dir):
    return ModelManager().load(demo_model_dir)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("CONCEPT_STUDIO_CACHE", str(folder))
    return folder


def _config(**kw) -> TrainConfig:
    base = dict(init_text="toy", steps=4, batch_size=2, seed=1, method="perfusion")
    return TrainConfig("<lb>", **{**base, **kw})


def test_keys_stay_locked_while_values_and_target_learn(demo, tmp_path, cache):
    unet = demo.denoiser
    layers = cross_attention_layers(unet)
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    events = []
    learned = Trainer(demo, _config(preview_every=4), PICTURES, tmp_path / "lb.safetensors").run(events.append)
    assert isinstance(learned, PerfusionConcept) and learned.class_word == "toy"
    assert learned.beta == DEMO_BETA  # the demo model's measured gate, written into the file
    assert [type(unet.get_submodule(l).to_k) for l in layers] == [torch.nn.Linear] * len(layers)
    assert all(torch.equal(p, before[n]) for n, p in unet.named_parameters())
    # The key lock: o*_K is the class word's encoding through each key projection, and o*_V started there too.
    with torch.no_grad():
        attention = unet.get_submodule(layers[0])
        class_encoding = torch.linalg.lstsq(attention.to_k.weight, learned.keys[0][:, None]).solution[:, 0]
        assert torch.allclose(attention.to_k(class_encoding), learned.keys[0], atol=1e-4)
        start_value = attention.to_v(class_encoding)
    assert not torch.allclose(start_value, learned.values[0], atol=1e-4)  # the values learned
    assert any(e.kind == "preview" and e.images for e in events)
    assert len(list((cache / "perfusion").glob("*.safetensors"))) == 1


def test_a_run_resumes_bit_for_bit_with_its_target(demo, tmp_path):
    straight = tmp_path / "straight.safetensors"
    Trainer(demo, _config(), PICTURES, straight).run()
    cancel = threading.Event()
    parts = tmp_path / "parts.safetensors"
    stop = lambda e: cancel.set() if e.kind == "step" and e.step == 2 else None  # noqa: E731
    Trainer(demo, _config(save_every=2), PICTURES, parts).run(stop, cancel)
    Trainer(demo, _config(resume=str(tmp_path / "parts-step2.safetensors")), PICTURES, parts).run()
    want, got = load_state(straight).params, load_state(parts).params
    assert TARGET in want and any(k.startswith(VALUE) for k in want)
    assert want.keys() == got.keys()
    assert max(float((want[k] - got[k]).abs().max()) for k in want) <= 1e-6
    assert float((want[TARGET] - load_state(tmp_path / "parts-step2.safetensors").params[TARGET]).abs().max()) > 0


def test_the_covariance_is_measured_once_per_caption_set(demo, tmp_path, cache):
    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(f"a photo of a {w} toy on a white background" for w in
                                  ("red", "blue", "green", "yellow", "purple", "orange", "cyan", "pink", "big",
                                   "small", "striped", "dotted")))
    Trainer(demo, _config(steps=1), PICTURES, tmp_path / "a.safetensors").run()
    Trainer(demo, _config(steps=1), PICTURES, tmp_path / "b.safetensors").run()
    assert len(list((cache / "perfusion").glob("*.safetensors"))) == 1
    Trainer(demo, _config(steps=1, captions=str(captions)), PICTURES, tmp_path / "c.safetensors").run()
    assert len(list((cache / "perfusion").glob("*.safetensors"))) == 2


@pytest.mark.parametrize("content, message", [(None, "no such caption file"), ("two\nlines\n", "at least 10"),
                                              (b"\xff\xfe\x00bad", "not UTF-8")])
def test_a_bad_caption_file_is_refused_in_one_line(demo, tmp_path, content, message):
    path = tmp_path / "captions.txt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(TrainError, match=message) as caught:
        Trainer(demo, _config(captions=str(path)), PICTURES, tmp_path / "x.safetensors").run()
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "x.safetensors").exists()


def test_perfusion_trains_all_its_steps(demo, tmp_path):
    """Stopped once learned, runs ended near step 58 with half the identity of 400 steps (docs/benchmarks.md)."""
    events = []
    Trainer(demo, _config(steps=25, stop_every=1, stop_window=1, stop_threshold=0.9), PICTURES,
            tmp_path / "all.safetensors").run(events.append)
    assert [e.step for e in events if e.kind == "step"][-1] == 25 and not any(e.kind == "score" for e in events)
