"""The Generate tab's guidance slider: left as laid out, it leaves the guidance to the loaded model's family (Flux's
distilled 3.5, not SD's 7.5), as `studio generate` without --guidance does. Handlers called as plain functions."""

from __future__ import annotations

import gradio as gr
import pytest

from studio.engine.models import ModelManager
from studio.library import ConceptLibrary
from studio.ui.pickers import ConceptPickers
from studio.ui.state import Studio
from studio.ui.tabs.generate import generate_handlers, generate_layout, guidance_label, read_png

GUIDANCE = 4  # read_png's place of the guidance among the form's values


@pytest.fixture()
def flux_studio(flow_model_dirs, tmp_path):
    manager = ModelManager()
    manager.load(flow_model_dirs["flux"])
    return Studio(manager, ConceptLibrary(tmp_path / "lib"), work_dir=tmp_path / "work")


def drawn_guidance(studio: Studio, guidance) -> float:
    """The guidance a one-step 64x64 picture of the Generate tab's `run` was drawn with (read from its PNG)."""
    run = generate_handlers(studio).run
    *_, paths = run("a photo of a cat", "", 1, 1, guidance, "euler_a", 64, 64, 1, None, progress=None)
    return read_png(paths[0])[GUIDANCE]


def test_the_untouched_slider_draws_flux_at_its_own_guidance_not_sds(flux_studio):
    """Guards the slider that sent 7.5 to every model: as laid out it sends none, so a Flux picture gets Flux's
    default (3.5, the PNG's "Distilled CFG Scale"); moved, it sends what it shows."""
    with gr.Blocks():
        ui = generate_layout(ConceptPickers(flux_studio))
    default = flux_studio.model.spec.default_guidance
    assert default == 3.5
    assert drawn_guidance(flux_studio, ui.guidance.value) == default
    assert drawn_guidance(flux_studio, 7.5) == 7.5


def test_the_sliders_label_names_the_loaded_models_own_guidance(flux_studio, tiny_model_dirs):
    """The label says what the slider's 0 draws with, for the model loaded now (Flux 3.5; after a switch, SD's 7.5)."""
    assert guidance_label(flux_studio)["label"].endswith("the model's own, 3.5)")
    flux_studio.manager.load(tiny_model_dirs["sd1"])
    assert guidance_label(flux_studio)["label"].endswith("the model's own, 7.5)")
