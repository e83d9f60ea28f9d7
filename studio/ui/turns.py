"""Heavy handlers take turns on the device, and what they were uploaded leaves Gradio's folder: the Gradio side of
`studio.jobs.fair.FairScheduler` and of a session's disk quota.

Every handler that runs the model is wired as `in_turn(studio, handler, job)` with `**GPU_EVENT`. Gradio lets up to
WAITING_ROOM such events into their handlers at once (beyond that they wait in Gradio's own queue); each takes a place
in the studio's line, a round-robin between sessions with a few jobs each (a job over its session's share is refused
at once, in one line), waits on the event loop (no worker thread held) showing "waiting: N jobs ahead" on its progress
bar, then runs the handler in a worker thread. A Cancel button (the session's flag, or Gradio's `cancels=`) takes a
waiting job out of line.

Uploads: a handler's upload arguments (`uploads=`) are copied into the session's folder before its job waits (within
its quota), where a second click that sends the same upload again finds them (`take_uploads`); a handler that reads
an upload once just reads it (`consumes=`, `consumed`). Either way the upload is then used up, refused ones too, and
Gradio's temp folder loses it after a grace (`discard`).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import anyio
import gradio as gr
from gradio.utils import get_upload_folder

from studio.engine.generate import Cancelled
from studio.errors import UserError
from studio.jobs.fair import CANCELLED, WAITING, Ticket
from studio.jobs.session import UPLOADS
from studio.ui.state import Studio, as_user_errors

# Heavy events inside their handlers at once, waiting or running. Gradio works on at most `max_threads` (40) events
# of every kind at once, so the rest stay free for the light ones (Cancel, the library, the loss plot).
WAITING_ROOM = 24
# The event settings of every handler that runs the model (with `in_turn`): one Gradio queue for them all.
GPU_EVENT = dict(concurrency_id="gpu", concurrency_limit=WAITING_ROOM)
_END = object()


def waiting_text(ahead: int) -> str:
    """What a waiting job shows: "waiting: 2 jobs ahead"."""
    return f"waiting: {ahead} job{'' if ahead == 1 else 's'} ahead"


def in_turn(studio: Studio, handler: Callable, job: str, *, uploads: tuple[str, ...] = (),
            consumes: tuple[str, ...] = (), check: Callable[[dict], None] | None = None,
            waiting: Callable[[str], object] | None = None, exclusive: bool = False) -> Callable:
    """`handler` (a function or generator of a tab, with the same parameters) as a Gradio handler that first takes
    its turn on the device as a job of kind `job` ("generate", "train", "evaluate": the kind its Cancel stops).

    Before it waits: the parameters named in `uploads` are taken into the session (`take_uploads`), `check` sees the
    arguments by name and may refuse the job (a UserError: a run over the step limit), and the session must have
    room on disk. The uploads in the parameters named in `consumes` are read once: used up (`discard`) when the job
    ends, or is refused. `waiting(text)` makes the value a generator handler yields while it waits (the status line of
    /train). `exclusive`: the job runs alone on the device (a model switch)."""
    admission = _Admission(studio, job, inspect.signature(handler), uploads, consumes, check, exclusive)
    if inspect.isgeneratorfunction(handler):
        return _streaming_in_turn(admission, handler, waiting)
    return _running_in_turn(admission, handler)


class _Admission:
    """How `in_turn` lets an event of `handler` (whose `signature` it is) into the line: see `in_turn`."""

    def __init__(self, studio: Studio, job: str, signature: inspect.Signature, uploads: tuple[str, ...],
                 consumes: tuple[str, ...], check: Callable[[dict], None] | None, exclusive: bool) -> None:
        self.studio, self.job, self.signature, self.exclusive = studio, job, signature, exclusive
        self.uploads, self.consumes, self.check = uploads, consumes, check

    async def admitted(self, args: tuple, kwargs: dict) -> tuple[Turn, inspect.BoundArguments]:
        """The event's place in line (refusals raise one gr.Error line) and its arguments, uploads taken."""
        studio = self.studio
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        values = bound.arguments
        request = next((v for v in values.values() if isinstance(v, gr.Request)), None)
        progress = next((v for v in values.values() if isinstance(v, gr.Progress)), None)
        turn = Turn(studio, self.job, self.exclusive, [values.get(name) for name in self.consumes], request, progress)
        session = studio.session_of(request)
        try:
            with as_user_errors(request):
                try:
                    for name in self.uploads:
                        values[name] = await anyio.to_thread.run_sync(take_uploads, studio, session, values[name])
                except BaseException:
                    discard(studio, *(values[name] for name in self.uploads))  # a refused upload is used up too
                    raise
                if self.check is not None:
                    await anyio.to_thread.run_sync(self.check, dict(values))
                await anyio.to_thread.run_sync(studio.expire_sessions)
                await anyio.to_thread.run_sync(studio.spent_uploads.sweep)
                await anyio.to_thread.run_sync(studio.sessions.get(session).make_room)
                turn.join(session)
        except BaseException:
            turn.leave()
            raise
        return turn, bound


def _streaming_in_turn(admission: _Admission, handler: Callable,
                       waiting: Callable[[str], object] | None) -> Callable:
    """A generator `handler` in turn: while its job waits it yields `waiting(text)` (when given), then the
    handler's items, each computed in a worker thread."""

    @functools.wraps(handler)
    async def stream_in_turn(*args, **kwargs):
        turn, bound = await admission.admitted(args, kwargs)
        try:
            async for text in turn.queued():
                if waiting is not None:
                    yield waiting(text)
            async for item in in_threads(handler(*bound.args, **bound.kwargs), turn.start()):
                yield item
        finally:
            turn.leave()

    return stream_in_turn


def _running_in_turn(admission: _Admission, handler: Callable) -> Callable:
    """A function `handler` in turn: once its job's turn has come, it runs in a worker thread."""

    @functools.wraps(handler)
    async def run_in_turn(*args, **kwargs):
        turn, bound = await admission.admitted(args, kwargs)
        try:
            await turn.waited()
            ended = turn.start()

            def run():  # in a worker thread, which a cancelled event leaves running: the job ends when it returns
                try:
                    return handler(*bound.args, **bound.kwargs)
                finally:
                    ended()

            return await anyio.to_thread.run_sync(run)
        finally:
            turn.leave()

    return run_in_turn


class Turn:
    """One event's place in the studio's line: `join` it, wait in it (`queued`), `start` the job, whose end frees
    the place; `leave` frees it when the job never started (refused, cancelled while it waited)."""

    def __init__(self, studio: Studio, job: str, exclusive: bool, consumed: list, request: gr.Request | None,
                 progress: gr.Progress | None) -> None:
        self.studio, self.job, self.exclusive, self.consumed = studio, job, exclusive, consumed
        self.request, self.progress = request, progress
        self.ticket: Ticket | None = None
        self.changed = asyncio.Event()
        self.started = False

    def join(self, session: str) -> None:
        """Take a place for `session` (QueueFull when it has its share already)."""
        self.ticket = self.studio.scheduler.join(session, self.job, exclusive=self.exclusive,
                                                 on_change=waker(self.changed))

    async def queued(self):
        """While the job waits: its "waiting: N jobs ahead" text (also on its progress bar) each time its place
        changes; Cancelled (as one gr.Error line) when it was taken out of line."""
        ticket, shown = self.ticket, None
        while True:
            self.changed.clear()
            state, ahead = ticket.state, ticket.ahead
            if state != WAITING:
                break
            if ahead != shown:
                shown = ahead
                if self.progress is not None:
                    self.progress(0, desc=waiting_text(ahead))
                yield waiting_text(ahead)
            try:
                await self.changed.wait()
            except asyncio.CancelledError:
                # Gradio cancels every event of a session's endpoint when one is cancelled, and tells only that
                # one's client: each waiting one ends as cancelled instead, so that its client hears it.
                asyncio.current_task().uncancel()
                state = CANCELLED
                break
        if state == CANCELLED:
            with as_user_errors(self.request):
                raise Cancelled("before it started")

    async def waited(self) -> None:
        """`queued` to its end: the job's turn has come."""
        async for _ in self.queued():
            pass

    def start(self) -> Callable[[], None]:
        """The job starts: what to call once it has ended (it frees the place and deletes the uploads it read)."""
        self.started = True
        return self._finish

    def leave(self) -> None:
        """The event ends: its place goes now unless its job started (then the job's end frees it)."""
        if not self.started:
            self._finish()

    def _finish(self) -> None:
        if self.ticket is not None:
            self.studio.scheduler.release(self.ticket)
        discard(self.studio, *self.consumed)


def waker(changed: asyncio.Event) -> Callable[[], None]:
    """A Ticket's `on_change` that sets `changed` on this event loop, from whichever thread changed the line."""
    loop = asyncio.get_running_loop()

    def wake() -> None:
        try:
            loop.call_soon_threadsafe(changed.set)
        except RuntimeError:  # the loop has closed: nobody waits any more
            pass

    return wake


async def in_threads(items: Iterator, finish: Callable[[], None]):
    """A generator's items, each made in a worker thread (as Gradio runs a generator handler), then `finish()`. Left
    early (a cancel, an error), it is closed so that its own clean-up runs (stopping the engine), and `finish()`
    follows: both in the background, since a cancel comes while an item is being made (Gradio cancels the task, not
    the thread) and Gradio's /cancel waits for this task, not for that item."""
    busy = threading.Lock()

    def step():
        with busy:
            return next(items, _END)

    def close() -> None:
        try:
            with busy:
                items.close()
        finally:
            finish()

    ended = False
    try:
        while (item := await anyio.to_thread.run_sync(step)) is not _END:
            yield item
        ended = True
    finally:
        if ended:
            finish()
        else:
            threading.Thread(target=close, name="close a left job", daemon=True).start()


# ---- uploads ----

def upload_path(value: object) -> Path | None:
    """The file a Gradio value names when it lies in Gradio's upload folder (a path, or a file dict's "path");
    None for anything else."""
    path = value.get("path") if isinstance(value, dict) else value
    if not isinstance(path, (str, Path)) or not str(path):
        return None
    folder = Path(get_upload_folder()).resolve()
    path = Path(path).resolve()
    return path if folder in path.parents else None


def take_uploads(studio: Studio, session: str, value):
    """`value` (a path, a file dict, a list of them, or None) with each Gradio upload in it copied into the session's
    uploads folder and named by its copy there (an upload sent again finds its copy), the upload itself used up
    (`discard`). Refused in one line when it passes the session's quota, or is gone with no copy."""
    if isinstance(value, (list, tuple)):
        return [take_uploads(studio, session, item) for item in value]
    path = upload_path(value)
    if path is None:
        return value
    folder = Path(get_upload_folder()).resolve()
    name = str(path.relative_to(folder))  # <digest of its bytes>/<file name>: the same name, the same file
    owner = studio.sessions.get(session)
    kept = owner.folder_path / UPLOADS / name
    if path.is_file():
        kept = owner.keep_upload(path, name)
        discard(studio, path)
    elif not kept.is_file():
        raise UserError(f"{path.name} is no longer on the server (uploads are kept for a while after use): "
                        "upload it again")
    return {**value, "path": str(kept)} if isinstance(value, dict) else str(kept)


@contextmanager
def consumed(studio: Studio, *values) -> Iterator[None]:
    """The block reads the uploads in `values` (paths, file dicts or lists of them) once: they are used up after it
    (`discard`), also when it fails or refuses them."""
    try:
        yield
    finally:
        discard(studio, *values)


def discard(studio: Studio, *values) -> None:
    """The uploads in `values` are used up: Gradio's folder loses them once nobody has uploaded the same bytes for a
    while (`studio.jobs.session.SpentFiles`: another user's upload of them shares their path)."""
    folder = Path(get_upload_folder()).resolve()
    studio.spent_uploads.add(filter(None, map(upload_path, flatten(values))), folder)
    studio.spent_uploads.sweep()


def flatten(values) -> Iterator:
    """The single values in nested lists and dicts of values (a file dict, with its "path", is one value)."""
    for value in values:
        if isinstance(value, (list, tuple)):
            yield from flatten(value)
        elif isinstance(value, dict) and "path" not in value:
            yield from flatten(list(value.values()))
        else:
            yield value
