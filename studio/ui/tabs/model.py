"""Model tab: which base model is loaded (the built-in demo by default), switching to another and the memory mode
it runs in. Switching changes every user's pictures, so it is an operator action (`studio.ui.operator`): the choices
are the operator's list (and the models this session fine-tuned), by name; only a local studio's own page may also
type a hub id, folder or file."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from studio.engine.family_memory import memory_lines
from studio.engine.memory import MEMORY_MODES, PRESETS, apply_preset
from studio.jobs.training import MODELS_FOLDER
from studio.ui.operator import Operator
from studio.ui.pickers import ConceptPickers
from studio.ui.state import as_user_errors, Studio, user_error
from studio.ui.turns import GPU_EVENT, in_turn

TRAINED = "trained:"  # a choice's value prefix for a model fine-tuned in this session (no listed name has a ':')
HOW_TO_TYPE = """\
**Pick a model** from the list or, since this studio runs for this machine only, **type one** into the box, then
press *Load*:
- a Hugging Face hub id, e.g. `stable-diffusion-v1-5/stable-diffusion-v1-5` or
  `stabilityai/stable-diffusion-xl-base-1.0` (downloaded once; needs network access),
- a diffusers model folder on this machine (the one holding `model_index.json`),
- a single checkpoint file, e.g. `/models/dreamshaper_8.safetensors` (`.ckpt` works too).

Leave the box empty and press *Load* to go back to the built-in demo model."""
FIT = "Concepts only fit the model family they were trained on (SD 1.x: 768 wide, SD 2.x: 1024, SDXL: 768 + 1280)."
FLOW_MEMORY = "GPU memory of SD3 and Flux weights per memory mode (counted from the weights, not measured):\n" + \
    "\n".join(f"- {line}" for family in ("sd3", "flux") for line in memory_lines(family))
MODES_HELP = "\n".join(f"- **{name}**: {p.explanation}" for name, p in PRESETS.items()) + \
    "\n- **auto**: chosen by free GPU memory (on a CPU: fast)."


def how_to_switch(operator: Operator) -> str:
    """What the tab says about switching on this studio: off, the operator's (with the token), or the local page's."""
    if operator.local:
        return f"{HOW_TO_TYPE}\n\n{FIT}\n\n{FLOW_MEMORY}"
    if operator.token is not None:
        return ("**Switching the model changes it for every user of this studio.** Pick one of the operator's "
                f"models, give the operator token and press *Load*. {FIT}")
    return ("**Switching models is off on this server**: the model and its memory mode change every user's pictures, "
            "so its operator chooses them (`launch.py --admin-token TOKEN --models name=source,...`).")


def describe(studio: Studio, operator: Operator | None = None) -> str:
    """What is loaded: the built-in demo (and what it can draw) or the model's name (the operator's, else its file or
    folder name: never a server path), with device and memory mode."""
    m = studio.model
    if m.is_demo:
        what = ("**The built-in demo model is loaded**: a tiny Stable Diffusion trained in minutes on a world of "
                "coloured shapes (circles, squares, stars... in colours, patterns and styles). It draws that world "
                "only, which is enough to train and try concepts on a CPU.")
    else:
        what = f"**Loaded:** `{(operator.name_of(m.source) if operator else None) or m.name}`."
    family = (f"**{m.family}** architecture with its own {m.encoder_dims['text_encoder']}-wide text encoder: concept "
              f"files made for real SD 1.x/2.x/SDXL models need that model" if m.is_demo else f"**{m.family}**")
    quantized = f" ({m.quantize} transformer and T5)" if m.quantize != "none" else ""
    return (f"{what}\n\nFamily {family}, {m.device} / {str(m.dtype).replace('torch.', '')}{quantized}, "
            f"attention {m.attention}. Memory mode: {studio.describe_memory()}")


def trained_models(studio: Studio, session: str) -> dict[str, Path]:
    """The model folders this session fine-tuned (dreambooth), by name; a write still under way is not one yet."""
    folder = studio.sessions.get(session).folder / MODELS_FOLDER
    if not folder.is_dir():
        return {}
    return {p.name: p for p in sorted(folder.iterdir())
            if not p.name.startswith(".") and (p / "model_index.json").is_file()}


def model_choices(studio: Studio, operator: Operator, session: str) -> list[tuple[str, str]]:
    """The Model tab's (label, value) choices for `session`: the operator's names, then its own fine-tuned models."""
    return [(name, name) for name in operator.models] + [
        (f"{name} (trained in this session)", f"{TRAINED}{name}") for name in trained_models(studio, session)]


def model_source(studio: Studio, operator: Operator, session: str, choice: str | None,
                 request: gr.Request | None = None) -> str | None:
    """The source a choice stands for (None: the demo): a listed name, a model this session fine-tuned, or, on a
    local studio's own page only, whatever was typed."""
    choice = (choice or "").strip()
    if choice in operator.models:
        return operator.models[choice] or None
    trained = trained_models(studio, session) if choice.startswith(TRAINED) else {}
    if choice[len(TRAINED):] in trained:
        return str(trained[choice[len(TRAINED):]])
    if operator.owns_page(request):
        return choice or None
    raise user_error(f"{choice[:80]!r} is not one of this studio's models: pick one of "
                     f"{', '.join(operator.models) or 'none'}", request)


def load_model(studio: Studio, operator: Operator, session: str, choice: str | None, token: str | None = None,
               request: gr.Request | None = None) -> str:
    """Switch every user to the model `choice` names, in the current memory mode (an operator action); the new info
    text."""
    operator.check(request, token)
    source = model_source(studio, operator, session, choice, request)
    options = apply_preset(studio.memory_mode, studio.manager.options)
    with as_user_errors(request):
        studio.manager.load(source, options)
    return describe(studio, operator)


def set_memory_mode(studio: Studio, operator: Operator, mode: str, token: str | None = None,
                    request: gr.Request | None = None) -> str:
    """Reload the current model with the mode's options (cached weights are read again from disk; an operator
    action); the info text."""
    operator.check(request, token)
    try:
        options = apply_preset(mode, studio.manager.options)
    except ValueError as exc:
        raise user_error(exc, request) from exc
    current = studio.model
    with as_user_errors(request):
        studio.manager.load(current.source, options)
    studio.manager.options = options
    studio.memory_mode = mode
    return describe(studio, operator)


def build_model_tab(studio: Studio, pickers: ConceptPickers, operator: Operator | None = None) -> gr.Markdown:
    """What is loaded, the model choices, the operator token and the memory mode; endpoints `/load_model` (model,
    operator_token) and `/set_memory_mode` (mode, operator_token), which refuse whoever may not switch. Returns the
    info text, which the app fills on page load with `describe`."""
    operator = operator or Operator()

    # 1. Handlers. The token is optional for API clients, so that a client of the one-argument endpoints is told
    # why it is refused rather than that an argument is missing.
    def switch(model: str, operator_token: str | None = None, request: gr.Request = None) -> str:
        return load_model(studio, operator, studio.session_of(request), model, operator_token, request)

    def apply_mode(mode: str, operator_token: str | None = None, request: gr.Request = None) -> str:
        return set_memory_mode(studio, operator, mode, operator_token, request)

    # 2. Layout: the controls stay in sight where switching is off, greyed out, beside the line that says why.
    info = gr.Markdown()
    gr.Markdown(how_to_switch(operator))
    with gr.Row():
        # Custom values reach the handler, which refuses them (one line) unless this is a local studio's own page.
        model = gr.Dropdown([(name, name) for name in operator.models], value=None, allow_custom_value=True,
                            label="Model", interactive=operator.switching, scale=3)
        load = gr.Button("Load", variant="primary", interactive=operator.switching)
    token = gr.Textbox(label="Operator token", type="password", visible=operator.token is not None)
    with gr.Row():
        mode = gr.Radio(list(MEMORY_MODES), value=studio.memory_mode, label="Memory mode", scale=3,
                        interactive=operator.switching)
        apply = gr.Button("Apply to the loaded model", interactive=operator.switching)
    gr.Markdown(MODES_HELP)

    # 3. Wiring.
    pickers.view(model, lambda session: gr.update(choices=model_choices(studio, operator, session)))
    # Operator actions take the device alone once the jobs on it end; one who may not is refused before waiting.
    def allowed(form: dict) -> None:
        operator.check(form["request"], form["operator_token"])

    switch, apply_mode = (in_turn(studio, fn, "model", check=allowed, exclusive=True) for fn in (switch, apply_mode))
    pickers.after(load.click(switch, [model, token], info, api_name="load_model", **GPU_EVENT))
    pickers.after(apply.click(apply_mode, [mode, token], info, api_name="set_memory_mode", **GPU_EVENT))
    return info
