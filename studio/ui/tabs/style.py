"""Style transfer tab: redraw a picture with a prompt that names a style concept (img2img)."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from studio.engine.generate import native_size
from studio.engine.pictures import PictureError, fit_to_model, open_picture
from studio.ui.pickers import ConceptPickers
from studio.ui.state import Studio, seed_or_random, user_error
from studio.ui.tabs.generate import concept_inserter, generation_canceller
from studio.ui.turns import GPU_EVENT, in_turn


def style_transfer(studio: Studio, session: str, content: dict | None, prompt: str, strength, seed,
                   request: gr.Request | None = None, progress: gr.Progress | None = None) -> list[str]:
    """[before, after]: the content picture at the size the model draws it, and it redrawn with `prompt`.

    `content` is the upload as received, {"path": ..., "orig_name": ...}, unopened (the event skips Gradio's
    preprocessing), so that open_picture decodes it and refuses a broken file or a decompression bomb with its own
    message (Gradio's decoder would fail first, with a generic one). Gradio has checked that the path is an upload;
    the other values arrive as sent and are converted here."""
    path = (content or {}).get("path")
    if not path:
        raise gr.Error("Upload a content picture first.")
    name = content.get("orig_name") or Path(path).name
    try:  # at the size the model draws it, so that before and after match
        picture = fit_to_model(open_picture(path, what=f"content picture {name}"), native_size(studio.model))
    except PictureError as exc:
        raise user_error(exc, request) from exc
    before = studio.sessions.get(session).folder / "before.png"
    picture.save(before)
    paths = studio.run_generate(dict(prompt=prompt, init_image=picture, strength=float(strength),
                                     seed=seed_or_random(seed)), session, progress, request)
    return [str(before)] + paths


def build_style_tab(studio: Studio, pickers: ConceptPickers) -> None:
    """Content picture, prompt and strength; the `/style_transfer` endpoint returns [before, after]."""
    # 1. Handlers.
    def run(content, prompt, strength, seed, request: gr.Request, progress=gr.Progress()):
        return style_transfer(studio, studio.session_of(request), content, prompt, strength, seed, request, progress)

    # 2. Layout.
    gr.Markdown("Redraw a picture with a prompt, e.g. `a picture in the style of <my-style>` (img2img).")
    with gr.Row():
        content = gr.Image(label="Content picture", type="filepath", height=320, elem_id="style-content",
                           elem_classes=["pixel-art"])
        result = gr.Gallery(label="Before / after", columns=2, height=320, object_fit="contain",
                            fit_columns=False, elem_id="style-result", elem_classes=["pixel-art"])
    prompt = gr.Textbox(label="Prompt", value="a picture in mosaic style")
    concept_inserter(pickers, prompt, "Insert a style concept")
    strength = gr.Slider(0.05, 1.0, value=0.6, step=0.05, label="Strength (how much to change)")
    seed = gr.Number(label="Seed (-1: random)", value=-1, precision=0)
    with gr.Row():
        go = gr.Button("Transfer style", variant="primary")
        stop = gr.Button("Cancel")

    # 3. Wiring.
    # The content picture moves into the session (Gradio's copy goes), where the next transfer of it finds it.
    transfer = go.click(in_turn(studio, run, "generate", uploads=("content",)), [content, prompt, strength, seed],
                        result, api_name="style_transfer", preprocess=False, **GPU_EVENT)
    # The flag stops a running transfer within one step and takes a waiting one out of line.
    stop.click(generation_canceller(studio), None, None, api_name="cancel_style", concurrency_limit=None,
               cancels=[transfer])
