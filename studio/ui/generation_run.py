"""One generation for the Generate tab, streamed: the engine runs in a background thread and each denoising step
(with a preview picture every `GenerateRequest.preview_every` steps) is handed on as it happens, then the saved
pictures. Plain data in and out, so that on ZeroGPU it can run in the GPU worker process. No Gradio.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Iterator

from PIL import Image

from studio.engine.generate import GenerateRequest, generate


@dataclass
class GenerationUpdate:
    """A step of a running generation (`preview` set every few steps) or, last, the saved pictures (`paths`)."""

    step: int
    total: int
    preview: Image.Image | None = None
    paths: list[str] | None = None


def generation_updates(studio, req: GenerateRequest, session: str) -> Iterator[GenerationUpdate]:
    """Generate `req` for `session` on the studio's model; yield every step as it happens, then the PNG paths.

    Engine errors (Cancelled, a bad request) are raised from this iterator after the steps that ran. Closing the
    iterator early (the browser's Cancel closes a running event) stops the generation within one step.
    `studio` is a `studio.ui.state.Studio`.
    """
    flag = studio.fresh_cancel_flag(session)
    updates: queue.Queue[GenerationUpdate | None] = queue.Queue()
    outcome: dict = {}

    def on_step(step: int, total: int, preview: Image.Image | None) -> None:
        updates.put(GenerationUpdate(step, total, preview))

    def work() -> None:
        try:
            result = generate(studio.model, req, on_step=on_step, cancel=flag)
            outcome["paths"] = studio.save_pictures(result, session)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consuming thread below
            outcome["error"] = exc
        finally:
            updates.put(None)

    thread = threading.Thread(target=work, name=f"generate {session}", daemon=True)
    thread.start()
    step = total = 0
    try:
        while (update := updates.get()) is not None:
            step, total = update.step, update.total
            yield update
    finally:
        if not outcome:
            # Closed before the end: no one wants the pictures any more. Not joined: the close may come from the
            # server's event loop, and the engine stops at its next step on its own.
            flag.set()
    if "error" in outcome:
        raise outcome["error"]
    yield GenerationUpdate(step, total, paths=outcome["paths"])
