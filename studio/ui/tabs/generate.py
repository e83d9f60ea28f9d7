"""Generate tab: prompt → pictures; concept words in the prompt are looked up in the library automatically.

`/generate` and `/variations` stream: while the model works the gallery shows a preview of the first picture
every few steps (captioned "step k/n"), then the finished PNGs; gradio_client's `predict` returns the finished
gallery and `submit(...).outputs()` holds the previews too. Cancel stops a running job within one step and, in
the browser, also takes a job still waiting in the GPU queue off it (API clients: `job.cancel()`).
"""

from __future__ import annotations

from contextlib import closing
from types import SimpleNamespace
from typing import Callable, Iterator

import gradio as gr

from studio.engine.generate import SCHEDULERS, read_infotext
from studio.ui.pickers import ConceptPickers
from studio.ui.state import as_user_errors, guidance_or_default, seed_or_random, size_or_native, Studio, user_error
from studio.ui.turns import GPU_EVENT, consumed, in_turn

VARIATION_SEEDS = 4  # pictures "a photo of <concept>" over this many seeds (seed, seed + 1, ...)
VARIATION_PROMPT = "a photo of {}"  # the paper's simplest object template
MODEL_GUIDANCE = 0  # the guidance slider's "the model's own": sent as None, the loaded family's default_guidance


def insert_word(token: str | None, text: str) -> str:
    """Append the picked concept to a prompt: its word, or a LoRA's `<lora:name:1>` tag (the picker's value)."""
    return f"{text} {token}".strip() if token else text


def concept_inserter(pickers: ConceptPickers, prompt: gr.Textbox, label: str = "Insert a concept", *,
                     custom: bool = False) -> gr.Dropdown:
    """A concept picker that appends the chosen word or LoRA tag to `prompt` (`custom`: see
    `ConceptPickers.dropdown`)."""
    picker = pickers.dropdown(label, custom=custom)
    picker.select(insert_word, [picker, prompt], prompt, api_visibility="private")
    return picker


def generation_canceller(studio: Studio) -> Callable[[gr.Request], None]:
    """The handler of a tab's Cancel button: it stops this session's running generation within one step (every
    generation runs through `Studio.stream`, which hands the session's flag to the engine)."""
    def cancel(request: gr.Request) -> None:
        studio.session(request).cancel("generate")

    return cancel


def gallery_stream(studio: Studio, req_fields: dict, session: str, request: gr.Request | None = None,
                   progress: gr.Progress | None = None) -> Iterator[list]:
    """Gallery values: the latest preview (captioned with its step) while it runs, then the saved PNGs."""
    with closing(studio.stream(req_fields, session, request, progress)) as updates:
        for update in updates:
            if update.paths is not None:
                yield update.paths
                return
            if update.preview is not None:
                yield [(update.preview, f"step {update.step}/{update.total}")]


def settings(seed, steps, guidance, scheduler, width, height) -> dict:
    """The request fields of the sampler settings, as the form sends them."""
    return dict(seed=seed_or_random(seed), steps=int(steps), guidance=guidance_or_default(guidance),
                scheduler=scheduler, width=size_or_native(width), height=size_or_native(height))


def variation_fields(studio: Studio, token: str | None, session: str, sampler: dict,
                     request: gr.Request | None = None) -> dict:
    """The request fields of `/variations`: the picked concept (a word or a `<lora:name:w>` tag) over
    VARIATION_SEEDS seeds; gr.Error without one."""
    if not token:
        raise gr.Error("Pick a concept in “Insert a concept” first: Variations show it over "
                       f"{VARIATION_SEEDS} seeds.")
    with as_user_errors(request):
        if not studio.library.resolve(token, session):  # a tag naming no LoRA fails in resolve
            studio.library.get(token, session)  # an unknown word fails here, not as a plain-text prompt
    return dict(prompt=VARIATION_PROMPT.format(token), batch=VARIATION_SEEDS, **sampler)


def guidance_label(studio: Studio) -> dict:
    """The guidance slider's label, naming what its 0 stands for on the loaded model (redrawn on page load and after
    every model switch, through the pickers' refresh)."""
    return gr.update(label=f"Guidance (0: the model's own, {studio.model.spec.default_guidance:g})")


def read_png(path) -> tuple:
    """The form's values from the parameters a PNG of this studio (or A1111) carries."""
    try:
        info = read_infotext(path)
    except (ValueError, OSError) as exc:
        raise user_error(exc) from exc
    return (info["prompt"], info.get("negative_prompt", ""), info.get("seed", -1), info.get("steps", 20),
            info.get("guidance", MODEL_GUIDANCE), info.get("scheduler", "euler_a"), info.get("width", 0),
            info.get("height", 0))


def build_generate_tab(studio: Studio, pickers: ConceptPickers) -> None:
    """Prompt, settings and a gallery; `/generate`, `/variations`, `/cancel` and `/read_png` endpoints."""
    handlers = generate_handlers(studio)
    ui = generate_layout(pickers)
    wire_generate(studio, ui, handlers)
    pickers.view(ui.guidance, lambda session: guidance_label(studio))


def generate_handlers(studio: Studio) -> SimpleNamespace:
    """The tab's handlers, by name: adapters from the form to the functions above (`run`, `variations`,
    `read_parameters` of an uploaded PNG)."""

    def run(prompt, negative, seed, steps, guidance, scheduler, width, height, count, request: gr.Request,
            progress=gr.Progress()):
        fields = dict(prompt=prompt, negative_prompt=negative, batch=int(count),
                      **settings(seed, steps, guidance, scheduler, width, height))
        yield from gallery_stream(studio, fields, studio.session_of(request), request, progress)

    def variations(token, seed, steps, guidance, scheduler, width, height, request: gr.Request,
                   progress=gr.Progress()):
        session = studio.session_of(request)
        fields = variation_fields(studio, token, session, settings(seed, steps, guidance, scheduler, width, height),
                                  request)
        yield from gallery_stream(studio, fields, session, request, progress)

    def read_parameters(path):
        with consumed(studio, path):  # read once: Gradio's copy goes
            return read_png(path)

    return SimpleNamespace(run=run, variations=variations, read_parameters=read_parameters)


def generate_layout(pickers: ConceptPickers) -> SimpleNamespace:
    """The tab's components, by name: the prompt and its settings, and beside them the results."""
    ui = SimpleNamespace()
    gr.Markdown("Write a prompt; any concept word from the library (e.g. `<my-cat>`) is used automatically, and a "
                "LoRA by its tag, `<lora:name:0.8>` (name: the file's stem). "
                f"**Variations**: `{VARIATION_PROMPT.format('<concept>')}` for the picked concept over "
                f"{VARIATION_SEEDS} seeds.")
    with gr.Row():
        with gr.Column(scale=2):
            ui.prompt = gr.Textbox(label="Prompt", value="a red circle on a white background", lines=2)
            ui.negative = gr.Textbox(label="Negative prompt", lines=1)
            # custom: API clients name the concept for /variations; the server's copy of the choices is empty.
            ui.picked = concept_inserter(pickers, ui.prompt, custom=True)
            with gr.Row():
                ui.seed = gr.Number(label="Seed (-1: random)", value=-1, precision=0)
                ui.steps = gr.Slider(1, 100, value=20, step=1, label="Steps")
                ui.guidance = gr.Slider(MODEL_GUIDANCE, 15, value=MODEL_GUIDANCE, step=0.5,
                                        label="Guidance (0: the model's own)")
            with gr.Row():
                ui.scheduler = gr.Dropdown(list(SCHEDULERS), value="euler_a", label="Scheduler")
                ui.width = gr.Number(label="Width (0: model's size)", value=0, precision=0)
                ui.height = gr.Number(label="Height (0: model's size)", value=0, precision=0)
                ui.count = gr.Slider(1, 8, value=4, step=1, label="Pictures")
            with gr.Row():
                ui.go = gr.Button("Generate", variant="primary")
                ui.vary = gr.Button(f"Variations ({VARIATION_SEEDS} seeds)")
                ui.stop = gr.Button("Cancel")
            ui.png = gr.File(label="Read parameters from a PNG", file_types=[".png"])
        # Two columns: four results fit the column whole at a 1400-px window (four columns cut off the fourth).
        ui.gallery = gr.Gallery(label="Results", columns=2, height=420, object_fit="contain",
                                elem_id="generate-results", fit_columns=False, elem_classes=["pixel-art"])
    return ui


def wire_generate(studio: Studio, ui: SimpleNamespace, handlers: SimpleNamespace) -> None:
    """`/generate`, `/variations`, `/cancel` (both) and `/read_png` (a PNG's parameters into the form)."""
    sampler = [ui.seed, ui.steps, ui.guidance, ui.scheduler, ui.width, ui.height]
    generated = ui.go.click(in_turn(studio, handlers.run, "generate"), [ui.prompt, ui.negative, *sampler, ui.count],
                            ui.gallery, api_name="generate", **GPU_EVENT)
    varied = ui.vary.click(in_turn(studio, handlers.variations, "generate"), [ui.picked, *sampler], ui.gallery,
                           api_name="variations", **GPU_EVENT)
    # The flag stops a running generation within one step and takes this session's waiting ones out of line;
    # `cancels` also ends this browser's events (and closes a running one, which sets the flag too).
    ui.stop.click(generation_canceller(studio), None, None, api_name="cancel", concurrency_limit=None,
                  cancels=[generated, varied])
    ui.png.upload(handlers.read_parameters, ui.png,
                  [ui.prompt, ui.negative, ui.seed, ui.steps, ui.guidance, ui.scheduler, ui.width, ui.height],
                  api_name="read_png")
