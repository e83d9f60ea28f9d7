"""One training job of a session: the Trainer runs in a background thread and its events are kept for a live view.

`training_snapshots` iterates a `TrainingRun`'s `events()` and hands on `snapshot()`s: plain data (so they can cross
the process boundary of a ZeroGPU worker) from which a UI draws the status text, the progress bar, the loss plot and
the previews. `keep_concept` and `follow_to_end` put what the run learned in the session: a word (ti) or a LoRA file
(pivotal with its word, lora) as the session's own; a dreambooth model folder is named for the Model tab to load. No
Gradio.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from PIL import Image

from studio.engine.concepts import Concept
from studio.engine.lora import LoraFile
from studio.engine.names import file_stem
from studio.engine.session import RunEnd, Session
from studio.training.config import TrainConfig
from studio.training.methods import METHOD_CLASSES
from studio.training.trainer import TrainEvent, Trainer

if TYPE_CHECKING:
    from studio.library import ConceptLibrary

SMOOTHING = 10  # steps in the running mean drawn over the raw loss, which jumps with each step's random timestep
# The loss plot's series (its `series` column): each step's loss, their running mean, and the held-back score the
# trainer takes every `stop_every` steps (stop when learned), on a fixed draw, so it falls only as the word learns.
LOSS_SERIES, MEAN_SERIES, SCORE_SERIES = "loss", f"mean of {SMOOTHING}", "held-back score"
STATUS_EVERY_S = 0.25  # at most four snapshots a second: a browser need not redraw on every step
MODELS_FOLDER = "models"  # in a session's folder: its fine-tuned model folders, which the Model tab lists


# What a run learns (`Trainer.run`'s result): a word (ti), a LoRA file (pivotal, with its word in `.words`; lora),
# or the folder of a fine-tuned diffusers model (dreambooth).
Learned = Concept | LoraFile | Path


@dataclass
class TrainingSnapshot:
    """What the UI shows of a run at one moment. `concept` (what the run learned, `Learned`) is set in the last
    snapshot of a run that returned."""

    status: str
    step: int = 0
    total: int = 0
    loss: float | None = None
    losses: list[tuple[int, float]] = field(default_factory=list)
    scores: list[tuple[int, float]] = field(default_factory=list)  # (step, held-back score), from "score" events
    previews: list[Image.Image] = field(default_factory=list)
    concept: Learned | None = None
    path: str | None = None  # the file (dreambooth: the folder) the trainer wrote when it finished or was cancelled
    subject: str = ""  # what names the result in a prompt (the method's phrase): the word, or "<token> <class>"
    cancelled: bool = False  # the run was cancelled: what it learned is partial, kept as it was at `step`

    @property
    def file(self) -> str | None:
        """`path` when it is one file, the one a browser can download; None for a model folder (or no file)."""
        return self.path if self.path and Path(self.path).is_file() else None


def loss_table(losses: list[tuple[int, float]], scores: list[tuple[int, float]] = ()) -> dict[str, list]:
    """Columns for a line plot: the raw loss, its running mean over `SMOOTHING` steps and the held-back scores (a
    series of their own: they are the denoising loss too, on the same scale, but of a fixed draw)."""
    steps, values, series = [], [], []
    window: list[float] = []
    for step, loss in losses:
        window = (window + [loss])[-SMOOTHING:]
        steps += [step, step]
        values += [loss, sum(window) / len(window)]
        series += [LOSS_SERIES, MEAN_SERIES]
    for step, score in scores:
        steps.append(step)
        values.append(score)
        series.append(SCORE_SERIES)
    return {"step": steps, "loss": values, "series": series}


@dataclass
class TrainingRun:
    """A Trainer running in a thread. `concept` (or `error`) is set once `events()` has ended."""

    trainer: Trainer
    cancel: threading.Event
    losses: list[tuple[int, float]] = field(default_factory=list)
    scores: list[tuple[int, float]] = field(default_factory=list)
    previews: list[Image.Image] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    last: TrainEvent | None = None
    last_step: TrainEvent | None = None  # the latest "step" event: a score event comes between two of them
    path: str | None = None
    concept: Learned | None = None
    error: BaseException | None = None
    _events: queue.Queue = field(default_factory=queue.Queue)
    _thread: threading.Thread | None = None

    def start(self) -> "TrainingRun":
        """Run the trainer in a daemon thread (it stops within one step once `cancel` is set); returns self."""
        self._thread = threading.Thread(target=self._work, name=f"train {self.trainer.config.token}", daemon=True)
        self._thread.start()
        return self

    def _work(self) -> None:
        try:
            self.concept = self.trainer.run(self._record, self.cancel)
        except BaseException as exc:  # noqa: BLE001 - handed to the UI thread, which decides how to show it
            self.error = exc
        finally:
            self._events.put(None)

    def _record(self, event: TrainEvent) -> None:
        if event.kind == "step" and event.loss is not None:
            self.losses.append((event.step, event.loss))
            self.last_step = event
        if event.kind == "score" and event.loss is not None:
            self.scores.append((event.step, event.loss))
        if event.kind == "preview" and event.images:
            self.previews = list(event.images)
        if event.kind in ("finished", "cancelled") and event.path is not None:
            self.path = str(event.path)
        if event.message:  # a message that starts with its kind ("cancelled; ...") is not prefixed twice
            prefixed = event.message.startswith(event.kind)
            self.messages.append(event.message if prefixed else f"{event.kind}: {event.message}")
        self.last = event
        self._events.put(event)

    def events(self) -> Iterator[TrainEvent]:
        """Every event as it happens, until the trainer returns (or fails)."""
        while True:
            event = self._events.get()
            if event is None:
                return
            yield event

    def snapshot(self, final: bool = False) -> TrainingSnapshot:
        """The run as it is now (a copy: the thread goes on appending). Only the `final` one, taken after `events()`
        has ended, carries the concept: the thread sets it between the "finished" event and its end, so a snapshot of
        that event could carry it or not."""
        last = self.last
        step = last.step if last is not None else 0
        total = last.total if last is not None else self.trainer.config.steps
        loss = self.last_step.loss if self.last_step is not None and last.kind in ("step", "score") else None
        return TrainingSnapshot(self.status(), step, total, loss, list(self.losses), list(self.scores),
                                list(self.previews), self.concept if final else None, self.path,
                                self.trainer.method.phrase(), cancelled=last is not None and last.kind == "cancelled")

    def status(self) -> str:
        """A few lines for the UI: the messages so far (the "finished" one says "converged at step N" when the run
        stopped once learned) and, while the loop runs, where it is with the latest held-back score."""
        lines = list(self.messages[-6:])
        last, at = self.last, self.last_step
        if last is not None and last.kind in ("step", "score") and at is not None:
            score = f" · held-back score {self.scores[-1][1]:.4f}" if self.scores else ""
            lines.append(f"step {at.step}/{at.total} · loss {at.loss:.4f}{score} · {at.steps_per_s:.2f} steps/s · "
                         f"about {at.eta_s:.0f}s left")
        return "\n".join(lines)


def training_snapshots(model, session: Session, files: list[str], cfg: TrainConfig) -> Iterator[TrainingSnapshot]:
    """Train `cfg` on the pictures for `session`: a snapshot at most every STATUS_EVERY_S (and at the last step),
    then the last one, with the concept. Errors of the trainer are raised after the snapshots that ran.

    Takes and yields plain data only (besides the session, which stays where it runs), so that on ZeroGPU it can run
    in the GPU worker process. `session.cancel("train")` stops it within one step.
    """
    # A fresh flag: a run closed early keeps its own, set, one (clearing a shared flag would let it run on).
    flag = session.fresh_cancel_flag("train")
    # A model folder (dreambooth: `out` is the folder itself) goes beside the concept files, never over them.
    out = (session.folder / MODELS_FOLDER / file_stem(cfg.token) if METHOD_CLASSES[cfg.method].writes_folder
           else session.folder / "concepts")
    trainer = Trainer(model, cfg, [Path(f) for f in files], out)
    run = TrainingRun(trainer, flag).start()
    shown = 0.0
    for event in run.events():
        if event.kind != "step" or time.monotonic() - shown >= STATUS_EVERY_S or event.step == event.total:
            shown = time.monotonic()
            yield run.snapshot()
    if run.error is not None:
        raise run.error
    yield run.snapshot(final=True)


def kept_as(snapshot: TrainingSnapshot, name: str) -> str:
    """How the status names what a run kept: ready when it finished, partial when it was cancelled."""
    if snapshot.cancelled:
        return f"What it learned by step {snapshot.step} is kept as {name}"
    return f"{name} is ready"


def keep_concept(library: ConceptLibrary, session: Session, snapshot: TrainingSnapshot) -> str:
    """Put what a run's last snapshot learned in the session (with its thumbnail); the status to show.

    A word becomes a session concept; a LoRA file a session LoRA (`<lora:name:1>` in a prompt applies it, with its
    word for pivotal, as A1111 applies a LoRA's bundled words); a dreambooth folder is a model, named for the Model
    tab, since a model is not a concept a prompt can switch on."""
    learned = snapshot.concept
    if isinstance(learned, Path):
        # Named, never by its path: that holds the server's folders and the session id.
        return (f"{snapshot.status}\nThe fine-tuned model “{learned.name}” is kept in this session: pick "
                f"“{learned.name} (trained in this session)” in the Model tab where this studio lets you switch "
                f"models, then write {snapshot.subject} in a prompt, e.g. “a photo of {snapshot.subject}”.")
    if isinstance(learned, LoraFile):
        name = library.add_session_lora(session.id, learned.path).name
        if learned.words:  # pivotal: the word brings its LoRA (a <lora:name:w> tag only sets the weight)
            word = learned.words[0].token
            ready = (f"{kept_as(snapshot, word)}: write it in any prompt in this session (it brings its LoRA; "
                     f"<lora:{name}:0.5> sets the weight), e.g. “a photo of {word}”.")
        else:
            ready = (f"{kept_as(snapshot, f'<lora:{name}:1>')}: write it with the phrase it learned in any prompt "
                     f"in this session, e.g. “<lora:{name}:1> a photo of {snapshot.subject}”.")
    else:
        name = library.add_session_concept(session.id, learned).token
        ready = f"{kept_as(snapshot, name)}: write it in any prompt in this session."
    if snapshot.previews and snapshot.path:
        thumb = Path(snapshot.path).with_suffix(".preview.png")  # A1111's name for a concept's thumbnail
        snapshot.previews[0].save(thumb)
        session.thumbnails[name] = thumb
    return f"{snapshot.status}\n{ready}"


def follow_to_end(library: ConceptLibrary, session: Session, snapshots: Iterator[TrainingSnapshot],
                  end: RunEnd) -> None:
    """Read a run nobody watches any more (its page's event was closed) to its end: keep what it learned, as after
    a cancel, and say in `end` how it ended."""
    snapshot = None
    try:
        for snapshot in snapshots:
            session.training = snapshot
    except BaseException as exc:  # noqa: BLE001 - nobody listens to this closed run but its RunEnd
        end.finish(f"failed: {getattr(exc, 'message', exc)}", None)
        return
    if snapshot is not None and snapshot.concept is not None:
        end.finish(keep_concept(library, session, snapshot), snapshot.file)
    else:
        end.finish(snapshot.status if snapshot else "cancelled before the first step", None)
