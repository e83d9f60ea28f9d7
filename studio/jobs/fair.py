"""Fair turns on the device for many users' jobs, and the limits a shared studio puts on one job. No Gradio.

One device runs `QueueLimits.slots` jobs at once (one: a GPU, as Gradio's single "gpu" queue ran them); each user
(a session) may have `running` jobs on it and `waiting` more in line, and a job over that is refused at once
(`QueueFull`) instead of waiting behind all the others. The device is shared round-robin: a job gets a round (its
user's previous job's round + 1, never one before the round being served) and jobs start in (round, arrival) order.
So a user who sends many jobs waits behind their own, and nobody waits behind more than their own jobs plus one of each
other user's; `Ticket.ahead` says how many start before a job as the line stands. A job that leaves the line
(`cancel_waiting`, `release`) frees its place at once.

    with scheduler.turn(session_id, "generate", on_wait=lambda ahead: print(f"waiting: {ahead} jobs ahead")):
        ...  # the device is this job's

`turn` blocks its thread; `join`, `Ticket.state` / `Ticket.ahead` with `on_change`, and `release` are the same in
steps, for an event loop that must not block (`studio.ui.turns.in_turn`).
"""

from __future__ import annotations

import itertools
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

from studio.engine.generate import Cancelled
from studio.errors import UserError

WAITING, RUNNING, DONE, CANCELLED = "waiting", "running", "done", "cancelled"


class QueueFull(UserError):
    """A job over its user's share of the line (`QueueLimits`); nothing was queued."""


class TrainStepsError(UserError):
    """A training run longer than the studio's limit (`train_step_limit`)."""


@dataclass(frozen=True)
class QueueLimits:
    """How the device is shared (launch.py's --device-jobs, --user-running-jobs, --user-waiting-jobs)."""

    slots: int = 1  # jobs on the device at once: a GPU runs one job at a time (more on ZeroGPU: a GPU per call)
    running: int = 1  # jobs one user may have on the device (issue 23)
    waiting: int = 2  # jobs one user may have waiting for it (issue 23): a second click, or a train after a preview

    def __post_init__(self) -> None:
        if self.slots < 1 or self.running < 1 or self.waiting < 0:
            raise ValueError(f"the device needs at least one job slot and each user one running job, and waiting "
                             f"jobs cannot be negative; got {self.slots} slots, {self.running} running per user, "
                             f"{self.waiting} waiting per user")


@dataclass(eq=False)
class Ticket:
    """One job's place: `state` goes waiting -> running -> done, or waiting -> cancelled (or done, when its caller
    left the line). `ahead` is how many jobs start before it (the running ones included) as the line stands now.
    `on_change` is called, from whichever thread changed the line, whenever `state` or `ahead` may have changed."""

    owner: str
    kind: str
    round: int
    seq: int
    exclusive: bool = False
    state: str = WAITING
    ahead: int = 0
    on_change: Callable[[], None] | None = None
    _changed: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def key(self) -> tuple[int, int]:
        return self.round, self.seq

    def _notify(self) -> None:
        self._changed.set()
        if self.on_change is not None:
            self.on_change()


class FairScheduler:
    """The line for the device: round-robin between owners (sessions), with per-owner caps (see the module)."""

    def __init__(self, limits: QueueLimits | None = None) -> None:
        self.limits = limits or QueueLimits()
        self._lock = threading.Lock()
        self._waiting: list[Ticket] = []  # in start order: by (round, arrival)
        self._running: list[Ticket] = []
        self._round = 0  # the round being served: that of the latest job that started
        self._last_round: dict[str, int] = {}  # owner -> the round of its latest job
        self._arrivals = itertools.count()

    def join(self, owner: str, kind: str = "job", *, exclusive: bool = False,
             on_change: Callable[[], None] | None = None) -> Ticket:
        """A place in line for `owner`'s job of `kind` (its state is "running" when it may start at once);
        QueueFull when the owner already has its share waiting. `exclusive`: the job runs alone on the device (a
        model switch). Every ticket must be `release`d."""
        with self._lock:
            previous = self._last_round.get(owner)
            ticket = Ticket(owner, kind, max(self._round, -1 if previous is None else previous + 1),
                            next(self._arrivals), exclusive, on_change=on_change)
            self._waiting.append(ticket)
            self._waiting.sort(key=lambda t: t.key)
            self._last_round[owner] = ticket.round
            changed = self._dispatch()
            mine = sum(t.owner == owner for t in self._waiting)
            if ticket.state == WAITING and mine > self.limits.waiting:
                self._waiting.remove(ticket)
                self._forget_round(owner, previous)
                changed = self._dispatch()
                refusal = self._refusal(owner, mine - 1)
            else:
                refusal = None
        self._notify(changed - {ticket})
        if refusal:
            raise QueueFull(refusal)
        return ticket

    def wait(self, ticket: Ticket, on_wait: Callable[[int], None] | None = None) -> None:
        """Block until `ticket` may run; `on_wait(ahead)` each time its place changes while it waits. Cancelled
        when it was taken out of line (`cancel_waiting`)."""
        shown = None
        while True:
            ticket._changed.clear()
            with self._lock:
                state, ahead = ticket.state, ticket.ahead
            if state != WAITING:
                break
            if on_wait is not None and ahead != shown:
                on_wait(ahead)
                shown = ahead
            ticket._changed.wait()
        if state == CANCELLED:
            raise Cancelled("before it started")

    def release(self, ticket: Ticket) -> None:
        """The job ended, or its caller left the line: free its place (the next job may start)."""
        with self._lock:
            if ticket in self._running:
                self._running.remove(ticket)
            elif ticket in self._waiting:
                self._waiting.remove(ticket)
            if ticket.state in (WAITING, RUNNING):
                ticket.state = DONE
            changed = self._dispatch()
        self._notify(changed)

    def cancel_waiting(self, owner: str, kind: str | None = None) -> int:
        """Take `owner`'s waiting jobs (of `kind`; None: all) out of line; how many there were. Their waits end
        with Cancelled."""
        with self._lock:
            gone = [t for t in self._waiting if t.owner == owner and kind in (None, t.kind)]
            for ticket in gone:
                self._waiting.remove(ticket)
                ticket.state = CANCELLED
            changed = self._dispatch() | set(gone)
        self._notify(changed)
        return len(gone)

    @contextmanager
    def turn(self, owner: str, kind: str = "job", *, exclusive: bool = False,
             on_wait: Callable[[int], None] | None = None) -> Iterator[Ticket]:
        """The block runs on the device once it is `owner`'s turn (see `join` and `wait`); its place is freed after."""
        ticket = self.join(owner, kind, exclusive=exclusive)
        try:
            self.wait(ticket, on_wait)
            yield ticket
        finally:
            self.release(ticket)

    def line(self) -> list[tuple[str, str, str]]:
        """(owner, kind, state) of every job on the device or in line, in the order they run."""
        with self._lock:
            return [(t.owner, t.kind, t.state) for t in self._running + self._waiting]

    # ---- under the lock ----

    def _dispatch(self) -> set[Ticket]:
        """Start what may start, in line order; then recount every waiting job's place. The tickets that changed."""
        changed: set[Ticket] = set()
        for ticket in list(self._waiting):
            if len(self._running) >= self.limits.slots or any(t.exclusive for t in self._running):
                break
            if ticket.exclusive and self._running:
                break  # the device empties for it; nobody passes it meanwhile
            if not ticket.exclusive and sum(t.owner == ticket.owner for t in self._running) >= self.limits.running:
                continue
            self._waiting.remove(ticket)
            self._running.append(ticket)
            ticket.state = RUNNING
            self._round = max(self._round, ticket.round)
            changed.add(ticket)
        for place, ticket in enumerate(self._waiting):
            ahead = len(self._running) + place
            if ticket.ahead != ahead:
                ticket.ahead = ahead
                changed.add(ticket)
        # An owner with no job in line whose latest round is past gets the round being served anyway: forget it.
        busy = {t.owner for t in self._running + self._waiting}
        for owner in [o for o, r in self._last_round.items() if o not in busy and r < self._round]:
            del self._last_round[owner]
        return changed

    def _forget_round(self, owner: str, previous: int | None) -> None:
        if previous is None:
            self._last_round.pop(owner, None)
        else:
            self._last_round[owner] = previous

    def _refusal(self, owner: str, waiting: int) -> str:
        if waiting:
            return (f"You already have a job waiting ({waiting} of at most {self.limits.waiting} per user): wait for "
                    "it or cancel it.")
        if any(t.owner == owner for t in self._running):
            return "You already have a job running: wait for it or cancel it."
        return "The device is busy and this studio keeps no jobs waiting: try again when it is free."

    @staticmethod
    def _notify(tickets: set[Ticket]) -> None:
        for ticket in tickets:
            ticket._notify()


# Steps one training run may take on a shared studio when its operator sets no limit (launch.py --max-train-steps):
# a run holds the device for everyone, and a step costs about in proportion to the model's weights. (up to this
# many weights, steps): the demo model (4.8 M weights) 2000 (issue 23), SD 1.x / 2.x (1.1-1.3 B) 1000, SDXL (3.5 B) 500.
TRAIN_STEP_LIMITS = ((100e6, 2000), (2e9, 1000), (float("inf"), 500))


def model_weights(model) -> int:
    """The number of weights in a loaded model's pipeline (every torch module of it)."""
    import torch

    parts = [part for part in model.pipe.components.values() if isinstance(part, torch.nn.Module)]
    return sum(p.numel() for part in parts for p in part.parameters())


def train_step_limit(model, operator_limit: int | None = None) -> int:
    """The most steps one training run may take: the operator's limit, else `TRAIN_STEP_LIMITS` by the model's size."""
    if operator_limit is not None:
        return operator_limit
    weights = model_weights(model)
    return next(steps for most, steps in TRAIN_STEP_LIMITS if weights <= most)


def check_train_steps(steps: int, limit: int, what: str = "Steps") -> None:
    """TrainStepsError when `steps` passes `limit`, in one line that says what to do."""
    if int(steps) > limit:
        raise TrainStepsError(f"{what} {int(steps)} is over this studio's limit of {limit} steps a run: train at most "
                              f"{limit} (its operator sets the limit with launch.py --max-train-steps)")
