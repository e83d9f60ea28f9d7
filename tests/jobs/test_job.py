"""One job (studio.jobs.job.Job), the thread + queue + cancel that generation and training runs share: events handed
on as they happen, the error raised in the consuming thread, and a consumer that closes early cancelling the work.
Plain functions as work; the tests wait on events, never on sleeps."""

from __future__ import annotations

import doctest
import threading

import pytest

import studio.jobs.job
from studio.jobs.job import Job

WAIT_S = 30.0  # a bound on each wait, so that a broken job fails the test instead of hanging it


def test_the_module_example_runs():
    """Guards the docstring's example against drifting from the class."""
    assert doctest.testmod(studio.jobs.job).failed == 0


def test_each_event_is_handed_on_while_the_work_still_runs_and_the_thread_has_the_job_name():
    """Guards a live view: the first step reaches the consumer before the work goes on to the next."""
    seen_first = threading.Event()
    names = []

    def work(emit, cancel):
        names.append(threading.current_thread().name)
        emit("step 1")
        assert seen_first.wait(WAIT_S), "the consumer never got the first event"
        emit("step 2")
        return "done"

    job = Job("generate s1", work).start()
    events = job.events()
    assert next(events) == "step 1" and not job.ended
    with pytest.raises(RuntimeError, match="still running"):
        job.result()
    seen_first.set()
    assert list(events) == ["step 2"]
    assert job.result() == "done" and job.error is None and names == ["generate s1"]
    assert not job.cancel.is_set()  # read to its end: nothing was cancelled


def test_the_error_of_the_work_is_raised_in_the_consuming_thread_after_the_events_before_it():
    def work(emit, cancel):
        emit(1)
        raise ValueError("bad request")

    job = Job("failing", work).start()
    assert list(job.events()) == [1]
    assert isinstance(job.error, ValueError)
    with pytest.raises(ValueError, match="bad request"):
        job.result()


def test_closing_the_events_early_sets_the_cancel_flag_and_the_work_stops_within_a_step():
    """Guards the browser's Cancel, which closes a running event: the work must not run on for nobody."""
    stopped = threading.Event()

    def work(emit, cancel):
        step = 0
        while not cancel.is_set():
            step += 1
            emit(step)
        stopped.set()
        return step

    flag = threading.Event()
    job = Job("endless", work, flag).start()
    events = job.events()
    assert next(events) == 1
    events.close()
    assert job.cancel is flag and flag.is_set()
    assert stopped.wait(WAIT_S)


def test_a_job_given_no_flag_gets_its_own_unset_one():
    job = Job("quiet", lambda emit, cancel: cancel.is_set())
    assert isinstance(job.cancel, threading.Event)
    assert list(job.start().events()) == [] and job.result() is False
