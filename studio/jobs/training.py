"""A session's training job: a `TrainingRun` started in the session's folder, streamed as snapshots, and what it
learned put in the session. No Gradio.

`training_snapshots` iterates a `TrainingRun`'s `events()` and hands on `snapshot()`s: plain data (so they can cross
the process boundary of a ZeroGPU worker) from which a UI draws the status text, the progress bar, the loss plot and
the previews. `keep_concept` and `follow_to_end` put what the run learned in the session: a word (ti) or a LoRA file
(pivotal with its word, lora) as the session's own; a dreambooth model folder is named for the Model tab to load.
"""

from __future__ import annotations

import time
from contextlib import closing
from pathlib import Path
from typing import Iterator

from studio.engine.learned.lora import LoraFile
from studio.engine.names import file_stem
from studio.jobs.session import RunEnd, Session
from studio.jobs.training_run import TrainingRun, TrainingSnapshot
from studio.library import ConceptLibrary
from studio.training.config import TrainConfig
from studio.training.methods import METHOD_CLASSES
from studio.training.trainer import Trainer

STATUS_EVERY_S = 0.25  # at most four snapshots a second: a browser need not redraw on every step
MODELS_FOLDER = "models"  # in a session's folder: its fine-tuned model folders, which the Model tab lists


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
    with closing(run.events()) as events:  # closed early: the run's flag is set (`Job.events`)
        for event in events:
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
