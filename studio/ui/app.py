"""The Gradio studio: one tab per file in `studio/ui/tabs/`, thin handlers over the engine; engine errors become
`gr.Error` at the edge. Heavy work shares one queue (`concurrency_id="gpu"`, one job at a time).

Endpoints (gradio_client `api_name`): generate, variations, cancel, read_png, train, cancel_training,
training_progress, style_transfer, compose, inpaint, evaluate_concept, cancel_evaluation, library, import_concepts,
export_concept, rename_concept, delete_concept, save_concept, preview_concept, load_model, set_memory_mode.
"""

from __future__ import annotations

import gradio as gr

from studio.engine.models import ModelManager
from studio.library import ConceptLibrary
from studio.ui.pickers import ConceptPickers
from studio.ui.state import Studio, session_of
from studio.ui.tabs.compose import build_compose_tab
from studio.ui.tabs.evaluate import build_evaluate_tab
from studio.ui.tabs.generate import build_generate_tab
from studio.ui.tabs.inpaint import build_inpaint_tab
from studio.ui.tabs.library import build_library_tab
from studio.ui.tabs.model import build_model_tab, describe
from studio.ui.tabs.style import build_style_tab
from studio.ui.tabs.train import build_train_tab

__all__ = ["Studio", "build_app"]


def build_app(manager: ModelManager, library: ConceptLibrary, memory_mode: str = "auto") -> gr.Blocks:
    """The whole studio over an already-created manager (with a model loaded) and library.

    `memory_mode` is the mode `manager`'s options were made with (launch.py --memory), shown on the Model tab.
    """
    studio = Studio(manager, library, memory_mode=memory_mode)
    pickers = ConceptPickers(studio)
    with gr.Blocks(title="Concept Studio") as app:
        gr.Markdown("# Concept Studio\nTeach the model a new word from a few pictures, then use it in any prompt.")
        with gr.Tab("Generate"):
            build_generate_tab(studio, pickers)
        with gr.Tab("Train"):
            build_train_tab(studio, pickers)
        with gr.Tab("Style transfer"):
            build_style_tab(studio, pickers)
        with gr.Tab("Compose"):
            build_compose_tab(studio, pickers)
        with gr.Tab("Inpaint"):
            build_inpaint_tab(studio, pickers)
        with gr.Tab("Library"):
            build_library_tab(studio, pickers)
        with gr.Tab("Evaluate"):
            build_evaluate_tab(studio, pickers)
        with gr.Tab("Model"):
            info = build_model_tab(studio, pickers)
        pickers.wire(app)
        app.load(lambda: describe(studio), None, info, api_visibility="private")

        def forget(request: gr.Request) -> None:
            studio.forget_session(session_of(request))

        app.unload(forget)
    app.queue(default_concurrency_limit=1)
    return app
