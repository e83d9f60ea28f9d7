"""Model tab: which base model is loaded (the built-in demo by default), how to load a real one, and the memory
mode it runs in."""

from __future__ import annotations

import gradio as gr

from studio.engine.memory import MEMORY_MODES, PRESETS, apply_preset
from studio.ui.pickers import ConceptPickers
from studio.ui.state import as_user_errors, Studio, user_error

HOW_TO_LOAD = """\
**Load a real model** by typing one of these and pressing *Load*:
- a Hugging Face hub id, e.g. `stable-diffusion-v1-5/stable-diffusion-v1-5` or
  `stabilityai/stable-diffusion-xl-base-1.0` (downloaded once; needs network access),
- a diffusers model folder on this machine (the one holding `model_index.json`),
- a single checkpoint file, e.g. `/models/dreamshaper_8.safetensors` (`.ckpt` works too).

Leave the box empty and press *Load* to go back to the built-in demo model.
Concepts only fit the model family they were trained on (SD 1.x: 768 wide, SD 2.x: 1024, SDXL: 768 + 1280)."""
MODES_HELP = "\n".join(f"- **{name}**: {p.explanation}" for name, p in PRESETS.items()) + \
    "\n- **auto**: chosen by free GPU memory (on a CPU: fast)."


def describe(studio: Studio) -> str:
    """What is loaded: the built-in demo (and what it can draw) or the model's source, with device and memory mode."""
    m = studio.model
    if m.is_demo:
        what = ("**The built-in demo model is loaded**: a tiny Stable Diffusion trained in minutes on a world of "
                "coloured shapes (circles, squares, stars... in colours, patterns and styles). It draws that world "
                "only, which is enough to train and try concepts on a CPU.")
    else:
        what = f"**Loaded:** `{m.source}`."
    family = (f"**{m.family}** architecture with its own {m.encoder_dims['text_encoder']}-wide text encoder: concept "
              f"files made for real SD 1.x/2.x/SDXL models need that model" if m.is_demo else f"**{m.family}**")
    return (f"{what}\n\nFamily {family}, {m.device} / {str(m.dtype).replace('torch.', '')}, "
            f"attention {m.attention}. Memory mode: {studio.describe_memory()}")


def load_model(studio: Studio, source: str | None) -> str:
    """Load `source` (empty: the demo) in the current memory mode; the new info text."""
    options = apply_preset(studio.memory_mode, studio.manager.options)
    with as_user_errors():
        studio.manager.load((source or "").strip() or None, options)
    return describe(studio)


def set_memory_mode(studio: Studio, mode: str) -> str:
    """Reload the current model with the mode's options (cached weights are read again from disk); the info text."""
    try:
        options = apply_preset(mode, studio.manager.options)
    except ValueError as exc:
        raise user_error(exc) from exc
    current = studio.model
    with as_user_errors():
        studio.manager.load(current.source, options)
    studio.manager.options = options
    studio.memory_mode = mode
    return describe(studio)


def build_model_tab(studio: Studio, pickers: ConceptPickers) -> gr.Markdown:
    """Model source and memory mode; endpoints `/load_model` and `/set_memory_mode`. Returns the info text, which
    the app fills on page load with `describe`."""
    # 1. Handlers.
    def switch(source: str) -> str:
        return load_model(studio, source)

    def apply_mode(mode: str) -> str:
        return set_memory_mode(studio, mode)

    # 2. Layout.
    info = gr.Markdown()
    gr.Markdown(HOW_TO_LOAD)
    with gr.Row():
        source = gr.Textbox(label="Model (hub id, folder or .safetensors file; empty: the demo)", scale=3)
        load = gr.Button("Load", variant="primary")
    with gr.Row():
        mode = gr.Radio(list(MEMORY_MODES), value=studio.memory_mode, label="Memory mode", scale=3)
        apply = gr.Button("Apply to the loaded model")
    gr.Markdown(MODES_HELP)

    # 3. Wiring.
    pickers.after(load.click(switch, source, info, api_name="load_model", concurrency_id="gpu"))
    pickers.after(apply.click(apply_mode, mode, info, api_name="set_memory_mode", concurrency_id="gpu"))
    return info
