"""The Train tab's method choice as plain handler calls (no server): the form's method and options reach the
TrainConfig (a client that sends only the old fields trains Textual Inversion as before), dreambooth's size is said
from the loaded model before it trains, and each method's result ends where later prompts of the session find it."""

from __future__ import annotations

import secrets

import gradio as gr
import pytest
from safetensors import safe_open

from studio.engine.models import ModelManager
from studio.jobs.generation import request_for
from studio.library import ConceptLibrary
from studio.training.config import METHODS
from studio.training.methods import METHOD_CLASSES
from studio.ui.state import Studio
from studio.ui.tabs.library import human_size
from studio.ui.tabs.train import device_snapshots, method_info, model_folder_bytes, train_config, train_stream

OLD_FORM = dict(token="<box>", init="toy", kind="object", vectors=1, steps=2, lr=0.005, batch=1, preview_every=0)


@pytest.fixture()
def studio(tiny_model_dirs, tmp_path):
    manager = ModelManager()
    manager.load(tiny_model_dirs["sd1"])
    return Studio(manager, ConceptLibrary(tmp_path / "lib"), work_dir=tmp_path / "work")


def test_the_method_and_its_options_reach_the_train_config():
    assert train_config(OLD_FORM).method == "ti"  # a client that sends only the first fields
    cfg = train_config({**OLD_FORM, "method": "lora", "rank": 8, "unet_lr": 0, "class_word": " box ",
                        "prior_preservation": True, "class_images": 3, "prior_weight": 0.5, "regularization": 0.01})
    assert (cfg.method, cfg.rank, cfg.unet_lr, cfg.class_word) == ("lora", 8, None, "box")  # 0: the method's lr
    assert (cfg.prior_preservation, cfg.class_images, cfg.prior_weight, cfg.regularization) == (True, 3, 0.5, 0.01)
    lite = train_config({**OLD_FORM, "method": "pivotal", "rank": 8, "lite": True, "word_steps": 5, "unet_lr": 2e-4})
    assert (lite.rank, lite.lora_targets, lite.word_steps, lite.unet_lr) == (1, "cross-kv", 5, 2e-4)
    with pytest.raises(gr.Error, match="method must be one of ti, .*perfusion, not 'hypernetwork'"):
        train_config({**OLD_FORM, "method": "hypernetwork"})
    assert all(METHOD_CLASSES[m].summary for m in METHODS)  # every method the trainer knows has its line


def test_the_word_options_and_stop_when_learned_reach_the_train_config():
    """The options appended to the form; a client that leaves them out stops once learned (TrainConfig's default)."""
    old = train_config(OLD_FORM)
    assert (old.stop_when_learned, old.stop_every, old.progressive, old.per_image_tokens, old.keep_norm) == (
        True, 10, None, False, False)
    cfg = train_config({**OLD_FORM, "stop_when_learned": False, "stop_every": 5, "progressive": " 1:0,3:4 ",
                        "per_image_tokens": True, "keep_norm": True})
    assert (cfg.stop_when_learned, cfg.stop_every, cfg.progressive, cfg.per_image_tokens, cfg.keep_norm) == (
        False, 5, "1:0,3:4", True, True)
    assert cfg.n_vectors == 3  # the schedule's last count
    assert train_config({**OLD_FORM, "progressive": "  "}).progressive is None
    with pytest.raises(gr.Error, match="cannot read progressive schedule '2:5'"):
        train_config({**OLD_FORM, "progressive": "2:5"})


def tensor_bytes(folder) -> int:
    """The bytes of every tensor in a diffusers folder's safetensors files."""
    total = 0
    for file in folder.rglob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            total += sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
    return total


def test_a_pipelines_folder_size_is_counted_from_the_loaded_model_without_cached_loras(studio, tmp_path):
    """What `model_folder_bytes` counts is what `save_pretrained` writes, tensor for tensor, also while the LoRA
    runtime keeps an adapter in the UNet (which no saved model holds)."""
    from peft import LoraConfig

    pipe = studio.model.pipe
    pipe.save_pretrained(tmp_path / "saved", safe_serialization=True)
    sizes = model_folder_bytes(pipe)
    assert set(sizes) == {"unet", "vae", "text_encoder"} and sum(sizes.values()) == tensor_bytes(tmp_path / "saved")
    pipe.unet.add_adapter(LoraConfig(r=2, target_modules=["to_q"]), adapter_name="cached")
    assert model_folder_bytes(pipe) == sizes
    assert "MB" not in method_info(studio, "ti") and "Textual Inversion" in method_info(studio, "ti")


@pytest.mark.parametrize("method", ["xti", "pivotal", "lora", "dreambooth"])
def test_each_methods_result_ends_where_the_sessions_prompts_find_it(studio, concept_pictures, method):
    """xti: a session word, like TI's; pivotal/lora: a session LoRA (pivotal's word with it, its diffusers words file
    copied along) that a prompt's tag applies; dreambooth: a model folder beside the session's concept files, named
    in the status, no download."""
    session = secrets.token_urlsafe(12)  # a session with a folder of its own
    cfg = train_config({**OLD_FORM, "method": method, "rank": 2})
    said = method_info(studio, method)
    runs = train_stream(studio, lambda s, f, c: device_snapshots(studio, s, f, c), session, concept_pictures, cfg)
    *_, (status, download) = list(runs)
    if method == "dreambooth":  # the size said before training is what it wrote
        folder = studio.sessions.get(session).folder / "models" / "box"
        assert download is None and "The fine-tuned model “box” is kept in this session" in status
        assert "“box (trained in this session)” in the Model tab" in status and str(folder) not in status
        assert (folder / "model_index.json").is_file() and "“a photo of <box> toy”" in status
        assert f"about {human_size(tensor_bytes(folder))}: the UNet" in said and "in float32" in said
        return
    if method == "xti":  # a word per layer, read back from the session's own file after a restart too
        assert "<box> is ready" in status and download.endswith("box.safetensors")
        req, unknown = request_for({"prompt": "a photo of <box>"}, studio.library, session)
        (word,) = req.words
        assert word is studio.library.get("<box>", session) and unknown == []
        studio.library.drop_session(session)
        assert type(studio.library.get("<box>", session)).__name__ == "XtiConcept"
        return
    ready = "<box> is ready" if method == "pivotal" else "<lora:box:1> is ready"  # a pivotal word brings its LoRA
    assert download.endswith("box.safetensors") and ready in status
    lora = studio.library.lora("box", session)
    assert lora.path.parent.name == "loras" and str(lora.path) != download  # the session's own copy
    assert [w.token for w in lora.words] == (["<box>"] if method == "pivotal" else [])
    req, unknown = request_for({"prompt": "<lora:box:1> a photo of <box> toy"}, studio.library, session)
    assert [lora.name for lora, _ in req.loras] == ["box"]
    if method == "pivotal":  # its word is a concept of the request; lora's "<box>" is plain text it learned
        assert [c.token for c in req.words] == ["<box>"] and unknown == []
    else:  # lora: "<box>" is plain text of the phrase it learned, which its file names, so no warning
        assert lora.phrase.startswith("<box>") and unknown == []
