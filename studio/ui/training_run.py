"""One training job for the UI: the Trainer runs in a background thread and its events are kept for the live view.

The UI iterates `events()` and hands on `snapshot()`s: plain data (so they can cross the process boundary of a
ZeroGPU worker) from which the status text, the progress bar, the loss plot and the previews are drawn. No Gradio.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Iterator

from PIL import Image

from studio.engine.concepts import Concept
from studio.training import TrainEvent, Trainer

SMOOTHING = 10  # steps in the running mean drawn over the raw loss, which jumps with each step's random timestep


@dataclass
class TrainingSnapshot:
    """What the UI shows of a run at one moment. `concept` is set in the last snapshot of a run that returned."""

    status: str
    step: int = 0
    total: int = 0
    loss: float | None = None
    losses: list[tuple[int, float]] = field(default_factory=list)
    previews: list[Image.Image] = field(default_factory=list)
    concept: Concept | None = None
    path: str | None = None  # the concept file the trainer wrote when it finished or was cancelled


def loss_table(losses: list[tuple[int, float]]) -> dict[str, list]:
    """Columns for a line plot: the raw loss and its running mean over `SMOOTHING` steps."""
    steps, values, series = [], [], []
    window: list[float] = []
    for step, loss in losses:
        window = (window + [loss])[-SMOOTHING:]
        steps += [step, step]
        values += [loss, sum(window) / len(window)]
        series += ["loss", f"mean of {SMOOTHING}"]
    return {"step": steps, "loss": values, "series": series}


@dataclass
class TrainingRun:
    """A Trainer running in a thread. `concept` (or `error`) is set once `events()` has ended."""

    trainer: Trainer
    cancel: threading.Event
    losses: list[tuple[int, float]] = field(default_factory=list)
    previews: list[Image.Image] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    last: TrainEvent | None = None
    path: str | None = None
    concept: Concept | None = None
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
        if event.kind == "preview" and event.images:
            self.previews = list(event.images)
        if event.kind in ("finished", "cancelled") and event.path is not None:
            self.path = str(event.path)
        if event.message:
            self.messages.append(f"{event.kind}: {event.message}")
        self.last = event
        self._events.put(event)

    def events(self) -> Iterator[TrainEvent]:
        """Every event as it happens, until the trainer returns (or fails)."""
        while True:
            event = self._events.get()
            if event is None:
                return
            yield event

    def snapshot(self) -> TrainingSnapshot:
        """The run as it is now (a copy: the thread goes on appending)."""
        last = self.last
        step = last.step if last is not None else 0
        total = last.total if last is not None else self.trainer.config.steps
        loss = last.loss if last is not None and last.kind == "step" else None
        return TrainingSnapshot(self.status(), step, total, loss, list(self.losses), list(self.previews), self.concept,
                                self.path)

    def status(self) -> str:
        """A few lines for the UI: the messages so far and where the loop is."""
        lines = list(self.messages[-6:])
        last = self.last
        if last is not None and last.kind == "step":
            lines.append(f"step {last.step}/{last.total} · loss {last.loss:.4f} · {last.steps_per_s:.2f} steps/s · "
                         f"about {last.eta_s:.0f}s left")
        return "\n".join(lines)
