"""Style transfer tab: redraw a picture with a prompt that names a style concept (img2img)."""

from __future__ import annotations

import gradio as gr

from studio.ui.pickers import ConceptPickers
from studio.ui.state import Studio, seed_or_random, session_of
from studio.ui.tabs.generate import concept_inserter


def build_style_tab(studio: Studio, pickers: ConceptPickers) -> None:
    """Content picture, prompt and strength; the `/style_transfer` endpoint returns [before, after]."""
    # 1. Pure functions.
    def run(content, prompt, strength, seed, request: gr.Request, progress=gr.Progress()):
        if content is None:
            raise gr.Error("Upload a content picture first.")
        session = session_of(request)
        paths = studio.run_generate(dict(prompt=prompt, init_image=content, strength=float(strength),
                                         seed=seed_or_random(seed)), session, progress)
        before = studio.session_dir(session) / "before.png"
        content.save(before)
        return [str(before)] + paths

    # 2. Layout.
    gr.Markdown("Redraw a picture with a prompt, e.g. `a picture in the style of <my-style>` (img2img).")
    with gr.Row():
        content = gr.Image(label="Content picture", type="pil")
        result = gr.Gallery(label="Before / after", columns=2, height=320)
    prompt = gr.Textbox(label="Prompt", value="a picture in mosaic style")
    concept_inserter(pickers, prompt, "Insert a style concept")
    strength = gr.Slider(0.05, 1.0, value=0.6, step=0.05, label="Strength (how much to change)")
    seed = gr.Number(label="Seed (-1: random)", value=-1, precision=0)
    go = gr.Button("Transfer style", variant="primary")

    # 3. Wiring.
    go.click(run, [content, prompt, strength, seed], result, api_name="style_transfer", concurrency_id="gpu")
