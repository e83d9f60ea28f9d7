"""One job: a piece of work run in a background thread, whose events are handed on as they happen. No Gradio.

`work(emit, cancel)` runs in a daemon thread: it calls `emit(event)` for each event (a denoising step, a training
step) and stops within one step once `cancel` is set. The consuming thread reads `events()` until the work ends, then
`result()`: what the work returned, or its error raised there, in the consuming thread, after the events that came
before it.

    >>> def count(emit, cancel):
    ...     for k in range(3):
    ...         emit(k)
    ...     return "counted"
    >>> job = Job("count", count).start()
    >>> list(job.events()), job.result()
    ([0, 1, 2], 'counted')

Closing `events()` before the work has ended (the browser's Cancel closes a running event) sets `cancel`: nobody
wants what the job makes any more. The job is not joined: the close may come from the server's event loop, and the
work stops at its next step on its own.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Generic, Iterator, TypeVar

EventT = TypeVar("EventT")
ResultT = TypeVar("ResultT")

Work = Callable[[Callable[[EventT], None], threading.Event], ResultT]  # work(emit, cancel) -> its result

_END = object()  # after the last event in the queue: the work has ended (`Job.ended` is set before it goes in)


class Job(Generic[EventT, ResultT]):
    """`work(emit, cancel)` in a daemon thread named `name`; its events through a queue (see the module).

    `cancel`: the flag that stops the work (a session's, so that its Cancel button reaches it); a new one when None.
    """

    def __init__(self, name: str, work: Work[EventT, ResultT], cancel: threading.Event | None = None) -> None:
        self.name = name
        self.work = work
        self.cancel = cancel if cancel is not None else threading.Event()
        self._events: queue.Queue = queue.Queue()
        self._ended = threading.Event()
        self._result: ResultT | None = None
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> Job[EventT, ResultT]:
        """Run the work in a daemon thread; returns self."""
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            self._result = self.work(self._events.put, self.cancel)
        except BaseException as exc:  # noqa: BLE001 - raised in the consuming thread by `result`
            self._error = exc
        finally:
            self._ended.set()
            self._events.put(_END)

    def events(self) -> Iterator[EventT]:
        """Every event as it happens, until the work returns (or fails). Closed before that: sets `cancel`."""
        try:
            while (event := self._events.get()) is not _END:
                yield event
        finally:
            if not self._ended.is_set():
                self.cancel.set()

    @property
    def ended(self) -> bool:
        """Whether the work has returned or failed (its result or error is there)."""
        return self._ended.is_set()

    @property
    def error(self) -> BaseException | None:
        """What the work raised (Cancelled when it was cancelled); None while it runs or when it returned."""
        return self._error

    def result(self) -> ResultT:
        """What the work returned; its error raised here when it failed. Read `events()` to their end first."""
        if not self.ended:
            raise RuntimeError(f"job {self.name!r} is still running: read its events() to their end first")
        if self._error is not None:
            raise self._error
        return self._result
