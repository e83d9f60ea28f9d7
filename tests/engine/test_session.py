"""The engine's session (flags, folder, pictures) and its streamed generation run, without any UI."""

from __future__ import annotations

from contextlib import closing

import pytest

from studio.engine.generate import Cancelled, GenerateRequest, GenerateResult
from studio.engine.models import ModelManager
from studio.engine.session import Sessions, generation_updates

REQUEST = dict(prompt="a cat", steps=3, width=32, height=32, seed=1, preview_every=0)


def test_a_fresh_cancel_flag_leaves_the_flag_of_an_earlier_closed_run_set(tmp_path):
    """Guards a run that was cancelled from running on: clearing a shared flag would undo its cancel."""
    session = Sessions(tmp_path).get("s1")
    earlier = session.fresh_cancel_flag("generate")
    session.cancel("generate")
    later = session.fresh_cancel_flag("generate")
    assert earlier.is_set() and not later.is_set()
    session.cancel("generate")
    assert later.is_set() and not session.cancel_flag("train").is_set()  # one flag per job kind


def test_session_folders_stay_inside_the_work_dir_and_forgetting_drops_only_memory(tmp_path):
    sessions = Sessions(tmp_path / "work")
    outside = sessions.get("../../x")
    assert outside.folder.parent == (tmp_path / "work").resolve()
    kept = sessions.get("s2")
    kept.thumbnails["<c>"] = tmp_path / "c.png"
    folder = kept.folder
    sessions.forget("s2")
    assert list(sessions) == ["../../x"] and folder.is_dir()
    assert sessions.get("s2").thumbnails == {}  # a new session of the same id starts empty


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


def test_save_pictures_numbers_the_files_in_the_session_folder(tmp_path):
    from PIL import Image

    session = Sessions(tmp_path).get("s1")
    result = GenerateResult(images=[Image.new("RGB", (8, 8))] * 2, seeds=[5, 6], infotexts=["", ""])
    first, second = session.save_pictures(result)
    assert first.endswith("00000-5.png") and second.endswith("00001-6.png")
