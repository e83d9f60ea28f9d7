"""Generate tab: prompt → pictures; concept words in the prompt are looked up in the library automatically."""

from __future__ import annotations

import gradio as gr

from studio.engine.generate import SCHEDULERS, read_infotext
from studio.ui.pickers import ConceptPickers
from studio.ui.state import Studio, seed_or_random, session_of, size_or_native, user_error


def insert_word(token: str | None, text: str) -> str:
    """Append the picked concept word to a prompt."""
    return f"{text} {token}".strip() if token else text


def concept_inserter(pickers: ConceptPickers, prompt: gr.Textbox, label: str = "Insert a concept") -> gr.Dropdown:
    """A concept picker that appends the chosen word to `prompt`."""
    picker = pickers.dropdown(label)
    picker.select(insert_word, [picker, prompt], prompt, api_visibility="private")
    return picker


def build_generate_tab(studio: Studio, pickers: ConceptPickers) -> None:
    """Prompt, settings and a gallery; `/generate`, `/cancel` and `/read_png` endpoints."""
    # 1. Pure functions.
    def run(prompt, negative, seed, steps, guidance, scheduler, width, height, count, request: gr.Request,
            progress=gr.Progress()):
        fields = dict(prompt=prompt, negative_prompt=negative, seed=seed_or_random(seed), steps=int(steps),
                      guidance=float(guidance), scheduler=scheduler, width=size_or_native(width),
                      height=size_or_native(height), batch=int(count))
        return studio.run_generate(fields, session_of(request), progress)

    def cancel(request: gr.Request) -> None:
        studio.cancel_flag(session_of(request)).set()

    def read_png(path):
        try:
            info = read_infotext(path)
        except (ValueError, OSError) as exc:
            raise user_error(exc) from exc
        return (info["prompt"], info.get("negative_prompt", ""), info.get("seed", -1), info.get("steps", 20),
                info.get("guidance", 7.5), info.get("scheduler", "euler_a"), info.get("width", 0), info.get("height", 0))

    # 2. Layout.
    gr.Markdown("Write a prompt; any concept word from the library (e.g. `<my-cat>`) is used automatically.")
    with gr.Row():
        with gr.Column(scale=2):
            prompt = gr.Textbox(label="Prompt", value="a red circle on a white background", lines=2)
            negative = gr.Textbox(label="Negative prompt", lines=1)
            concept_inserter(pickers, prompt)
            with gr.Row():
                seed = gr.Number(label="Seed (-1: random)", value=-1, precision=0)
                steps = gr.Slider(1, 100, value=20, step=1, label="Steps")
                guidance = gr.Slider(1, 15, value=7.5, step=0.5, label="Guidance")
            with gr.Row():
                scheduler = gr.Dropdown(list(SCHEDULERS), value="euler_a", label="Scheduler")
                width = gr.Number(label="Width (0: model's size)", value=0, precision=0)
                height = gr.Number(label="Height (0: model's size)", value=0, precision=0)
                count = gr.Slider(1, 8, value=4, step=1, label="Pictures")
            with gr.Row():
                go = gr.Button("Generate", variant="primary")
                stop = gr.Button("Cancel")
            png = gr.File(label="Read parameters from a PNG", file_types=[".png"])
        gallery = gr.Gallery(label="Results", columns=4, height=420)

    # 3. Wiring.
    go.click(run, [prompt, negative, seed, steps, guidance, scheduler, width, height, count], gallery,
             api_name="generate", concurrency_id="gpu")
    stop.click(cancel, None, None, api_name="cancel", concurrency_limit=None)
    png.upload(read_png, png, [prompt, negative, seed, steps, guidance, scheduler, width, height], api_name="read_png")
