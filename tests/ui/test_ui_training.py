"""Training in the studio through a real server: loss values stream while it runs, the loss curve and previews are
readable, cancel stops it, and the new word reaches the library and generation (and every concept picker)."""

import re
import time

import gradio as gr
import torch
from gradio_client import Client, handle_file
from PIL import Image

from studio.engine.concepts import Concept
from studio.engine.models import ModelManager
from studio.library import ConceptLibrary
from studio.ui.app import build_app
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


def test_cancel_training_stops_within_a_step_with_the_vectors_so_far(studio_server, concept_pictures):
    url, manager, _ = studio_server
    client = Client(url, verbose=False)
    with UNetCalls(manager.current.pipe, training_only=True) as unet:
        job = client.submit([handle_file(p) for p in concept_pictures], "<stopped>", "toy", "object", 1, 3000, 0.005,
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

    library.add_session_concept("s1", Concept("<mine>", {"text_encoder": torch.zeros(1, 768)}, {}))
    updates = refresh[0].fn(gr.Request(session_hash="s1"))
    def values(update):  # choices are (label, what goes into the prompt) pairs
        return [choice[1] if isinstance(choice, (tuple, list)) else choice for choice in update["choices"]]

    assert all("<mine>" in values(update) for update in updates[:5])
    assert not any("<mine>" in values(update) for update in refresh[0].fn(gr.Request(session_hash="s2"))[:5])
