"""Train tab: a few pictures → a new word. Live loss plot, preview pictures, progress bar and cancel.

The `/train` endpoint streams its status text (with the loss of the latest step) and finally returns
`(status, concept_file)`; the loss plot and previews are read by a timer from the session's training run
(`/training_progress`), so the endpoint keeps its two outputs for gradio_client users. The run itself is the
engine's (`studio.training.run`); this file adapts the form to it and its snapshots to the components.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Callable, Iterator

import gradio as gr
import pandas as pd

from studio.engine.session import RunEnd
from studio.training import TrainConfig
from studio.training.run import (SMOOTHING, TrainingSnapshot, follow_to_end, keep_concept, loss_table,
                                training_snapshots)
from studio.ui.gpu import TRAIN_SECONDS, gpu_task
from studio.ui.pickers import ConceptPickers
from studio.ui.state import as_user_errors, for_client, Studio

POLL_EVERY_S = 1.0  # the loss plot and previews are re-read this often while training
CANCEL_WAIT_S = 60.0  # a cancelled run stops within one step; a step longer than this is no step we run

OnDevice = Callable[[str, list[str], TrainConfig], Iterator[TrainingSnapshot]]


def device_snapshots(studio: Studio, session: str, files: list[str], cfg: TrainConfig) -> Iterator[TrainingSnapshot]:
    """The GPU part of `/train`: the session's run as snapshots; the user's errors as gr.Error.

    Takes and yields plain data only, so that on ZeroGPU it can run in the GPU worker process.
    """
    with as_user_errors():
        yield from training_snapshots(studio.model, studio.sessions.get(session), files, cfg)


def train_config(token: str, init: str, kind: str, vectors, steps, lr, batch, preview_every,
                 request: gr.Request | None = None) -> TrainConfig:
    """The TrainConfig of the form's values (as sent); its checks' errors as gr.Error."""
    with as_user_errors(request):
        return TrainConfig((token or "").strip(), init_text=init or "*", n_vectors=int(vectors), steps=int(steps),
                           learning_rate=float(lr), batch_size=int(batch), template=kind,
                           preview_every=int(preview_every or 0))


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
    yield end.finish(keep_concept(studio.library, session, snapshot), snapshot.path)


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
    """The loss plot's table and the latest preview pictures of the session's training run.

    No loss yet: None, not an empty table; a LinePlot once given an empty table with a `color` column draws no
    lines for later values (gradio 6.31, seen in chromium).
    """
    snapshot = studio.sessions.get(session).training
    if snapshot is None or not snapshot.losses:
        return None, list(snapshot.previews if snapshot else [])
    return pd.DataFrame(loss_table(snapshot.losses)), list(snapshot.previews)


def train_layout() -> SimpleNamespace:
    """The tab's components, by name."""
    ui = SimpleNamespace()
    gr.Markdown("Upload 3-5 pictures of your concept, name its word, and train: only that word's vectors learn.")
    with gr.Row():
        with gr.Column():
            ui.files = gr.File(label="Pictures", file_count="multiple", file_types=["image"], elem_id="train-pictures")
            ui.token = gr.Textbox(label="New word", value="<my-concept>")
            ui.init = gr.Textbox(label="Start from the word", value="shape")
            ui.kind = gr.Radio(["object", "style"], value="object", label="What is it?")
            with gr.Accordion("Advanced", open=False):
                ui.vectors = gr.Slider(1, 8, value=1, step=1, label="Vectors per word")
                ui.steps = gr.Slider(1, 3000, value=300, step=1, label="Steps", elem_id="train-steps")
                ui.lr = gr.Number(label="Learning rate", value=0.005)
                ui.batch = gr.Slider(1, 8, value=4, step=1, label="Batch size")
                ui.preview_every = gr.Slider(0, 500, value=50, step=1,
                                             label="Preview picture every N steps (0: none)",
                                             elem_id="train-preview-every")
            with gr.Row():
                ui.start = gr.Button("Train", variant="primary")
                ui.stop = gr.Button("Cancel")
        with gr.Column():
            ui.status = gr.Textbox(label="Progress", lines=4, elem_id="train-status")
            ui.plot = gr.LinePlot(x="step", y="loss", color="series", height=240, elem_id="train-loss",
                                  color_map={"loss": "#93c5fd", f"mean of {SMOOTHING}": "#ea580c"},
                                  label=f"Training loss (light blue: each step; orange: mean of the last {SMOOTHING})")
            ui.previews = gr.Gallery(label="Latest preview", columns=2, height=200, elem_id="train-previews",
                                     object_fit="contain", elem_classes=["pixel-art"])
            ui.result = gr.File(label="Learned concept (download)", elem_id="train-result")
    ui.timer = gr.Timer(POLL_EVERY_S, active=False)
    return ui


def build_train_tab(studio: Studio, pickers: ConceptPickers) -> None:
    """Pictures, word and settings; `/train`, `/cancel_training` and `/training_progress` endpoints."""
    # 1. Handlers: adapters from the form to the functions above.
    def snapshots(session: str, files: list[str], cfg: TrainConfig) -> Iterator[TrainingSnapshot]:
        yield from device_snapshots(studio, session, files, cfg)

    on_device = gpu_task(snapshots, TRAIN_SECONDS)  # ZeroGPU: this part runs in the GPU worker

    def train(files, token, init, kind, vectors, steps, lr, batch, preview_every, request: gr.Request,
              progress=gr.Progress()):
        if not files:
            raise gr.Error("Upload at least one picture of your concept.")
        cfg = train_config(token, init, kind, vectors, steps, lr, batch, preview_every, request)
        yield from train_stream(studio, on_device, studio.session_of(request), [str(f) for f in files], cfg,
                                request, progress)

    def cancel(request: gr.Request):
        return cancel_training(studio, studio.session_of(request))

    def poll(request: gr.Request):
        return progress_view(studio, studio.session_of(request))

    def poll_and_stop(request: gr.Request):
        return *progress_view(studio, studio.session_of(request)), gr.Timer(active=False)

    ui = train_layout()

    # 2. Wiring.
    ui.start.click(lambda: gr.Timer(active=True), None, ui.timer, api_visibility="private", concurrency_limit=None)
    form = [ui.files, ui.token, ui.init, ui.kind, ui.vectors, ui.steps, ui.lr, ui.batch, ui.preview_every]
    trained = ui.start.click(train, form, [ui.status, ui.result], api_name="train", concurrency_id="gpu",
                             show_progress_on=ui.result)  # the bar sits on the download box; the status stays readable
    live = [ui.plot, ui.previews, ui.timer]
    trained.then(poll_and_stop, None, live, api_visibility="private", show_progress="hidden")
    pickers.after(trained)
    # Public too: API clients read (loss plot, previews) of their session's latest run as data.
    ui.timer.tick(poll, None, [ui.plot, ui.previews], api_name="training_progress", concurrency_limit=None,
                  show_progress="hidden")
    # The flag stops a running training within one step; `cancels` also takes this browser's job off the GPU queue
    # while it still waits there.
    stopped = ui.stop.click(cancel, None, [ui.status, ui.result], api_name="cancel_training", concurrency_limit=None,
                            cancels=[trained])
    stopped.then(poll_and_stop, None, live, api_visibility="private", show_progress="hidden")
    pickers.after(stopped)
