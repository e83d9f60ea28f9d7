"""One generation of a session as a job (studio.jobs.generation): its steps streamed, then its saved pictures; a
close or a cancel stops it. Without any UI."""

from __future__ import annotations

from contextlib import closing

import pytest

from studio.engine.generate import Cancelled, GenerateRequest
from studio.engine.models import ModelManager
from studio.jobs.generation import generation_updates
from studio.jobs.session import Sessions

REQUEST = dict(prompt="a cat", steps=3, width=32, height=32, seed=1, preview_every=0)


def test_generation_updates_stream_each_step_then_the_saved_pictures(tiny_model_dirs, tmp_path):
    manager = ModelManager()
    model = manager.load(tiny_model_dirs["sd1"])
    session = Sessions(tmp_path).get("s1")
    updates = list(generation_updates(model, GenerateRequest(**REQUEST), session))
    assert [u.step for u in updates[:-1]] == [1, 2, 3] and updates[-1].paths is not None
    assert [p.rsplit("/", 1)[0] for p in updates[-1].paths] == [str(session.folder)]


def test_closing_the_stream_early_stops_the_generation(tiny_model_dirs, tmp_path):
    """Guards the browser's Cancel: closing the run (as Gradio closes a cancelled event) sets the session's flag."""
    model = ModelManager().load(tiny_model_dirs["sd1"])
    session = Sessions(tmp_path).get("s1")
    with closing(generation_updates(model, GenerateRequest(**{**REQUEST, "steps": 20}), session)) as updates:
        next(updates)
    assert session.cancel_flag("generate").is_set()


def test_a_cancelled_run_raises_cancelled_after_its_steps(tiny_model_dirs, tmp_path):
    model = ModelManager().load(tiny_model_dirs["sd1"])
    session = Sessions(tmp_path).get("s1")
    updates = generation_updates(model, GenerateRequest(**{**REQUEST, "steps": 20}), session)
    next(updates)
    session.cancel("generate")
    with pytest.raises(Cancelled):
        list(updates)
