"""The Gradio studio: one tab per file in `studio/ui/tabs/`, thin handlers over the engine; engine errors become
`gr.Error` at the edge. Heavy work takes turns on the device, round-robin between users (`studio.ui.turns`).

Endpoints (gradio_client `api_name`): generate, variations, cancel, read_png, train, cancel_training,
training_progress, style_transfer, cancel_style, compose, cancel_compose, inpaint, cancel_inpaint, evaluate_concept,
cancel_evaluation, compare_methods, library, import_concepts, export_concept, rename_concept, delete_concept,
save_concept, preview_concept, load_model, set_memory_mode (those two are the operator's: `studio.ui.operator`).
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from studio.engine.models import ModelManager
from studio.library import ConceptLibrary
from studio.ui.operator import Operator
from studio.ui.pickers import ConceptPickers
from studio.ui.state import Studio, StudioLimits
from studio.ui.tabs.compose import build_compose_tab
from studio.ui.tabs.evaluate import build_evaluate_tab
from studio.ui.tabs.generate import build_generate_tab
from studio.ui.tabs.inpaint import build_inpaint_tab
from studio.ui.tabs.library import build_library_tab
from studio.ui.tabs.model import build_model_tab, describe
from studio.ui.tabs.style import build_style_tab
from studio.ui.tabs.train import build_train_tab

__all__ = ["Operator", "Studio", "build_app"]


# Where a browser keeps its signed session id (localStorage; see Studio.attach).
SESSION_STORAGE_KEY = "concept-studio-session"
# `.pixel-art`: components whose pictures may be smaller than their frame (the demo model draws 64 px). Gradio's own
# rules (`.thumbnails img { object-fit: cover }`) are more specific than a class selector, hence !important.
# `.whole-words`: tables whose headers wrap between words only ("vectors", never "vector s").
PIXEL_ART_STYLE = ("<style>.pixel-art img, .pixel-art canvas { image-rendering: pixelated !important; "
                   "object-fit: contain !important; } "
                   ".whole-words th, .whole-words th * { word-break: keep-all !important; "
                   "overflow-wrap: normal !important; hyphens: none !important; }</style>")


def build_app(manager: ModelManager, library: ConceptLibrary, memory_mode: str = "auto",
              work_dir: Path | None = None, operator: Operator | None = None,
              limits: StudioLimits | None = None) -> gr.Blocks:
    """The whole studio over an already-created manager (with a model loaded) and library.

    `memory_mode` is the mode `manager`'s options were made with (launch.py --memory), shown on the Model tab.
    `work_dir`: the sessions' pictures and training files (default: a new temporary folder).
    `operator`: who may switch the model, its memory mode and the evaluation's CLIP model (default: nobody).
    `limits`: what one user may hold (their share of the device's line, a run's steps, their disk quota).
    """
    operator = operator or Operator()
    studio = Studio(manager, library, memory_mode=memory_mode, limits=limits or StudioLimits(),
                    **({"work_dir": Path(work_dir)} if work_dir else {}))
    pickers = ConceptPickers(studio)
    with gr.Blocks(title="Concept Studio") as app:
        gr.Markdown("# Concept Studio\nTeach the model a new word from a few pictures, then use it in any prompt.")
        # Small pictures (the demo model draws 64 px) are shown whole and scaled up with nearest-neighbour.
        gr.HTML("", head=PIXEL_ART_STYLE, padding=False, apply_default_css=False)
        browser_session = gr.BrowserState(None, storage_key=SESSION_STORAGE_KEY,
                                          secret=studio.browser_storage_secret())
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
            build_evaluate_tab(studio, pickers, operator)
        with gr.Tab("Model"):
            info = build_model_tab(studio, pickers, operator)
        # The page's session first (its browser's id, so a reload finds its concepts), then what depends on it.
        attached = app.load(studio.attach, browser_session, browser_session, api_visibility="private")
        pickers.wire(attached)
        app.load(lambda: describe(studio, operator), None, info, api_visibility="private")
        app.unload(studio.detach)
    app.queue(default_concurrency_limit=1)
    return app
