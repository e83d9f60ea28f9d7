"""Train tab: a few pictures → a new word. Live loss plot, preview pictures, progress bar and cancel.

The `/train` endpoint streams its status text (with the loss of the latest step) and finally returns
`(status, concept_file)`; the loss plot and previews are read by a timer from the session's training run
(`/training_progress`), so the endpoint keeps its two outputs for gradio_client users.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import gradio as gr
import pandas as pd

from studio.training import TrainConfig, Trainer
from studio.ui.gpu import TRAIN_SECONDS, gpu_task
from studio.ui.pickers import ConceptPickers
from studio.ui.state import USER_ERRORS, Studio, for_client, user_error
from studio.ui.training_run import SMOOTHING, TrainingRun, TrainingSnapshot, loss_table

STATUS_EVERY_S = 0.25  # at most four status messages a second: the browser need not redraw on every step
POLL_EVERY_S = 1.0  # the loss plot and previews are re-read this often while training
CANCEL_WAIT_S = 60.0  # a cancelled run stops within one step; a step longer than this is no step we run


@dataclass
class RunEnd:
    """How a session's latest training run ended (set once it has): the status to show and the concept file."""

    done: threading.Event = field(default_factory=threading.Event)
    status: str = ""
    path: str | None = None

    def finish(self, status: str, path: str | None) -> tuple[str, str | None]:
        self.status, self.path = status, path
        self.done.set()
        return status, path


def training_snapshots(studio: Studio, session: str, files: list[str], cfg: TrainConfig) -> Iterator[TrainingSnapshot]:
    """Train `cfg` on the pictures (the GPU part): a snapshot at most every STATUS_EVERY_S, the last with the concept.

    Takes and yields plain data only, so that on ZeroGPU it can run in the GPU worker process.
    """
    # A fresh flag: a run closed early keeps its own, set, one (clearing a shared flag would let it run on).
    flag = studio.fresh_cancel_flag(session, "train")
    try:
        trainer = Trainer(studio.model, cfg, [Path(f) for f in files], studio.session_dir(session) / "concepts")
    except USER_ERRORS as exc:
        raise user_error(exc) from exc
    run = TrainingRun(trainer, flag).start()
    shown = 0.0
    for event in run.events():
        if event.kind != "step" or time.monotonic() - shown >= STATUS_EVERY_S or event.step == event.total:
            shown = time.monotonic()
            yield run.snapshot()
    if run.error is not None:
        if isinstance(run.error, USER_ERRORS):
            raise user_error(run.error) from run.error
        raise run.error
    yield run.snapshot()


def progress_view(studio: Studio, session: str) -> tuple[pd.DataFrame | None, list]:
    """The loss plot's table and the latest preview pictures of the session's training run.

    No loss yet: None, not an empty table; a LinePlot once given an empty table with a `color` column draws no
    lines for later values (gradio 6.31, seen in chromium).
    """
    snapshot = studio.runs.get(session)
    if snapshot is None or not snapshot.losses:
        return None, list(snapshot.previews if snapshot else [])
    return pd.DataFrame(loss_table(snapshot.losses)), list(snapshot.previews)


def build_train_tab(studio: Studio, pickers: ConceptPickers) -> None:
    """Pictures, word and settings; `/train`, `/cancel_training` and `/training_progress` endpoints."""
    # 1. Pure functions.
    def snapshots(session: str, files: list[str], cfg: TrainConfig) -> Iterator[TrainingSnapshot]:
        yield from training_snapshots(studio, session, files, cfg)

    on_device = gpu_task(snapshots, TRAIN_SECONDS)  # ZeroGPU: this part runs in the GPU worker

    def train(files, token, init, kind, vectors, steps, lr, batch, preview_every, request: gr.Request,
              progress=gr.Progress()):
        session = studio.session_of(request)
        if not files:
            raise gr.Error("Upload at least one picture of your concept.")
        try:
            cfg = TrainConfig(token.strip(), init_text=init or "*", n_vectors=int(vectors), steps=int(steps),
                              learning_rate=float(lr), batch_size=int(batch), template=kind,
                              preview_every=int(preview_every or 0))
        except USER_ERRORS as exc:
            raise user_error(exc, request) from exc
        end = studio.training_ends[session] = RunEnd()
        runs = on_device(session, [str(f) for f in files], cfg)
        snapshot = None
        try:
            for snapshot in runs:
                studio.runs[session] = snapshot
                if snapshot.loss is not None:
                    progress((snapshot.step, snapshot.total), desc=f"loss {snapshot.loss:.4f}", unit="steps")
                if snapshot.concept is None:
                    yield snapshot.status, None
        except GeneratorExit:
            # The browser's Cancel (`cancels=`) or a client's job.cancel() closed this event while the trainer ran:
            # it stops at its next step, and what it learned is kept, as after /cancel_training. In a thread, since
            # the close may come from the server's event loop.
            studio.cancel_flag(session, "train").set()
            threading.Thread(target=keep_last, args=(session, runs, end), name=f"keep {cfg.token}", daemon=True).start()
            raise
        except gr.Error as exc:
            end.finish(str(exc.message), None)
            raise for_client(exc, request) from exc
        except BaseException as exc:
            end.finish(f"failed: {exc}", None)
            raise
        yield end.finish(keep(session, snapshot), snapshot.path)

    def keep(session: str, snapshot: TrainingSnapshot) -> str:
        """Put the concept of a run's last snapshot in the session (with its thumbnail); the status to show."""
        concept = snapshot.concept
        studio.library.add_session_concept(session, concept)
        if snapshot.previews and snapshot.path:
            thumb = Path(snapshot.path).with_suffix(".preview.png")  # A1111's name for a concept's thumbnail
            snapshot.previews[0].save(thumb)
            studio.thumbnails[(session, concept.token)] = thumb
        return f"{snapshot.status}\n{concept.token} is ready: write it in any prompt in this session."

    def keep_last(session: str, runs: Iterator[TrainingSnapshot], end: RunEnd) -> None:
        snapshot = None
        try:
            for snapshot in runs:
                studio.runs[session] = snapshot
        except BaseException as exc:  # noqa: BLE001 - nobody listens to this closed run but its RunEnd
            end.finish(f"failed: {getattr(exc, 'message', exc)}", None)
            return
        if snapshot is not None and snapshot.concept is not None:
            end.finish(keep(session, snapshot), snapshot.path)
        else:
            end.finish(snapshot.status if snapshot else "cancelled before the first step", None)

    def cancel(request: gr.Request):
        """Stop this session's run within one step; once it has stopped, its last status line and file (the browser's
        Cancel also closes the /train event, which can then no longer show them)."""
        session = studio.session_of(request)
        studio.cancel_flag(session, "train").set()
        end = studio.training_ends.get(session)
        if end is None or not end.done.wait(CANCEL_WAIT_S):
            return gr.update(), gr.update()
        return end.status, end.path

    def poll(request: gr.Request):
        return progress_view(studio, studio.session_of(request))

    def poll_and_stop(request: gr.Request):
        return *progress_view(studio, studio.session_of(request)), gr.Timer(active=False)

    # 2. Layout.
    gr.Markdown("Upload 3-5 pictures of your concept, name its word, and train: only that word's vectors learn.")
    with gr.Row():
        with gr.Column():
            files = gr.File(label="Pictures", file_count="multiple", file_types=["image"], elem_id="train-pictures")
            token = gr.Textbox(label="New word", value="<my-concept>")
            init = gr.Textbox(label="Start from the word", value="shape")
            kind = gr.Radio(["object", "style"], value="object", label="What is it?")
            with gr.Accordion("Advanced", open=False):
                vectors = gr.Slider(1, 8, value=1, step=1, label="Vectors per word")
                steps = gr.Slider(1, 3000, value=300, step=1, label="Steps", elem_id="train-steps")
                lr = gr.Number(label="Learning rate", value=0.005)
                batch = gr.Slider(1, 8, value=4, step=1, label="Batch size")
                preview_every = gr.Slider(0, 500, value=50, step=1, label="Preview picture every N steps (0: none)",
                                          elem_id="train-preview-every")
            with gr.Row():
                start = gr.Button("Train", variant="primary")
                stop = gr.Button("Cancel")
        with gr.Column():
            status = gr.Textbox(label="Progress", lines=4, elem_id="train-status")
            plot = gr.LinePlot(x="step", y="loss", color="series", height=240, elem_id="train-loss",
                               color_map={"loss": "#93c5fd", f"mean of {SMOOTHING}": "#ea580c"},
                               label=f"Training loss (light blue: each step; orange: mean of the last {SMOOTHING})")
            previews = gr.Gallery(label="Latest preview", columns=2, height=200, elem_id="train-previews",
                                  object_fit="contain", elem_classes=["pixel-art"])
            result = gr.File(label="Learned concept (download)", elem_id="train-result")
    timer = gr.Timer(POLL_EVERY_S, active=False)

    # 3. Wiring.
    start.click(lambda: gr.Timer(active=True), None, timer, api_visibility="private", concurrency_limit=None)
    trained = start.click(train,
                          [files, token, init, kind, vectors, steps, lr, batch, preview_every],
                          [status, result], api_name="train", concurrency_id="gpu",
                          show_progress_on=result)  # the bar sits on the download box; the status stays readable
    trained.then(poll_and_stop, None, [plot, previews, timer], api_visibility="private", show_progress="hidden")
    pickers.after(trained)
    # Public too: API clients read (loss plot, previews) of their session's latest run as data.
    timer.tick(poll, None, [plot, previews], api_name="training_progress", concurrency_limit=None,
               show_progress="hidden")
    # The flag stops a running training within one step; `cancels` also takes this browser's job off the GPU queue
    # while it still waits there.
    stopped = stop.click(cancel, None, [status, result], api_name="cancel_training", concurrency_limit=None,
                         cancels=[trained])
    stopped.then(poll_and_stop, None, [plot, previews, timer], api_visibility="private", show_progress="hidden")
    pickers.after(stopped)
