"""Inpaint tab: brush over part of a picture and describe what goes there."""

from __future__ import annotations

import gradio as gr
from PIL import Image

from studio.engine.generate import native_size
from studio.engine.pictures import PictureError, fit_to_model, open_picture, scaled
from studio.ui.pickers import ConceptPickers
from studio.ui.state import Studio, seed_or_random, user_error
from studio.ui.tabs.generate import concept_inserter, generation_canceller
from studio.ui.turns import GPU_EVENT, in_turn


def brush_radius(side: int) -> int:
    """The editor's starting brush radius, in the picture's pixels, for a picture `side` pixels wide: 1/16 of it.
    Gradio's "auto" is 25 px whatever the picture, a brush that covers a 64-px picture in one stroke."""
    return max(2, side // 16)


def picture_and_mask(value: dict | None) -> tuple[Image.Image, Image.Image]:
    """The picture and a black/white mask (white: redraw) from an ImageMask value; gr.Error when either is missing."""
    if not value or value.get("background") is None:
        raise gr.Error("Upload a picture and brush a mask over the part to change.")
    try:  # decoded by Gradio already: this checks its size and puts transparent parts on white
        picture = open_picture(value["background"])
    except PictureError as exc:
        raise user_error(exc) from exc
    layers = [layer for layer in value.get("layers") or [] if layer is not None]
    if not layers:
        raise gr.Error("Brush over the part of the picture to redraw (the mask is empty).")
    mask = layers[0].convert("RGBA").split()[-1].point(lambda alpha: 255 if alpha > 0 else 0)
    if mask.getbbox() is None:
        raise gr.Error("The mask is empty: brush over the part of the picture to redraw.")
    return picture, mask


def inpaint(studio: Studio, session: str, value: dict | None, prompt: str, strength, seed=-1,
            request: gr.Request | None = None, progress: gr.Progress | None = None) -> list[str]:
    """[original, result]: the picture at the size the model draws it, and it with the masked part redrawn."""
    picture, mask = picture_and_mask(value)
    picture = fit_to_model(picture, native_size(studio.model))  # the size the model draws it, as the result
    mask = scaled(mask, picture.size)
    paths = studio.run_generate(dict(prompt=prompt, init_image=picture, mask=mask, strength=float(strength),
                                     seed=seed_or_random(seed)), session, progress, request)
    original = studio.sessions.get(session).folder / "original.png"
    picture.save(original)
    return [str(original)] + paths


def build_inpaint_tab(studio: Studio, pickers: ConceptPickers) -> None:
    """Picture with a brushed mask and a prompt; the `/inpaint` endpoint returns [original, result]."""
    # 1. Handlers.
    def run(value, prompt, strength, seed, request: gr.Request, progress=gr.Progress()):
        # Decoded here as Gradio would: the event skips its preprocessing, so the uploads' paths are known and
        # `in_turn` deletes them once the job ends.
        value = editor.preprocess(editor.data_model.model_validate(value)) if value else None
        return inpaint(studio, studio.session_of(request), value, prompt, strength, seed, request, progress)

    # 2. Layout.
    gr.Markdown("Brush over the part to redraw, then describe what goes there.")
    with gr.Row():
        editor = gr.ImageMask(label="Picture and mask", type="pil", format="png", elem_id="inpaint-editor",
                              brush=gr.Brush(default_size=brush_radius(native_size(studio.model)),
                                             colors=["#000000"], color_mode="fixed"),
                              elem_classes=["pixel-art"])
        result = gr.Gallery(label="Original / result", columns=2, height=320, object_fit="contain",
                            fit_columns=False, elem_id="inpaint-result", elem_classes=["pixel-art"])
    prompt = gr.Textbox(label="Prompt", value="a blue star")
    concept_inserter(pickers, prompt)
    strength = gr.Slider(0.1, 1.0, value=0.9, step=0.05, label="Strength")
    seed = gr.Number(label="Seed (-1: random)", value=-1, precision=0)
    with gr.Row():
        go = gr.Button("Inpaint", variant="primary")
        stop = gr.Button("Cancel")

    # 3. Wiring.
    inpainted = go.click(in_turn(studio, run, "generate", consumes=("value",)), [editor, prompt, strength, seed],
                         result, api_name="inpaint", preprocess=False, **GPU_EVENT)
    stop.click(generation_canceller(studio), None, None, api_name="cancel_inpaint", concurrency_limit=None,
               cancels=[inpainted])
