"""The small surprises of a newcomer's first hour (issue 29, item 5), each called as plain functions on the tiny
model: what the Library says after a save, a second save, the memory line on a CPU, the Train and Compose defaults,
the cancelled run's last lines, and the seeds of Compose and Inpaint."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import gradio as gr
import pytest
import torch
from PIL import Image

from studio.engine.learned.word import Concept
from studio.engine.memory import PRESETS
from studio.engine.models import ModelManager
from studio.jobs.training import kept_as
from studio.jobs.training_run import TrainingRun, TrainingSnapshot
from studio.library import ConceptLibrary
from studio.training.trainer import TrainEvent
from studio.ui.app import build_app
from studio.ui.state import Studio
from studio.ui.tabs.compose import compose
from studio.ui.tabs.inpaint import brush_radius, inpaint
from studio.ui.tabs.library import save_or_ask_first, show


@pytest.fixture()
def studio(tiny_model_dirs, tmp_path):
    manager = ModelManager()
    manager.load(tiny_model_dirs["sd1"])
    return Studio(manager, ConceptLibrary(tmp_path / "lib"), work_dir=tmp_path / "work")


def add_word(studio: Studio, session: str, token: str, seed: int) -> None:
    torch.manual_seed(seed)
    studio.library.add_session_concept(session, Concept(token, {"text_encoder": torch.randn(1, 768)}, {}))


def test_after_saving_the_details_say_where_the_file_is_and_a_second_save_asks_or_says_it_is_saved(studio):
    """Guards "this session only (not saved)" after a save, and the red error on a second save."""
    add_word(studio, "s1", "<mine>", 1)
    assert "this session only" in show(studio, "s1", "<mine>")
    report, _, question = save_or_ask_first(studio, "s1", "<mine>")
    assert "every user" in report and question == ""
    assert "this session only" not in show(studio, "s1", "<mine>") and "mine.safetensors" in show(studio, "s1",
                                                                                                   "<mine>")
    again, _, _ = save_or_ask_first(studio, "s1", "<mine>")  # the same click once more: no error
    assert "saved in the shared library already (mine.safetensors)" in again
    add_word(studio, "s2", "<mine>", 2)  # another session's own <mine>: asked, not refused in red
    report, box, question = save_or_ask_first(studio, "s2", "<mine>")
    assert box["visible"] is True and "replace that file for every user, or keep both" in question
    assert sorted(p.name for p in studio.library.root.iterdir()) == ["mine.safetensors"]  # nothing saved yet


def test_memory_mode_names_the_device_the_model_is_on():
    """Guards "Everything on the GPU" shown on a machine without one."""
    assert "Everything on the GPU" in PRESETS["fast"].explain("cuda")
    on_cpu = PRESETS["fast"].explain(torch.device("cpu"))
    assert not on_cpu.startswith("Everything on the GPU") and "everything runs on the CPU" in on_cpu


def test_studio_memory_line_on_this_cpu(studio):
    assert "runs on the CPU" in studio.describe_memory() and "Everything on the GPU" not in studio.describe_memory()


def test_train_starts_from_toy_and_compose_from_no_concept(studio, tmp_path):
    """Guards the start word "shape" (the README says `--init toy`) and Compose's non-existent `<my-concept>`."""
    with build_app(studio.manager, studio.library, work_dir=tmp_path / "app") as app:
        pass
    values = {c.get("props", {}).get("label"): c.get("props", {}).get("value") for c in app.config["components"]}
    assert values["Start from the word"] == "toy"
    assert values["Concept A"] in (None, "", [])
    with pytest.raises(gr.Error, match="Concept A is empty"):
        compose(studio, "s1", "", "mosaic", "a {A} in {B} style", 1)


def test_a_cancelled_run_says_cancelled_once_and_never_that_the_word_is_ready():
    """Guards "cancelled: cancelled; ..." followed by "<w> is ready" after a cancel."""
    trainer = SimpleNamespace(config=SimpleNamespace(token="<w>", steps=50),
                              method=SimpleNamespace(phrase=lambda: "<w>"))
    run = TrainingRun(trainer, threading.Event())
    run._record(TrainEvent("cancelled", step=7, total=50, message="cancelled; the state of step 7 saved (resumable)"))
    snapshot = run.snapshot()
    assert snapshot.status.splitlines()[0] == "cancelled; the state of step 7 saved (resumable)"
    assert snapshot.cancelled
    assert kept_as(snapshot, "<w>") == "What it learned by step 7 is kept as <w>"
    assert kept_as(TrainingSnapshot("finished", step=50, total=50), "<w>") == "<w> is ready"


def test_compose_and_inpaint_take_a_seed(studio, tmp_path):
    """Guards Compose and Inpaint without a seed control: a seed given is the seed drawn (PNG parameters)."""
    grid = compose(studio, "s1", "red", "mosaic", "a {A} in {B} style", 2, 7)
    assert [Image.open(p).info["parameters"].count("Seed: 7") for p in grid[:1]] == [1]
    picture = tmp_path / "content.png"
    Image.new("RGB", (40, 40), (200, 30, 30)).save(picture)
    mask = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    mask.paste((255, 255, 255, 255), (10, 10, 30, 30))
    _, result = inpaint(studio, "s1", {"background": Image.open(picture), "layers": [mask]}, "a star", 0.9, 11)
    assert "Seed: 11" in Image.open(result).info["parameters"]


def test_the_inpaint_brush_is_sized_to_the_picture():
    """Guards Gradio's 25-px brush covering a 64-px picture in one stroke."""
    assert brush_radius(64) == 4 and brush_radius(512) == 32 and brush_radius(16) == 2
