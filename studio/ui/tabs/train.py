"""Train tab: a few pictures → a new word (Textual Inversion), a word and a LoRA (pivotal), a LoRA for
"<token> <class>" (DreamBooth-LoRA) or a fine-tuned model (DreamBooth). Live loss plot, preview pictures, progress
bar and cancel.

"Encode (1 s)" (`/encode`: pictures, word, start word -> status) makes an image concept of the pictures instead
(`studio.jobs.encoding`), kept in the session like a trained word. The `/train` endpoint streams its status text (with the loss of the latest step) and finally returns
`(status, concept_file)`; the loss plot and previews are read by a timer from the session's training run
(`/training_progress`), so the endpoint keeps its two outputs for gradio_client users. Its inputs are the first
nine of `FORM` (pictures, word, start word, kind, vectors, steps, learning rate, batch, preview every), then the
method and its options in `FORM`'s order; a client that sends only the first ones trains Textual Inversion as
before (stopping once learned, TrainConfig's default). The loss plot also draws the held-back score the trainer takes
every few steps, and the status says "converged at step N" when the run stopped before its last step. The run itself
is a job of the session's (`studio.jobs.training`); this file adapts the form to it and its snapshots to the components.
"""

from __future__ import annotations

import re
import threading
from types import SimpleNamespace
from typing import Callable, Iterator

import gradio as gr
import pandas as pd
import torch

from studio.jobs.encoding import encode_for_session
from studio.jobs.session import RunEnd
from studio.jobs.training import follow_to_end, keep_concept, training_snapshots
from studio.jobs.training_run import LOSS_SERIES, MEAN_SERIES, SCORE_SERIES, SMOOTHING, TrainingSnapshot, loss_table
from studio.training import TrainConfig
from studio.training.config import METHODS, lite
from studio.training.methods import METHOD_CLASSES
from studio.training.methods.dreambooth import DreamBooth
from studio.ui.gpu import TRAIN_SECONDS, gpu_task
from studio.ui.pickers import ConceptPickers
from studio.ui.state import as_user_errors, for_client, Studio
from studio.ui.turns import GPU_EVENT, in_turn
from studio.ui.tabs.compose import LOCK_HELP, SOFTNESS_HELP
from studio.ui.tabs.library import human_size

POLL_EVERY_S = 1.0  # the loss plot and previews are re-read this often while training
CANCEL_WAIT_S = 60.0  # a cancelled run stops within one step; a step longer than this is no step we run

OnDevice = Callable[[str, list[str], TrainConfig], Iterator[TrainingSnapshot]]


def device_snapshots(studio: Studio, session: str, files: list[str], cfg: TrainConfig) -> Iterator[TrainingSnapshot]:
    """The GPU part of `/train`: the session's run as snapshots; the user's errors as gr.Error.

    Takes and yields plain data only, so that on ZeroGPU it can run in the GPU worker process.
    """
    with as_user_errors():
        yield from training_snapshots(studio.model, studio.sessions.get(session), files, cfg)


# The form's fields in the order of /train's inputs after the pictures (new ones only ever go at the end).
FORM = ("token", "init", "kind", "vectors", "steps", "lr", "batch", "preview_every", "method", "rank", "lite",
        "unet_lr", "word_steps", "class_word", "prior_preservation", "class_images", "prior_weight", "regularization",
        "stop_when_learned", "stop_every", "progressive", "per_image_tokens", "keep_norm")


def train_config(form: dict, request: gr.Request | None = None) -> TrainConfig:
    """The TrainConfig of the form's values (as sent, keyed by `FORM`; a field a client left out takes
    TrainConfig's default); its checks' errors as gr.Error."""
    def given(key: str, cast, default=None):
        value = form.get(key)
        return default if value is None or value == "" else cast(value)

    with as_user_errors(request):
        cfg = TrainConfig((form.get("token") or "").strip(), init_text=form.get("init") or "*",
                          n_vectors=int(form["vectors"]), steps=int(form["steps"]), learning_rate=float(form["lr"]),
                          batch_size=int(form["batch"]), template=form["kind"],
                          preview_every=given("preview_every", int, 0), method=given("method", str, "ti"),
                          rank=given("rank", int, TrainConfig.rank),
                          unet_lr=given("unet_lr", float) or None,  # 0: the method's default
                          word_steps=given("word_steps", int, 0),
                          class_word=given("class_word", lambda v: v.strip() or None),
                          prior_preservation=bool(form.get("prior_preservation")),
                          class_images=given("class_images", int, TrainConfig.class_images),
                          prior_weight=given("prior_weight", float, TrainConfig.prior_weight),
                          regularization=given("regularization", float, 0.0),
                          stop_when_learned=given("stop_when_learned", bool, TrainConfig.stop_when_learned),
                          stop_every=given("stop_every", int, TrainConfig.stop_every),
                          progressive=given("progressive", lambda v: v.strip() or None),
                          per_image_tokens=bool(form.get("per_image_tokens")), keep_norm=bool(form.get("keep_norm")))
        return lite(cfg) if form.get("lite") else cfg


# peft's adapter tensors inside a layer (the LoRA runtime's cached adapters): not part of a saved model.
PEFT_ADAPTER = re.compile(r"\.lora_(A|B|embedding_A|embedding_B|magnitude_vector)\.")


def model_folder_bytes(pipe, dtypes: dict[str, torch.dtype] | None = None) -> dict[str, int]:
    """Bytes of each weight-holding part of a pipeline as a diffusers folder of it holds them in its safetensors
    files: its tensors as loaded, or in `dtypes[part]` where given (the demo model: within 0.3% of its folder;
    tokenizer and configs add a few KB). Tensors shared between parts count once; LoRA adapters the runtime keeps in
    the UNet do not count."""
    seen: set[tuple[int, int]] = set()
    sizes: dict[str, int] = {}
    for name, part in pipe.components.items():
        if not isinstance(part, torch.nn.Module):
            continue
        sizes[name] = 0
        for key, tensor in part.state_dict().items():
            where = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
            if PEFT_ADAPTER.search(key) or where in seen:
                continue
            seen.add(where)
            dtype = (dtypes or {}).get(name, tensor.dtype) if tensor.is_floating_point() else tensor.dtype
            sizes[name] += tensor.numel() * dtype.itemsize
    return sizes


def method_info(studio: Studio, method: str | None) -> str:
    """The method's line; for one that writes a model folder (dreambooth) also how large it will be, from the
    loaded model."""
    method = method or "ti"
    text = f"**{method}**: {METHOD_CLASSES[method].summary if method in METHOD_CLASSES else ''}"
    if method == "perfusion":
        text += f" At generation (Compose tab): *Lock* — {LOCK_HELP} *Softness* — {SOFTNESS_HELP}"
    if method in METHOD_CLASSES and METHOD_CLASSES[method].writes_folder:
        text += f" {dreambooth_size(studio)}"
    return text


def dreambooth_size(studio: Studio) -> str:
    """"The result will be about 19.5 MB: ..." for the loaded model (before any training starts): the UNet in the
    dtype DreamBooth writes it in, the other parts as loaded."""
    sizes = model_folder_bytes(studio.model.pipe, {"unet": DreamBooth.save_dtype})
    unet, rest = sizes.get("unet", 0), sum(v for k, v in sizes.items() if k != "unet")
    dtype = str(DreamBooth.save_dtype).replace("torch.", "")
    return (f"The result will be about {human_size(unet + rest)}: the UNet {human_size(unet)} in {dtype}, the rest "
            f"of the pipeline ({', '.join(k for k in sizes if k != 'unet')}) {human_size(rest)} as loaded.")


def train_stream(studio: Studio, on_device: OnDevice, session_id: str, files: list[str], cfg: TrainConfig,
                 request: gr.Request | None = None, progress: gr.Progress | None = None) -> Iterator[tuple]:
    """`/train`'s values: (status, None) while the run goes on, then (status, concept file) once it is kept.

    Each snapshot is kept in the session for `/training_progress`. Closing this early (the browser's Cancel, a
    client's job.cancel()) stops the trainer at its next step and keeps what it learned, as `/cancel_training` does.
    """
    session = studio.sessions.get(session_id)
    end = session.training_end = RunEnd()
    runs = on_device(session_id, files, cfg)
    snapshot = None
    try:
        for snapshot in runs:
            session.training = snapshot
            if progress is not None and snapshot.loss is not None:
                progress((snapshot.step, snapshot.total), desc=f"loss {snapshot.loss:.4f}", unit="steps")
            if snapshot.concept is None:
                yield snapshot.status, None
    except GeneratorExit:
        # In a thread, since the close may come from the server's event loop.
        session.cancel("train")
        threading.Thread(target=follow_to_end, args=(studio.library, session, runs, end), name=f"keep {cfg.token}",
                         daemon=True).start()
        raise
    except gr.Error as exc:
        end.finish(str(exc.message), None)
        raise for_client(exc, request) from exc
    except BaseException as exc:
        end.finish(f"failed: {exc}", None)
        raise
    yield end.finish(keep_concept(studio.library, session, snapshot), snapshot.file)


def cancel_training(studio: Studio, session_id: str) -> tuple:
    """Stop the session's run within one step; once it has stopped, its last status line and file (the browser's
    Cancel also closes the /train event, which can then no longer show them). No run ended in time: no change."""
    session = studio.sessions.get(session_id)
    session.cancel("train")
    end = session.training_end
    if end is None or not end.done.wait(CANCEL_WAIT_S):
        return gr.update(), gr.update()
    return end.status, end.path


def progress_view(studio: Studio, session: str) -> tuple[pd.DataFrame | None, list]:
    """The loss plot's table (each step's loss, its running mean, the held-back scores) and the latest preview
    pictures of the session's training run.

    No loss yet: None, not an empty table; a LinePlot once given an empty table with a `color` column draws no
    lines for later values (gradio 6.31, seen in chromium).
    """
    snapshot = studio.sessions.get(session).training
    if snapshot is None or not snapshot.losses:
        return None, list(snapshot.previews if snapshot else [])
    return pd.DataFrame(loss_table(snapshot.losses, snapshot.scores)), list(snapshot.previews)


def train_layout(studio: Studio) -> SimpleNamespace:
    """The tab's components, by name."""
    ui = SimpleNamespace()
    gr.Markdown("Upload 3-5 pictures of your concept, name its word, pick what learns, and train.")
    with gr.Row():
        with gr.Column():
            ui.files = gr.File(label="Pictures", file_count="multiple", file_types=["image"], elem_id="train-pictures")
            ui.token = gr.Textbox(label="New word", value="<my-concept>")
            ui.init = gr.Textbox(label="Start from the word", value="toy")  # the README's `--init toy`
            ui.kind = gr.Radio(["object", "style"], value="object", label="What is it?")
            ui.method = gr.Dropdown([(f"{m}: {METHOD_CLASSES[m].summary.split(':')[0]}", m) for m in METHODS],
                                    value="ti",
                                    label="Method (what learns)", elem_id="train-method")
            ui.method_info = gr.Markdown(method_info(studio, "ti"), elem_id="train-method-info")
            advanced_layout(ui)
            with gr.Row():
                ui.start = gr.Button("Train", variant="primary")
                ui.encode = gr.Button("Encode (1 s)", elem_id="train-encode")  # no training: an image concept
                ui.stop = gr.Button("Cancel")
        with gr.Column():
            progress_layout(ui)
    ui.timer = gr.Timer(POLL_EVERY_S, active=False)
    return ui


def advanced_layout(ui: SimpleNamespace) -> None:
    """The folded-away settings: the run's (vectors, steps, learning rate, batch, previews, stopping once learned),
    the word's (ti, xti, pivotal) and the weights' (pivotal, lora, dreambooth); the components go in `ui`."""
    with gr.Accordion("Advanced", open=False):
        ui.vectors = gr.Slider(1, 8, value=1, step=1, label="Vectors per word")
        ui.steps = gr.Slider(1, 3000, value=300, step=1, label="Steps", elem_id="train-steps")
        ui.lr = gr.Number(label="Learning rate (the word's)", value=0.005)
        ui.batch = gr.Slider(1, 8, value=4, step=1, label="Batch size")
        ui.preview_every = gr.Slider(0, 500, value=50, step=1,
                                     label="Preview picture every N steps (0: none)",
                                     elem_id="train-preview-every")
        ui.stop_when_learned = gr.Checkbox(TrainConfig.stop_when_learned, label=(
            "Stop when learned (score the word on a fixed held-back draw and stop once it no longer "
            "improves; Steps stays the most it trains)"), elem_id="train-stop-when-learned")
        ui.stop_every = gr.Slider(1, 200, value=TrainConfig.stop_every, step=1,
                                  label="Stop when learned: score every K steps")
        gr.Markdown("The word (ti, xti, pivotal):")
        ui.regularization = gr.Number(label="Regularization (weight pulling the word back to its start; "
                                            "0: none)", value=0.0, minimum=0)
        ui.progressive = gr.Textbox("", label="Progressive vectors (vectors:step pairs from step 0, like "
                                              "“1:0,2:100,3:200”; the word ends with the last count; "
                                              "empty: Vectors per word from the start)")
        ui.per_image_tokens = gr.Checkbox(False, label="Per-image words (each picture also gets a word of "
                                                       "its own for its particulars; only the word is saved)")
        ui.keep_norm = gr.Checkbox(False, label="Keep the norm (after each update, scale each vector to "
                                                "the vocabulary's typical norm)")
        gr.Markdown("Weights (pivotal, lora, dreambooth):")
        ui.rank = gr.Slider(1, 128, value=TrainConfig.rank, step=1, label="LoRA rank (pivotal, lora)")
        ui.lite = gr.Checkbox(False, label="Lite preset (pivotal: rank 1 on the cross-attention keys and "
                                           "values only, the smallest file)")
        ui.unet_lr = gr.Number(label="Weights learning rate (0: the method's default)", value=0, minimum=0)
        ui.word_steps = gr.Number(label="Word-first steps (pivotal: the word learns alone this long, then "
                                        "with the LoRA)", value=0, minimum=0, precision=0)
        ui.class_word = gr.Textbox("", label="Class word (lora, dreambooth: “<word> <class word>”; "
                                             "empty: the start word)")
        ui.prior_preservation = gr.Checkbox(False, label="Prior preservation (lora, dreambooth: also learn "
                                                         "on pictures of the class the model draws once)")
        ui.class_images = gr.Slider(1, 200, value=TrainConfig.class_images, step=1, label="Class pictures")
        ui.prior_weight = gr.Number(label="Prior loss weight", value=TrainConfig.prior_weight, minimum=0)


def progress_layout(ui: SimpleNamespace) -> None:
    """The run's status line, its loss plot, the latest previews and the learned file; the components go in `ui`."""
    ui.status = gr.Textbox(label="Progress", lines=4, elem_id="train-status")
    ui.plot = gr.LinePlot(x="step", y="loss", color="series", height=240, elem_id="train-loss",
                          color_map={LOSS_SERIES: "#93c5fd", MEAN_SERIES: "#ea580c", SCORE_SERIES: "#15803d"},
                          label=f"Training loss (light blue: each step; orange: mean of the last {SMOOTHING}; "
                                "green: the held-back score, when stopping once learned)")
    # Three fixed columns (fit_columns=False: one preview is not widened to the whole 580-px row): ~185-px
    # cells, whole inside the 240-px frame.
    ui.previews = gr.Gallery(label="Latest preview", columns=3, height=240, elem_id="train-previews",
                             object_fit="contain", fit_columns=False, elem_classes=["pixel-art"])
    ui.result = gr.File(label="Learned concept (download)", elem_id="train-result")


def build_train_tab(studio: Studio, pickers: ConceptPickers) -> None:
    """Pictures, word and settings; `/train`, `/cancel_training` and `/training_progress` endpoints."""
    handlers = train_handlers(studio)
    ui = train_layout(studio)
    wire_train(studio, pickers, ui, handlers)


def train_handlers(studio: Studio) -> SimpleNamespace:
    """The tab's handlers, by name: adapters from the form to the functions above (`train`, and `admit`, which
    refuses a run before it waits; `explain` a method; `cancel`; `poll` the plot and previews, `poll_and_stop`)."""

    def snapshots(session: str, files: list[str], cfg: TrainConfig) -> Iterator[TrainingSnapshot]:
        yield from device_snapshots(studio, session, files, cfg)

    on_device = gpu_task(snapshots, TRAIN_SECONDS)  # ZeroGPU: this part runs in the GPU worker

    def train(files, token, init, kind, vectors, steps, lr, batch, preview_every, method, rank, lite_preset,
              unet_lr, word_steps, class_word, prior_preservation, class_images, prior_weight, regularization,
              stop_when_learned, stop_every, progressive, per_image_tokens, keep_norm,
              request: gr.Request, progress=gr.Progress()):
        if not files:
            raise gr.Error("Upload at least one picture of your concept.")
        values = (token, init, kind, vectors, steps, lr, batch, preview_every, method, rank, lite_preset, unet_lr,
                  word_steps, class_word, prior_preservation, class_images, prior_weight, regularization,
                  stop_when_learned, stop_every, progressive, per_image_tokens, keep_norm)
        cfg = train_config(dict(zip(FORM, values)), request)
        if METHOD_CLASSES[cfg.method].writes_folder:
            yield dreambooth_size(studio), None
        yield from train_stream(studio, on_device, studio.session_of(request), [str(f) for f in files], cfg,
                                request, progress)

    def admit(form: dict) -> None:
        """Before the run waits for the device: refuse now what would be refused then (no pictures, more steps than
        the studio allows, a model folder its session has no room for)."""
        if not form["files"]:
            raise gr.Error("Upload at least one picture of your concept.")
        studio.check_train_steps(form["steps"])
        method = METHOD_CLASSES.get(form["method"] or "ti")
        if method is not None and method.writes_folder:
            sizes = model_folder_bytes(studio.model.pipe, {"unet": DreamBooth.save_dtype})
            studio.session(form["request"]).make_room(sum(sizes.values()))

    def encode(files, token, init, request: gr.Request):
        """Encode instead of train: the pictures become the session's image concept (`studio.image_adapter`), the
        start word standing where its word is written."""
        with as_user_errors(request):
            done = encode_for_session(studio.model, studio.library, studio.sessions.get(studio.session_of(request)),
                                      [str(f) for f in files or []], token, init or "", studio.image_adapter)
        return done.status, None

    def explain(method: str) -> str:
        return method_info(studio, method)

    def cancel(request: gr.Request):
        return cancel_training(studio, studio.session_of(request))

    def poll(request: gr.Request):
        return progress_view(studio, studio.session_of(request))

    def poll_and_stop(request: gr.Request):
        return *progress_view(studio, studio.session_of(request)), gr.Timer(active=False)

    return SimpleNamespace(train=train, admit=admit, encode=encode, explain=explain, cancel=cancel, poll=poll,
                           poll_and_stop=poll_and_stop)


def wire_train(studio: Studio, pickers: ConceptPickers, ui: SimpleNamespace, handlers: SimpleNamespace) -> None:
    """`/train`, `/training_progress` (the timer that polls while a run trains) and `/cancel_training`; the
    method's explanation follows the method picked."""
    ui.method.change(handlers.explain, ui.method, ui.method_info, api_visibility="private", show_progress="hidden")
    ui.start.click(lambda: gr.Timer(active=True), None, ui.timer, api_visibility="private", concurrency_limit=None)
    form = [ui.files, *(getattr(ui, name) for name in FORM)]
    # The pictures are copied into the session (Gradio's are used up); while the run waits, the status line says
    # its place.
    queued_train = in_turn(studio, handlers.train, "train", uploads=("files",), check=handlers.admit,
                           waiting=lambda text: (text, None))
    trained = ui.start.click(queued_train, form, [ui.status, ui.result], api_name="train", **GPU_EVENT,
                             show_progress_on=ui.result)  # the bar sits on the download box; the status stays readable
    live = [ui.plot, ui.previews, ui.timer]
    trained.then(handlers.poll_and_stop, None, live, api_visibility="private", show_progress="hidden")
    pickers.after(trained)
    # Public too: API clients read (loss plot, previews) of their session's latest run as data.
    ui.timer.tick(handlers.poll, None, [ui.plot, ui.previews], api_name="training_progress", concurrency_limit=None,
                  show_progress="hidden")
    # The flag stops a running training within one step and takes a waiting one out of line; `cancels` also ends
    # this browser's event.
    # Encode: one pass of the image encoder, in line on the device like a picture (`/encode`).
    encoded = ui.encode.click(in_turn(studio, handlers.encode, "generate", uploads=("files",)),
                              [ui.files, ui.token, ui.init], [ui.status, ui.result], api_name="encode", **GPU_EVENT)
    pickers.after(encoded)
    stopped = ui.stop.click(handlers.cancel, None, [ui.status, ui.result], api_name="cancel_training",
                            concurrency_limit=None, cancels=[trained])
    stopped.then(handlers.poll_and_stop, None, live, api_visibility="private", show_progress="hidden")
    pickers.after(stopped)
