"""Resume: a run stopped at step 2 and continued to 4 ends where an uninterrupted 4-step run ends."""

import threading

import pytest

from studio.engine.learned.registry import load_concept
from studio.engine.models import ModelManager
from studio.training import TrainConfig, TrainError, Trainer
from studio.training.resume import load_state, save_state, state_path


def _config(**kw):
    base = dict(init_text="toy", n_vectors=2, steps=4, batch_size=2, learning_rate=0.05, lr_schedule="cosine",
                regularization=0.1, seed=3)
    return TrainConfig("<thing>", **{**base, **kw})


def _stop_after(step):
    cancel = threading.Event()
    return cancel, lambda e: cancel.set() if e.kind == "step" and e.step == step else None


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_two_plus_two_steps_equal_four(tiny_model_dirs, pictures, tmp_path, family):
    """Guards against losing the Adam moments, the noise/sampler RNG state or the initial vectors on resume."""
    model = ModelManager().load(tiny_model_dirs[family])
    straight = Trainer(model, _config(), pictures, tmp_path / "straight").run()

    cancel, on_event = _stop_after(2)
    Trainer(model, _config(save_every=2), pictures, tmp_path / "parts").run(on_event, cancel)
    checkpoint = tmp_path / "parts" / "thing-step2.safetensors"
    assert state_path(checkpoint).is_file()
    events = []
    resumed = Trainer(model, _config(resume=str(checkpoint)), pictures, tmp_path / "parts").run(events.append)

    assert "resumed from thing-step2.safetensors at step 2" in events[0].message
    assert [e.step for e in events if e.kind == "step"] == [3, 4]
    assert resumed.vectors.keys() == straight.vectors.keys()
    for key in straight.vectors:  # SDXL: both encoders' vectors
        assert (resumed.vectors[key] - straight.vectors[key]).abs().max().item() <= 1e-6
    assert load_concept(tmp_path / "parts" / "thing.safetensors").meta["steps"] == "4"
    # The moments matter: the same checkpoint with Adam's state dropped ends elsewhere (so the check can fail).
    state = load_state(checkpoint)
    state.adam = {}
    save_state(checkpoint, state)
    forgetful = Trainer(model, _config(resume=str(checkpoint)), pictures, tmp_path / "parts").run()
    assert (forgetful.vectors["text_encoder"] - straight.vectors["text_encoder"]).abs().max().item() > 1e-4

def test_a_folder_resumes_from_its_newest_checkpoint_of_that_token(tiny_model_dirs, pictures, tmp_path):
    model = ModelManager().load(tiny_model_dirs["sd1"])
    out = tmp_path / "out"
    cancel, on_event = _stop_after(3)
    Trainer(model, _config(steps=6, save_every=1), pictures, out).run(on_event, cancel)
    Trainer(model, TrainConfig("<other>", steps=4, save_every=1), pictures, out).run()  # more steps, other word
    events = []
    Trainer(model, _config(steps=6, resume=str(out)), pictures, out).run(events.append)
    assert events[0].kind == "started" and events[0].step == 3
    assert [e.step for e in events if e.kind == "step"] == [4, 5, 6]


def test_resume_refuses_what_it_cannot_continue(tiny_model_dirs, pictures, tmp_path):
    model = ModelManager().load(tiny_model_dirs["sd1"])
    Trainer(model, _config(steps=2), pictures, tmp_path).run()
    done = tmp_path / "thing.safetensors"
    with pytest.raises(TrainError, match=r"trained for <thing>, not <dog>: use --token <thing>"):
        Trainer(model, TrainConfig("<dog>", n_vectors=2, steps=4, resume=str(done)), pictures, tmp_path).run()
    with pytest.raises(TrainError, match=r"trained on a sd1 model .* but the loaded model is sd2"):
        Trainer(ModelManager().load(tiny_model_dirs["sd2"]), _config(resume=str(done)), pictures, tmp_path).run()
    with pytest.raises(TrainError, match="has 2 vectors per token but 1 were asked for: use --vectors 2"):
        Trainer(model, _config(n_vectors=1, resume=str(done)), pictures, tmp_path).run()
    with pytest.raises(TrainError, match="already trained 2 steps"):
        Trainer(model, _config(steps=2, resume=str(done)), pictures, tmp_path).run()
    state_path(done).unlink()
    with pytest.raises(TrainError, match="has no training state beside it"):
        Trainer(model, _config(resume=str(done)), pictures, tmp_path).run()
    with pytest.raises(TrainError, match="no checkpoint of <thing> to resume"):
        Trainer(model, _config(resume=str(tmp_path)), pictures, tmp_path).run()
