"""The Gradio studio: thin tabs over the engine. Every handler validates nothing itself and calls one engine
function; engine errors become `gr.Error` here, at the edge. Heavy work shares one queue (`concurrency_id="gpu"`).

Per-user state: each browser session (Gradio's session hash) has its own cancel flag, output folder and
session concepts; the shared library folder is visible to all.
"""

from __future__ import annotations

import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
from PIL import Image

from studio.engine.concepts import ConceptError
from studio.engine.generate import SCHEDULERS, Cancelled, GenerateRequest, generate, read_infotext, save_png
from studio.engine.models import ModelError, ModelManager
from studio.library import ConceptLibrary
from studio.training import TrainConfig, TrainError, Trainer

USER_ERRORS = (ValueError, ModelError, ConceptError, TrainError, FileNotFoundError)


@dataclass
class Studio:
    """What the handlers share: the model manager, the concept library, and per-session scratch space."""

    manager: ModelManager
    library: ConceptLibrary
    work_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="concept-studio-")))
    _cancel: dict[str, threading.Event] = field(default_factory=dict)

    @property
    def model(self):
        return self.manager.current or self.manager.load(None)

    def session_dir(self, session: str) -> Path:
        path = self.work_dir / (session or "anonymous")
        path.mkdir(parents=True, exist_ok=True)
        return path

    def cancel_flag(self, session: str) -> threading.Event:
        return self._cancel.setdefault(session or "anonymous", threading.Event())

    def run_generate(self, req_fields: dict, session: str) -> list[str]:
        """Resolve the concepts named in the prompts, generate, save PNGs with parameters; return their paths."""
        model = self.model
        text = req_fields["prompt"] + " " + req_fields.get("negative_prompt", "")
        concepts = self.library.resolve(text, model.encoder_dims, session)
        flag = self.cancel_flag(session)
        flag.clear()
        try:
            result = generate(model, GenerateRequest(concepts=concepts, **req_fields), cancel=flag)
        except Cancelled as exc:
            raise gr.Error(f"Cancelled: {exc}") from exc
        except USER_ERRORS as exc:
            raise gr.Error(str(exc)) from exc
        out = self.session_dir(session)
        paths = []
        for image, seed in zip(result.images, result.seeds):
            path = out / f"{len(list(out.glob('*.png'))):05d}-{seed}.png"
            save_png(image, path)
            paths.append(str(path))
        return paths


def _session(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "anonymous"


def _seed(value) -> int | None:
    return None if value is None or int(value) < 0 else int(value)


def _size(value) -> int | None:
    return int(value) if value else None


def build_generate_tab(studio: Studio) -> None:
    gr.Markdown("Write a prompt; any concept word from the library (e.g. `<my-cat>`) is used automatically.")
    with gr.Row():
        with gr.Column(scale=2):
            prompt = gr.Textbox(label="Prompt", value="a red circle on a white background", lines=2)
            negative = gr.Textbox(label="Negative prompt", lines=1)
            picker = gr.Dropdown(label="Insert a concept", choices=[], allow_custom_value=False)
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

    def refresh_picker(request: gr.Request):
        tokens = [e.token for e in studio.library.entries(studio.model.encoder_dims, _session(request)) if e.fits]
        return gr.update(choices=tokens)

    def insert(token, text):
        return f"{text} {token}".strip() if token else text

    def run(prompt, negative, seed, steps, guidance, scheduler, width, height, count, request: gr.Request):
        fields = dict(prompt=prompt, negative_prompt=negative, seed=_seed(seed), steps=int(steps), guidance=float(guidance),
                      scheduler=scheduler, width=_size(width), height=_size(height), batch=int(count))
        return studio.run_generate(fields, _session(request))

    def read_png(path):
        try:
            info = read_infotext(path)
        except (ValueError, OSError) as exc:
            raise gr.Error(str(exc)) from exc
        return (info["prompt"], info.get("negative_prompt", ""), info.get("seed", -1), info.get("steps", 20),
                info.get("guidance", 7.5), info.get("scheduler", "euler_a"), info.get("width", 0), info.get("height", 0))

    picker.focus(refresh_picker, None, picker, api_visibility="private")
    picker.select(insert, [picker, prompt], prompt, api_visibility="private")
    go.click(run, [prompt, negative, seed, steps, guidance, scheduler, width, height, count], gallery,
             api_name="generate", concurrency_id="gpu")
    stop.click(lambda request: studio.cancel_flag(_session(request)).set(), None, None, api_name="cancel",
               concurrency_limit=None)
    png.upload(read_png, png, [prompt, negative, seed, steps, guidance, scheduler, width, height], api_name="read_png")


def build_train_tab(studio: Studio) -> None:
    gr.Markdown("Upload 3-5 pictures of your concept, name its word, and train: only that word's vectors learn.")
    with gr.Row():
        with gr.Column():
            files = gr.File(label="Pictures", file_count="multiple", file_types=["image"])
            token = gr.Textbox(label="New word", value="<my-concept>")
            init = gr.Textbox(label="Start from the word", value="shape")
            kind = gr.Radio(["object", "style"], value="object", label="What is it?")
            with gr.Accordion("Advanced", open=False):
                vectors = gr.Slider(1, 8, value=1, step=1, label="Vectors per word")
                steps = gr.Slider(1, 3000, value=300, step=1, label="Steps")
                lr = gr.Number(label="Learning rate (or A1111 schedule)", value=0.005)
                batch = gr.Slider(1, 8, value=4, step=1, label="Batch size")
            with gr.Row():
                start = gr.Button("Train", variant="primary")
                stop = gr.Button("Cancel")
        with gr.Column():
            status = gr.Textbox(label="Progress", lines=3)
            result = gr.File(label="Learned concept (download)")

    def train(files, token, init, kind, vectors, steps, lr, batch, request: gr.Request, progress=gr.Progress()):
        session = _session(request)
        if not files:
            raise gr.Error("Upload at least one picture of your concept.")
        flag = studio.cancel_flag(session)
        flag.clear()
        try:
            cfg = TrainConfig(token.strip(), init_text=init or "*", n_vectors=int(vectors), steps=int(steps),
                              learning_rate=float(lr), batch_size=int(batch), template=kind)
            lines: list[str] = []

            def on_event(event):
                if event.kind == "step":
                    progress(event.step / event.total, desc=f"step {event.step}/{event.total}, loss {event.loss:.4f}, "
                                                             f"ETA {event.eta_s:.0f}s")
                elif event.message:
                    lines.append(f"{event.kind}: {event.message}")

            trainer = Trainer(studio.model, cfg, [Path(f) for f in files], studio.session_dir(session) / "concepts")
            concept = trainer.run(on_event, flag)
        except USER_ERRORS as exc:
            raise gr.Error(str(exc)) from exc
        studio.library.add_session_concept(session, concept)
        path = studio.session_dir(session) / "concepts" / (cfg.token.strip("<>") + ".safetensors")
        lines.append(f"{concept.token} is ready: write it in any prompt in this session.")
        return "\n".join(lines), str(path)

    start.click(train, [files, token, init, kind, vectors, steps, lr, batch], [status, result], api_name="train",
                concurrency_id="gpu")
    stop.click(lambda request: studio.cancel_flag(_session(request)).set(), None, None, api_name="cancel_training",
               concurrency_limit=None)


def build_style_tab(studio: Studio) -> None:
    gr.Markdown("Redraw a picture with a prompt, e.g. `a picture in the style of <my-style>` (img2img).")
    with gr.Row():
        content = gr.Image(label="Content picture", type="pil")
        result = gr.Gallery(label="Before / after", columns=2, height=320)
    prompt = gr.Textbox(label="Prompt", value="a picture in mosaic style")
    strength = gr.Slider(0.05, 1.0, value=0.6, step=0.05, label="Strength (how much to change)")
    seed = gr.Number(label="Seed (-1: random)", value=-1, precision=0)
    go = gr.Button("Transfer style", variant="primary")

    def run(content, prompt, strength, seed, request: gr.Request):
        if content is None:
            raise gr.Error("Upload a content picture first.")
        paths = studio.run_generate(dict(prompt=prompt, init_image=content, strength=float(strength), seed=_seed(seed)),
                                    _session(request))
        before = studio.session_dir(_session(request)) / "before.png"
        content.save(before)
        return [str(before)] + paths

    go.click(run, [content, prompt, strength, seed], result, api_name="style_transfer", concurrency_id="gpu")


def build_compose_tab(studio: Studio) -> None:
    gr.Markdown("Put two concepts in one picture: `{A}` and `{B}` are replaced by the words you pick.")
    with gr.Row():
        a = gr.Textbox(label="Concept A", value="<my-concept>")
        b = gr.Textbox(label="Concept B", value="mosaic")
    template = gr.Textbox(label="Template", value="a {A} in {B} style")
    seeds = gr.Slider(1, 8, value=4, step=1, label="Seeds")
    go = gr.Button("Compose", variant="primary")
    grid = gr.Gallery(label="Grid over seeds", columns=4, height=320)

    def run(a, b, template, seeds, request: gr.Request):
        prompt = template.replace("{A}", a.strip()).replace("{B}", b.strip())
        return studio.run_generate(dict(prompt=prompt, batch=int(seeds), seed=0), _session(request))

    go.click(run, [a, b, template, seeds], grid, api_name="compose", concurrency_id="gpu")


def build_inpaint_tab(studio: Studio) -> None:
    gr.Markdown("Brush over the part to redraw, then describe what goes there.")
    with gr.Row():
        editor = gr.ImageMask(label="Picture and mask", type="pil", format="png")
        result = gr.Gallery(label="Original / result", columns=2, height=320)
    prompt = gr.Textbox(label="Prompt", value="a blue star")
    strength = gr.Slider(0.1, 1.0, value=0.9, step=0.05, label="Strength")
    go = gr.Button("Inpaint", variant="primary")

    def run(value, prompt, strength, request: gr.Request):
        if not value or value.get("background") is None:
            raise gr.Error("Upload a picture and brush a mask over the part to change.")
        picture = value["background"].convert("RGB")
        layers = [layer for layer in value.get("layers") or [] if layer is not None]
        if not layers:
            raise gr.Error("Brush over the part of the picture to redraw (the mask is empty).")
        mask = layers[0].convert("RGBA").split()[-1].point(lambda a: 255 if a > 0 else 0)
        if mask.getbbox() is None:
            raise gr.Error("The mask is empty: brush over the part of the picture to redraw.")
        paths = studio.run_generate(dict(prompt=prompt, init_image=picture, mask=mask, strength=float(strength), seed=0),
                                    _session(request))
        original = studio.session_dir(_session(request)) / "original.png"
        picture.save(original)
        return [str(original)] + paths

    go.click(run, [editor, prompt, strength], result, api_name="inpaint", concurrency_id="gpu")


def build_library_tab(studio: Studio) -> None:
    gr.Markdown("Concepts in the shared folder and this session. Files that don't fit the model say why.")
    table = gr.Dataframe(headers=["token", "vectors", "fits", "reason", "source"], interactive=False)
    with gr.Row():
        refresh = gr.Button("Refresh")
        upload = gr.File(label="Import concept files", file_count="multiple")
    with gr.Row():
        token = gr.Textbox(label="Token")
        fmt = gr.Dropdown(["studio", "diffusers", "a1111", "kohya"], value="studio", label="Export format")
        export = gr.Button("Export")
        delete = gr.Button("Delete file", variant="stop")
    exported = gr.File(label="Exported file")
    report = gr.Textbox(label="Result")

    def rows(request: gr.Request):
        entries = studio.library.entries(studio.model.encoder_dims, _session(request))
        return [[e.token, e.concept.n_vectors if e.concept else "", e.fits, e.reason,
                 str(e.path) if e.path else "session"] for e in entries]

    def import_files(files, request: gr.Request):
        lines = []
        for f in files or []:
            try:
                entry = studio.library.import_file(f)
                lines.append(f"{Path(f).name}: imported as {entry.token}" + ("" if entry.fits else f" ({entry.reason})"))
            except USER_ERRORS as exc:
                lines.append(f"{Path(f).name}: {exc}")
        return "\n".join(lines), rows(request)

    def export_concept(token, fmt, request: gr.Request):
        from studio.engine.concepts import save_concept
        try:
            concept = studio.library.get(token.strip(), _session(request))
            out = studio.session_dir(_session(request)) / "export"
            out.mkdir(exist_ok=True)
            suffix = ".pt" if fmt == "a1111" and concept.family != "sdxl" else ".safetensors"
            return str(save_concept(concept, out / (token.strip().strip("<>") + suffix), format=fmt))
        except (KeyError, *USER_ERRORS) as exc:
            raise gr.Error(str(exc)) from exc

    def delete_concept(token, request: gr.Request):
        try:
            studio.library.delete(token.strip(), _session(request))
        except (KeyError, *USER_ERRORS) as exc:
            raise gr.Error(str(exc)) from exc
        return f"deleted {token}", rows(request)

    refresh.click(rows, None, table, api_name="library")
    upload.upload(import_files, upload, [report, table], api_name="import_concepts")
    export.click(export_concept, [token, fmt], exported, api_name="export_concept")
    delete.click(delete_concept, token, [report, table], api_name="delete_concept")


def build_model_tab(studio: Studio) -> None:
    gr.Markdown("The base model. The built-in demo is a tiny model of a world of coloured shapes; load a real one "
                "with a hub id (`stable-diffusion-v1-5/stable-diffusion-v1-5`), a diffusers folder or a "
                "`.safetensors` file.")
    info = gr.Markdown()
    source = gr.Textbox(label="Model (hub id, folder or file)")
    load = gr.Button("Load")

    def describe() -> str:
        m = studio.model
        what = "the built-in demo model" if m.is_demo else f"`{m.source}`"
        return f"Loaded: {what}, family **{m.family}**, {m.device} / {str(m.dtype).replace('torch.', '')}, attention {m.attention}."

    def switch(src):
        try:
            studio.manager.load(src.strip() or None)
        except USER_ERRORS as exc:
            raise gr.Error(str(exc)) from exc
        return describe()

    load.click(switch, source, info, api_name="load_model", concurrency_id="gpu")
    return info, describe


def build_app(manager: ModelManager, library: ConceptLibrary) -> gr.Blocks:
    """The whole studio over an already-created manager (with a model loaded) and library."""
    studio = Studio(manager, library)
    with gr.Blocks(title="Concept Studio") as app:
        gr.Markdown("# Concept Studio\nTeach the model a new word from a few pictures, then use it in any prompt.")
        with gr.Tab("Generate"):
            build_generate_tab(studio)
        with gr.Tab("Train"):
            build_train_tab(studio)
        with gr.Tab("Style transfer"):
            build_style_tab(studio)
        with gr.Tab("Compose"):
            build_compose_tab(studio)
        with gr.Tab("Inpaint"):
            build_inpaint_tab(studio)
        with gr.Tab("Library"):
            build_library_tab(studio)
        with gr.Tab("Model"):
            info, describe = build_model_tab(studio)
        app.load(describe, None, info, api_visibility="private")
    app.queue(default_concurrency_limit=1)
    return app
