"""The tabs' handlers called as plain functions (no server): every tab's pictures come from the one streamed
generation path, and a session's state lives in its Session (studio.jobs.session), not in the UI."""

from __future__ import annotations

import pytest
from PIL import Image

from studio.engine.models import ModelManager
from studio.library import ConceptLibrary
from studio.ui.state import Studio
from studio.ui.tabs.compose import compose
from studio.ui.tabs.inpaint import inpaint
from studio.ui.tabs.library import preview_concept
from studio.ui.tabs.style import style_transfer
from studio.ui.tabs.train import cancel_training, progress_view


@pytest.fixture()
def studio(tiny_model_dirs, tmp_path):
    manager = ModelManager()
    manager.load(tiny_model_dirs["sd1"])
    return Studio(manager, ConceptLibrary(tmp_path / "lib"), work_dir=tmp_path / "work")


def test_style_compose_and_inpaint_go_through_the_streamed_run(studio, tmp_path, monkeypatch):
    """Guards "one generation path": each tab's pictures come from `Studio.render_streamed`, saved in the session."""
    calls = []
    streamed = studio.on_device

    def counting(req, session):
        calls.append(req.mode)
        yield from streamed(req, session)

    monkeypatch.setattr(studio, "on_device", counting)
    picture = tmp_path / "content.png"
    Image.new("RGB", (40, 40), (200, 30, 30)).save(picture)
    before, after = style_transfer(studio, "s1", {"path": str(picture)}, "a picture", 0.5, 1)
    assert before.endswith("before.png") and after.endswith(".png")
    assert len(compose(studio, "s1", "red", "mosaic", "a {A} in {B} style", 2)) == 2
    mask = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    mask.paste((255, 255, 255, 255), (10, 10, 30, 30))
    original, result = inpaint(studio, "s1", {"background": Image.open(picture), "layers": [mask]}, "a star", 0.9)
    assert original.endswith("original.png")
    assert len(calls) == 3
    folder = str(studio.sessions.get("s1").folder)
    assert all(path.startswith(folder) for path in (before, after, original, result))


def test_a_thumbnail_is_kept_in_the_engine_session(studio):
    import torch

    from studio.engine.learned.word import Concept

    width = studio.model.encoder_dims["text_encoder"]
    studio.library.add_session_concept("s1", Concept("<thumb>", {"text_encoder": torch.zeros(1, width)}, {}))
    [(picture, caption)] = preview_concept(studio, "s1", "<thumb>")
    assert caption == "<thumb>" and str(studio.sessions.get("s1").thumbnails["<thumb>"]) == picture


def test_cancel_without_a_run_changes_nothing(studio):
    status, result = cancel_training(studio, "s1")
    assert status == {"__type__": "update"} and result == {"__type__": "update"}
    assert studio.sessions.get("s1").cancel_flag("train").is_set()
    assert progress_view(studio, "s1") == (None, [])


def test_compose_puts_two_perfusion_concepts_in_one_prompt_with_the_lock_sliders(studio, monkeypatch):
    """The Compose tab's two sliders reach every Perfusion concept of the request as its gate (beta, tau)."""
    import numpy as np
    import torch

    from studio.engine.learned.layer_word import cross_attention_layers
    from studio.engine.learned.perfusion import PerfusionConcept
    from studio.engine.learned.perfusion_files import save_perfusion

    unet, g = studio.model.denoiser, torch.Generator().manual_seed(0)
    layers = cross_attention_layers(unet)
    widths = [unet.get_submodule(layer).inner_kv_dim for layer in layers]
    width = studio.model.encoder_dims["text_encoder"]
    studio.library.root.mkdir(parents=True, exist_ok=True)
    for token in ("<pa>", "<pb>"):
        target = torch.randn(width, generator=g)
        save_perfusion(PerfusionConcept(token, {"text_encoder": torch.randn(1, width, generator=g)}, {},
                                        layers=layers, target=target, target_metric=target,
                                        keys=[torch.randn(w, generator=g) for w in widths],
                                        values=[torch.randn(w, generator=g) * 3 for w in widths]),
                       studio.library.root / f"{token.strip('<>')}.safetensors")
    requests = []
    streamed = studio.on_device

    def recording(req, session):
        requests.append(req)
        yield from streamed(req, session)

    monkeypatch.setattr(studio, "on_device", recording)
    local = compose(studio, "s1", "<pa>", "<pb>", "{A} and {B}", 1, 5, lock=0.75, softness=0.15)
    wide = compose(studio, "s1", "<pa>", "<pb>", "{A} and {B}", 1, 5, lock=0.3, softness=0.4)
    gates = [sorted((c.token, c.beta, c.tau) for c in req.words) for req in requests]
    assert gates == [[("<pa>", 0.75, 0.15), ("<pb>", 0.75, 0.15)], [("<pa>", 0.3, 0.4), ("<pb>", 0.3, 0.4)]]
    assert not np.array_equal(np.asarray(Image.open(local[0])), np.asarray(Image.open(wide[0])))
