"""A user's session (studio.jobs.session): its cancel flags, its folder and its pictures, without any UI."""

from __future__ import annotations

from studio.engine.generate import GenerateResult
from studio.jobs.session import Sessions


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


def test_save_pictures_numbers_the_files_in_the_session_folder(tmp_path):
    from PIL import Image

    session = Sessions(tmp_path).get("s1")
    result = GenerateResult(images=[Image.new("RGB", (8, 8))] * 2, seeds=[5, 6], infotexts=["", ""])
    first, second = session.save_pictures(result)
    assert first.endswith("00000-5.png") and second.endswith("00001-6.png")
