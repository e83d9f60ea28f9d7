"""What a session keeps on disk is bounded (studio.jobs.session): a quota over its folder and its concepts
elsewhere, refused in one line after its own old pictures made what room they could; folders unused for a while
expire; the leftovers of killed writes are swept up when the sessions open."""

from __future__ import annotations

import os
import time

import pytest

from studio.engine.files import remove_temp_leftovers
from studio.jobs.fair import WAITING, FairScheduler
from studio.jobs.session import (EVICT_AFTER_S, UPLOAD_GRACE_S, UPLOADS, DiskLimits, SessionFull, Sessions,
                                 SpentFiles)

DAY = 86400.0


def write(path, size: int, age_s: float = 0.0):
    """A file of `size` bytes at `path`, last written `age_s` ago."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    when = time.time() - age_s
    os.utime(path, (when, when))
    return path


def age(path, age_s: float) -> None:
    when = time.time() - age_s
    os.utime(path, (when, when))


def test_a_session_folder_unused_for_the_keep_time_is_deleted_and_a_used_one_stays(tmp_path):
    """Guards issue 23: data/work/<session> never expired."""
    sessions = Sessions(tmp_path / "work", DiskLimits(keep_s=7 * DAY))
    old, fresh = sessions.get("old-session"), sessions.get("fresh-session")
    write(old.folder / "models" / "m" / "unet.bin", 100)
    write(fresh.folder / "00000-1.png", 100)
    age(old.folder, 8 * DAY)
    age(fresh.folder, 6 * DAY)
    expired = sessions.expire()
    assert expired == [old.folder_path] and not old.folder_path.exists() and fresh.folder_path.is_dir()
    assert "old-session" not in list(sessions)  # forgotten in memory too
    age(fresh.folder, 8 * DAY)
    sessions.get("fresh-session")  # a request of the session: used now
    assert sessions.expire() == [] and fresh.folder_path.is_dir()


def test_a_write_past_the_quota_is_refused_in_one_line_after_old_pictures_made_room_but_never_a_model(tmp_path):
    sessions = Sessions(tmp_path / "work", DiskLimits(quota_bytes=10_000))
    session = sessions.get("s1")
    model = write(session.folder / "models" / "my-dog" / "unet" / "weights.safetensors", 4_000, age_s=2 * DAY)
    write(session.folder / "models" / "my-dog" / "model_index.json", 10, age_s=2 * DAY)
    old_picture = write(session.folder / "00000-1.png", 3_000, age_s=EVICT_AFTER_S + 60)
    new_picture = write(session.folder / "00001-2.png", 2_000)  # a job may still be writing next to it
    session.make_room(900)  # fits as it is
    assert old_picture.is_file()
    session.make_room(2_000)  # the old picture makes room
    assert not old_picture.exists() and new_picture.is_file() and model.is_file()
    with pytest.raises(SessionFull) as refused:
        session.make_room(5_000)
    message = str(refused.value)
    assert message == ("This session's files would pass its 10 KB limit (6 KB kept, this needs 5 KB more): delete "
                       "concepts or LoRAs you no longer need in the Library tab (pictures and training files make "
                       "room by themselves after an hour)")
    assert model.is_file() and new_picture.is_file()


def test_the_quota_counts_the_sessions_concepts_kept_elsewhere(tmp_path):
    elsewhere = tmp_path / "sessions"
    sessions = Sessions(tmp_path / "work", DiskLimits(quota_bytes=1_000), elsewhere=[elsewhere])
    write(elsewhere / "s1" / "loras" / "big.safetensors", 900)
    write(elsewhere / "s2" / "other.safetensors", 900)
    session = sessions.get("s1")
    assert session.usage() == 900
    with pytest.raises(SessionFull):
        session.make_room(200)
    sessions.get("s2").make_room(0)


def test_an_upload_is_kept_in_the_sessions_folder_within_its_quota_once(tmp_path):
    sessions = Sessions(tmp_path / "work", DiskLimits(quota_bytes=1_000))
    session = sessions.get("s1")
    upload = write(tmp_path / "gradio" / "abc123" / "dog.png", 600)
    kept = session.keep_upload(upload, "abc123/dog.png")
    assert kept == session.folder / UPLOADS / "abc123" / "dog.png" and kept.read_bytes() == upload.read_bytes()
    assert session.keep_upload(upload, "abc123/dog.png") == kept  # sent again: the same copy, no second one
    second = write(tmp_path / "gradio" / "def456" / "cat.png", 600)
    with pytest.raises(SessionFull):
        session.keep_upload(second, "def456/cat.png")
    assert not (session.folder / UPLOADS / "def456").exists()


def test_used_up_uploads_go_once_nobody_has_written_them_again_for_the_grace(tmp_path):
    """The same bytes uploaded by two users are one path in Gradio's folder: deleting it at once when one user's
    job has read it would take it from the other's job on its way (seen: "No such file" for the second of two
    trainers sending the same pictures)."""
    root = tmp_path / "gradio"
    spent, fresh = write(root / "abc123" / "dog.png", 10), write(root / "def456" / "cat.png", 10)
    files = SpentFiles()
    files.add([spent, fresh], root)
    assert files.sweep() == [] and spent.is_file()
    age(spent, UPLOAD_GRACE_S + 1)
    assert files.sweep() == [spent]
    assert not (root / "abc123").exists() and root.is_dir() and fresh.is_file()  # its emptied folder goes too
    age(fresh, UPLOAD_GRACE_S + 1)
    write(fresh, 10)  # uploaded again meanwhile: its grace starts again
    assert files.sweep() == [] and fresh.is_file()


def test_opening_the_sessions_sweeps_up_files_and_folders_that_killed_writes_left(tmp_path):
    """Guards issue 23: a killed DreamBooth write left a hidden .model.*.tmp folder forever."""
    work = tmp_path / "work"
    half_model = work / "s1" / "models" / ".my-dog.k2j3.tmp"
    write(half_model / "unet" / "diffusion_pytorch_model.safetensors", 1_000)
    half_file = write(work / "s1" / "concepts" / ".my-dog.safetensors.x8f1.tmp", 100)
    kept = [write(work / "s1" / "concepts" / "my-dog.safetensors", 100),
            write(work / "s1" / "models" / "my-dog" / "model_index.json", 10)]
    Sessions(work)
    assert not half_model.exists() and not half_file.exists() and all(p.is_file() for p in kept)


def test_a_running_studio_sweeps_up_only_leftovers_older_than_it_allows(tmp_path):
    running = write(tmp_path / ".picture.png.a1b2.tmp", 10)
    stale = write(tmp_path / ".other.png.c3d4.tmp", 10, age_s=2 * EVICT_AFTER_S)
    assert remove_temp_leftovers(tmp_path, older_than_s=EVICT_AFTER_S) == [stale]
    assert running.is_file()


def test_cancel_takes_the_sessions_waiting_jobs_of_that_kind_out_of_line(tmp_path):
    scheduler = FairScheduler()
    sessions = Sessions(tmp_path / "work", scheduler=scheduler)
    scheduler.join("someone else")
    train = scheduler.join("s1", "train")
    generate = scheduler.join("s1", "generate")
    sessions.get("s1").cancel("train")
    assert train.state == "cancelled" and generate.state == WAITING
