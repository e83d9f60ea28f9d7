"""Training in the studio through a real server: loss values stream while it runs, the loss curve and previews are
readable, cancel stops it, and the new word reaches the library and generation (and every concept picker)."""

import re
import time

import gradio as gr
import torch
from gradio_client import Client, handle_file
from PIL import Image

from studio.engine.learned.word import Concept
from studio.engine.models import ModelManager
from studio.library import ConceptLibrary
from studio.ui.app import build_app
from studio.ui.state import client_session
from ui_server import UNetCalls


def png_parameters(path) -> str:
    return Image.open(path).info.get("parameters", "")


def test_training_streams_loss_then_the_word_is_in_the_library_and_generates(studio_server, concept_pictures):
    url, _, _ = studio_server
    client = Client(url, verbose=False)
    job = client.submit([handle_file(p) for p in concept_pictures], "<live-box>", "toy", "object", 1, 6, 0.005, 2, 3,
                        api_name="/train")
    status, concept_file = job.result(timeout=120)
    streamed = [out[0] for out in job.outputs()]
    losses = [float(x) for text in streamed for x in re.findall(r"loss (\d+\.\d+)", text)]
    assert len(streamed) >= 3 and losses, streamed          # several messages while it ran, with loss values
    assert "<live-box> is ready" in status and concept_file.endswith("live-box.safetensors")

    plot, previews = client.predict(api_name="/training_progress")
    columns = plot["columns"]
    raw = [r[columns.index("loss")] for r in plot["data"] if r[columns.index("series")] == "loss"]
    assert len(raw) == 6 and all(v > 0 for v in raw)       # one point per step
    assert {round(v, 4) for v in losses} <= {round(v, 4) for v in raw}  # the streamed values are the plotted ones
    assert len(previews) == 1                               # preview of step 6 (every 3 steps; the latest is kept)

    table = client.predict(api_name="/library")
    assert "<live-box>" in [r[0] for r in table["data"]]
    gallery = client.predict("a photo of <live-box>", "", 1, 2, 7.5, "euler_a", 32, 32, 1, api_name="/generate")
    assert "Concepts: <live-box>" in png_parameters(gallery[0]["image"])


def train_form(steps: int, lr: float, *, stop_when_learned: bool, stop_every: int = 10, progressive: str = "") -> tuple:
    """/train's inputs after the pictures, every one (`FORM`'s order): ti at batch 2, no previews."""
    return ("<grown-box>", "toy", "object", 1, steps, lr, 2, 0, "ti", 4, False, 0, 0, "", False, 20, 1.0, 0.0,
            stop_when_learned, stop_every, progressive, False, False)


def plotted(plot: dict, series: str) -> list[tuple[int, float]]:
    """(step, value) of one series of /training_progress's loss table."""
    columns = plot["columns"]
    return [(row[columns.index("step")], row[columns.index("loss")]) for row in plot["data"]
            if row[columns.index("series")] == series]


def test_a_progressive_run_with_stop_when_learned_off_trains_every_step_into_the_last_count(studio_server,
                                                                                            concept_pictures):
    """Guards the inputs appended to /train: switched off, the run is not scored and trains all its steps; the
    progressive schedule's last count is the word's."""
    from studio.engine.learned.registry import load_concept
    from studio.jobs.training_run import LOSS_SERIES, SCORE_SERIES

    client = Client(studio_server[0], verbose=False)
    status, concept_file = client.predict([handle_file(p) for p in concept_pictures],
                                          *train_form(6, 0.005, stop_when_learned=False, progressive="1:0,2:2,3:4"),
                                          api_name="/train")
    assert "finished: 6 steps in" in status and "converged" not in status and "<grown-box> is ready" in status
    assert load_concept(concept_file).vectors["text_encoder"].shape[0] == 3
    plot, _ = client.predict(api_name="/training_progress")
    assert len(plotted(plot, LOSS_SERIES)) == 6 and plotted(plot, SCORE_SERIES) == []


def test_a_run_that_stops_once_learned_says_converged_at_step_n_and_plots_its_scores(studio_server,
                                                                                     concept_pictures):
    """A word that cannot change (learning rate 0) scores the same every time: with a score every step it stops
    once the window of 3 scorings after step 0 brought nothing, at step 3 of 50; the scores are their own series."""
    from studio.jobs.training_run import LOSS_SERIES, SCORE_SERIES

    client = Client(studio_server[0], verbose=False)
    status, concept_file = client.predict([handle_file(p) for p in concept_pictures],
                                          *train_form(50, 0.0, stop_when_learned=True, stop_every=1),
                                          api_name="/train")
    assert re.search(r"finished: 3 steps in [\d.]+s; converged at step 3\b", status), status
    assert concept_file.endswith("grown-box.safetensors")
    plot, _ = client.predict(api_name="/training_progress")
    scores = plotted(plot, SCORE_SERIES)
    assert [step for step, _ in scores] == [0, 1, 2, 3] and len({value for _, value in scores}) == 1
    assert [step for step, _ in plotted(plot, LOSS_SERIES)] == [1, 2, 3]


def test_cancel_training_stops_within_a_step_with_the_vectors_so_far(studio_server, concept_pictures):
    url, manager, _ = studio_server
    client = Client(url, verbose=False)
    with UNetCalls(manager.current.pipe, training_only=True) as unet:
        job = client.submit([handle_file(p) for p in concept_pictures], "<stopped>", "toy", "object", 1, 2000, 0.005,
                            1, 0, api_name="/train")
        deadline = time.monotonic() + 60  # a failure bound only: the wait is for the first reported loss
        while not any("loss" in (out[0] or "") for out in job.outputs()):
            assert time.monotonic() < deadline, "no training step was reported within 60 s"
            time.sleep(0.1)
        cancel = client.submit(api_name="/cancel_training")
        while cancel.status().code.name not in ("PROCESSING", "FINISHED"):  # the request is in the server's hands
            time.sleep(0.01)
        steps_at_cancel = unet.count
        final_status, final_file = cancel.result(timeout=60)  # returns once the run has stopped
        status, concept_file = job.result(timeout=30)
        stopped_step = int(re.search(r"the state of step (\d+) saved", status).group(1))
    assert "cancelled" in status and concept_file.endswith("stopped.safetensors")
    assert (final_status, final_file) == (status, concept_file)  # the Cancel button shows the same last line
    assert stopped_step == unet.count  # every step the UNet ran is in the saved vectors
    # The step running when the flag was set, and the one or two that can start between the server reporting the
    # cancel request as started and its handler setting the flag.
    assert unet.count - steps_at_cancel <= 3


def test_every_concept_picker_is_refreshed_after_training_import_and_delete(tiny_model_dirs, tmp_path):
    """Guards the wiring: each concept-changing endpoint is followed by a refresh whose outputs are every picker."""
    manager = ModelManager()
    manager.load(tiny_model_dirs["sd1"])
    library = ConceptLibrary(tmp_path)
    app = build_app(manager, library)
    pickers = [b for b in app.blocks.values() if isinstance(b, gr.Dropdown)
               and b.label in ("Insert a concept", "Insert a style concept", "Concept A", "Concept B", "Concept")]
    assert len(pickers) == 7  # generate, style, inpaint, compose A and B, library, evaluate
    fns = list(app.fns.values())
    by_name = {fn.api_name: fn for fn in fns}
    for endpoint in ("train", "import_concepts", "delete_concept", "rename_concept", "load_model", "save_concept"):
        refresh = [fn for fn in fns
                   if fn.trigger_after == by_name[endpoint]._id and getattr(fn.fn, "__name__", "") == "refresh"]
        assert refresh, f"no picker refresh after /{endpoint}"
        assert {p._id for p in pickers} <= {o._id for o in refresh[0].outputs}, endpoint

    library.add_session_concept(client_session("s1"), Concept("<mine>", {"text_encoder": torch.zeros(1, 768)}, {}))
    updates = refresh[0].fn(gr.Request(session_hash="s1"))
    def values(update):  # choices are (label, what goes into the prompt) pairs
        return [choice[1] if isinstance(choice, (tuple, list)) else choice for choice in update["choices"]]

    assert all("<mine>" in values(update) for update in updates[:5])
    assert not any("<mine>" in values(update) for update in refresh[0].fn(gr.Request(session_hash="s2"))[:5])
