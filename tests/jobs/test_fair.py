"""The device's line (studio.jobs.fair.FairScheduler) without any UI: round-robin between users, per-user caps with
a one-line refusal, honest places, cancel while waiting, exclusive jobs; and the training step limit."""

from __future__ import annotations

import threading

import pytest

from studio.engine.generate import Cancelled
from studio.engine.models import ModelManager
from studio.jobs.fair import (DONE, RUNNING, WAITING, FairScheduler, QueueFull, QueueLimits, TrainStepsError,
                              check_train_steps, train_step_limit)


def start_order(scheduler: FairScheduler, tickets) -> list[str]:
    """Run the line to its end, one job at a time: the owners in the order their jobs ran."""
    order = []
    pending = list(tickets)
    while pending:
        running = [t for t in pending if t.state == RUNNING]
        assert len(running) == 1, [t.state for t in pending]
        order.append(running[0].owner)
        scheduler.release(running[0])
        pending.remove(running[0])
    return order


def test_a_user_with_many_jobs_does_not_make_the_next_user_wait_behind_them_all():
    """Guards issue 23's rank 18 of 19: the line is round-robin between users, not first come, first served."""
    scheduler = FairScheduler(QueueLimits(waiting=5))
    flood = [scheduler.join("flood") for _ in range(6)]  # one running, five waiting
    late = [scheduler.join(user) for user in ("b", "c")]
    assert [t.ahead for t in late] == [1, 2]  # behind the running job and each other, not behind five waiting
    assert start_order(scheduler, flood + late) == ["flood", "b", "c", "flood", "flood", "flood", "flood", "flood"]


def test_nobody_waits_behind_more_than_their_own_jobs_and_one_of_each_other_users():
    scheduler = FairScheduler(QueueLimits(waiting=3))
    tickets = [scheduler.join(user) for user in ("a", "a", "a", "a", "b", "b", "c")]
    assert start_order(scheduler, tickets) == ["a", "b", "c", "a", "b", "a", "a"]


def test_a_user_past_their_share_is_refused_at_once_in_one_line_and_their_jobs_stay():
    scheduler = FairScheduler()  # issue 23's defaults: one running, two waiting
    mine = [scheduler.join("a") for _ in range(3)]
    with pytest.raises(QueueFull, match=r"^You already have a job waiting \(2 of at most 2 per user\): wait for it "
                                        r"or cancel it\.$"):
        scheduler.join("a")
    assert [t.state for t in mine] == [RUNNING, WAITING, WAITING]
    scheduler.join("b")  # another user still gets in
    assert len(scheduler.line()) == 4


def test_a_refused_job_does_not_move_its_user_back_in_line():
    scheduler = FairScheduler()
    first = scheduler.join("a")
    waiting = [scheduler.join("a"), scheduler.join("a")]
    with pytest.raises(QueueFull):
        scheduler.join("a")
    other = scheduler.join("b")
    assert other.ahead == 1  # behind the running job only: the refusal took no round of "a"'s
    assert start_order(scheduler, [first, *waiting, other]) == ["a", "b", "a", "a"]


def test_with_no_waiting_allowed_a_second_job_is_refused_while_the_first_runs():
    scheduler = FairScheduler(QueueLimits(waiting=0))
    scheduler.join("a")
    with pytest.raises(QueueFull, match="^You already have a job running: wait for it or cancel it.$"):
        scheduler.join("a")


def test_cancelling_a_waiting_job_frees_its_place_and_its_wait_ends_with_cancelled():
    scheduler = FairScheduler()
    running = scheduler.join("a")
    waiting = scheduler.join("b", "train")
    behind = scheduler.join("c")
    assert behind.ahead == 2
    ended = []
    waiter = threading.Thread(target=lambda: ended.append(pytest.raises(Cancelled, scheduler.wait, waiting)))
    waiter.start()
    assert scheduler.cancel_waiting("b", "generate") == 0  # another kind of job: stays
    assert scheduler.cancel_waiting("b", "train") == 1
    waiter.join(10)
    assert ended and not waiter.is_alive()
    assert behind.ahead == 1  # moved up at once
    scheduler.release(running)
    assert behind.state == RUNNING


def test_a_place_is_reported_each_time_it_changes_and_the_turn_comes_when_the_jobs_ahead_end():
    scheduler = FairScheduler()
    first, second = scheduler.join("a"), scheduler.join("b")
    reports = {2: threading.Event(), 1: threading.Event()}
    seen: list[int] = []
    started = threading.Event()

    def report(ahead: int) -> None:
        seen.append(ahead)
        reports[ahead].set()

    def third() -> None:
        with scheduler.turn("c", on_wait=report):
            started.set()

    thread = threading.Thread(target=third)
    thread.start()
    assert reports[2].wait(10) and not started.is_set()
    scheduler.release(first)
    assert reports[1].wait(10) and not started.is_set()
    scheduler.release(second)
    assert started.wait(10)
    thread.join(10)
    assert seen == [2, 1] and scheduler.line() == []


def test_an_exclusive_job_waits_for_the_device_to_empty_and_nothing_passes_it():
    scheduler = FairScheduler(QueueLimits(slots=2))
    a = scheduler.join("a")
    switch = scheduler.join("operator", "model", exclusive=True)
    b = scheduler.join("b")
    assert (a.state, switch.state, b.state) == (RUNNING, WAITING, WAITING)  # a free slot, but b is behind it
    scheduler.release(a)
    assert (switch.state, b.state) == (RUNNING, WAITING)
    scheduler.release(switch)
    assert b.state == RUNNING and switch.state == DONE


def test_two_slots_run_two_users_at_once_but_one_user_only_one_job():
    scheduler = FairScheduler(QueueLimits(slots=2))
    a1, a2, b1 = scheduler.join("a"), scheduler.join("a"), scheduler.join("b")
    assert (a1.state, a2.state, b1.state) == (RUNNING, WAITING, RUNNING)


def test_the_training_step_limit_is_the_operators_else_by_the_models_size(tiny_model_dirs):
    model = ModelManager().load(tiny_model_dirs["sd1"])
    assert train_step_limit(model) == 2000  # a tiny model: the demo's limit
    assert train_step_limit(model, 50) == 50
    check_train_steps(2000, 2000)
    with pytest.raises(TrainStepsError, match=r"^Steps 3000 is over this studio's limit of 2000 steps a run: train "
                                              r"at most 2000 \(its operator sets the limit with launch.py "
                                              r"--max-train-steps\)$"):
        check_train_steps(3000, 2000)
