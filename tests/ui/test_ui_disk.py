"""What a session leaves on disk, through a real server (issue 23, item 8): uploads leave Gradio's temp folder once
used (refused ones too, after a grace), pictures a session keeps live in its own folder, a session past its quota is
refused in one line, and a studio starts by deleting expired sessions and the leftovers of killed writes."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client, handle_file
from PIL import Image

from studio.engine.models import ModelManager
from studio.jobs.session import UPLOAD_GRACE_S
from studio.library import ConceptLibrary
from studio.ui.app import build_app
from studio.ui.state import SESSION_DAYS, Studio, StudioLimits
from ui_server import launch

QUOTA = 300_000  # bytes per session here: a few small trainings fit, a 400 KB import does not


@pytest.fixture(scope="module")
def disk_server(tiny_model_dirs, tmp_path_factory):
    """`(url, upload folder, work folder)` of a studio whose uploads go to a folder of this module's own."""
    uploads = tmp_path_factory.mktemp("gradio-uploads")
    work = tmp_path_factory.mktemp("work")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("GRADIO_TEMP_DIR", str(uploads))
        manager = ModelManager()
        manager.load(tiny_model_dirs["sd1"])
        app = build_app(manager, ConceptLibrary(tmp_path_factory.mktemp("lib")), work_dir=work,
                        limits=StudioLimits(session_quota_bytes=QUOTA))
        yield launch(app), uploads, work
        app.close()


@pytest.fixture(scope="module")
def named_pictures(concept_pictures, tmp_path_factory) -> list[str]:
    """The concept pictures under names no other upload of this module has."""
    folder = tmp_path_factory.mktemp("named")
    return [shutil.copy(p, folder / f"disk-pic-{k}.png") for k, p in enumerate(concept_pictures)]


def found(folder: Path, name: str) -> list[Path]:
    return sorted(folder.rglob(name))


def sweep(client: Client, uploads: Path) -> None:
    """Let every upload's grace pass (UPLOAD_GRACE_S: another user's upload of the same bytes shares its path), then
    start a job, which sweeps used-up uploads away."""
    long_ago = time.time() - UPLOAD_GRACE_S - 60
    for file in uploads.rglob("*"):
        if file.is_file():
            os.utime(file, (long_ago, long_ago))
    client.predict("a cat", "", 1, 2, 7.5, "euler_a", 32, 32, 1, api_name="/generate")


def test_training_pictures_are_kept_in_the_session_and_leave_gradios_folder(disk_server, named_pictures):
    """Guards issue 23: uploads stayed in Gradio's temp folder for good. Two users sending the same pictures at once
    (one path in Gradio's folder) both train."""
    url, uploads, work = disk_server
    clients = [Client(url, verbose=False) for _ in range(2)]
    jobs = [c.submit([handle_file(p) for p in named_pictures], f"<disk-{k}>", "toy", "object", 1, 2, 0.005, 2, 0,
                     api_name="/train") for k, c in enumerate(clients)]
    assert all(f"<disk-{k}> is ready" in job.result(timeout=300)[0] for k, job in enumerate(jobs))
    kept = found(work, "disk-pic-*.png")
    assert sorted(p.name for p in kept) == sorted(["disk-pic-0.png", "disk-pic-1.png", "disk-pic-2.png"] * 2)
    assert all(p.parent.parent.name == "uploads" for p in kept)  # each session's own copy
    sweep(clients[0], uploads)
    assert found(uploads, "disk-pic-*.png") == []


def test_an_upload_read_once_or_refused_is_used_up(disk_server, tmp_path):
    url, uploads, _ = disk_server
    client = Client(url, verbose=False)
    broken = tmp_path / "disk-broken.pt"
    broken.write_bytes(b"not a concept file")
    report, _ = client.predict([handle_file(str(broken))], api_name="/import_concepts")
    assert report.startswith("disk-broken.pt: ")  # refused, with its reason

    picture = client.predict("a red circle", "", 3, 2, 7.5, "euler_a", 32, 32, 1, api_name="/generate")[0]["image"]
    shutil.copy(picture, tmp_path / "disk-params.png")
    values = client.predict(handle_file(str(tmp_path / "disk-params.png")), api_name="/read_png")
    assert values[0] == "a red circle" and values[2] == 3

    mask = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    mask.paste((255, 255, 255, 255), (4, 4, 16, 16))
    mask.save(tmp_path / "disk-mask.png")
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(tmp_path / "disk-background.png")
    value = {"background": handle_file(str(tmp_path / "disk-background.png")),
             "layers": [handle_file(str(tmp_path / "disk-mask.png"))], "composite": None}
    assert len(client.predict(value, "a blue star", 0.9, api_name="/inpaint")) == 2
    sweep(client, uploads)
    assert [found(uploads, f"disk-{name}") for name in ("broken.pt", "params.png", "mask.png", "background.png")] == [
        [], [], [], []]


def test_an_import_past_the_sessions_quota_is_refused_in_one_line_and_deleted(disk_server, tmp_path):
    url, uploads, _ = disk_server
    client = Client(url, verbose=False)
    big = tmp_path / "disk-big.safetensors"
    big.write_bytes(os.urandom(400_000))
    with pytest.raises(Exception, match=r"^This session's files would pass its 300 KB limit \(0 KB kept, this needs "
                                        r"400 KB more\): delete concepts or LoRAs you no longer need in the Library "
                                        r"tab \(pictures and training files make room by themselves after an hour\)$"):
        client.predict([handle_file(str(big))], api_name="/import_concepts")
    sweep(client, uploads)
    assert found(uploads, "disk-big.safetensors") == []


def test_a_studio_starts_by_deleting_expired_sessions_and_what_killed_writes_left(tiny_model_dirs, tmp_path):
    """Guards issue 23: data/work/<session> never expired, and a killed DreamBooth write left .model.*.tmp."""
    work, sessions = tmp_path / "work", tmp_path / "sessions"
    expired = work / "api-old-session"
    (expired / "models" / "dog").mkdir(parents=True)
    (expired / "models" / "dog" / "model_index.json").write_text("{}")
    (sessions / "api-old-session").mkdir(parents=True)
    (sessions / "api-old-session" / "dog-1234.safetensors").write_bytes(b"x")
    long_ago = time.time() - (SESSION_DAYS + 1) * 86400
    for folder in (expired, sessions / "api-old-session"):
        os.utime(folder, (long_ago, long_ago))
    fresh = work / "api-new-session"
    killed = fresh / "models" / ".dog.k2j3.tmp"
    (killed / "unet").mkdir(parents=True)
    (killed / "unet" / "weights.safetensors").write_bytes(b"x" * 100)
    half = sessions / "api-new-session" / ".dog-5678.safetensors.x8f1.tmp"
    half.parent.mkdir(parents=True)
    half.write_bytes(b"x")
    manager = ModelManager()
    manager.load(tiny_model_dirs["sd1"])
    Studio(manager, ConceptLibrary(tmp_path / "lib", sessions_dir=sessions), work_dir=work)
    assert not expired.exists() and not (sessions / "api-old-session").exists()
    assert fresh.is_dir() and not killed.exists() and not half.exists()
