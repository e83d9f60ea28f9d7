"""A user's session and the generation runs it starts. No Gradio: the UI maps its requests to a `Session` and
adapts what runs here to its components.

A `Session` is one user's scratch space: its own folder for pictures and training files, a cancel flag per job kind
("generate", "train", "evaluate"), the thumbnails made in it, and its latest training run (the snapshot the live
view draws and how the run ended). `Sessions` hands them out by id and forgets them when their page closes.

`generation_updates` is one generation, streamed: the engine runs in a background thread and each denoising step
(with a preview picture every `GenerateRequest.preview_every` steps) is handed on as it happens, then the saved
pictures. Plain data in and out, so that on ZeroGPU it can run in the GPU worker process.
"""

from __future__ import annotations

import queue
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from PIL import Image

from studio.engine.concepts import Concept
from studio.engine.generate import GenerateRequest, GenerateResult, generate, save_png
from studio.engine.names import file_stem, inside
from studio.engine.prompts import split_lora_tags
from studio.errors import LoraError

if TYPE_CHECKING:
    from studio.library import ConceptLibrary
    from studio.training.run import TrainingSnapshot

# A word written the way concept words are (<my-cat>): one that is no concept gets a warning, not silence.
CONCEPT_LIKE = re.compile(r"<[^<>\s,()\[\]{}:|]+>")
ANONYMOUS = "anonymous"  # the session of a request that names none


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


@dataclass
class Session:
    """One user's session. `training` is the latest snapshot of its training run, `training_end` how that run ended."""

    id: str
    work_dir: Path
    thumbnails: dict[str, Path] = field(default_factory=dict)  # concept word -> picture made in this session
    training: TrainingSnapshot | None = None
    training_end: RunEnd | None = None
    _cancel: dict[str, threading.Event] = field(default_factory=dict)  # job kind -> flag

    @property
    def folder(self) -> Path:
        """The session's own folder for pictures and training files (its name made safe: ids come from clients)."""
        path = inside(self.work_dir, file_stem(self.id or ANONYMOUS, fallback=ANONYMOUS))
        path.mkdir(parents=True, exist_ok=True)
        return path

    def cancel_flag(self, job: str = "generate") -> threading.Event:
        """The flag that stops this session's running `job` ("generate", "train" or "evaluate") within one step."""
        return self._cancel.setdefault(job, threading.Event())

    def fresh_cancel_flag(self, job: str = "generate") -> threading.Event:
        """A new, unset flag for a `job` that starts now (what `cancel` sets from here on). A run that was closed
        early keeps its own, set, flag: clearing a shared one could let it run on after its cancel."""
        flag = self._cancel[job] = threading.Event()
        return flag

    def cancel(self, job: str = "generate") -> None:
        """Stop this session's running `job` within one step."""
        self.cancel_flag(job).set()

    def save_pictures(self, result: GenerateResult) -> list[str]:
        """Save each picture of `result` (PNG with its parameters) in the session folder; return their paths."""
        out = self.folder
        paths = []
        for image, seed in zip(result.images, result.seeds):
            path = out / f"{len(list(out.glob('*.png'))):05d}-{seed}.png"
            save_png(image, path)
            paths.append(str(path))
        return paths

    def rename_thumbnail(self, old: str, new: str) -> None:
        """The thumbnail of concept `old` now belongs to `new` (after a rename, or a save under the next free word)."""
        if old in self.thumbnails:
            self.thumbnails[new] = self.thumbnails.pop(old)


class Sessions:
    """The open sessions of one studio, by id; their folders live under `work_dir`."""

    def __init__(self, work_dir: Path) -> None:
        self.work_dir = Path(work_dir)
        self._open: dict[str, Session] = {}
        self._lock = threading.Lock()

    def get(self, session_id: str | None) -> Session:
        """The session with this id, opened when it is new."""
        key = session_id or ANONYMOUS
        with self._lock:
            if key not in self._open:
                self._open[key] = Session(key, self.work_dir)
            return self._open[key]

    def forget(self, session_id: str) -> None:
        """Drop what a session keeps in memory (its flags, thumbnails, training view); its files stay."""
        with self._lock:
            self._open.pop(session_id or ANONYMOUS, None)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._open))


def request_for(fields: dict, library: ConceptLibrary, session_id: str) -> tuple[GenerateRequest, list[str]]:
    """The engine request for a form's fields, with the concepts its prompt and negative prompt name and the LoRAs
    its prompt names (`ConceptLibrary.resolve`: its `<lora:name:w>` tags, and the LoRA that comes with a pivotal
    word), and the words written like concepts (`<...>`) that name none: the model reads those as plain text, which
    the user should hear.

    A tag naming no LoRA raises LoraError; so does one in the negative prompt, where `generate` reads no tags (a
    LoRA changes the model for the whole picture, not one prompt), rather than leaving it there as plain text. For
    the same reason a pivotal word in the negative prompt gives its vectors there, and its LoRA only when the prompt
    names it too."""
    prompt, negative = fields["prompt"], fields.get("negative_prompt", "")
    negative_tags = split_lora_tags(negative)[1]
    if negative_tags:
        name = negative_tags[0][0]
        raise LoraError(f"<lora:{name}> is in the negative prompt: a LoRA changes the whole picture, so write its "
                        f"tag in the prompt (<lora:{name}:-0.5> to push away from it)")
    concepts = library.resolve(prompt, session_id)
    concepts += [c for c in library.resolve(negative, session_id)
                 if isinstance(c, Concept) and not any(c is known for known in concepts)]
    words = [c for c in concepts if isinstance(c, Concept)]
    words += [word for item in concepts if isinstance(item, tuple) for word in item[0].words]  # bundled words
    known = {word.token for word in words}
    known |= {w for item in concepts if isinstance(item, tuple) for w in CONCEPT_LIKE.findall(item[0].phrase)}
    text = split_lora_tags(prompt)[0] + " " + negative
    unknown = sorted({word for word in CONCEPT_LIKE.findall(text) if word not in known})
    return GenerateRequest(concepts=concepts, **fields), unknown


@dataclass
class GenerationUpdate:
    """A step of a running generation (`preview` set every few steps) or, last, the saved pictures (`paths`)."""

    step: int
    total: int
    preview: Image.Image | None = None
    paths: list[str] | None = None


def generation_updates(model, req: GenerateRequest, session: Session) -> Iterator[GenerationUpdate]:
    """Generate `req` on `model` for `session`; yield every step as it happens, then the saved PNGs' paths.

    Engine errors (Cancelled, a bad request) are raised from this iterator after the steps that ran. Closing the
    iterator early (the browser's Cancel closes a running event) stops the generation within one step, as does
    `session.cancel()`.
    """
    flag = session.fresh_cancel_flag("generate")
    updates: queue.Queue[GenerationUpdate | None] = queue.Queue()
    outcome: dict = {}

    def on_step(step: int, total: int, preview: Image.Image | None) -> None:
        updates.put(GenerationUpdate(step, total, preview))

    def work() -> None:
        try:
            result = generate(model, req, on_step=on_step, cancel=flag)
            outcome["paths"] = session.save_pictures(result)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consuming thread below
            outcome["error"] = exc
        finally:
            updates.put(None)

    thread = threading.Thread(target=work, name=f"generate {session.id}", daemon=True)
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
