"""Compose tab: two concepts in one picture through a template, over several seeds; two Perfusion concepts combine
without retraining, their lock set by two sliders."""

from __future__ import annotations

import gradio as gr

from studio.ui.pickers import ConceptPickers
from studio.ui.state import Studio, seed_or_random
from studio.ui.tabs.generate import generation_canceller
from studio.ui.turns import GPU_EVENT, in_turn


# One line each, as the Train tab explains the method (the paper's ranges).
LOCK_HELP = ("0: each file's own. How much of a prompt position must be the concept before its edit applies: 0.6-0.75 "
             "keeps it to the concept's word (local), 0.4-0.6 lets it shape the whole picture (global); the demo "
             "model's files lock at 0.95.")
SOFTNESS_HELP = "0: each file's own. How sharply the edit switches on around that threshold: lower is sharper."


def fill_template(template: str, a: str, b: str) -> str:
    """`{A}` and `{B}` in `template` replaced by the two words."""
    return template.replace("{A}", (a or "").strip()).replace("{B}", (b or "").strip())


def compose(studio: Studio, session: str, a: str, b: str, template: str, seeds, seed=-1,
            request: gr.Request | None = None, progress: gr.Progress | None = None,
            lock: float = 0.0, softness: float = 0.0) -> list[str]:
    """A grid: the template with both words, one picture per seed from `seed` on (-1: a random first seed).
    `lock` and `softness` are the gate (beta, tau) of the Perfusion concepts among them (0: each file's own)."""
    for label, word in (("A", a), ("B", b)):
        if not (word or "").strip():
            raise gr.Error(f"Concept {label} is empty: pick a concept or type any word (e.g. `mosaic`).")
    return studio.run_generate(dict(prompt=fill_template(template, a, b), batch=int(seeds),
                                    seed=seed_or_random(seed), perfusion_gate=(float(lock) or None, float(softness) or None)),
                               session, progress, request)


def build_compose_tab(studio: Studio, pickers: ConceptPickers) -> None:
    """Two concept pickers (any word may be typed too) and a template; the `/compose` endpoint."""
    # 1. Handlers.
    def run(a, b, template, seeds, seed, lock, softness, request: gr.Request, progress=gr.Progress()):
        return compose(studio, studio.session_of(request), a, b, template, seeds, seed, request, progress, lock,
                       softness)

    # 2. Layout.
    gr.Markdown("Put two concepts in one picture: `{A}` and `{B}` are replaced by the words you pick or type.")
    with gr.Row():
        a = pickers.dropdown("Concept A", custom=True, value=None)  # none yet: the first one is the user's to train
        b = pickers.dropdown("Concept B", custom=True, value="mosaic")
    template = gr.Textbox(label="Template", value="a {A} in {B} style")
    with gr.Row():
        seeds = gr.Slider(1, 8, value=4, step=1, label="Seeds")
        seed = gr.Number(label="First seed (-1: random)", value=-1, precision=0)
    with gr.Accordion("Perfusion concepts: how they lock", open=False):
        with gr.Row():
            lock = gr.Slider(0.0, 1.0, value=0.0, step=0.05, label="Lock: global <-> local (beta)",
                             info=LOCK_HELP, elem_id="compose-lock")
            softness = gr.Slider(0.0, 0.5, value=0.0, step=0.01, label="Softness (tau)",
                                 info=SOFTNESS_HELP, elem_id="compose-softness")
    with gr.Row():
        go = gr.Button("Compose", variant="primary")
        stop = gr.Button("Cancel")
    grid = gr.Gallery(label="Grid over seeds", columns=4, height=320, object_fit="contain", elem_id="compose-grid",
                      fit_columns=False, elem_classes=["pixel-art"])

    # 3. Wiring.
    composed = go.click(in_turn(studio, run, "generate"), [a, b, template, seeds, seed, lock, softness], grid,
                        api_name="compose",
                        **GPU_EVENT)
    stop.click(generation_canceller(studio), None, None, api_name="cancel_compose", concurrency_limit=None,
               cancels=[composed])
