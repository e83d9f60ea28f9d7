"""A training run: a Trainer run as a `Job`, and the view of it that a UI draws. No Gradio.

`TrainingRun` records each of the trainer's events as it happens (the losses, the held-back scores, the latest
previews, the messages) and hands it on through its job's `events()`; `snapshot()` is the run as it is now, as plain
data (so it can cross the process boundary of a ZeroGPU worker), from which a UI draws the status text, the progress
bar, the loss plot (`loss_table`) and the previews.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from PIL import Image

from studio.engine.learned.lora import LoraFile
from studio.engine.learned.word import Concept
from studio.jobs.job import Job
from studio.training.trainer import TrainEvent, Trainer

SMOOTHING = 10  # steps in the running mean drawn over the raw loss, which jumps with each step's random timestep
# The loss plot's series (its `series` column): each step's loss, their running mean, and the held-back score the
# trainer takes every `stop_every` steps (stop when learned), on a fixed draw, so it falls only as the word learns.
LOSS_SERIES, MEAN_SERIES, SCORE_SERIES = "loss", f"mean of {SMOOTHING}", "held-back score"


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
    """A Trainer running as a `Job` (it stops within one step once `cancel` is set). `concept` (or `error`) is set
    once `events()` has ended."""

    trainer: Trainer
    cancel: threading.Event
    losses: list[tuple[int, float]] = field(default_factory=list)
    scores: list[tuple[int, float]] = field(default_factory=list)
    previews: list[Image.Image] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    last: TrainEvent | None = None
    last_step: TrainEvent | None = None  # the latest "step" event: a score event comes between two of them
    path: str | None = None
    job: Job[TrainEvent, Learned] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.job = Job(f"train {self.trainer.config.token}", self._work, self.cancel)

    def start(self) -> TrainingRun:
        """Run the trainer in the job's daemon thread; returns self."""
        self.job.start()
        return self

    def _work(self, emit: Callable[[TrainEvent], None], cancel: threading.Event) -> Learned:
        def on_event(event: TrainEvent) -> None:
            self._record(event)
            emit(event)

        return self.trainer.run(on_event, cancel)

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

    def events(self) -> Iterator[TrainEvent]:
        """Every event as it happens, until the trainer returns (or fails); closed before that, the run is cancelled
        (`Job.events`)."""
        return self.job.events()

    @property
    def concept(self) -> Learned | None:
        """What the trainer returned, once it has; None while it runs, or when it failed."""
        return self.job.result() if self.job.ended and self.job.error is None else None

    @property
    def error(self) -> BaseException | None:
        """What the trainer raised, once it has (Cancelled, a TrainError, ...); None otherwise."""
        return self.job.error

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
